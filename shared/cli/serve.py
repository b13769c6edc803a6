"""``llamaduo serve``: migrated models behind an OpenAI-compatible API."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llamaduo.cli.common import fail, load_settings


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve migrated models behind an OpenAI-compatible API (``/v1/chat/completions``).

    A migration's model answers with its own spec's inference defaults and system prompt; ``--model`` folders
    with those of the last migration given (or the defaults). API keys, limits and run-time adapters: see
    ``docs/serving.md`` (the flags override the ``LLAMADUO_*`` settings).
    """
    from llamaduo.errors import SpecError
    from llamaduo.serving.engine import ModelDefaults
    from llamaduo.serving.guard import ServingLimits
    from llamaduo.serving.migration import fetch_migration_model, migration_defaults
    from llamaduo.serving.server import serve

    models: dict[str, Path] = {}
    defaults: dict[str, ModelDefaults] = {}
    student = system_prompt = None
    for item in args.model or []:
        name, _, path = item.partition("=")
        if not path or not Path(path).is_dir():
            return fail(f"--model {item!r}: use NAME=FOLDER with a trained model folder")
        models[name] = Path(path)
    store = None
    for migration_id in args.migration or []:
        try:
            if store is None:
                from llamaduo.storage.store import ArtifactStore

                store = ArtifactStore(load_settings())
            folder, spec = fetch_migration_model(store, migration_id, Path(args.cache))
        except Exception as err:  # the store's client raises its own types: say which migration and why
            return fail(f"migration {migration_id!r} has no model to serve: {type(err).__name__}: {err}")
        models[migration_id] = folder
        defaults[migration_id] = migration_defaults(spec)
        student, system_prompt = spec.student, spec.task.system_prompt
    if not models:
        return fail("nothing to serve: give --migration ID or --model NAME=FOLDER")
    if args.adapters_dir and not Path(args.adapters_dir).is_dir():
        return fail(f"--adapters-dir {args.adapters_dir!r} is not a folder; create it or name an existing one")
    try:
        limits = ServingLimits.from_settings(
            load_settings(), api_keys_file=args.api_keys_file, max_body_bytes=args.max_body_bytes,
            max_total_tokens=args.max_total_tokens, max_concurrent=args.max_concurrent, max_waiting=args.max_waiting,
        )
    except (SpecError, ValueError) as err:  # a keys file that cannot be read, a limit out of range
        return fail(str(err))
    keys = f"{len(limits.api_keys)} API key(s)" if limits.api_keys else "no API key asked"
    print(f"serving {', '.join(models)} on http://{args.host}:{args.port}/v1 ({keys})", file=sys.stderr)
    serve(models, host=args.host, port=args.port, student=student, system_prompt=system_prompt or "",
          defaults=defaults, limits=limits, adapters_dir=args.adapters_dir)
    return 0
