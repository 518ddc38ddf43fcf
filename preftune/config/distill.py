"""Config of ``preftune distill``: on-policy distillation (GKD) of a student towards a teacher.

Option names follow TRL's ``GKDConfig``: ``lmbda`` (the fraction of steps trained on the student's own samples),
``beta`` (the generalised JSD, from forward KL at 0 to reverse KL at 1), ``temperature``, ``max_new_tokens``,
``seq_kd`` (the other steps train on the teacher's samples rather than the dataset's completions) and
``teacher_model_name_or_path``. The sampling options are the online commands' (:mod:`.online`), the length
limits and held-out data SFT's.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .base import check_ranges, option, with_default
from .grpo import GRPOConfig
from .online import OnlineRLSettings
from .shared import DataSettings, HeldOutData, TrainSettings, validate_training


@dataclass
class DistillConfig(OnlineRLSettings, HeldOutData):
    """``preftune distill``: generalised knowledge distillation (Agarwal et al. 2024) on the student's own samples
    and on the dataset's completions."""

    output_dir: str = with_default(OnlineRLSettings, "output_dir", "runs/distill")
    dataset: str | None = option(None, "Prompt/completion rows (or conversations) as for sft: the prompts the "
                                       "student samples from, and the completions of the other steps (required).")
    teacher_model_name_or_path: str | None = option(None, "Teacher model: a local directory or a hub name; any size, "
                                                          "but the student's tokenizer (required).")
    lmbda: float = option(0.5, "Fraction of steps trained on the student's own samples (on-policy); the others on the "
                               "dataset's completions, or the teacher's samples with seq_kd.")
    beta: float = option(0.5, "Generalised Jensen-Shannon divergence between teacher and student: 0 is the forward "
                              "KL(teacher ‖ student), 1 the reverse KL(student ‖ teacher).")
    seq_kd: bool = option(False, "Sequence-level KD: the steps that are not on-policy train on completions sampled "
                                 "from the teacher instead of the dataset's.")
    temperature: float = with_default(OnlineRLSettings, "temperature", 0.9)
    max_new_tokens: int = option(128, "Longest completion sampled (from the student, or the teacher with seq_kd).")
    sampling_batch_size: int = with_default(GRPOConfig, "sampling_batch_size", 32)
    max_length: int = with_default(DataSettings, "max_length", 1024)
    truncation_mode: str = with_default(DataSettings, "truncation_mode", "keep_end")
    logging_steps: int = with_default(TrainSettings, "logging_steps", 10)
    max_steps: int = option(-1, "Stop after this many steps (one batch of prompts or rows, one optimiser update; "
                                "overrides num_epochs when > 0).")
    learning_rate: float = with_default(TrainSettings, "learning_rate", 2e-5)

    def validate(self, require_model: bool = True, require_teacher: bool = True) -> None:
        self.check_prompts(require_model, "the student")
        if require_teacher and not self.teacher_model_name_or_path:
            raise ConfigError("teacher_model_name_or_path is required (the model the student learns from)")
        if self.ref_model_name_or_path:
            raise ConfigError("ref_model_name_or_path is not used by distill; the teacher is "
                              "teacher_model_name_or_path")
        validate_training(self)
        for name in ("lmbda", "beta"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        check_ranges(self, positive=["max_prompt_length", "max_new_tokens", "sampling_batch_size", "max_length"],
                     positive_numbers=["temperature"])
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(f"max_prompt_length ({self.max_prompt_length}) must be smaller than max_length "
                              f"({self.max_length})")
        if self.seq_kd and self.lmbda == 1.0:
            raise ConfigError("seq_kd trains the steps that are not on-policy on the teacher's samples, but lmbda is 1 "
                              "(every step on-policy); lower lmbda or drop seq_kd")
        self.check_sampling()

    def sanity_warnings(self) -> list[str]:
        return self.lora_dropout_note("distill")
