"""A cancelled migration's synthesis stops between teacher calls (no call after the cancel is seen)."""

from __future__ import annotations

import asyncio

import pytest

from llamaduo.bus.cancellation import MigrationCancelled
from llamaduo.contracts.events import SynthRequest
from llamaduo.contracts.spec import ProviderSpec, SynthesisSpec
from llamaduo.services.synthesizer.domain import synthesize
from tests.services.synthesizer.test_domain import TEST, TRAIN, Recording


def test_synthesis_stops_at_the_next_wave_once_cancelled():
    provider = Recording()
    provider.spec = ProviderSpec(limits={"max_concurrency": 1})  # one call a wave: a wave is one teacher call
    spec = SynthesisSpec(samples_per_round=40, seeds_per_call=2, examples_per_call=4)
    with pytest.raises(MigrationCancelled, match="after 2 calls"):
        asyncio.run(synthesize(TRAIN, TEST, SynthRequest(samples=40), spec, provider, round=1, seed=0,
                               system_prompt="", should_cancel=lambda: len(provider.requests) >= 2))
    assert len(provider.requests) == 2  # 10 calls were wanted; none after the cancel


def test_without_a_cancel_the_same_synthesis_runs_to_the_end():
    provider = Recording()
    provider.spec = ProviderSpec(limits={"max_concurrency": 1})
    spec = SynthesisSpec(samples_per_round=40, seeds_per_call=2, examples_per_call=4)
    result = asyncio.run(synthesize(TRAIN, TEST, SynthRequest(samples=40), spec, provider, round=1, seed=0,
                                    system_prompt="", should_cancel=lambda: False))
    assert result.calls >= 10 and len(provider.requests) >= 10
