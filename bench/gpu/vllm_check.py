"""The vLLM generation engine on a GPU: weight sync is exact, then GRPO and online DPO steps timed per engine.

1. *Sync*: vLLM in fp32 loads SmolLM2-135M-Instruct; the policy (a LoRA copy) is moved by a few large
   updates; greedy completions from vLLM before :meth:`sync` must differ from the updated policy's (the
   stale engine), after it they must equal preftune's own sampler on the policy (fraction reported).
2. *Throughput*: ``--steps`` GRPO iterations (16 prompts x 8 completions of up to 128 tokens, LoRA, bf16)
   and online DPO steps (16 prompts x 2) with ``generation_engine`` transformers, then vllm: completions
   per second of the rollout phase (``time/rollout``), the whole step, and the first step's reward (the
   same policy and prompts: both engines must sample the same distribution, up to noise).

Usage: python bench/gpu/vllm_check.py [--model PATH] [--steps 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

QUESTIONS = ["What is a good name for a small grey cat?", "Write one sentence about the sea at night.",
             "Give me a tip for learning to cook.", "Describe autumn in a few words.",
             "Why do people keep diaries?", "Name three things to pack for a picnic.",
             "What makes a good morning routine?", "Write a short thank-you note to a neighbour."]
REWARDS = "def short(prompts, completions, **kw):\n    return [1.0 / (1 + len(c.split())) for c in completions]\n"


def sync_check(model_dir: str) -> dict:
    from peft import LoraConfig, get_peft_model

    from preftune.engines import TransformersEngine, make_engine, sample_with
    from preftune.generate import SamplingSettings, encode_prompts
    from preftune.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    policy = get_peft_model(load_causal_lm(model_dir).cuda(), LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                                          target_modules="all-linear"))
    engine = make_engine("vllm", policy, tokenizer, model_path=model_dir, gpu_memory_utilization=0.3,
                         sleep_mode=True, seed=0, dtype="float32")
    prompts = encode_prompts(tokenizer, [[{"role": "user", "content": q}] for q in QUESTIONS])
    greedy = SamplingSettings(max_new_tokens=32, do_sample=False)
    generator = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=generator, device="cuda"))
    local = TransformersEngine(policy, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    wanted = local.generate(prompts, greedy).response_ids
    engine.wake()
    stale = engine.generate(prompts, greedy).response_ids
    engine.sleep()
    started = time.perf_counter()
    synced = sample_with(engine, policy, prompts, greedy).response_ids
    seconds = time.perf_counter() - started
    same = sum(a == b for a, b in zip(synced, wanted)) / len(wanted)
    del engine
    return {"stale_equal_fraction": sum(a == b for a, b in zip(stale, wanted)) / len(wanted),
            "synced_equal_fraction": same, "wake_sync_sample_sleep_seconds": round(seconds, 3)}


def timed_runs(model_dir: str, steps: int, root: Path) -> list[dict]:
    from preftune import GRPOConfig, OnlineDPOConfig, train_grpo, train_online_dpo

    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": QUESTIONS[i % 8]}]}) + "\n"
                               for i in range(64)))
    (root / "rewards.py").write_text(REWARDS)
    common = dict(model_name_or_path=model_dir, dataset=str(prompts), lora=True, lora_r=16, lora_alpha=32,
                  precision="bf16", max_steps=steps, logging_steps=1, seed=0, vllm_gpu_memory_utilization=0.3)
    rows = []
    for engine in ("transformers", "vllm"):
        runs = [("grpo", train_grpo, GRPOConfig(**common, output_dir=str(root / f"grpo-{engine}"),
                                                 reward_funcs=[f"{root / 'rewards.py'}:short"], num_generations=8,
                                                 per_device_batch_size=128, max_completion_length=128,
                                                 sampling_batch_size=128, generation_engine=engine,
                                                 learning_rate=1e-5)),
                ("online-dpo", train_online_dpo,
                 OnlineDPOConfig(**common, output_dir=str(root / f"odpo-{engine}"),
                                 judge=f"function:{root / 'rewards.py'}:short", per_device_batch_size=16,
                                 max_new_tokens=128, sampling_batch_size=32, generation_engine=engine,
                                 learning_rate=1e-5))]
        for name, train, cfg in runs:
            cfg.validate()
            started = time.perf_counter()
            train(cfg)
            total = time.perf_counter() - started
            records = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
            completions = 128 if name == "grpo" else 32
            rollout = [r["time/rollout"] for r in records][1:] or [records[0]["time/rollout"]]
            rows.append({"command": name, "engine": engine, "steps": len(records),
                         "rollout_completions_per_s": round(completions * len(rollout) / sum(rollout), 1),
                         "first_reward": records[0].get("reward", records[0].get("objective/scores")),
                         "run_seconds_including_load": round(total, 1),
                         "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)})
            print(json.dumps(rows[-1]), flush=True)
            torch.cuda.reset_peak_memory_stats()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None, help="checkpoint directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from preftune.realmodel import obtain_checkpoint

    model_dir = args.model or str(obtain_checkpoint())
    results = {"gpu": torch.cuda.get_device_name(0), "model": model_dir}
    results["sync"] = sync_check(model_dir)
    print(json.dumps(results["sync"]), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        results["runs"] = timed_runs(model_dir, args.steps, Path(tmp))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
