"""Reading invoices: which template family a text was written in, and the fields it states.

Regexes are built from the templates themselves; texts outside them fall back to a looser, label-based
extraction.
"""

from __future__ import annotations

import re
import string
from typing import Any

from llamaduo.tasks.invoice.vocabulary import (
    AMOUNT_STYLES,
    ASKS,
    CURRENCIES,
    DATE_STYLES,
    FAMILIES,
    MONTHS,
    NO_DECIMALS,
    NUMBER_RE,
    SYMBOLS,
    Style,
    format_amount,
    format_date,
    parse_amount,
    parse_date,
)

_MONTH_ALT = "|".join(MONTHS)
_SHORT_ALT = "|".join(m[:3] for m in MONTHS)
_DATE_PATTERNS = {
    "iso": r"\d{4}-\d{2}-\d{2}",
    "dots": r"\d{2}\.\d{2}\.\d{4}",
    "long_us": rf"(?:{_MONTH_ALT}) \d{{1,2}}, \d{{4}}",
    "long_eu": rf"\d{{1,2}} (?:{_MONTH_ALT}) \d{{4}}",
    "short": rf"\d{{1,2}} (?:{_SHORT_ALT}) \d{{4}}",
}
DATE_RE = "(?:" + "|".join(_DATE_PATTERNS.values()) + ")"
_SYM = "[" + "".join(SYMBOLS.values()) + "]"
_CODE = "(?:" + "|".join(CURRENCIES) + ")"
AMOUNT_RE = rf"(?:{_SYM} ?(?:{NUMBER_RE})|{_CODE} (?:{NUMBER_RE})|(?:{NUMBER_RE}) ?(?:{_CODE}|{_SYM}))"
_FIELD_RES = {
    "vendor": r"(?P<vendor>[A-Z][^|;:\n]*?)",
    "num": r"(?P<num>[A-Z0-9][A-Z0-9/-]*)",
    "date": rf"(?P<date>{DATE_RE})",
    "due_date": rf"(?P<due_date>{DATE_RE})",
    "amount": rf"(?P<amount>{AMOUNT_RE})",
}


def _template_regex(template: str, due_clause: str | None) -> str:
    parts: list[str] = []
    for literal, field, _, _ in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if field == "due":
            parts.append("(?:" + _template_regex(due_clause or "", None) + ")?")
        elif field:
            parts.append(_FIELD_RES[field])
    return "".join(parts)


_FAMILY_RES = {name: re.compile(_template_regex(body, due)) for name, (body, due) in FAMILIES.items()}


def _body(instruction: str) -> str:
    """The invoice text without the trailing extraction ask."""
    text = instruction.strip()
    head, sep, tail = text.rpartition("\n")
    if sep and re.search(r"\bjson\b", tail, re.IGNORECASE):
        return head.strip()
    return text


def match_family(instruction: str) -> tuple[str, re.Match[str]] | None:
    """The template family the instruction was written in, with the regex match; ``None`` if none fits."""
    body = _body(instruction)
    for name, regex in _FAMILY_RES.items():
        match = regex.fullmatch(body)
        if match:
            return name, match
    return None


def style_of(instruction: str) -> Style | None:
    """How ``instruction`` is written (family, currency, date and amount formats, ask); ``None`` when it is
    not in one of the task's templates and styles (a format is recognised by writing the parsed value back)."""
    found = match_family(instruction)
    ask = instruction.strip().rpartition("\n")[2].strip()
    if not found or ask not in ASKS:
        return None
    groups = found[1].groupdict()
    written = [groups["date"], *([groups["due_date"]] if groups["due_date"] else [])]
    dates = [parse_date(text) for text in written]
    amount = parse_amount(groups["amount"])
    if None in dates or amount is None:
        return None
    date_style = next((s for s in DATE_STYLES  # the style that writes both dates back ("May" is long and short)
                       if [format_date(d, s) for d in dates if d] == written), None)
    amount_style = next(((s, t) for s in AMOUNT_STYLES for t in (True, False)
                         if format_amount(amount[0], amount[1], s, t) == groups["amount"]), None)
    if date_style is None or amount_style is None:
        return None
    return Style(found[0], amount[1], date_style, amount_style[0], amount_style[1], bool(groups["due_date"]), ask)


_VENDOR_END = r"(?=\s*(?:[|;:,(\n]|\.\s|\.$|\s(?:dated|invoice|has|on|for|issued|billed|sent)\b))"
_LOOSE_VENDOR_RES = [
    re.compile(r"(?:\b[Ff]rom|\b(?:Vendor|Supplier|Seller):)\s+([A-Z][^|;:,(\n]*?)" + _VENDOR_END),
    re.compile(r"^(?:Fwd|Re|Fw):\s+([A-Z][^|;:,\n]*?)\s+(?i:invoice|bill)\b"),
    re.compile(r"\|\s*([A-Z][^|:\d]*?)\s*\|"),
    re.compile(r"^([A-Z][^|;:,\n]*?)\s+(?:billed|invoiced|sent|issued)\b"),
]


def _loose_fields(body: str) -> dict[str, str | None]:
    """Best-effort label-based extraction for texts outside the known templates."""
    fields: dict[str, str | None] = {
        "vendor": None,
        "num": None,
        "date": None,
        "due_date": None,
        "amount": None,
    }
    for pattern in _LOOSE_VENDOR_RES:
        vendor = pattern.search(body)
        if vendor:
            fields["vendor"] = vendor.group(1).strip()
            break
    num = re.search(
        r"(?i:invoice|inv\.?|bill|ref\.?)\s*(?i:no\.|number|#|:)?\s*#?\s*([A-Z0-9][A-Z0-9/-]*\d[A-Z0-9/-]*)",
        body,
    )
    if num:
        fields["num"] = num.group(1)
    due = re.search(rf"(?:due|payable by|pay by)\D{{0,12}}?({DATE_RE})", body, re.IGNORECASE)
    if due:
        fields["due_date"] = due.group(1)
    dates = [m.group(0) for m in re.finditer(DATE_RE, body) if not due or m.start() != due.start(1)]
    if dates:
        fields["date"] = dates[0]
    amount = re.search(AMOUNT_RE, body)
    if amount:
        fields["amount"] = amount.group(0)
    return fields


def _answer_from(groups: dict[str, str | None]) -> dict[str, Any]:
    date = parse_date(groups["date"]) if groups.get("date") else None
    due = parse_date(groups["due_date"]) if groups.get("due_date") else None
    amount = parse_amount(groups["amount"]) if groups.get("amount") else None
    total: float | int | None = None
    currency = None
    if amount:
        total, currency = amount
        if currency in NO_DECIMALS and float(total).is_integer():
            total = int(total)
    vendor = groups.get("vendor")
    return {
        "vendor": vendor.strip() if vendor else None,
        "invoice_number": groups.get("num"),
        "date": date.isoformat() if date else None,
        "due_date": due.isoformat() if due else None,
        "total": total,
        "currency": currency,
    }


def extract_loose(instruction: str) -> dict[str, Any]:
    """Label-based extraction only (what :func:`extract` falls back to outside the known templates)."""
    return _answer_from(_loose_fields(_body(instruction)))


def extract(instruction: str) -> dict[str, Any]:
    """Parse an instruction into the answer mapping (fields it cannot find are ``None``)."""
    found = match_family(instruction)
    if found:
        return _answer_from(found[1].groupdict())
    return extract_loose(instruction)
