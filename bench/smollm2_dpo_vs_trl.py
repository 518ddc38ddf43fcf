"""DPO on SmolLM2-135M-Instruct: preftune against TRL 1.16's DPOTrainer, full fine-tuning and LoRA r16.

The same checkpoint for both (``preftune.realmodel.obtain_checkpoint``), the same English pairs
(prompts of ~100 tokens, responses of 100-200 tokens of varied length, built deterministically from
sentence parts), batch 4 pairs, the same learning rate and beta, no gradient checkpointing on
either side, reference log-probs precomputed on both sides (``trl-live``: TRL with a live reference, its
faster setting in bf16). Both precisions on both sides (``--precisions fp32 bf16``): preftune's bf16 is autocast
with fp32 master weights (``--precision bf16``), TRL's ``bf16=True`` (weights loaded in bf16, as TRL's own
examples do). Each trainer runs in its own fresh process with the same thread count (``--threads``); the runs
of a comparison follow each other (preftune, TRL in fp32, then in bf16; then LoRA) so that both sides meet the
same machine load, and each worker records the load average. Step time is the median of steps 2..N.

Reported per run: pairs/s, tokens/s (the tokens that must be computed: each prompt once per pair,
no padding), peak resident set size, the first step's loss and mean chosen log-prob (agreement), and
the **limit fraction**: the time the minimum work would take over the measured step time, where the
minimum work is 6 x non-embedding parameters x necessary tokens + 6 x hidden x vocabulary x
completion tokens, at the **bf16** matmul rate each worker measures on this model's shapes (the forward
and both backward products of one decoder layer's linear layers over a step's tokens, and of the
output head over its completion tokens) on the same threads, just before and after it trains: the
fastest products this CPU has, so the limit of either precision. (``limit fraction fp32`` is the same at the
fp32 rate, as earlier tables reported it.) Each worker also records the CPU's bf16 units (AMX-BF16,
AVX512-BF16) and the bf16/fp32 rate ratio.

    python bench/smollm2_dpo_vs_trl.py --json bench/smollm2_results.json      # both precisions, ~40 min
    python bench/smollm2_dpo_vs_trl.py --runs preftune preftune-lora --precisions bf16 --steps 4
    bash bench/gpu/smollm2_bf16.sh       # on a GPU: bf16, TRL with and without Liger kernels (trl-liger runs)

On a GPU (``--device cuda``) peak memory is the CUDA allocator's peak (``torch.cuda.max_memory_allocated``)
and the matmul rate is measured on the GPU in the chosen precision.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from harness import PeakRSS  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

TRL_VERSION = "1.16.0"
RUNS = ["preftune", "trl", "trl-live", "preftune-lora", "trl-lora"]
LIGER_RUNS = ["trl-liger", "trl-lora-liger"]   # GPU only: TRL with use_liger_kernel
PRECISIONS = ["fp32", "bf16"]

# ---------------------------------------------------------------------- the pairs

SUBJECTS = ["The city council", "A small bakery on the corner", "My neighbour", "The science teacher",
            "The old lighthouse keeper", "A group of students", "The museum's new director", "Our football club",
            "The village library", "A young engineer", "The hospital's night staff", "The farmers' cooperative"]
VERBS = ["decided to", "was asked to", "planned to", "refused to", "hoped to", "managed to", "promised to",
         "tried to"]
ACTIONS = ["repair the bridge before the winter storms", "open a second shop near the railway station",
           "replace the heating system in the main hall", "organise a weekend market for local growers",
           "write a short guide for new volunteers", "collect old books for the school in the valley",
           "plant two hundred trees along the river path", "measure the air quality on the busiest streets",
           "move the evening classes to a larger room", "publish the results of the survey in the newsletter"]
TAILS = ["because the budget had finally been approved in March.", "although nobody expected it to work at first.",
         "so that more families could visit at the weekend.", "after a long discussion at the public meeting.",
         "even though the weather made the work much slower.", "while the rest of the town was on holiday.",
         "which surprised almost everyone who had followed the story.", "with help from a dozen volunteers."]
QUESTIONS = ["Read the notes below and explain what happened and why it mattered.",
             "Summarise the following report for a reader who has not seen it before.",
             "What are the main events described here, and what should happen next?"]
GOOD = ["In short,", "The key point is that", "To put it simply,", "Overall,", "It is worth noting that",
        "As a result,"]
BAD = ["Anyway,", "Honestly, who knows, but", "Well,", "I guess", "Maybe", "Whatever happened,"]


def sentence(rng: random.Random) -> str:
    return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(ACTIONS)}, {rng.choice(TAILS)}"


def text_of(rng: random.Random, tokenizer, start: str, tokens: int, openers: list[str] | None = None) -> str:
    """Sentences appended to ``start`` until the text has at least ``tokens`` tokens."""
    text = start
    while len(tokenizer(text, add_special_tokens=False)["input_ids"]) < tokens:
        body = sentence(rng)
        if openers:
            body = f"{rng.choice(openers)} {body[0].lower()}{body[1:]}"
        text += " " + body
    return text


def build_pairs(tokenizer, n: int, seed: int = 0) -> list[dict]:
    """``n`` English pairs: a ~100-token prompt, and two responses of 100-200 tokens each."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = text_of(rng, tokenizer, rng.choice(QUESTIONS) + "\n\n", rng.randint(82, 92)) + "\n\nAnswer:"
        rows.append({"prompt": prompt,
                     "chosen": text_of(rng, tokenizer, "", rng.randint(100, 200), GOOD),
                     "rejected": text_of(rng, tokenizer, "", rng.randint(100, 200), BAD)})
    return rows


def token_counts(tokenizer, rows: list[dict]) -> dict:
    """Per pair on average: necessary tokens (prompt once, both responses and their EOS) and completion tokens."""
    def count(text):
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    prompt = [count(r["prompt"]) for r in rows]
    completion = [count(r["chosen"]) + count(r["rejected"]) + 2 for r in rows]
    return {"prompt_tokens": statistics.mean(prompt), "completion_tokens": statistics.mean(completion),
            "necessary_tokens": statistics.mean(p + c for p, c in zip(prompt, completion))}


# ---------------------------------------------------------------------- the limit


def model_shape(model_dir: str) -> dict:
    """Hidden size, vocabulary, layers and the linear layers of one decoder layer ``(in, out)``."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    kv = c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    linears = [(c.hidden_size, c.hidden_size), (c.hidden_size, kv), (c.hidden_size, kv), (c.hidden_size, c.hidden_size),
               (c.hidden_size, c.intermediate_size), (c.hidden_size, c.intermediate_size),
               (c.intermediate_size, c.hidden_size)]
    return {"hidden": c.hidden_size, "vocab": c.vocab_size, "layers": c.num_hidden_layers, "linears": linears}


def non_embedding_params(model_dir: str) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    skip = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def minimum_work(shape: dict, params: int, tokens: dict, batch: int) -> dict:
    """FLOPs of one step's minimum work: the body over the necessary tokens, the head over completion tokens."""
    return {"body": 6.0 * params * tokens["necessary_tokens"] * batch,
            "head": 6.0 * shape["hidden"] * shape["vocab"] * tokens["completion_tokens"] * batch}


def _linear_seconds(rows: int, n_in: int, n_out: int, repeats: int, device: str = "cpu",
                    dtype: str = "fp32") -> tuple[float, float]:
    """Median wall and CPU seconds of a linear layer's three products (forward, input and weight gradient)."""
    import torch

    kind = {"device": device, "dtype": torch.bfloat16 if dtype == "bf16" else torch.float32}
    x, w, g = torch.randn(rows, n_in, **kind), torch.randn(n_out, n_in, **kind), torch.randn(rows, n_out, **kind)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    for _ in range(repeats + 1):
        sync()
        start = harness._now()
        x @ w.T
        g @ w
        g.T @ x
        sync()
        end = harness._now()
        times.append((end[0] - start[0], end[1] - start[1]))
    return statistics.median(t[0] for t in times[1:]), statistics.median(t[1] for t in times[1:])


def matmul_rates(shape: dict, tokens: dict, batch: int, repeats: int = 5, device: str = "cpu",
                 dtype: str = "fp32") -> dict:
    """GFLOP/s (fp32 on CPU threads, or ``dtype`` on a GPU), per wall and per CPU second: a decoder layer's
    linears over a step's necessary tokens (``body``), and the output head over its completion tokens (``head``)."""
    rows, head_rows = round(tokens["necessary_tokens"] * batch), round(tokens["completion_tokens"] * batch)
    body = [_linear_seconds(rows, i, o, repeats, device, dtype) for i, o in shape["linears"]]
    body_flops = sum(6.0 * rows * i * o for i, o in shape["linears"])
    head = _linear_seconds(head_rows, shape["hidden"], shape["vocab"], repeats, device, dtype)
    head_flops = 6.0 * head_rows * shape["hidden"] * shape["vocab"]
    return {f"{part}{clock}": flops / seconds / 1e9
            for part, flops, times in (("body", body_flops, [sum(t) for t in zip(*body)]), ("head", head_flops, head))
            for clock, seconds in zip(("", " cpu"), times)}


# ---------------------------------------------------------------------- workers (one fresh process each)


def run_preftune(args, assets, out_dir: Path, lora: bool) -> dict:
    from preftune import DPOConfig
    from preftune.recipes.dpo import train_dpo

    stamps = harness.preftune_stamps()
    cfg = DPOConfig(model_name_or_path=assets["model"], dataset=assets["data"], output_dir=str(out_dir),
                    per_device_batch_size=args.batch, max_steps=args.steps, learning_rate=_lr(args, lora),
                    warmup_ratio=0.0, lr_scheduler="linear", logging_steps=1, max_length=1024, precompute_ref=True,
                    cache_dir=str(out_dir / "cache"), beta=args.beta, seed=0, precision=args.precision,
                    gradient_checkpointing=False, lora=lora, lora_r=16, lora_alpha=32, lora_dropout=0.0)
    train_dpo(cfg)
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r and "pairs/s" in r]
    return {"step_times": [args.batch / r["pairs/s"] for r in steps], "step_cpu": _differences(stamps),
            "losses": [r["loss"] for r in steps], "logps_chosen": [r["logps/chosen"] for r in steps]}


def _differences(stamps: list[tuple[float, float]]) -> list[float]:
    """CPU seconds between consecutive stamps (steps 2..N)."""
    return [b[1] - a[1] for a, b in zip(stamps, stamps[1:])]


def run_trl(args, assets, out_dir: Path, lora: bool, liger: bool = False, precompute: bool = True) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    step_times: list[float] = []
    step_cpu: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = harness._now()

        def on_step_end(self, *a, **k):
            now = harness._now()
            step_times.append(now[0] - self.t0[0])
            step_cpu.append(now[1] - self.t0[1])

    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
    bf16 = args.precision == "bf16"
    model = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.bfloat16 if bf16 else torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(assets["model"])
    dataset = load_dataset("json", data_files=assets["data"], split="train")
    config = DPOConfig(output_dir=str(out_dir), per_device_train_batch_size=args.batch, max_steps=args.steps,
                       learning_rate=_lr(args, lora), warmup_steps=0, lr_scheduler_type="linear", logging_steps=1,
                       beta=args.beta, bf16=bf16, fp16=False, gradient_checkpointing=False,
                       use_cpu=args.device == "cpu", use_liger_kernel=liger,
                       report_to="none", save_strategy="no", max_length=1024, seed=0,
                       precompute_ref_log_probs=precompute,
                       dataloader_num_workers=0, disable_tqdm=True, optim="adamw_torch")
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[StepTimer()])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    return {"step_times": step_times, "step_cpu": step_cpu[1:], "losses": [h["loss"] for h in logs],
            "logps_chosen": [h.get("logps/chosen") for h in logs]}


def _lr(args, lora: bool) -> float:
    return args.lora_lr if lora else args.lr


def cpu_units() -> dict:
    """The CPU's bf16 units as preftune detects them (what ``--precision auto`` decides on)."""
    from preftune.models import _detected_cpu

    amx, avx512_bf16, capability = _detected_cpu()
    return {"amx_bf16": amx, "avx512_bf16": avx512_bf16, "capability": capability}


def measured(train, precision: str):
    """A worker in ``precision``: ``train(args, assets, out)``'s result with the matmul rates (bf16 and fp32)
    before and after, the load average, and the peak resident set size (absolute, and above the size after
    imports)."""
    def worker(args, assets, out):
        import torch  # (imported before the baseline)

        args.precision = precision
        meter = PeakRSS()
        meter.start()
        shape, tokens = assets["shape"], assets["tokens"]

        def both():
            return {dtype: matmul_rates(shape, tokens, args.batch, device=args.device, dtype=dtype)
                    for dtype in ("bf16", "fp32")}

        before = both()
        load = os.getloadavg()[0]
        started = time.perf_counter()
        result = train(args, assets, out)
        total = time.perf_counter() - started
        load = (load + os.getloadavg()[0]) / 2
        after = both()
        rates = [before["bf16"], after["bf16"]]
        rates_fp32 = [before["fp32"], after["fp32"]]
        above = meter.stop()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        gpu = torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else None
        return {**result, "rates": rates, "rates_fp32": rates_fp32, "load": load, "peak_rss_mib": peak,
                "peak_above_imports_mib": above, "peak_gpu_mib": gpu, "total_s": total, "precision": precision,
                "cpu": cpu_units()}
    return worker


TRAINERS = {
    "preftune": lambda a, s, o: run_preftune(a, s, o, lora=False),
    "preftune-lora": lambda a, s, o: run_preftune(a, s, o, lora=True),
    "trl": lambda a, s, o: run_trl(a, s, o, lora=False),
    "trl-live": lambda a, s, o: run_trl(a, s, o, lora=False, precompute=False),
    "trl-lora": lambda a, s, o: run_trl(a, s, o, lora=True),
    "trl-liger": lambda a, s, o: run_trl(a, s, o, lora=False, liger=True),
    "trl-lora-liger": lambda a, s, o: run_trl(a, s, o, lora=True, liger=True),
}
WORKERS = {f"{name}-{precision}": measured(train, precision) for name, train in TRAINERS.items()
           for precision in PRECISIONS}
SPAWN_KEYS = ["steps", "batch", "lr", "lora_lr", "beta", "threads", "device"]


def run_order(runs: list[str], precisions: list[str]) -> list[str]:
    """Worker names, interleaved: full fine-tuning (preftune, TRL) in each precision, then LoRA likewise."""
    groups = [[r for r in runs if "lora" not in r], [r for r in runs if "lora" in r]]
    return [f"{name}-{p}" for group in groups for p in precisions for name in group]


# ---------------------------------------------------------------------- parent


def summarise(result: dict, assets: dict, batch: int) -> dict:
    step = statistics.median(result["step_times"][1:] or result["step_times"])
    cpu = statistics.median(result["step_cpu"])
    work = assets["work"]

    def floor(clock, rates="rates"):   # seconds of the minimum work at the measured rates (bf16; or fp32)
        return sum(work[part] / (statistics.mean(r[part + clock] for r in result[rates]) * 1e9)
                   for part in ("body", "head"))

    fp32 = "rates_fp32" if "rates_fp32" in result else "rates"

    return {"step s": step, "step CPU s": cpu, "pairs/s": batch / step, "pairs per CPU s": batch / cpu,
            "tokens/s": batch * assets["tokens"]["necessary_tokens"] / step,
            "peak RSS MiB": result["peak_rss_mib"], "peak above imports MiB": result["peak_above_imports_mib"],
            "peak GPU MiB": result.get("peak_gpu_mib") or 0.0,
            "GFLOP/s": (work["body"] + work["head"]) / floor("") / 1e9,
            "GFLOP per CPU s": (work["body"] + work["head"]) / floor(" cpu") / 1e9,
            "limit fraction": floor("") / step, "limit fraction CPU": floor(" cpu") / cpu,
            "limit fraction fp32": floor("", fp32) / step,
            "bf16/fp32 rate": floor("", fp32) / floor(""),
            "loss step 1": result["losses"][0], "logps/chosen step 1": result["logps_chosen"][0],
            "load": result["load"]}


def compare(results: dict) -> dict:
    """preftune's speed and memory relative to TRL's, per mode and precision: against each TRL run, and against
    TRL at its faster reference setting (precomputed or live) in bf16 and in fp32 (``trl-best-*``)."""
    ratios = {}
    results = dict(results)
    for p in PRECISIONS:
        runs = [results[n] for n in (f"trl-{p}", f"trl-live-{p}") if n in results]
        if runs:
            results[f"trl-best-{p}"] = max(runs, key=lambda r: r["pairs/s"])
    pairs = [(f"preftune{lora}-{p}", f"trl{variant}-{q}") for lora, variants in
             (("", ["", "-live", "-liger", "-best"]), ("-lora", ["-lora", "-lora-liger"]))
             for variant in variants for p in PRECISIONS for q in PRECISIONS]
    for ours, theirs in pairs:
        if ours in results and theirs in results:
            a, b = results[ours], results[theirs]
            memory = "peak GPU MiB" if b["peak GPU MiB"] else "peak RSS MiB"
            ratios[f"{ours} vs {theirs}"] = {"speed": a["pairs/s"] / b["pairs/s"],
                                             "CPU speed": a["pairs per CPU s"] / b["pairs per CPU s"],
                                             "memory": a[memory] / b[memory],
                                             "loss diff step 1": abs(a["loss step 1"] - b["loss step 1"])}
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="optimiser steps per run (the first is not timed)")
    parser.add_argument("--batch", type=int, default=4, help="pairs per step (both trainers)")
    parser.add_argument("--lr", type=float, default=1e-5, help="learning rate of full fine-tuning")
    parser.add_argument("--lora-lr", "--lora_lr", dest="lora_lr", type=float, default=1e-4,
                        help="learning rate with LoRA")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker process")
    parser.add_argument("--runs", nargs="*", default=RUNS, choices=RUNS + LIGER_RUNS)
    parser.add_argument("--precisions", nargs="+", default=PRECISIONS, choices=PRECISIONS,
                        help="run every trainer in each of these (both sides alike)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where both trainers run (cuda: peak memory is the GPU allocator's)")
    parser.add_argument("--collect", nargs="+", metavar="DIR",
                        help="no new runs: report the runs found in these earlier run directories (the last one "
                             "of each name wins; all on the same pairs)")
    harness.add_worker_arguments(parser)
    args = parser.parse_args()
    if harness.run_worker(args, WORKERS, threads=args.threads):
        return
    if args.collect:
        assets, runs = collected(args.collect)
        return report(args, assets, runs)

    from preftune.models import load_tokenizer
    from preftune.realmodel import obtain_checkpoint

    console = harness.console()
    wanted = any(r.startswith("trl") for r in args.runs)
    args.trl_path = harness.trl_in_cache(TRL_VERSION, f"import trl; assert trl.__version__ == '{TRL_VERSION}'",
                                         "trl") if wanted else None
    model_dir = str(obtain_checkpoint())
    root = Path(tempfile.mkdtemp(prefix="preftune-smollm2-bench-"))
    tokenizer = load_tokenizer(model_dir)
    rows = build_pairs(tokenizer, args.batch * args.steps)
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    shape, tokens = model_shape(model_dir), token_counts(tokenizer, rows)
    params = non_embedding_params(model_dir)
    assets = {"model": model_dir, "data": str(data), "shape": shape, "tokens": tokens,
              "work": minimum_work(shape, params, tokens, args.batch)}
    console.print(f"SmolLM2-135M-Instruct ({params / 1e6:.1f}M non-embedding parameters); batch {args.batch} pairs; "
                  f"per pair {tokens['prompt_tokens']:.0f} prompt + {tokens['completion_tokens']:.0f} completion "
                  f"tokens; {' and '.join(args.precisions)} on {args.device}; {args.threads} thread(s) per process; "
                  f"load average {os.getloadavg()[0]:.2f}; CPU bf16 units {cpu_units()}")
    console.print(f"runs in {root}")
    args.runs = run_order(args.runs, args.precisions)
    report(args, assets, harness.spawn_all(__file__, args, SPAWN_KEYS, assets, root, console))


def collected(roots: list[str]) -> tuple[dict, dict]:
    """The assets and the worker results kept in earlier run directories."""
    runs, assets = {}, None
    for root in map(Path, roots):
        assets = json.loads((root / "assets.json").read_text())
        for name in WORKERS:
            if (root / f"out-{name}" / "bench.json").is_file():
                runs[name] = json.loads((root / f"out-{name}" / "bench.json").read_text())
    return assets, runs


def report(args, assets: dict, runs: dict) -> None:
    """The results table and the ratios to TRL, printed and written to ``args.json``."""
    console = harness.console()
    console.width = max(console.width, 240)   # the table is wide: never cut it to a terminal's (or a file's) 80
    results = {name: summarise(result, assets, args.batch) for name, result in runs.items()}
    digits = {"step s": 2, "step CPU s": 2, "pairs/s": 3, "pairs per CPU s": 3, "tokens/s": 0, "peak RSS MiB": 0,
              "peak GPU MiB": 0,
              "peak above imports MiB": 0, "GFLOP/s": 0, "GFLOP per CPU s": 0, "limit fraction": 2,
              "limit fraction CPU": 2, "limit fraction fp32": 2, "bf16/fp32 rate": 2, "loss step 1": 6,
              "logps/chosen step 1": 3, "load": 2}
    console.print(harness.results_table("DPO step on SmolLM2-135M-Instruct (median of steps 2..N)", results,
                                        list(digits), lambda column, value: f"{value:.{digits[column]}f}"))
    ratios = compare(results)
    for name, r in ratios.items():
        console.print(f"{name}: {r['speed']:.2f}x pairs/s ({r['CPU speed']:.2f}x per CPU second), "
                      f"{r['memory']:.2f}x peak RSS, "
                      f"first-step loss differs by {r['loss diff step 1']:.2e}")
    if args.json:
        config = {k: v for k, v in vars(args).items() if k not in ("worker", "assets", "out")}
        Path(args.json).write_text(json.dumps({"config": config, "assets": assets, "results": results,
                                               "ratios": ratios, "raw": runs}, indent=2))


if __name__ == "__main__":
    main()
