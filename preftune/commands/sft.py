"""``preftune pretrain`` and ``preftune sft``: the first stages of the RLHF pipeline."""

from __future__ import annotations

import argparse

from ..config import PretrainConfig, SFTConfig, add_config_arguments, config_from_args


def register(subparsers) -> None:
    pretrain = subparsers.add_parser(
        "pretrain", help="Train a causal LM on raw text (from a checkpoint or from random weights).",
        description="Next-token prediction on raw text, packed into rows of max_length tokens. Start from "
                    "--model_name_or_path, or from random weights with --model_config and --tokenizer_name_or_path. "
                    "Every option can be set in the YAML file given by --config or by its flag; flags win.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_arguments(pretrain, PretrainConfig)
    pretrain.set_defaults(handler=run_pretrain)

    sft = subparsers.add_parser(
        "sft", help="Supervised fine-tuning on prompt/completion rows or conversations.",
        description="Supervised fine-tuning: the loss covers completion (assistant) tokens only unless "
                    "--no-completion_only_loss; --packing packs several examples per row. Every option can be set "
                    "in the YAML file given by --config or by its flag; flags win.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_arguments(sft, SFTConfig)
    sft.set_defaults(handler=run_sft)


def _report(result) -> None:
    if result.is_main_process:
        from rich.console import Console

        out = Console()
        out.print(f"[green]done[/]: model saved to {result.model_dir}")
        out.print(f"metrics written to {result.metrics_file}")


def run_pretrain(args) -> int:
    cfg = config_from_args(PretrainConfig, args)  # report config mistakes before the heavy imports
    from ..train.pretrain import train_pretrain

    _report(train_pretrain(cfg))
    return 0


def run_sft(args) -> int:
    cfg = config_from_args(SFTConfig, args)
    from ..train.sft import train_sft

    _report(train_sft(cfg))
    return 0
