"""Rows with images → token ids and image tensors → batches, through the model's processor.

A prompt is rendered by the processor's chat template (or the tokenizer's), then the processor
expands each image placeholder into the model's image tokens and turns the images into its tensors
(``pixel_values`` and, by family, ``image_grid_thw`` or ``pixel_attention_mask``). Responses never
hold images: they are tokenised alone and appended, each ending with EOS, so the prompt ids are an
exact prefix of both sequences and the image tokens are never scored.

A pair's images are stored once. :func:`collate_vision_pairs` lays a batch out as DPO's text batches
(every chosen row, then every rejected row) and keeps one copy of each pair's image tensors, under
``image:<name>`` keys; the log-prob code decides whether to encode them once or repeat them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from preftune.data.collate import collate_completions
from preftune.data.images import check_parts, count_parts, image_column, place_images, read_row_images, text_only
from preftune.data.kto import _label as kto_label, is_paired
from preftune.data.load import Records
from preftune.data.messages import check_messages, eos_id, render, require_prefix, strip_trailing_eos
from preftune.data.preference import TokenizeSettings, _margin, _preference_prob, check_settings
from preftune.data.rows import InvalidRow, SkipReport, read_rows, settle_problems, type_name

IMAGE_PREFIX = "image:"
TOKEN_LEVEL = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


@dataclass
class VisionPrompt:
    """A prompt with its images: expanded token ids, the processor's image tensors, a digest of the image bytes."""

    ids: list[int]
    image_inputs: dict[str, torch.Tensor]
    token_types: list[int] | None     # mm_token_type_ids (Qwen2-VL's multimodal RoPE needs them)
    image_key: int                    # 63 bits of the images' digest


@dataclass
class VisionPair:
    prompt: VisionPrompt
    chosen_ids: list[int]
    rejected_ids: list[int]
    preference_prob: float
    margin: float
    row: int = 0


@dataclass
class VisionExample:
    """One SFT example: a prompt with images and the completion trained on."""

    prompt: VisionPrompt
    completion_ids: list[int]
    row: int = 0

    @property
    def input_ids(self) -> list[int]:
        return self.prompt.ids + self.completion_ids


@dataclass
class VisionLabelled:
    """One KTO example: a prompt with images, one completion and whether it is desirable."""

    prompt: VisionPrompt
    completion_ids: list[int]
    desirable: bool
    row: int = 0

    @property
    def prompt_ids(self) -> list[int]:
        return self.prompt.ids


def base_dir(source: str) -> Path | None:
    """Image paths in a data file are relative to the file's folder."""
    path = Path(source).expanduser()
    return path.parent if path.is_file() else path if path.is_dir() else None


def tokenizer_of(processor):
    return getattr(processor, "tokenizer", processor)


# ---------------------------------------------------------------- prompts


def vision_prompt(row: dict, processor, base: Path | None) -> tuple[VisionPrompt, list | None]:
    """The row's prompt with its images, and the prompt messages (None for a plain-text prompt)."""
    loaded = read_row_images(row, base)
    prompt = row.get("prompt")
    if prompt is None:
        raise InvalidRow("missing field", "prompt", "missing field (every row with images needs a 'prompt')")
    column = image_column(row) or "images"
    if isinstance(prompt, list):
        check_messages("prompt", text_only(prompt))
        prompt = place_images(prompt, len(loaded), column)
        text, chat = render(processor, prompt, "prompt", add_generation_prompt=True), True
    elif isinstance(prompt, str):
        text, chat = _placeholders_in_text(prompt, processor, len(loaded), column), False
    else:
        raise InvalidRow("wrong type", "prompt", f"wrong type: expected a string or a list of messages, found "
                                                 f"{type_name(prompt)}")
    kwargs = {"images": [loaded.images]} if loaded.images else {}
    try:
        out = processor(text=[text], return_tensors="pt", add_special_tokens=not chat, **kwargs)
    except (ValueError, TypeError) as exc:
        raise InvalidRow("image count", column, f"the processor refused this prompt and its images: {exc}") from None
    types = out.get("mm_token_type_ids")
    image_inputs = {k: v for k, v in out.items() if k not in TOKEN_LEVEL} if loaded.images else {}
    key = int(loaded.digest[:16], 16) >> 1
    ids = out["input_ids"][0].tolist()
    return VisionPrompt(ids, image_inputs, None if types is None else types[0].tolist(), key), prompt


def _placeholders_in_text(prompt: str, processor, count: int, column: str) -> str:
    token = getattr(processor, "image_token", None) or "<image>"
    found = prompt.count(token)
    if found == 0 and count:
        return token * count + prompt
    if found != count:
        raise InvalidRow("image count", column, f"the prompt has {found} image placeholder(s) {token!r} but the row "
                                                f"has {count} image(s)")
    return prompt


def reply_ids(processor, prompt_messages, reply, field: str) -> list[int]:
    """Token ids of one reply (messages or a string), ending with EOS."""
    tokenizer = tokenizer_of(processor)
    if isinstance(reply, str) and reply.strip():
        text = reply
    elif isinstance(reply, list) and reply and isinstance(prompt_messages, list):
        check_parts(field, reply)
        if count_parts(reply):
            raise InvalidRow("bad message", field, "a reply cannot hold images; put them in the prompt")
        reply = check_messages(field, text_only(reply))     # text parts become plain contents
        if reply[0]["role"] != "assistant":
            raise InvalidRow("bad message", field, "a reply to a prompt with images must begin with an assistant "
                                                   f"message, not '{reply[0]['role']}'")
        prefix = render(processor, prompt_messages, "prompt", add_generation_prompt=True)
        full = render(processor, prompt_messages + reply, field)
        require_prefix(prefix, full, field)
        text = strip_trailing_eos(full[len(prefix):], tokenizer.eos_token)
    else:
        raise InvalidRow("empty response" if reply in ("", []) else "wrong type", field,
                         f"expected a non-empty {'list of messages' if isinstance(prompt_messages, list) else 'string'}"
                         f", found {type_name(reply)}")
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) + [eos_id(tokenizer)]


# ---------------------------------------------------------------- pairs and examples


def tokenize_vision_pairs(records: Records, processor, settings: TokenizeSettings,
                          skip_invalid: bool = False) -> tuple[list[VisionPair], SkipReport]:
    """Validate and tokenise preference pairs with images; errors name the file, row and field."""
    check_settings(settings)
    base = base_dir(records.name)

    def read(row: dict) -> VisionPair:
        prompt, messages = vision_prompt(row, processor, base)
        chosen = reply_ids(processor, messages, row.get("chosen"), "chosen")
        rejected = reply_ids(processor, messages, row.get("rejected"), "rejected")
        if chosen == rejected:
            raise InvalidRow("identical responses", "rejected", "chosen and rejected are identical")
        return fit_pair(VisionPair(prompt, chosen, rejected, _preference_prob(row), _margin(row)), settings)

    found, problems = read_rows(records, read, skip_invalid)
    pairs = [replace(pair, row=number) for pair, number in found]
    return pairs, settle_problems(records.name, len(records.rows), pairs, problems, skip_invalid)


def tokenize_vision_examples(records: Records, processor, settings: TokenizeSettings,
                             skip_invalid: bool = False) -> tuple[list[VisionExample], SkipReport]:
    """SFT rows with images: ``prompt`` + ``completion`` (strings or messages), or ``messages`` (the last one is
    the completion)."""
    check_settings(settings)
    base = base_dir(records.name)

    def read(row: dict) -> VisionExample:
        row = _split_messages(row)
        prompt, messages = vision_prompt(row, processor, base)
        completion = reply_ids(processor, messages, row.get("completion"), "completion")
        room = settings.max_length - len(prompt.ids)
        if room < 1 or (len(completion) > room and settings.truncation_mode == "error"):
            raise InvalidRow("too long", "completion", f"too long: {len(prompt.ids)} prompt tokens (images "
                                                       f"included) + {len(completion)} > max_length "
                                                       f"{settings.max_length}")
        return VisionExample(prompt, completion[:room])

    found, problems = read_rows(records, read, skip_invalid)
    examples = [replace(example, row=number) for example, number in found]
    return examples, settle_problems(records.name, len(records.rows), examples, problems, skip_invalid)


def tokenize_vision_labelled(records: Records, processor, settings: TokenizeSettings,
                             skip_invalid: bool = False) -> tuple[list[VisionLabelled], SkipReport]:
    """KTO rows with images: unpaired (``prompt``, ``completion``, ``label``), or pairs split in two (chosen
    desirable, rejected undesirable, both keeping the pair's row number)."""
    if is_paired(records):
        pairs, report = tokenize_vision_pairs(records, processor, settings, skip_invalid)
        return [VisionLabelled(p.prompt, ids, good, p.row) for p in pairs
                for ids, good in ((p.chosen_ids, True), (p.rejected_ids, False))], report
    check_settings(settings)
    base = base_dir(records.name)

    def read(row: dict) -> VisionLabelled:
        prompt, messages = vision_prompt(row, processor, base)
        completion = reply_ids(processor, messages, row.get("completion"), "completion")
        label = kto_label(row)
        fitted = fit_pair(VisionPair(prompt, completion, completion, 1.0, 0.0), settings)
        return VisionLabelled(prompt, fitted.chosen_ids, label)

    found, problems = read_rows(records, read, skip_invalid)
    examples = [replace(example, row=number) for example, number in found]
    return examples, settle_problems(records.name, len(records.rows), examples, problems, skip_invalid)


def _split_messages(row: dict) -> dict:
    """A ``messages`` row (TRL's conversational SFT format) as prompt = all but the last, completion = the last."""
    messages = row.get("messages")
    if "prompt" in row or not isinstance(messages, list) or len(messages) < 2:
        return row
    return {**row, "prompt": messages[:-1], "completion": messages[-1:]}


def fit_pair(pair: VisionPair, settings: TokenizeSettings) -> VisionPair:
    """Cut responses to ``max_length``; a prompt is never cut (its image tokens must stay whole)."""
    limit = settings.max_prompt_length
    if limit is not None and len(pair.prompt.ids) > limit:
        raise InvalidRow("too long", "prompt", f"too long: the prompt has {len(pair.prompt.ids)} tokens (images "
                                               f"included) but max_prompt_length is {limit}; a prompt with images "
                                               "is never truncated")
    room = settings.max_length - len(pair.prompt.ids)
    longest = max(len(pair.chosen_ids), len(pair.rejected_ids))
    if longest <= room:
        return pair
    if room < 1 or settings.truncation_mode == "error":
        raise InvalidRow("too long", "prompt" if room < 1 else "chosen",
                         f"too long: {len(pair.prompt.ids)} prompt tokens (images included) + {longest} response "
                         f"tokens > max_length {settings.max_length}; a prompt with images is never truncated")
    return replace(pair, chosen_ids=pair.chosen_ids[:room], rejected_ids=pair.rejected_ids[:room])


# ---------------------------------------------------------------- batches


def stack_image_inputs(inputs: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Each prompt's image tensors joined along the first dimension (zero-padded where shapes differ)."""
    inputs = [i for i in inputs if i]
    keys = inputs[0].keys() if inputs else ()
    stacked = {}
    for key in keys:
        tensors = [i[key] for i in inputs]
        shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
        padded = [_pad_to(t, shape) for t in tensors]
        stacked[IMAGE_PREFIX + key] = torch.cat(padded)
    return stacked


def _pad_to(tensor: torch.Tensor, shape: list[int]) -> torch.Tensor:
    if list(tensor.shape[1:]) == shape:
        return tensor
    out = tensor.new_zeros((tensor.shape[0], *shape))
    out[(slice(None), *(slice(0, n) for n in tensor.shape[1:]))] = tensor
    return out


def collate_prompts(prompts: list[VisionPrompt], completions: list[list[int]], pad_token_id: int,
                    repeats: int) -> dict:
    """Rows ``prompts * repeats`` + ``completions``; image tensors once per prompt; ``repeats`` recorded."""
    rows = prompts * repeats
    batch = collate_completions([p.ids for p in rows], completions, pad_token_id)
    if any(p.token_types is not None for p in rows):
        types = torch.zeros_like(batch["input_ids"])
        for i, p in enumerate(rows):
            types[i, :len(p.token_types or [])] = torch.tensor(p.token_types or [], dtype=torch.long)
        batch["mm_token_type_ids"] = types
    batch.update(stack_image_inputs([p.image_inputs for p in prompts]))
    batch["image_keys"] = torch.tensor([p.image_key for p in rows], dtype=torch.long)
    batch["repeats"] = repeats
    return batch


def collate_vision_pairs(pairs: list[VisionPair], pad_token_id: int) -> dict:
    batch = collate_prompts([p.prompt for p in pairs], [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs],
                            pad_token_id, repeats=2)
    batch["preference_prob"] = torch.tensor([p.preference_prob for p in pairs], dtype=torch.float32)
    batch["margin"] = torch.tensor([p.margin for p in pairs], dtype=torch.float32)
    batch["row"] = torch.tensor([p.row for p in pairs], dtype=torch.long)
    return batch


def collate_vision_examples(examples: list[VisionExample], pad_token_id: int) -> dict:
    batch = collate_prompts([e.prompt for e in examples], [e.completion_ids for e in examples], pad_token_id, 1)
    batch["loss_mask"] = batch["completion_mask"]
    return batch
