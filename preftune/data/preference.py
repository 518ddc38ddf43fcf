"""Preference pairs: format detection, row validation, normalisation to text and tokenisation.

Three formats are understood (the names TRL uses):

* ``standard``: ``prompt``, ``chosen`` and ``rejected`` are strings;
* ``conversational``: they are lists of ``{"role", "content"}`` messages, rendered with the
  tokenizer's chat template;
* ``implicit_prompt``: no ``prompt`` column; the prompt is what ``chosen`` and ``rejected`` share.

The prompt and each response are tokenised separately and concatenated, so the prompt ids are
always an exact prefix of both sequences (no BPE merge across the boundary).
"""

from __future__ import annotations

import math
import numbers
import os
from collections import Counter
from dataclasses import dataclass, replace

from preftune.data.columns import OPTIONAL_COLUMNS, PAIR_COLUMNS, check_implicit_prompt_columns, note_unused_columns
from preftune.data.load import Records
from preftune.data.messages import (
    check_contents,
    eos_id,
    render_pair,
    reply_text,
    require_chat_template,
    required_field,
)
from preftune.data.rows import InvalidRow, RowProblem, SkipReport, settle_problems, type_name
from preftune.errors import ConfigError, DataError

FORMATS = ("standard", "conversational", "implicit_prompt")
TRUNCATION_MODES = ("keep_end", "keep_start", "error")


@dataclass
class TokenizeSettings:
    """Length limits. ``truncation_mode``: "keep_end" (cut the prompt's start), "keep_start" (cut the
    responses' ends) or "error" (a row that does not fit is invalid)."""

    max_length: int = 1024
    max_prompt_length: int | None = None
    truncation_mode: str = "keep_end"
    whole_turn: bool = False   # reward models: conversations as the chat template renders them, no EOS appended


@dataclass
class TokenizedPair:
    """One preference pair as token ids; each response ends with EOS unless it was truncated or its row
    says it never ended (``chosen_ended`` / ``rejected_ended`` false)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    preference_prob: float   # NaN when the row has none: then the loss uses 1 - label_smoothing
    margin: float
    row: int
    chosen_ended: bool = True     # False: the row says the reply never ended; trained without an appended EOS
    rejected_ended: bool = True


@dataclass
class _Style:
    explicit_prompt: bool
    messages: bool

    @property
    def format(self) -> str:
        if not self.explicit_prompt:
            return "implicit_prompt"
        return "conversational" if self.messages else "standard"


@dataclass
class RowTexts:
    """One valid row: texts (or, validated without a tokenizer, the messages) and its optional values."""

    prompt: str | list
    chosen: str | list
    rejected: str | list
    preference_prob: float
    margin: float
    row: int
    chosen_ended: bool = True
    rejected_ended: bool = True


# ---------------------------------------------------------------- format detection


def detect_format(records: Records) -> str:
    """The dataset's format, decided by most rows: "standard", "conversational" or "implicit_prompt"."""
    return _detect_style(records).format


def _detect_style(records: Records) -> _Style:
    if not records.rows:
        raise DataError(records.name, "the dataset is empty: no rows found")
    with_prompt = sum("prompt" in row for row in records.rows)
    kinds = Counter(kind for kind in map(_row_uses_messages, records.rows) if kind is not None)
    style = _Style(explicit_prompt=2 * with_prompt >= len(records.rows), messages=kinds[True] > kinds[False])
    if not style.explicit_prompt:
        check_implicit_prompt_columns(records)
    return style


def _row_uses_messages(row: dict) -> bool | None:
    value = row.get("chosen")
    if isinstance(value, str):
        return False
    if isinstance(value, list):
        return True
    return None


def _describe_kind(messages: bool) -> str:
    return "lists of messages" if messages else "plain strings"


def _check_format_matches(row: dict, style: _Style) -> None:
    uses_messages = _row_uses_messages(row)
    if uses_messages is not None and uses_messages != style.messages:
        raise InvalidRow("mixed formats", "chosen",
                         f"mixed formats: this row uses {_describe_kind(uses_messages)} but most rows use "
                         f"{_describe_kind(style.messages)}; a dataset must use one format")
    if not style.explicit_prompt and "prompt" in row:
        raise InvalidRow("mixed formats", "prompt",
                         "mixed formats: this row has a 'prompt' but most rows do not (implicit prompt "
                         "format); a dataset must use one format")


# ---------------------------------------------------------------- field validation


def _check_not_empty(name: str, value) -> None:
    if isinstance(value, str) and not value.strip():
        raise InvalidRow("empty response", name, "empty response: the text is empty or only whitespace")
    if isinstance(value, list) and not value:
        raise InvalidRow("empty response", name, "empty response: no messages")


def _optional_number(row: dict, name: str, default: float) -> float:
    value = row.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidRow("wrong type", name, f"wrong type: expected a number, found {type_name(value)} ({value!r})")
    return float(value)


def _preference_prob(row: dict) -> float:
    prob = _optional_number(row, "preference_prob", math.nan)   # NaN: absent, distinct from a given 1.0
    if not math.isnan(prob) and not 0.0 <= prob <= 1.0:
        raise InvalidRow("probability out of range", "preference_prob",
                         f"probability out of range: must be between 0 and 1, found {prob}")
    return prob


def _ended(row: dict, name: str) -> bool:
    """A row's ``chosen_ended`` / ``rejected_ended`` flag (default true): false for a reply that was cut off
    (``preftune iterate --missing_eos keep``), which is then trained without an appended EOS."""
    value = row.get(f"{name}_ended", True)
    if not isinstance(value, bool):
        raise InvalidRow("wrong type", f"{name}_ended", f"wrong type: expected true or false, found "
                                                         f"{type_name(value)} ({value!r})")
    return value


def _cut_after_content(text: str, reply) -> str:
    """A rendered reply that never ended: its text up to the end of its content (no end-of-turn text)."""
    content = reply[-1].get("content") if isinstance(reply, list) and reply else None
    if isinstance(content, str) and content and content in text:
        return text[:text.rindex(content) + len(content)]
    return text


def _margin(row: dict) -> float:
    margin = _optional_number(row, "margin", 0.0)
    if not math.isfinite(margin):
        raise InvalidRow("non-finite margin", "margin", f"margin must be a finite number, found {margin}")
    return margin


# ---------------------------------------------------------------- rows to text


def _row_texts(row: dict, style: _Style, tokenizer, whole_turn: bool = False) -> tuple[str, str, str]:
    """Validate one row's prompt and responses and return (prompt text, chosen text, rejected text)."""
    _check_format_matches(row, style)
    prompt = required_field(row, "prompt", style.messages) if style.explicit_prompt else None
    chosen, rejected = required_field(row, "chosen", style.messages), required_field(row, "rejected", style.messages)
    _check_not_empty("chosen", chosen)
    _check_not_empty("rejected", rejected)
    if chosen == rejected:
        raise InvalidRow("identical responses", "rejected",
                         "chosen and rejected are identical, so the pair expresses no preference")
    if prompt is None:
        split = _split_shared_messages if style.messages else _split_shared_text
        prompt, chosen, rejected = split(chosen, rejected)
    if not style.messages:
        _check_not_empty("chosen", chosen)
        _check_not_empty("rejected", rejected)
        return prompt, chosen, rejected
    check_contents("chosen", chosen)
    check_contents("rejected", rejected)
    if tokenizer is None:   # structure only (``preftune data check`` without a tokenizer): the messages as they are
        return prompt, chosen, rejected
    return _render_conversation(prompt, chosen, rejected, tokenizer, whole_turn)


def _split_shared_text(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Prompt = the common prefix, cut back to its last whitespace so that no word is split."""
    shared = os.path.commonprefix([chosen, rejected])
    cut = next((i for i in range(len(shared) - 1, -1, -1) if shared[i].isspace()), 0)
    prompt = shared[:cut].rstrip()
    if not prompt.strip():
        raise InvalidRow("no shared prompt", "chosen",
                         "no shared prompt: chosen and rejected do not begin with common text ending at a "
                         "word boundary, which the implicit prompt format needs")
    return prompt, chosen[len(prompt):], rejected[len(prompt):]


def _split_shared_messages(chosen: list[dict], rejected: list[dict]) -> tuple[list, list, list]:
    """Prompt = the leading messages both share; each response keeps at least one final message."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise InvalidRow("no shared prompt", "chosen",
                         "no shared prompt: chosen and rejected share no leading messages, which the "
                         "implicit prompt format needs")
    for name, rest in (("chosen", chosen[shared:]), ("rejected", rejected[shared:])):
        if not rest:
            raise InvalidRow("no shared prompt", name,
                             f"nothing is left of '{name}' after the shared prompt messages; each response "
                             "needs at least one final message of its own")
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _render_conversation(prompt: list, chosen: list, rejected: list, tokenizer,
                         whole_turn: bool = False) -> tuple[str, str, str]:
    prompt_text, chosen_text = render_pair(tokenizer, prompt, chosen, "chosen", whole_turn)
    return prompt_text, chosen_text, reply_text(tokenizer, prompt, prompt_text, rejected, "rejected", whole_turn)


def validate_rows(records: Records, tokenizer=None, style: _Style | None = None,
                  whole_turn: bool = False) -> tuple[list[RowTexts], list[RowProblem]]:
    """Every row checked, not tokenised; conversations are rendered only when a tokenizer is given (``whole_turn``:
    :func:`preftune.data.messages.reply_text`)."""
    style = style or _detect_style(records)
    if style.messages and tokenizer is not None:
        require_chat_template(tokenizer)
    texts, problems = [], []
    for row, number in zip(records.rows, records.row_numbers):
        try:
            prompt, chosen, rejected = _row_texts(row, style, tokenizer, whole_turn)
            ended = _ended(row, "chosen"), _ended(row, "rejected")
            if style.messages and tokenizer is not None:
                chosen = chosen if ended[0] else _cut_after_content(chosen, row.get("chosen"))
                rejected = rejected if ended[1] else _cut_after_content(rejected, row.get("rejected"))
            texts.append(RowTexts(prompt, chosen, rejected, _preference_prob(row), _margin(row), number, *ended))
        except InvalidRow as invalid:
            problem = invalid.problem(records.name, number)
            if invalid.fatal:
                raise problem.error from None
            problems.append(problem)
    return texts, problems


# ---------------------------------------------------------------- tokenisation and lengths


def check_settings(settings: TokenizeSettings) -> None:
    """Raise ConfigError for impossible length settings."""
    if settings.truncation_mode not in TRUNCATION_MODES:
        raise ConfigError(f"truncation_mode must be one of {', '.join(TRUNCATION_MODES)}, "
                          f"not {settings.truncation_mode!r}")
    if settings.max_length < 2:
        raise ConfigError("max_length must be at least 2 (one prompt and one response token), "
                          f"not {settings.max_length}")
    if settings.max_prompt_length is not None and settings.max_prompt_length < 1:
        raise ConfigError(f"max_prompt_length must be at least 1, not {settings.max_prompt_length}")


def _token_ids(tokenizer, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    if not texts:
        return []
    return list(tokenizer(texts, add_special_tokens=add_special_tokens, verbose=False)["input_ids"])


def tokenize_untruncated(records: Records, tokenizer,
                         whole_turn: bool = False) -> tuple[list[TokenizedPair], list[RowProblem]]:
    """Validate every row and tokenise the valid ones in full; no length limit is applied. Each response ends
    with EOS; with ``whole_turn`` a conversation's responses end as the chat template ends the turn instead."""
    style = _detect_style(records)
    end = [] if whole_turn and style.messages else [eos_id(tokenizer)]
    texts, problems = validate_rows(records, tokenizer, style, whole_turn)
    # A chat template writes BOS itself; a plain prompt gets it from the tokenizer.
    prompts = _token_ids(tokenizer, [t.prompt for t in texts], add_special_tokens=not style.messages)
    chosen = _token_ids(tokenizer, [t.chosen for t in texts], add_special_tokens=False)
    rejected = _token_ids(tokenizer, [t.rejected for t in texts], add_special_tokens=False)
    pairs = [TokenizedPair(list(p), list(c) + end * t.chosen_ended, list(r) + end * t.rejected_ended,
                           t.preference_prob, t.margin, t.row, t.chosen_ended, t.rejected_ended)
             for t, p, c, r in zip(texts, prompts, chosen, rejected)]
    return pairs, problems


def fit_to_length(pair: TokenizedPair, settings: TokenizeSettings) -> TokenizedPair:
    """Apply ``max_prompt_length`` and ``max_length`` to one pair; raises :class:`InvalidRow` if it cannot fit."""
    if not pair.prompt_ids:
        raise InvalidRow("empty prompt", "prompt", "the prompt has no tokens, but the first response token "
                                                   "must be predicted from at least one prompt token")
    pair = _limit_prompt(pair, settings)
    longest = max(len(pair.chosen_ids), len(pair.rejected_ids))
    if len(pair.prompt_ids) + longest <= settings.max_length:
        return pair
    if settings.truncation_mode == "keep_end":
        return _keep_prompt_end(pair, longest, settings.max_length)
    if settings.truncation_mode == "keep_start":
        return _keep_response_start(pair, settings.max_length)
    field = "chosen" if len(pair.chosen_ids) >= len(pair.rejected_ids) else "rejected"
    raise InvalidRow("too long", field, f"too long: needs {len(pair.prompt_ids) + longest} tokens (prompt "
                                        f"{len(pair.prompt_ids)} + {field} {longest}, EOS included) but max_length "
                                        f"is {settings.max_length}, and truncation_mode is 'error'")


def _limit_prompt(pair: TokenizedPair, settings: TokenizeSettings) -> TokenizedPair:
    limit = settings.max_prompt_length
    if limit is None or len(pair.prompt_ids) <= limit:
        return pair
    if settings.truncation_mode == "error":
        raise InvalidRow("too long", "prompt", f"too long: the prompt has {len(pair.prompt_ids)} tokens but "
                                               f"max_prompt_length is {limit}, and truncation_mode is 'error'")
    return replace(pair, prompt_ids=pair.prompt_ids[-limit:])


def _keep_prompt_end(pair: TokenizedPair, longest: int, max_length: int) -> TokenizedPair:
    room = max_length - longest
    if room < 1:
        field = "chosen" if len(pair.chosen_ids) == longest else "rejected"
        raise InvalidRow("too long", field, f"too long: needs at least {longest + 1} tokens ({field} has "
                                            f"{longest} tokens with EOS, plus at least 1 prompt token) but "
                                            f"max_length is {max_length}")
    return replace(pair, prompt_ids=pair.prompt_ids[-room:])


def _keep_response_start(pair: TokenizedPair, max_length: int) -> TokenizedPair:
    room = max_length - len(pair.prompt_ids)
    if room < 1:
        raise InvalidRow("too long", "prompt", f"too long: needs at least {len(pair.prompt_ids) + 1} tokens (prompt "
                                               f"{len(pair.prompt_ids)} + at least 1 response token) but max_length "
                                               f"is {max_length}")
    return replace(pair, chosen_ids=pair.chosen_ids[:room], rejected_ids=pair.rejected_ids[:room])


def fit_pairs(pairs: list[TokenizedPair], settings: TokenizeSettings,
              source: str) -> tuple[list[TokenizedPair], list[RowProblem]]:
    """Fit every pair to the length limits; pairs that cannot fit become problems."""
    fitted, problems = [], []
    for pair in pairs:
        try:
            fitted.append(fit_to_length(pair, settings))
        except InvalidRow as invalid:
            problems.append(invalid.problem(source, pair.row))
    return fitted, problems


def tokenize_preferences(records: Records, tokenizer, settings: TokenizeSettings,
                         skip_invalid: bool = False) -> tuple[list[TokenizedPair], SkipReport]:
    """Validate and tokenise every row. The first invalid row raises DataError unless ``skip_invalid``."""
    check_settings(settings)
    pairs, problems = tokenize_untruncated(records, tokenizer, settings.whole_turn)
    note_unused_columns(records, PAIR_COLUMNS + OPTIONAL_COLUMNS)
    fitted, too_long = fit_pairs(pairs, settings, records.name)
    return fitted, settle_problems(records.name, len(records.rows), fitted, problems + too_long, skip_invalid)
