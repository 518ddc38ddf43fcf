"""Reward-model inference: load a trained reward model and score (prompt, response) pairs with it.

The model is ``AutoModelForSequenceClassification`` with one output, on any backbone:

* decoder backbones (Llama, GPT-2, ...; a ``score`` head): the backbone's hidden states are computed
  here and the head is applied where transformers' own ``forward`` applies it: at the rightmost token
  that is not the config's pad id, searched within the attention mask (the last masked-in token when the
  config has no pad id). Position ids come from the mask, so left and right padding give the same reward,
  and a checkpoint scores the same here as through ``AutoModelForSequenceClassification(ids).logits``.
  Training gives the tokenizer and config a pad token distinct from EOS (:func:`distinct_pad_token`), so
  the reward of a model trained here is read at the EOS that ends every response;
* encoder backbones (BERT-style; a ``classifier`` head): the model's own pooling ([CLS]) is used. Prompt
  and response are concatenated as BERT's sentence pair: ``[CLS] prompt [SEP] response [SEP]`` with
  token type 1 on the response (a tokenizer without EOS gets its SEP token as EOS).

Sequences are tokenised exactly as in training (``preftune.data``): prompt ids, then response ids, then
EOS. Prompts given as chat messages are rendered with the reward model's own chat template.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch
from torch import nn

from ..data.messages import render, strip_trailing_eos
from ..errors import ConfigError
from ..models import load_tokenizer, peft_wrapping
from ..wrappers import base_model, evaluating
from .base import CheckedScorer, check_batch_size

HEAD_NAMES = ("score", "classifier")


def head_name(model) -> str:
    """Name of the classification head ("score" for decoders, "classifier" for BERT-style encoders)."""
    model = base_model(model)
    for name in HEAD_NAMES:
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    raise ConfigError(f"{type(model).__name__} has no classification head named {' or '.join(HEAD_NAMES)}")


def reads_last_token(model) -> bool:
    """True for decoder-style classifiers: a ``score`` head over the backbone's per-token states."""
    model = base_model(model)
    return isinstance(getattr(model, "score", None), nn.Module) and hasattr(model, model.base_model_prefix)


def pooled_index(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """Where the head reads each row: the rightmost masked-in token whose id is not ``pad_token_id``.

    This is transformers' rule for decoder sequence classifiers (the rightmost token that is not the
    config's pad id), restricted to the attention mask so that left padding reads the same place. A row
    made only of pad ids reads its last masked-in token.
    """
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    inside = attention_mask.bool()
    last = torch.where(inside, positions, -1).amax(-1)
    if bool((last < 0).any()):
        raise ValueError("a sequence has no tokens (its attention mask is all zeros)")
    if pad_token_id is None:
        return last
    content = torch.where(inside & (input_ids != pad_token_id), positions, -1).amax(-1)
    return torch.where(content >= 0, content, last)


def distinct_pad_token(tokenizer) -> None:
    """Give the tokenizer a pad token other than EOS when it has one to spare (unknown, BOS or another special).

    transformers' sequence classifiers read the rightmost token that is not padding, and so does
    :func:`pooled_index`: with pad == EOS (SmolLM2, and every tokenizer given EOS as pad) both would read
    the token before the EOS that ends every response. With a distinct pad, saved with the tokenizer and
    the config, both read the EOS itself. A tokenizer whose only special token is EOS (GPT-2) keeps it
    as pad (adding a token would change the vocabulary): both then read the last token before EOS.
    """
    eos = tokenizer.eos_token_id
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != eos:
        return
    candidates = [tokenizer.unk_token, tokenizer.bos_token, *tokenizer.all_special_tokens]
    spare = next((t for t in candidates if t is not None and tokenizer.convert_tokens_to_ids(t) != eos), None)
    if spare is not None:
        tokenizer.pad_token = spare


def sequence_rewards(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
    """One float32 reward per sequence, ``[B]``; ``token_type_ids`` is used by encoders that have types."""
    hf = base_model(model)
    if reads_last_token(hf):
        backbone = getattr(hf, hf.base_model_prefix)
        accepted = inspect.signature(backbone.forward).parameters
        extra = {"use_cache": False} if "use_cache" in accepted else {}
        if "position_ids" in accepted:  # positions count real tokens only, so left padding changes nothing
            extra["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        index = pooled_index(input_ids, attention_mask, hf.config.get_text_config().pad_token_id)
        last = hidden[rows, index.to(hidden.device)]
        return hf.score(last).squeeze(-1).float()
    extra = {}
    if token_type_ids is not None and getattr(hf.config, "type_vocab_size", 0) >= 2:
        extra["token_type_ids"] = token_type_ids
    return hf(input_ids=input_ids, attention_mask=attention_mask, **extra).logits.squeeze(-1).float()


def check_reward_model(model) -> None:
    """A sequence classifier with one output, else ConfigError."""
    head_name(model)
    labels = getattr(base_model(model).config, "num_labels", None)
    if labels != 1:
        raise ConfigError(f"a reward model needs a classification head with one output, this one has {labels}; "
                          "load it with AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)")


def prepare_tokenizer(tokenizer):
    """Responses end with EOS: a tokenizer without one (BERT) uses its SEP token."""
    if tokenizer.eos_token_id is None and getattr(tokenizer, "sep_token", None) is not None:
        tokenizer.eos_token = tokenizer.sep_token
    return tokenizer


def load_classifier(name_or_path, dtype: torch.dtype = torch.float32, new_head: bool = False):
    """``AutoModelForSequenceClassification`` with one output (a new head on a causal LM checkpoint).

    ``new_head``: a checkpoint's classification head of another size (say 2 labels) is drawn afresh.
    """
    from transformers import AutoModelForSequenceClassification

    from ..gguf_import import resolve_model_path

    name_or_path = resolve_model_path(name_or_path)   # a .gguf file: its converted checkpoint
    try:
        return AutoModelForSequenceClassification.from_pretrained(name_or_path, num_labels=1, dtype=dtype,
                                                                  ignore_mismatched_sizes=new_head)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"cannot load '{name_or_path}' as a reward model: {exc}") from None


def load_reward_model(path, device=None):
    """A saved reward model (full or LoRA adapter) and its tokenizer, in eval mode on ``device``."""
    tokenizer = prepare_tokenizer(load_tokenizer(str(path)))
    return load_weights(path, tokenizer.pad_token_id, device), tokenizer


def load_weights(path, pad_token_id: int, device=None):
    path_text = str(path)
    adapter = Path(path_text) / "adapter_config.json"
    if adapter.is_file():
        from peft import PeftModel

        base_name = json.loads(adapter.read_text()).get("base_model_name_or_path")
        if not base_name:
            raise ConfigError(f"{adapter}: no base_model_name_or_path to load the adapter onto")
        with peft_wrapping():
            model = PeftModel.from_pretrained(load_classifier(base_name), path_text).merge_and_unload()
        model.config.pad_token_id = pad_token_id   # the base's config; training used the adapter's tokenizer
    else:
        model = load_classifier(path_text)   # its saved config's pad id decides where it is read, as in transformers
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval()


def _fit(prompt: list[int], response: list[int], max_length: int | None) -> tuple[list[int], list[int]]:
    """Cut the start of the prompt (then the end of the response) to fit ``max_length``."""
    if max_length is None or len(prompt) + len(response) <= max_length:
        return prompt, response
    keep = max(max_length - len(response), 0)
    prompt = prompt[len(prompt) - keep:] if keep else []
    return prompt, response[:max_length - len(prompt)]


def _encode_prompts(tokenizer, prompts: list, special_tokens: bool) -> list[list[int]]:
    """Strings with (or without) special tokens; message lists rendered by the chat template, without."""
    texts = [render(tokenizer, p, "prompt", add_generation_prompt=True) if isinstance(p, list) else p for p in prompts]
    flags = [special_tokens and isinstance(p, str) for p in prompts]
    ids: list[list[int]] = [[] for _ in prompts]
    for flag in (True, False):
        index = [i for i, f in enumerate(flags) if f == flag]
        if index:
            encoded = tokenizer([texts[i] for i in index], add_special_tokens=flag, verbose=False)["input_ids"]
            for i, row in zip(index, encoded):
                ids[i] = list(row)
    return ids


def tokenize_for_scoring(tokenizer, prompts: list, responses: list[str], max_length: int | None = None,
                         prompt_special_tokens: bool = True) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids + EOS) per row, as in training. A response's trailing EOS text is dropped."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    eos, eos_text = tokenizer.eos_token_id, tokenizer.eos_token
    if eos is None:  # as prepare_tokenizer: an encoder's SEP
        eos, eos_text = getattr(tokenizer, "sep_token_id", None), getattr(tokenizer, "sep_token", None)
    if eos is None:
        raise ConfigError("the tokenizer has no EOS token (nor SEP), but every response must end with one; "
                          "set tokenizer.eos_token")
    if not prompts:
        return []
    prompt_ids = _encode_prompts(tokenizer, prompts, prompt_special_tokens)
    texts = [strip_trailing_eos(r, eos_text) for r in responses]
    response_ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    return [_fit(list(p), list(r) + [eos], max_length) for p, r in zip(prompt_ids, response_ids)]


@torch.inference_mode()
def score_token_ids(model, sequences: list[tuple[list[int], list[int]]], pad_token_id: int,
                    batch_size: int = 16) -> list[float]:
    """Rewards of (prompt ids, response ids) rows, in their order; batches hold rows of similar length."""
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: -sum(map(len, sequences[i])))
    rewards = [0.0] * len(sequences)
    with evaluating(model):
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            width = max(sum(map(len, sequences[i])) for i in chunk)
            ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            types = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                prompt, response = sequences[i]
                ids[row, :len(prompt) + len(response)] = torch.tensor(prompt + response, dtype=torch.long)
                mask[row, :len(prompt) + len(response)] = 1
                types[row, len(prompt):len(prompt) + len(response)] = 1
            values = sequence_rewards(model, ids.to(device), mask.to(device), types.to(device))
            for i, value in zip(chunk, values.tolist()):
                rewards[i] = value
    return rewards


def score_texts(model, tokenizer, prompts: list, responses: list[str], batch_size: int = 16, *,
                max_length: int | None = None, prompt_special_tokens: bool = True) -> list[float]:
    """Reward of each (prompt, response) string pair, no gradients.

    Tokenised as in training: the prompt with the tokenizer's special tokens (BOS; pass
    ``prompt_special_tokens=False`` for a prompt already rendered by a chat template), the response
    without, then EOS. A prompt may be a list of messages: it is rendered with the chat template and
    the generation prompt. ``max_length`` cuts the start of long prompts.
    """
    sequences = tokenize_for_scoring(tokenizer, prompts, responses, max_length, prompt_special_tokens)
    return score_token_ids(model, sequences, tokenizer.pad_token_id, batch_size)


class RewardModelScorer(CheckedScorer):
    """A reward model trained with ``preftune reward`` (a directory, a LoRA adapter or a hub name)."""

    def __init__(self, path=None, *, model=None, tokenizer=None, device=None, batch_size: int = 16,
                 max_length: int | None = None, prompt_special_tokens: bool = True):
        self.name = f"reward model {path}" if path is not None else "reward model"
        self.batch_size = check_batch_size(self.name, batch_size)
        if model is None:
            model, tokenizer = load_reward_model(path, device)
        self.model, self.tokenizer, self.max_length = model.requires_grad_(False), tokenizer, max_length
        self.prompt_special_tokens = prompt_special_tokens   # False: string prompts already rendered by a template

    def raw_scores(self, prompts, responses):
        return score_texts(self.model, self.tokenizer, prompts, responses, self.batch_size, max_length=self.max_length,
                           prompt_special_tokens=self.prompt_special_tokens)
