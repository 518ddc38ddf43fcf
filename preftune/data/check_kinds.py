"""``preftune data check --kind``: which trainer a file is for, and the check of KTO, SFT and prompt files.

The kind is the option's, else detected from the columns most rows have: ``chosen``/``rejected`` ->
preference (DPO, reward; KTO splits such pairs in two), ``label`` -> kto, ``messages``, ``text`` or
``completion`` -> sft, ``prompt`` alone -> prompt (PPO, GRPO, RLOO, online DPO). A KTO, SFT or prompt file is
checked by the very functions its trainer reads it with, every invalid row collected rather than the first
raised. Without ``--tokenizer`` the rows are rendered with a stand-in tokenizer trained on the file's own text
(a chat template included), so structure and validity are checked but no token counts are reported.
"""

from __future__ import annotations

from collections import Counter

from preftune.data.columns import KTO_COLUMNS, REWARD_ARGUMENTS, SFT_COLUMNS, column_names, unknown_columns
from preftune.data.load import Records
from preftune.data.rows import InvalidRow, summarise_problems
from preftune.errors import ConfigError, DataError

KINDS = ("preference", "kto", "sft", "prompt")


def detect_kind(records: Records) -> str:
    """The kind of trainer data most rows are (see the module's docstring)."""
    if not records.rows:
        raise DataError(records.name, "the dataset is empty: no rows found")

    def kind(row: dict) -> str | None:
        if "chosen" in row or "rejected" in row:
            return "preference"
        if "label" in row:
            return "kto"
        if any(name in row for name in ("messages", "text", "completion")):
            return "sft"
        return "prompt" if "prompt" in row else None

    counts = Counter(k for k in map(kind, records.rows) if k is not None)
    if not counts:
        raise DataError(records.name, f"no row has the columns of any trainer's data (found "
                                      f"{', '.join(column_names(records)) or 'none'}); preference rows have "
                                      "prompt/chosen/rejected, KTO rows prompt/completion/label, SFT rows messages, "
                                      "prompt/completion or text, prompt files prompt")
    return max(KINDS, key=lambda k: counts[k])


def stand_in_tokenizer(records: Records):
    """A small byte-level tokenizer with a chat template, trained on the file's strings (for structure checks)."""
    from preftune.toy import build_toy_tokenizer

    texts = []

    def collect(value):
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, list):
            for item in value:
                collect(item)
        elif isinstance(value, dict):
            for item in value.values():
                collect(item)

    for row in records.rows[:2000]:
        collect(row)
    return build_toy_tokenizer(texts or ["empty"], vocab_size=300)


def check_kind(kind: str, records: Records, tokenizer, settings):
    """``(format, kept, SkipReport, unknown columns)`` of a KTO, SFT or prompt file."""
    from preftune.data.kto import is_paired, tokenize_kto
    from preftune.data.text import SFTSettings, detect_sft_format, tokenize_sft

    if kind not in KINDS[1:]:
        raise ConfigError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "kto":
        _, report = tokenize_kto(records, tokenizer, settings, skip_invalid=True)
        known = None if is_paired(records) else KTO_COLUMNS
        return ("kto pairs" if known is None else "kto unpaired"), report, known
    if kind == "sft":
        sft = SFTSettings(max_length=settings.max_length, max_prompt_length=settings.max_prompt_length)
        fmt = detect_sft_format(records)
        _, report = tokenize_sft(records, tokenizer, sft, skip_invalid=True)
        return f"sft {fmt}", report, SFT_COLUMNS
    passed = tuple(name for name in column_names(records) if name not in REWARD_ARGUMENTS)   # to reward functions
    return "prompt", check_prompts(records, tokenizer), passed


def check_prompts(records: Records, tokenizer):
    """Every row's ``prompt`` rendered as the online trainers render it; a SkipReport of the invalid ones."""
    from preftune.data.messages import prompt_text

    problems, kept = [], 0
    for row, number in zip(records.rows, records.row_numbers):
        try:
            text, chat = prompt_text(tokenizer, row.get("prompt"))
            if not tokenizer(text, add_special_tokens=not chat).input_ids:
                raise InvalidRow("empty prompt", "prompt", "the prompt has no tokens")
            kept += 1
        except InvalidRow as invalid:
            problems.append(invalid.problem(records.name, number))
    return summarise_problems(len(records.rows), kept, problems)


def unread_columns(records: Records, known) -> list[str]:
    return [] if known is None else unknown_columns(records, known)
