"""Settings every training command shares: the model, the data source, held-out data, the loop.

A command's config combines the pieces it needs (``DPOConfig(ModelSettings, DataSettings,
TrainSettings)``) and adds its own fields; each field is declared once, here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import ConfigError
from .base import check_ranges, option


@dataclass
class SpeedSettings:
    """The speed mechanisms (:mod:`preftune.speed`): each exact to float rounding, each with its own switch, all
    recorded in the run's config.json."""

    fused_layers: bool = option(True, "Run RMSNorms (Llama, Mistral, Qwen2/3, SmolLM, Phi3 ...) and SiLU-gated MLPs "
                                      "(gate/up/down projections) as fused functions that keep fewer activations for "
                                      "the backward pass (exact to float rounding; false: transformers' own modules).")
    fused_lora: bool = option(True, "Add a plain LoRA layer's update to the base projection in place instead of "
                                    "through peft's two extra [tokens, out] temporaries.")
    fused_head: bool = option(True, "Project a plain linear output head and take its log-softmax in one function "
                                    "with a written-out backward (false: the head is called as a module per chunk).")
    blockwise_attention: bool = option(True, "SDPA models: attention of a packed row block by block (no [T, T] mask; "
                                             "false: a dense block mask).")
    reuse_freed_memory: bool = option(True, "CPU runs on glibc: for the duration of the run, serve large blocks from "
                                            "the heap and keep freed memory for reuse (restored at the end).")
    trim_freed_memory: int = option(0, "CPU runs on glibc: return freed heap memory to the system every this many "
                                       "decoder layers of a training forward (lower peak memory, ~8% slower; "
                                       "0: never). Implies reuse_freed_memory false.")


@dataclass
class ModelSettings(SpeedSettings):
    """How the policy (and its reference) are loaded."""

    model_name_or_path: str | None = option(None, "Policy model: a local directory or a hub name (required).")
    tokenizer_name_or_path: str | None = option(None, "Tokenizer, if not the model's own.")
    ref_model_name_or_path: str | None = option(
            None, "Reference model; default: the policy's starting weights (with LoRA: the policy with adapters "
                  "disabled).")
    precision: str = option("auto", "auto (bf16 on GPUs that support it and on CPUs with AMX-BF16 or AVX512-BF16, "
                                    "fp32 elsewhere), fp32, bf16 (mixed: fp32 master weights, bf16 matrix products; "
                                    "any CPU, slow where emulated) or fp16 (GPU).",
                            choices=["auto", "fp32", "bf16", "fp16"])
    gradient_checkpointing: bool = option(False, "Recompute activations in the backward pass to save memory.")
    disable_dropout: bool = option(True, "Turn off dropout in the policy and reference (LoRA dropout is kept).")
    lora: bool = option(False, "Train LoRA adapters instead of all weights.")
    lora_r: int = option(8, "LoRA rank.")
    lora_alpha: int = option(16, "LoRA scaling alpha.")
    lora_dropout: float = option(0.0, "Dropout on the LoRA branch. Default 0: above 0, peft keeps a dropped copy of "
                                      "each adapted layer's input for the backward pass, so LoRA would need more "
                                      "activation memory than full fine-tuning (TRL's default is 0.05).")
    lora_target_modules: list[str] = option(["all-linear"], "Modules to adapt; 'all-linear' means every linear layer "
                                                            "but the output head.")
    merge_lora: bool = option(False, "Save the final model with the adapter merged into the base weights.")
    freeze_vision_tower: bool = option(True, "Vision-language models: keep the vision (or audio) tower's weights "
                                             "fixed.")
    adapt_projector: bool = option(False, "Vision-language models: train the projector between the vision tower and "
                                          "the language model too (saved in full beside LoRA adapters).")
    load_in_4bit: bool = option(False, "Load the model's linear weights in 4 bits through bitsandbytes (QLoRA: needs "
                                       "lora and a CUDA GPU; pip install 'preftune[quantization]').")
    load_in_8bit: bool = option(False, "Load the model's linear weights in 8 bits through bitsandbytes (needs lora and "
                                       "a CUDA GPU).")
    bnb_4bit_quant_type: str = option("nf4", "4-bit data type of load_in_4bit.", choices=["nf4", "fp4"])
    use_bnb_nested_quant: bool = option(False, "load_in_4bit: quantize the quantization constants too (~0.4 bits "
                                               "per weight less).")
    attn_implementation: str | None = option(None, "Attention kernel transformers loads the model with: sdpa, eager, "
                                                   "flash_attention_2, ... (default: transformers' choice).")
    revision: str | None = option(None, "Hub revision (branch, tag or commit) of model_name_or_path and its "
                                        "tokenizer.")
    trust_remote_code: bool = option(False, "Run a hub model's own Python code (transformers' trust_remote_code); "
                                            "only for models whose code you trust.")


@dataclass
class PaddingFree:
    """How the sequences of a batch are laid out (exact either way; see "Speed and memory" in the README)."""

    padding_free: bool = option(True, "Concatenate a batch's sequences into one row without padding, each with its "
                                      "own position ids and attending to itself only (exact; false: padded rows).")


@dataclass
class PairLayout(PaddingFree):
    """Batch layout of the commands that read pairs."""

    prefix_sharing: bool = option(True, "Encode each pair's prompt once: one block prompt | chosen | rejected in which "
                                        "each response sees the prompt and itself (exact; needs SDPA or eager "
                                        "attention, else falls back to padding_free).")


@dataclass
class PairScores:
    """Per-pair scores in the data (TRL's ultrafeedback_binarized has score_chosen and score_rejected)."""

    margin_from_scores: bool = option(False, "Use score_chosen - score_rejected of each row as its margin (a row's "
                                             "own margin column wins); off: the score columns are not read.")


@dataclass
class DataSource:
    """The training rows: where they come from and what to do with invalid ones."""

    dataset: str | None = option(None, "Training data: JSONL/JSON/Parquet/CSV file, save_to_disk directory or hub "
                                       "name (required).")
    split: str = option("train", "Split to read from a directory or hub dataset.")
    skip_invalid: bool = option(False, "Skip invalid rows (and report them) instead of stopping at the first one.")


@dataclass
class HeldOutData:
    """The held-out rows evaluated during training."""

    eval_dataset: str | None = option(None, "Held-out data; default: a fraction of the training data (eval_fraction).")
    eval_split: str = option("test", "Split of eval_dataset to read.")
    eval_fraction: float = option(0.0, "Fraction of the training rows held out for evaluation when eval_dataset is "
                                       "not given.")


@dataclass
class DataSettings(HeldOutData, DataSource):
    """Where prompt/completion rows or preference pairs come from and how they are tokenised."""

    max_length: int = option(1024, "Maximum prompt + completion tokens.")
    max_prompt_length: int | None = option(None, "Maximum prompt tokens (the end of the prompt is kept).")
    truncation_mode: str = option("keep_end", "keep_end: shorten the prompt from its start; keep_start: cut "
                                              "completions at the end; error: reject rows that do not fit.",
                                  choices=["keep_end", "keep_start", "error"])


@dataclass
class TrainSettings:
    """The shared training loop."""

    output_dir: str = option("runs/run", "Run directory: metrics.jsonl, checkpoints/ and the final model/.")
    overwrite_output_dir: bool = option(False, "Start afresh in an output_dir that holds an earlier run (its metrics, "
                                        "checkpoints and model are deleted). Without it such a run is refused unless "
                                        "--resume.")
    seed: int = option(42, "Seed for weights of new heads, data order and dropout.")
    num_epochs: float = option(1.0, "Passes over the training data.")
    max_steps: int = option(-1, "Stop after this many optimiser steps (overrides num_epochs when > 0).")
    per_device_batch_size: int = option(8, "Training examples per device per forward pass (preference pairs for dpo "
                                           "and reward, prompts for ppo).")
    gradient_accumulation_steps: int = option(1, "Forward passes per optimiser step.")
    learning_rate: float = option(1e-6, "Peak learning rate (AdamW).")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    adam_beta1: float = option(0.9, "AdamW beta1.")
    adam_beta2: float = option(0.999, "AdamW beta2.")
    max_grad_norm: float = option(1.0, "Clip the gradient norm to this value (0 disables clipping).")
    lr_scheduler: str = option("linear", "Learning-rate schedule after warm-up.",
                               choices=["linear", "cosine", "constant"])
    warmup_ratio: float = option(0.1, "Fraction of steps spent warming up linearly from 0.")
    warmup_steps: int = option(0, "Warm-up steps (overrides warmup_ratio when > 0).")
    logging_steps: int = option(10, "Write averaged metrics every this many steps.")
    eval_steps: int = option(0, "Evaluate every this many steps (0: only at the end).")
    eval_on_start: bool = option(False, "Also evaluate before the first step (a baseline for the held-out metrics).")
    save_steps: int = option(0, "Checkpoint every this many steps (0: no intermediate checkpoints).")
    save_total_limit: int = option(2, "Keep only the newest this many checkpoints.")
    resume: str | None = option(None, "Resume from a checkpoint directory, or 'latest' for the newest in output_dir.",
                                nargs="?", const="latest")
    report_to: list[str] = option([], "Also send metrics to: tensorboard, wandb; all: every one installed; none.")
    logprob_chunk_size: int = option(1024, "Tokens per chunk when projecting hidden states onto the vocabulary.")
    fsdp: str = option("", "Shard with FSDP2 across the launched processes: 'full_shard' or 'shard_grad_op', "
                           "optionally with 'offload' (as transformers' --fsdp); empty: the launcher decides "
                           "(accelerate launch --config_file configs/fsdp2.yaml, configs/zero3.yaml, ...).")


def validate_data(cfg, require_model: bool = True) -> None:
    """Checks shared by the commands that read a dataset of rows with ``max_length`` tokens."""
    if require_model and not cfg.model_name_or_path:
        raise ConfigError("model_name_or_path is required (a local model directory or a hub name)")
    if not cfg.dataset:
        raise ConfigError("dataset is required (a data file, a save_to_disk directory or a hub name)")
    check_ranges(cfg, positive=["max_length"])
    if not 0.0 <= cfg.eval_fraction < 1.0:
        raise ConfigError(f"eval_fraction must be in [0, 1), got {cfg.eval_fraction}")
    if cfg.max_prompt_length is not None and cfg.max_prompt_length >= cfg.max_length:
        raise ConfigError(f"max_prompt_length ({cfg.max_prompt_length}) must be smaller than max_length "
                          f"({cfg.max_length})")
    validate_training(cfg)


def validate_training(cfg) -> None:
    """Checks of the ``ModelSettings`` and ``TrainSettings`` every training command shares."""
    check_ranges(cfg, positive=["per_device_batch_size", "gradient_accumulation_steps", "logging_steps",
                                 "logprob_chunk_size", "lora_r", "lora_alpha"],
                  positive_numbers=["learning_rate", "num_epochs"],
                  non_negative=["max_grad_norm", "weight_decay", "trim_freed_memory"],
                  unit_interval=["warmup_ratio"])
    if not 0.0 <= cfg.lora_dropout < 1.0:
        raise ConfigError(f"lora_dropout must be in [0, 1), got {cfg.lora_dropout}")
    fsdp_words(cfg.fsdp)
    validate_quantization(cfg)
    cfg.report_to = trackers(cfg.report_to)
    for f in dataclasses.fields(cfg):
        choices = f.metadata.get("choices")
        if choices and getattr(cfg, f.name) not in choices:
            raise ConfigError(f"{f.name} must be one of {', '.join(choices)}, got '{getattr(cfg, f.name)}'")



def check_reference_sync(cfg) -> None:
    """The checks every ``sync_ref_model`` (TR-DPO) shares: a separate frozen reference to move, and sane
    ``ref_model_sync_steps`` / ``ref_model_mixup_alpha``."""
    if cfg.lora and not cfg.ref_model_name_or_path:
        raise ConfigError("sync_ref_model cannot sync a LoRA policy's adapter-disabled reference (its base weights "
                          "are the policy's own); set ref_model_name_or_path for a separate frozen copy or turn "
                          "sync_ref_model off")
    if cfg.ref_model_sync_steps < 1 or not 0.0 < cfg.ref_model_mixup_alpha <= 1.0:
        raise ConfigError(f"ref_model_sync_steps must be >= 1 and ref_model_mixup_alpha in (0, 1], got "
                          f"{cfg.ref_model_sync_steps} and {cfg.ref_model_mixup_alpha}")


def validate_quantization(cfg) -> None:
    """Quantized loading trains LoRA adapters on frozen quantized weights: one bit width, and LoRA."""
    if cfg.load_in_4bit and cfg.load_in_8bit:
        raise ConfigError("load_in_4bit and load_in_8bit cannot both be set; choose one")
    if (cfg.load_in_4bit or cfg.load_in_8bit) and not cfg.lora:
        bits = 4 if cfg.load_in_4bit else 8
        raise ConfigError(f"load_in_{bits}bit needs lora: quantized weights cannot be trained in full "
                          "(add --lora, or load in full precision)")


TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb"}     # tracker -> the package it needs


def trackers(names: list[str]) -> list[str]:
    """``report_to`` as TRL reads it: ``all`` is every tracker whose package is installed, ``none`` none; a tracker
    named outright whose package is missing is a ConfigError (rather than a run that silently logs nowhere)."""
    import importlib.util

    installed = [name for name, package in TRACKERS.items() if importlib.util.find_spec(package) is not None]
    if "none" in names:
        return []
    if "all" in names:
        return installed
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"report_to: unknown tracker '{name}' (choose tensorboard, wandb, all or none)")
        if name not in installed:
            raise ConfigError(f"report_to: {name} is not installed (pip install {TRACKERS[name]}, or "
                              f"pip install 'preftune[{name}]')")
    return list(dict.fromkeys(names))


FSDP_WORDS = ("full_shard", "shard_grad_op", "offload", "auto_wrap")


def fsdp_words(spec: str) -> set[str]:
    """The words of the ``fsdp`` option (empty: off); ConfigError unless they name one sharding mode."""
    words = set(spec.replace(",", " ").split())
    modes = words & {"full_shard", "shard_grad_op"}
    if words and (words - set(FSDP_WORDS) or len(modes) != 1):
        raise ConfigError(f"fsdp: '{spec}' is not a sharding setting; use 'full_shard' or 'shard_grad_op', "
                          "optionally with 'offload' and 'auto_wrap' (e.g. --fsdp 'full_shard auto_wrap')")
    return words


def validate_lm(cfg) -> None:
    """Checks of the language-modelling commands (pretrain, SFT): no reference model, rows of 2+ tokens."""
    if cfg.ref_model_name_or_path:
        raise ConfigError("ref_model_name_or_path is not used by this command (no reference model)")
    if cfg.max_length < 2:
        raise ConfigError(f"max_length must be at least 2, got {cfg.max_length}")
