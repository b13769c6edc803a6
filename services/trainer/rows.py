"""Training rows as the trainer sees them, and the rule for rows longer than ``student.training.max_length``.

A row is one conversation: the prompt (system + user messages, :func:`~llamaduo.models.generation.prompt_messages`)
and the completion (the assistant message). Its length is the number of tokens of the whole conversation in the
student's chat template, end-of-turn token included: exactly the ``input_ids`` TRL's ``SFTTrainer`` trains on.

**The rule: a row longer than ``max_length`` is left out of training and counted; nothing is truncated.**
Cutting the end would cut the answer and its end-of-turn token (the student learns answers that never stop);
cutting the prompt would train the student to give the reference answer from a context that lacks what the
answer depends on, unlike the whole prompt it sees at inference and in the evaluation. A left-out row is
counted (:attr:`RowFit.too_long`; ``TrainResult.rows_too_long`` and ``train.done``'s ``rows_too_long``) and
logged with its id and length. When no row fits, :class:`RowsTooLong` (a :class:`~llamaduo.errors.SpecError`)
names the field, its value, the number of rows and the lengths to raise it to: no retry can fix that.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from llamaduo.data.examples import Example
from llamaduo.errors import SpecError
from llamaduo.models.generation import prompt_messages

log = logging.getLogger(__name__)

#: the spec field the rule is about, as error messages name it
MAX_LENGTH_FIELD = "student.training.max_length"
#: at most this many row ids are named in a message
NAMED_ROWS = 5
#: rows tokenized per ``apply_chat_template`` call
TOKENIZE_BATCH = 256


class RowsTooLong(SpecError):
    """No training row fits ``student.training.max_length``: the spec must change, retrying cannot help."""


def chat_row(example: Example, system_prompt: str) -> dict[str, list[dict[str, str]]]:
    """One conversational prompt-completion row: ``{"prompt": [system?, user], "completion": [assistant]}``."""
    return {
        "prompt": prompt_messages(example.instruction, system_prompt),
        "completion": [{"role": "assistant", "content": example.response}],
    }


def token_lengths(examples: list[Example], system_prompt: str, tokenizer: Any) -> list[int]:
    """Tokens of each row's whole conversation (prompt + completion) in ``tokenizer``'s chat template, the way
    TRL tokenizes a conversational prompt-completion row for training."""
    lengths: list[int] = []
    for start in range(0, len(examples), TOKENIZE_BATCH):
        rows = [chat_row(ex, system_prompt) for ex in examples[start : start + TOKENIZE_BATCH]]
        conversations = [row["prompt"] + row["completion"] for row in rows]
        encoded = tokenizer.apply_chat_template(conversations, tokenize=True, return_dict=True)
        lengths.extend(len(ids) for ids in encoded["input_ids"])
    return lengths


@dataclass(frozen=True)
class RowFit:
    """Which rows fit ``max_length``: ``kept`` (in their order) and ``too_long`` (``(row id, tokens)``)."""

    max_length: int
    kept: list[Example]
    too_long: list[tuple[str, int]] = field(default_factory=list)

    def summary(self) -> str:
        """One line naming the left-out rows (the first few ids with their token counts), for logs."""
        named = ", ".join(f"{rid!r} ({n} tokens)" for rid, n in self.too_long[:NAMED_ROWS])
        more = f" and {len(self.too_long) - NAMED_ROWS} more" if len(self.too_long) > NAMED_ROWS else ""
        return (f"{len(self.too_long)} of {len(self.kept) + len(self.too_long)} training rows are longer than "
                f"{MAX_LENGTH_FIELD} {self.max_length} and are left out of training: {named}{more}")


def fit_rows(examples: list[Example], system_prompt: str, tokenizer: Any, max_length: int) -> RowFit:
    """Apply the rule of this module: keep the rows of at most ``max_length`` tokens, count the others.

    Raises :class:`RowsTooLong` when ``examples`` is not empty and none of them fits.
    """
    lengths = token_lengths(examples, system_prompt, tokenizer)
    kept = [ex for ex, n in zip(examples, lengths, strict=True) if n <= max_length]
    too_long = [(ex.id, n) for ex, n in zip(examples, lengths, strict=True) if n > max_length]
    fit = RowFit(max_length=max_length, kept=kept, too_long=too_long)
    if examples and not kept:
        shortest, longest = min(lengths), max(lengths)
        named = ", ".join(repr(rid) for rid, _ in too_long[:NAMED_ROWS])
        more = ", ..." if len(too_long) > NAMED_ROWS else ""
        every = "the only training row is" if len(examples) == 1 else f"all {len(examples)} training rows are"
        raise RowsTooLong(
            f"{MAX_LENGTH_FIELD} {max_length}: {every} longer (prompt + completion in the student's chat template: "
            f"the shortest has {shortest} tokens, the longest {longest}; rows {named}{more}); raise "
            f"{MAX_LENGTH_FIELD} to at least {shortest} (to {longest} to train on every row), or shorten the "
            "instructions or the system prompt"
        )
    if too_long:
        log.warning(fit.summary(), extra={"rows_too_long": len(too_long)})
    return fit
