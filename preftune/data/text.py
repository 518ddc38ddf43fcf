"""Raw text for pretraining, and supervised fine-tuning rows: validation and tokenisation.

Pretraining reads documents: a ``.txt`` file (one document per blank-line-separated block), a
directory of ``.txt`` files, or any source :func:`load_records` reads with a ``text`` column.

SFT rows come in three formats (TRL's names for the first two):

* ``prompt_completion``: ``prompt`` and ``completion`` strings (or lists of messages);
* ``messages``: a conversation, a list of ``{"role", "content"}`` rendered with the chat template;
  every assistant turn is trained, system / user turns are context;
* ``text``: a plain ``text`` string, trained in full.

Each piece of a row is tokenised on its own and the ids concatenated, so the prompt ids are exactly
a prefix of the sequence. Each trained piece ends with EOS (appended unless the chat template already
wrote it). With ``completion_only_loss`` only trained pieces carry a loss, otherwise every token does.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from preftune.data.columns import SFT_COLUMNS, note_unused_columns
from preftune.data.load import Records, load_records, read_utf8
from preftune.data.messages import (
    check_contents,
    check_messages,
    end_turn,
    eos_id,
    render,
    reply_segment,
    require_prefix,
)
from preftune.data.packing import LMExample
from preftune.data.preference import TRUNCATION_MODES
from preftune.data.rows import InvalidRow, RowProblem, SkipReport, settle_problems, summarise_problems, type_name
from preftune.errors import ConfigError, DataError

SFT_FORMATS = ("prompt_completion", "messages", "text")
TRAINED_FIELD = {"prompt_completion": "completion", "messages": "messages", "text": "text"}


# ---------------------------------------------------------------- raw text (pretraining)


def load_text_records(source: str, split: str = "train") -> list[Records]:
    """Rows ``{"text": ...}`` from .txt files (one Records per file), else whatever load_records reads."""
    path = Path(str(source)).expanduser()
    if path.is_file() and path.suffix.lower() == ".txt":
        return [_read_txt(str(source), path)]
    is_saved = (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()
    if path.is_dir() and not is_saved:
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if files:
            return [_read_txt(str(p), p) for p in files]
    return [load_records(str(source), split=split)]


def _read_txt(source: str, path: Path) -> Records:
    """One row per block of non-blank lines; the row number is the block's first line."""
    text = read_utf8(source, path, header_lines=None)   # a document spans lines: the error names the line
    rows, numbers, block, start = [], [], [], 0
    for number, line in enumerate(text.splitlines() + [""], start=1):
        if line.strip():
            if not block:
                start = number
            block.append(line)
        elif block:
            rows.append({"text": "\n".join(block)})
            numbers.append(start)
            block = []
    return Records(source, rows, numbers)


def read_documents(source: str, split: str = "train", text_column: str = "text",
                   skip_invalid: bool = False) -> tuple[list[str], SkipReport]:
    """Every document's text, validated (a string, not empty); the first bad row raises unless ``skip_invalid``."""
    texts, problems, total = [], [], 0
    for records in load_text_records(source, split):
        for row, number in zip(records.rows, records.row_numbers):
            total += 1
            try:
                texts.append(_string(row, text_column, "empty text"))
            except InvalidRow as invalid:
                problems.append(invalid.problem(records.name, number))
    if problems and not skip_invalid:
        raise problems[0].error
    report = summarise_problems(total, len(texts), problems)
    if not texts:
        first = f"; the first: {report.examples[0]}" if report.examples else ""
        raise DataError(str(source), f"no documents: found {total} rows, none with usable text{first}")
    return texts, report


def tokenize_documents(texts: list[str], tokenizer, batch_size: int = 1000) -> list[list[int]]:
    """Token ids of each document with the tokenizer's special tokens (BOS) and EOS at the end."""
    eos = eos_id(tokenizer)
    documents = []
    for start in range(0, len(texts), batch_size):
        for ids in tokenizer(texts[start:start + batch_size], add_special_tokens=True, verbose=False)["input_ids"]:
            ids = list(ids)
            documents.append(ids if ids and ids[-1] == eos else ids + [eos])
    return documents


# ---------------------------------------------------------------- SFT rows


@dataclass
class SFTSettings:
    """Length limits (as for preference pairs) and whether only completions are trained."""

    max_length: int = 1024
    max_prompt_length: int | None = None
    truncation_mode: str = "keep_end"
    completion_only_loss: bool = True


@dataclass
class _Segment:
    text: str
    trained: bool
    special: bool = False  # tokenise with the tokenizer's special tokens (a plain text's BOS)


def detect_sft_format(records: Records) -> str:
    """The format most rows use: "prompt_completion", "messages" or "text"."""
    counts = Counter(kind for kind in map(_row_kind, records.rows) if kind is not None)
    if not counts:
        raise DataError(records.name, "no row has a 'messages', 'prompt'/'completion' or 'text' field; SFT data "
                                      "needs prompt and completion, a messages conversation, or text")
    return max(SFT_FORMATS, key=lambda kind: counts[kind])


def _row_kind(row: dict) -> str | None:
    if "messages" in row:
        return "messages"
    if "completion" in row or "prompt" in row:
        return "prompt_completion"
    return "text" if "text" in row else None


def _string(row: dict, name: str, empty_kind: str | None) -> str:
    if name not in row:
        raise InvalidRow("missing field", name, "missing field")
    value = row[name]
    if value is None:
        raise InvalidRow("missing field", name, "missing field (the value is empty or null)")
    if not isinstance(value, str):
        raise InvalidRow("wrong type", name, f"wrong type: expected a string, found {type_name(value)}")
    if empty_kind and not value.strip():
        raise InvalidRow(empty_kind, name, f"{empty_kind}: the text is empty or only whitespace")
    return value


def _messages(row: dict, name: str) -> list[dict]:
    if name not in row or row[name] is None:
        raise InvalidRow("missing field", name, "missing field")
    messages = check_messages(name, row[name])
    if not messages:
        raise InvalidRow("empty completion", name, "no messages")
    return messages


def _conversation_segments(messages: list[dict], tokenizer) -> list[_Segment]:
    """Context and reply pieces of a conversation: each assistant turn is a trained piece."""
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise InvalidRow("no assistant message", "messages", "no assistant message: nothing to train on")
    if turns[0] == 0:
        raise InvalidRow("bad message", "messages", "message 1 is from the assistant: a reply needs at least one "
                                                    "message (system or user) before it")
    for i in turns:
        if not messages[i]["content"].strip():
            raise InvalidRow("empty completion", "messages", f"message {i + 1} (assistant) has empty content")
    segments, done = [], ""
    for i in turns:
        before = render(tokenizer, messages[:i], "messages", add_generation_prompt=True)
        require_prefix(done, before, "messages")
        reply = reply_segment(tokenizer, messages[:i], before, [messages[i]], "messages")
        segments += [_Segment(before[len(done):], False), _Segment(reply, True)]
        done = render(tokenizer, messages[:i + 1], "messages")   # the history later turns see
    return segments


def _prompt_completion_segments(row: dict, tokenizer) -> list[_Segment]:
    prompt, completion = row.get("prompt"), row.get("completion")
    leader = prompt if isinstance(prompt, (str, list)) else completion
    if isinstance(leader, list) and isinstance(completion, str):
        raise InvalidRow("wrong type", "completion", "wrong type: expected a list of messages like the prompt, "
                                                     "found a string")
    if isinstance(leader, str) and isinstance(completion, list):
        raise InvalidRow("wrong type", "completion", "wrong type: expected a string like the prompt, found a list")
    if isinstance(leader, list):
        prompt, completion = _messages(row, "prompt"), _messages(row, "completion")
        check_contents("completion", completion, "empty completion")
        prompt_text = render(tokenizer, prompt, "prompt", add_generation_prompt=completion[0]["role"] == "assistant")
        completion_text = reply_segment(tokenizer, prompt, prompt_text, completion, "completion")
        return [_Segment(prompt_text, False), _Segment(completion_text, True)]  # the template's end of turn kept
    prompt = _string(row, "prompt", None)
    completion = _string(row, "completion", "empty completion")
    return [_Segment(prompt, False, special=True), _Segment(completion, True)]


def _row_segments(row: dict, fmt: str, tokenizer) -> list[_Segment]:
    kind = _row_kind(row)
    if kind is not None and kind != fmt:
        raise InvalidRow("mixed formats", TRAINED_FIELD[kind], f"mixed formats: this row is in the '{kind}' format but "
                                                               f"most rows use '{fmt}'; a dataset must use one format")
    if fmt == "text":
        return [_Segment(_string(row, "text", "empty text"), True, special=True)]
    if fmt == "messages":
        return _conversation_segments(_messages(row, "messages"), tokenizer)
    return _prompt_completion_segments(row, tokenizer)


def _tokenize_segments(rows: list[list[_Segment]], tokenizer) -> list[list[list[int]]]:
    """Token ids of every segment of every row, in two batched tokenizer calls."""
    ids: dict[tuple[int, int], list[int]] = {}
    for special in (True, False):
        keys = [(r, s) for r, segs in enumerate(rows) for s, seg in enumerate(segs) if seg.special == special]
        if keys:
            texts = [rows[r][s].text for r, s in keys]
            encoded = tokenizer(texts, add_special_tokens=special, verbose=False)["input_ids"]
            ids.update(zip(keys, (list(e) for e in encoded)))
    return [[ids[(r, s)] for s in range(len(segs))] for r, segs in enumerate(rows)]


def _build_example(segments: list[_Segment], pieces: list[list[int]], eos: int, settings: SFTSettings,
                   fmt: str, row: int) -> LMExample:
    ids: list[int] = []
    trained: list[bool] = []
    prompt_length = 0
    for index, (segment, piece) in enumerate(zip(segments, pieces)):
        if segment.trained:
            piece = end_turn(piece, eos)
        ids += piece
        trained += [segment.trained or not settings.completion_only_loss] * len(piece)
        if index == 0 and not segment.trained:
            prompt_length = len(piece)
    return _fit(ids, trained, prompt_length if fmt == "prompt_completion" else 0, settings, fmt, row)


def _fit(ids: list[int], trained: list[bool], prompt_length: int, settings: SFTSettings, fmt: str,
         row: int) -> LMExample:
    """Apply ``max_prompt_length`` and ``max_length`` by ``truncation_mode``; raises InvalidRow if nothing is left."""
    mode, limit = settings.truncation_mode, settings.max_prompt_length
    field = TRAINED_FIELD[fmt]
    if limit is not None and prompt_length > limit:
        if mode == "error":
            raise InvalidRow("too long", "prompt", f"too long: the prompt has {prompt_length} tokens but "
                                                   f"max_prompt_length is {limit}, and truncation_mode is 'error'")
        ids, trained = ids[prompt_length - limit:], trained[prompt_length - limit:]
    if len(ids) > settings.max_length:
        if mode == "error":
            raise InvalidRow("too long", field, f"too long: needs {len(ids)} tokens (EOS included) but max_length is "
                                                f"{settings.max_length}, and truncation_mode is 'error'")
        cut = slice(None, settings.max_length) if mode == "keep_start" else slice(-settings.max_length, None)
        ids, trained = ids[cut], trained[cut]
    if not any(trained[1:]):
        raise InvalidRow("too long", field, f"too long: no token is left to train on after truncation to "
                                            f"max_length={settings.max_length} ({mode})")
    return LMExample(ids, trained, row)


def tokenize_sft(records: Records, tokenizer, settings: SFTSettings,
                 skip_invalid: bool = False) -> tuple[list[LMExample], SkipReport]:
    """Validate and tokenise every row; the first invalid row raises DataError unless ``skip_invalid``."""
    if settings.truncation_mode not in TRUNCATION_MODES:
        raise ConfigError(f"truncation_mode must be one of {', '.join(TRUNCATION_MODES)}, "
                          f"not {settings.truncation_mode!r}")
    if settings.max_length < 2:
        raise ConfigError(f"max_length must be at least 2, not {settings.max_length}")
    eos = eos_id(tokenizer)
    fmt = detect_sft_format(records)
    note_unused_columns(records, SFT_COLUMNS)
    kept: list[tuple[int, list[_Segment]]] = []
    problems: list[RowProblem] = []
    for row, number in zip(records.rows, records.row_numbers):
        try:
            kept.append((number, _row_segments(row, fmt, tokenizer)))
        except InvalidRow as invalid:
            if invalid.fatal:
                raise invalid.problem(records.name, number).error from None
            problems.append(invalid.problem(records.name, number))
    examples = []
    for (number, segments), pieces in zip(kept, _tokenize_segments([s for _, s in kept], tokenizer)):
        try:
            examples.append(_build_example(segments, pieces, eos, settings, fmt, number))
        except InvalidRow as invalid:
            problems.append(invalid.problem(records.name, number))
    return examples, settle_problems(records.name, len(records.rows), examples, problems, skip_invalid)
