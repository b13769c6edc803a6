"""The one config loader: ``LLAMADUO_*`` variables, secrets that never print, names derived from the prefix."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from llamaduo.settings import Settings


def test_reads_prefixed_environment_and_hides_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMADUO_NATS_URL", "nats://a:4222,nats://b:4222")
    monkeypatch.setenv("LLAMADUO_S3_SECRET_KEY", "very-secret-value")
    monkeypatch.setenv("LLAMADUO_ACK_WAIT_SECONDS", "7.5")
    monkeypatch.setenv("NATS_URL", "nats://not-ours:1")
    s = Settings()
    assert s.nats_url == "nats://a:4222,nats://b:4222"
    assert s.ack_wait_seconds == 7.5
    assert s.s3_secret_key.get_secret_value() == "very-secret-value"
    assert "very-secret-value" not in repr(s) and "very-secret-value" not in str(s.model_dump())


def test_defaults_without_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LLAMADUO_NATS_URL", "LLAMADUO_SUBJECT_PREFIX", "LLAMADUO_S3_BUCKET"):
        monkeypatch.delenv(name, raising=False)
    s = Settings()
    assert (s.nats_url, s.subject_prefix, s.s3_bucket) == ("nats://127.0.0.1:4222", "", "llamaduo")
    assert (s.stream_name, s.kv_bucket) == ("LLAMADUO", "LLAMADUO_STATE")
    assert s.subject("train.done") == "train.done" == s.unprefixed("train.done")


def test_prefix_names_stream_bucket_and_subjects() -> None:
    s = Settings(subject_prefix=".acme.prod-1.")
    assert s.subject_prefix == "acme.prod-1"
    assert s.stream_name == "ACME_PROD_1_LLAMADUO" and s.kv_bucket == "ACME_PROD_1_LLAMADUO_STATE"
    assert s.subject("train.done") == "acme.prod-1.train.done"
    assert s.unprefixed("acme.prod-1.train.done") == "train.done"
    assert s.unprefixed("other.train.done") == "other.train.done"


@pytest.mark.parametrize("bad", ["acme prod", "acme.*", "a>b", "x/y"])
def test_prefix_with_subject_syntax_is_refused_naming_the_variable(bad: str) -> None:
    with pytest.raises(ValidationError) as info:
        Settings(subject_prefix=bad)
    assert "LLAMADUO_SUBJECT_PREFIX" in str(info.value)


def test_ack_wait_must_be_positive() -> None:
    with pytest.raises(ValidationError, match="ack_wait_seconds"):
        Settings(ack_wait_seconds=0)
