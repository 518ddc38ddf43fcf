"""GRPO throughput and peak memory: preftune against TRL 1.16's GRPOTrainer on the same work.

Both get the same saved policy (a Llama with a 32k vocabulary), the same prompts, the same Python
reward function (the fraction of completion words from a target set), the same group size G,
completion length, micro-batch, precision (``--precision fp32`` or ``bf16``: preftune's autocast with fp32
master weights, TRL's ``bf16=True`` with the policy loaded in bf16), optimiser settings and β = 0 (no
reference model: both skip it), loss ``dapo``, one pass per rollout and one optimiser step per iteration.
Each trainer runs in its own fresh process with the same number of threads; an iteration (sampling + scoring +
update) is timed from one iteration's end to the next, in wall time and process CPU time, and the median of
iterations 2..N is reported. Peak memory is the peak resident set size above the size after
imports, sampled every 2 ms. samples/s counts completions.

TRL is not a dependency: if the installed TRL is not 1.16, TRL 1.16.0 is installed (without
dependencies) into a cache directory and put on the TRL worker's path only.

    python bench/grpo_throughput.py                     # full comparison
    python bench/grpo_throughput.py --iterations 3      # quicker
    python bench/grpo_throughput.py --precision bf16    # both in bf16
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from ppo_throughput import build_assets  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

TRL_VERSION = "1.16.0"
TARGET = {f"w{i}" for i in range(0, 32000, 7)}


def target_fraction(prompts, completions, **_):
    """The reward both trainers optimise: the fraction of completion words in :data:`TARGET`."""
    return [sum(w in TARGET for w in c.split()) / max(1, len(c.split())) for c in completions]


# ---------------------------------------------------------------------- workers (one fresh process each)


def run_ours(args, assets, out_dir: Path) -> dict:
    import torch

    from preftune.config import GRPOConfig
    from preftune.recipes.grpo import train_grpo
    from preftune.recipes.ppo import read_metrics

    torch.manual_seed(0)
    measure = harness.Measure(harness.preftune_stamps())
    completions = args.prompts * args.generations
    cfg = GRPOConfig(model_name_or_path=assets["model"], dataset=assets["data"], output_dir=str(out_dir),
                     per_device_batch_size=args.micro, gradient_accumulation_steps=completions // args.micro,
                     num_generations=args.generations, max_completion_length=args.completion,
                     sampling_batch_size=completions, learning_rate=args.lr, max_steps=args.iterations,
                     logging_steps=1, seed=0, precision=args.precision, loss_type="dapo", beta=0.0, log_samples_steps=0,
                     overwrite_output_dir=True)
    figures = measure.train(lambda: train_grpo(cfg, reward_funcs=[target_fraction]))
    records = read_metrics(out_dir)
    return {**figures,
            "completion_length": statistics.mean(r["completions/mean_length"] for r in records),
            "reward_first": records[0]["reward"], "entropy_first": records[0]["entropy"]}


def run_trl(args, assets, out_dir: Path) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    assert trl.__version__ == TRL_VERSION, trl.__version__
    torch.manual_seed(0)
    stamps: list[tuple[float, float]] = []
    measure = harness.Measure(stamps)
    tokenizer = AutoTokenizer.from_pretrained(assets["model"], padding_side="left")
    prompts = [json.loads(line)["prompt"] for line in Path(assets["data"]).read_text().splitlines()]
    dataset = Dataset.from_dict({"prompt": prompts})
    bf16 = args.precision == "bf16"
    policy = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.bfloat16 if bf16 else torch.float32)
    completions = args.prompts * args.generations
    config = GRPOConfig(output_dir=str(out_dir), per_device_train_batch_size=args.micro,
                        gradient_accumulation_steps=completions // args.micro, num_generations=args.generations,
                        max_completion_length=args.completion, learning_rate=args.lr, lr_scheduler_type="linear",
                        warmup_steps=0, beta=0.0, loss_type="dapo", num_iterations=1, temperature=1.0,
                        max_steps=args.iterations, bf16=bf16, fp16=False, use_cpu=True, report_to="none",
                        save_strategy="no", logging_steps=1, seed=0, disable_tqdm=True, optim="adamw_torch")
    trainer = GRPOTrainer(model=policy, reward_funcs=[target_fraction], args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[harness.trl_timer(stamps)])
    figures = measure.train(trainer.train)
    logs = [h for h in trainer.state.log_history if "reward" in h]
    return {**figures,
            "completion_length": statistics.mean(h["completions/mean_length"] for h in logs),
            "reward_first": logs[0]["reward"], "entropy_first": logs[0].get("entropy", float("nan"))}


WORKERS = {"preftune": run_ours, "trl": run_trl}

SPAWN_KEYS = ["iterations", "prompts", "generations", "micro", "completion", "lr", "threads", "precision"]


# ---------------------------------------------------------------------- parent


def summarise(result: dict, completions: int) -> dict:
    iteration, cpu = harness.iteration_medians(result)
    return {"samples/s": completions / iteration, "peak MiB": result["peak_mib"], "iteration s": iteration,
            "CPU s / iteration": cpu, "total s": result["total_s"], "completion length": result["completion_length"],
            "reward (iter 1)": result["reward_first"], "entropy (iter 1)": result["entropy_first"]}


def main() -> None:
    shape = {"--prompts": (4, "prompts per iteration"), "--generations": (8, "completions per prompt (G)"),
             "--completion": (64, "max completion length")}
    parser = harness.online_parser(__doc__, lr=1e-6, runs=["preftune", "trl"], shape=shape)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="both trainers' precision")
    args = parser.parse_args()

    if harness.run_worker(args, WORKERS, threads=args.threads):
        return

    console = harness.console()
    probe = f"import trl; assert trl.__version__ == '{TRL_VERSION}'"
    args.trl_path = harness.trl_in_cache(TRL_VERSION, probe, "trl") if "trl" in args.runs else None
    root = Path(tempfile.mkdtemp(prefix="preftune-grpo-bench-"))
    assets = build_assets(root, args.vocab, args.hidden, args.layers, prompts=args.prompts * args.iterations,
                          prompt_length=args.prompt_length)
    completions = args.prompts * args.generations
    console.print(f"policy: Llama vocab={args.vocab} hidden={args.hidden} layers={args.layers}; {args.prompts} prompts "
                  f"of {args.prompt_length} tokens x G={args.generations}, up to {args.completion} new tokens, "
                  f"micro-batch {args.micro}, one update per iteration, beta 0; {args.precision}; {args.threads} "
                  f"thread(s) per process, {os.cpu_count()} CPUs")
    runs = harness.spawn_all(__file__, args, SPAWN_KEYS, assets, root, console)
    results = {name: summarise(result, completions) for name, result in runs.items()}
    columns = list(next(iter(results.values())))
    harness.report_against_trl(console, args, results,
                               "GRPO iteration: sampling + reward + update (median of iterations 2..N)", columns,
                               lambda column, value: f"{value:.{3 if 'reward' in column else 1}f}")


if __name__ == "__main__":
    main()
