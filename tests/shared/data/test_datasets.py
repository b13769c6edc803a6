import json

import pytest

from llamaduo.contracts.spec import DatasetSpec
from llamaduo.data.datasets import DatasetError, load_splits
from llamaduo.tasks.triage import make_dataset


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_split_column_and_train_size(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", make_dataset(n_train=50, n_test=10))
    splits = load_splits(DatasetSpec(source=str(p), train_size=8))
    assert len(splits.train) == 45 and len(splits.test) == 10 and len(splits.coverage) == 8  # 5 rows: holdout
    assert {e.id for e in splits.coverage} <= {e.id for e in splits.train}
    assert not {e.instruction for e in splits.train} & {e.instruction for e in splits.test}


def test_seeded_split_without_split_column_is_deterministic(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "split"} for r in make_dataset(n_train=40, n_test=0)]
    p = write_jsonl(tmp_path / "d.jsonl", rows)
    a = load_splits(DatasetSpec(source=str(p), split_column=None, test_fraction=0.25, seed=3))
    b = load_splits(DatasetSpec(source=str(p), split_column=None, test_fraction=0.25, seed=3))
    assert [e.id for e in a.test] == [e.id for e in b.test] and len(a.test) == 10


def test_bad_rows_are_named(tmp_path):
    rows = make_dataset(n_train=5, n_test=2)
    rows[1] = {"instruction": "", "response": "x"}
    rows[3] = {"instruction": "hi"}
    p = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DatasetError) as err:
        load_splits(DatasetSpec(source=str(p)))
    msg = str(err.value)
    assert "2 bad rows" in msg and "row 2: empty instruction" in msg and "row 4: missing column 'response'" in msg


def test_csv_and_messages_columns(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("q,a,split\nhello,world,train\nfoo,bar,test\n")
    s = load_splits(DatasetSpec(source=str(p), instruction_column="q", response_column="a"))
    assert s.train[0].response == "world" and s.test[0].instruction == "foo"
    m = write_jsonl(tmp_path / "m.jsonl", [
        {"messages": [{"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"}], "split": "train"},
        {"messages": [{"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"}], "split": "test"},
    ])
    s = load_splits(DatasetSpec(source=str(m), messages_column="messages"))
    assert (s.train[0].instruction, s.test[0].response) == ("u1", "a2")


def test_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="file not found"):
        load_splits(DatasetSpec(source=str(tmp_path / "nope.jsonl")))


def ids(examples):
    return {e.id for e in examples}


def test_holdout_comes_from_train_rows_beyond_coverage_and_is_disjoint(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", make_dataset(n_train=50, n_test=10))
    a = load_splits(DatasetSpec(source=str(p), train_size=8, holdout_size=12, seed=4))
    b = load_splits(DatasetSpec(source=str(p), train_size=8, holdout_size=12, seed=4))
    assert [e.id for e in a.holdout] == [e.id for e in b.holdout] and len(a.holdout) == 12
    assert len(a.coverage) == 8 and len(a.train) == 38 and len(a.test) == 10
    assert not ids(a.holdout) & (ids(a.train) | ids(a.coverage) | ids(a.test))
    # coverage is what it was without a holdout: the holdout only takes rows beyond it
    without = load_splits(DatasetSpec(source=str(p), train_size=8, holdout_size=0, seed=4))
    assert ids(a.coverage) == ids(without.coverage)
    default = load_splits(DatasetSpec(source=str(p), train_size=8))
    assert len(default.holdout) == 5  # holdout_fraction 0.1 of the train split


def test_holdout_size_zero_and_no_default_holdout_when_coverage_is_all_of_train(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", make_dataset(n_train=20, n_test=4))
    assert load_splits(DatasetSpec(source=str(p), train_size=8, holdout_size=0)).holdout == []
    whole = load_splits(DatasetSpec(source=str(p)))
    assert whole.holdout == [] and len(whole.coverage) == 20
    explicit = load_splits(DatasetSpec(source=str(p), holdout_size=5))
    assert len(explicit.holdout) == 5 and len(explicit.coverage) == len(explicit.train) == 15
    assert not ids(explicit.holdout) & ids(explicit.coverage)


def test_too_large_a_holdout_names_the_field(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", make_dataset(n_train=10, n_test=4))
    with pytest.raises(DatasetError, match=r"dataset\.holdout_size 5"):
        load_splits(DatasetSpec(source=str(p), train_size=6, holdout_size=5))
    with pytest.raises(DatasetError, match=r"dataset\.holdout_size 10"):
        load_splits(DatasetSpec(source=str(p), holdout_size=10))


def test_split_column_accepts_eval_and_holdout(tmp_path):
    rows = make_dataset(n_train=12, n_test=6)
    tests = [r for r in rows if r["split"] == "test"]
    for r in tests[:3]:
        r["split"] = "eval"
    for r in tests[3:]:
        r["split"] = "holdout"
    p = write_jsonl(tmp_path / "d.jsonl", rows)
    s = load_splits(DatasetSpec(source=str(p)))
    assert len(s.test) == 3 and len(s.holdout) == 3 and len(s.train) == 12
    assert {e.instruction for e in s.holdout} == {r["instruction"] for r in tests[3:]}
    capped = load_splits(DatasetSpec(source=str(p), holdout_size=2))
    assert len(capped.holdout) == 2
    bad = write_jsonl(tmp_path / "b.jsonl", [{**rows[0], "split": "dev"}])
    with pytest.raises(DatasetError, match="'holdout'"):
        load_splits(DatasetSpec(source=str(bad)))
