"""bench/gpu_proof.py on a machine without CUDA: exits non-zero at once, says why, and prints valid JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_proof.py"


def _has_cuda() -> bool:
    try:
        import torch
    except Exception:
        return False
    return torch.cuda.is_available()


@pytest.mark.skipif(_has_cuda(), reason="this machine has CUDA: the proof would really run")
def test_no_cuda_exits_non_zero_at_once_with_json() -> None:
    started = time.monotonic()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120, env=env,
                          check=False)
    assert proc.returncode == 2
    assert time.monotonic() - started < 60  # no install, no training: it stops at the check
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ok"] is False
    assert result["failed"] == ["cuda"]
    assert "CUDA" in result["errors"]["cuda"]
    assert "no CUDA GPU" in proc.stderr


def test_not_picked_up_by_make_bench() -> None:
    assert not SCRIPT.name.startswith("bench_")
