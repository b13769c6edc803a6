"""What service-LLM calls cost: US dollars per million input / output tokens.

Where a price comes from, first match wins:

1. the spec (``price_input_per_mtok`` / ``price_output_per_mtok``; either may be given alone);
2. :data:`PRICE_TABLE`, a small built-in table of well-known models, written on :data:`PRICES_AS_OF`
   (list prices, standard tier, no batch or cache discounts, the lower tier of tiered prices). Prices
   change: set the spec fields to be exact;
3. otherwise the price is *unknown* (``source`` 'unknown', counted as 0, with a note logged once per
   model); also when the spec gives one side and the table has no entry for the other. A budget with
   ``max_cost`` refuses calls at an unknown price instead of counting them free (:func:`missing_price` says
   why, for the preflight of ``llamaduo validate`` and for the budget at run time).

The ``simulated`` and ``local`` providers (:data:`FREE_PROVIDERS`) cost nothing unless the spec prices them.

Calls through the OpenAI Batch API (``ProviderSpec.batch_api``) cost :data:`BATCH_DISCOUNT` of that price
(spec prices are synchronous prices too): ``price_for(model, spec, batch=True)`` or :meth:`Price.batch`.

Model names match exactly, then by the longest table entry that prefixes the name at a ``-`` boundary, so
dated snapshots (``gpt-4o-mini-2024-07-18``) and previews (``gemini-2.5-flash-preview-05-20``) find their
family; a ``models/`` prefix (Gemini) is ignored.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from llamaduo.contracts.spec import ProviderSpec

log = logging.getLogger(__name__)

#: When :data:`PRICE_TABLE` was written (check current list prices before relying on it).
PRICES_AS_OF = "2025-08"

#: Share of the synchronous price paid for a call made through the OpenAI Batch API (half price).
BATCH_DISCOUNT = 0.5

#: Providers whose calls cost nothing when the spec sets no price (an oracle, a model on this machine).
FREE_PROVIDERS = ("simulated", "local")

#: model family -> (USD per 1M input tokens, USD per 1M output tokens), as of :data:`PRICES_AS_OF`.
PRICE_TABLE: dict[str, tuple[float, float]] = {
    # OpenAI
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-5": (1.25, 10.00),
    "gpt-5-mini": (0.25, 2.00),
    "gpt-5-nano": (0.05, 0.40),
    "o3": (2.00, 8.00),
    "o3-mini": (1.10, 4.40),
    "o4-mini": (1.10, 4.40),
    "gpt-4-turbo": (10.00, 30.00),
    "gpt-3.5-turbo": (0.50, 1.50),
    # Google Gemini (Gemini API, prompts up to 200k tokens; thinking tokens bill as output)
    "gemini-2.5-pro": (1.25, 10.00),
    "gemini-2.5-flash": (0.30, 2.50),
    "gemini-2.5-flash-lite": (0.10, 0.40),
    "gemini-2.0-flash": (0.10, 0.40),
    "gemini-2.0-flash-lite": (0.075, 0.30),
    "gemini-1.5-pro": (1.25, 5.00),
    "gemini-1.5-flash": (0.075, 0.30),
}


@dataclass(frozen=True)
class Price:
    """Price of a model in USD per million tokens and where it came from."""

    input_per_mtok: float
    output_per_mtok: float
    source: Literal["spec", "table", "spec+table", "unknown"]
    note: str = ""

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        """USD cost of one call with the given token counts."""
        return (max(0, input_tokens) * self.input_per_mtok + max(0, output_tokens) * self.output_per_mtok) / 1e6

    def batch(self) -> Price:
        """This price for calls made through the Batch API (:data:`BATCH_DISCOUNT` of it)."""
        note = f"Batch API: {BATCH_DISCOUNT:.0%} of the synchronous price"
        return Price(
            self.input_per_mtok * BATCH_DISCOUNT,
            self.output_per_mtok * BATCH_DISCOUNT,
            self.source,
            f"{self.note}; {note}" if self.note else note,
        )


_warned: set[str] = set()


def lookup(model: str) -> tuple[str, tuple[float, float]] | None:
    """The table entry ``(family, (input, output))`` for ``model``, or None."""
    name = model.strip().lower()
    if name.startswith("models/"):
        name = name[len("models/") :]
    if name in PRICE_TABLE:
        return name, PRICE_TABLE[name]
    best: str | None = None
    for family in PRICE_TABLE:
        if name.startswith(family + "-") and (best is None or len(family) > len(best)):
            best = family
    return (best, PRICE_TABLE[best]) if best else None


def price_for(model: str, spec: ProviderSpec | None = None, *, batch: bool = False) -> Price:
    """The price of ``model``: the spec's fields, else the table, else 0 with a note; with ``batch``, the
    Batch API price (see :meth:`Price.batch`)."""
    price = _sync_price(model, spec)
    return price.batch() if batch else price


def _sync_price(model: str, spec: ProviderSpec | None) -> Price:
    spec_in = spec.price_input_per_mtok if spec is not None else None
    spec_out = spec.price_output_per_mtok if spec is not None else None
    if spec_in is not None and spec_out is not None:
        return Price(spec_in, spec_out, "spec")
    entry = lookup(model)
    if entry is not None:
        family, (table_in, table_out) = entry
        if spec_in is None and spec_out is None:
            return Price(table_in, table_out, "table", f"list price of {family} as of {PRICES_AS_OF}")
        return Price(
            spec_in if spec_in is not None else table_in,
            spec_out if spec_out is not None else table_out,
            "spec+table",
            f"missing side from the list price of {family} as of {PRICES_AS_OF}",
        )
    note = (
        f"no price known for model {model!r}: its cost is counted as 0 and a budget.max_cost refuses its calls "
        "(set price_input_per_mtok and price_output_per_mtok in the spec)"
    )
    if spec_in is not None or spec_out is not None:
        return Price(spec_in or 0.0, spec_out or 0.0, "unknown", note)
    if model not in _warned:
        _warned.add(model)
        log.warning("%s", note)
    return Price(0.0, 0.0, "unknown", note)


def cost(model: str, input_tokens: int, output_tokens: int, spec: ProviderSpec | None = None) -> float:
    """USD cost of one call of ``model`` with the given token counts (see :func:`price_for`)."""
    return price_for(model, spec).cost(input_tokens, output_tokens)


def missing_price(spec: ProviderSpec, where: str = "teacher") -> str | None:
    """Why the cost of ``spec``'s calls cannot be counted (``where``: the spec field, for the message), or
    None when it can: the spec or :data:`PRICE_TABLE` prices both sides, or the provider is free."""
    priced = spec.price_input_per_mtok is not None or spec.price_output_per_mtok is not None
    if spec.provider in FREE_PROVIDERS and not priced:
        return None
    if spec.price_input_per_mtok is not None and spec.price_output_per_mtok is not None:
        return None
    if lookup(spec.model or "") is not None:
        return None
    given = {"input": spec.price_input_per_mtok, "output": spec.price_output_per_mtok}
    sides = " and ".join(f"{where}.price_{side}_per_mtok" for side, value in given.items() if value is None)
    return (f"{where}.model {spec.model!r} has no price in the built-in table (as of {PRICES_AS_OF}), so its cost "
            f"cannot be counted against budget.max_cost: set {sides} (USD per million tokens)")
