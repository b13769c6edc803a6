"""``llamaduo cancel ID``: stop a running migration; it ends ``cancelled``, keeping its best round's adapter."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import socket
from typing import TYPE_CHECKING

from llamaduo.cli.common import fail, load_settings

if TYPE_CHECKING:
    from llamaduo.contracts.events import Envelope
    from llamaduo.settings import Settings

#: Exit status when the cancel was sent but the migration ended otherwise, or no end was seen in time.
NOT_CONFIRMED_EXIT = 1


def requester() -> str:
    """``user@host`` of whoever runs the CLI (goes into the terminal event's detail)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no user name in a bare container
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


async def _cancel(settings: Settings, migration_id: str, reason: str, wait_s: float) -> tuple[str, Envelope | None]:
    """``(state, terminal event)``: the controller's stage before the cancel ('unknown' when there is none;
    nothing is published then, nor for a finished migration) and the migration's terminal event (None when
    not waited for, or not seen within ``wait_s``)."""
    from llamaduo.bus.client import TERMINAL, follow, list_states, publish_cancel

    states = await list_states(settings, migration_id)
    if not states:
        return "unknown", None
    state = states[0]
    if state.done and str(state.stage) != "cancelled":
        return str(state.stage), None
    if not state.done:
        await publish_cancel(settings, state, reason, requester())
    if wait_s <= 0:
        return str(state.stage), None

    async def terminal() -> Envelope | None:
        async for env in follow(settings, migration_id):
            if env.type in TERMINAL:
                return env
        return None

    try:
        return str(state.stage), await asyncio.wait_for(terminal(), wait_s)
    except TimeoutError:
        return str(state.stage), None


def cmd_cancel(args: argparse.Namespace) -> int:
    """Cancel migration ``args.id``: exit 0 once it ended cancelled (or already was), 2 when there is no such
    migration or it has finished, 1 when it ended otherwise meanwhile or no end was seen within ``--wait``."""
    from llamaduo.contracts.events import outcome_of, validate_migration_id

    try:
        migration_id = validate_migration_id(args.id)
    except ValueError as err:
        return fail(str(err))
    stage, final = asyncio.run(_cancel(load_settings(), migration_id, args.reason or "", args.wait))
    if stage == "unknown":
        return fail(f"no migration {migration_id!r} on this installation (see `llamaduo status`)")
    if stage in ("completed", "failed"):
        return fail(f"migration {migration_id!r} has already {stage}: nothing to cancel")
    if final is None:
        if args.wait <= 0:
            print(f"migration {migration_id}: cancel requested (it was {stage})")
            return 0
        print(f"migration {migration_id}: cancel requested, but no end seen within {args.wait:g}s; is the "
              f"controller running? (`llamaduo status {migration_id}`)")
        return NOT_CONFIRMED_EXIT
    outcome = outcome_of(final)
    if outcome != "cancelled":
        print(f"migration {migration_id} {outcome} before the cancel took effect")
        return NOT_CONFIRMED_EXIT
    p = final.payload
    kept = (f"best round {p.best_round} kept: {p.best_model.key}" if p.best_model else "no round was judged: "
            "no model kept")
    already = " (already)" if stage == "cancelled" else ""
    print(f"migration {migration_id} cancelled{already}; {kept}")
    return 0
