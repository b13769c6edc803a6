"""Write ``tickets.jsonl``, the sample dataset the example specs point at (deterministic: run it again, get
the same file).

The task: read a customer-support ticket and answer with its queue and priority as compact JSON, e.g.
``{"queue": "billing", "priority": "high"}``. Each row has the two columns the specs name:
``instruction`` (the ticket) and ``response`` (the answer the service LLM gives today). Replace the file with
rows of your own task (a few hundred are better than these 80), keeping those two columns or renaming them
in the spec (``dataset.instruction_column`` / ``response_column``).

    python examples/data/make_tickets.py            # rewrites examples/data/tickets.jsonl
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ROWS = 80
SEED = 2024

#: queue -> ticket openings (``{item}`` is filled in) and the things customers write about.
QUEUES = {
    "billing": (["I was charged twice for {item}.", "My invoice for {item} shows the wrong amount.",
                 "Please refund {item}, I cancelled it last week.", "Why did the price of {item} go up?"],
                ["my March subscription", "order 4471", "the annual plan", "the premium add-on", "two seats"]),
    "shipping": (["{item} has not arrived yet.", "The tracking page for {item} has not moved in days.",
                  "{item} arrived damaged.", "Can I change the delivery address for {item}?"],
                 ["My parcel", "Order 8812", "The replacement charger", "My second package", "The gift box"]),
    "technical": (["{item} crashes when I open it.", "I get an error 500 from {item}.",
                   "{item} stopped syncing after the update.", "{item} is very slow since yesterday."],
                  ["The mobile app", "The export page", "The desktop client", "The API", "The dashboard"]),
    "account": (["I cannot log in to {item}.", "Please delete {item} and all my data.",
                 "How do I change the email address of {item}?", "I lost access to the 2FA device for {item}."],
                ["my account", "our team workspace", "my old profile", "the admin account", "my login"]),
}
#: how urgent the customer sounds -> the priority the answer carries.
URGENCY = {
    "high": ["This is urgent, our whole team is blocked.", "I need this fixed today.",
             "Nothing works and we have a deadline tomorrow."],
    "normal": ["Thanks for looking into it.", "Could you check when you have a moment?", "Kind regards."],
}
NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Farah", "Gus", "Hana", "Ivo", "Jun", "Kemal", "Lea"]


def make_rows(n: int = ROWS, seed: int = SEED) -> list[dict[str, str]]:
    """``n`` distinct tickets with their answers, the same ones for the same ``seed``."""
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        queue = sorted(QUEUES)[len(rows) % len(QUEUES)]
        openings, items = QUEUES[queue]
        priority = rng.choice(sorted(URGENCY))
        ticket = (f"{rng.choice(openings).format(item=rng.choice(items))} {rng.choice(URGENCY[priority])} "
                  f"-- {rng.choice(NAMES)}")
        if ticket in seen:
            continue
        seen.add(ticket)
        rows.append({"instruction": ticket,
                     "response": json.dumps({"queue": queue, "priority": priority}, separators=(",", ":"))})
    return rows


if __name__ == "__main__":
    out = Path(__file__).with_name("tickets.jsonl")
    out.write_text("".join(json.dumps(row) + "\n" for row in make_rows()))
    print(f"wrote {ROWS} rows to {out}")
