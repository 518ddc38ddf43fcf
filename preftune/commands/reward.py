"""``preftune score``: score prompt/response rows with a reward model (``preftune reward`` trains one)."""

from __future__ import annotations

from rich.console import Console

out = Console()


def score_arguments(score) -> None:
    score.add_argument("--model", required=True, help="Reward model directory (a full model or a LoRA adapter) or hub "
                                                      "name.")
    score.add_argument("--input", required=True, help="Rows to score: JSONL/JSON/Parquet/CSV file, save_to_disk "
                                                      "directory or hub name.")
    score.add_argument("--output", required=True, help="Where to write the scored rows (JSONL).")
    score.add_argument("--batch_size", type=int, default=16, help="Sequences per forward pass.")
    score.add_argument("--max_length", type=int, default=None, help="Cut longer prompts at their start to this many "
                                                                    "tokens.")
    score.add_argument("--split", default="train", help="Split to read from a directory or hub dataset.")
    score.add_argument("--device", default=None, help="Device to score on, e.g. cuda or cpu; None means cuda when "
                                                      "available.")


def run_score(args) -> int:
    from ..modality import modality_of_data

    modality = modality_of_data(args.input, args.split)   # rows with images: a reward model on a VLM
    result = modality.score_file(args.model, args.input, args.output, batch_size=args.batch_size,
                                 max_length=args.max_length, split=args.split, device=args.device)
    out.print(f"[green]scored[/] {result.rows} rows (mean reward {result.mean_reward:.4g}); written to {result.output}")
    return 0
