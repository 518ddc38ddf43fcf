"""``preftune pretrain`` and ``preftune sft``: the first stages of the RLHF pipeline."""

from __future__ import annotations

from ..config import PretrainConfig, SFTConfig
from . import add_training_command


def register(subparsers) -> None:
    add_training_command(
        subparsers, "pretrain", PretrainConfig, "preftune.train.pretrain:train_pretrain",
        help="Train a causal LM on raw text (from a checkpoint or from random weights).",
        description="Next-token prediction on raw text, packed into rows of max_length tokens. Start from "
                    "--model_name_or_path, or from random weights with --model_config and --tokenizer_name_or_path.")
    add_training_command(
        subparsers, "sft", SFTConfig, "preftune.train.sft:train_sft",
        help="Supervised fine-tuning on prompt/completion rows or conversations.",
        description="Supervised fine-tuning: the loss covers completion (assistant) tokens only unless "
                    "--no-completion_only_loss; --packing packs several examples per row.")
