"""Prompt files of the online trainers (PPO, GRPO/RLOO, online DPO) and ``preftune iterate``: a ``prompt`` column,
text or chat messages, and any other columns (handed to reward functions).

:class:`PromptExample` is one prompt as a sampler and a trainer need it; :func:`read_text_prompts` reads text
prompts (the text modality's ``read_prompts``; prompts with images are read by
:func:`preftune.multimodal.data.tokenize_vision_prompts`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from preftune.data.columns import REWARD_ARGUMENTS
from preftune.data.images import count_parts, image_column
from preftune.data.load import Records
from preftune.data.messages import prompt_text
from preftune.data.rows import InvalidRow, SkipReport, read_rows, settle_problems


@dataclass
class PromptExample:
    prompt: str | list        # as in the data: handed to reward functions and judges
    text: str                 # the prompt as the policy reads it (chat template applied)
    ids: list[int]
    row: int
    columns: dict = field(default_factory=dict)   # the row's other fields (a reference answer for a reward function)
    encoded: Any = None       # the prompt as its modality holds one: its token ids, or ids with image tensors
    carry: dict = field(default_factory=dict)     # fields a training row written from this prompt must keep (images)

    def __post_init__(self):
        if self.encoded is None:
            self.encoded = self.ids


def other_columns(row: dict) -> dict:
    """A prompt row's fields besides the prompt (and the names a reward function's own arguments take)."""
    return {k: v for k, v in row.items() if k != "prompt" and k not in REWARD_ARGUMENTS}


def read_text_prompts(records: Records, tokenizer, max_prompt_length: int,
                      skip_invalid: bool = False) -> tuple[list[PromptExample], SkipReport]:
    """Every row's ``prompt``, rendered and tokenised; a long prompt keeps its last ``max_prompt_length`` tokens.
    A row with images is refused: a text policy would silently never see them."""

    def read(row: dict) -> PromptExample:
        column = image_column(row) or ("prompt" if count_parts(row.get("prompt")) else None)
        if column:
            raise InvalidRow("images", column, "this row has images, but this trainer reads text prompts only "
                                               "(GRPO, RLOO, online DPO and iterate take prompts with images)")
        value = row.get("prompt")
        text, chat = prompt_text(tokenizer, value)
        ids = list(tokenizer(text, add_special_tokens=not chat)["input_ids"])
        if not ids:
            raise InvalidRow("empty prompt", "prompt", "the prompt has no tokens")
        return PromptExample(value, text, ids[-max_prompt_length:], 0, other_columns(row))

    found, problems = read_rows(records, read, skip_invalid)
    examples = [_numbered(example, number) for example, number in found]
    return examples, settle_problems(records.name, len(records.rows), examples, problems, skip_invalid)


def _numbered(example: PromptExample, number: int) -> PromptExample:
    example.row = number
    return example
