"""Run configurations: dataclasses read from YAML, every field also a command-line flag.

One dataclass per command. Each field's ``help`` metadata is its documentation: ``--help`` shows it
and the README table is generated from it. Values are validated here, before any model is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


def _f(default, help: str, **extra):
    """A dataclass field with its help text (and optional CLI metadata such as ``choices``)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class ModelSettings:
    """How the policy (and its reference) are loaded."""

    model_name_or_path: str | None = _f(None, "Policy model: a local directory or a hub name (required).")
    tokenizer_name_or_path: str | None = _f(None, "Tokenizer, if not the model's own.")
    ref_model_name_or_path: str | None = _f(
        None, "Reference model; default: the policy's starting weights (with LoRA: the policy with adapters disabled).")
    precision: str = _f("auto", "auto (bf16 on GPUs that support it, fp32 on CPU), fp32, bf16 or fp16.",
                        choices=["auto", "fp32", "bf16", "fp16"])
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass to save memory.")
    disable_dropout: bool = _f(True, "Turn off dropout in the policy and reference (LoRA dropout is kept).")
    lora: bool = _f(False, "Train LoRA adapters instead of all weights.")
    lora_r: int = _f(8, "LoRA rank.")
    lora_alpha: int = _f(16, "LoRA scaling alpha.")
    lora_dropout: float = _f(0.05, "Dropout on the LoRA branch.")
    lora_target_modules: list[str] = _f(["all-linear"], "Modules to adapt; 'all-linear' means every linear layer but the output head.")
    merge_lora: bool = _f(False, "Save the final model with the adapter merged into the base weights.")


@dataclass
class DataSettings:
    """Where preference pairs come from and how they are tokenised."""

    dataset: str | None = _f(None, "Training data: JSONL/JSON/Parquet/CSV file, save_to_disk directory or hub name (required).")
    split: str = _f("train", "Split to read from a directory or hub dataset.")
    eval_dataset: str | None = _f(None, "Held-out data; default: a fraction of the training data (eval_fraction).")
    eval_split: str = _f("test", "Split of eval_dataset to read.")
    eval_fraction: float = _f(0.0, "Fraction of the training rows held out for evaluation when eval_dataset is not given.")
    max_length: int = _f(1024, "Maximum prompt + completion tokens.")
    max_prompt_length: int | None = _f(None, "Maximum prompt tokens (the end of the prompt is kept).")
    truncation_mode: str = _f("keep_end", "keep_end: shorten the prompt from its start; keep_start: cut completions at the end; "
                              "error: reject rows that do not fit.", choices=["keep_end", "keep_start", "error"])
    skip_invalid: bool = _f(False, "Skip invalid rows (and report them) instead of stopping at the first one.")


@dataclass
class TrainSettings:
    """The shared training loop."""

    output_dir: str = _f("runs/run", "Run directory: metrics.jsonl, checkpoints/ and the final model/.")
    overwrite_output_dir: bool = _f(False, "Start afresh in an output_dir that holds an earlier run (its metrics, "
                                    "checkpoints and model are deleted). Without it such a run is refused unless --resume.")
    seed: int = _f(42, "Seed for weights of new heads, data order and dropout.")
    num_epochs: float = _f(1.0, "Passes over the training data.")
    max_steps: int = _f(-1, "Stop after this many optimiser steps (overrides num_epochs when > 0).")
    per_device_batch_size: int = _f(8, "Pairs per device per forward pass.")
    gradient_accumulation_steps: int = _f(1, "Forward passes per optimiser step.")
    learning_rate: float = _f(1e-6, "Peak learning rate (AdamW).")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    max_grad_norm: float = _f(1.0, "Clip the gradient norm to this value (0 disables clipping).")
    lr_scheduler: str = _f("linear", "Learning-rate schedule after warm-up.", choices=["linear", "cosine", "constant"])
    warmup_ratio: float = _f(0.1, "Fraction of steps spent warming up linearly from 0.")
    warmup_steps: int = _f(0, "Warm-up steps (overrides warmup_ratio when > 0).")
    logging_steps: int = _f(10, "Write averaged metrics every this many steps.")
    eval_steps: int = _f(0, "Evaluate every this many steps (0: only at the end).")
    eval_on_start: bool = _f(False, "Also evaluate before the first step (a baseline for the held-out metrics).")
    save_steps: int = _f(0, "Checkpoint every this many steps (0: no intermediate checkpoints).")
    save_total_limit: int = _f(2, "Keep only the newest this many checkpoints.")
    resume: str | None = _f(None, "Resume from a checkpoint directory, or 'latest' for the newest in output_dir.",
                            nargs="?", const="latest")
    report_to: list[str] = _f([], "Also send metrics to: tensorboard, wandb.")
    logprob_chunk_size: int = _f(1024, "Tokens per chunk when projecting hidden states onto the vocabulary.")


@dataclass
class DPOConfig(ModelSettings, DataSettings, TrainSettings):
    """``preftune dpo``: Direct Preference Optimization and its family."""

    loss_type: str = _f("sigmoid", "Preference loss: sigmoid (DPO), ipo, hinge (SLiC), robust (rDPO), simpo (reference-free).",
                        choices=["sigmoid", "ipo", "hinge", "robust", "simpo"])
    beta: float = _f(0.1, "Strength of the KL constraint (DPO's beta).")
    label_smoothing: float = _f(0.0, "Global label noise epsilon (soft labels; rDPO's noise rate). "
                                "A per-row preference_prob column takes precedence.")
    simpo_gamma: float = _f(0.5, "SimPO target reward margin.")
    nll_weight: float = _f(0.0, "Weight of an NLL term on the chosen response added to the loss.")
    constraints: list[str] = _f([], "Extra penalty terms 'module:function[=weight]', each called with the batch's log-probs.")
    precompute_ref: bool = _f(False, "Compute reference log-probs once before training and cache them on disk.")
    cache_dir: str | None = _f(None, "Where precomputed reference log-probs are cached (default ~/.cache/preftune).")

    def validate(self, require_model: bool = True) -> None:
        _validate_common(self, require_model)
        if not (0.0 <= self.label_smoothing < 0.5):
            raise ConfigError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if not (self.beta > 0 and math.isfinite(self.beta)):
            raise ConfigError(f"beta must be a positive number, got {self.beta}")
        for spec in self.constraints:
            parse_constraint_spec(spec)

    def sanity_warnings(self) -> list[str]:
        """Hyper-parameters far outside the ranges practitioners report (MISSION.md section 2)."""
        notes = []
        low, high = (0.5, 10.0) if self.loss_type == "simpo" else (0.01, 1.0)
        if not low <= self.beta <= high:
            notes.append(f"beta={self.beta} is far outside the usual range ({low}-{high}; 0.1-0.5 is typical for DPO).")
        if not 1e-7 <= self.learning_rate <= 1e-4:
            notes.append(f"learning_rate={self.learning_rate:g} is far outside the usual 1e-6 to 1e-5 for preference tuning.")
        pairs = self.per_device_batch_size * self.gradient_accumulation_steps
        if not 4 <= pairs <= 1024:
            notes.append(f"{pairs} pairs per optimiser step (per device) is far outside the usual 32-128.")
        return notes


def parse_constraint_spec(spec: str) -> tuple[str, float]:
    """'pkg.mod:fn=0.5' -> ('pkg.mod:fn', 0.5)."""
    target, has_weight, weight = spec.partition("=")
    if ":" not in target or not target.split(":", 1)[0] or not target.split(":", 1)[1]:
        raise ConfigError(f"constraint '{spec}' must look like 'module:function' or 'module:function=weight'")
    if not has_weight:
        return target, 1.0
    try:
        value = float(weight)
    except ValueError:
        raise ConfigError(f"constraint '{spec}': weight '{weight}' is not a number") from None
    if not math.isfinite(value):
        raise ConfigError(f"constraint '{spec}': weight must be a finite number")
    return target, value


def _validate_common(cfg, require_model: bool = True) -> None:
    """Checks shared by the commands that read a dataset of rows with ``max_length`` tokens."""
    if require_model and not cfg.model_name_or_path:
        raise ConfigError("model_name_or_path is required (a local model directory or a hub name)")
    if not cfg.dataset:
        raise ConfigError("dataset is required (a data file, a save_to_disk directory or a hub name)")
    _check_ranges(cfg, positive=["max_length"])
    if not 0.0 <= cfg.eval_fraction < 1.0:
        raise ConfigError(f"eval_fraction must be in [0, 1), got {cfg.eval_fraction}")
    if cfg.max_prompt_length is not None and cfg.max_prompt_length >= cfg.max_length:
        raise ConfigError(f"max_prompt_length ({cfg.max_prompt_length}) must be smaller than max_length ({cfg.max_length})")
    validate_training(cfg)


def _check_ranges(cfg, positive=(), positive_numbers=(), non_negative=(), unit_interval=()) -> None:
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{name} must be positive, got {getattr(cfg, name)}")
    for name in positive_numbers:
        if not (getattr(cfg, name) > 0 and math.isfinite(getattr(cfg, name))):
            raise ConfigError(f"{name} must be a positive number, got {getattr(cfg, name)}")
    for name in non_negative:
        if not (getattr(cfg, name) >= 0 and math.isfinite(getattr(cfg, name))):
            raise ConfigError(f"{name} must be a non-negative number, got {getattr(cfg, name)}")
    for name in unit_interval:
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ConfigError(f"{name} must be in [0, 1], got {getattr(cfg, name)}")


def validate_training(cfg) -> None:
    """Checks of the ``ModelSettings`` and ``TrainSettings`` every training command shares."""
    _check_ranges(cfg, positive=["per_device_batch_size", "gradient_accumulation_steps", "logging_steps",
                                 "logprob_chunk_size", "lora_r", "lora_alpha"],
                  positive_numbers=["learning_rate", "num_epochs"], non_negative=["max_grad_norm", "weight_decay"],
                  unit_interval=["warmup_ratio"])
    if not 0.0 <= cfg.lora_dropout < 1.0:
        raise ConfigError(f"lora_dropout must be in [0, 1), got {cfg.lora_dropout}")
    for tracker in cfg.report_to:
        if tracker not in ("tensorboard", "wandb"):
            raise ConfigError(f"report_to: unknown tracker '{tracker}' (choose tensorboard or wandb)")
    for f in dataclasses.fields(cfg):
        choices = f.metadata.get("choices")
        if choices and getattr(cfg, f.name) not in choices:
            raise ConfigError(f"{f.name} must be one of {', '.join(choices)}, got '{getattr(cfg, f.name)}'")


# ---------------------------------------------------------------- YAML and flags


def _base_type(annotation) -> tuple[type, bool]:
    """(scalar type, is_list) of a field annotation such as ``int | None`` or ``list[str]``."""
    hint = annotation
    if isinstance(hint, str):
        hint = eval(hint, {"list": list, "str": str, "int": int, "float": float, "bool": bool, "None": None})  # noqa: S307
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        hint = args[0]
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True
    return hint, False


def _coerce(cls, name: str, value: Any, source: str):
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    base, is_list = _base_type(f.type)
    if value is None:
        return None
    try:
        if is_list:
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list):
                raise TypeError
            return [base(v) for v in value]
        if base is bool:
            if isinstance(value, bool):
                return value
            raise TypeError
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if base is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if base in (int, float) and isinstance(value, str):
            return base(value)
        raise TypeError
    except (TypeError, ValueError):
        expected = f"a list of {base.__name__}" if is_list else base.__name__
        raise ConfigError(f"{source}: '{name}' must be {expected}, got {value!r}") from None


def load_config(cls, path: str | Path | None = None, overrides: dict[str, Any] | None = None):
    """Build ``cls`` from a YAML file and overrides (flags win), validating names and types."""
    values: dict[str, Any] = {}
    names = [f.name for f in dataclasses.fields(cls)]
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of option names to values")
        for key, value in loaded.items():
            if key not in names:
                hint = difflib.get_close_matches(str(key), names, n=1)
                raise ConfigError(f"{path}: unknown option '{key}'" + (f" (did you mean '{hint[0]}'?)" if hint else ""))
            values[key] = _coerce(cls, key, value, str(path))
    for key, value in (overrides or {}).items():
        if key not in names:
            raise ConfigError(f"unknown option '{key}'")
        values[key] = _coerce(cls, key, value, "command line")
    cfg = cls(**values)
    cfg.validate()
    return cfg


def add_config_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per field, documented by its help text; unset flags do not override the YAML."""
    parser.add_argument("--config", help="YAML file with any of the options below (flags override it).")
    for f in dataclasses.fields(cls):
        base, is_list = _base_type(f.type)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": f"{f.metadata.get('help', '')} (default: {default})"}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif is_list:
            kwargs.update(nargs="*", type=base, metavar=f.name.upper())
        else:
            kwargs["type"] = _optional(base)
            kwargs["metavar"] = base.__name__.upper()
            if "nargs" in f.metadata:
                kwargs.update(nargs=f.metadata["nargs"], const=f.metadata["const"])
        parser.add_argument(f"--{f.name}", **kwargs)


def _optional(base):
    def parse(text: str):
        if text.lower() in ("none", "null"):
            return None
        return base(text)

    parse.__name__ = base.__name__
    return parse


def config_from_args(cls, args: argparse.Namespace):
    overrides = {k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(cls)}}
    return load_config(cls, getattr(args, "config", None), overrides)


def config_to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


@dataclass
class RewardConfig(ModelSettings, DataSettings, TrainSettings):
    """``preftune reward``: a scalar reward model trained on preference pairs."""

    learning_rate: float = _f(1e-5, "Peak learning rate (AdamW).")
    loss_type: str = _f("bradley_terry", "Reward loss: bradley_terry (-log σ(r_c - r_r - m)), ranking (relu(margin - (r_c - r_r))), "
                        "soft_label (Bradley-Terry against the per-row preference_prob).",
                        choices=["bradley_terry", "ranking", "soft_label"])
    margin: float = _f(1.0, "Required gap r_c - r_r of the ranking loss (a per-row margin column is added to it).")
    centering_coef: float = _f(0.0, "Weight of the centring penalty (r_c + r_r)² that keeps rewards near 0.")

    def validate(self, require_model: bool = True) -> None:
        _validate_common(self, require_model)
        if not (self.margin >= 0 and math.isfinite(self.margin)):
            raise ConfigError(f"margin must be a non-negative number, got {self.margin}")
        if not (self.centering_coef >= 0 and math.isfinite(self.centering_coef)):
            raise ConfigError(f"centering_coef must be a non-negative number, got {self.centering_coef}")
        if self.ref_model_name_or_path:
            raise ConfigError("ref_model_name_or_path: a reward model has no reference model; remove this option")

    def sanity_warnings(self) -> list[str]:
        """Hyper-parameters far outside the ranges practitioners use for reward models."""
        notes = []
        if not 1e-7 <= self.learning_rate <= 1e-3:
            notes.append(f"learning_rate={self.learning_rate:g} is far outside the usual 1e-6 to 1e-4 for reward models.")
        return notes


# ---------------------------------------------------------------- pretraining and SFT


@dataclass
class PretrainConfig(ModelSettings, TrainSettings):
    """``preftune pretrain``: next-token prediction on raw text, packed into rows of max_length tokens."""

    model_config: str | None = _f(None, "Start from random weights shaped by this config (a config.json or a model "
                                        "directory) instead of model_name_or_path; needs tokenizer_name_or_path.")
    dataset: str | None = _f(None, "Raw text: a .txt file (one document per blank-line-separated block), a directory "
                                   "of .txt files, JSONL/JSON/Parquet/CSV or save_to_disk data with a text column, "
                                   "or a hub name (required).")
    text_column: str = _f("text", "Column holding the documents (tabular and hub data).")
    split: str = _f("train", "Split to read from a directory or hub dataset.")
    eval_dataset: str | None = _f(None, "Held-out text; default: a fraction of the documents (eval_fraction).")
    eval_split: str = _f("test", "Split of eval_dataset to read.")
    eval_fraction: float = _f(0.0, "Fraction of the documents held out for evaluation when eval_dataset is not given.")
    max_length: int = _f(1024, "Tokens per packed row (documents are concatenated with EOS and cut into such rows).")
    skip_invalid: bool = _f(False, "Skip invalid rows (and report them) instead of stopping at the first one.")
    learning_rate: float = _f(3e-4, "Peak learning rate (AdamW).")
    # Not an option here (no prompts); present for the checks shared with the other commands.
    max_prompt_length = None

    def validate(self, require_model: bool = True) -> None:
        _validate_common(self, require_model=False)
        if self.model_name_or_path and self.model_config:
            raise ConfigError("give either model_name_or_path (continue a trained model) or model_config (random "
                              "weights), not both")
        if self.model_config and not self.tokenizer_name_or_path:
            raise ConfigError("model_config needs tokenizer_name_or_path (a fresh model has no tokenizer of its own)")
        if require_model and not (self.model_name_or_path or self.model_config):
            raise ConfigError("model_name_or_path or model_config is required")
        _validate_lm(self)

    def sanity_warnings(self) -> list[str]:
        return []


@dataclass
class SFTConfig(ModelSettings, DataSettings, TrainSettings):
    """``preftune sft``: supervised fine-tuning on prompt/completion rows or conversations."""

    completion_only_loss: bool = _f(True, "Train on completion (assistant) tokens only; false trains on every token.")
    packing: bool = _f(False, "Pack several examples into each row of max_length tokens (block-diagonal attention, "
                              "position ids restarting per example).")
    learning_rate: float = _f(2e-5, "Peak learning rate (AdamW).")

    def validate(self, require_model: bool = True) -> None:
        _validate_common(self, require_model)
        _validate_lm(self)

    def sanity_warnings(self) -> list[str]:
        return []


def _validate_lm(cfg) -> None:
    if cfg.ref_model_name_or_path:
        raise ConfigError("ref_model_name_or_path is not used by this command (no reference model)")
    if cfg.max_length < 2:
        raise ConfigError(f"max_length must be at least 2, got {cfg.max_length}")


# ---------------------------------------------------------------- PPO


@dataclass
class PPOConfig(ModelSettings, TrainSettings):
    """``preftune ppo``: RL fine-tuning of a policy against a reward model or function (PPO, KL-penalised)."""

    output_dir: str = _f("runs/ppo", "Run directory: metrics.jsonl, samples.jsonl, checkpoints/ and the final model/.")
    dataset: str | None = _f(None, "Prompts: JSONL/JSON/Parquet/CSV file, save_to_disk directory or hub name with a "
                                   "'prompt' column (strings or lists of messages) (required).")
    split: str = _f("train", "Split to read from a directory or hub dataset.")
    max_prompt_length: int = _f(512, "Longer prompts keep their last this many tokens.")
    skip_invalid: bool = _f(False, "Skip invalid rows (and report them) instead of stopping at the first one.")
    reward_model_path: str | None = _f(None, "Reward model directory (trained by `preftune reward`) scoring prompt + response.")
    reward_function: str | None = _f(None, "Instead of a reward model: 'module:function' or 'path/file.py:function', "
                                           "called as fn(prompts, responses) -> one number per response.")
    missing_eos_penalty: float = _f(0.0, "Subtracted from the score of a response that never emits EOS within max_new_tokens.")
    normalize_scores: bool = _f(False, "Standardise scores with a running mean and std over every score seen so far.")
    score_clip: float = _f(0.0, "Clip (normalised) scores to [-score_clip, score_clip]; 0 disables.")
    max_new_tokens: int = _f(64, "Longest response sampled per prompt.")
    temperature: float = _f(1.0, "Sampling temperature; log-probs are computed at the same temperature.")
    top_k: int = _f(0, "Sample from the top k tokens only (0: all). Makes samples slightly off-policy.")
    top_p: float = _f(1.0, "Nucleus sampling threshold (1: off). Makes samples slightly off-policy.")
    generation_batch_size: int = _f(16, "Sequences per generation, scoring and no-grad forward pass during rollouts.")
    num_mini_batches: int = _f(1, "Minibatches (optimiser steps) per pass over a rollout batch. A rollout batch is "
                                  "per_device_batch_size x processes x gradient_accumulation_steps x num_mini_batches prompts.")
    num_ppo_epochs: int = _f(4, "Passes over each rollout batch.")
    max_steps: int = _f(-1, "Stop after this many PPO iterations (one rollout batch and its updates each; "
                            "overrides num_epochs when > 0).")
    num_epochs: float = _f(1.0, "Passes over the prompts.")
    learning_rate: float = _f(3e-6, "Peak learning rate (AdamW).")
    warmup_ratio: float = _f(0.0, "Fraction of optimiser steps spent warming up linearly from 0.")
    logging_steps: int = _f(1, "Write averaged metrics every this many iterations.")
    save_steps: int = _f(0, "Checkpoint every this many iterations (0: no intermediate checkpoints).")
    cliprange: float = _f(0.2, "PPO clip range ε of the probability ratio.")
    cliprange_value: float = _f(0.2, "Clip range of the value function update.")
    vf_coef: float = _f(0.1, "Weight of the value loss.")
    gamma: float = _f(1.0, "Discount factor γ.")
    lam: float = _f(0.95, "GAE λ.")
    kl_coef: float = _f(0.05, "Coefficient β of the per-token KL penalty (initial value when adaptive_kl).")
    kl_estimator: str = _f("k1", "Per-token KL estimator: k1 (log π - log π_ref) or k3 ((ρ-1) - log ρ, ρ = π_ref/π).",
                           choices=["k1", "k3"])
    adaptive_kl: bool = _f(False, "Adapt β to keep the KL near target_kl (Ziegler et al. 2019 proportional controller).")
    target_kl: float = _f(6.0, "KL (nats per response) the adaptive controller aims for.")
    kl_horizon: int = _f(10000, "Horizon of the adaptive controller, in samples.")
    value_model: str = _f("auto", "Critic: shared (a value head on the policy's backbone; 1-model PPO) or separate (a copy "
                                  "of the policy's backbone with its own head). auto: shared with LoRA, else separate.",
                          choices=["auto", "shared", "separate"])
    log_samples_steps: int = _f(10, "Write example generations to samples.jsonl every this many iterations (0: never).")
    log_samples: int = _f(4, "Example generations written each time.")

    def validate(self, require_model: bool = True, require_reward: bool = True) -> None:
        if require_model and not self.model_name_or_path:
            raise ConfigError("model_name_or_path is required (the policy to start from, usually an SFT model)")
        if not self.dataset:
            raise ConfigError("dataset is required (a file or dataset of prompts with a 'prompt' column)")
        if self.reward_model_path and self.reward_function or require_reward and not (
                self.reward_model_path or self.reward_function):
            raise ConfigError("give exactly one reward source: reward_model_path (a reward model directory) or "
                              "reward_function ('module:function')")
        if self.reward_function and ":" not in self.reward_function:
            raise ConfigError(f"reward_function '{self.reward_function}' must look like 'module:function' or "
                              "'path/file.py:function'")
        if not self.disable_dropout:
            raise ConfigError("PPO needs dropout off (rollout and update log-probs must come from the same function); "
                              "remove --no-disable_dropout")
        validate_training(self)
        _check_ranges(self, positive=["max_prompt_length", "max_new_tokens", "generation_batch_size", "num_mini_batches",
                                      "num_ppo_epochs", "kl_horizon"],
                      positive_numbers=["temperature", "cliprange", "cliprange_value", "target_kl"],
                      non_negative=["vf_coef", "kl_coef", "score_clip"], unit_interval=["gamma", "lam"])
        if not math.isfinite(self.missing_eos_penalty):
            raise ConfigError(f"missing_eos_penalty must be a finite number, got {self.missing_eos_penalty}")
        if self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_k must be >= 0 and top_p in (0, 1], got {self.top_k} and {self.top_p}")
        if self.log_samples_steps < 0 or self.log_samples < 0:
            raise ConfigError("log_samples_steps and log_samples must be >= 0")

    def sanity_warnings(self) -> list[str]:
        notes = []
        if not 1e-7 <= self.learning_rate <= 1e-4:
            notes.append(f"learning_rate={self.learning_rate:g} is far outside the usual 1e-6 to 1e-5 for PPO.")
        if self.top_k or self.top_p < 1.0:
            notes.append("top_k / top_p: PPO treats samples as drawn from the full distribution at the given "
                         "temperature, so filtered samples are slightly off-policy.")
        if self.lora and self.lora_dropout > 0:
            notes.append("PPO turns LoRA dropout off as well (lora_dropout is ignored).")
        return notes
