"""``llamaduo demo``: the packaged spec run embedded, and its wall time printed at the very end."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from llamaduo.cli import migrate
from llamaduo.contracts.spec import load_spec


@pytest.mark.parametrize("as_json", [False, True])
def test_demo_runs_the_packaged_spec_embedded_and_prints_its_wall_time_last(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], as_json: bool) -> None:
    ran: list[tuple[bool, str]] = []

    def fake_migrate(args: argparse.Namespace, spec_path: Path | None = None) -> int:
        assert spec_path is not None
        ran.append((args.embedded, load_spec(spec_path).task.name))
        print("the migration's table")
        return 3

    monkeypatch.setattr(migrate, "cmd_migrate", fake_migrate)
    assert migrate.cmd_demo(argparse.Namespace(json=as_json)) == 3  # the migration's exit code
    assert ran == [(True, "invoice-extraction")]
    out, err = capsys.readouterr()
    shown = (err if as_json else out).strip().splitlines()  # --json keeps stdout's last line for the summary
    assert shown[-1].startswith("demo wall time: 0 s (")
