"""The whole loop with the service LLMs behind HTTP: five service processes, a tiny student, and teacher
and judge both ``provider: openai-compatible`` pointing at a fake Chat Completions server that answers
like the triage oracle. Nothing on the service side knows it is a test: the judge's reply is computed from
the judge *prompt* (the request's structured context never goes over HTTP), the synthetic examples from
the synthesis prompt.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import re
import time
import uuid
from pathlib import Path

import pytest
from fakes.llm_servers import FakeOpenAIServer, Recorded, judge_prompt_parts
from support.specs import THRESHOLD, triage_spec

from llamaduo.bus.client import follow, publish_start, wait_ready
from llamaduo.contracts.events import Subject
from llamaduo.contracts.spec import parse_spec
from llamaduo.data.examples import Example, example_id
from llamaduo.runtime.embedded import Embedded
from llamaduo.tasks.triage import oracle

pytestmark = pytest.mark.slow

_CALLS = itertools.count()
_SEEDS_RE = re.compile(r"correct response\):\n(.*?)\n\nWrite (\d+) NEW examples", re.DOTALL)


def teacher_and_judge(rec: Recorded) -> str:
    """Answer a judge prompt or a synthesis prompt (built by the services) like the oracle would."""
    user = next((m["content"] for m in rec.messages if m["role"] == "user"), "")
    if "### Candidate answer\n" in user:
        instruction, reference, candidate = judge_prompt_parts(user)
        sim, prec = oracle.score(instruction, reference, candidate)
        return json.dumps({"similarity": round(sim), "precision": round(prec),
                           "reason": "the queue matches" if sim >= 50 else "wrong queue"})
    found = _SEEDS_RE.search(user)
    if found is None:
        return json.dumps({"error": "unexpected prompt"})
    seeds = [Example(id=example_id(s["instruction"]), instruction=s["instruction"], response=s["response"])
             for s in json.loads(found.group(1))]
    # a sampling LLM answers the same prompt differently each time; seeding by the prompt alone would repeat
    # the same few tickets, which the synthesizer (rightly) removes as duplicates of earlier rounds
    seed = int(hashlib.sha256(user.encode()).hexdigest()[:8], 16) + next(_CALLS)
    proposed = oracle.propose(seeds, int(found.group(2)), seed)
    return json.dumps({"examples": [{"instruction": t, "response": oracle.answer(t)} for t in proposed]})


async def run(env: Embedded, spec: dict, migration_id: str, timeout: float) -> list:
    await wait_ready(env.settings)
    await publish_start(env.settings, migration_id, parse_spec(spec))
    events = []

    async def collect() -> None:
        async for event in follow(env.settings, migration_id):
            events.append(event)

    task = asyncio.ensure_future(collect())
    deadline = time.monotonic() + timeout
    while not task.done():
        dead = [p for p in env.processes if p.proc.poll() is not None]
        assert not dead, f"{dead[0].name} exited: {dead[0].log_path.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no terminal event within {timeout}s"
        await asyncio.sleep(0.5)
    await task
    return events


def test_full_loop_through_an_openai_compatible_server(tmp_path: Path, triage_data: Path) -> None:
    server = FakeOpenAIServer(teacher_and_judge).start()
    try:
        llm = {"provider": "openai-compatible", "base_url": server.base_url, "model": "fake-teacher"}
        spec = {**triage_spec(triage_data), "teacher": llm, "judge_provider": llm}
        migration_id = "oai-" + uuid.uuid4().hex[:6]
        with Embedded(tmp_path / "install") as env:
            events = asyncio.run(run(env, spec, migration_id, timeout=480))
            logs = {p.name: p.log_path.read_text()[-3000:] for p in env.processes if p.log_path}
    finally:
        server.stop()
    final = events[-1]
    assert final.type == Subject.MIGRATION_COMPLETED, (final, logs)
    rounds = final.payload.rounds
    assert len(rounds) >= 2, rounds
    first, last = rounds[0], rounds[-1]
    assert first.aggregates["similarity_mean"] < THRESHOLD and first.decision == "continue"
    assert last.aggregates["similarity_mean"] >= THRESHOLD and last.decision == "pass"
    assert first.synthetic_rows == 0 and last.synthetic_rows > 0

    judge_calls = [r for r in server.requests if "### Candidate answer" in r.last_user]
    synth_calls = [r for r in server.requests if "NEW examples" in r.last_user]
    assert judge_calls and synth_calls and len(judge_calls) + len(synth_calls) == server.calls
    assert all(r.body["model"] == "fake-teacher" for r in server.requests)
    assert all(r.body["response_format"]["type"] == "json_schema" for r in server.requests)
    # every token the server reported is in the migration's usage, and nothing else is
    usage = final.payload.usage
    assert not usage.simulated
    assert usage.input_tokens == sum(r.usage[0] for r in server.requests if r.usage)
    assert usage.output_tokens == sum(r.usage[1] for r in server.requests if r.usage)
    assert usage.calls == server.calls
    synth_tokens = sum(e.payload.usage.tokens for e in events if e.type == Subject.SYNTH_READY)
    assert synth_tokens == sum(sum(r.usage) for r in synth_calls if r.usage)
    # the early-stopped first round left batches unjudged: fewer judge calls than answers judged naively
    if first.early_stopped:
        assert first.judged < first.to_judge == 40
    print(f"openai-compatible e2e: {len(rounds)} rounds, {server.calls} calls "
          f"({len(judge_calls)} judge, {len(synth_calls)} synthesis), {usage.tokens} tokens: "
          + ", ".join(f"r{r.round} {r.aggregates['similarity_mean']:.1f} ({r.judged}/{r.to_judge} judged"
                      f"{', early' if r.early_stopped else ''})" for r in rounds))
