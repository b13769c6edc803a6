"""The synthesizer: the service LLM writes new training examples from train-split seeds, then filters.

Plain async code, no messaging: :func:`synthesize` draws seeds from the TRAIN split only (never reusing
seeds of earlier rounds until the pool runs out, :mod:`~llamaduo.services.synthesizer.seeds`), asks the
provider for new examples like them (:mod:`~llamaduo.services.synthesizer.prompts`), validates the replies
(bad replies are re-asked a bounded number of times, :func:`llamaduo.providers.reask.ask_until_valid`; a
call that still fails is counted, never raised) and keeps only examples that pass the filters
(:mod:`~llamaduo.services.synthesizer.filters`: ``invalid``, ``empty``, ``duplicate``, ``contaminated``,
``contaminated_response``, ``near_duplicate``), each removal counted by reason, plus ``excess``: rows beyond
what a call asked for. Duplicates are checked against train and every earlier round's kept rows;
contamination against the held-out split, on instructions and responses, on what varies
(:mod:`~llamaduo.services.synthesizer.decontamination`).

Embeddings (when an embedding check is on) are computed in batches: train and held-out instructions once per
:func:`synthesize` run, each call's candidate rows at once, off the event loop.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import BaseModel, Field

from llamaduo.bus.cancellation import MigrationCancelled
from llamaduo.contracts.events import SynthRequest, Usage
from llamaduo.contracts.spec import SynthesisSpec
from llamaduo.data.embeddings import SentenceEmbedder, get_embedder
from llamaduo.data.examples import Example, example_id
from llamaduo.providers.base import CompletionRequest, Provider
from llamaduo.providers.reask import UsageTally, ask_until_valid
from llamaduo.services.synthesizer.filters import DEFAULT_NEAR_DUPLICATE_THRESHOLD, EmbeddingFilter, RowFilter
from llamaduo.services.synthesizer.prompts import SYNTH_SCHEMA, build_messages, parse_reply, reask_message
from llamaduo.services.synthesizer.seeds import SeedPool


class SynthResult(BaseModel):
    """What one synthesis round produced."""

    examples: list[Example] = Field(
        default_factory=list, description="Kept examples, source 'synthetic:<round>'"
    )
    generated: int = Field(default=0, description="Rows the provider returned")
    kept: int = 0
    removed: dict[str, int] = Field(default_factory=dict, description="Removed rows by reason")
    seed_ids: list[str] = Field(default_factory=list, description="Train ids used as seeds, in order of use")
    usage: Usage = Field(default_factory=Usage)
    calls: int = Field(default=0, description="Synthesis calls (each may have several attempts)")
    failed_calls: int = Field(default=0, description="Calls that gave no usable reply after their attempts")
    seed_pool_restarted: bool = False
    notes: list[str] = Field(default_factory=list)


def _vary_seed(request: CompletionRequest, attempt: int) -> CompletionRequest:
    """Each attempt of a call samples with its own seed (a re-ask must not get the same reply)."""
    return request.model_copy(update={"context": {**request.context, "seed": request.context["seed"] * 31 + attempt}})


async def _call(
    provider: Provider,
    request: CompletionRequest,
    n: int,
    attempts: int,
    semaphore: asyncio.Semaphore,
    tally: UsageTally,
) -> tuple[list[Any] | None, str]:
    """One synthesis call with re-asks: ``(rows, "")`` or ``(None, why its last attempt failed)``."""
    asked = await ask_until_valid(
        provider, request, parse_reply, reask=lambda err: reask_message(err, n), attempts=attempts,
        semaphore=semaphore, tally=tally, prepare=_vary_seed,
    )
    if asked.value is not None:
        return asked.value, ""
    return None, asked.errors[-1] if asked.errors else ""


async def synthesize(
    train: list[Example],
    held_out: list[Example],
    request: SynthRequest,
    spec: SynthesisSpec,
    provider: Provider,
    round: int,
    seed: int,
    system_prompt: str,
    *,
    near_duplicate_threshold: float = DEFAULT_NEAR_DUPLICATE_THRESHOLD,
    max_attempts: int = 3,
    embedder: SentenceEmbedder | None = None,
    earlier: Sequence[Example] = (),
    holdout: Sequence[Example] = (),
    should_cancel: Callable[[], bool] | None = None,
) -> SynthResult:
    """Generate up to ``request.samples`` new examples (``spec.samples_per_round`` if that is 0).

    Seeds come from ``train`` only (never ``held_out``), ``spec.seeds_per_call`` per call, without
    replacement and skipping ``request.exclude_seed_ids``. Each call asks for ``spec.examples_per_call``
    examples (fewer for the last). Calls run in waves of up to the provider's ``max_concurrency`` and
    are filtered in call order, so the result is deterministic for a deterministic provider. At most
    ``3 * ceil(target / examples_per_call) + 2`` calls are made; a wave in which every call failed ends
    the round early. Never raises for provider or reply problems.

    ``held_out`` is the eval split (it gates every round): targeted seeds are chosen near its failed items
    (``request.failed_item_ids``; ids of other splits are ignored) and no kept row may be contaminated by it.
    ``holdout`` (judged once at the end) is only decontaminated against: targeting never reads it. ``earlier``
    holds the synthetic rows kept by earlier rounds: a row duplicating one of them (exactly or nearly) is
    removed like a duplicate of a train row.

    With ``spec.embedding_decontamination_threshold`` or ``spec.embedding_near_duplicate_threshold`` set,
    the embedding checks run with ``embedder`` (default: the process-wide packaged model, see
    :func:`llamaduo.data.embeddings.get_embedder`; a missing model raises
    :class:`llamaduo.data.embeddings.EmbeddingModelMissing` before any call is made).

    ``should_cancel`` (the migration was cancelled) is checked before each wave of teacher calls and before
    returning: when true, :class:`~llamaduo.bus.cancellation.MigrationCancelled` is raised (no further calls).
    """
    cancelled = should_cancel or (lambda: False)
    target = request.samples if request.samples > 0 else spec.samples_per_round
    rng = random.Random(seed * 1_000_003 + round)
    by_id = {e.id: e for e in held_out}  # eval items only: the holdout is never a target
    targets: list[str] = []
    if spec.strategy == "targeted":
        targets = [by_id[i].instruction for i in request.failed_item_ids if i in by_id]
    # ordering a targeted pool compares every failure with every train row: seconds for a large split, off the loop
    pool = await asyncio.to_thread(SeedPool, train, set(request.exclude_seed_ids), rng, targets)
    embeddings: EmbeddingFilter | None = None
    if spec.embedding_decontamination_threshold is not None or spec.embedding_near_duplicate_threshold is not None:
        embeddings = await asyncio.to_thread(
            EmbeddingFilter,
            embedder or get_embedder(),
            [e.instruction for e in [*train, *earlier]],
            [e.instruction for e in [*held_out, *holdout]],
            spec.embedding_decontamination_threshold,
            spec.embedding_near_duplicate_threshold,
        )
    filters = RowFilter(train, [*held_out, *holdout], spec, near_duplicate_threshold, embeddings, earlier)
    semaphore = asyncio.Semaphore(provider.spec.limits.max_concurrency)
    max_calls = 3 * math.ceil(target / spec.examples_per_call) + 2
    result = SynthResult()
    if spec.strategy == "targeted" and not targets:
        result.notes.append("targeted strategy without failed test items: seeds drawn uniformly")
    tally = UsageTally()
    kept: list[Example] = []
    seed_ids: list[str] = []

    while len(kept) < target and result.calls < max_calls and train:
        if cancelled():
            raise MigrationCancelled(f"synthesis stopped after {result.calls} calls: the migration was cancelled")
        wanted = target - len(kept)
        wave = min(
            provider.spec.limits.max_concurrency,
            math.ceil(wanted / spec.examples_per_call),
            max_calls - result.calls,
        )
        jobs = []
        drawn = await asyncio.to_thread(lambda k=wave: [pool.draw(spec.seeds_per_call) for _ in range(k)])
        for seeds in drawn:  # a draw that empties the pool orders it again: off the loop too
            n = min(spec.examples_per_call, wanted)
            wanted -= n
            seed_ids.extend(s.id for s in seeds)
            call_seed = (seed * 1_000_003 + round) * 10_007 + result.calls
            result.calls += 1
            req = CompletionRequest(
                purpose="synthesize",
                messages=build_messages(seeds, n, system_prompt),
                json_schema=SYNTH_SCHEMA,
                temperature=provider.spec.temperature,
                context={
                    "seeds": [s.model_dump() for s in seeds],
                    "n": n,
                    "seed": call_seed,
                    "system_prompt": system_prompt,
                },
            )
            jobs.append((n, _call(provider, req, n, max_attempts, semaphore, tally)))
        replies = await asyncio.gather(*(job for _, job in jobs))
        wave_failed = 0
        for (n, _), (rows, error) in zip(jobs, replies, strict=True):
            if rows is None:
                wave_failed += 1
                result.failed_calls += 1
                result.notes.append(f"call failed: {error}")
                continue
            result.generated += len(rows)
            if len(rows) > n:
                filters.removed["excess"] += len(rows) - n
            vectors = await asyncio.to_thread(filters.embed, rows[:n]) if filters.embeddings else {}
            for row in rows[:n]:
                if len(kept) >= target:
                    filters.removed["excess"] += 1
                    continue
                checked = filters.check(row, vectors)
                if checked:
                    instruction, response = checked
                    kept.append(
                        Example(
                            id=example_id(instruction, "syn"),
                            instruction=instruction,
                            response=response,
                            source=f"synthetic:{round}",
                        )
                    )
        if wave_failed == len(jobs):
            result.notes.append("every call of a wave failed: round ended early")
            break

    if cancelled():
        raise MigrationCancelled(f"synthesis stopped after {result.calls} calls: the migration was cancelled")
    if not train:
        result.notes.append("no train examples to use as seeds")
    if pool.restarted:
        result.seed_pool_restarted = True
        result.notes.append("seed pool exhausted (all train seeds used by earlier rounds): started over")
    if len(kept) < target:
        result.notes.append(f"kept {len(kept)} of {target} wanted after {result.calls} calls")
    result.usage = tally.usage(provider.simulated)
    result.examples = kept
    result.kept = len(kept)
    result.removed = dict(sorted(filters.removed.items()))
    result.seed_ids = list(dict.fromkeys(seed_ids))
    return result
