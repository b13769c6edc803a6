"""The invoice-extraction demo task: generator, parser oracle, score and the shipped dataset file."""

from __future__ import annotations

import json
import random
from pathlib import Path

from llamaduo.data.examples import Example
from llamaduo.tasks import invoice
from llamaduo.tasks.invoice import (
    DATA_PATH,
    FIELDS,
    dataset_jsonl,
    make_dataset,
    make_item,
    make_item_like,
    match_family,
    oracle,
    render,
    style_of,
)
from llamaduo.tasks.oracle import ScoringOracle, load_oracle


def _examples(texts: list[str]) -> list[Example]:
    return [Example(id=f"s{i}", instruction=t, response=oracle.answer(t)) for i, t in enumerate(texts)]


def test_oracle_loads_by_reference() -> None:
    loaded = load_oracle("llamaduo.tasks.invoice:oracle")
    assert isinstance(loaded, ScoringOracle) and loaded.name == "invoice-extraction"


def test_dataset_shape_and_splits() -> None:
    rows = make_dataset()
    train = [r for r in rows if r["split"] == "train"]
    test = [r for r in rows if r["split"] == "test"]
    assert len(train) == 300 and len(test) == 50
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in test}
    assert len({r["id"] for r in rows}) == len(rows)
    assert max(len(r["instruction"]) for r in rows) < 300
    families = {match_family(r["instruction"])[0] for r in test}  # type: ignore[index]
    assert families == set(invoice.FAMILIES)
    for row in rows:
        answer = json.loads(row["response"])
        assert list(answer) == list(FIELDS)


def test_answer_parses_every_dataset_row() -> None:
    """The oracle recovers the generator's truth from the text alone, for every row."""
    for row in make_dataset():
        assert oracle.answer(row["instruction"]) == row["response"], row["instruction"]


def test_answer_parses_fresh_items() -> None:
    rng = random.Random(11)
    for _ in range(500):
        text, truth = make_item(rng)
        assert oracle.answer(text) == truth.to_json(), text


def test_answer_outside_the_templates() -> None:
    text = (
        "Hello team, we received a bill from Bluepeak Energy GmbH (invoice #A12345) dated 3 May 2024 "
        "over EUR 1.512,00, due 2024-06-02.\nExtract the invoice data as JSON."
    )
    assert json.loads(oracle.answer(text)) == {
        "vendor": "Bluepeak Energy GmbH",
        "invoice_number": "A12345",
        "date": "2024-05-03",
        "due_date": "2024-06-02",
        "total": 1512.0,
        "currency": "EUR",
    }


def test_dataset_is_deterministic_and_file_is_fresh() -> None:
    assert make_dataset() == make_dataset()
    assert make_dataset(seed=1) != make_dataset(seed=2)
    assert DATA_PATH.read_text(encoding="utf-8") == dataset_jsonl(make_dataset()), (
        "shared/tasks/data/invoice.jsonl is stale: run python -m llamaduo.tasks.invoice"
    )


def test_main_writes_dataset(tmp_path: Path) -> None:
    out = tmp_path / "inv.jsonl"
    invoice.main(["--out", str(out), "--train", "5", "--test", "2", "--seed", "3"])
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 7 and json.loads(lines[0])["split"] == "test"


def test_propose_is_deterministic_and_follows_seeds() -> None:
    seeds_rows = [r for r in make_dataset() if r["split"] == "train"]
    header_eur = [
        r["instruction"]
        for r in seeds_rows
        if match_family(r["instruction"])[0] == "header" and json.loads(r["response"])["currency"] == "EUR"  # type: ignore[index]
    ][:3]
    seeds = _examples(header_eur)
    first = oracle.propose(seeds, 20, seed=5)
    assert first == oracle.propose(seeds, 20, seed=5)
    assert first != oracle.propose(seeds, 20, seed=6)
    for text in first:
        found = match_family(text)
        assert found is not None and found[0] == "header"
        assert json.loads(oracle.answer(text))["currency"] == "EUR"
    anything = oracle.propose([], 60, seed=1)
    assert len({match_family(t)[0] for t in anything}) > 3  # type: ignore[index]


def test_every_style_of_the_dataset_is_recognised_and_written_back() -> None:
    rng = random.Random(4)
    styles = [style_of(r["instruction"]) for r in make_dataset()]
    assert None not in styles and len(set(styles)) > 150
    for style in styles:
        text, truth = make_item_like(rng, style)  # type: ignore[arg-type]
        found = style_of(text)  # may differ where two styles write the same text ("4 May 2023": long or short)
        assert found is not None and render(truth, rng, style=found) == text
        assert found.family == style.family and found.with_due == style.with_due  # type: ignore[union-attr]
        assert json.loads(oracle.answer(text)) == truth.to_dict()
    assert style_of("Please pay Acme Ltd 12 EUR.\nExtract the invoice data as JSON.") is None  # no template


def test_proposals_copy_each_seeds_form_in_turn_with_new_values() -> None:
    seeds = _examples([r["instruction"] for r in make_dataset() if r["split"] == "train"][:3])
    proposed = oracle.propose(seeds, 7, seed=2)
    assert [style_of(t) for t in proposed] == [style_of(seeds[i % 3].instruction) for i in range(7)]
    def values(answers: list[str]) -> set[tuple[str, float]]:
        return {(a["invoice_number"], a["total"]) for a in map(json.loads, answers)}

    new = values([oracle.answer(t) for t in proposed])
    assert len(new) == 7 and not new & values([s.response for s in seeds])
    outside = _examples(["Please pay Acme Ltd 12 EUR.\nExtract the invoice data as JSON."])
    assert oracle.propose(outside, 5, seed=9) == oracle.propose([], 5, seed=9)  # an unusable seed adds nothing


def test_score_orders_answers() -> None:
    row = make_dataset(n_train=1, n_test=1)[0]
    ref = json.loads(row["response"])
    perfect = oracle.score(row["instruction"], row["response"], row["response"])
    one_wrong = oracle.score(row["instruction"], row["response"], json.dumps({**ref, "vendor": "Nobody Ltd"}))
    three_wrong = oracle.score(
        row["instruction"],
        row["response"],
        json.dumps({**ref, "vendor": "Nobody Ltd", "date": "1999-01-01", "total": -1}),
    )
    extra = oracle.score(row["instruction"], row["response"], json.dumps({**ref, "notes": "x"}))
    garbage = oracle.score(row["instruction"], row["response"], "I could not find an invoice.")
    assert perfect == (100, 100)
    assert perfect > one_wrong > three_wrong > garbage == (1, 1)
    assert extra[0] == 100 and extra[1] < 100
