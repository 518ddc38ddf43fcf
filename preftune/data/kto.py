"""KTO examples: a prompt, one completion and a binary label, from unpaired rows or from pairs.

Unpaired rows (TRL's "unpaired preference" format) have ``prompt``, ``completion`` and ``label``:
``label`` is a real boolean (true = desirable) or the number 0 / 1; strings such as "good" or
"true" are refused, since a typo would silently flip an example. An optional ``weight`` (a number from
0 to 1) weighs the example in the loss; without one, an optional ``label_prob`` (the probability that
the label is right, from 0.5 to 1, as ``preftune annotate export --format kto`` writes) gives weight
2·label_prob − 1, and rows with neither weigh 1. ``prompt`` and ``completion`` are
strings (standard format) or lists of ``{"role", "content"}`` messages (conversational format,
rendered with the tokenizer's chat template), decided by most rows, as for preference pairs.

Paired rows (``prompt`` / ``chosen`` / ``rejected``, in every format ``preftune dpo`` reads) are
accepted too: each pair gives two examples, its chosen response desirable and its rejected one
undesirable (as TRL does), both keeping the pair's row number. Any file type ``load_records``
reads works, and validation errors name the file, the row and the field.

KTO's reference point compares each prompt with another example's completion:
:func:`mismatched_completions` picks those, deterministically from a seed.
"""

from __future__ import annotations

import numbers
import random
from collections import Counter
from dataclasses import dataclass, replace

from preftune.data.columns import KTO_COLUMNS, note_unused_columns
from preftune.data.load import Records
from preftune.data.messages import check_contents, eos_id, render_pair, require_chat_template, required_field
from preftune.data.preference import (
    TokenizedPair,
    TokenizeSettings,
    check_settings,
    fit_to_length,
    tokenize_preferences,
)
from preftune.data.rows import InvalidRow, RowProblem, SkipReport, read_rows, settle_problems, type_name
from preftune.errors import ConfigError


@dataclass
class KTOExample:
    """One labelled completion as token ids; the completion ends with EOS unless it was truncated."""

    prompt_ids: list[int]
    completion_ids: list[int]
    desirable: bool
    row: int  # the source row: the two examples of one pair share it
    weight: float = 1.0  # the example's weight in the loss (the row's ``weight``, else from ``label_prob``)


def is_paired(records: Records) -> bool:
    """True when most rows are preference pairs (have ``chosen`` or ``rejected``)."""
    paired = sum("chosen" in row or "rejected" in row for row in records.rows)
    return 2 * paired > len(records.rows)


def tokenize_kto(records: Records, tokenizer, settings: TokenizeSettings,
                 skip_invalid: bool = False) -> tuple[list[KTOExample], SkipReport]:
    """Validate and tokenise every row (unpaired, or pairs split in two). The first invalid row
    raises :class:`~preftune.errors.DataError` unless ``skip_invalid``."""
    if is_paired(records):
        pairs, report = tokenize_preferences(records, tokenizer, settings, skip_invalid=skip_invalid)
        return split_pairs(pairs), report
    check_settings(settings)
    examples, problems = _tokenize_unpaired(records, tokenizer, settings)
    note_unused_columns(records, KTO_COLUMNS)
    return examples, settle_problems(records.name, len(records.rows), examples, problems, skip_invalid)


def split_pairs(pairs: list[TokenizedPair]) -> list[KTOExample]:
    """Each pair -> its chosen response (desirable) and its rejected response (undesirable)."""
    examples = []
    for pair in pairs:
        examples.append(KTOExample(pair.prompt_ids, pair.chosen_ids, True, pair.row))
        examples.append(KTOExample(pair.prompt_ids, pair.rejected_ids, False, pair.row))
    return examples


def label_counts(examples: list[KTOExample]) -> tuple[int, int]:
    """(desirable, undesirable) example counts."""
    desirable = sum(e.desirable for e in examples)
    return desirable, len(examples) - desirable


# ---------------------------------------------------------------- unpaired rows


def _tokenize_unpaired(records: Records, tokenizer,
                       settings: TokenizeSettings) -> tuple[list[KTOExample], list[RowProblem]]:
    eos = eos_id(tokenizer)
    messages = _uses_messages(records)
    if messages:
        require_chat_template(tokenizer)
    read, problems = read_rows(records, lambda row: (*_row_texts(row, messages, tokenizer), _label(row),
                                                     _weight(row)))
    texts = [(prompt, completion, (label, weight), number) for (prompt, completion, label, weight), number in read]
    # A chat template writes BOS itself; a plain prompt gets it from the tokenizer.
    prompts = _token_ids(tokenizer, [t[0] for t in texts], add_special_tokens=not messages)
    completions = _token_ids(tokenizer, [t[1] for t in texts], add_special_tokens=False)
    examples = []
    for (_, _, (label, weight), number), prompt_ids, completion_ids in zip(texts, prompts, completions):
        try:
            examples.append(fit_example(KTOExample(prompt_ids, completion_ids + [eos], label, number, weight),
                                        settings))
        except InvalidRow as invalid:
            problems.append(invalid.problem(records.name, number))
    return examples, problems


def _uses_messages(records: Records) -> bool:
    kinds = Counter(type(row.get("completion")) for row in records.rows)
    return kinds[list] > kinds[str]


def _row_texts(row: dict, messages: bool, tokenizer) -> tuple[str, str]:
    """Validate one unpaired row's prompt and completion; return their texts."""
    completion = row.get("completion")
    if isinstance(completion, (str, list)) and isinstance(completion, list) != messages:
        found = "a list of messages" if isinstance(completion, list) else "a string"
        usual = "lists of messages" if messages else "plain strings"
        raise InvalidRow("mixed formats", "completion", f"mixed formats: this row's completion is {found} but most "
                                                        f"rows use {usual}; a dataset must use one format")
    prompt, completion = required_field(row, "prompt", messages), required_field(row, "completion", messages)
    if not completion or (not messages and not completion.strip()):
        raise InvalidRow("empty response", "completion", "empty response: the completion is empty, only whitespace "
                                                         "or no messages")
    if not messages:
        return prompt, completion
    check_contents("completion", completion)
    return render_pair(tokenizer, prompt, completion, "completion")


def _token_ids(tokenizer, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=add_special_tokens, verbose=False)["input_ids"]]


def _label(row: dict) -> bool:
    value = row.get("label")
    if value is None:
        raise InvalidRow("missing field", "label", "missing field: every row needs a label, true (desirable) or "
                                                   "false (undesirable)")
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Real) and value in (0, 1):
        return bool(value)
    raise InvalidRow("bad label", "label", f"bad label: expected true/false or 1/0, found {type_name(value)} "
                                           f"({value!r})")


def _weight(row: dict) -> float:
    """The example's loss weight: ``weight``, else 2·``label_prob`` − 1, else 1."""
    for field, low in (("weight", 0.0), ("label_prob", 0.5)):
        value = row.get(field)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not low <= value <= 1:
            raise InvalidRow(f"bad {field}", field, f"bad {field}: expected a number from {low:g} to 1, found "
                                                    f"{type_name(value)} ({value!r})")
        return float(value) if field == "weight" else 2.0 * float(value) - 1.0
    return 1.0


def fit_example(example: KTOExample, settings: TokenizeSettings) -> KTOExample:
    """Apply the length limits exactly as for a pair whose two responses are this completion."""
    pair = TokenizedPair(example.prompt_ids, example.completion_ids, example.completion_ids, 1.0, 0.0, example.row)
    try:
        fitted = fit_to_length(pair, settings)
    except InvalidRow as invalid:
        if invalid.field in ("chosen", "rejected"):
            invalid.field = "completion"
            invalid.reason = invalid.reason.replace("chosen", "completion").replace("rejected", "completion")
        raise
    return replace(example, prompt_ids=fitted.prompt_ids, completion_ids=fitted.chosen_ids)


# ---------------------------------------------------------------- mismatched completions


def mismatched_completions(examples: list[KTOExample], seed: int, max_length: int) -> list[list[int]]:
    """For each example, another example's completion (cut to fit after its prompt in ``max_length``).

    The partners follow one seeded random cycle through all examples, skipping an example's pair
    sibling (same row, same prompt), so the pairing depends only on the data and the seed.
    """
    n = len(examples)
    if n < 2:
        raise ConfigError("KTO's reference point needs at least 2 examples (kto_kl pairs each prompt with "
                          "another example's completion)")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    partners = {}
    for k, i in enumerate(order):
        j = order[(k + 1) % n]
        if examples[j].row == examples[i].row and n > 2:
            j = order[(k + 2) % n]
        partners[i] = j
    return [examples[partners[i]].completion_ids[:max_length - len(e.prompt_ids)] for i, e in enumerate(examples)]
