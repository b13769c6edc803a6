"""Packaging: one distinctive top-level name with every package folder and data file, services found by entry
point, and an editable install that editors can follow (a strict link tree, not an import hook)."""

from __future__ import annotations

import importlib
import subprocess
import sys
import tomllib
import zipfile
from importlib.metadata import entry_points
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: Repository folder -> the import name it is installed under.
ROOTS = {ROOT / "shared": "llamaduo", ROOT / "services": "llamaduo.services"}


def package_folders() -> dict[str, Path]:
    """Import name -> folder of every package (a folder with ``__init__.py``) in the repository."""
    found = {}
    for folder, name in ROOTS.items():
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder).parts
            found[".".join([name, *rel])] = init.parent
    return found


def declared_packages() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]


def installed_name(path: Path) -> str:
    """``shared/bus/broker.py`` -> ``llamaduo/bus/broker.py`` (where the wheel puts it)."""
    for folder, name in ROOTS.items():
        if path.is_relative_to(folder):
            return "/".join([*name.split("."), *path.relative_to(folder).parts])
    raise ValueError(path)


def test_every_package_folder_is_declared() -> None:
    assert sorted(declared_packages()) == sorted(package_folders())


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(ROOT)], check=True, capture_output=True)
    [wheel] = out.glob("llamaduo-*.whl")
    return zipfile.ZipFile(wheel).namelist()


def test_wheel_has_only_the_llamaduo_package(wheel_names: list[str]) -> None:
    top = {n.split("/")[0] for n in wheel_names}
    assert all(t == "llamaduo" or t.endswith(".dist-info") for t in top), top
    assert "llamaduo/services/controller/app.py" in wheel_names
    assert "llamaduo/tasks/data/invoice.jsonl" in wheel_names and "llamaduo/tasks/invoice_demo.yaml" in wheel_names
    assert not any(n.startswith(("shared/", "services/", "tests/")) for n in wheel_names)


def test_wheel_holds_every_module(wheel_names: list[str]) -> None:
    modules = [installed_name(p) for folder in package_folders().values() for p in folder.glob("*.py")]
    assert sorted(set(modules) - set(wheel_names)) == []


def test_every_service_is_an_entry_point() -> None:
    from llamaduo.runtime.service import SERVICE_ENTRY_POINTS, SERVICES

    found = {ep.name: ep.value for ep in entry_points(group=SERVICE_ENTRY_POINTS)}
    assert found == {name: f"llamaduo.services.{name}.app:register" for name in SERVICES}


def test_editable_install_is_a_link_tree_editors_follow() -> None:
    """``make`` installs in strict editable mode: the import path is a real folder of links into the repository,
    so "go to definition" lands in shared/ and services/ (an import hook would leave editors lost)."""
    import llamaduo

    [package_dir] = [Path(p) for p in llamaduo.__path__]
    assert package_dir.resolve() != (ROOT / "shared").resolve(), "installed as a plain path, not a link tree"
    assert "__editable__" in str(package_dir), f"not a strict editable install: {package_dir}"
    for name, folder in package_folders().items():
        module = importlib.import_module(name)
        assert Path(module.__file__).resolve() == (folder / "__init__.py").resolve(), name
