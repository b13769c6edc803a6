"""The offline simulated provider: the task oracle behind the provider interface."""

from __future__ import annotations

import json

import pytest

from llamaduo.contracts.spec import ProviderSpec, TaskSpec
from llamaduo.data.examples import Example
from llamaduo.data.scoring import score_answer
from llamaduo.providers.base import ChatMessage, CompletionRequest, ProviderError, make_provider
from llamaduo.providers.simulated import SimulatedProvider
from llamaduo.tasks.invoice import make_dataset, oracle

TASK = TaskSpec(name="invoices", oracle="llamaduo.tasks.invoice:oracle")


def _provider() -> SimulatedProvider:
    provider = make_provider(ProviderSpec(), TASK)
    assert isinstance(provider, SimulatedProvider)
    return provider


def _request(purpose: str, context: dict) -> CompletionRequest:
    return CompletionRequest(
        purpose=purpose,  # type: ignore[arg-type]
        messages=[
            ChatMessage(role="system", content="sys"),
            ChatMessage(role="user", content="a prompt " * 20),
        ],
        context=context,
    )


def test_identity() -> None:
    provider = _provider()
    assert provider.simulated and provider.name == "simulated:invoice-extraction"


def test_needs_an_oracle() -> None:
    with pytest.raises(ProviderError, match=r"task\.oracle"):
        SimulatedProvider(ProviderSpec(), TaskSpec(name="x"))


async def test_judge_scores_reference_as_perfect() -> None:
    row = make_dataset(n_train=1, n_test=1)[0]
    provider = _provider()
    ctx = {"instruction": row["instruction"], "reference": row["response"]}
    done = await provider.complete(_request("judge", {**ctx, "candidate": row["response"]}))
    reply = json.loads(done.text)
    assert reply["similarity"] == 100 and reply["precision"] == 100 and "simulated" in reply["reason"]
    assert done.input_tokens > 0 and done.output_tokens > 0 and done.cost == 0
    bad = json.loads((await provider.complete(_request("judge", {**ctx, "candidate": "{}"}))).text)
    assert bad["similarity"] == 1 and isinstance(bad["similarity"], int)


async def test_judge_without_oracle_score_uses_generic_scoring() -> None:
    class NoScore:
        name = "plain"

        def propose(self, seeds: list[Example], n: int, seed: int) -> list[str]:
            return ["q"] * n

        def answer(self, instruction: str) -> str:
            return "a"

    provider = _provider()
    provider.oracle = NoScore()
    ctx = {"instruction": "q", "reference": "the red fox jumps", "candidate": "the red fox sleeps"}
    reply = json.loads((await provider.complete(_request("judge", ctx))).text)
    sim, prec = score_answer(ctx["reference"], ctx["candidate"])
    assert (reply["similarity"], reply["precision"]) == (round(sim), round(prec))


async def test_judge_missing_context_is_a_provider_error() -> None:
    with pytest.raises(ProviderError):
        await _provider().complete(_request("judge", {"instruction": "x"}))


async def test_synthesize_is_deterministic_and_correct() -> None:
    rows = [r for r in make_dataset() if r["split"] == "train"][:4]
    seeds = [
        Example(id=r["id"], instruction=r["instruction"], response=r["response"]).model_dump() for r in rows
    ]
    provider = _provider()
    req = _request("synthesize", {"seeds": seeds, "n": 5, "seed": 42})
    first = await provider.complete(req)
    assert first.text == (await provider.complete(req)).text
    examples = json.loads(first.text)["examples"]
    assert len(examples) == 5
    for ex in examples:
        assert ex["response"] == oracle.answer(ex["instruction"])
    other = await provider.complete(_request("synthesize", {"seeds": seeds, "n": 5, "seed": 43}))
    assert other.text != first.text


async def test_chat_answers_last_user_message() -> None:
    text = make_dataset(n_train=1, n_test=1)[0]["instruction"]
    req = CompletionRequest(purpose="chat", messages=[ChatMessage(role="user", content=text)])
    assert (await _provider().complete(req)).text == oracle.answer(text)
