"""``llamaduo validate``: check a spec file, and everything it names, without running anything."""

from __future__ import annotations

import argparse


def cmd_validate(args: argparse.Namespace) -> int:
    """Load the spec and run the :func:`~llamaduo.cli.preflight.preflight` checks; a bad spec raises
    :class:`~llamaduo.errors.SpecError` naming every problem at once, one line each.

    Code the spec names that the operator did not install or allow (``llamaduo.oracles`` / ``llamaduo.checkers``
    entry points, ``LLAMADUO_ALLOWED_PLUGINS``) is refused without being imported, as the services refuse it.
    """
    from llamaduo.cli.preflight import preflight
    from llamaduo.contracts.spec import load_spec

    spec = load_spec(args.spec)
    checked = preflight(spec)
    checked.raise_if_problems(args.spec)
    print(f"{args.spec}: valid (task {spec.task.name!r}, student {spec.student.base_model}, "
          f"teacher {spec.teacher.provider} {spec.teacher.model})")
    for note in checked.unchecked:
        print(f"  not checked: {note}")
    return 0
