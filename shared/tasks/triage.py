"""Support-ticket triage: a small task with an exact answer, sized for tiny students in tests.

Each ticket mentions one product area; the answer is that area's queue name. A student trained only on
tickets of two queues cannot route the others, so synthetic data that covers every queue visibly helps.
"""

from __future__ import annotations

import random
import re

from llamaduo.data.examples import Example, example_id

QUEUES: dict[str, list[str]] = {
    "billing": ["invoice", "refund", "charge", "payment"],
    "shipping": ["parcel", "delivery", "courier", "tracking"],
    "account": ["password", "login", "username", "profile"],
    "technical": ["crash", "error", "bug", "freeze"],
}
_OPENERS = ["Hi,", "Hello,", "Dear team,", "Urgent:", "Hey,"]
_MIDDLES = [
    "there is a problem with my {kw}",
    "I need help with the {kw}",
    "something is wrong with the {kw}",
    "please check my {kw}",
]
_CLOSERS = ["thanks", "regards", "asap please", "cheers"]
_PREFIX = "Route this ticket: "
_KEYWORD_TO_QUEUE = {kw: q for q, kws in QUEUES.items() for kw in kws}


def make_ticket(rng: random.Random, queue: str) -> str:
    kw = rng.choice(QUEUES[queue])
    body = f"{rng.choice(_OPENERS)} {rng.choice(_MIDDLES).format(kw=kw)}, {rng.choice(_CLOSERS)}"
    return _PREFIX + body


class TriageOracle:
    """Deterministic oracle for the triage task (see :class:`llamaduo.tasks.oracle.TaskOracle`)."""

    name = "ticket-triage"

    def propose(self, seeds: list[Example], n: int, seed: int) -> list[str]:
        rng = random.Random(seed)
        queues = sorted(QUEUES)
        return [make_ticket(rng, queues[i % len(queues)]) for i in range(n)]

    def answer(self, instruction: str) -> str:
        for word in re.findall(r"[a-z]+", instruction.lower()):
            if word in _KEYWORD_TO_QUEUE:
                return _KEYWORD_TO_QUEUE[word]
        return "other"

    def score(self, instruction: str, reference: str, candidate: str) -> tuple[float, float]:
        ok = candidate.strip().lower() == reference.strip().lower()
        return (100.0, 100.0) if ok else (1.0, 1.0)


oracle = TriageOracle()


def make_dataset(
    n_train: int = 200, n_test: int = 40, seed: int = 7, train_queues: list[str] | None = None
) -> list[dict[str, str]]:
    """Coverage rows with a ``split`` column. ``train_queues`` limits the train split to some queues."""
    rng = random.Random(seed)
    queues = sorted(QUEUES)
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    for split, n, allowed in (("test", n_test, queues), ("train", n_train, train_queues or queues)):
        count = 0
        while count < n:
            text = make_ticket(rng, allowed[count % len(allowed)])
            if text in seen:
                continue
            seen.add(text)
            rows.append({"id": example_id(text, "t"), "instruction": text, "response": oracle.answer(text),
                         "split": split})
            count += 1
    return rows
