"""Configs of the language-modelling commands: ``preftune pretrain`` and ``preftune sft``."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .base import option, with_default
from .shared import (
    DataSettings,
    DataSource,
    HeldOutData,
    ModelSettings,
    PaddingFree,
    TrainSettings,
    validate_data,
    validate_lm,
)


@dataclass
class PretrainConfig(ModelSettings, HeldOutData, DataSource, TrainSettings):
    """``preftune pretrain``: next-token prediction on raw text, packed into rows of max_length tokens."""

    model_config: str | None = option(None, "Start from random weights shaped by this config (a config.json or a model "
                                            "directory) instead of model_name_or_path; needs tokenizer_name_or_path.")
    dataset: str | None = option(None, "Raw text: a .txt file (one document per blank-line-separated block), a "
                                       "directory of .txt files, JSONL/JSON/Parquet/CSV or save_to_disk data with a "
                                       "text column, or a hub name (required).")
    text_column: str = option("text", "Column holding the documents (tabular and hub data).")
    max_length: int = option(1024, "Tokens per packed row (documents are concatenated with EOS and cut into such "
                                   "rows).")
    learning_rate: float = with_default(TrainSettings, "learning_rate", 3e-4)
    # Not an option here (no prompts); present for the checks shared with the other commands.
    max_prompt_length = None

    def validate(self, require_model: bool = True) -> None:
        validate_data(self, require_model=False)
        if self.model_name_or_path and self.model_config:
            raise ConfigError("give either model_name_or_path (continue a trained model) or model_config (random "
                              "weights), not both")
        if self.model_config and not self.tokenizer_name_or_path:
            raise ConfigError("model_config needs tokenizer_name_or_path (a fresh model has no tokenizer of its own)")
        if require_model and not (self.model_name_or_path or self.model_config):
            raise ConfigError("model_name_or_path or model_config is required")
        validate_lm(self)

    def sanity_warnings(self) -> list[str]:
        return []


@dataclass
class SFTConfig(ModelSettings, DataSettings, TrainSettings, PaddingFree):
    """``preftune sft``: supervised fine-tuning on prompt/completion rows or conversations."""

    completion_only_loss: bool = option(True, "Train on completion (assistant) tokens only; false trains on every "
                                              "token.")
    packing: bool = option(False, "Pack several examples into each row of max_length tokens (block-diagonal attention, "
                                  "position ids restarting per example).")
    learning_rate: float = with_default(TrainSettings, "learning_rate", 2e-5)

    def validate(self, require_model: bool = True) -> None:
        validate_data(self, require_model)
        validate_lm(self)

    def sanity_warnings(self) -> list[str]:
        return []
