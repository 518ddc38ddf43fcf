"""DPO training throughput and peak memory: preftune against TRL's DPOTrainer on the same work.

Both trainers get the same saved model (a Llama with a 32k vocabulary), the same text pairs
(prompts ~100 tokens, responses 100-200 tokens), the same batch, precision (fp32) and optimiser
settings. Each runs in its own fresh process; the parent prints pairs/s, tokens/s and peak memory
and their ratios. Peak memory is the process's peak resident set size minus its size right after
imports (so the libraries' own footprint is not counted), sampled every 2 ms.

A second, small comparison checks numerical agreement: one batch holding the whole dataset (so
data order cannot matter), three optimiser steps, loss and mean log-probs compared per step.

    python bench/dpo_throughput.py                 # full comparison (several minutes on 2 CPU cores)
    python bench/dpo_throughput.py --steps 4       # quicker
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

from harness import PeakRSS, add_model_arguments, add_worker_arguments, results_table, run_worker

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")


# ---------------------------------------------------------------------- shared set-up


def build_assets(root: Path, vocab: int, hidden: int, layers: int, pairs: int, seed: int = 0) -> dict:
    """A word-level tokenizer (exact token counts, no merges), a Llama checkpoint and a JSONL of pairs."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(vocab - 3)]
    table = {"<pad>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    raw = Tokenizer(models.WordLevel(vocab=table, unk_token="<pad>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    model_dir = root / "model"
    tokenizer.save_pretrained(model_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                         num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         max_position_embeddings=1024,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(model_dir)
    rng = random.Random(seed)

    def text(n):
        return " ".join(rng.choice(words) for _ in range(n))

    rows = [{"prompt": text(rng.randint(90, 110)), "chosen": " " + text(rng.randint(100, 200)),
             "rejected": " " + text(rng.randint(100, 200))} for _ in range(pairs)]
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # tokens per pair as trained: prompt twice, both responses, one EOS each
    tokens = sum(2 * len(r["prompt"].split()) + len(r["chosen"].split()) + len(r["rejected"].split()) + 2 for r in rows)
    return {"model": str(model_dir), "data": str(data), "tokens_per_pair": tokens / len(rows)}


# ---------------------------------------------------------------------- workers (one fresh process each)


def run_ours(args, assets, out_dir: Path, precompute: bool = True) -> dict:
    import torch  # noqa: F401  (imported before the baseline, like TRL's worker)

    from preftune import DPOConfig
    from preftune.recipes.dpo import train_dpo

    meter = PeakRSS()
    meter.start()
    cfg = DPOConfig(model_name_or_path=assets["model"], dataset=assets["data"], output_dir=str(out_dir),
                    per_device_batch_size=args.batch, max_steps=args.steps, learning_rate=args.lr, warmup_ratio=0.0,
                    lr_scheduler="linear", logging_steps=1, max_length=1024, precompute_ref=precompute,
                    cache_dir=str(out_dir / "cache"), beta=0.1, seed=0, precision="fp32",
                    logprob_chunk_size=args.chunk)
    started = time.perf_counter()
    train_dpo(cfg)
    total = time.perf_counter() - started
    peak = meter.stop()
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    step_times = [args.batch / r["pairs/s"] for r in steps]
    return {"step_times": step_times, "peak_mib": peak, "total_s": total,
            "losses": [r["loss"] for r in steps], "logps_chosen": [r["logps/chosen"] for r in steps],
            "logps_rejected": [r["logps/rejected"] for r in steps]}


def run_trl(args, assets, out_dir: Path, precompute: bool = False) -> dict:
    import torch  # noqa: F401
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    meter = PeakRSS()
    meter.start()
    step_times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            step_times.append(time.perf_counter() - self.t0)

    model = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(assets["model"])
    dataset = load_dataset("json", data_files=assets["data"], split="train")
    config = DPOConfig(output_dir=str(out_dir), per_device_train_batch_size=args.batch, max_steps=args.steps,
                       learning_rate=args.lr, warmup_steps=0, lr_scheduler_type="linear", logging_steps=1, beta=0.1,
                       bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True, report_to="none",
                       save_strategy="no", max_length=1024, seed=0, precompute_ref_log_probs=precompute,
                       dataloader_num_workers=0, disable_tqdm=True, optim="adamw_torch")
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[StepTimer()])
    started = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - started
    peak = meter.stop()
    logs = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    return {"step_times": step_times, "peak_mib": peak, "total_s": total,
            "losses": [h["loss"] for h in logs], "logps_chosen": [h.get("logps/chosen") for h in logs],
            "logps_rejected": [h.get("logps/rejected") for h in logs]}


WORKERS = {
    "preftune": lambda a, s, o: run_ours(a, s, o, precompute=True),
    "preftune-live-ref": lambda a, s, o: run_ours(a, s, o, precompute=False),
    "trl": lambda a, s, o: run_trl(a, s, o, precompute=False),
    "trl-precompute": lambda a, s, o: run_trl(a, s, o, precompute=True),
}


# ---------------------------------------------------------------------- parent


def spawn(name: str, args, assets_file: Path, root: Path, steps: int, batch: int) -> dict:
    out = root / f"out-{name}-{batch}-{steps}"
    cmd = [sys.executable, __file__, "--worker", name, "--assets", str(assets_file), "--out", str(out),
           "--steps", str(steps), "--batch", str(batch), "--lr", str(args.lr), "--chunk", str(args.chunk)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise SystemExit(f"worker {name} failed")
    return json.loads((out / "bench.json").read_text())


def summarise(result: dict, batch: int, tokens_per_pair: float) -> dict:
    timed = result["step_times"][1:] or result["step_times"]  # the first step warms up allocators and kernels
    step = statistics.median(timed)
    return {"pairs/s": batch / step, "tokens/s": batch * tokens_per_pair / step, "peak MiB": result["peak_mib"],
            "step s": step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4, help="pairs per step (both trainers)")
    parser.add_argument("--pairs", type=int, default=64)
    add_model_arguments(parser, lr=1e-5)
    parser.add_argument("--chunk", type=int, default=1024, help="preftune's logprob_chunk_size")
    parser.add_argument("--runs", nargs="*", default=["preftune", "trl", "trl-precompute"])
    parser.add_argument("--skip-agreement", action="store_true")
    add_worker_arguments(parser)
    args = parser.parse_args()

    if run_worker(args, WORKERS):
        return

    from rich.console import Console
    from rich.table import Table

    console = Console()
    root = Path(tempfile.mkdtemp(prefix="preftune-bench-"))
    assets = build_assets(root, args.vocab, args.hidden, args.layers, args.pairs)
    assets_file = root / "assets.json"
    assets_file.write_text(json.dumps(assets))
    console.print(f"model: Llama vocab={args.vocab} hidden={args.hidden} layers={args.layers}; batch={args.batch} "
                  f"pairs; {assets['tokens_per_pair']:.0f} tokens per pair; fp32; {os.cpu_count()} CPU threads")

    results = {}
    for name in args.runs:
        console.print(f"running {name} ...")
        results[name] = summarise(spawn(name, args, assets_file, root, args.steps, args.batch), args.batch,
                                  assets["tokens_per_pair"])
    digits = {"pairs/s": 3, "tokens/s": 0, "peak MiB": 0, "step s": 2}
    console.print(results_table("DPO training step (median of steps 2..N)", results, list(digits),
                                lambda column, value: f"{value:.{digits[column]}f}"))
    ours = results.get("preftune")
    report = {"config": vars(args), "results": results}
    if ours:
        for name, r in results.items():
            if name.startswith("trl"):
                ratio = {"speed": ours["pairs/s"] / r["pairs/s"], "memory": ours["peak MiB"] / r["peak MiB"]}
                report[f"preftune vs {name}"] = ratio
                console.print(f"preftune vs {name}: {ratio['speed']:.2f}x pairs/s, {ratio['memory']:.2f}x peak memory")

    if not args.skip_agreement:
        # whole dataset in one batch: data order cannot differ between the trainers
        small = build_assets(root / "agree", args.vocab, args.hidden, args.layers, pairs=4, seed=1)
        small_file = root / "agree.json"
        small_file.write_text(json.dumps(small))
        ours_run = spawn("preftune", args, small_file, root / "agree", 3, 4)
        trl_run = spawn("trl", args, small_file, root / "agree", 3, 4)
        rows = []
        for step, values in enumerate(zip(ours_run["losses"], trl_run["losses"], ours_run["logps_chosen"],
                                          trl_run["logps_chosen"]), start=1):
            rows.append({"step": step, "loss preftune": values[0], "loss trl": values[1],
                         "|diff|": abs(values[0] - values[1]), "logps/chosen preftune": values[2],
                         "logps/chosen trl": values[3]})
        agree = Table(title="numerical agreement (4 pairs, one batch, 3 steps)")
        for column in rows[0]:
            agree.add_column(column, justify="right")
        for row in rows:
            agree.add_row(*(f"{v:.6f}" if isinstance(v, float) else str(v) for v in row.values()))
        console.print(agree)
        report["agreement"] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
