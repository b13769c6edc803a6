"""Invoice field extraction: the demo task a business would run on a service LLM today.

Each instruction is one short invoice text or e-mail (vendor, invoice number, issue date, total with
currency, sometimes a due date) in one of several template families, date styles and amount styles,
followed by an ask to extract the fields as JSON. The answer is compact JSON with a fixed key order::

    {"vendor": "Acme Logistics GmbH", "invoice_number": "INV-2024-0042", "date": "2024-03-05",
     "due_date": null, "total": 1234.5, "currency": "EUR"}

The oracle answers by *parsing* the text (regexes built from its own templates, then a looser
label-based fallback), so it answers any instruction in the task's style, not only generated ones.

``python -m llamaduo.tasks.invoice`` writes ``shared/tasks/data/invoice.jsonl`` (fixed seed).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamaduo.data.examples import Example, example_id
from llamaduo.data.scoring import score_answer

DEFAULT_SEED = 2408
DATA_PATH = Path(__file__).parent / "data" / "invoice.jsonl"
FIELDS = ("vendor", "invoice_number", "date", "due_date", "total", "currency")

# ------------------------------------------------------------------------------------------ vocabulary

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

CURRENCIES = ("USD", "EUR", "GBP", "CHF", "JPY", "CAD", "SEK")
_SYMBOLS = {"USD": "$", "EUR": "€", "GBP": "£", "JPY": "¥"}
_SYMBOL_TO_CODE = {v: k for k, v in _SYMBOLS.items()}
_NO_DECIMALS = {"JPY"}

_MONTHS = [
    "January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
    "November", "December",
]
# fmt: on
_MONTH_NUMBER = {m.lower(): i + 1 for i, m in enumerate(_MONTHS)} | {
    m[:3].lower(): i + 1 for i, m in enumerate(_MONTHS)
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

# ------------------------------------------------------------------------------------------ regexes

_MONTH_ALT = "|".join(_MONTHS)
_SHORT_ALT = "|".join(m[:3] for m in _MONTHS)
_DATE_PATTERNS = {
    "iso": r"\d{4}-\d{2}-\d{2}",
    "dots": r"\d{2}\.\d{2}\.\d{4}",
    "long_us": rf"(?:{_MONTH_ALT}) \d{{1,2}}, \d{{4}}",
    "long_eu": rf"\d{{1,2}} (?:{_MONTH_ALT}) \d{{4}}",
    "short": rf"\d{{1,2}} (?:{_SHORT_ALT}) \d{{4}}",
}
DATE_RE = "(?:" + "|".join(_DATE_PATTERNS.values()) + ")"
_SYM = "[" + "".join(_SYMBOLS.values()) + "]"
_CODE = "(?:" + "|".join(CURRENCIES) + ")"
_NUM = r"\d[\d.,]*\d|\d"
AMOUNT_RE = rf"(?:{_SYM} ?(?:{_NUM})|{_CODE} (?:{_NUM})|(?:{_NUM}) ?(?:{_CODE}|{_SYM}))"
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


# ------------------------------------------------------------------------------------------ values


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
        total: float | int = int(self.total) if self.currency in _NO_DECIMALS else round(self.total, 2)
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


def format_date(value: dt.date, style: str) -> str:
    """Render a date in one of :data:`DATE_STYLES` (locale-independent)."""
    month = _MONTHS[value.month - 1]
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
            month = _MONTH_NUMBER.get(m[1].lower())
            return dt.date(int(m[3]), month, int(m[2])) if month else None
        if m := re.fullmatch(r"(\d{1,2}) ([A-Za-z]+) (\d{4})", text):
            month = _MONTH_NUMBER.get(m[2].lower())
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
    decimals = currency not in _NO_DECIMALS
    whole, _, cents = f"{total:.2f}".partition(".")
    if style == "european":
        number = _group(whole, "." if thousands else "") + ("," + cents if decimals else "")
        return f"{number} {_SYMBOLS.get(currency, currency)}"
    number = _group(whole, "," if thousands else "") + ("." + cents if decimals else "")
    if style == "symbol" and currency in _SYMBOLS:
        return f"{_SYMBOLS[currency]}{number}"
    if style == "code_after":
        return f"{number} {currency}"
    return f"{currency} {number}"


def parse_amount(text: str) -> tuple[float, str] | None:
    """Parse ``"EUR 1.234,50"``-like text into ``(total, currency code)``; ``None`` if it is not one."""
    text = text.strip()
    code = next((c for c in CURRENCIES if c in text), None)
    if code is None:
        code = next((c for s, c in _SYMBOL_TO_CODE.items() if s in text), None)
    number = re.search(_NUM, text)
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


# ------------------------------------------------------------------------------------------ generation


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


def random_invoice(rng: random.Random, currencies: list[str] | None = None) -> Invoice:
    """A random ground truth: dates in 2023-2025, totals from 20 to 20,000 (JPY: 2,000 to 2,000,000)."""
    date = dt.date(2023, 1, 1) + dt.timedelta(days=rng.randrange(3 * 365))
    due = date + dt.timedelta(days=rng.choice([7, 14, 30, 45, 60])) if rng.random() < 0.6 else None
    currency = rng.choice(currencies or list(CURRENCIES))
    total = float(rng.randint(2000, 2000000)) if currency in _NO_DECIMALS else round(rng.uniform(20, 20000), 2)
    return Invoice(
        vendor=random_vendor(rng),
        invoice_number=random_invoice_number(rng, date.year),
        date=date,
        due_date=due,
        total=total,
        currency=currency,
    )


def render(invoice: Invoice, rng: random.Random, family: str | None = None) -> str:
    """Write ``invoice`` as an instruction: a text in one template family plus an extraction ask."""
    family = family or rng.choice(sorted(FAMILIES))
    body, due_clause = FAMILIES[family]
    date_style = rng.choice(DATE_STYLES)
    amount = format_amount(invoice.total, invoice.currency, rng.choice(AMOUNT_STYLES), rng.random() < 0.6)
    due = due_clause.format(due_date=format_date(invoice.due_date, date_style)) if invoice.due_date else ""
    text = body.format(
        vendor=invoice.vendor,
        num=invoice.invoice_number,
        date=format_date(invoice.date, date_style),
        amount=amount,
        due=due,
    )
    return f"{text}\n{rng.choice(ASKS)}"


def make_item(
    rng: random.Random, families: list[str] | None = None, currencies: list[str] | None = None
) -> tuple[str, Invoice]:
    """One random ``(instruction, ground truth)`` pair, optionally limited to some families/currencies."""
    invoice = random_invoice(rng, currencies)
    family = rng.choice(families) if families else None
    return render(invoice, rng, family), invoice


# ------------------------------------------------------------------------------------------ parsing


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
        if currency in _NO_DECIMALS and float(total).is_integer():
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


# ------------------------------------------------------------------------------------------ oracle


class InvoiceOracle:
    """Deterministic oracle for invoice extraction (see :class:`llamaduo.tasks.oracle.ScoringOracle`)."""

    name = "invoice-extraction"

    def propose(self, seeds: list[Example], n: int, seed: int) -> list[str]:
        """``n`` new invoice instructions reusing the seeds' template families and currencies.

        Seeds outside the known templates add nothing; with no usable seed every family and currency
        may appear. Deterministic for a given ``seed`` (and seeds).
        """
        rng = random.Random(seed)
        families: set[str] = set()
        currencies: set[str] = set()
        for example in seeds:
            found = match_family(example.instruction)
            if found:
                families.add(found[0])
                amount = parse_amount(found[1]["amount"])
                if amount:
                    currencies.add(amount[1])
        family_list = sorted(families) or None
        currency_list = sorted(currencies) or None
        return [make_item(rng, family_list, currency_list)[0] for _ in range(n)]

    def answer(self, instruction: str) -> str:
        """The correct JSON answer, by parsing the instruction's text."""
        return json.dumps(extract(instruction), ensure_ascii=False)

    def score(self, instruction: str, reference: str, candidate: str) -> tuple[float, float]:
        """Field-level ``(similarity, precision)`` in 1..100 (see :func:`llamaduo.data.scoring.score_answer`)."""
        return score_answer(reference, candidate)


oracle = InvoiceOracle()


def make_dataset(n_train: int = 300, n_test: int = 50, seed: int = DEFAULT_SEED) -> list[dict[str, str]]:
    """Coverage rows ``{id, instruction, response, split}``; no instruction is in both splits."""
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    for split, n in (("test", n_test), ("train", n_train)):
        count = 0
        while count < n:
            text, invoice = make_item(rng)
            if text in seen:
                continue
            seen.add(text)
            rows.append(
                {
                    "id": example_id(text, "inv"),
                    "instruction": text,
                    "response": invoice.to_json(),
                    "split": split,
                }
            )
            count += 1
    return rows


def dataset_jsonl(rows: list[dict[str, str]]) -> str:
    """The JSON-lines text of ``rows`` exactly as written to :data:`DATA_PATH`."""
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def main(argv: list[str] | None = None) -> None:
    """Write the coverage dataset (default: ``shared/tasks/data/invoice.jsonl``, fixed seed)."""
    parser = argparse.ArgumentParser(
        prog="python -m llamaduo.tasks.invoice", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", type=Path, default=DATA_PATH)
    parser.add_argument("--train", type=int, default=300)
    parser.add_argument("--test", type=int, default=50)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args(argv)
    rows = make_dataset(args.train, args.test, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(dataset_jsonl(rows), encoding="utf-8")
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
