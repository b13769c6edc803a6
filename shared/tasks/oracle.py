"""Task oracles: the offline stand-in for a service LLM on tasks that have a ground truth.

A task oracle is any object with ``propose`` and ``answer`` (and optionally ``score``). A spec names it
as ``task.oracle: "your_module:your_oracle"``; the operator makes it loadable by installing it as a
``llamaduo.oracles`` entry point or allowing it in ``LLAMADUO_ALLOWED_PLUGINS`` (see docs/oracle.md and
:mod:`llamaduo.tasks.plugins`); nothing in LlamaDuo needs to change to use your own.

The ``simulated`` provider uses the oracle as a perfect teacher: it proposes new instructions like the
given seeds and answers any instruction; as a judge it scores a candidate against the reference.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

from llamaduo.data.examples import Example
from llamaduo.errors import SpecError
from llamaduo.tasks.plugins import ORACLES, load_trusted

if TYPE_CHECKING:
    from llamaduo.settings import Settings


@runtime_checkable
class TaskOracle(Protocol):
    """What a task oracle provides. Both methods must be deterministic for a given ``seed``."""

    name: str

    def propose(self, seeds: list[Example], n: int, seed: int) -> list[str]:
        """Return ``n`` new instructions in the style of ``seeds``."""
        ...

    def answer(self, instruction: str) -> str:
        """Return the correct response to ``instruction``."""
        ...


@runtime_checkable
class ScoringOracle(TaskOracle, Protocol):
    """An oracle that also knows how right a candidate is (paper metrics, 1-100 each)."""

    def score(self, instruction: str, reference: str, candidate: str) -> tuple[float, float]:
        """Return ``(similarity, precision)``, each in 1..100."""
        ...


class OracleError(SpecError):
    """A ``task.oracle`` that cannot be loaded or lacks the oracle methods."""


def load_oracle(ref: str, settings: Settings | None = None) -> TaskOracle:
    """The oracle ``ref`` names (an installed ``llamaduo.oracles`` entry point, by name or ``module:attr``, or a
    ref ``LLAMADUO_ALLOWED_PLUGINS`` allows); called when it is a class or factory.

    Raise :class:`OracleError` naming ``task.oracle`` when it is not trusted (before importing anything) or is
    unusable.
    """
    obj = load_trusted(ref, f"task.oracle {ref!r}", ORACLES, OracleError, settings)
    if isinstance(obj, type) or (callable(obj) and not isinstance(obj, TaskOracle)):
        try:
            obj = obj()
        except TypeError as err:
            raise OracleError(f"task.oracle {ref!r}: calling it with no arguments failed: {err}") from None
    if not isinstance(obj, TaskOracle):
        raise OracleError(f"task.oracle {ref!r}: object has no propose(seeds, n, seed) and answer(instruction)")
    return obj
