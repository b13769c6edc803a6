"""Writing invoices: random ground truths and their texts in the task's template families and styles."""

from __future__ import annotations

import datetime as dt
import random

from llamaduo.tasks.invoice.vocabulary import (
    AMOUNT_STYLES,
    ASKS,
    CURRENCIES,
    DATE_STYLES,
    FAMILIES,
    NO_DECIMALS,
    Invoice,
    Style,
    format_amount,
    format_date,
)

# fmt: off
_VENDOR_NAMES = [
    "Acme", "Northwind", "Bluepeak", "Globex", "Initech", "Vandelay", "Contoso", "Fabrikam", "Tailspin",
    "Litware", "Proseware", "Alpine", "Coho", "Lucerne", "Wingtip", "Woodgrove", "Trey", "Blue Yonder",
    "Humongous", "Wide World", "Southridge", "Redwood", "Silverline", "Orion", "Keystone", "Harbor",
    "Meridian", "Nordlicht", "Sundance", "Greenfield",
]
_VENDOR_TRADES = [
    "Logistics", "Software", "Supplies", "Consulting", "Print", "Energy", "Foods", "Systems", "Media",
    "Labs", "Office", "Freight", "Design", "Hardware", "Cleaning",
]
_VENDOR_FORMS = ["GmbH", "Ltd", "LLC", "Inc", "AG", "BV", "SAS", "AB", "Oy", "SpA", "Co"]
# fmt: on


def random_vendor(rng: random.Random) -> str:
    """A plausible company name."""
    name = rng.choice(_VENDOR_NAMES)
    if rng.random() < 0.7:
        name += " " + rng.choice(_VENDOR_TRADES)
    return f"{name} {rng.choice(_VENDOR_FORMS)}"


def random_invoice_number(rng: random.Random, year: int) -> str:
    """An invoice number in one of several common numbering schemes."""
    n = rng.randint(1, 99999)
    return rng.choice(
        [
            f"INV-{year}-{n % 10000:04d}",
            f"{rng.choice('ABCDFK')}{n:05d}",
            f"{year}/{n % 1000:03d}",
            f"RE-{n:06d}",
            f"F{year}-{n % 10000:04d}",
            f"{n + 100000}",
        ]
    )


def random_invoice(rng: random.Random, currencies: list[str] | None = None, with_due: bool | None = None) -> Invoice:
    """A random ground truth: dates in 2023-2025, totals from 20 to 20,000 (JPY: 2,000 to 2,000,000); a due
    date in 60% of them unless ``with_due`` says."""
    date = dt.date(2023, 1, 1) + dt.timedelta(days=rng.randrange(3 * 365))
    if with_due is None:
        with_due = rng.random() < 0.6
    due = date + dt.timedelta(days=rng.choice([7, 14, 30, 45, 60])) if with_due else None
    currency = rng.choice(currencies or list(CURRENCIES))
    total = float(rng.randint(2000, 2000000)) if currency in NO_DECIMALS else round(rng.uniform(20, 20000), 2)
    return Invoice(
        vendor=random_vendor(rng),
        invoice_number=random_invoice_number(rng, date.year),
        date=date,
        due_date=due,
        total=total,
        currency=currency,
    )


def render(invoice: Invoice, rng: random.Random, family: str | None = None, style: Style | None = None) -> str:
    """Write ``invoice`` as an instruction: a text in one template family plus an extraction ask.

    ``style`` fixes the family and the formats (a seed's, see :func:`~llamaduo.tasks.invoice.parsing.style_of`);
    without it each is drawn at random (``family`` fixes the family only).
    """
    if style is not None:
        family = style.family
    family = family or rng.choice(sorted(FAMILIES))
    body, due_clause = FAMILIES[family]
    date_style = style.date_style if style else rng.choice(DATE_STYLES)
    amount_style = style.amount_style if style else rng.choice(AMOUNT_STYLES)
    thousands = style.thousands if style else rng.random() < 0.6
    amount = format_amount(invoice.total, invoice.currency, amount_style, thousands)
    due = due_clause.format(due_date=format_date(invoice.due_date, date_style)) if invoice.due_date else ""
    text = body.format(
        vendor=invoice.vendor,
        num=invoice.invoice_number,
        date=format_date(invoice.date, date_style),
        amount=amount,
        due=due,
    )
    return f"{text}\n{style.ask if style else rng.choice(ASKS)}"


def make_item(rng: random.Random) -> tuple[str, Invoice]:
    """One random ``(instruction, ground truth)`` pair: any family, currency and format."""
    invoice = random_invoice(rng)
    return render(invoice, rng), invoice


def make_item_like(rng: random.Random, style: Style) -> tuple[str, Invoice]:
    """One random ``(instruction, ground truth)`` pair written in ``style``: new values in the same template,
    currency and formats, with a due date when the style states one."""
    invoice = random_invoice(rng, [style.currency], style.with_due)
    return render(invoice, rng, style=style), invoice
