"""The gateway's Prometheus metrics, served on its own ``/metrics`` (same port as the API).

Labels stay bounded: the route (from the operator's routes file), the side that answered (``local`` /
``upstream``), a fallback reason, a token kind. Each gateway keeps its metrics in its own registry (several
gateways in one process, as in tests, do not collide).

The cost saved is an estimate: the tokens the local model answered, priced at the route's upstream price per
million tokens (:func:`llamaduo.providers.pricing.price_for`); a route whose upstream price is unknown saves
nothing on paper.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from llamaduo.contracts.gateway import FallbackReason
from llamaduo.contracts.spec import ProviderSpec
from llamaduo.providers.pricing import price_for

#: Answer latency buckets (seconds): a small local model answers in tens of milliseconds, a service LLM in seconds.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

#: The media type of :meth:`GatewayMetrics.render`.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class GatewayMetrics:
    """Counters and histograms of one gateway; :meth:`render` is the ``/metrics`` body."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("llamaduo_gateway_requests", "Requests answered, by route and the side that "
                                "answered (local, upstream)", ["route", "side"], registry=r)
        self.failures = Counter("llamaduo_gateway_failures", "Requests no side could answer (the client got an "
                                "error), by route", ["route"], registry=r)
        self.latency = Histogram("llamaduo_gateway_latency_seconds", "Time to a complete answer, by route and side",
                                 ["route", "side"], buckets=LATENCY_BUCKETS, registry=r)
        self.fallbacks = Counter("llamaduo_gateway_fallbacks", "Requests routed locally but answered upstream, by "
                                 "route and reason", ["route", "reason"], registry=r)
        self.tokens = Counter("llamaduo_gateway_tokens", "Tokens of answered requests, by route, side and kind "
                              "(prompt, completion)", ["route", "side", "kind"], registry=r)
        self.upstream_cost = Counter("llamaduo_gateway_upstream_cost_usd", "Estimated USD spent on upstream "
                                     "answers, by route", ["route"], registry=r)
        self.cost_saved = Counter("llamaduo_gateway_cost_saved_usd", "Estimated USD saved: local tokens at the "
                                  "route's upstream price per million tokens, by route", ["route"], registry=r)
        self.shadow = Counter("llamaduo_gateway_shadow_requests", "Shadow comparisons started, by route",
                              ["route"], registry=r)

    def declare(self, route: str) -> None:
        """Create a route's series at zero, so dashboards see it before its first request."""
        for side in ("local", "upstream"):
            self.requests.labels(route, side)
            self.latency.labels(route, side)
        self.failures.labels(route)
        self.upstream_cost.labels(route)
        self.cost_saved.labels(route)

    def answered(self, route: str, side: str, seconds: float, prompt_tokens: int, completion_tokens: int,
                 upstream: ProviderSpec, upstream_cost: float = 0.0) -> None:
        """Count one answered request; local tokens add their upstream price to the cost saved."""
        self.requests.labels(route, side).inc()
        self.latency.labels(route, side).observe(seconds)
        self.tokens.labels(route, side, "prompt").inc(prompt_tokens)
        self.tokens.labels(route, side, "completion").inc(completion_tokens)
        if side == "local":
            self.cost_saved.labels(route).inc(price_for(upstream.model or "", upstream).cost(
                prompt_tokens, completion_tokens))
        elif upstream_cost > 0:
            self.upstream_cost.labels(route).inc(upstream_cost)

    def fell_back(self, route: str, reason: FallbackReason) -> None:
        self.fallbacks.labels(route, reason).inc()

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
