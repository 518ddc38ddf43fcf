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
sampled every 2 ms. Each worker also times, after training, the minimum work of one iteration
(:func:`minimum_work`) on its own thread: the **limit fraction** is that floor over the measured CPU seconds
of an iteration.

TRL removed ``trl.experimental.ppo`` after 1.12.0. If the installed TRL lacks it, TRL 1.12.0 is
installed (without dependencies) into a cache directory and put on the TRL worker's path only.

    python bench/ppo_throughput.py                      # full comparison (a few minutes on 2 CPU cores)
    python bench/ppo_throughput.py --iterations 3       # quicker
"""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

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
    shape = {"vocab": vocab, "hidden": hidden, "inner": config.intermediate_size, "layers": layers,
             "prompt": prompt_length}
    return {"model": str(paths["model"]), "reward": str(paths["reward"]), "data": str(data), "shape": shape}


# ---------------------------------------------------------------------- the floor: minimum work at the measured rate


def minimum_work(shape: dict, args) -> list[tuple[int, int, int, int, bool]]:
    """The matrix products one PPO iteration cannot avoid, as ``(count, rows, n_in, n_out, backward)``.

    Issue 13's rule: every token through each linear layer once per pass (2 FLOPs per weight forward, 4
    more backward), only the positions that predict response tokens through the vocabulary head, attention
    scores ignored. Sampling: the prompts, then one step of ``batch`` rows per new token. Rollout forwards:
    reference (log-probs), critic (values) and reward model; the policy's own log-probs are taken from
    sampling, as TRL does (preftune recomputes them, one more policy forward). Updates: ``epochs`` passes,
    micro-batch by micro-batch, policy and critic forward and backward. The last token is not needed by policy
    or critic, so their passes cover ``prompt + response - 1`` tokens per sequence."""
    h, inner, vocab, layers, prompt = (shape[k] for k in ("hidden", "inner", "vocab", "layers", "prompt"))
    b, r, micro = args.batch, args.response, args.micro
    body = [(h, h)] * 4 + [(h, inner)] * 2 + [(inner, h)]       # q, k, v, o; gate, up; down

    def layer(count, rows, backward=False):
        return [(count * layers, rows, n_in, n_out, backward) for n_in, n_out in body]

    seen = prompt + r - 1
    sampling = layer(1, b * prompt) + layer(r - 1, b) + [(r, b, h, vocab, False)]
    rollout = layer(2, b * seen) + [(1, b * r, h, vocab, False)] + layer(1, b * (prompt + r))
    updates = layer(2 * args.epochs * b // micro, micro * seen, True) + [
        (args.epochs * b // micro, micro * r, h, vocab, True)]
    return sampling + rollout + updates


def floor_seconds(products: list[tuple[int, int, int, int, bool]], repeats: int = 3) -> tuple[float, float]:
    """``(GFLOP, CPU seconds)`` of ``products`` (:func:`minimum_work`), each timed in fp32 on this process's threads
    (median of ``repeats`` after a warm-up; a backward product adds the input- and weight-gradient products)."""
    import torch

    timed: dict[tuple, float] = {}
    flops = seconds = 0.0
    for count, rows, n_in, n_out, backward in products:
        key = (rows, n_in, n_out, backward)
        if key not in timed:
            x, w, g = torch.randn(rows, n_in), torch.randn(n_out, n_in), torch.randn(rows, n_out)
            times = []
            for _ in range(repeats + 1):
                start = time.process_time()
                x @ w.T
                if backward:
                    g @ w
                    g.T @ x
                times.append(time.process_time() - start)
            timed[key] = statistics.median(times[1:])
        flops += count * (6 if backward else 2) * rows * n_in * n_out
        seconds += count * timed[key]
    return flops / 1e9, seconds


# ---------------------------------------------------------------------- workers (one fresh process each)


def run_ours(args, assets, out_dir: Path, lora: bool = False) -> dict:
    import torch

    from preftune.config import PPOConfig
    from preftune.recipes.ppo import read_metrics, train_ppo

    torch.manual_seed(0)
    measure = harness.Measure(harness.preftune_stamps())
    cfg = PPOConfig(model_name_or_path=assets["model"], dataset=assets["data"], output_dir=str(out_dir),
                    reward_model_path=assets["reward"], per_device_batch_size=args.micro,
                    gradient_accumulation_steps=args.batch // args.micro, num_mini_batches=1,
                    num_ppo_epochs=args.epochs, max_new_tokens=args.response, sampling_batch_size=args.batch,
                    learning_rate=args.lr, max_steps=args.iterations, logging_steps=1, seed=0, precision="fp32",
                    kl_coef=0.05, log_samples_steps=0, lora=lora, lora_r=16, lora_alpha=32, overwrite_output_dir=True)
    figures = measure.train(lambda: train_ppo(cfg))
    records = read_metrics(out_dir)
    return {**figures, "floor": floor_seconds(minimum_work(assets["shape"], args)),
            "response_length": statistics.mean(r["response/length"] for r in records),
            "entropy_first": records[0]["objective/entropy"], "kl_first": records[0]["objective/kl"]}


def run_trl(args, assets, out_dir: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    torch.manual_seed(0)
    stamps: list[tuple[float, float]] = []
    measure = harness.Measure(stamps)
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
                         callbacks=[harness.trl_timer(stamps)])
    figures = measure.train(trainer.train)
    logs = [h for h in trainer.state.log_history if "objective/entropy" in h]
    return {**figures, "floor": floor_seconds(minimum_work(assets["shape"], args)),
            "response_length": float(args.response), "entropy_first": logs[0]["objective/entropy"],
            "kl_first": logs[0]["objective/kl"]}


WORKERS = {
    "preftune": lambda a, s, o: run_ours(a, s, o),
    "preftune-lora": lambda a, s, o: run_ours(a, s, o, lora=True),
    "trl": run_trl,
}

PRECISE = ("iterations/s", "limit fraction (CPU)")
SPAWN_KEYS = ["iterations", "batch", "micro", "epochs", "response", "lr", "threads"]


# ---------------------------------------------------------------------- parent


def summarise(result: dict, batch: int) -> dict:
    iteration, cpu = harness.iteration_medians(result)
    gflop, floor = result["floor"]
    return {"iterations/s": 1 / iteration, "samples/s": batch / iteration, "peak MiB": result["peak_mib"],
            "iteration s": iteration, "CPU s / iteration": cpu, "total s": result["total_s"],
            "floor GFLOP": gflop, "floor CPU s": floor, "limit fraction (CPU)": floor / cpu,
            "response length": result["response_length"],
            "entropy (iter 1)": result["entropy_first"], "kl (iter 1)": result["kl_first"]}


def main() -> None:
    shape = {"--batch": (16, "prompts per rollout (both trainers)"), "--epochs": (4, "PPO epochs per rollout"),
             "--response": (64, "response length (max new tokens)")}
    args = harness.online_parser(__doc__, lr=3e-6, runs=["preftune", "trl", "preftune-lora"], shape=shape).parse_args()

    if harness.run_worker(args, WORKERS, threads=args.threads):
        return

    console = harness.console()
    wanted = any(r.startswith("trl") for r in args.runs)
    args.trl_path = harness.trl_in_cache(TRL_WITH_PPO, "import trl.experimental.ppo",
                                         "trl/experimental/ppo") if wanted else None
    root = Path(tempfile.mkdtemp(prefix="preftune-ppo-bench-"))
    assets = build_assets(root, args.vocab, args.hidden, args.layers, prompts=args.batch * args.iterations,
                          prompt_length=args.prompt_length)
    console.print(f"policy, critic, reward model: Llama vocab={args.vocab} hidden={args.hidden} layers={args.layers}; "
                  f"rollout {args.batch} prompts of {args.prompt_length} tokens, {args.response} new tokens, "
                  f"micro-batch {args.micro}, {args.epochs} PPO epochs; fp32; {args.threads} thread(s) per process, "
                  f"{os.cpu_count()} CPUs")
    runs = harness.spawn_all(__file__, args, SPAWN_KEYS, assets, root, console)
    results = {name: summarise(result, args.batch) for name, result in runs.items()}
    columns = ["iterations/s", "samples/s", "peak MiB", "iteration s", "CPU s / iteration", "total s",
               "floor CPU s", "limit fraction (CPU)", "response length", "entropy (iter 1)"]
    harness.report_against_trl(console, args, results, "PPO iteration: rollout + updates (median of iterations 2..N)",
                               columns, lambda column, value: f"{value:.{3 if column in PRECISE else 1}f}")


if __name__ == "__main__":
    main()
