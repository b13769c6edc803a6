"""The project's exceptions: one base, :class:`LlamaDuoError`, and a class per kind of trouble.

Each message names what is wrong and where (the spec field, the file and row, the server), never a secret.
The CLI maps them to messages and exit codes (:attr:`LlamaDuoError.exit_code`); anything else is a bug.
The subclasses also derive from the built-in exception they refine, so ``except ValueError`` still works.
"""

from __future__ import annotations


class LlamaDuoError(Exception):
    """Base of every error LlamaDuo raises on purpose."""

    #: what ``llamaduo`` exits with when this error ends a command (1 is kept for "the migration did not pass")
    exit_code: int = 2


class SpecError(LlamaDuoError, ValueError):
    """A spec (or spec field, or user code it names) that cannot run. The message names each bad field."""


class DataError(LlamaDuoError, ValueError):
    """A dataset that cannot be used: missing file, bad rows, too few rows. Names the source and the rows."""


class ProviderError(LlamaDuoError, RuntimeError):
    """A service-LLM call that failed after the provider's own retries. ``retryable`` tells the caller if
    asking again later may work."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class StoreError(LlamaDuoError, RuntimeError):
    """An artifact that cannot be stored or read as asked (a key outside the rules, a hash that differs)."""


class BusError(LlamaDuoError, ConnectionError):
    """NATS cannot be reached or refused us (names the server and the first cause, never a credential)."""


class ModelError(LlamaDuoError, RuntimeError):
    """A model that cannot be found, built or run here (names the model and what to do)."""
