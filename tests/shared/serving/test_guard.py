"""The guard's settings and imports: keys from the environment and files, limits, and no torch for the gateway."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from llamaduo.errors import SpecError
from llamaduo.serving.guard import ServingLimits, read_api_keys_file
from llamaduo.settings import Settings


def test_the_gateway_side_imports_no_torch() -> None:
    code = ("import sys, llamaduo.serving, llamaduo.serving.guard, llamaduo.serving.api\n"
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"


def test_limits_from_environment_files_and_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_file, flag_file = tmp_path / "env-keys", tmp_path / "flag-keys"
    env_file.write_text("# rotated 2026-05\nkey-c\n\n  key-a  \n")
    flag_file.write_text("key-d\n")
    monkeypatch.setenv("LLAMADUO_API_KEYS", "key-a, key-b")
    monkeypatch.setenv("LLAMADUO_API_KEYS_FILE", str(env_file))
    monkeypatch.setenv("LLAMADUO_ADMIN_API_KEYS", "admin-z")
    monkeypatch.setenv("LLAMADUO_SERVE_MAX_BODY_BYTES", "2048")
    monkeypatch.setenv("LLAMADUO_SERVE_MAX_WAITING", "3")
    limits = ServingLimits.from_settings(Settings(), api_keys_file=flag_file, max_waiting=0, max_concurrent=None)
    assert [k.get_secret_value() for k in limits.api_keys] == ["key-a", "key-b", "key-c", "key-d"]
    assert [k.get_secret_value() for k in limits.admin_api_keys] == ["admin-z"]
    assert (limits.max_body_bytes, limits.max_waiting, limits.max_concurrent) == (2048, 0, 4)
    assert "key-a" not in repr(limits) and "admin-z" not in repr(limits)


def test_unreadable_or_empty_keys_files_are_spec_errors(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"missing-keys.*cannot be read"):
        read_api_keys_file(tmp_path / "missing-keys")
    (tmp_path / "empty").write_text("# nothing yet\n\n")
    with pytest.raises(SpecError, match="holds no key"):
        read_api_keys_file(tmp_path / "empty")
