"""Preflight: everything about a spec that can be known before a migration starts, checked at once.

``llamaduo validate`` and ``llamaduo migrate`` (before it starts any server) call :func:`preflight`. It lives
with the CLI because it checks *this* machine: the dataset file that ``migrate`` uploads, the environment the
embedded services inherit, the local model caches. Every check runs, so the user sees every problem in one
go, each one line naming the spec field and the fix:

* the dataset: the file exists and parses, has the named columns (else the columns it has are listed), and
  splits into train / eval / holdout with the spec's sizes (the project's own :func:`load_splits`);
* the API key variable of every provider the migration calls (the teacher; the judge's unless the judge is
  programmatic);
* prices, when ``budget.max_cost`` is set (an unpriced model would count as free);
* the student's base model (and a ``local`` provider's model) can be found without downloading anything;
* the user code the spec names (:func:`~llamaduo.tasks.plugins.spec_code_problems`).

What cannot be checked cheaply (an ``s3://`` or ``hf:`` dataset, a Hub that does not answer) is reported as
*not checked*, never as a problem.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llamaduo.errors import LlamaDuoError, SpecError

if TYPE_CHECKING:
    from llamaduo.contracts.spec import DatasetSpec, MigrationSpec, ProviderSpec
    from llamaduo.settings import Settings

#: Seconds the Hugging Face Hub gets to answer whether a model exists.
HUB_TIMEOUT = 10.0


@dataclass
class Preflight:
    """The outcome of :func:`preflight`: ``problems`` refuse the spec; ``unchecked`` says what was not looked at."""

    problems: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)

    def raise_if_problems(self, origin: str) -> None:
        """Raise :class:`SpecError` listing every problem (one line each), if there is any."""
        if self.problems:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            raise SpecError(f"{origin}: {len(self.problems)} problem(s) found before starting anything:\n{lines}")


def preflight(spec: MigrationSpec, *, services_here: bool = True, settings: Settings | None = None) -> Preflight:
    """Check everything knowable about ``spec`` before a migration starts; return ALL problems found.

    ``services_here``: the services run on this machine with this environment (``validate``, ``migrate
    --embedded``); otherwise API keys, the base model and user code are the installation's business and are
    only listed as not checked.
    """
    result = Preflight()
    _check_dataset(spec.dataset, result)
    used = used_providers(spec)
    if spec.budget.max_cost is not None:
        from llamaduo.providers.pricing import missing_price

        result.problems.extend(why for where, provider in used if (why := missing_price(provider, where)))
    if not services_here:
        result.unchecked.append("API keys, the base model and user code: the running installation's services "
                                "use their own environment")
        return result
    for where, provider in used:
        if problem := missing_key(provider, where):
            result.problems.append(problem)
    _check_model(spec.student.base_model, "student.base_model", result)
    for where, provider in used:
        if provider.provider == "local" and provider.model:
            _check_model(provider.model, f"{where}.model", result)
    from llamaduo.tasks.plugins import spec_code_problems

    result.problems.extend(spec_code_problems(spec, settings))
    return result


def used_providers(spec: MigrationSpec) -> list[tuple[str, ProviderSpec]]:
    """``(spec field, provider)`` of every service LLM the migration calls (a programmatic judge calls none)."""
    used = [("teacher", spec.teacher)]
    if spec.judge.method == "llm" and spec.judge_provider is not None:  # else the teacher judges too
        used.append(("judge_provider", spec.judge_provider))
    return used


def missing_key(provider: ProviderSpec, where: str) -> str | None:
    """Why ``provider`` has no API key in this environment, or None (a key is set, or none is needed)."""
    if provider.provider == "openai" or (provider.provider == "openai-compatible" and provider.api_key_env):
        from llamaduo.providers.openai_provider import DEFAULT_KEY_ENV

        names: tuple[str, ...] = (provider.api_key_env or DEFAULT_KEY_ENV,)
    elif provider.provider == "gemini":
        from llamaduo.providers.gemini_provider import DEFAULT_KEY_ENVS

        names = (provider.api_key_env,) if provider.api_key_env else DEFAULT_KEY_ENVS
    else:
        return None
    if any(os.environ.get(name) for name in names):
        return None
    other = "" if provider.api_key_env else f" (or name another variable in {where}.api_key_env)"
    return (f"{where}.api_key_env: the environment variable {' or '.join(names)} is not set; export it with the "
            f"key for {provider.provider} model {provider.model!r}{other}")


# ------------------------------------------------------------------------------------------------ dataset


def _check_dataset(dataset: DatasetSpec, result: Preflight) -> None:
    from llamaduo.data.datasets import DatasetError, load_splits, read_rows

    source = dataset.source
    if dataset.traffic_route is not None:
        result.unchecked.append(f"dataset.source {source}: the gateway's captured traffic is read when the "
                                "migration starts (the controller reads it from the artifact store)")
        return
    if source.startswith(("s3://", "hf:")) or "://" in source:
        result.unchecked.append(f"dataset.source {source}: not read before start (the controller reads it); "
                                "its columns and sizes are checked when the migration starts")
        return
    if not source.startswith("package:"):
        path = Path(source)
        if not path.is_file():
            what = "is a folder, not a file" if path.is_dir() else "does not exist"
            result.problems.append(f"dataset.source {source} {what}: give a .jsonl/.json/.csv/.parquet file "
                                   "(a relative path is read from the spec's folder)")
            return
    try:
        rows = read_rows(source)
    except DatasetError as err:
        result.problems.append(str(err))
        return
    except (OSError, ValueError, TypeError, LookupError) as err:  # unreadable or malformed bytes of the format
        result.problems.append(f"dataset.source {source} cannot be read: {type(err).__name__}: {err}")
        return
    except Exception as err:  # a parser's own error (e.g. a corrupt parquet file)
        result.problems.append(f"dataset.source {source} cannot be parsed: {type(err).__name__}: {err}")
        return
    if missing := _missing_columns(dataset, rows):
        result.problems.extend(missing)
        return
    try:
        splits = load_splits(dataset)
    except LlamaDuoError as err:
        result.problems.append(str(err))
        return
    if dataset.train_size and len(splits.coverage) < dataset.train_size:
        result.problems.append(
            f"dataset.train_size {dataset.train_size} needs more rows: {source} leaves {len(splits.coverage)} "
            f"train rows for coverage (eval {len(splits.test)}, holdout {len(splits.holdout)}); lower "
            "dataset.train_size or add rows")


def _missing_columns(dataset: DatasetSpec, rows: list[Any]) -> list[str]:
    """One problem per named column that no row has, listing the columns the file has."""
    found: dict[str, None] = {}
    for row in rows:
        if isinstance(row, dict):
            found.update(dict.fromkeys(str(k) for k in row))
    if dataset.messages_column:
        wanted = [("dataset.messages_column", dataset.messages_column)]
    else:
        wanted = [("dataset.instruction_column", dataset.instruction_column),
                  ("dataset.response_column", dataset.response_column)]
    problems = []
    for where, column in wanted:
        if column not in found:
            near = difflib.get_close_matches(column, list(found), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            problems.append(f"{where} {column!r} is not a column of {dataset.source}{hint}; its columns are: "
                            f"{', '.join(found) or 'none (no row is an object)'}")
    return problems


# ------------------------------------------------------------------------------------------------ models


def _check_model(name: str, where: str, result: Preflight) -> None:
    """Whether the base model ``name`` can be had without downloading it now (see the module docstring)."""
    from llamaduo.models.resolve import SMOLLM2_ALIAS, ModelResolutionError, cache_dir, smollm2_gguf_path
    from llamaduo.models.tiny import TINY_PREFIX, TINY_PRESETS

    if name == SMOLLM2_ALIAS:
        if not (cache_dir() / "models" / "smollm2-135m-instruct").is_dir():
            try:
                smollm2_gguf_path()
            except ModelResolutionError as err:
                result.problems.append(f"{where} {name!r}: {err}")
        return
    if name.startswith(TINY_PREFIX):
        preset = name[len(TINY_PREFIX):]
        if preset not in TINY_PRESETS:
            result.problems.append(f"{where} {name!r}: unknown tiny preset {preset!r}; known: "
                                   f"{', '.join(sorted(TINY_PRESETS))}")
        return
    path = Path(name).expanduser()
    if path.is_dir():
        return
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        result.problems.append(f"{where} {name!r} is neither an existing folder nor a Hugging Face id "
                               f"(org/name), nor {SMOLLM2_ALIAS!r} or 'tiny:<preset>'")
        return
    _check_hub_model(name, where, result)


def _check_hub_model(repo_id: str, where: str, result: Preflight) -> None:
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError

    try:
        cached = try_to_load_from_cache(repo_id, "config.json")
    except HFValidationError as err:
        result.problems.append(f"{where} {repo_id!r} is not a valid Hugging Face id: {err}")
        return
    if isinstance(cached, str):
        return
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        result.problems.append(f"{where} {repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is "
                               f"set: run `llamaduo pull {repo_id}` once while online")
        return
    try:
        HfApi().model_info(repo_id, timeout=HUB_TIMEOUT)
    except (RepositoryNotFoundError, GatedRepoError) as err:
        kind = "gated (request access, then log in)" if isinstance(err, GatedRepoError) else "not found"
        result.problems.append(f"{where} {repo_id!r}: {kind} on the Hugging Face Hub; check the id")
    except Exception as err:  # the Hub did not answer: it may later
        result.unchecked.append(f"{where} {repo_id!r}: the Hugging Face Hub did not answer "
                                f"({type(err).__name__}); it is downloaded when training starts")
