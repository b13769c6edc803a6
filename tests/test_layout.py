"""The layout's rules, checked on the source tree itself.

* Dependencies point one way: a service imports ``llamaduo.*`` and its own modules, never another service's;
  nothing in ``shared/`` imports a service (the runtime finds them through entry points).
* Only public APIs of dependencies: no ``_internal`` module is imported.
* Modules stay readable in one sitting: over :data:`MAX_LINES` lines only with a ``# size:`` comment saying why.
* The tests mirror the source: ``tests/shared/<pkg>/`` and ``tests/services/<svc>/`` name existing folders.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED, SERVICES, TESTS = ROOT / "shared", ROOT / "services", ROOT / "tests"
MAX_LINES = 400


def python_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every import in ``path``, including ``importlib.import_module("...")`` literals."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found.extend((node.lineno, f"{node.module}.{alias.name}") for alias in node.names)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant | ast.JoinedStr)):
            arg = node.args[0]
            text = arg.value if isinstance(arg, ast.Constant) else "".join(
                str(v.value) if isinstance(v, ast.Constant) else "{}" for v in arg.values)
            found.append((node.lineno, str(text)))
    return found


def where(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def service_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[:2] == ["llamaduo", "services"] else None


def cross_service_imports(files: list[Path], services_root: Path) -> list[str]:
    bad = []
    for path in files:
        own = path.relative_to(services_root).parts[0]
        for line, module in imported_modules(path):
            other = service_of(module)
            if other is not None and other != own:
                bad.append(f"{where(path)}:{line} imports {module}")
    return bad


def shared_imports_of_services(files: list[Path]) -> list[str]:
    return [f"{where(path)}:{line} imports {module}" for path in files
            for line, module in imported_modules(path) if module.startswith("llamaduo.services")]


def internal_imports(files: list[Path]) -> list[str]:
    return [f"{where(path)}:{line} imports {module}" for path in files
            for line, module in imported_modules(path) if "._internal" in module or module.startswith("_internal")]


def oversized(files: list[Path]) -> list[str]:
    out = []
    for path in files:
        lines = path.read_text().splitlines()
        if len(lines) > MAX_LINES and not any(line.lstrip().startswith("# size:") for line in lines):
            out.append(f"{where(path)}: {len(lines)} lines and no '# size:' comment saying why")
    return out


def test_services_never_import_each_other() -> None:
    assert cross_service_imports(python_files(SERVICES), SERVICES) == []


def test_shared_never_imports_a_service() -> None:
    assert shared_imports_of_services(python_files(SHARED)) == []


def test_no_private_modules_of_dependencies() -> None:
    assert internal_imports(python_files(SHARED) + python_files(SERVICES) + python_files(ROOT / "bench")) == []


def test_modules_are_readable_in_one_sitting() -> None:
    assert oversized(python_files(SHARED) + python_files(SERVICES)) == []


def test_tests_mirror_the_source() -> None:
    strays = [str(p.relative_to(ROOT)) for p in (TESTS / "shared").iterdir() if p.is_dir()
              and p.name != "__pycache__" and not (SHARED / p.name).is_dir()]
    strays += [str(p.relative_to(ROOT)) for p in (TESTS / "services").iterdir() if p.is_dir()
               and p.name != "__pycache__" and not (SERVICES / p.name).is_dir()]
    flat = [p.name for p in TESTS.glob("test_*.py") if p.name not in ("test_layout.py", "test_packaging.py",
                                                                      "test_docs_commands.py")]
    assert (strays, flat) == ([], [])


# ------------------------------------------------------------------------------ the checks can fail


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "judge").mkdir()
    (tmp_path / "trainer").mkdir()
    return tmp_path


def test_the_checks_see_violations(tree: Path) -> None:
    judge = tree / "judge" / "app.py"
    judge.write_text("from llamaduo.services.trainer.domain import train\nimport llamaduo.services.judge.domain\n"
                     "from faststream._internal.middlewares import BaseMiddleware\n"
                     "importlib.import_module(f'llamaduo.services.{name}.app')\n")
    assert cross_service_imports([judge], tree) == [
        f"{judge}:1 imports llamaduo.services.trainer.domain",
        f"{judge}:1 imports llamaduo.services.trainer.domain.train",
        f"{judge}:4 imports llamaduo.services.{{}}.app",
    ]
    assert [line.split(" imports ")[1] for line in shared_imports_of_services([judge])] == [
        "llamaduo.services.trainer.domain", "llamaduo.services.trainer.domain.train", "llamaduo.services.judge.domain",
        "llamaduo.services.{}.app"]
    assert [line.split(" imports ")[1] for line in internal_imports([judge])] == [
        "faststream._internal.middlewares", "faststream._internal.middlewares.BaseMiddleware"]
    big = tree / "big.py"
    big.write_text("x = 1\n" * (MAX_LINES + 1))
    assert len(oversized([big])) == 1
    big.write_text("# size: one table that reads best whole\n" + "x = 1\n" * (MAX_LINES + 1))
    assert oversized([big]) == []
