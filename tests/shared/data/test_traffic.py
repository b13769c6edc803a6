"""Coverage datasets from a gateway route's captured traffic, read from a real S3 server (rclone)."""

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from llamaduo.contracts.spec import DatasetSpec, TrafficSourceSpec
from llamaduo.data.datasets import DatasetError, load_splits
from llamaduo.data.traffic import traffic_rows
from llamaduo.storage.keys import traffic_key, traffic_key_time
from llamaduo.storage.store import StoreError

NOW = datetime(2025, 3, 10, 12, 0, 0, tzinfo=UTC)


def _row(i: int, at: datetime, *, by: str = "upstream", question: str | None = None, answer: str | None = None):
    question = question or f"What is the status of order {i}?"
    return {"request_id": f"r-{i}-{uuid.uuid4().hex[:6]}", "at": at.isoformat(),
            "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
                         {"role": "assistant", "content": "hi"}, {"role": "user", "content": question}],
            "response": answer or f"Order {i} has shipped.", "answered_by": by,
            "local_version": "m-old" if by == "local" else None}


@pytest.fixture
def route() -> str:
    return "invoice-" + uuid.uuid4().hex[:8]


def _write(store, route, start: datetime, rows) -> str:
    key = traffic_key(route, start, uuid.uuid4().hex[:8])
    store.put_jsonl(key, rows)
    return key


def test_traffic_keys_stay_under_the_route_and_name_their_time(route):
    key = traffic_key(route, datetime(2025, 3, 10, 9, 8, 7, tzinfo=UTC), "b1")
    assert key == f"traffic/{route}/2025-03-10/090807-b1.jsonl"
    assert traffic_key_time(key) == datetime(2025, 3, 10, 9, 8, 7, tzinfo=UTC)
    for bad in ("../x", "a/b", ".."):
        with pytest.raises(StoreError, match="route name"):
            traffic_key(bad, NOW, "b1")
    with pytest.raises(StoreError, match="batch id"):
        traffic_key(route, NOW, "../b")


def test_listing_spans_the_window_across_days(store, route):
    old = _write(store, route, NOW - timedelta(days=3), [_row(0, NOW - timedelta(days=3))])
    yesterday = _write(store, route, NOW - timedelta(hours=20), [_row(1, NOW - timedelta(hours=20))])
    today = _write(store, route, NOW - timedelta(minutes=5), [_row(2, NOW - timedelta(minutes=5))])
    _write(store, "other-" + route, NOW - timedelta(minutes=5), [_row(3, NOW)])
    assert store.list_traffic(route, NOW - timedelta(hours=24), NOW) == [yesterday, today]
    assert store.list_traffic(route, NOW - timedelta(days=4), NOW) == [old, yesterday, today]


def test_only_upstream_answers_in_the_window_become_rows(store, route):
    _write(store, route, NOW - timedelta(hours=2), [
        _row(1, NOW - timedelta(hours=2)),
        _row(2, NOW - timedelta(hours=2), by="local"),  # a local model's answer is not a reference
        _row(3, NOW - timedelta(hours=30)),  # outside a 24 h window
    ])
    rows = traffic_rows(store, route, TrafficSourceSpec(since_hours=24), now=NOW)
    assert [r["instruction"] for r in rows] == ["What is the status of order 1?"]  # the user's last message
    assert rows[0]["response"] == "Order 1 has shipped."


def test_exact_duplicates_keep_the_newest_answer(store, route):
    _write(store, route, NOW - timedelta(hours=3), [
        _row(1, NOW - timedelta(hours=3), question="Refund  policy?", answer="old answer"),
        _row(2, NOW - timedelta(hours=1), question="refund policy?", answer="new answer"),
        _row(3, NOW - timedelta(hours=2), question="Other question"),
    ])
    rows = traffic_rows(store, route, TrafficSourceSpec(), now=NOW)
    assert len(rows) == 2
    assert {r["response"] for r in rows} == {"new answer", "Order 3 has shipped."}


def test_sample_and_cap_are_deterministic_by_seed(store, route):
    _write(store, route, NOW - timedelta(hours=1), [_row(i, NOW - timedelta(minutes=i % 50)) for i in range(400)])
    half = TrafficSourceSpec(sample_fraction=0.5, seed=3)
    first = traffic_rows(store, route, half, now=NOW)
    assert first == traffic_rows(store, route, half, now=NOW)
    assert 160 <= len(first) <= 240  # 400 x 0.5, sd 10: four sd either side
    other = traffic_rows(store, route, TrafficSourceSpec(sample_fraction=0.5, seed=4), now=NOW)
    assert other != first
    capped = traffic_rows(store, route, TrafficSourceSpec(sample_fraction=0.5, seed=3, max_rows=50), now=NOW)
    assert len(capped) == 50 and {r["id"] for r in capped} <= {r["id"] for r in first}


def test_load_splits_reads_traffic_and_splits_it(store, route):
    _write(store, route, NOW - timedelta(hours=1), [_row(i, NOW - timedelta(minutes=1)) for i in range(50)])
    spec = DatasetSpec(source=f"traffic:{route}", test_fraction=0.2, holdout_fraction=0, seed=1)
    splits = load_splits(spec, traffic_store=store, now=NOW)
    assert len(splits.test) == 10 and len(splits.train) == 40
    assert load_splits(spec, traffic_store=store, now=NOW) == splits


def test_a_route_without_upstream_answers_names_the_fix(store, route):
    _write(store, route, NOW - timedelta(hours=1), [_row(1, NOW, by="local")])
    spec = DatasetSpec(source=f"traffic:{route}", traffic=TrafficSourceSpec(since_hours=2))
    with pytest.raises(DatasetError, match=r"traffic:.*since_hours"):
        load_splits(spec, traffic_store=store, now=NOW)
    with pytest.raises(DatasetError, match="no artifact store"):
        load_splits(spec, now=NOW)


def test_the_cli_leaves_a_traffic_source_where_it_is(store):
    from llamaduo.bus.client import upload_dataset
    from llamaduo.contracts.spec import parse_spec

    spec = parse_spec({"task": {"name": "t", "oracle": "llamaduo.tasks.triage:oracle"},
                       "dataset": {"source": "traffic:invoice"}, "student": {"base_model": "tiny:llama"}})
    assert upload_dataset(store, "m-1", spec) == spec
