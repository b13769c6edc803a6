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
    assert len(splits.train) == 50 and len(splits.test) == 10 and len(splits.coverage) == 8
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
