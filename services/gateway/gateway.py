"""The gateway's request path: pick a side, answer, fall back, capture, count.

:meth:`Gateway.answer` is what ``POST /v1/chat/completions`` runs (the HTTP layer is
:mod:`llamaduo.services.gateway.server`):

1. the route is the request's ``model``; its state (:class:`~llamaduo.services.gateway.route_table.RouteTable`)
   and the request's sticky key decide the side (:func:`~llamaduo.services.gateway.policy.decide`);
2. a request for the local side that fails (error, timeout, overloaded, unavailable) or whose answer the route's
   validator refuses (invalid) is answered by the upstream; the client sees one successful answer, and
   ``route.fallback`` is published with the reason;
3. a sampled share (``shadow.sample_rate``) is answered by both sides, never delaying the client: in shadow mode
   the local model is also asked in the background; when a promoted version answered (canary, full) the upstream
   is asked in the background for the reference. The pair goes to the judge as ``shadow.request``
   (:meth:`Gateway.shadow_compared`), whose ``shadow.scored`` the shadow watch counts
   (:mod:`llamaduo.services.gateway.watch`);
4. with capture on, the pair is redacted, queued for the route's JSONL batch in S3
   (:class:`~llamaduo.services.gateway.capture.TrafficCapture`) and published as ``traffic.logged``.

Events are published in the background: a slow or absent NATS never delays nor fails a client's answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from llamaduo.contracts.events import Envelope, Subject, route_envelope
from llamaduo.contracts.gateway import ChatMessage, RouteFallback, ShadowRequest, TrafficLogged
from llamaduo.errors import ProviderError
from llamaduo.services.gateway.adapters import AdapterLoader
from llamaduo.services.gateway.capture import TrafficCapture
from llamaduo.services.gateway.checks import Redactor, Validator, make_redactor, make_validator
from llamaduo.services.gateway.config import GatewayConfig, RouteConfig
from llamaduo.services.gateway.metrics import GatewayMetrics
from llamaduo.services.gateway.policy import Decision, decide, last_user_message, sticky_key
from llamaduo.services.gateway.route_table import RouteTable
from llamaduo.services.gateway.sides import Answer, LocalFailure, LocalSide, UpstreamSide
from llamaduo.serving.api import APIError, chat_messages, model_not_found, parse_request

log = logging.getLogger("llamaduo.gateway")

#: Publishes one envelope (the service's ``bus.emit``).
Emit = Callable[[Envelope], Awaitable[None]]


@dataclass
class Route:
    """One configured route with what it needs at run time."""

    config: RouteConfig
    upstream: UpstreamSide
    local: LocalSide | None
    validator: Validator | None
    redactor: Redactor | None

    @property
    def name(self) -> str:
        return self.config.name

    def redact(self, text: str) -> str:
        return self.redactor(text) if self.redactor is not None else text


@dataclass(frozen=True)
class Outcome:
    """The answer a client gets, and how it came about."""

    request_id: str
    route: str
    model: str
    answer: Answer
    side: str
    version: str | None
    fallback_reason: str | None
    stream: bool
    include_usage: bool


def build_route(config: RouteConfig) -> Route:
    """A :class:`Route` for ``config``: its upstream provider, local client, validator and redactor (a hook that
    cannot be loaded is a :class:`~llamaduo.errors.SpecError` naming the route)."""
    where = f"routes[{config.name}]"
    return Route(config=config, upstream=UpstreamSide(config.upstream, config.name),
                 local=LocalSide(config.local) if config.local is not None else None,
                 validator=make_validator(config.validator, f"{where}.validator"),
                 redactor=make_redactor(config.redact, where))


class Gateway:
    """The routes of one routes file, their states and the capture of their traffic.

    ``emit`` publishes events (None: nothing is published); ``capture`` writes JSONL batches (None: nothing is
    stored). :meth:`start` watches the routes' KV bucket (``kv``, when given) and starts the capture's flushing;
    :meth:`aclose` writes what is buffered and closes the clients.
    """

    def __init__(self, config: GatewayConfig, *, emit: Emit | None = None, capture: TrafficCapture | None = None,
                 table: RouteTable | None = None, metrics: GatewayMetrics | None = None,
                 routes: Mapping[str, Route] | None = None, adapters: AdapterLoader | None = None) -> None:
        self.config = config
        self.routes: dict[str, Route] = dict(routes) if routes is not None else {
            r.name: build_route(r) for r in config.routes}
        self.table = table or RouteTable()
        self.metrics = metrics or GatewayMetrics()
        self.emit = emit
        self.capture = capture
        #: loads promoted adapters onto local servers (routes with local.load_adapters); None: no hand-off
        self.adapters = adapters
        if adapters is not None:
            self.table.listeners.append(adapters.on_change)
        #: draws the shadow sample of locally answered requests (canary, full); seed it for a reproducible sample
        self.shadow_rng = random.Random()
        self._background: set[asyncio.Task[Any]] = set()
        self._flusher: asyncio.Task[None] | None = None
        for name in self.routes:
            self.metrics.declare(name)

    # ------------------------------------------------------------------------------ lifecycle

    async def start(self, kv: Any | None = None) -> None:
        """Read and watch the route states (``kv``: the routes bucket) and flush captured traffic periodically."""
        if kv is not None:
            await self.table.watch(kv)
        if self.adapters is not None:
            await self.adapters.start()
        if self.capture is not None:
            self._flusher = asyncio.ensure_future(self.capture.run())

    async def aclose(self) -> None:
        """Finish background work, write buffered traffic, close the sides' clients."""
        if self._background:
            await asyncio.wait(list(self._background), timeout=10.0)
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        elif self.capture is not None:
            await self.capture.flush()
        await self.table.stop()
        if self.adapters is not None:
            await self.adapters.aclose()
        for route in self.routes.values():
            with contextlib.suppress(Exception):
                await route.upstream.aclose()
            if route.local is not None:
                with contextlib.suppress(Exception):
                    await route.local.aclose()

    def _spawn(self, work: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _publish(self, env: Envelope) -> None:
        if self.emit is not None:
            self._spawn(self._send(env))

    async def _send(self, env: Envelope) -> None:
        """Publish ``env`` now; a failure is logged, never raised (events never fail a client's request)."""
        if self.emit is None:
            return
        try:
            await self.emit(env)
        except Exception as err:
            log.warning("event not published", extra={"subject": str(env.type), "route": env.route,
                                                      "error": f"{type(err).__name__}: {str(err)[:200]}"})

    # ------------------------------------------------------------------------------ one request

    def models(self) -> list[dict[str, Any]]:
        """``/v1/models`` entries: one per route, with its current mode, version and canary share."""
        out = []
        for name in self.routes:
            state = self.table.get(name)
            out.append({"id": name, "object": "model", "created": 0, "owned_by": "llamaduo-gateway",
                        "mode": state.mode if state else "off", "version": state.version if state else None,
                        "percent": state.percent if state else 0.0})
        return out

    async def answer(self, body: Any, headers: Mapping[str, str]) -> Outcome:
        """Answer one chat completion request body (already decoded); raise :class:`APIError` for a bad request,
        an unknown route, or when the upstream cannot answer either."""
        req = parse_request(body)
        route = self.routes.get(req.model)
        if route is None:
            raise model_not_found(req.model, list(self.routes))
        if (req.n or 1) != 1:
            raise APIError(400, "The gateway answers one choice per request (n=1)", param="n")
        messages = chat_messages(req.messages, route.config.system_prompt)
        at = datetime.now(UTC)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        state = self.table.get(route.name)
        decision = decide(state, has_local=route.local is not None, key=sticky_key(body, headers),
                          sample_rate=route.config.shadow.sample_rate)
        answer, side, reason = await self._answer(route, body, messages, decision, request_id,
                                                  state.local_model if state else None)
        if decision.shadow:
            self._spawn(self._shadow(route, body, messages, decision, request_id, answer,
                                     state.local_model if state else None))
        elif side == "local" and decision.version is not None and \
                self.shadow_rng.random() < route.config.shadow.sample_rate:
            self._spawn(self._reference(route, body, messages, decision.version, request_id, answer))
        version = decision.version if side == "local" else None
        self.metrics.answered(route.name, side, answer.seconds, answer.prompt_tokens, answer.completion_tokens,
                              route.config.upstream, answer.cost)
        if route.config.capture:
            self._capture(route, request_id, at, messages, answer, side, version, reason)
        return Outcome(request_id=request_id, route=route.name, model=route.name, answer=answer, side=side,
                       version=version, fallback_reason=reason, stream=bool(req.stream),
                       include_usage=bool(req.stream_options and req.stream_options.include_usage))

    async def _answer(self, route: Route, body: Any, messages: list[dict[str, str]], decision: Decision,
                      request_id: str, local_model: str | None) -> tuple[Answer, str, str | None]:
        reason = None
        if decision.side == "local" and route.local is not None:
            try:
                return await self._local(route, body, messages, local_model or decision.version or route.name), \
                    "local", None
            except LocalFailure as failure:
                reason = failure.reason
                self.metrics.fell_back(route.name, failure.reason)
                log.info("fallback to upstream", extra={"route": route.name, "reason": failure.reason,
                                                        "detail": failure.detail, "version": decision.version})
                self._publish(route_envelope(Subject.ROUTE_FALLBACK, RouteFallback(
                    route=route.name, request_id=request_id, version=decision.version, reason=failure.reason,
                    detail=failure.detail, latency_ms=failure.seconds * 1000), route.name,
                    migration_id=_migration_of(decision.version), key=f"fallback-{request_id}"))
        try:
            return await route.upstream.complete(body, messages), "upstream", reason
        except ProviderError as err:
            self.metrics.failures.labels(route.name).inc()
            log.warning("upstream failed", extra={"route": route.name, "error": str(err)[:300]})
            raise APIError(502, f"The route's service LLM did not answer: {str(err)[:300]}", type="server_error",
                           code="upstream_unavailable") from None

    async def _local(self, route: Route, body: Any, messages: list[dict[str, str]], model: str) -> Answer:
        assert route.local is not None
        if self.adapters is not None:
            self.adapters.require(route.name)  # 'unavailable' until the version's adapter is loaded
        try:
            answer = await route.local.complete(body, model, messages)
        except LocalFailure as failure:
            if failure.model_missing and self.adapters is not None:
                self.adapters.lost(route.name, model)  # e.g. the local server restarted: load it again
            raise
        if route.validator is not None:
            try:
                why = route.validator(answer.text)
            except Exception as err:  # a validator that breaks refuses the answer, it does not fail the request
                why = f"validator failed: {type(err).__name__}"
            if why is not None:
                raise LocalFailure("invalid", why, answer.seconds)
        return answer

    async def _shadow(self, route: Route, body: Any, messages: list[dict[str, str]], decision: Decision,
                      request_id: str, reference: Answer, local_model: str | None) -> None:
        assert decision.version is not None
        try:
            candidate = await self._local(route, body, messages, local_model or decision.version)
        except LocalFailure as failure:
            log.info("shadow answer missing", extra={"route": route.name, "reason": failure.reason})
            return
        self.metrics.shadow.labels(route.name).inc()
        await self.shadow_compared(route, request_id, decision.version, messages, reference.text, candidate.text)

    async def _reference(self, route: Route, body: Any, messages: list[dict[str, str]], version: str,
                         request_id: str, candidate: Answer) -> None:
        """A locally answered request of the sample, asked upstream too (after the client has its answer)."""
        try:
            reference = await route.upstream.complete(body, messages)
        except ProviderError as err:
            log.info("shadow reference missing", extra={"route": route.name, "error": str(err)[:300]})
            return
        self.metrics.shadow.labels(route.name).inc()
        await self.shadow_compared(route, request_id, version, messages, reference.text, candidate.text)

    async def shadow_compared(self, route: Route, request_id: str, version: str, messages: list[dict[str, str]],
                              reference: str, candidate: str) -> None:
        """A sampled request's upstream answer (``reference``) and the local one (``candidate``), both in hand:
        published as ``shadow.request`` for the judge, redacted like captured traffic, with the route's judge
        (``shadow.judge``, else its upstream: key variable names only) and system prompt."""
        config = route.config
        await self._send(route_envelope(Subject.SHADOW_REQUEST, ShadowRequest(
            route=route.name, request_id=request_id, version=version,
            instruction=route.redact(last_user_message(messages)),
            messages=[ChatMessage(role=m["role"], content=route.redact(m["content"])) for m in messages],
            reference=route.redact(reference), candidate=route.redact(candidate),
            system_prompt=config.system_prompt, judge=config.shadow.judge or config.upstream),
            route.name, migration_id=_migration_of(version), key=f"shadow-{request_id}"))

    def _capture(self, route: Route, request_id: str, at: datetime, messages: list[dict[str, str]],
                 answer: Answer, side: str, version: str | None, reason: str | None) -> None:
        redacted = [{"role": m["role"], "content": route.redact(m["content"])} for m in messages]
        response = route.redact(answer.text)
        row = {"request_id": request_id, "at": at.isoformat(), "messages": redacted, "response": response,
               "answered_by": side, "local_version": version}
        stored = self.capture.add(route.name, row) if self.capture is not None else None
        self._publish(route_envelope(Subject.TRAFFIC_LOGGED, TrafficLogged(
            route=route.name, request_id=request_id, at=at, messages=redacted, response=response,
            answered_by=side, local_version=version, latency_ms=answer.seconds * 1000,  # type: ignore[arg-type]
            prompt_tokens=answer.prompt_tokens, completion_tokens=answer.completion_tokens,
            fallback_reason=reason, stored_key=stored), route.name, key=request_id))


def _migration_of(version: str | None) -> str | None:
    """The migration a version names, when it is a migration id (versions are migration ids by convention)."""
    from llamaduo.contracts.events import validate_migration_id

    if version is None:
        return None
    try:
        return validate_migration_id(version)
    except ValueError:
        return None
