"""``llamaduo pull MODEL``: put a base model where the services will look for it, before a migration needs it.

* a Hugging Face id (``HuggingFaceTB/SmolLM2-360M-Instruct``) is downloaded into the Hugging Face cache the
  services read (``HF_HOME`` / ``HF_HUB_CACHE``; ``HF_TOKEN`` for gated or private repositories), with the same
  file patterns the trainer asks for, so a later run finds it even with ``HF_HUB_OFFLINE=1``;
* ``smollm2-135m`` and ``tiny:<preset>`` are built offline into LlamaDuo's cache (``LLAMADUO_CACHE_DIR``).

Prints where the model is and its size. Run it with the same environment as the services (in Docker:
``docker compose run --rm --no-deps trainer pull MODEL``, which writes to the mounted cache volume).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def folder_size(folder: Path) -> int:
    """Bytes of the files under ``folder``, following links (a hub snapshot links to its blobs)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def describe_size(size: int) -> str:
    """``size`` bytes for a person: ``1.3 GB``, ``540.1 MB``, ``12.0 kB``."""
    value = float(size)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{size} B"
        value /= 1000
    raise AssertionError("unreachable")


def cmd_pull(args: argparse.Namespace) -> int:
    """Resolve ``args.model`` like the trainer does (downloading or building it) and say where it went.

    Raises :class:`~llamaduo.models.resolve.ModelResolutionError` (a ``ModelError``) naming the model and
    what to do: no network, an unknown or private repository, a gated one (set ``HF_TOKEN``), offline mode.
    """
    from llamaduo.models.resolve import resolve_base_model

    print(f"pulling {args.model} ...", file=sys.stderr, flush=True)
    folder = Path(resolve_base_model(args.model))
    print(f"{args.model}: {folder} ({describe_size(folder_size(folder))})")
    return 0
