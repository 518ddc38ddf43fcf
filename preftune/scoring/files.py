"""``preftune score``: score every prompt/response row of a file with a reward model; write each with its ``reward``."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from ..data.load import load_records
from ..data.messages import check_contents, render_pair, require_chat_template, required_field
from ..data.rows import InvalidRow, read_rows
from ..errors import ConfigError
from ..models import load_tokenizer
from .reward_model import RewardModelScorer, load_weights, prepare_tokenizer


def _scoring_texts(row: dict, messages: bool, tokenizer) -> tuple[str, str]:
    """Validate one scoring row and return (prompt text, response text). TRL's ``completion`` column is read as
    the response when there is no ``response``."""
    if "response" not in row and "completion" in row:
        row = {**row, "response": row["completion"]}
    if messages and isinstance(row.get("response"), str):  # a generated reply to a conversation
        row = {**row, "response": [{"role": "assistant", "content": row["response"]}]}
    prompt, response = required_field(row, "prompt", messages), required_field(row, "response", messages)
    if not response or (isinstance(response, str) and not response.strip()):
        raise InvalidRow("empty response", "response", "empty response: the text is empty or only whitespace")
    if not messages:
        return prompt, response
    check_contents("response", response)
    return render_pair(tokenizer, prompt, response, "response")


@dataclass
class ScoreResult:
    output: Path
    rows: int
    mean_reward: float


def score_file(model_path, input_path, output_path, batch_size: int = 16, max_length: int | None = None,
               split: str = "train", device=None) -> ScoreResult:
    """Score every prompt/response row of ``input_path``; write each row plus ``reward`` as JSONL.

    Rows hold ``prompt`` and ``response`` strings, or message lists rendered with the chat template (a
    string response to a conversation is taken as the assistant's reply). A bad row raises DataError.
    """
    if batch_size <= 0:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    records = load_records(str(input_path), split=split)
    tokenizer = prepare_tokenizer(load_tokenizer(str(model_path)))
    messages = 2 * sum(isinstance(r.get("prompt"), list) for r in records.rows) > len(records.rows)
    if messages:
        require_chat_template(tokenizer)
    pairs, _ = read_rows(records, lambda row: _scoring_texts(row, messages, tokenizer), skip_invalid=False)
    prompts = [prompt for (prompt, _), _ in pairs]
    responses = [response for (_, response), _ in pairs]
    model = load_weights(model_path, tokenizer.pad_token_id, device)  # after the rows proved valid
    scorer = RewardModelScorer(model_path, model=model, tokenizer=tokenizer, batch_size=batch_size,
                               max_length=max_length, prompt_special_tokens=not messages)
    return write_scored(records, scorer.score(prompts, responses), output_path)


def write_scored(records, rewards: list[float], output_path) -> ScoreResult:
    """Every row of ``records`` plus its ``reward``, as JSONL written whole (through a staging file)."""
    output = Path(output_path)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.with_name(output.name + ".partial")
    with open(staging, "w", encoding="utf-8") as handle:
        for row, reward in zip(records.rows, rewards):
            handle.write(json.dumps({**row, "reward": reward}, ensure_ascii=False, default=str) + "\n")
    os.replace(staging, output)
    mean = sum(rewards) / len(rewards) if rewards else math.nan
    return ScoreResult(output, len(rewards), mean)
