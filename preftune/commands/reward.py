"""``preftune reward`` (train a reward model) and ``preftune score`` (score prompt/response rows with one)."""

from __future__ import annotations

import argparse

from rich.console import Console

from ..config import RewardConfig
from . import add_training_command

out = Console()


def register(subparsers) -> None:
    add_training_command(
        subparsers, "reward", RewardConfig, "preftune.train.reward:train_reward",
        help="Train a reward model on preference pairs (Bradley-Terry, margin ranking, soft labels).",
        description="A scalar reward model: a one-output classification head on any transformers backbone, read at "
                    "the last token (decoders) or [CLS] (encoders).")

    score = subparsers.add_parser(
        "score", help="Score prompt/response rows with a reward model; writes each row plus 'reward' (JSONL).",
        description="Reads rows with 'prompt' and 'response' (strings, or lists of messages rendered with the chat "
                    "template) and writes each row with its 'reward' added, in the input order.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    score.add_argument("--model", required=True, help="Reward model directory (a full model or a LoRA adapter) or hub name.")
    score.add_argument("--input", required=True, help="Rows to score: JSONL/JSON/Parquet/CSV file, save_to_disk directory or hub name.")
    score.add_argument("--output", required=True, help="Where to write the scored rows (JSONL).")
    score.add_argument("--batch_size", type=int, default=16, help="Sequences per forward pass.")
    score.add_argument("--max_length", type=int, default=None, help="Cut longer prompts at their start to this many tokens.")
    score.add_argument("--split", default="train", help="Split to read from a directory or hub dataset.")
    score.add_argument("--device", default=None, help="Device to score on, e.g. cuda or cpu; None means cuda when available.")
    score.set_defaults(handler=run_score)


def run_score(args) -> int:
    from ..scoring.files import score_file

    result = score_file(args.model, args.input, args.output, batch_size=args.batch_size, max_length=args.max_length,
                        split=args.split, device=args.device)
    out.print(f"[green]scored[/] {result.rows} rows (mean reward {result.mean_reward:.4g}); written to {result.output}")
    return 0
