"""``llamaduo validate``: check a spec file, and the user code it names, without running anything."""

from __future__ import annotations

import argparse

from llamaduo.errors import SpecError


def cmd_validate(args: argparse.Namespace) -> int:
    """Load the spec and its user code; a bad one raises :class:`SpecError` naming every problem."""
    from llamaduo.contracts.spec import load_spec
    from llamaduo.tasks.plugins import spec_code_problems

    spec = load_spec(args.spec)
    problems = spec_code_problems(spec)
    if problems:
        raise SpecError(f"{args.spec}: user code named in the spec cannot be loaded here (the services that use "
                        "it need it too):\n" + "\n".join(f"  - {p}" for p in problems))
    print(f"{args.spec}: valid (task {spec.task.name!r}, student {spec.student.base_model})")
    return 0
