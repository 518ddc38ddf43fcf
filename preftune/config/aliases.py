"""TRL's option names, accepted in YAML and on the command line as aliases of preftune's.

A user coming from TRL (``DPOConfig``, ``SFTConfig``, ``RewardConfig``, ``KTOConfig``, ``GRPOConfig``,
``PPOConfig``, transformers' ``TrainingArguments``, TRL's ``ModelConfig`` and script arguments) can
keep their option names. An alias applies only to a command that has the option it stands for
(``max_completion_length`` is GRPO's own option and PPO's ``max_new_tokens``). A TRL option whose
meaning preftune does not share is refused with the reason and what to use instead, never silently
ignored or mapped to something else.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .losses import REFERENCE_FREE

# TRL name -> preftune name, with the same meaning and values.
RENAMED = {
    "per_device_train_batch_size": "per_device_batch_size",
    "num_train_epochs": "num_epochs",
    "use_peft": "lora",
    "lr_scheduler_type": "lr_scheduler",
    "precompute_ref_log_probs": "precompute_ref",
    "rpo_alpha": "nll_weight",                       # RPO: DPO loss + alpha x NLL of the chosen responses
    "max_seq_length": "max_length",                  # SFTConfig's older name
    "dataset_name": "dataset",
    "dataset_train_split": "split",
    "dataset_text_field": "text_column",
    "center_rewards_coefficient": "centering_coef",
    "response_length": "max_new_tokens",            # PPOConfig
    "max_completion_length": "max_new_tokens",      # PPO's sampled response length (GRPO has the option itself)
    "sft_model_path": "model_name_or_path",         # PPOConfig's policy to start from
    "model_revision": "revision",                   # TRL's ModelConfig
}

# TRL name -> preftune name, with a value conversion.
CONVERTED = {"bf16": "precision", "fp16": "precision", "resume_from_checkpoint": "resume"}

# TRL options preftune does not have in the same sense: the reason, and what to use.
REFUSED = {
    "max_completion_length": "preftune bounds prompt + completion together: set max_length (and max_prompt_length "
                             "for the prompt), e.g. max_length = max_prompt_length + max_completion_length",
    "per_device_eval_batch_size": "held-out batches use per_device_batch_size",
    "reference_free": "preftune's losses that need no reference are " + ", ".join(f"loss_type {name}" for name in
                                                                                  sorted(REFERENCE_FREE)),
    # options of preftune dpo (and iterate's DPO rounds), refused by the commands that do not have them
    "use_weighting": "WPO weighting (use_weighting) is an option of preftune dpo and iterate (offline pairs)",
    "ld_alpha": "LD-DPO (ld_alpha) is an option of preftune dpo and iterate (offline pairs)",
    "eval_strategy": "set eval_steps (evaluate every N steps; 0: only at the end)",
    "save_strategy": "set save_steps (checkpoint every N steps; 0: none)",
    "logging_strategy": "set logging_steps",
    "torch_dtype": "set precision (auto, fp32, bf16 or fp16)",
    "dtype": "set precision (auto, fp32, bf16 or fp16)",
    "optim": "preftune trains with AdamW (adam_beta1, adam_beta2, weight_decay)",
    "generation_batch_size": "in TRL's GRPO and RLOO it is the rollout size (completions per generation over all "
                             "processes), which preftune grpo and rloo take under that name; the sequences per "
                             "sampling forward pass are sampling_batch_size",
    "dataset_test_split": "name a held-out dataset with eval_dataset and its split with eval_split, or hold out "
                          "eval_fraction of the training rows",
}

VALUE_ALIASES = {"lr_scheduler": {"constant_with_warmup": "constant"}}
TRUE_WORDS, FALSE_WORDS = ("true", "yes", "1"), ("false", "no", "0")


def alias_names(fields: set[str]) -> dict[str, str]:
    """The TRL names this config accepts (those whose preftune option it has and that are not its own) -> target."""
    table = {**RENAMED, **CONVERTED}
    return {name: target for name, target in table.items() if target in fields and name not in fields}


def refused_names(fields: set[str]) -> set[str]:
    return {name for name in REFUSED if name not in fields and name not in alias_names(fields)}


def resolve(values: dict[str, Any], fields: set[str], source: str) -> dict[str, Any]:
    """``values`` with TRL names replaced by preftune's (values converted); refused TRL names raise."""
    aliases = alias_names(fields)
    resolved, precision_off = {}, False
    for name, value in values.items():
        if name in refused_names(fields):
            raise ConfigError(f"{source}: '{name}' (a TRL option) is not supported: {REFUSED[name]}")
        target = aliases.get(name, name)
        if target != name and target in values:
            raise ConfigError(f"{source}: both '{name}' (TRL's name) and '{target}' are given; keep one")
        if name in ("bf16", "fp16"):
            if _truth(name, value, source):
                if resolved.get("precision") not in (None, name):
                    raise ConfigError(f"{source}: bf16 and fp16 cannot both be true")
                resolved["precision"] = name
            else:
                precision_off = True
            continue
        if name == "resume_from_checkpoint":
            value = _resume_value(value)
        if target == "report_to" and value in ("none", ["none"]):
            value = []   # TRL's way of saying no trackers
        if target == "loss_type" and isinstance(value, list):
            value = ",".join(map(str, value))   # TRL's list of losses to mix (MPO)
        resolved[target] = VALUE_ALIASES.get(target, {}).get(value, value) if isinstance(value, str) else value
    if precision_off and "precision" not in resolved:
        resolved["precision"] = "fp32"   # TRL: bf16 false (and fp16 false) trains in full precision
    return resolved


def _truth(name: str, value, source: str) -> bool:
    if isinstance(value, bool) or value is None:
        return bool(value)
    if str(value).lower() in TRUE_WORDS + FALSE_WORDS:
        return str(value).lower() in TRUE_WORDS
    raise ConfigError(f"{source}: '{name}' must be true or false, got {value!r}")


def _resume_value(value):
    """TRL's ``resume_from_checkpoint``: a checkpoint path, or true for the newest checkpoint."""
    if value is True or str(value).lower() in TRUE_WORDS:
        return "latest"
    if value is False or value is None or str(value).lower() in FALSE_WORDS + ("none", "null"):
        return None
    return value
