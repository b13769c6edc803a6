"""The invoice task's vocabulary and value formats: currencies, months, template families and asks; the
:class:`Invoice` ground truth; dates and amounts written and read in every style the task uses."""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass
from typing import Any

FIELDS = ("vendor", "invoice_number", "date", "due_date", "total", "currency")

# fmt: off
CURRENCIES = ("USD", "EUR", "GBP", "CHF", "JPY", "CAD", "SEK")
SYMBOLS = {"USD": "$", "EUR": "€", "GBP": "£", "JPY": "¥"}
SYMBOL_TO_CODE = {v: k for k, v in SYMBOLS.items()}
NO_DECIMALS = {"JPY"}

MONTHS = [
    "January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
    "November", "December",
]
# fmt: on
MONTH_NUMBER = {m.lower(): i + 1 for i, m in enumerate(MONTHS)} | {
    m[:3].lower(): i + 1 for i, m in enumerate(MONTHS)
}
DATE_STYLES = ("iso", "dots", "long_us", "long_eu", "short")
AMOUNT_STYLES = ("code_before", "code_after", "symbol", "european")

#: Template families: (body with ``{due}`` where the optional due clause goes, the due clause).
FAMILIES: dict[str, tuple[str, str]] = {
    "email": (
        "Hi, attached is invoice {num} from {vendor} dated {date}. Amount due: {amount}{due}. Thanks!",
        ", payable by {due_date}",
    ),
    "header": ("INVOICE {num} | {vendor} | Date: {date}{due} | Total: {amount}", " | Due: {due_date}"),
    "reminder": (
        "Reminder from {vendor}: invoice no. {num} issued on {date} for {amount} is still open{due}.",
        " (due {due_date})",
    ),
    "billed": ("{vendor} billed us {amount} on {date}, ref. {num}{due}.", "; payment due {due_date}"),
    "fields": (
        "Vendor: {vendor}; Invoice: {num}; Issued: {date}; Amount: {amount}{due}",
        "; Due date: {due_date}",
    ),
    "forward": (
        "Fwd: {vendor} invoice {num}. Invoice date {date}{due}. Please pay {amount}.",
        ", due {due_date}",
    ),
}
ASKS = (
    "Extract vendor, invoice_number, date, due_date, total and currency as JSON.",
    "Return the invoice fields as JSON.",
    "Extract the invoice data as JSON.",
)

#: A number as amounts write it (digits with "." or "," separators).
NUMBER_RE = r"\d[\d.,]*\d|\d"


@dataclass(frozen=True)
class Invoice:
    """The ground truth of one invoice text."""

    vendor: str
    invoice_number: str
    date: dt.date
    due_date: dt.date | None
    total: float
    currency: str

    def to_dict(self) -> dict[str, Any]:
        """The answer as a mapping with the fixed key order."""
        total: float | int = int(self.total) if self.currency in NO_DECIMALS else round(self.total, 2)
        return {
            "vendor": self.vendor,
            "invoice_number": self.invoice_number,
            "date": self.date.isoformat(),
            "due_date": self.due_date.isoformat() if self.due_date else None,
            "total": total,
            "currency": self.currency,
        }

    def to_json(self) -> str:
        """The answer text: one-line JSON, fixed key order."""
        return json.dumps(self.to_dict(), ensure_ascii=False)


@dataclass(frozen=True)
class Style:
    """How one invoice text is written, apart from its values: template family, currency, date and amount
    formats, whether it states a due date, and the extraction ask."""

    family: str
    currency: str
    date_style: str
    amount_style: str
    thousands: bool
    with_due: bool
    ask: str


def format_date(value: dt.date, style: str) -> str:
    """Render a date in one of :data:`DATE_STYLES` (locale-independent)."""
    month = MONTHS[value.month - 1]
    return {
        "iso": value.isoformat(),
        "dots": f"{value.day:02d}.{value.month:02d}.{value.year}",
        "long_us": f"{month} {value.day}, {value.year}",
        "long_eu": f"{value.day} {month} {value.year}",
        "short": f"{value.day} {month[:3]} {value.year}",
    }[style]


def parse_date(text: str) -> dt.date | None:
    """Parse a date in any of :data:`DATE_STYLES`; ``None`` if it is not one."""
    text = text.strip()
    try:
        if m := re.fullmatch(r"(\d{4})-(\d{2})-(\d{2})", text):
            return dt.date(int(m[1]), int(m[2]), int(m[3]))
        if m := re.fullmatch(r"(\d{2})\.(\d{2})\.(\d{4})", text):
            return dt.date(int(m[3]), int(m[2]), int(m[1]))
        if m := re.fullmatch(r"([A-Za-z]+) (\d{1,2}), (\d{4})", text):
            month = MONTH_NUMBER.get(m[1].lower())
            return dt.date(int(m[3]), month, int(m[2])) if month else None
        if m := re.fullmatch(r"(\d{1,2}) ([A-Za-z]+) (\d{4})", text):
            month = MONTH_NUMBER.get(m[2].lower())
            return dt.date(int(m[3]), month, int(m[1])) if month else None
    except ValueError:
        return None
    return None


def _group(digits: str, sep: str) -> str:
    out = ""
    while len(digits) > 3:
        out = sep + digits[-3:] + out
        digits = digits[:-3]
    return digits + out


def format_amount(total: float, currency: str, style: str, thousands: bool) -> str:
    """Render an amount with its currency in one of :data:`AMOUNT_STYLES`."""
    decimals = currency not in NO_DECIMALS
    whole, _, cents = f"{total:.2f}".partition(".")
    if style == "european":
        number = _group(whole, "." if thousands else "") + ("," + cents if decimals else "")
        return f"{number} {SYMBOLS.get(currency, currency)}"
    number = _group(whole, "," if thousands else "") + ("." + cents if decimals else "")
    if style == "symbol" and currency in SYMBOLS:
        return f"{SYMBOLS[currency]}{number}"
    if style == "code_after":
        return f"{number} {currency}"
    return f"{currency} {number}"


def parse_amount(text: str) -> tuple[float, str] | None:
    """Parse ``"EUR 1.234,50"``-like text into ``(total, currency code)``; ``None`` if it is not one."""
    text = text.strip()
    code = next((c for c in CURRENCIES if c in text), None)
    if code is None:
        code = next((c for s, c in SYMBOL_TO_CODE.items() if s in text), None)
    number = re.search(NUMBER_RE, text)
    if code is None or number is None:
        return None
    digits = number.group(0)
    if re.search(r"[.,]\d{2}$", digits):
        whole, decimals = digits[:-3], digits[-2:]
    else:
        whole, decimals = digits, "00"
    whole = re.sub(r"[.,]", "", whole)
    if not whole.isdigit():
        return None
    return round(float(f"{whole}.{decimals}"), 2), code
