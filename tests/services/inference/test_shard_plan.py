"""Splitting a round into shards (plan), answering one shard (stored ones reused; abandoned when judging closes
while it is answered), joining them."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from llamaduo.bus.cancellation import MigrationCancelled
from llamaduo.data.examples import Example
from llamaduo.services.inference.domain import GenerationStopped
from llamaduo.services.inference.shards import ShardAbandoned, answer_shard, join_if_complete, plan_shards
from llamaduo.storage.keys import predictions_key, shard_key


def test_plan_covers_every_prompt_once_with_round_wide_batches() -> None:
    ids = [f"t{i}" for i in range(70)]
    plans, total = plan_shards(ids, seed=1, round=0, samples_per_prompt=2, batch_size=10, shard_size=32)
    assert [len(p.prompt_ids) for p in plans] == [32, 32, 6]
    assert sorted(i for p in plans for i in p.prompt_ids) == sorted(ids)
    assert [p.first_batch for p in plans] == [0, 7, 14] and [p.batches for p in plans] == [7, 7, 2]
    assert total == 16
    again, _ = plan_shards(ids, seed=1, round=0, samples_per_prompt=2, batch_size=10, shard_size=32)
    assert again == plans, "a redelivered split must publish the same shards"
    other, _ = plan_shards(ids, seed=1, round=1, samples_per_prompt=2, batch_size=10, shard_size=32)
    assert other[0].prompt_ids != plans[0].prompt_ids, "each round deals the prompts in its own order"


def test_a_stored_shard_is_reused_and_the_last_one_joins(store) -> None:  # type: ignore[no-untyped-def]
    calls: list[list[str]] = []

    def answer(prompts: list[str], should_stop: object = None) -> list[list[str]]:
        calls.append(prompts)
        return [[f"a:{p}"] for p in prompts]

    examples = [Example(id=f"t{i}", instruction=f"q{i}", response=f"r{i}") for i in range(4)]
    first, generated = answer_shard(store, examples[:2], "m-plan", 0, 0, answer, 1)
    assert generated and [i.candidate for i in first] == ["a:q0", "a:q1"]
    assert join_if_complete(store, "m-plan", 0, 2, 1) is None, "joined before every shard was stored"
    again, generated = answer_shard(store, examples[:2], "m-plan", 0, 0, answer, 1)
    assert not generated and again == first and len(calls) == 1, "a stored shard must not be answered again"
    answer_shard(store, examples[2:], "m-plan", 0, 1, answer, 1)
    ref = join_if_complete(store, "m-plan", 0, 2, 1)
    assert ref is not None and ref.key == predictions_key("m-plan", 0)
    assert [r["item_id"] for r in store.iter_jsonl(ref.key)] == ["t0", "t1", "t2", "t3"]


def test_a_shard_is_abandoned_when_judging_closes_while_it_is_answered(store) -> None:  # type: ignore[no-untyped-def]
    closed: list[bool] = []
    cancelled: list[bool] = []

    def answer(prompts: list[str], should_stop: Callable[[], bool] | None = None) -> list[list[str]]:
        closed.append(True)  # the controller closes the round while the model generates
        assert should_stop is not None
        if should_stop():
            raise GenerationStopped("stopped")
        return [[f"a:{p}"] for p in prompts]

    examples = [Example(id=f"t{i}", instruction=f"q{i}", response=f"r{i}") for i in range(2)]
    with pytest.raises(ShardAbandoned, match="abandoned while answering"):
        answer_shard(store, examples, "m-abandon", 0, 0, answer, 1, abandon=lambda: bool(closed))
    assert not store.exists(shard_key("m-abandon", 0, 0))
    with pytest.raises(ShardAbandoned, match="not answered"):  # closed before: no generation at all
        answer_shard(store, examples, "m-abandon", 0, 0, answer, 1, abandon=lambda: True)
    assert len(closed) == 1

    def cancelling(prompts: list[str], should_stop: Callable[[], bool] | None = None) -> list[list[str]]:
        cancelled.append(True)
        assert should_stop is not None and should_stop()
        raise GenerationStopped("stopped")

    with pytest.raises(MigrationCancelled):  # a cancel during generation ends it too, as a cancel
        answer_shard(store, examples, "m-abandon", 0, 0, cancelling, 1, should_cancel=lambda: bool(cancelled),
                     abandon=lambda: False)
    assert not store.exists(shard_key("m-abandon", 0, 0))
