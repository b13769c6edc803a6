"""``llamaduo cancel ID`` against a real nats-server: a clear error for an unknown or finished migration, one
``migration.cancel`` command for a running one however often it is asked (the controller is not running here:
tests/system/test_cancel.py runs the whole installation)."""

from __future__ import annotations

import asyncio

import nats
import pytest
from support.bus import Recorder

from llamaduo.cli import cancel
from llamaduo.cli.main import main
from llamaduo.contracts.events import Stage, Subject
from llamaduo.contracts.state import MigrationState


async def put_state(settings, migration_id: str, stage: Stage) -> None:
    """A controller state as the controller writes it (KV bucket, key: the migration id)."""
    nc = await nats.connect(settings.nats_url)
    try:
        kv = await nc.jetstream().create_key_value(bucket=settings.kv_bucket, history=5)
        state = MigrationState(migration_id=migration_id, correlation_id=f"start-{migration_id}", stage=stage,
                               spec={}, outcome="completed" if stage == Stage.COMPLETED else None)
        await kv.put(migration_id, state.model_dump_json().encode())
    finally:
        await nc.close()


@pytest.fixture
def cli(settings, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(cancel, "load_settings", lambda: settings)
    return lambda *args: main(["cancel", *args])


def test_cancelling_an_unknown_or_finished_migration_is_a_clear_error(settings, cli, capsys) -> None:
    assert cli("m-nobody", "--wait", "0") == 2
    assert "no migration 'm-nobody' on this installation" in capsys.readouterr().err
    asyncio.run(put_state(settings, "m-finished", Stage.COMPLETED))
    assert cli("m-finished") == 2
    assert "migration 'm-finished' has already completed: nothing to cancel" in capsys.readouterr().err
    assert cli("Not An Id") == 2


def test_a_running_migration_gets_one_cancel_command_however_often_asked(settings, cli, capsys) -> None:
    asyncio.run(put_state(settings, "m-running", Stage.TRAINING))

    async def run() -> list:
        async with Recorder(settings) as rec:
            assert await asyncio.to_thread(cli, "m-running", "--wait", "0", "--reason", "wrong teacher") == 0
            assert await asyncio.to_thread(cli, "m-running", "--wait", "0") == 0
            await rec.wait_for(Subject.MIGRATION_CANCEL)
            await asyncio.sleep(0.3)
        nc = await nats.connect(settings.nats_url)  # what the stream kept (the controller's input)
        try:
            info = await nc.jetstream().stream_info(settings.stream_name)
            sub = await nc.jetstream().subscribe(settings.subject("migration.cancel"), stream=settings.stream_name,
                                                 ordered_consumer=True)
            stored = [await sub.next_msg(timeout=5)]
            while True:
                try:
                    stored.append(await sub.next_msg(timeout=0.5))
                except nats.errors.TimeoutError:
                    break
            assert info.state.messages >= 1
            return stored
        finally:
            await nc.close()

    stored = asyncio.run(run())
    assert len(stored) == 1  # the second cancel has the same event id: JetStream dropped it
    assert "cancel requested (it was training)" in capsys.readouterr().out
    assert b'"reason":"wrong teacher"' in stored[0].data and b'"requested_by":"' in stored[0].data


def test_the_wait_says_when_no_end_was_seen(settings, cli, capsys) -> None:
    asyncio.run(put_state(settings, "m-orphan", Stage.JUDGING))
    assert cli("m-orphan", "--wait", "1") == 1  # no controller here: nobody ends it
    assert "no end seen within 1s" in capsys.readouterr().out
