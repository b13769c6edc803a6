"""Judging live shadow traffic: a ``shadow.request`` (a gateway route's upstream answer and its local model's
answer to the same request) scored with the eval rubric, as ``shadow.scored``.

The same machinery as an eval batch (:func:`~llamaduo.services.judge.domain.judge_items`: the rubric prompt,
re-asks, the cache, ``M`` judgements averaged), with the request's own judge (``ShadowRequest.judge``: the route's
``shadow.judge``, else its upstream) and the spec defaults of :class:`~llamaduo.contracts.spec.JudgeSpec`. A route
has no migration budget: nothing is charged to a ledger, but the provider's shared rate limits apply (the service
builds providers with :func:`~llamaduo.providers.shared_limits.make_shared_provider`). Judging never raises for a
bad answer or provider: the score comes back ``failed`` with the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from llamaduo.contracts.events import JudgeItem, Usage
from llamaduo.contracts.gateway import ShadowRequest, ShadowScored
from llamaduo.contracts.spec import JudgeSpec, ProviderSpec, TaskSpec
from llamaduo.errors import LlamaDuoError, ProviderError
from llamaduo.providers.base import Provider
from llamaduo.services.judge.domain import JudgeCache, judge_items

log = logging.getLogger("llamaduo.judge.shadow")

#: Builds the judge's provider for a route (the service: shared rate limits; tests: plain ``make_provider``).
MakeJudge = Callable[[ProviderSpec, TaskSpec], Awaitable[Provider]]


def judge_task(request: ShadowRequest) -> TaskSpec:
    """The task the judge's provider works for: the route, with its system prompt."""
    return TaskSpec(name=request.route, system_prompt=request.system_prompt)


def failed(request: ShadowRequest, reason: str) -> ShadowScored:
    """A ``shadow.scored`` saying the comparison could not be judged, and why."""
    return ShadowScored(route=request.route, request_id=request.request_id, version=request.version,
                        failed=True, reason=reason[:500])


class ShadowJudge:
    """Scores shadow requests; keeps one provider per route and judge (``make`` builds them)."""

    def __init__(self, make: MakeJudge, *, spec: JudgeSpec | None = None, cache: JudgeCache | None = None) -> None:
        self.make = make
        self.spec = spec or JudgeSpec()
        self.cache = cache
        self._providers: dict[str, Provider] = {}

    async def provider(self, request: ShadowRequest) -> Provider:
        """The judge provider of ``request`` (built once per route, judge and system prompt)."""
        assert request.judge is not None
        key = "\x00".join((request.route, request.judge.model_dump_json(), request.system_prompt))
        if key not in self._providers:
            self._providers[key] = await self.make(request.judge, judge_task(request))
        return self._providers[key]

    async def score(self, request: ShadowRequest) -> tuple[ShadowScored, Usage | None]:
        """The scores of one comparison and the service-LLM usage (None when no provider was called)."""
        if request.judge is None:
            return failed(request, "the shadow request names no judge (the gateway's route sets shadow.judge or "
                                   "its upstream)"), None
        try:
            provider = await self.provider(request)
        except LlamaDuoError as err:  # e.g. the judge's key variable is not set here
            if isinstance(err, ProviderError) and err.retryable:  # NATS away (shared limits): the bus retries
                raise
            log.warning("shadow judge unavailable", extra={"route": request.route, "error": str(err)[:300]})
            return failed(request, f"judge unavailable: {err}"), None
        item = JudgeItem(item_id=request.request_id, instruction=request.instruction, reference=request.reference,
                         candidate=request.candidate)
        [score], usage = await judge_items([item], provider, self.spec, temperature=request.judge.temperature,
                                           cache=self.cache)
        if score.failed:
            return failed(request, score.reason), usage
        return ShadowScored(route=request.route, request_id=request.request_id, version=request.version,
                            similarity=score.similarity, precision=score.precision, reason=score.reason), usage
