"""Invoice field extraction: the demo task a business would run on a service LLM today.

Each instruction is one short invoice text or e-mail (vendor, invoice number, issue date, total with
currency, sometimes a due date) in one of several template families, date styles and amount styles,
followed by an ask to extract the fields as JSON. The answer is compact JSON with a fixed key order::

    {"vendor": "Acme Logistics GmbH", "invoice_number": "INV-2024-0042", "date": "2024-03-05",
     "due_date": null, "total": 1234.5, "currency": "EUR"}

The oracle answers by *parsing* the text (regexes built from its own templates, then a looser
label-based fallback), so it answers any instruction in the task's style, not only generated ones.

``python -m llamaduo.tasks.invoice`` writes ``shared/tasks/data/invoice.jsonl`` (fixed seed).

This package is the task's entry point (``llamaduo.tasks.invoice:oracle`` in a spec); its modules are
:mod:`.vocabulary` (values and their formats), :mod:`.generation` (writing texts), :mod:`.parsing` (reading
them) and :mod:`.task` (oracle, dataset, script).
"""

from llamaduo.tasks.invoice.generation import (
    make_item,
    make_item_like,
    random_invoice,
    random_invoice_number,
    random_vendor,
    render,
)
from llamaduo.tasks.invoice.parsing import AMOUNT_RE, DATE_RE, extract, extract_loose, match_family, style_of
from llamaduo.tasks.invoice.task import (
    DATA_PATH,
    DEFAULT_SEED,
    InvoiceOracle,
    dataset_jsonl,
    main,
    make_dataset,
    oracle,
)
from llamaduo.tasks.invoice.vocabulary import (
    AMOUNT_STYLES,
    ASKS,
    CURRENCIES,
    DATE_STYLES,
    FAMILIES,
    FIELDS,
    Invoice,
    Style,
    format_amount,
    format_date,
    parse_amount,
    parse_date,
)

__all__ = [
    "AMOUNT_RE", "AMOUNT_STYLES", "ASKS", "CURRENCIES", "DATA_PATH", "DATE_RE", "DATE_STYLES", "DEFAULT_SEED",
    "FAMILIES", "FIELDS", "Invoice", "InvoiceOracle", "Style", "dataset_jsonl", "extract", "extract_loose",
    "format_amount", "format_date", "main", "make_dataset", "make_item", "make_item_like", "match_family",
    "oracle", "parse_amount", "parse_date", "random_invoice", "random_invoice_number", "random_vendor", "render",
    "style_of",
]
