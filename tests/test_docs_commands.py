"""The commands in README.md and docs/*.md work as written.

Convention: every fenced ```bash block is preceded by a marker line,

* ``<!-- offline -->``: the block runs here, offline, in about a second; this test runs it (from the repository
  root, ``.venv/bin`` first on PATH, ``HF_HUB_OFFLINE=1``, temporary files under a per-test ``TMPDIR``: a block
  writes only under ``mktemp -d``);
* ``<!-- not run: <reason> -->``: the reason says what it needs (a running installation, an API key, minutes).

An unmarked block fails the test, so every new block is a decision. Blocks that are not run are still checked:
each ``llamaduo <command>`` they name must be a real subcommand (its ``--help`` answers), and each relative
Markdown link in the pages must point at a file that exists.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
OFFLINE = "<!-- offline -->"
NOT_RUN = re.compile(r"<!-- not run: (?P<reason>\S.*?) -->")
BLOCK_SECONDS = 60


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    marker: str
    code: str

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def bash_blocks(page: Path) -> list[Block]:
    """Every fenced ```bash block of ``page`` with the marker line above it ('' when there is none)."""
    lines = page.read_text().splitlines()
    blocks, index = [], 0
    while index < len(lines):
        if lines[index].strip() == "```bash":
            start = index
            end = next(i for i in range(start + 1, len(lines)) if lines[i].strip() == "```")
            above = next((lines[i].strip() for i in range(start - 1, -1, -1) if lines[i].strip()), "")
            marker = above if above == OFFLINE or NOT_RUN.fullmatch(above) else ""
            blocks.append(Block(page, start + 1, marker, "\n".join(lines[start + 1:end]) + "\n"))
            index = end
        index += 1
    return blocks


ALL_BLOCKS = [block for page in PAGES for block in bash_blocks(page)]
OFFLINE_BLOCKS = [block for block in ALL_BLOCKS if block.marker == OFFLINE]


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PATH=f"{ROOT / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}", TMPDIR=str(tmp_path),
               HF_HUB_OFFLINE="1", OMP_WAIT_POLICY="PASSIVE", TOKENIZERS_PARALLELISM="false")
    return env


def test_pages_have_command_blocks():
    assert len(ALL_BLOCKS) >= 6 and len(OFFLINE_BLOCKS) >= 2


@pytest.mark.parametrize("block", ALL_BLOCKS, ids=lambda b: b.name)
def test_every_bash_block_is_marked(block: Block):
    assert block.marker, (f"{block.name}: mark the ```bash block with {OFFLINE} (this test runs it) or "
                          "<!-- not run: why --> on the line above it")


@pytest.mark.parametrize("block", OFFLINE_BLOCKS, ids=lambda b: b.name)
def test_offline_block_runs(block: Block, tmp_path: Path):
    started = time.monotonic()
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", block.code], cwd=ROOT, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=BLOCK_SECONDS)
    assert done.returncode == 0, f"{block.name} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    assert time.monotonic() - started < BLOCK_SECONDS / 2, f"{block.name} is too slow to be marked offline"


def _llamaduo_commands() -> set[str]:
    found = set()
    for block in ALL_BLOCKS:
        for line in block.code.splitlines():
            code = line.split("#", 1)[0]
            found.update(re.findall(r"(?:^|[\s;&|(])llamaduo ([a-z][a-z-]*)", code))
    return found


@pytest.mark.parametrize("command", sorted(_llamaduo_commands()))
def test_named_llamaduo_commands_exist(command: str, tmp_path: Path):
    done = subprocess.run(["llamaduo", command, "--help"], cwd=ROOT, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=BLOCK_SECONDS)
    assert done.returncode == 0, f"`llamaduo {command}` named in the docs is not a command:\n{done.stderr}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files(page: Path):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target or target.startswith("mailto:"):
            continue
        assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to {target}, which does not exist"
