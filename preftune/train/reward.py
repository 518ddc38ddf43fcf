"""Reward models: a scalar head on a transformer, trained on preference pairs, used to score responses.

The model is ``AutoModelForSequenceClassification`` with one output, on any backbone:

* decoder backbones (Llama, GPT-2, ...; a ``score`` head): the backbone's hidden states are computed
  here and the head is applied at the last non-padding token, found from the attention mask. (The
  library's own lookup searches for the pad id and so misreads sequences that end in EOS when
  pad == eos.) Position ids come from the mask too, so left and right padding give the same reward;
* encoder backbones (BERT-style; a ``classifier`` head): the model's own pooling ([CLS]) is used. Prompt
  and response are concatenated as BERT's sentence pair: ``[CLS] prompt [SEP] response [SEP]`` with
  token type 1 on the response (a tokenizer without EOS gets its SEP token as EOS).

Sequences are tokenised exactly as for DPO (``preftune.data``): prompt ids, then response ids, then EOS.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from torch import nn

from ..config import RewardConfig, config_to_dict
from ..data import collate_pairs, load_records
from ..data.preference import (InvalidRow, _check_message_contents, _check_not_empty, _completion_text, _field,
                               _render, _require_chat_template, _strip_trailing_eos)
from ..errors import ConfigError
from ..losses import reward_loss
from ..models import is_peft_model, load_tokenizer, prepare_policy
from .dpo import load_pairs
from .loop import Trainer
from .run import RunResult, finish_run, save_final_model, start_run

console = Console(stderr=True)
HEAD_NAMES = ("score", "classifier")


# ---------------------------------------------------------------------- the model


def head_name(model) -> str:
    """Name of the classification head ("score" for decoders, "classifier" for BERT-style encoders)."""
    model = _unwrap(model)
    for name in HEAD_NAMES:
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    raise ConfigError(f"{type(model).__name__} has no classification head named {' or '.join(HEAD_NAMES)}")


def _unwrap(model):
    return model.get_base_model() if is_peft_model(model) else model


def reads_last_token(model) -> bool:
    """True for decoder-style classifiers: a ``score`` head over the backbone's per-token states."""
    model = _unwrap(model)
    return isinstance(getattr(model, "score", None), nn.Module) and hasattr(model, model.base_model_prefix)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position with attention mask 1 in each row (any padding side)."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    index = torch.where(attention_mask.bool(), positions, -1).amax(-1)
    if bool((index < 0).any()):
        raise ValueError("a sequence has no tokens (its attention mask is all zeros)")
    return index


def sequence_rewards(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
    """One float32 reward per sequence, ``[B]``; ``token_type_ids`` is used by encoders that have types."""
    hf = _unwrap(model)
    if reads_last_token(hf):
        backbone = getattr(hf, hf.base_model_prefix)
        accepted = inspect.signature(backbone.forward).parameters
        extra = {"use_cache": False} if "use_cache" in accepted else {}
        if "position_ids" in accepted:  # positions count real tokens only, so left padding changes nothing
            extra["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        last = hidden[rows, last_token_index(attention_mask).to(hidden.device)]
        return hf.score(last).squeeze(-1).float()
    extra = {}
    if token_type_ids is not None and getattr(hf.config, "type_vocab_size", 0) >= 2:
        extra["token_type_ids"] = token_type_ids
    return hf(input_ids=input_ids, attention_mask=attention_mask, **extra).logits.squeeze(-1).float()


class RewardScorer(nn.Module):
    """Token ids -> rewards; the loop prepares (and under data parallelism wraps) this module."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        return sequence_rewards(self.model, input_ids, attention_mask, token_type_ids)


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


def prepare_reward_model(model, cfg):
    """Dropout, gradient checkpointing and LoRA (the head is trained in full: ``modules_to_save``)."""
    return prepare_policy(model, cfg, task_type="SEQ_CLS", modules_to_save=[head_name(model)])


def check_reward_model(model) -> None:
    """A sequence classifier with one output, else ConfigError."""
    head_name(model)
    labels = getattr(_unwrap(model).config, "num_labels", None)
    if labels != 1:
        raise ConfigError(f"a reward model needs a classification head with one output, this one has {labels}; "
                          "load it with AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)")


def load_reward_model(path, device=None):
    """A saved reward model (full or LoRA adapter) and its tokenizer, in eval mode on ``device``."""
    tokenizer = prepare_tokenizer(load_tokenizer(str(path)))
    return _load_weights(path, tokenizer.pad_token_id, device), tokenizer


def _load_weights(path, pad_token_id: int, device=None):
    path_text = str(path)
    adapter = Path(path_text) / "adapter_config.json"
    if adapter.is_file():
        from peft import PeftModel

        base_name = json.loads(adapter.read_text()).get("base_model_name_or_path")
        if not base_name:
            raise ConfigError(f"{adapter}: no base_model_name_or_path to load the adapter onto")
        model = PeftModel.from_pretrained(load_classifier(base_name), path_text).merge_and_unload()
    else:
        model = load_classifier(path_text)
    model.config.pad_token_id = pad_token_id
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval()


# ---------------------------------------------------------------------- training


def expected_calibration_error(probs: torch.Tensor, outcomes: torch.Tensor, bins: int = 10) -> float:
    """ECE of the predicted probability that the chosen response is preferred.

    q_i = σ(r_c - r_r); the outcome y_i is 1 ("chosen is preferred") for hard labels and the row's
    preference_prob for soft labels. With bins B_k = [k/10, (k+1)/10) (the last one includes 1),

        ECE = Σ_k (|B_k| / N) · |mean_{i∈B_k} q_i - mean_{i∈B_k} y_i|.

    With hard labels only, every outcome is 1 and ECE = 1 - mean(q): it measures under-confidence.
    """
    probs, outcomes = probs.double().flatten(), outcomes.double().flatten()
    if probs.numel() == 0:
        return float("nan")
    index = (probs * bins).floor().long().clamp(0, bins - 1)
    total = 0.0
    for k in range(bins):
        chosen = index == k
        if bool(chosen.any()):
            gap = (probs[chosen].mean() - outcomes[chosen].mean()).abs()
            total += float(chosen.sum()) / probs.numel() * float(gap)
    return total


class RewardTask:
    """Chosen and rejected in one forward; the configured reward loss and its metrics."""

    def __init__(self, cfg: RewardConfig, pad_token_id: int):
        self.cfg = cfg
        self.pad_token_id = pad_token_id

    def collate(self, pairs) -> dict[str, torch.Tensor]:
        return collate_pairs(pairs, self.pad_token_id)

    def rewards(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        rewards = model(batch["input_ids"], batch["attention_mask"], batch["completion_mask"].long())
        half = rewards.shape[0] // 2
        return rewards[:half], rewards[half:]

    def _loss(self, chosen, rejected, batch):
        return reward_loss(self.cfg.loss_type, chosen, rejected, margin=batch["margin"],
                           preference_prob=batch["preference_prob"].nan_to_num(1.0), ranking_margin=self.cfg.margin,
                           centering_coef=self.cfg.centering_coef)

    def loss(self, model, batch):
        return self._loss(*self.rewards(model, batch), batch)

    def eval_metrics(self, model, batch):
        chosen, rejected = self.rewards(model, batch)
        metrics = self._loss(chosen, rejected, batch)[1]
        metrics["prob_chosen"] = torch.sigmoid(chosen - rejected).detach()   # per pair, for eval_summary
        metrics["outcome"] = batch["preference_prob"].nan_to_num(1.0)   # NaN: no column, a hard label
        return metrics

    def eval_summary(self, outputs: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        if not outputs:
            return {}
        probs = torch.cat([o["prob_chosen"] for o in outputs])
        outcomes = torch.cat([o["outcome"] for o in outputs])
        return {"ece": expected_calibration_error(probs, outcomes)}


def train_reward(cfg: RewardConfig, *, model=None, tokenizer=None) -> RunResult:
    """Train a reward model on preference pairs. ``model``/``tokenizer`` may be passed as objects."""
    cfg.validate(require_model=model is None)
    ctx = start_run(cfg, cfg.sanity_warnings())
    tokenizer = prepare_tokenizer(tokenizer or load_tokenizer(cfg.tokenizer_name_or_path or cfg.model_name_or_path))
    train_pairs, eval_pairs = load_pairs(cfg, tokenizer)
    if cfg.loss_type != "soft_label" and any(p.preference_prob < 1 for p in train_pairs) and ctx.is_main_process:
        console.print(f"[yellow]warning:[/] the data has preference_prob values below 1, which loss_type={cfg.loss_type} "
                      "ignores (it treats every pair as certain); use --loss_type soft_label to use them")
    if model is None:
        torch.manual_seed(cfg.seed)  # the new head's initial weights
        model = load_classifier(cfg.model_name_or_path, new_head=True)
    check_reward_model(model)
    model.config.pad_token_id = tokenizer.pad_token_id
    model = prepare_reward_model(model, cfg)
    trainer = Trainer(accelerator=ctx.accelerator, model=RewardScorer(model), task=RewardTask(cfg, tokenizer.pad_token_id),
                      train_examples=train_pairs, eval_examples=eval_pairs, settings=cfg, run_dir=ctx.run_dir,
                      config_dict=config_to_dict(cfg), count_tokens=lambda b: int(b["attention_mask"].sum()))
    result = trainer.train()
    model_dir = save_final_model(ctx.accelerator, trainer.unwrapped().model, tokenizer, ctx.run_dir / "model", cfg.merge_lora)
    return finish_run(ctx, model_dir, result)


# ---------------------------------------------------------------------- scoring


def _fit(prompt: list[int], response: list[int], max_length: int | None) -> tuple[list[int], list[int]]:
    """Cut the start of the prompt (then the end of the response) to fit ``max_length``."""
    if max_length is None or len(prompt) + len(response) <= max_length:
        return prompt, response
    keep = max(max_length - len(response), 0)
    prompt = prompt[len(prompt) - keep:] if keep else []
    return prompt, response[:max_length - len(prompt)]


def tokenize_for_scoring(tokenizer, prompts: list[str], responses: list[str], max_length: int | None = None,
                         prompt_special_tokens: bool = True) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids + EOS) per row, as in training. A response's trailing EOS text is dropped."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    eos, eos_text = tokenizer.eos_token_id, tokenizer.eos_token
    if eos is None:  # as prepare_tokenizer: an encoder's SEP
        eos, eos_text = getattr(tokenizer, "sep_token_id", None), getattr(tokenizer, "sep_token", None)
    if eos is None:
        raise ConfigError("the tokenizer has no EOS token, but every response must end with one; set tokenizer.eos_token")
    if not prompts:
        return []
    prompt_ids = tokenizer(list(prompts), add_special_tokens=prompt_special_tokens, verbose=False)["input_ids"]
    texts = [_strip_trailing_eos(r, eos_text) for r in responses]
    response_ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    return [_fit(list(p), list(r) + [eos], max_length) for p, r in zip(prompt_ids, response_ids)]


@torch.inference_mode()
def score_token_ids(model, sequences: list[tuple[list[int], list[int]]], pad_token_id: int,
                    batch_size: int = 16) -> list[float]:
    """Rewards of (prompt ids, response ids) rows, in their order; batches hold rows of similar length."""
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: -sum(map(len, sequences[i])))
    rewards = [0.0] * len(sequences)
    was_training = model.training
    model.eval()
    try:
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
    finally:
        model.train(was_training)
    return rewards


def score_texts(model, tokenizer, prompts: list[str], responses: list[str], batch_size: int = 16, *,
                max_length: int | None = None, prompt_special_tokens: bool = True) -> list[float]:
    """Reward of each (prompt, response) string pair, no gradients.

    Tokenised as in training: the prompt with the tokenizer's special tokens (BOS; pass
    ``prompt_special_tokens=False`` for a prompt already rendered by a chat template), the response
    without, then EOS. ``max_length`` cuts the start of long prompts.
    """
    sequences = tokenize_for_scoring(tokenizer, prompts, responses, max_length, prompt_special_tokens)
    return score_token_ids(model, sequences, tokenizer.pad_token_id, batch_size)


def _scoring_texts(row: dict, messages: bool, tokenizer) -> tuple[str, str]:
    """Validate one scoring row and return (prompt text, response text)."""
    if messages and isinstance(row.get("response"), str):  # a generated reply to a conversation
        row = {**row, "response": [{"role": "assistant", "content": row["response"]}]}
    prompt, response = _field(row, "prompt", messages), _field(row, "response", messages)
    _check_not_empty("response", response)
    if not messages:
        return prompt, response
    _check_message_contents("response", response)
    prompt_text = _render(tokenizer, prompt, "prompt", add_generation_prompt=response[0]["role"] == "assistant")
    return prompt_text, _completion_text(tokenizer, prompt, prompt_text, response, "response")


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
        _require_chat_template(tokenizer)
    prompts, responses = [], []
    for row, number in zip(records.rows, records.row_numbers):
        try:
            prompt, response = _scoring_texts(row, messages, tokenizer)
        except InvalidRow as invalid:
            raise invalid.problem(records.name, number).error from None
        prompts.append(prompt)
        responses.append(response)
    model = _load_weights(model_path, tokenizer.pad_token_id, device)  # after the rows proved valid
    rewards = score_texts(model, tokenizer, prompts, responses, batch_size, max_length=max_length,
                          prompt_special_tokens=not messages)
    output = Path(output_path)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.with_name(output.name + ".partial")
    with open(staging, "w", encoding="utf-8") as handle:
        for row, reward in zip(records.rows, rewards):
            handle.write(json.dumps({**row, "reward": reward}, ensure_ascii=False, default=str) + "\n")
    os.replace(staging, output)
    mean = sum(rewards) / len(rewards) if rewards else math.nan
    return ScoreResult(output, len(rewards), mean)

