"""Predictions of a round, generated and stored in shards of :data:`PROMPTS_PER_SHARD` prompts.

Each shard goes to ``shard_key(mid, round, index)`` as soon as it is done; a shard already in S3 is reused, so a
request redelivered after a crash redoes at most one shard (and loads no model when every shard is there). The
shards are then joined into ``predictions_key(mid, round)``, the file ``infer.done`` points at.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from llamaduo.bus.broker import WorkReturned
from llamaduo.bus.cancellation import MigrationCancelled
from llamaduo.contracts.events import ArtifactRef, JudgeItem
from llamaduo.contracts.spec import MigrationSpec
from llamaduo.data.examples import Example
from llamaduo.storage.keys import predictions_key, shard_key
from llamaduo.storage.store import ArtifactStore

#: Test prompts per predictions shard (each shard holds K answers per prompt).
PROMPTS_PER_SHARD = 32

#: ``answer(prompts)`` -> K answers per prompt (a loaded :class:`StudentGenerator`'s ``generate``).
Answerer = Callable[[list[str]], list[list[str]]]


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
        chunk = test[start:start + shard_size]
        key = shard_key(migration_id, round, index, split)
        stored = _stored_shard(store, key, [e.id for e in chunk for _ in range(samples_per_prompt)])
        if stored is None:
            if cancelled():
                raise MigrationCancelled(f"answering stopped before shard {index}: the migration was cancelled")
            if should_stop is not None and should_stop():
                raise WorkReturned(f"stopped before shard {index}; {index} shard(s) stored")
            answers = answer([e.instruction for e in chunk])
            if cancelled():
                raise MigrationCancelled(f"shard {index} answered, not stored: the migration was cancelled")
            stored = [JudgeItem(item_id=e.id, sample=k, instruction=e.instruction, reference=e.response,
                                candidate=text)
                      for e, samples in zip(chunk, answers, strict=True) for k, text in enumerate(samples)]
            store.put_jsonl(key, stored)
            generated += 1
        items.extend(stored)
    return items, generated


def lazy_answerer(load: Callable[[], Answerer]) -> Answerer:
    """An :data:`Answerer` that calls ``load()`` (download and load the student) on its first use only."""
    loaded: list[Answerer] = []

    def answer(prompts: list[str]) -> list[list[str]]:
        if not loaded:
            loaded.append(load())
        return loaded[0](prompts)

    return answer


def predict_round(
    store: ArtifactStore, spec: MigrationSpec, test: list[Example], migration_id: str, round: int,
    adapter: ArtifactRef | str, model_dir: Path, *, shard_size: int = PROMPTS_PER_SHARD,
    should_stop: Callable[[], bool] | None = None, split: str = "eval",
    should_cancel: Callable[[], bool] | None = None,
) -> tuple[list[JudgeItem], ArtifactRef]:
    """Predictions of a round (sharded, see :func:`predict_in_shards`) joined into ``predictions.jsonl``.

    ``adapter``: the ``train.done`` event's ref. The adapter folder must lie under the migration's prefix, its
    index must have the ref's sha256 and every file its index hash, else
    :class:`~llamaduo.errors.StoreError` before anything is loaded (a bare key is checked for its prefix and
    per-file hashes only). ``predictions.jsonl`` is written once (a redelivery never replaces a published one).
    ``split``: 'eval', or 'holdout' (its shards and predictions in the round's ``holdout/`` folder).
    """

    def load() -> Answerer:
        from llamaduo.services.inference.domain import load_generator

        if isinstance(adapter, ArtifactRef):
            store.get_ref_dir(migration_id, adapter, model_dir)
        else:
            store.get_dir(adapter, model_dir, migration_id=migration_id)
        generator = load_generator(spec.student, model_dir)
        return lambda prompts: generator.generate(prompts, spec.task.system_prompt)

    k = spec.student.inference.samples_per_prompt
    items, _ = predict_in_shards(store, test, migration_id, round, lazy_answerer(load), k, shard_size=shard_size,
                                 should_stop=should_stop, split=split, should_cancel=should_cancel)
    if should_cancel is not None and should_cancel():
        raise MigrationCancelled(f"round {round} answered, predictions not stored: the migration was cancelled")
    return items, store.put_jsonl(predictions_key(migration_id, round, split), items, once=True)
