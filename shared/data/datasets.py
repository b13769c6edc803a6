"""Coverage datasets: load from a file, S3, the hub or captured gateway traffic, map columns, split train / eval /
holdout.

Rows are checked one by one; a dataset with bad rows is refused with the row numbers and what is wrong.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from llamaduo.contracts.spec import DatasetSpec
from llamaduo.data.examples import Example, example_id
from llamaduo.errors import DataError

if TYPE_CHECKING:
    from llamaduo.data.traffic import TrafficStore

#: Values accepted in the split column ('eval' and 'test' name the same split).
SPLIT_NAMES = ("train", "test", "eval", "holdout")


class DatasetError(DataError):
    """A coverage dataset that cannot be used (names the source, and the bad rows)."""


class Splits(BaseModel):
    train: list[Example]
    """Whole train split: seeds for synthesis come from here."""
    coverage: list[Example]
    """The part of the train split used for training (``train_size`` rows, or all)."""
    test: list[Example]
    """The eval split: it gates every round and is the only split targeted synthesis looks at."""
    holdout: list[Example] = []
    """Judged once at the end with the chosen model, reported beside the gate score, never used for a decision."""


def read_rows(source: str, fetch_s3: Callable[[str], bytes] | None = None) -> list[dict[str, Any]]:
    """The rows of ``dataset.source`` as dicts (a local file, ``package:``, ``hf:``, or ``s3://`` with
    ``fetch_s3``), before any column mapping or splitting; raises :class:`DatasetError` naming the source."""
    if source.startswith("s3://"):
        if fetch_s3 is None:
            raise DatasetError(f"dataset.source {source}: no artifact store to read s3:// from")
        data = fetch_s3(source)
        suffix = Path(source).suffix
    elif source.startswith("hf:"):
        import datasets

        ds = datasets.load_dataset(source[3:])
        rows = []
        for split_name, split in ds.items():
            rows.extend({**r, "split": split_name} for r in split)
        return rows
    elif source.startswith("package:"):
        from importlib import resources

        pkg, _, name = source[len("package:"):].partition("/")
        data = resources.files(pkg).joinpath(name).read_bytes()
        suffix = Path(name).suffix
    else:
        path = Path(source)
        if not path.is_file():
            raise DatasetError(f"dataset.source {source}: file not found")
        data = path.read_bytes()
        suffix = path.suffix
    if suffix in (".jsonl", ".ndjson"):
        rows = []
        for n, line in enumerate(data.decode().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DatasetError(f"dataset.source {source}: line {n} is not JSON ({err.msg})") from None
        return rows
    if suffix == ".json":
        return list(json.loads(data))
    if suffix == ".csv":
        return list(csv.DictReader(data.decode().splitlines()))
    if suffix == ".parquet":
        import io

        import pyarrow.parquet as pq

        return pq.read_table(io.BytesIO(data)).to_pylist()
    raise DatasetError(f"dataset.source {source}: unsupported format {suffix!r} (jsonl, json, csv, parquet)")


def _to_example(row: dict[str, Any], spec: DatasetSpec) -> Example:
    if spec.messages_column:
        msgs = row.get(spec.messages_column)
        if not isinstance(msgs, list):
            raise ValueError(f"column {spec.messages_column!r} must be a list of messages")
        user = [m["content"] for m in msgs if m.get("role") == "user"]
        bot = [m["content"] for m in msgs if m.get("role") == "assistant"]
        if not user or not bot:
            raise ValueError("messages need a user and an assistant turn")
        instruction, response = user[0], bot[-1]
    else:
        for col in (spec.instruction_column, spec.response_column):
            if col not in row:
                raise ValueError(f"missing column {col!r}")
        instruction, response = row[spec.instruction_column], row[spec.response_column]
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError("empty instruction")
    if not isinstance(response, str) or not response.strip():
        raise ValueError("empty response")
    rid = str(row.get("id") or example_id(instruction))
    return Example(id=rid, instruction=instruction, response=response)


def _holdout(spec: DatasetSpec, train: list[Example], coverage: list[Example]) -> list[Example]:
    """The holdout drawn (seeded) from the train split, never from the coverage rows.

    By default ``holdout_fraction`` of the train split, from the rows not used for coverage (``train_size``),
    as many as there are: with coverage the whole train split, there is no default holdout. An explicit
    ``holdout_size`` is exact: from the rows beyond coverage, or, when coverage is the whole train split, from
    it (coverage then gives those rows up); too few rows is a :class:`DatasetError` naming the field.
    """
    covered = {e.id for e in coverage}
    beyond = [e for e in train if e.id not in covered]
    if spec.holdout_size is None:
        pool, wanted = beyond, min(len(beyond), round(len(train) * spec.holdout_fraction))
    else:
        pool, wanted = (beyond if beyond else list(train)), spec.holdout_size
        if wanted > (len(pool) if beyond else len(pool) - 1):
            raise DatasetError(
                f"dataset {spec.source}: dataset.holdout_size {wanted} needs more rows than the "
                f"{len(pool)} train rows {'beyond coverage' if beyond else 'of the train split (keeping one)'}; "
                "lower it (0 = no holdout) or dataset.train_size")
    return random.Random(spec.seed + 2).sample(pool, wanted) if wanted > 0 else []


def _traffic_source_rows(spec: DatasetSpec, store: TrafficStore | None,
                         now: datetime | None) -> tuple[list[dict[str, Any]], DatasetSpec]:
    """The rows of a ``traffic:<route>`` source and the column mapping they come in."""
    from llamaduo.data.traffic import traffic_rows

    route = spec.traffic_route
    assert route is not None
    if store is None:
        raise DatasetError(f"dataset.source {spec.source}: no artifact store to read captured traffic from")
    mapping = spec.model_copy(update={"instruction_column": "instruction", "response_column": "response",
                                      "messages_column": None, "split_column": None})
    return traffic_rows(store, route, spec.traffic, now=now), mapping


def load_splits(spec: DatasetSpec, fetch_s3: Callable[[str], bytes] | None = None, *,
                traffic_store: TrafficStore | None = None, now: datetime | None = None) -> Splits:
    """Load, validate and split the coverage dataset. Deterministic for a given ``spec.seed``.

    A ``traffic:<route>`` source is read from ``traffic_store`` (the artifact store; :mod:`llamaduo.data.traffic`:
    the upstream's answers of the window ending ``now``, deduplicated and sampled), then split like any other.

    Three splits: eval (``split`` 'eval' or 'test', or ``test_fraction`` of the rows without a split column;
    capped by ``test_size``), holdout (rows labelled 'holdout'; else drawn from the train split, see
    :func:`_holdout`) and train (the rest; ``coverage`` is ``train_size`` of it, the rest are seeds). An
    instruction of eval or holdout is never in train.
    """
    if spec.traffic_route is not None:
        rows, spec = _traffic_source_rows(spec, traffic_store, now)
    else:
        rows = read_rows(spec.source, fetch_s3)
    if not rows:
        raise DatasetError(f"dataset.source {spec.source}: no rows")
    examples: list[tuple[Example, str | None]] = []
    bad: list[str] = []
    for n, row in enumerate(rows, 1):
        try:
            if not isinstance(row, dict):
                raise ValueError("not an object")
            split = row.get(spec.split_column) if spec.split_column else None
            if split is not None and split not in SPLIT_NAMES:
                raise ValueError(f"{spec.split_column}={split!r} (use 'train', 'eval' or 'test', 'holdout')")
            examples.append((_to_example(row, spec), "test" if split == "eval" else split))
        except (ValueError, KeyError, TypeError) as err:
            bad.append(f"row {n}: {err}")
    if bad:
        shown = "\n  ".join(bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise DatasetError(f"dataset {spec.source} has {len(bad)} bad rows:\n  {shown}")
    ids = [e.id for e, _ in examples]
    if len(set(ids)) != len(ids):
        raise DatasetError(f"dataset {spec.source}: ids are not unique")
    rng = random.Random(spec.seed)
    labelled_holdout = [e for e, s in examples if s == "holdout"]
    if any(split is not None for _, split in examples):
        train = [e for e, s in examples if s not in ("test", "holdout")]
        test = [e for e, s in examples if s == "test"]
    else:
        shuffled = [e for e, _ in examples]
        rng.shuffle(shuffled)
        n_test = max(1, round(len(shuffled) * spec.test_fraction))
        test, train = shuffled[:n_test], shuffled[n_test:]
    if spec.test_size:
        test = test[: spec.test_size]
    if not train or not test:
        raise DatasetError(f"dataset {spec.source}: train ({len(train)}) and eval ({len(test)}) must both have rows")
    test_texts = {e.instruction.strip().lower() for e in test}
    train = [e for e in train if e.instruction.strip().lower() not in test_texts]
    coverage = train
    if spec.train_size and spec.train_size < len(train):
        coverage = random.Random(spec.seed + 1).sample(train, spec.train_size)
    if labelled_holdout:  # capped by holdout_size (0 = no holdout)
        holdout = labelled_holdout[: spec.holdout_size] if spec.holdout_size is not None else labelled_holdout
    else:
        holdout = _holdout(spec, train, coverage)
    held = {e.instruction.strip().lower() for e in holdout}  # never trained on, never a seed
    train = [e for e in train if e.instruction.strip().lower() not in held]
    coverage = [e for e in coverage if e.instruction.strip().lower() not in held]
    if not coverage:
        raise DatasetError(f"dataset {spec.source}: no train rows left for coverage beside the holdout")
    return Splits(train=train, coverage=coverage, test=test, holdout=holdout)
