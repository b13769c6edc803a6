"""Synthetic data across rounds: a row that duplicates one kept by an earlier round is removed, and the bus
adapter hands every earlier round's kept rows to the domain."""

from __future__ import annotations

import asyncio
import json

from fakes.providers import Scripted
from faststream.nats import TestNatsBroker

from llamaduo.bus.broker import Bus
from llamaduo.contracts.events import Subject, SynthRequest, parse_event, start_envelope
from llamaduo.contracts.spec import ProviderSpec, SynthesisSpec, TaskSpec, parse_spec
from llamaduo.data.examples import Example, example_id
from llamaduo.providers.base import make_provider
from llamaduo.services.synthesizer.app import _earlier_synthetic
from llamaduo.services.synthesizer.app import register as register_synth
from llamaduo.services.synthesizer.domain import SynthResult, synthesize
from llamaduo.storage.keys import data_key, round_key, spec_key
from llamaduo.tasks.invoice import make_dataset, oracle

TASK = TaskSpec(name="invoices", oracle="llamaduo.tasks.invoice:oracle")
ROWS = make_dataset(n_train=40, n_test=10, seed=4)
TRAIN = [Example(**{k: r[k] for k in ("id", "instruction", "response")}) for r in ROWS if r["split"] == "train"]
TEST = [Example(**{k: r[k] for k in ("id", "instruction", "response")}) for r in ROWS if r["split"] == "test"]


def _synthetic(texts: list[str], round: int) -> list[Example]:
    return [Example(id=example_id(t, "syn"), instruction=t, response=oracle.answer(t), source=f"synthetic:{round}")
            for t in texts]


def _run(rows: list[dict], earlier: list[Example], round: int = 3) -> SynthResult:
    provider = Scripted(lambda n: json.dumps({"examples": rows if n == 1 else []}), TASK)
    spec = SynthesisSpec(examples_per_call=len(rows), samples_per_round=len(rows))
    return asyncio.run(synthesize(TRAIN, TEST, SynthRequest(samples=len(rows)), spec, provider, round=round, seed=7,
                                  system_prompt="", earlier=earlier))


def test_duplicates_of_earlier_rounds_rows_are_removed() -> None:
    texts = oracle.propose([], 30, seed=17)
    earlier = _synthetic(texts[:5], 1) + _synthetic(texts[5:10], 2)
    rows = [{"instruction": "  " + e.instruction.upper(), "response": e.response} for e in earlier[:5]]  # exact
    rows += [{"instruction": e.instruction.replace(":", " -") + " !", "response": e.response}
             for e in earlier[5:]]  # near: the same words, other punctuation
    fresh = [{"instruction": t, "response": oracle.answer(t)} for t in texts[10:]]
    result = _run(rows + fresh, earlier)
    assert result.removed == {"duplicate": 5, "near_duplicate": 5}, result.removed
    assert [e.instruction for e in result.examples] == texts[10:]
    assert _run(rows + fresh, []).kept == len(rows) + len(fresh)  # without them, the same rows are new


class _Store:
    """The two calls of the artifact store the adapter uses to read earlier rounds."""

    def __init__(self, objects: dict[str, list[Example]]) -> None:
        self.objects = objects
        self.read: list[str] = []

    def exists(self, key: str) -> bool:
        return key in self.objects

    def read_models(self, key: str, model: type[Example]) -> list[Example]:
        self.read.append(key)
        return self.objects[key]


def test_adapter_reads_every_earlier_round_that_wrote_synthetic_data() -> None:
    mid = "m-rounds"
    one, two, three = (_synthetic([t], r) for r, t in enumerate(oracle.propose([], 3, seed=2), start=1))
    store = _Store({round_key(mid, 1, "synthetic.jsonl"): one, round_key(mid, 2, "synthetic.jsonl"): two,
                    round_key(mid, 3, "synthetic.jsonl"): three})
    assert _earlier_synthetic(store, mid, 3) == one + two  # type: ignore[arg-type]
    assert store.read == [round_key(mid, 1, "synthetic.jsonl"), round_key(mid, 2, "synthetic.jsonl")]
    assert _earlier_synthetic(store, mid, 1) == []  # type: ignore[arg-type]


SPEC = parse_spec({
    "task": {"name": "invoices", "oracle": "llamaduo.tasks.invoice:oracle"},
    "dataset": {"source": "x.jsonl"},
    "student": {"base_model": "tiny:llama", "method": "full"},
    "synthesis": {"samples_per_round": 8, "examples_per_call": 4, "seeds_per_call": 2},
})


async def test_synth_request_skips_rows_an_earlier_round_kept(settings, store) -> None:  # type: ignore[no-untyped-def]
    mid = "m-earlier"
    store.put_json(spec_key(mid), SPEC.model_dump(mode="json"))
    store.put_jsonl(data_key(mid, "train"), TRAIN)
    store.put_jsonl(data_key(mid, "test"), TEST)
    # what the (deterministic, simulated) teacher writes first in round 2, stored as round 1's output
    provider = make_provider(ProviderSpec(), SPEC.task)
    first = await synthesize(TRAIN, TEST, SynthRequest(samples=8), SPEC.synthesis, provider, round=2,
                             seed=SPEC.dataset.seed, system_prompt=SPEC.task.system_prompt)
    store.put_jsonl(round_key(mid, 1, "synthetic.jsonl"), first.examples)
    bus = Bus(settings, "synthesizer")
    register_synth(bus, store)
    req = start_envelope(mid, {}).follow(Subject.SYNTH_REQUEST, SynthRequest(samples=8), round=2, key="s")
    async with TestNatsBroker(bus.broker) as br:
        await br.publish(req.to_bytes(), settings.subject(Subject.SYNTH_REQUEST))
        mock = bus.publisher(Subject.SYNTH_READY).mock
        assert mock is not None
        [ready] = [parse_event(call.args[0]) for call in mock.call_args_list]
    rows = list(store.iter_jsonl(ready.payload.dataset.key))
    assert ready.payload.removed.get("duplicate", 0) >= len(first.examples) == 8
    assert not {r["instruction"] for r in rows} & {e.instruction for e in first.examples}
