"""Predictions of a round, generated and stored in shards of :data:`PROMPTS_PER_SHARD` prompts.

Each shard goes to ``shard_key(mid, round, index)`` as soon as it is done; a shard already in S3 is reused, so a
request redelivered after a crash redoes at most one shard (and loads no model when every shard is there). The
shards are then joined into ``predictions_key(mid, round)``, the file ``infer.done`` points at.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from llamaduo.bus.broker import WorkReturned
from llamaduo.bus.cancellation import MigrationCancelled
from llamaduo.contracts.events import ArtifactRef, JudgeItem
from llamaduo.contracts.spec import MigrationSpec
from llamaduo.data.examples import Example
from llamaduo.runtime.work_clock import work_stage
from llamaduo.services.inference.domain import GenerationStopped
from llamaduo.storage.keys import predictions_key, shard_key
from llamaduo.storage.store import ArtifactStore

#: Test prompts per predictions shard (each shard holds K answers per prompt).
PROMPTS_PER_SHARD = 32

class Answerer(Protocol):
    """``answer(prompts)`` -> K answers per prompt (a loaded student's ``generate``); when ``should_stop()`` turns
    true it stops early and raises :class:`~llamaduo.services.inference.domain.GenerationStopped`."""

    def __call__(self, prompts: list[str], should_stop: Callable[[], bool] | None = None) -> list[list[str]]: ...


class ShardAbandoned(Exception):
    """The round's judging closed (early stopping) before the shard was answered: nothing stored or published."""


def _stored_shard(store: ArtifactStore, key: str, expected_ids: list[str]) -> list[JudgeItem] | None:
    """The items of a stored shard, or None when it is absent or is not the shard of these prompts."""
    if not store.exists(key):
        return None
    items = store.read_models(key, JudgeItem)
    return items if [i.item_id for i in items] == expected_ids else None


def predict_in_shards(
    store: ArtifactStore,
    test: list[Example],
    migration_id: str,
    round: int,
    answer: Answerer,
    samples_per_prompt: int,
    *,
    shard_size: int = PROMPTS_PER_SHARD,
    should_stop: Callable[[], bool] | None = None,
    split: str = "eval",
    should_cancel: Callable[[], bool] | None = None,
) -> tuple[list[JudgeItem], int]:
    """Answer ``test`` shard by shard, storing each shard as it is done and reusing stored ones.

    A stored shard is reused only when its items are those of its prompts (same ids, K each), so a changed
    test split or K regenerates it. Returns ``(items in test order, number of shards generated now)``.
    When ``should_stop()`` turns true (the service is shutting down) before a shard is generated,
    :class:`~llamaduo.bus.broker.WorkReturned` is raised: the shards stored so far are kept for the redelivery.
    When ``should_cancel()`` turns true (the migration was cancelled) before a shard is generated or stored,
    :class:`~llamaduo.bus.cancellation.MigrationCancelled` is raised and the shard is not stored.
    """
    cancelled = should_cancel or (lambda: False)
    items: list[JudgeItem] = []
    generated = 0
    for index, start in enumerate(range(0, len(test), shard_size)):
        stored, now = answer_shard(store, test[start:start + shard_size], migration_id, round, index, answer,
                                   samples_per_prompt, should_stop=should_stop, split=split,
                                   should_cancel=cancelled)
        generated += now
        items.extend(stored)
    return items, generated


def answer_shard(
    store: ArtifactStore, chunk: list[Example], migration_id: str, round: int, index: int, answer: Answerer,
    samples_per_prompt: int, *, should_stop: Callable[[], bool] | None = None, split: str = "eval",
    should_cancel: Callable[[], bool] | None = None, abandon: Callable[[], bool] | None = None,
) -> tuple[list[JudgeItem], bool]:
    """Shard ``index`` of a round (the prompts ``chunk``): the stored one when it holds these prompts' answers,
    else answered now and stored. Returns ``(items, generated now)``; stops and cancels as
    :func:`predict_in_shards` says, and a cancel during generation ends it at once too. ``abandon`` (the round's
    judging closed): asked before and during generation; when true, :class:`ShardAbandoned` is raised and the
    shard is not stored."""
    cancelled = should_cancel or (lambda: False)
    dropped = abandon or (lambda: False)
    key = shard_key(migration_id, round, index, split)
    stored = _stored_shard(store, key, [e.id for e in chunk for _ in range(samples_per_prompt)])
    if stored is not None:
        return stored, False
    if cancelled():
        raise MigrationCancelled(f"answering stopped before shard {index}: the migration was cancelled")
    if should_stop is not None and should_stop():
        raise WorkReturned(f"stopped before shard {index}")
    if dropped():
        raise ShardAbandoned(f"shard {index} not answered: the round's judging is closed")
    try:
        answers = answer([e.instruction for e in chunk], should_stop=lambda: cancelled() or dropped())
    except GenerationStopped:
        if cancelled():
            raise MigrationCancelled(f"answering stopped in shard {index}: the migration was cancelled") from None
        raise ShardAbandoned(f"shard {index} abandoned while answering: the round's judging closed") from None
    if cancelled():
        raise MigrationCancelled(f"shard {index} answered, not stored: the migration was cancelled")
    items = [JudgeItem(item_id=e.id, sample=k, instruction=e.instruction, reference=e.response, candidate=text)
             for e, samples in zip(chunk, answers, strict=True) for k, text in enumerate(samples)]
    with work_stage("other"):
        store.put_jsonl(key, items)
    return items, True


@dataclass(frozen=True)
class ShardPlan:
    """Shard ``shard`` of a round: its prompt ids and its judge batches ``first_batch`` .. + ``batches`` - 1."""

    shard: int
    prompt_ids: list[str]
    first_batch: int
    batches: int


def plan_shards(prompt_ids: list[str], seed: object, round: int, samples_per_prompt: int, batch_size: int, *,
                shard_size: int = PROMPTS_PER_SHARD) -> tuple[list[ShardPlan], int]:
    """Split a round's eval prompts into shards of ``shard_size`` and number their judge batches round-wide.

    The prompts are dealt in a seeded random order (``seed``, ``round``): sequential early stopping treats the
    batches in published order as random samples, and a shard is a contiguous run of batches. Returns
    ``(plans, total batches)``; the same arguments give the same plan (a redelivered split publishes the same)."""
    order = list(prompt_ids)
    random.Random(f"{seed}-{round}").shuffle(order)
    plans, first = [], 0
    for index, start in enumerate(range(0, len(order), shard_size)):
        ids = order[start:start + shard_size]
        n = -(-len(ids) * samples_per_prompt // batch_size)
        plans.append(ShardPlan(index, ids, first, n))
        first += n
    return plans, first


def join_if_complete(store: ArtifactStore, migration_id: str, round: int, shards: int,
                     samples_per_prompt: int) -> ArtifactRef | None:
    """Join a round's shards into ``predictions_key(mid, round)`` once every one of them is stored (written
    once: two workers storing the last shards at the same time write the same content); None while any is
    missing."""
    keys = [shard_key(migration_id, round, i) for i in range(shards)]
    if not all(store.exists(k) for k in keys):
        return None
    items = [i for k in keys for i in store.read_models(k, JudgeItem)]
    return store.put_jsonl(predictions_key(migration_id, round), items, once=True)


def lazy_answerer(load: Callable[[], Answerer]) -> Answerer:
    """An :data:`Answerer` that calls ``load()`` (download and load the student) on its first use only."""
    loaded: list[Answerer] = []

    def answer(prompts: list[str], should_stop: Callable[[], bool] | None = None) -> list[list[str]]:
        if not loaded:
            loaded.append(load())
        return loaded[0](prompts, should_stop)

    return answer


def predict_round(
    store: ArtifactStore, spec: MigrationSpec, test: list[Example], migration_id: str, round: int,
    adapter: ArtifactRef | str, model_dir: Path, *, shard_size: int = PROMPTS_PER_SHARD,
    should_stop: Callable[[], bool] | None = None, split: str = "eval",
    should_cancel: Callable[[], bool] | None = None, answer: Answerer | None = None,
) -> tuple[list[JudgeItem], ArtifactRef]:
    """Predictions of a round (sharded, see :func:`predict_in_shards`) joined into ``predictions.jsonl``.

    ``adapter``: the ``train.done`` event's ref. The adapter folder must lie under the migration's prefix, its
    index must have the ref's sha256 and every file its index hash, else
    :class:`~llamaduo.errors.StoreError` before anything is loaded (a bare key is checked for its prefix and
    per-file hashes only). ``predictions.jsonl`` is written once (a redelivery never replaces a published one).
    ``split``: 'eval', or 'holdout' (its shards and predictions in the round's ``holdout/`` folder).
    ``answer``: the student already loaded from ``adapter`` by this process (then nothing is downloaded or loaded).
    """

    def load() -> Answerer:
        from llamaduo.services.inference.domain import load_generator

        with work_stage("load"):
            if isinstance(adapter, ArtifactRef):
                store.get_ref_dir(migration_id, adapter, model_dir)
            else:
                store.get_dir(adapter, model_dir, migration_id=migration_id)
            generator = load_generator(spec.student, model_dir)
        return lambda prompts, should_stop=None: generator.generate(prompts, spec.task.system_prompt,
                                                                     should_stop=should_stop)

    k = spec.student.inference.samples_per_prompt
    items, _ = predict_in_shards(store, test, migration_id, round, answer or lazy_answerer(load), k,
                                 shard_size=shard_size,
                                 should_stop=should_stop, split=split, should_cancel=should_cancel)
    if should_cancel is not None and should_cancel():
        raise MigrationCancelled(f"round {round} answered, predictions not stored: the migration was cancelled")
    return items, store.put_jsonl(predictions_key(migration_id, round, split), items, once=True)
