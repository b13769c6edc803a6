"""The invoice task as LlamaDuo runs it: its oracle, its coverage dataset and the script that writes
``shared/tasks/data/invoice.jsonl``."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from llamaduo.data.examples import Example, example_id
from llamaduo.data.scoring import score_answer
from llamaduo.tasks.invoice.generation import make_item, make_item_like
from llamaduo.tasks.invoice.parsing import extract, style_of

DEFAULT_SEED = 2408
DATA_PATH = Path(__file__).parent.parent / "data" / "invoice.jsonl"
DESCRIPTION = "Invoice field extraction: the demo task a business would run on a service LLM today."


class InvoiceOracle:
    """Deterministic oracle for invoice extraction (see :class:`llamaduo.tasks.oracle.ScoringOracle`)."""

    name = "invoice-extraction"

    def propose(self, seeds: list[Example], n: int, seed: int) -> list[str]:
        """``n`` new invoice instructions, each written like one of the seeds (taken in turn): the seed's
        template family, currency, date and amount formats and ask, with new vendor, number, dates and total,
        as a service LLM shown examples copies their form and varies their content.

        Seeds outside the known templates add nothing; with no usable seed every family, currency and format
        may appear. Deterministic for a given ``seed`` (and seeds).
        """
        rng = random.Random(seed)
        styles = [found for found in (style_of(e.instruction) for e in seeds) if found is not None]
        if not styles:
            return [make_item(rng)[0] for _ in range(n)]
        return [make_item_like(rng, styles[i % len(styles)])[0] for i in range(n)]

    def answer(self, instruction: str) -> str:
        """The correct JSON answer, by parsing the instruction's text."""
        return json.dumps(extract(instruction), ensure_ascii=False)

    def score(self, instruction: str, reference: str, candidate: str) -> tuple[float, float]:
        """Field-level ``(similarity, precision)`` in 1..100 (see :func:`llamaduo.data.scoring.score_answer`)."""
        return score_answer(reference, candidate)


oracle = InvoiceOracle()


def make_dataset(n_train: int = 300, n_test: int = 50, seed: int = DEFAULT_SEED) -> list[dict[str, str]]:
    """Coverage rows ``{id, instruction, response, split}``; no instruction is in both splits."""
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    for split, n in (("test", n_test), ("train", n_train)):
        count = 0
        while count < n:
            text, invoice = make_item(rng)
            if text in seen:
                continue
            seen.add(text)
            rows.append(
                {
                    "id": example_id(text, "inv"),
                    "instruction": text,
                    "response": invoice.to_json(),
                    "split": split,
                }
            )
            count += 1
    return rows


def dataset_jsonl(rows: list[dict[str, str]]) -> str:
    """The JSON-lines text of ``rows`` exactly as written to :data:`DATA_PATH`."""
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def main(argv: list[str] | None = None) -> None:
    """Write the coverage dataset (default: ``shared/tasks/data/invoice.jsonl``, fixed seed)."""
    parser = argparse.ArgumentParser(prog="python -m llamaduo.tasks.invoice", description=DESCRIPTION)
    parser.add_argument("--out", type=Path, default=DATA_PATH)
    parser.add_argument("--train", type=int, default=300)
    parser.add_argument("--test", type=int, default=50)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args(argv)
    rows = make_dataset(args.train, args.test, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(dataset_jsonl(rows), encoding="utf-8")
    print(f"wrote {len(rows)} rows to {args.out}")
