"""A micro-batcher for the OpenAI Batch API (``ProviderSpec.batch_api``): half price, answers later.

Callers keep calling :meth:`OpenAIBatcher.submit` one request at a time, concurrently (the judge and the
synthesizer ``asyncio.gather`` their calls). The batcher gathers the requests that arrive within
``batch_window_seconds`` of the first one (or until ``batch_max_requests`` are waiting) and sends them as
one batch:

1. one JSONL line per request (``custom_id``, ``method``, ``url``, ``body``: the Chat Completions body of a
   synchronous call), uploaded with the Files API (``purpose="batch"``);
2. a batch over that file (``endpoint="/v1/chat/completions"``, ``completion_window="24h"``);
3. polled every ``batch_poll_seconds`` until it is ``completed``, ``failed``, ``expired`` or ``cancelled``
   (a batch still running after ``batch_timeout_seconds`` is cancelled and given up);
4. the output and error files downloaded and each line matched to its request by ``custom_id``;
5. the input, output and error files deleted (best effort), then every waiting caller handed its result.

Failures stay with the callers they concern. A line that is an error (``response.status_code`` other than
200, or an ``error`` object) fails only its caller, with a :class:`BatchLineError` that is retryable for
429 / 5xx / server-side codes; a request with no line in the output fails the same way (retryable). A
batch that ``failed`` (validation) fails all its callers with the server's reasons; requests left undone
by an ``expired`` or ``cancelled`` batch, or by the timeout, fail as not retryable (asking again means
waiting for another whole batch). Each HTTP call (upload, create, poll, download) goes through the
provider's :class:`~llamaduo.providers.limits.CallGuard` (rate limit, timeout, retries); a poll that still
fails is logged and polling goes on until the timeout, since the batch keeps running (and billing)
server-side. Messages are redacted by the guard: the key never appears in an error or a log line.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from openai import AsyncOpenAI

from llamaduo.providers.base import ProviderError
from llamaduo.providers.limits import CallGuard, Clock, Failure, Sleep, is_retryable_status

log = logging.getLogger(__name__)

#: The only endpoint batched here (and the ``url`` of every line).
CHAT_ENDPOINT = "/v1/chat/completions"
#: The only completion window the Batch API offers.
COMPLETION_WINDOW = "24h"
#: Batch statuses after which nothing changes any more.
TERMINAL_STATUSES = frozenset({"completed", "failed", "expired", "cancelled"})
#: Per-line error codes worth asking again (in a later batch).
RETRYABLE_LINE_CODES = frozenset({"rate_limit_exceeded", "server_error", "internal_error", "timeout"})
#: Per-line error codes of requests a batch left undone (expired / cancelled): not retryable.
UNDONE_LINE_CODES = frozenset({"batch_expired", "batch_cancelled"})


class BatchLineError(ProviderError):
    """One request of a batch failed (its line is an error, missing, or its batch failed as a whole).

    ``status`` is the line's HTTP status when it had one (e.g. 400 for a rejected request body).
    """

    def __init__(self, message: str, *, retryable: bool = False, status: int | None = None) -> None:
        super().__init__(message, retryable=retryable)
        self.status = status


@dataclass
class _Pending:
    custom_id: str
    body: dict[str, Any]
    future: asyncio.Future[dict[str, Any]]


class OpenAIBatcher:
    """Gathers concurrent Chat Completions requests into Batch API jobs; see the module docstring.

    ``client`` is the provider's ``AsyncOpenAI`` client, ``guard`` and ``classify`` its call guard and error
    classifier; ``describe`` names the provider in messages. ``sleep`` (polling) and ``clock`` (the timeout)
    are injectable for tests.
    """

    def __init__(
        self,
        client: AsyncOpenAI,
        guard: CallGuard,
        classify: Callable[[BaseException], Failure | None],
        *,
        describe: str,
        window_seconds: float = 0.5,
        max_requests: int = 1000,
        poll_seconds: float = 30.0,
        timeout_seconds: float = 86_400.0,
        sleep: Sleep | None = None,
        clock: Clock | None = None,
    ) -> None:
        if window_seconds <= 0 or max_requests < 1 or poll_seconds <= 0 or timeout_seconds <= 0:
            raise ValueError("batch window, poll interval and timeout must be positive, max_requests at least 1")
        self.client = client
        self.guard = guard
        self.classify = classify
        self.describe = describe
        self.window = window_seconds
        self.max_requests = max_requests
        self.poll = poll_seconds
        self.timeout = timeout_seconds
        self._sleep = sleep or asyncio.sleep
        self._clock = clock or time.monotonic
        self._open: list[_Pending] = []
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._ids = itertools.count(1)
        self._closed = False
        #: batches sent so far (for logs and tests)
        self.batches_sent = 0

    # ------------------------------------------------------------------ callers

    async def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        """Send ``body`` (a Chat Completions request body) in the next batch and return the reply body.

        Raise :class:`BatchLineError` when this request failed (see the module docstring).
        """
        if self._closed:
            raise BatchLineError(f"{self.describe}: the provider is closed")
        loop = asyncio.get_running_loop()
        pending = _Pending(f"req-{next(self._ids)}", body, loop.create_future())
        self._open.append(pending)
        if len(self._open) >= self.max_requests:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self.window, self._flush)
        return await pending.future

    @property
    def waiting(self) -> int:
        """Requests gathered for the next batch or in a batch not finished yet."""
        return len(self._open) + sum(1 for t in self._tasks if not t.done())

    async def aclose(self) -> None:
        """Stop: requests not answered yet fail (not retryable); batches already sent are not cancelled."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        group, self._open = self._open, []
        _fail(group, BatchLineError(f"{self.describe}: the provider was closed before the batch was sent"))
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        group, self._open = self._open, []
        group = [p for p in group if not p.future.done()]  # callers cancelled while gathering
        if not group:
            return
        task = asyncio.get_running_loop().create_task(self._run(group))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ one batch

    async def _run(self, group: list[_Pending]) -> None:
        files: list[str] = []
        batch_id: str | None = None
        try:
            data = "".join(
                json.dumps(
                    {"custom_id": p.custom_id, "method": "POST", "url": CHAT_ENDPOINT, "body": p.body},
                    ensure_ascii=False,
                )
                + "\n"
                for p in group
            ).encode()
            upload = await self._call(
                lambda: self.client.files.create(
                    file=("llamaduo-batch.jsonl", data, "application/jsonl"), purpose="batch"
                ),
                "upload of the batch input file",
            )
            files.append(upload.id)
            batch = await self._call(
                lambda: self.client.batches.create(
                    input_file_id=upload.id,
                    endpoint=CHAT_ENDPOINT,
                    completion_window=COMPLETION_WINDOW,
                    metadata={"source": "llamaduo"},
                ),
                "creation of the batch",
            )
            batch_id = batch.id
            self.batches_sent += 1
            log.info("%s: batch %s sent with %d request(s)", self.describe, batch.id, len(group))
            batch = await self._wait(batch, len(group))
            for file_id in (batch.output_file_id, batch.error_file_id):
                if file_id:
                    files.append(file_id)
            outcomes = await self._collect(batch, group)
        except asyncio.CancelledError:
            _fail(group, BatchLineError(f"{self.describe}: the provider was closed while batch {batch_id} ran"))
            await asyncio.shield(self._delete(files))
            raise
        except ProviderError as err:
            outcomes = {p.custom_id: BatchLineError(str(err), retryable=err.retryable) for p in group}
        except Exception as err:  # a bug here must not leave callers waiting forever
            log.exception("%s: batch %s failed unexpectedly", self.describe, batch_id)
            why = self.guard.redact(f"{self.describe}: batch failed ({type(err).__name__}: {err})")
            outcomes = {p.custom_id: BatchLineError(why) for p in group}
        await asyncio.shield(self._delete(files))  # before the callers go on: nothing is left behind
        for pending in group:
            outcome = outcomes.get(pending.custom_id) or BatchLineError(f"{self.describe}: no outcome")
            if pending.future.done():
                continue
            if isinstance(outcome, BaseException):
                pending.future.set_exception(outcome)
            else:
                pending.future.set_result(outcome)

    async def _call(self, attempt: Callable[[], Awaitable[Any]], what: str) -> Any:
        return await self.guard.run(attempt, classify=self.classify, describe=f"{self.describe}: {what}")

    async def _wait(self, batch: Any, size: int) -> Any:
        """Poll ``batch`` until it is terminal and return it; past the timeout cancel it and raise."""
        deadline = self._clock() + self.timeout
        last_error = ""
        while batch.status not in TERMINAL_STATUSES:
            remaining = deadline - self._clock()
            if remaining <= 0:
                await self._cancel(batch.id)
                why = f"; last poll error: {last_error}" if last_error else ""
                raise BatchLineError(
                    f"{self.describe}: batch {batch.id} did not finish within batch_timeout_seconds "
                    f"{self.timeout:g} (status {batch.status}); it was cancelled{why}"
                )
            await self._sleep(min(self.poll, remaining))
            try:
                batch = await self._call(
                    lambda b=batch.id: self.client.batches.retrieve(b), f"status of batch {batch.id}"
                )
            except ProviderError as err:
                if not err.retryable:
                    raise
                last_error = str(err)
                log.warning("%s (polling goes on)", err)
        counts = batch.request_counts
        log.info(
            "%s: batch %s %s%s",
            self.describe,
            batch.id,
            batch.status,
            f" ({counts.completed} done, {counts.failed} failed of {counts.total})" if counts else f" ({size} sent)",
        )
        return batch

    async def _collect(self, batch: Any, group: list[_Pending]) -> dict[str, dict[str, Any] | BatchLineError]:
        """custom_id -> reply body or error, for every request of ``group`` (``batch`` is terminal)."""
        if batch.status == "failed":
            raise BatchLineError(
                self.guard.redact(f"{self.describe}: batch {batch.id} failed: {_batch_errors(batch)}")
            )
        by_id = {p.custom_id: p for p in group}
        outcomes: dict[str, dict[str, Any] | BatchLineError] = {}
        for file_id in (batch.output_file_id, batch.error_file_id):
            if not file_id or not by_id:
                continue
            content = await self._call(lambda f=file_id: self.client.files.content(f), f"download of file {file_id}")
            for number, raw in enumerate(content.text.splitlines(), 1):
                if not raw.strip():
                    continue
                try:
                    line = json.loads(raw)
                    custom_id = line["custom_id"]
                except (ValueError, KeyError, TypeError):
                    log.warning("%s: batch %s: unreadable line %d of file %s", self.describe, batch.id, number, file_id)
                    continue
                if by_id.pop(str(custom_id), None) is not None:
                    outcomes[str(custom_id)] = self._outcome(line, batch.id)
        if batch.status == "completed":
            missing = BatchLineError(
                f"{self.describe}: batch {batch.id} completed without an answer to this request", retryable=True
            )
        else:  # expired or cancelled: what did not run will not run
            reason = f"expired (not done within its {COMPLETION_WINDOW} completion window)"
            if batch.status == "cancelled":
                reason = "was cancelled"
            missing = BatchLineError(f"{self.describe}: batch {batch.id} {reason} before this request ran")
        for custom_id in by_id:  # one exception object per caller: tracebacks are not shared between tasks
            outcomes[custom_id] = BatchLineError(str(missing), retryable=missing.retryable)
        return outcomes

    def _outcome(self, line: dict[str, Any], batch_id: str) -> dict[str, Any] | BatchLineError:
        """The reply body of one output line, or the error it stands for."""
        response = line.get("response") if isinstance(line.get("response"), dict) else None
        error = line.get("error") if isinstance(line.get("error"), dict) else None
        if response is not None:
            status = response.get("status_code")
            body = response.get("body")
            if status == 200 and isinstance(body, dict) and error is None:
                return body
            if status != 200 and isinstance(status, int):
                detail = _message(body)
                return BatchLineError(
                    self.guard.redact(
                        f"{self.describe}: batch {batch_id}: HTTP {status}" + (f": {detail}" if detail else "")
                    ),
                    retryable=is_retryable_status(status),
                    status=status,
                )
        if error is not None:
            code = str(error.get("code") or "")
            detail = " ".join(str(error.get("message") or "").split())[:300]
            if code == "batch_expired":
                detail = detail or f"the batch expired before this request ran ({COMPLETION_WINDOW} window)"
            return BatchLineError(
                self.guard.redact(f"{self.describe}: batch {batch_id}: {code or 'error'}: {detail}"),
                retryable=code not in UNDONE_LINE_CODES and (code in RETRYABLE_LINE_CODES or not code),
            )
        return BatchLineError(f"{self.describe}: batch {batch_id}: unreadable result line", retryable=True)

    async def _cancel(self, batch_id: str) -> None:
        try:
            await self.client.batches.cancel(batch_id)
        except Exception as err:  # best effort
            log.warning("%s: could not cancel batch %s (%s)", self.describe, batch_id, type(err).__name__)

    async def _delete(self, file_ids: list[str]) -> None:
        for file_id in file_ids:
            try:
                await self.client.files.delete(file_id)
            except Exception as err:  # best effort: batch files expire by themselves
                log.info("%s: could not delete file %s (%s)", self.describe, file_id, type(err).__name__)


def _fail(group: list[_Pending], error: BatchLineError) -> None:
    for pending in group:
        if not pending.future.done():
            # one exception object per caller: tracebacks must not be shared between tasks
            pending.future.set_exception(BatchLineError(str(error), retryable=error.retryable, status=error.status))


def _message(body: Any) -> str:
    if isinstance(body, dict):
        err = body.get("error")
        message = err.get("message") if isinstance(err, dict) else body.get("message")
        return " ".join(str(message or "").split())[:300]
    return " ".join(str(body or "").split())[:300]


def _batch_errors(batch: Any) -> str:
    errors = getattr(getattr(batch, "errors", None), "data", None) or []
    parts = []
    for e in errors[:5]:
        where = f" (line {e.line})" if getattr(e, "line", None) else ""
        parts.append(f"{e.code or 'error'}{where}: {e.message or ''}".strip())
    more = f" and {len(errors) - 5} more" if len(errors) > 5 else ""
    return "; ".join(parts) + more if parts else "no reason given"
