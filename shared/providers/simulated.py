"""The offline service LLM: a task oracle behind the provider interface.

It reads the structured ``context`` of a request (the prompt's inputs) instead of the messages:

* ``purpose="judge"``: ``context`` has ``instruction``, ``reference``, ``candidate``; the answer is the JSON
  ``{"similarity": int, "precision": int, "reason": str}`` from ``oracle.score`` (or
  :func:`llamaduo.data.scoring.score_answer` when the oracle has none).
* ``purpose="synthesize"``: ``context`` has ``seeds`` (Example mappings), ``n`` and ``seed``; the answer is
  ``{"examples": [{"instruction", "response"}, ...]}`` from ``oracle.propose`` and ``oracle.answer``.
* ``purpose="chat"``: the oracle's answer to the last user message.

Token counts are estimated from the rendered messages and the answer text; the cost is always 0.
Everything is deterministic.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from llamaduo.contracts.spec import ProviderSpec, TaskSpec
from llamaduo.data.examples import Example, example_id
from llamaduo.data.scoring import score_answer
from llamaduo.providers.base import Completion, CompletionRequest, Provider, ProviderError, estimate_tokens
from llamaduo.tasks.oracle import TaskOracle, load_oracle


class SimulatedProvider(Provider):
    """A provider answered by the task's oracle (``task.oracle``); ``simulated`` is True."""

    simulated = True

    def __init__(self, spec: ProviderSpec, task: TaskSpec) -> None:
        """Load the oracle named by ``task.oracle``; raise :class:`ProviderError` if there is none,
        :class:`llamaduo.tasks.oracle.OracleError` if it cannot be loaded."""
        super().__init__(spec, task)
        if not task.oracle:
            raise ProviderError("the simulated provider needs task.oracle ('module:attribute')")
        self.oracle: TaskOracle = load_oracle(task.oracle)
        self.name = f"simulated:{self.oracle.name}"

    async def complete(self, request: CompletionRequest) -> Completion:
        """Answer ``request`` from the oracle (see the module docstring)."""
        if request.purpose == "judge":
            text = self._judge(request.context)
        elif request.purpose == "synthesize":
            text = self._synthesize(request.context)
        else:
            user = [m.content for m in request.messages if m.role == "user"]
            if not user:
                raise ProviderError("simulated chat request has no user message")
            text = self.oracle.answer(user[-1])
        prompt = "\n".join(m.content for m in request.messages) or json.dumps(request.context, default=str)
        return Completion(
            text=text,
            input_tokens=estimate_tokens(prompt),
            output_tokens=estimate_tokens(text),
            cost=0.0,
            model=self.spec.model,
        )

    def _judge(self, context: dict[str, Any]) -> str:
        try:
            instruction = str(context["instruction"])
            reference = str(context["reference"])
            candidate = str(context["candidate"])
        except KeyError as err:
            raise ProviderError(f"simulated judge request lacks context field {err}") from None
        score_fn = getattr(self.oracle, "score", None)
        if callable(score_fn):
            similarity, precision = score_fn(instruction, reference, candidate)
            how = f"oracle {self.oracle.name}"
        else:
            similarity, precision = score_answer(reference, candidate)
            how = "reference overlap"
        sim, prec = _clamp(similarity), _clamp(precision)
        reason = f"simulated judgement ({how}): similarity {sim}, precision {prec} against the reference"
        return json.dumps({"similarity": sim, "precision": prec, "reason": reason})

    def _synthesize(self, context: dict[str, Any]) -> str:
        try:
            n = int(context["n"])
            seed = int(context.get("seed", 0))
            seeds = [_as_example(row) for row in context.get("seeds", [])]
        except (KeyError, TypeError, ValueError, ValidationError) as err:
            raise ProviderError(f"simulated synthesis request has a bad context: {err}") from None
        instructions = self.oracle.propose(seeds, n, seed)
        examples = [{"instruction": text, "response": self.oracle.answer(text)} for text in instructions]
        return json.dumps({"examples": examples}, ensure_ascii=False)


def _clamp(value: float) -> int:
    return int(min(100, max(1, round(float(value)))))


def _as_example(row: Any) -> Example:
    if isinstance(row, Example):
        return row
    if not isinstance(row, dict):
        raise TypeError(f"seed {row!r} is not a mapping")
    if "id" not in row:
        row = {**row, "id": example_id(str(row.get("instruction", "")))}
    return Example.model_validate(row)
