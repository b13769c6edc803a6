"""``llamaduo validate``: check a spec file, and the user code it names, without running anything."""

from __future__ import annotations

import argparse

from llamaduo.errors import SpecError


def cmd_validate(args: argparse.Namespace) -> int:
    """Load the spec and its user code; a bad one raises :class:`SpecError` naming every problem.

    Code the spec names that the operator did not install or allow (``llamaduo.oracles`` / ``llamaduo.checkers``
    entry points, ``LLAMADUO_ALLOWED_PLUGINS``) is refused without being imported, as the services refuse it.
    """
    from llamaduo.contracts.spec import load_spec
    from llamaduo.tasks.plugins import spec_code_problems

    spec = load_spec(args.spec)
    problems = spec_code_problems(spec)
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise SpecError(f"{args.spec}: user code named in the spec is refused or cannot be loaded here (the "
                        f"services that use it need it installed and allowed too):\n{lines}")
    print(f"{args.spec}: valid (task {spec.task.name!r}, student {spec.student.base_model})")
    return 0
