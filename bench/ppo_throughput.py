"""PPO throughput and peak memory: preftune against TRL's PPOTrainer (``trl.experimental.ppo``) on the same work.

Both get the same saved policy (a Llama with a 32k vocabulary), the same reward model (a Llama
sequence classifier of the same size), the same prompts, rollout batch, micro-batch, response length,
PPO epochs, fp32 and optimiser settings. TRL's critic is a sequence classifier loaded from the policy
weights; preftune's default critic is the same thing (a copy of the policy's backbone with a scalar
head), so both run policy, reference, critic and reward model. Each trainer runs in its own fresh
process with the same number of threads (``--threads``, default 1: on a shared machine one thread
per process is far less disturbed by other load than two); an iteration (rollout + updates) is timed
from one iteration's end to the next, in wall time and in process CPU time, and the median of
iterations 2..N is reported. Peak memory is the peak resident set size above the size after imports,
sampled every 2 ms.

TRL removed ``trl.experimental.ppo`` after 1.12.0. If the installed TRL lacks it, TRL 1.12.0 is
installed (without dependencies) into a cache directory and put on the TRL worker's path only.

    python bench/ppo_throughput.py                      # full comparison (a few minutes on 2 CPU cores)
    python bench/ppo_throughput.py --iterations 3       # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dpo_throughput import PeakRSS  # noqa: E402
from harness import add_model_arguments, add_worker_arguments, results_table, run_worker  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

TRL_WITH_PPO = "1.12.0"


def build_assets(root: Path, vocab: int, hidden: int, layers: int, prompts: int, prompt_length: int,
                 seed: int = 0) -> dict:
    """A word-level tokenizer (exact round trips), a policy checkpoint, a reward model and a JSONL of prompts."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(vocab - 3)]
    table = {"<pad>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    raw = Tokenizer(models.WordLevel(vocab=table, unk_token="<pad>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                         num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         max_position_embeddings=1024,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    paths = {"model": root / "policy", "reward": root / "reward"}
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(paths["model"])
    config.num_labels = 1
    LlamaForSequenceClassification(config).save_pretrained(paths["reward"])
    for path in paths.values():
        tokenizer.save_pretrained(path)
    rng = random.Random(seed)
    data = root / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": " ".join(rng.choice(words) for _ in range(prompt_length))}) + "\n"
                            for _ in range(prompts)))
    return {"model": str(paths["model"]), "reward": str(paths["reward"]), "data": str(data)}


# ---------------------------------------------------------------------- workers (one fresh process each)


def run_ours(args, assets, out_dir: Path, lora: bool = False) -> dict:
    import torch

    from preftune.config import PPOConfig
    from preftune.train import loop
    from preftune.train.ppo import read_metrics, train_ppo

    torch.manual_seed(0)
    stamps: list[tuple[float, float]] = []
    original_log = loop.Trainer.log

    def timed_log(self, metrics):  # logging_steps=1: called once at the end of every iteration
        stamps.append((time.perf_counter(), time.process_time()))
        original_log(self, metrics)

    loop.Trainer.log = timed_log
    meter = PeakRSS()
    meter.start()
    cfg = PPOConfig(model_name_or_path=assets["model"], dataset=assets["data"], output_dir=str(out_dir),
                    reward_model_path=assets["reward"], per_device_batch_size=args.micro,
                    gradient_accumulation_steps=args.batch // args.micro, num_mini_batches=1,
                    num_ppo_epochs=args.epochs, max_new_tokens=args.response, generation_batch_size=args.batch,
                    learning_rate=args.lr, max_steps=args.iterations, logging_steps=1, seed=0, precision="fp32",
                    kl_coef=0.05, log_samples_steps=0, lora=lora, lora_r=16, lora_alpha=32, overwrite_output_dir=True)
    started = (time.perf_counter(), time.process_time())
    train_ppo(cfg)
    total = time.perf_counter() - started[0]
    peak = meter.stop()
    records = read_metrics(out_dir)
    return {**_intervals(started, stamps), "peak_mib": peak, "total_s": total,
            "response_length": statistics.mean(r["response/length"] for r in records),
            "entropy_first": records[0]["objective/entropy"], "kl_first": records[0]["objective/kl"]}


def run_trl(args, assets, out_dir: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    torch.manual_seed(0)
    stamps: list[tuple[float, float]] = []

    class IterationTimer(TrainerCallback):
        def on_step_end(self, *a, **k):
            stamps.append((time.perf_counter(), time.process_time()))

    meter = PeakRSS()
    meter.start()
    tokenizer = AutoTokenizer.from_pretrained(assets["model"], padding_side="left")
    prompts = [json.loads(line)["prompt"] for line in Path(assets["data"]).read_text().splitlines()]
    dataset = Dataset.from_dict({"input_ids": [tokenizer(p)["input_ids"] for p in prompts]})
    policy = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(assets["model"], num_labels=1, dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(assets["reward"], num_labels=1, dtype=torch.float32)
    config = PPOConfig(output_dir=str(out_dir), per_device_train_batch_size=args.micro,
                       gradient_accumulation_steps=args.batch // args.micro, num_mini_batches=1,
                       num_ppo_epochs=args.epochs, response_length=args.response,
                       local_rollout_forward_batch_size=args.batch, total_episodes=args.iterations * args.batch,
                       learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=0, kl_coef=0.05,
                       temperature=1.0, stop_token="eos", missing_eos_penalty=None, num_sample_generations=0,
                       bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True, report_to="none",
                       save_strategy="no", logging_steps=1, seed=0, disable_tqdm=True, optim="adamw_torch")
    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=ref, reward_model=reward,
                         value_model=value, train_dataset=dataset, eval_dataset=dataset.select(range(args.batch)),
                         callbacks=[IterationTimer()])
    started = (time.perf_counter(), time.process_time())
    trainer.train()
    total = time.perf_counter() - started[0]
    peak = meter.stop()
    logs = [h for h in trainer.state.log_history if "objective/entropy" in h]
    return {**_intervals(started, stamps), "peak_mib": peak, "total_s": total,
            "response_length": float(args.response), "entropy_first": logs[0]["objective/entropy"],
            "kl_first": logs[0]["objective/kl"]}


def _intervals(started: tuple[float, float], stamps: list[tuple[float, float]]) -> dict[str, list[float]]:
    points = [started] + stamps
    return {"iteration_times": [b[0] - a[0] for a, b in zip(points, points[1:])],
            "iteration_cpu": [b[1] - a[1] for a, b in zip(points, points[1:])]}


WORKERS = {
    "preftune": lambda a, s, o: run_ours(a, s, o),
    "preftune-lora": lambda a, s, o: run_ours(a, s, o, lora=True),
    "trl": run_trl,
}


# ---------------------------------------------------------------------- parent


def trl_path() -> str | None:
    """A directory to put first on the TRL worker's path, or None if the installed TRL has PPO."""
    probe = subprocess.run([sys.executable, "-c", "import trl.experimental.ppo"], capture_output=True)
    if probe.returncode == 0:
        return None
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    target = cache / "preftune" / "bench" / f"trl-{TRL_WITH_PPO}"
    if not (target / "trl" / "experimental" / "ppo").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                        f"trl=={TRL_WITH_PPO}"], check=True)
    return str(target)


def spawn(name: str, args, assets_file: Path, root: Path) -> dict:
    out = root / f"out-{name}"
    cmd = [sys.executable, __file__, "--worker", name, "--assets", str(assets_file), "--out", str(out)]
    for key in ("iterations", "batch", "micro", "epochs", "response", "lr", "threads"):
        cmd += [f"--{key}", str(getattr(args, key))]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    if name.startswith("trl") and args.trl_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [args.trl_path, env.get("PYTHONPATH")]))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise SystemExit(f"worker {name} failed")
    return json.loads((out / "bench.json").read_text())


def summarise(result: dict, batch: int) -> dict:
    timed = result["iteration_times"][1:] or result["iteration_times"]  # the first iteration warms up
    iteration = statistics.median(timed)
    cpu = statistics.median(result["iteration_cpu"][1:] or result["iteration_cpu"])
    return {"iterations/s": 1 / iteration, "samples/s": batch / iteration, "peak MiB": result["peak_mib"],
            "iteration s": iteration, "CPU s / iteration": cpu, "total s": result["total_s"],
            "response length": result["response_length"],
            "entropy (iter 1)": result["entropy_first"], "kl (iter 1)": result["kl_first"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16, help="prompts per rollout (both trainers)")
    parser.add_argument("--micro", type=int, default=8, help="sequences per forward/backward pass")
    parser.add_argument("--epochs", type=int, default=4, help="PPO epochs per rollout")
    parser.add_argument("--response", type=int, default=64, help="response length (max new tokens)")
    parser.add_argument("--prompt-length", type=int, default=64)
    add_model_arguments(parser, lr=3e-6)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker process")
    parser.add_argument("--runs", nargs="*", default=["preftune", "trl", "preftune-lora"])
    add_worker_arguments(parser)
    args = parser.parse_args()

    if run_worker(args, WORKERS, threads=args.threads):
        return

    from rich.console import Console

    console = Console()
    args.trl_path = trl_path() if any(r.startswith("trl") for r in args.runs) else None
    root = Path(tempfile.mkdtemp(prefix="preftune-ppo-bench-"))
    assets = build_assets(root, args.vocab, args.hidden, args.layers, prompts=args.batch * args.iterations,
                          prompt_length=args.prompt_length)
    assets_file = root / "assets.json"
    assets_file.write_text(json.dumps(assets))
    console.print(f"policy, critic, reward model: Llama vocab={args.vocab} hidden={args.hidden} layers={args.layers}; "
                  f"rollout {args.batch} prompts of {args.prompt_length} tokens, {args.response} new tokens, "
                  f"micro-batch {args.micro}, {args.epochs} PPO epochs; fp32; {args.threads} thread(s) per process, "
                  f"{os.cpu_count()} CPUs")
    results = {}
    for name in args.runs:
        console.print(f"running {name} ...")
        results[name] = summarise(spawn(name, args, assets_file, root), args.batch)
    columns = ["iterations/s", "samples/s", "peak MiB", "iteration s", "CPU s / iteration", "total s",
               "response length",
               "entropy (iter 1)"]
    console.print(results_table("PPO iteration: rollout + updates (median of iterations 2..N)", results, columns,
                                lambda column, value: f"{value:.3f}" if column == "iterations/s" else f"{value:.1f}"))
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
