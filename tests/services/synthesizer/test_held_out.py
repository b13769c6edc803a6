"""Held-out honesty of the synthesizer: contamination on instructions and responses, measured on what varies.

Two tasks: the invoice demo (test invoices re-rendered in another template, with the teacher's answer equal
to the test reference) and a templated support-triage task built here (a fixed 35-word instruction before a
varying customer message; answers are one-word team names). The tests print the rates they assert
(``pytest -s``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import random

from fakes.providers import Scripted

from llamaduo.contracts.events import SynthRequest
from llamaduo.contracts.spec import SynthesisSpec, TaskSpec
from llamaduo.data.examples import Example
from llamaduo.data.text import tokenize
from llamaduo.services.synthesizer.decontamination import (
    AnswerIndex,
    Decontaminator,
    canonical_answer,
    common_ngrams,
    varying_runs,
)
from llamaduo.services.synthesizer.domain import SynthResult, synthesize
from llamaduo.tasks.invoice import FAMILIES, Invoice, make_dataset, match_family, oracle, render

INVOICE_TASK = TaskSpec(name="invoices", oracle="llamaduo.tasks.invoice:oracle")


def _examples(rows: list[dict], split: str) -> list[Example]:
    return [Example(id=r["id"], instruction=r["instruction"], response=r["response"]) for r in rows
            if r["split"] == split]


ROWS = make_dataset()
TRAIN, TEST = _examples(ROWS, "train"), _examples(ROWS, "test")


def _synthesize(rows: list[dict], train: list[Example], held_out: list[Example], task: TaskSpec = INVOICE_TASK
                ) -> SynthResult:
    """One scripted call returning ``rows``, filtered against ``train`` and ``held_out``."""
    provider = Scripted(lambda n: json.dumps({"examples": rows if n == 1 else []}), task)
    spec = SynthesisSpec(examples_per_call=len(rows), samples_per_round=len(rows))
    return asyncio.run(synthesize(train, held_out, SynthRequest(samples=len(rows)), spec, provider, round=1,
                                  seed=7, system_prompt=""))


# ------------------------------------------------------------------------------------------- invoices


def _invoice(answer: str) -> Invoice:
    d = json.loads(answer)
    due = dt.date.fromisoformat(d["due_date"]) if d["due_date"] else None
    return Invoice(vendor=d["vendor"], invoice_number=d["invoice_number"], date=dt.date.fromisoformat(d["date"]),
                   due_date=due, total=float(d["total"]), currency=d["currency"])


def _rerendered_test_invoices() -> list[dict[str, str]]:
    """Each test invoice written in another template family, answered by the teacher (the oracle)."""
    rng = random.Random(5)
    rows = []
    for e in TEST:
        found = match_family(e.instruction)
        assert found is not None
        family = rng.choice(sorted(f for f in FAMILIES if f != found[0]))
        text = render(_invoice(e.response), rng, family)
        rows.append({"instruction": text, "response": oracle.answer(text)})
    return rows


def _reformatted(answer: str, i: int) -> str:
    """The same answer as another writer would format it: key order, spacing, case, numbers as strings."""
    d = json.loads(answer)
    if i % 3 == 0:
        return json.dumps(dict(reversed(list(d.items()))), indent=2)
    if i % 3 == 1:
        return "```json\n" + json.dumps({**d, "vendor": d["vendor"].upper(), "total": f"{d['total']:.2f}"}) + "\n```"
    return answer


def test_rerendered_test_invoices_with_identical_answers_are_removed() -> None:
    rerendered = _rerendered_test_invoices()
    assert [r["response"] for r in rerendered] == [e.response for e in TEST]  # the teacher's answers ARE the refs
    instruction_only = Decontaminator([e.instruction for e in TEST], n=8, threshold=0.5)
    overlaps = [instruction_only.overlap(r["instruction"]) for r in rerendered]
    assert max(overlaps) < 0.5, "the re-rendered instructions pass an instruction-only n-gram check"
    planted = [{**r, "response": _reformatted(r["response"], i)} for i, r in enumerate(rerendered)]
    known = {e.instruction for e in TRAIN + TEST}
    controls = [{"instruction": t, "response": oracle.answer(t)} for t in oracle.propose([], 60, seed=31)
                if t not in known]
    result = _synthesize(planted + controls, TRAIN, TEST)
    kept = {e.instruction for e in result.examples}
    missed = [r["instruction"] for r in planted if r["instruction"] in kept]
    lost = [c["instruction"] for c in controls if c["instruction"] not in kept]
    print(f"\ninvoices: {len(planted) - len(missed)}/{len(planted)} re-rendered test items removed (instruction "
          f"overlap at most {max(overlaps):.2f}); {len(controls) - len(lost)}/{len(controls)} new invoices kept; "
          f"removed {result.removed}")
    assert not missed and not lost, (missed, lost)
    assert result.removed == {"contaminated_response": len(planted)}


def test_canonical_answers_ignore_formatting() -> None:
    answer = TEST[0].response
    forms = {canonical_answer(_reformatted(answer, i))[0] for i in range(3)}
    assert len(forms) == 1
    assert canonical_answer('{"a": 1.5, "b": " X  Y"}')[0] == canonical_answer('{"b":"x y","a":"1.50"}')[0]
    assert canonical_answer('{"a": 1.5}')[0] != canonical_answer('{"a": 1.6}')[0]
    assert canonical_answer("  Billing ")[0] == canonical_answer("billing")[0] == "billing"
    assert canonical_answer(answer)[1] >= 8  # vendor, number, dates, total, currency: values only, no keys
    assert canonical_answer('{"category": "billing"}')[1] == 1


def test_recurring_or_short_answers_are_no_evidence() -> None:
    def row(i: str, response: str) -> Example:
        return Example(id=i, instruction=f"question {i}", response=response)

    held_out = [row("h1", "billing"), row("h2", "billing"), row("h3", "42"),
                row("h4", "The parcel is held at the Leeds depot until Friday."),
                row("h5", "Reset the router, then hold the power button for ten seconds."),
                row("h6", '{"team": "billing", "priority": "high"}')]
    train = [row("t1", "Reset the router, then hold the power button for ten seconds."),
             row("t2", '{"priority": "high", "team": "billing"}')]
    index = AnswerIndex(held_out, [*train, *held_out], min_tokens=4)
    # a label shared by many rows, a one-off number, an answer a train row has too: no evidence
    assert index.distinctive == {canonical_answer(held_out[3].response)[0]}
    assert index.matches("the parcel is held at the leeds depot until friday.")
    assert not index.matches("billing") and not index.matches('{"team":"billing","priority":"high"}')


# -------------------------------------------------------------------------------- a templated task

PROMPT = (
    "You are the first-line support assistant of an online electronics shop. Read the customer message below "
    "and answer with exactly one word, the team that must handle it: billing, shipping, returns or technical."
    "\nCustomer message: "
)
OTHER_PROMPT = "Route this support ticket to billing, shipping, returns or technical:\n"
FRAMES = {
    "billing": [
        "I was charged {amount} twice for order {num} on {day}, please reverse one of the payments.",
        "the invoice for my {product} says {amount} but the shop page listed {amount2}.",
        "my {card} card was declined for order {num} although {name} at my bank says it is fine.",
    ],
    "shipping": [
        "order {num} with the {product} was meant to reach {city} by {day} and the tracking has not moved.",
        "the courier left my {product} at the wrong address in {city}, order {num}.",
        "can you send order {num} to my office in {city} instead? {name} will sign for it.",
    ],
    "returns": [
        "I want to send back the {product} from order {num}, it arrived on {day} and I do not need it.",
        "the {product} I returned in {city} on {day} has not been refunded yet, order {num}.",
        "the {product} came in {color} instead of {color2}, how do I exchange it? Order {num}.",
    ],
    "technical": [
        "my {product} restarts every {minutes} minutes since the update on {day}.",
        "the app cannot pair with my {product}, it shows error {code} right after {name} installed it.",
        "after {minutes} minutes of use the {product} gets hot and the screen turns {color}.",
    ],
}
OPENERS = ["Hi,", "Hello team,", "Good morning,", "Dear support,", "Hey there,", "Hi there,", "Hello,"]
CLOSERS = ["Thanks, {name}", "Best regards, {name}", "Cheers", "Thank you!", "Kind regards, {name} from {city}",
           "{name}", "Thanks in advance."]
WORDS = {
    "name": ["Maria", "Jonas", "Aiko", "Pedro", "Fatima", "Liam", "Chen", "Olga", "Kwame", "Sofia", "Ravi",
             "Emma", "Tomasz", "Leila", "Noah", "Ines"],
    "product": ["wireless headphones", "laptop stand", "USB-C charger", "smart watch", "gaming mouse",
                "4K monitor", "mechanical keyboard", "tablet", "bluetooth speaker", "webcam", "e-reader",
                "power bank", "router", "drone", "action camera", "robot vacuum", "fitness tracker"],
    "city": ["Lisbon", "Oslo", "Leeds", "Lyon", "Graz", "Porto", "Gdansk", "Turin", "Cork", "Bern", "Malmo", "Ghent"],
    "day": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"],
    "color": ["black", "white", "red", "blue", "green", "silver", "pink"],
    "card": ["Visa", "Mastercard", "Amex", "debit"],
}


def _message(rng: random.Random, team: str) -> str:
    slots = {key: rng.choice(values) for key, values in WORDS.items()}
    slots |= {"amount": f"{rng.randint(5, 900)}.{rng.randint(0, 99):02d} EUR", "amount2": f"{rng.randint(5, 900)} EUR",
              "num": str(rng.randint(10000, 99999)), "color2": rng.choice(WORDS["color"]),
              "minutes": str(rng.randint(2, 90)), "code": f"E{rng.randint(100, 999)}"}
    body = rng.choice(FRAMES[team]).format(**slots)
    return f"{rng.choice(OPENERS)} {body} {rng.choice(CLOSERS).format(**slots)}"


def _triage(seed: int, count: int, prefix: str) -> list[Example]:
    rng, teams = random.Random(seed), sorted(FRAMES)
    return [Example(id=f"{prefix}{i}", instruction=PROMPT + _message(rng, teams[i % 4]), response=teams[i % 4])
            for i in range(count)]


TRIAGE_TASK = TaskSpec(name="triage", oracle="llamaduo.tasks.triage:oracle")
TRIAGE_TRAIN, TRIAGE_HELD_OUT = _triage(1, 80, "t"), _triage(2, 40, "h")


def _rerendered_tickets() -> list[dict[str, str]]:
    """Each held-out ticket under the same prompt with another greeting and a sign-off, and under another prompt."""
    rows = []
    for e in TRIAGE_HELD_OUT:
        message = e.instruction.removeprefix(PROMPT)
        opener = next(o for o in sorted(OPENERS, key=len, reverse=True) if message.startswith(o))
        rows.append({"instruction": f"{PROMPT}Good evening,{message.removeprefix(opener)} Sent from my phone.",
                     "response": e.response})
        rows.append({"instruction": OTHER_PROMPT + message, "response": e.response})
    return rows


def test_fixed_prompt_is_common_and_the_message_varies() -> None:
    instructions = [e.instruction for e in TRIAGE_TRAIN + TRIAGE_HELD_OUT]
    common = common_ngrams(instructions, 8, 0.5)
    prompt = tokenize(PROMPT)
    assert len(prompt) >= 20 and {tuple(prompt[i : i + 8]) for i in range(len(prompt) - 7)} == common
    runs = varying_runs(tokenize(instructions[0]), common, 8)
    assert runs == [tokenize(instructions[0].removeprefix(PROMPT))]
    assert common_ngrams(instructions[:9], 8, 0.5) == frozenset()  # too few rows to tell what is fixed


def test_templated_task_keeps_new_rows_and_removes_rerendered_held_out_items() -> None:
    known = {e.instruction for e in TRIAGE_TRAIN + TRIAGE_HELD_OUT}
    new = [{"instruction": e.instruction, "response": e.response} for e in _triage(3, 200, "n")
           if e.instruction not in known]
    rerendered = _rerendered_tickets()
    old_check = Decontaminator([e.instruction for e in TRIAGE_HELD_OUT], n=8, threshold=0.5)
    old_kept = sum(not old_check.is_contaminated(r["instruction"]) for r in new) / len(new)
    result = _synthesize(new + rerendered, TRIAGE_TRAIN, TRIAGE_HELD_OUT, TRIAGE_TASK)
    kept = {e.instruction for e in result.examples}
    kept_share = sum(r["instruction"] in kept for r in new) / len(new)
    missed = [r["instruction"] for r in rerendered if r["instruction"] in kept]
    print(f"\ntemplated task ({len(tokenize(PROMPT))}-word fixed prompt): {kept_share:.1%} of {len(new)} new rows "
          f"kept (whole-text n-grams would keep {old_kept:.1%}); {len(rerendered) - len(missed)}/{len(rerendered)} "
          f"re-rendered held-out items removed; removed {result.removed}")
    assert kept_share >= 0.9
    assert not missed, missed
    assert result.removed.get("contaminated", 0) >= len(rerendered)
    assert "contaminated_response" not in result.removed  # one-word labels shared by many rows are no evidence
