"""The ``llamaduo`` command itself: help a user reads, ``--version``, service names as choices, and a quiet
exit when the reader of its output goes away."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from llamaduo import __version__
from llamaduo.cli.main import main
from llamaduo.runtime.service import SERVICES


def help_of(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def commands(top_help: str) -> list[str]:
    section = top_help.split("commands:\n", 1)[1].split("\n\n", 1)[0]
    return re.findall(r"^    (\w+)  ", section, re.MULTILINE)


def arguments_without_help(text: str) -> list[str]:
    """Entries of the 'positional arguments' and 'options' sections with no help text beside or below them."""
    bare = []
    for section in re.findall(r"^(?:positional arguments|options):\n(.*?)(?:\n\n|\Z)", text, re.DOTALL | re.MULTILINE):
        lines = section.splitlines()
        for i, line in enumerate(lines):
            if re.match(r"^  \S", line) and not re.match(r"^  \S.*?\s{2,}\S", line):
                follows = lines[i + 1] if i + 1 < len(lines) else ""
                if not re.match(r"^\s{4,}\S", follows):
                    bare.append(line.strip())
    return bare


def test_the_program_help_speaks_to_a_user(capsys):
    text = help_of(capsys)
    assert "Migrate a task from a paid service LLM" in text and "llamaduo validate examples/openai.yaml" in text
    assert "``" not in text and ":class:" not in text  # no module docstring markup
    assert {"migrate", "validate", "service", "demo", "asyncapi", "status"} <= set(commands(text))


def test_every_command_and_argument_has_help(capsys):
    top = help_of(capsys)
    assert arguments_without_help(top) == []
    for command in commands(top):
        text = help_of(capsys, command)
        assert arguments_without_help(text) == [], command
        assert re.search(rf"^    {command}\s+\S", top, re.MULTILINE), f"{command} has no help line"


def test_the_help_check_sees_a_bare_argument():
    assert arguments_without_help("positional arguments:\n  spec\n\noptions:\n  -h, --help  show help\n") == ["spec"]


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"llamaduo {__version__}"


def test_service_names_are_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["service", "trainerr"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'trainerr'" in err and all(repr(name) in err for name in SERVICES)
    assert all(name in help_of(capsys, "service") for name in SERVICES)


def test_a_closed_pipe_ends_the_command_quietly():
    """``llamaduo asyncapi | head -1``: the document (larger than a pipe's buffer) meets a closed pipe."""
    proc = subprocess.Popen([sys.executable, "-m", "llamaduo.cli", "asyncapi"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    proc.stdout.close()  # the reader goes away, as head does after one line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 1
    assert first.startswith(b"asyncapi:") and err == ""
