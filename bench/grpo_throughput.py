"""GRPO throughput and peak memory: preftune against TRL 1.16's GRPOTrainer on the same work.

Both get the same saved policy (a Llama with a 32k vocabulary), the same prompts, the same Python
reward function (the fraction of completion words from a target set), the same group size G,
completion length, micro-batch, fp32, optimiser settings and β = 0 (no reference model: both skip
it), loss ``dapo``, one pass per rollout and one optimiser step per iteration. Each trainer runs in
its own fresh process with the same number of threads; an iteration (sampling + scoring + update) is
timed from one iteration's end to the next, in wall time and process CPU time, and the median of
iterations 2..N is reported. Peak memory is the peak resident set size above the size after
imports, sampled every 2 ms. samples/s counts completions.

TRL is not a dependency: if the installed TRL is not 1.16, TRL 1.16.0 is installed (without
dependencies) into a cache directory and put on the TRL worker's path only.

    python bench/grpo_throughput.py                     # full comparison
    python bench/grpo_throughput.py --iterations 3      # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dpo_throughput import PeakRSS  # noqa: E402
from ppo_throughput import _intervals, build_assets  # noqa: E402

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
    from preftune.train import loop
    from preftune.train.grpo import train_grpo
    from preftune.train.ppo import read_metrics

    torch.manual_seed(0)
    stamps: list[tuple[float, float]] = []
    original_log = loop.Trainer.log

    def timed_log(self, metrics):  # logging_steps=1: called once at the end of every iteration
        stamps.append((time.perf_counter(), time.process_time()))
        original_log(self, metrics)

    loop.Trainer.log = timed_log
    meter = PeakRSS()
    meter.start()
    completions = args.prompts * args.generations
    cfg = GRPOConfig(model_name_or_path=assets["model"], dataset=assets["data"], output_dir=str(out_dir),
                     per_device_batch_size=args.micro, gradient_accumulation_steps=completions // args.micro,
                     num_generations=args.generations, max_completion_length=args.completion,
                     generation_batch_size=completions, learning_rate=args.lr, max_steps=args.iterations,
                     logging_steps=1, seed=0, precision="fp32", loss_type="dapo", beta=0.0, log_samples_steps=0,
                     overwrite_output_dir=True)
    started = (time.perf_counter(), time.process_time())
    train_grpo(cfg, reward_funcs=[target_fraction])
    total = time.perf_counter() - started[0]
    peak = meter.stop()
    records = read_metrics(out_dir)
    return {**_intervals(started, stamps), "peak_mib": peak, "total_s": total,
            "completion_length": statistics.mean(r["completions/mean_length"] for r in records),
            "reward_first": records[0]["reward"], "entropy_first": records[0]["entropy"]}


def run_trl(args, assets, out_dir: Path) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    assert trl.__version__ == TRL_VERSION, trl.__version__
    torch.manual_seed(0)
    stamps: list[tuple[float, float]] = []

    class IterationTimer(TrainerCallback):
        def on_step_end(self, *a, **k):
            stamps.append((time.perf_counter(), time.process_time()))

    meter = PeakRSS()
    meter.start()
    tokenizer = AutoTokenizer.from_pretrained(assets["model"], padding_side="left")
    prompts = [json.loads(line)["prompt"] for line in Path(assets["data"]).read_text().splitlines()]
    dataset = Dataset.from_dict({"prompt": prompts})
    policy = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float32)
    completions = args.prompts * args.generations
    config = GRPOConfig(output_dir=str(out_dir), per_device_train_batch_size=args.micro,
                        gradient_accumulation_steps=completions // args.micro, num_generations=args.generations,
                        max_completion_length=args.completion, learning_rate=args.lr, lr_scheduler_type="linear",
                        warmup_steps=0, beta=0.0, loss_type="dapo", num_iterations=1, temperature=1.0,
                        max_steps=args.iterations, bf16=False, fp16=False, use_cpu=True, report_to="none",
                        save_strategy="no", logging_steps=1, seed=0, disable_tqdm=True, optim="adamw_torch")
    trainer = GRPOTrainer(model=policy, reward_funcs=[target_fraction], args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[IterationTimer()])
    started = (time.perf_counter(), time.process_time())
    trainer.train()
    total = time.perf_counter() - started[0]
    peak = meter.stop()
    logs = [h for h in trainer.state.log_history if "reward" in h]
    return {**_intervals(started, stamps), "peak_mib": peak, "total_s": total,
            "completion_length": statistics.mean(h["completions/mean_length"] for h in logs),
            "reward_first": logs[0]["reward"], "entropy_first": logs[0].get("entropy", float("nan"))}


WORKERS = {"preftune": run_ours, "trl": run_trl}


# ---------------------------------------------------------------------- parent


def trl_path() -> str | None:
    """A directory to put first on the TRL worker's path, or None if TRL 1.16 is installed."""
    probe = subprocess.run([sys.executable, "-c", f"import trl; assert trl.__version__ == '{TRL_VERSION}'"],
                           capture_output=True)
    if probe.returncode == 0:
        return None
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    target = cache / "preftune" / "bench" / f"trl-{TRL_VERSION}"
    if not (target / "trl").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                        f"trl=={TRL_VERSION}"], check=True)
    return str(target)


def spawn(name: str, args, assets_file: Path, root: Path) -> dict:
    out = root / f"out-{name}"
    cmd = [sys.executable, __file__, "--worker", name, "--assets", str(assets_file), "--out", str(out)]
    for key in ("iterations", "prompts", "generations", "micro", "completion", "lr", "threads"):
        cmd += [f"--{key}", str(getattr(args, key))]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    if name == "trl" and args.trl_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [args.trl_path, env.get("PYTHONPATH")]))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise SystemExit(f"worker {name} failed")
    return json.loads((out / "bench.json").read_text())


def summarise(result: dict, completions: int) -> dict:
    iteration = statistics.median(result["iteration_times"][1:] or result["iteration_times"])  # 1st warms up
    cpu = statistics.median(result["iteration_cpu"][1:] or result["iteration_cpu"])
    return {"samples/s": completions / iteration, "peak MiB": result["peak_mib"], "iteration s": iteration,
            "CPU s / iteration": cpu, "total s": result["total_s"], "completion length": result["completion_length"],
            "reward (iter 1)": result["reward_first"], "entropy (iter 1)": result["entropy_first"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per iteration")
    parser.add_argument("--generations", type=int, default=8, help="completions per prompt (G)")
    parser.add_argument("--micro", type=int, default=8, help="sequences per forward/backward pass")
    parser.add_argument("--completion", type=int, default=64, help="max completion length")
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker process")
    parser.add_argument("--runs", nargs="*", default=["preftune", "trl"])
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--assets", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        result = WORKERS[args.worker](args, json.loads(Path(args.assets).read_text()), out)
        (out / "bench.json").write_text(json.dumps(result))
        return

    from rich.console import Console
    from rich.table import Table

    console = Console()
    args.trl_path = trl_path() if "trl" in args.runs else None
    root = Path(tempfile.mkdtemp(prefix="preftune-grpo-bench-"))
    assets = build_assets(root, args.vocab, args.hidden, args.layers, prompts=args.prompts * args.iterations,
                          prompt_length=args.prompt_length)
    assets_file = root / "assets.json"
    assets_file.write_text(json.dumps(assets))
    completions = args.prompts * args.generations
    console.print(f"policy: Llama vocab={args.vocab} hidden={args.hidden} layers={args.layers}; {args.prompts} prompts "
                  f"of {args.prompt_length} tokens x G={args.generations}, up to {args.completion} new tokens, "
                  f"micro-batch {args.micro}, one update per iteration, beta 0; fp32; {args.threads} thread(s) per "
                  f"process, {os.cpu_count()} CPUs")
    results = {}
    for name in args.runs:
        console.print(f"running {name} ...")
        results[name] = summarise(spawn(name, args, assets_file, root), completions)
    columns = list(next(iter(results.values())))
    table = Table(title="GRPO iteration: sampling + reward + update (median of iterations 2..N)")
    table.add_column("trainer")
    for column in columns:
        table.add_column(column, justify="right")
    for name, r in results.items():
        table.add_row(name, *(f"{r[c]:.3f}" if "reward" in c else f"{r[c]:.1f}" for c in columns))
    console.print(table)
    report = {"config": {k: v for k, v in vars(args).items() if k not in ("worker", "assets", "out")},
              "results": results}
    if "preftune" in results and "trl" in results:
        ours, theirs = results["preftune"], results["trl"]
        ratio = {"speed": ours["samples/s"] / theirs["samples/s"], "memory": ours["peak MiB"] / theirs["peak MiB"],
                 "cpu": ours["CPU s / iteration"] / theirs["CPU s / iteration"]}
        report["preftune vs trl"] = ratio
        console.print(f"preftune vs TRL: {ratio['speed']:.2f}x samples/s, {ratio['cpu']:.2f}x CPU time per iteration, "
                      f"{ratio['memory']:.2f}x peak memory")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
