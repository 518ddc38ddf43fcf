"""Settings the online commands share (``ppo``, ``grpo``, ``rloo``, ``online-dpo``): prompts, sampling and its
engine, sample logs.

Each field is declared once here; a command changes only a default (:func:`~.base.with_default`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ConfigError
from .base import option, with_default
from .monitors import Thresholds, parse_thresholds
from .shared import DataSource, ModelSettings, TrainSettings, validate_training

MISSING_EOS = ("drop", "penalize", "keep")


@dataclass
class ReplySettings:
    """What becomes of a sampled reply that never ends (no EOS within the length cap), and the reward-hacking
    monitors' thresholds (:mod:`preftune.monitors`). Shared by the online commands and ``iterate``."""

    missing_eos: str = option("auto", "A sample that never emits EOS: drop (never trained: left out of the "
                                           "loss, never a chosen or rejected reply), penalize (missing_eos_penalty "
                                           "subtracted from its score) or keep (trained as it is, without an EOS). "
                                           "auto: iterate drops; the online commands penalize when "
                                           "missing_eos_penalty is set, drop with mask_truncated_completions, "
                                           "else keep.", choices=["auto", *MISSING_EOS])
    missing_eos_penalty: float = option(0.0, "Subtracted from the score of a response that never emits EOS within "
                                             "max_new_tokens (TRL's name; setting it means missing_eos: penalize).")
    monitor: list[str] = option([], "Reward-hacking monitor thresholds as NAME=NUMBER (min_ended, max_ended_drop, "
                                    "max_length_ratio, max_repeated_ngrams, max_distinct_drop, max_self_bleu_rise, "
                                    "max_top_opening, max_kl_per_token, max_judge_gap); the others keep their "
                                    "defaults.")

    default_missing_eos = "keep"

    def eos_mode(self) -> str:
        """``missing_eos`` with its default resolved: drop, penalize or keep."""
        if self.missing_eos != "auto":
            return self.missing_eos
        if self.missing_eos_penalty:
            return "penalize"
        if getattr(self, "mask_truncated_completions", False):
            return "drop"
        return self.default_missing_eos

    def check_replies(self) -> None:
        """missing_eos and its penalty agree; the monitor thresholds parse."""
        if not math.isfinite(self.missing_eos_penalty):
            raise ConfigError(f"missing_eos_penalty must be a finite number, got {self.missing_eos_penalty}")
        if self.missing_eos == "penalize" and not self.missing_eos_penalty:
            raise ConfigError("missing_eos: penalize needs a missing_eos_penalty (the amount subtracted), e.g. 1.0")
        if self.missing_eos in ("drop", "keep") and self.missing_eos_penalty:
            raise ConfigError(f"missing_eos_penalty applies with missing_eos: penalize, not {self.missing_eos}; "
                              f"remove one of them")
        if getattr(self, "mask_truncated_completions", False) and self.missing_eos in ("penalize", "keep"):
            raise ConfigError(f"mask_truncated_completions is missing_eos: drop; it contradicts missing_eos: "
                              f"{self.missing_eos}")
        parse_thresholds(self.monitor, "monitor")

    def thresholds(self) -> Thresholds:
        return parse_thresholds(self.monitor, "monitor")


@dataclass
class OnlineRLSettings(ReplySettings, ModelSettings, DataSource, TrainSettings):
    """A policy sampling completions for prompts, scored and updated online."""

    output_dir: str = option("runs/online", "Run directory: metrics.jsonl, samples.jsonl, checkpoints/ and the "
                                            "final model/.")
    dataset: str | None = option(None, "Prompts: JSONL/JSON/Parquet/CSV file, save_to_disk directory or hub name with "
                                       "a 'prompt' column (strings or lists of messages) (required).")
    logging_steps: int = option(1, "Write averaged metrics every this many iterations.")
    save_steps: int = option(0, "Checkpoint every this many iterations (0: no intermediate checkpoints).")
    log_samples_steps: int = option(10, "Write example generations to samples.jsonl every this many iterations (0: "
                                        "never).")
    log_samples: int = option(4, "Example generations written each time.")
    max_prompt_length: int = option(512, "Longer prompts keep their last this many tokens.")
    temperature: float = option(1.0, "Sampling temperature; log-probs are computed at the same temperature.")
    top_k: int = option(0, "Sample from the top k tokens only (0: all). Makes samples slightly off-policy.")
    top_p: float = option(1.0, "Nucleus sampling threshold (1: off). Makes samples slightly off-policy.")
    # all dropout is off while sampling and updating, LoRA's too: a non-zero value is the user's, and is warned about
    lora_dropout: float = with_default(ModelSettings, "lora_dropout", 0.0)
    generation_engine: str = option("transformers", "What samples the completions: transformers (preftune's sampler "
                                                    "on the live policy) or vllm (the vllm extra, CUDA GPU).",
                                    choices=["transformers", "vllm"])
    vllm_gpu_memory_utilization: float = option(0.3, "vllm: share of the GPU's memory vLLM may take in the training "
                                                     "process (weights and KV cache).")
    vllm_enable_sleep_mode: bool = option(True, "vllm: offload vLLM's weights and free its KV cache while the policy "
                                                "is updated.")
    vllm_server_url: str | None = option(None, "vllm: sample from a running `vllm serve` (started with "
                                               "--enable-lora) at this URL instead of in-process; needs --lora.")

    def check_prompts(self, require_model: bool, policy: str) -> None:
        """The policy (described by ``policy`` in the error) and the prompt dataset are given."""
        if require_model and not self.model_name_or_path:
            raise ConfigError(f"model_name_or_path is required ({policy})")
        if not self.dataset:
            raise ConfigError("dataset is required (a file or dataset of prompts with a 'prompt' column)")

    def check_training(self, algorithm: str, samples: str) -> None:
        """Dropout is off (``samples`` names what is sampled in the error) and the loop settings are valid."""
        if not self.disable_dropout:
            raise ConfigError(f"{algorithm} needs dropout off ({samples} and update log-probs must come from the same "
                              "function); remove --no-disable_dropout")
        validate_training(self)

    def check_sampling(self) -> None:
        """top_k / top_p, the sample-logging counts and missing_eos are in range."""
        self.check_replies()
        if self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_k must be >= 0 and top_p in (0, 1], got {self.top_k} and {self.top_p}")
        if self.log_samples_steps < 0 or self.log_samples < 0:
            raise ConfigError("log_samples_steps and log_samples must be >= 0")
        if not 0.0 < self.vllm_gpu_memory_utilization <= 1.0:
            raise ConfigError(f"vllm_gpu_memory_utilization must be in (0, 1], got {self.vllm_gpu_memory_utilization}")
        if self.vllm_server_url and self.generation_engine != "vllm":
            raise ConfigError("vllm_server_url is an option of generation_engine: vllm; add --generation_engine vllm")
        if self.vllm_server_url and not self.lora:
            raise ConfigError("vllm_server_url: a vLLM server receives the policy's updates as LoRA adapters; train "
                              "with --lora, or leave vllm_server_url empty for the in-process engine")

    def lora_dropout_note(self, algorithm: str) -> list[str]:
        """The warning that LoRA dropout is turned off with the rest of dropout."""
        if self.lora and self.lora_dropout > 0:
            return [f"{algorithm} turns LoRA dropout off as well (lora_dropout is ignored)."]
        return []
