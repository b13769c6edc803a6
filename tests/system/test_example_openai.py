"""``examples/openai.yaml``, run as a user runs it (``llamaduo migrate SPEC --embedded --json``), with only the
OpenAI base URL (a fake Chat Completions server) and the key (a dummy) changed: the migration completes, and
the cost it reports is the cost of the tokens the server billed at the spec's prices.

The fake server plays both OpenAI models from the prompts the services send: a synthesis prompt gets new
tickets like its seeds, a judge prompt a judgement in the judge's format. It grades like a teacher who sees
progress once new data was written: 30 before the first synthesis call, 95 after it, so the loop goes round 0
(below the gate) -> synthesis -> a round that passes -> holdout, whatever the 135M student learns on a CPU.
The dataset path is made absolute (the spec is written to a temporary folder); nothing else changes.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from fakes.llm_servers import FakeOpenAIServer, Recorded, judge_prompt_parts

from llamaduo.cli.main import main

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
_SEEDS_RE = re.compile(r"correct response\):\n(.*?)\n\nWrite (\d+) NEW examples", re.DOTALL)


def _tickets_module() -> ModuleType:
    found = importlib.util.spec_from_file_location("make_tickets", EXAMPLES / "data" / "make_tickets.py")
    assert found is not None and found.loader is not None
    module = importlib.util.module_from_spec(found)
    found.loader.exec_module(module)
    return module


class TeacherAndJudge:
    """Answers the services' synthesis and judge prompts (see the module docstring)."""

    def __init__(self) -> None:
        self.tickets = _tickets_module()
        self.synthesized = threading.Event()
        self.calls = 0

    def __call__(self, rec: Recorded) -> str:
        user = next((m["content"] for m in rec.messages if m["role"] == "user"), "")
        self.calls += 1
        if "### Candidate answer\n" in user:
            _, _, candidate = judge_prompt_parts(user)
            score = 95 if self.synthesized.is_set() else 30
            return json.dumps({"similarity": score, "precision": score, "reason": f"graded {len(candidate)} chars"})
        found = _SEEDS_RE.search(user)
        if found is None:
            return json.dumps({"error": "unexpected prompt"})
        self.synthesized.set()
        rng = random.Random(self.calls)
        rows = self.tickets.make_rows(int(found.group(2)), seed=rng.randrange(10**9))
        return json.dumps({"examples": [
            {"instruction": f"{r['instruction']} (ref {rng.randrange(10**6)})", "response": r["response"]}
            for r in rows]})


def example_with(base_url: str) -> dict[str, Any]:
    spec = yaml.safe_load((EXAMPLES / "openai.yaml").read_text())
    for provider in ("teacher", "judge_provider"):
        spec[provider]["base_url"] = base_url
    spec["dataset"]["source"] = str(EXAMPLES / spec["dataset"]["source"])
    return spec


def test_the_openai_example_completes_and_reports_the_billed_cost(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-dummy")
    server = FakeOpenAIServer(TeacherAndJudge()).start()
    try:
        spec = example_with(server.base_url)
        path = tmp_path / "openai.yaml"
        path.write_text(yaml.safe_dump(spec))
        code = main(["migrate", str(path), "--embedded", "--json", "--no-live",
                     "--data-dir", str(tmp_path / "install"), "--timeout", "1500"])
    finally:
        server.stop()
    out, err = capsys.readouterr()
    summary = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and summary["status"] == "completed", (summary, err[-3000:])
    decisions = [r["decision"] for r in summary["rounds"]]
    # a round whose answers equal round 0's reuses its cached judgements (30): it may take one more round
    assert decisions[0] == "continue" and decisions[-1] == "pass" and summary["rounds"][-1]["synthetic_rows"] > 0

    prices = {spec[p]["model"]: (spec[p]["price_input_per_mtok"], spec[p]["price_output_per_mtok"])
              for p in ("teacher", "judge_provider")}
    billed = [(r.body["model"], *r.usage) for r in server.requests if r.usage]
    assert {model for model, _, _ in billed} == set(prices) == {"gpt-4o", "gpt-4o-mini"}
    expected = sum(prices[m][0] * p / 1e6 + prices[m][1] * c / 1e6 for m, p, c in billed)
    assert summary["cost"] == pytest.approx(expected, abs=1e-6) and 0 < summary["cost"] <= spec["budget"]["max_cost"]
    assert summary["service_tokens"] == sum(p + c for _, p, c in billed)
    assert all(r.headers.get("authorization") == "Bearer sk-test-dummy" for r in server.requests)
    print(f"openai example e2e: {len(billed)} billed calls, {summary['service_tokens']} tokens, "
          f"cost {summary['cost']:.6f} USD (expected {expected:.6f})")
