"""One JetStream KV entry shared by many processes, changed only by compare-and-set.

The spend ledger of a migration and the rate schedule of a provider account are such entries: every worker
reads, applies a pure function and writes naming the revision it read, and reads again when another wrote first.
Failures are retryable :class:`~llamaduo.errors.ProviderError`: both callers sit inside a provider call, whose
retry loop already knows what to do with them.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

from llamaduo.errors import ProviderError

V = TypeVar("V")
R = TypeVar("R")
Sleep = Callable[[float], Awaitable[None]]


class KVCell(Generic[V]):
    """One JetStream KV entry changed only by compare-and-set, shared by every process that opens it.

    :meth:`change` applies a pure function to the current value and writes the result naming the revision
    it read; when another process wrote first it reads again and retries after a jittered sleep, at most
    ``max_conflicts`` times. Callers in one process take turns (an :class:`asyncio.Lock`), so only processes
    race. The value and revision of this cell's own last write are kept, so a process that
    wrote last needs no read (one round trip). ``round_trips`` and ``conflicts`` count for measurements.
    Used by the spend ledger (:mod:`llamaduo.providers.budget`) and the shared rate limits
    (:mod:`llamaduo.providers.shared_limits`); ``what`` names the entry in errors.
    """

    def __init__(
        self,
        kv: Any,
        key: str,
        *,
        what: str,
        decode: Callable[[bytes], V],
        encode: Callable[[V], bytes],
        max_conflicts: int = 32,
        sleep: Sleep | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.kv = kv
        self.key = key
        self.what = what
        self.decode = decode
        self.encode = encode
        self.max_conflicts = max_conflicts
        self._sleep = sleep or asyncio.sleep
        self._rng = rng or random.Random()
        self._known: tuple[V | None, int | None] | None = None
        self._lock = asyncio.Lock()
        self.round_trips = 0
        self.conflicts = 0

    async def read(self) -> tuple[V | None, int | None]:
        """The current value and its revision (``(None, None)`` when there is no entry)."""
        from nats.js.errors import KeyNotFoundError

        self.round_trips += 1
        try:
            entry = await self.kv.get(self.key)
        except KeyNotFoundError:
            return None, None
        return (self.decode(entry.value) if entry.value else None), entry.revision

    async def _write(self, value: V, revision: int | None) -> int | None:
        """The new revision, or None when ``revision`` is no longer the entry's."""
        from nats.js.errors import KeyWrongLastSequenceError

        self.round_trips += 1
        data = self.encode(value)
        try:
            if revision is None:
                return int(await self.kv.create(self.key, data))
            return int(await self.kv.update(self.key, data, last=revision))
        except KeyWrongLastSequenceError:
            return None

    async def change(self, apply: Callable[[V | None], tuple[V, R]]) -> R:
        """Write ``apply(current)[0]`` by compare-and-set and return ``apply(current)[1]``.

        Callers in this process take turns (only other processes race for the entry). Raise a retryable
        :class:`ProviderError` when NATS cannot be reached or the entry stayed contended for ``max_conflicts``
        attempts."""
        async with self._lock:
            return await self._change(apply)

    async def _change(self, apply: Callable[[V | None], tuple[V, R]]) -> R:
        import nats.errors

        try:
            for attempt in range(self.max_conflicts):
                cached = self._known is not None
                current, revision = self._known if self._known is not None else await self.read()
                value, result = apply(current)
                written = await self._write(value, revision)
                if written is not None:
                    self._known = (value, written)
                    return result
                self._known = None
                if not cached:  # a stale copy of our own write is read again at once; a lost race waits
                    self.conflicts += 1
                    await self._sleep(self._rng.uniform(0, min(0.05, 0.001 * 2**attempt)))
        except (nats.errors.Error, OSError) as err:
            self._known = None
            raise ProviderError(f"{self.what} {self.key}: NATS KV unavailable ({type(err).__name__}: {err})",
                                retryable=True) from None
        raise ProviderError(f"{self.what} {self.key}: still contended after {self.max_conflicts} attempts",
                            retryable=True)
