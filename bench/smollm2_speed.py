"""Seconds per step of LoRA and full DPO on SmolLM2-135M-Instruct on this machine's CPU.

Batch of 2 pairs, ~100-token prompts and ~20-token responses, live reference (no precompute), fp32.
Reports wall seconds per step (from the run's pairs/s, first step left out) and CPU seconds per step
(process CPU time of a run of 1 + N steps minus that of a 1-step run, over N): on a shared machine the
wall figure includes waiting for the CPU, the CPU figure does not.
Usage: python bench/smollm2_speed.py [--threads 1 2] [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from preftune import DPOConfig
from preftune.realmodel import obtain_checkpoint
from preftune.recipes.dpo import train_dpo

WORDS = "the quiet river carried small boats past old stone houses while children watched from the bridge".split()


def pairs(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        prompt = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(85)) + ". Summarise this in one sentence."
        rows.append({"prompt": prompt, "chosen": " A calm river flows past houses and a bridge where children watch.",
                     "rejected": " Boats. Houses. Bridge. Children. River. Stones. Water. Old. Small. Quiet."})
    return rows


def timed_run(model_dir: Path, data: Path, out: Path, lora: bool, steps: int) -> tuple[float, float]:
    """``(wall seconds per step after the first, process CPU seconds of the whole run)``."""
    cfg = DPOConfig(model_name_or_path=str(model_dir), dataset=str(data), output_dir=str(out), per_device_batch_size=2,
                    max_length=256, logging_steps=1, max_steps=steps, warmup_ratio=0.0, lora=lora,
                    learning_rate=1e-4 if lora else 1e-6)
    cfg.validate()
    cpu = time.process_time()
    train_dpo(cfg)
    cpu = time.process_time() - cpu
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["pairs/s"] for r in lines if "pairs/s" in r][1:]      # the first step includes warm-up
    return (sum(2 / r for r in rates) / len(rates) if rates else float("nan")), cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    start = time.perf_counter()
    model_dir = obtain_checkpoint()
    print(f"model ready in {time.perf_counter() - start:.1f} s: {model_dir}")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "pairs.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in pairs(2 * args.steps + 2)))
        for threads in args.threads:
            torch.set_num_threads(threads)
            for lora in (True, False):
                name = "lora" if lora else "full"
                wall, cpu = timed_run(model_dir, data, Path(tmp) / f"{name}-{threads}", lora, args.steps + 1)
                _, cpu_one = timed_run(model_dir, data, Path(tmp) / f"{name}-{threads}-one", lora, 1)
                print(json.dumps({"threads": threads, "mode": name, "wall_seconds_per_step": round(wall, 2),
                                  "cpu_seconds_per_step": round((cpu - cpu_one) / args.steps, 2)}), flush=True)


if __name__ == "__main__":
    main()
