"""``preftune demo``: an offline DPO run end to end on a tiny model and a toy preference.

Builds a tokenizer and a small Llama on the spot (nothing is downloaded), writes a toy preference
dataset (calm words preferred over loud ones) as JSONL, trains DPO through the same code path as
``preftune dpo`` and shows held-out preference accuracy before and after.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .config import DPOConfig
from .toy import build_tiny_llama, build_toy_tokenizer, make_toy_preferences


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def prepare_demo_inputs(root: Path, train_rows: int = 512, eval_rows: int = 128) -> tuple[Path, Path, Path]:
    """A saved tiny base model and train/eval JSONL files under ``root``."""
    base = root / "base-model"
    if not (base / "config.json").is_file():
        tokenizer = build_toy_tokenizer()
        build_tiny_llama(tokenizer, hidden_size=64, layers=2, heads=4).save_pretrained(base)
        tokenizer.save_pretrained(base)
    train = write_jsonl(make_toy_preferences(train_rows, seed=1), root / "data" / "train.jsonl")
    held_out = write_jsonl(make_toy_preferences(eval_rows, seed=2), root / "data" / "eval.jsonl")
    return base, train, held_out


def demo_config(root: Path, base: Path, train: Path, held_out: Path) -> DPOConfig:
    return DPOConfig(
        model_name_or_path=str(base), dataset=str(train), eval_dataset=str(held_out), output_dir=str(root / "dpo"),
        beta=0.1, learning_rate=1e-4, per_device_batch_size=16, num_epochs=3, warmup_ratio=0.1,
        logging_steps=8, eval_steps=32, eval_on_start=True, save_steps=48, max_length=64, precompute_ref=True,
        cache_dir=str(root / "cache"), seed=0, overwrite_output_dir=True,
    )


def run_demo(output_dir: str = "runs/demo") -> dict:
    from .train.dpo import train_dpo

    console = Console()
    root = Path(output_dir)
    console.rule("preftune demo: DPO on a toy preference (offline, CPU)")
    base, train, held_out = prepare_demo_inputs(root)
    cfg = demo_config(root, base, train, held_out)
    cfg.validate()
    result = train_dpo(cfg)
    evals = [json.loads(line) for line in result.metrics_file.read_text().splitlines() if '"eval/loss"' in line]
    table = Table(title="held-out preference pairs")
    table.add_column("step", justify="right")
    for name in ("loss", "rewards/accuracies", "rewards/margins"):
        table.add_column(name, justify="right")
    for record in evals:
        table.add_row(str(record["step"]), *(f"{record[f'eval/{k}']:.4f}" for k in ("loss", "rewards/accuracies", "rewards/margins")))
    console.print(table)
    console.print(f"trained model: [bold]{result.model_dir}[/]")
    console.print(f"metrics:       [bold]{result.metrics_file}[/]")
    return {"model_dir": str(result.model_dir), "metrics": str(result.metrics_file), "eval": evals[-1] if evals else {}}
