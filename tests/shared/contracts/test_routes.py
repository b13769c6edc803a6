"""Route state: promotion, rollback with a bounded history, and the sticky canary split."""

from datetime import UTC, datetime

import pytest

from llamaduo.contracts.routes import HISTORY_LIMIT, RouteState, assign, promote, rollback


def test_a_route_never_promoted_is_answered_upstream():
    assert assign(RouteState(), "user-1") == "upstream"


def test_modes_off_shadow_full():
    assert assign(promote(None, "m-1", "shadow"), "u") == "upstream"  # shadow: only compared
    full = promote(None, "m-1", "full")
    assert full.percent == 100 and all(assign(full, f"u{i}") == "local" for i in range(100))
    assert assign(promote(full, "m-1", "off"), "u") == "upstream"


def test_canary_is_sticky_per_key():
    state = promote(None, "m-1", "canary", 30)
    sides = {f"user-{i}": assign(state, f"user-{i}") for i in range(500)}
    for _ in range(3):
        assert {k: assign(state, k) for k in sides} == sides
    # a state read back from the KV entry decides the same way (no process-local salt)
    again = RouteState.from_bytes(state.to_bytes())
    assert {k: assign(again, k) for k in sides} == sides


@pytest.mark.parametrize("percent", [1, 10, 50, 90])
def test_canary_share_over_10000_keys_is_within_one_and_a_half_points(percent):
    state = promote(None, "m-7", "canary", percent)
    local = sum(assign(state, f"conversation-{i}") == "local" for i in range(10_000))
    # binomial sd at p=0.5, n=10000 is 0.5 points: 1.5 points is three sd
    assert abs(local / 100 - percent) <= 1.5, local


def test_canary_percent_must_be_above_zero():
    with pytest.raises(ValueError, match="percent above 0"):
        promote(None, "m-1", "canary", 0)
    with pytest.raises(ValueError, match="percent above 0"):
        promote(None, "m-1", "canary", 101)


def test_a_new_version_reshuffles_the_canary_but_keeps_its_share():
    a = promote(None, "m-a", "canary", 50)
    b = promote(a, "m-b", "canary", 50)
    keys = [f"u{i}" for i in range(2000)]
    differ = sum(assign(a, k) != assign(b, k) for k in keys)
    assert 800 < differ < 1200  # independent halves disagree about half the time


def test_rollback_returns_to_the_previous_version_as_it_was():
    first = promote(None, "m-1", "canary", 20, local_model="invoice-1", adapter_key="m/m-1/adapter")
    second = promote(first, "m-2", "full", local_model="invoice-2")
    assert second.version == "m-2" and [h.version for h in second.history] == ["m-1"]
    back = rollback(second)
    assert (back.version, back.mode, back.percent, back.local_model, back.adapter_key) == (
        "m-1", "canary", 20, "invoice-1", "m/m-1/adapter")
    assert back.history == []
    off = rollback(back)
    assert off.mode == "off" and off.version is None and assign(off, "u") == "upstream"


SHA_1, SHA_2 = "1" * 64, "2" * 64


def test_promoting_the_same_version_again_keeps_its_model_adapter_and_sha256():
    canary = promote(None, "m-1", "canary", 5, local_model="invoice-1", adapter_key="migrations/m-1/a",
                     adapter_sha256=SHA_1)
    full = promote(canary, "m-1", "full")  # what `llamaduo promote R --version m-1 --mode full` does
    assert (full.mode, full.local_model, full.adapter_key, full.adapter_sha256) == (
        "full", "invoice-1", "migrations/m-1/a", SHA_1)
    # a new key for the same version: the old key's sha256 does not follow it
    moved = promote(canary, "m-1", "full", adapter_key="migrations/m-1/b")
    assert (moved.adapter_key, moved.adapter_sha256, moved.local_model) == ("migrations/m-1/b", None, "invoice-1")
    # another version inherits nothing
    other = promote(full, "m-2", "full")
    assert (other.local_model, other.adapter_key, other.adapter_sha256) == ("m-2", None, None)


def test_rollback_undoes_the_last_change_canary_to_full_of_one_version():
    canary = promote(None, "m-1", "canary", 5, local_model="invoice-1", adapter_key="migrations/m-1/a",
                     adapter_sha256=SHA_1)
    full = promote(canary, "m-1", "full")
    assert [(h.version, h.mode, h.percent) for h in full.history] == [("m-1", "canary", 5)]
    back = rollback(full)
    assert (back.version, back.mode, back.percent, back.local_model, back.adapter_key, back.adapter_sha256) == (
        "m-1", "canary", 5, "invoice-1", "migrations/m-1/a", SHA_1)
    assert assign(back, "u") == assign(canary, "u") and back.history == []
    assert rollback(back).mode == "off"


def test_rollback_after_canary_of_one_version_then_full_of_another_returns_to_the_canary():
    canary = promote(None, "m-1", "canary", 30, adapter_key="migrations/m-1/a", adapter_sha256=SHA_1)
    full = promote(canary, "m-2", "full", adapter_key="migrations/m-2/a", adapter_sha256=SHA_2)
    back = rollback(full)
    assert (back.version, back.mode, back.percent, back.adapter_key, back.adapter_sha256) == (
        "m-1", "canary", 30, "migrations/m-1/a", SHA_1)


def test_the_same_promotion_again_is_not_pushed_twice_and_the_value_stays_bounded():
    canary = promote(None, "m-1", "canary", 5)
    assert promote(canary, "m-1", "canary", 5).history == []  # e.g. a redelivered promotion on completion
    state = canary
    for i in range(3 * HISTORY_LIMIT):
        state = promote(state, "m-1", "canary", 1 + i % 50, local_model="x" * 256, adapter_key="k" * 1024,
                        adapter_sha256=SHA_1)
    assert len(state.history) == HISTORY_LIMIT and len(state.to_bytes()) < 20_000
    with pytest.raises(ValueError, match="adapter_sha256"):
        promote(None, "m-1", "full", adapter_sha256="not-a-digest")


def test_history_is_bounded():
    state = None
    for i in range(HISTORY_LIMIT + 5):
        state = promote(state, f"m-{i}", "full", now=datetime(2025, 1, 1, tzinfo=UTC))
    assert len(state.history) == HISTORY_LIMIT
    assert state.history[0].version == "m-4" and state.history[-1].version == f"m-{HISTORY_LIMIT + 3}"
    assert len(promote(state, "m-x", "full", keep=3).history) == 3


def test_rollbacks_walk_back_through_the_versions_newest_first():
    state = None
    for version in ("m-1", "m-2", "m-3"):
        state = promote(state, version, "full")
    assert [rollback(state).version, rollback(rollback(state)).version] == ["m-2", "m-1"]
