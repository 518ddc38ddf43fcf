"""Generation tokens/s of preftune's sampler against a plain ``model.generate`` on SmolLM2-135M-Instruct.

Same model (fp32), same chat prompts (left-padded batches), same settings: greedy and sampling at
temperature 1 (no top-k / top-p filter, so neither side filters; the checkpoint's generation_config is
replaced by an explicit one for ``model.generate``), ``max_new_tokens``, batch size, one CPU thread.
Tokens are the generated tokens kept (each row up to and including its EOS); row-steps count the
decoding work (per batch, its rows x the steps until its last row ended), which differs between the
two sides when sampling draws different lengths. Each setting runs
``--repeats`` times per side, alternating sides; the table gives the median wall time and the median
process CPU time (on a shared machine the CPU figure is the one that does not include waiting).
Greedy outputs of both sides are checked to be identical, so both do exactly the same work there.

Both precisions (``--precisions fp32 bf16``): bf16 is autocast on the fp32 weights (what preftune's samplers
run under ``--precision bf16`` or ``auto`` on a CPU with AMX-BF16 / AVX512-BF16), on both sides; all sides
alternate within each repeat, and ``bf16 vs fp32`` gives preftune's tokens/s ratio. The CPU's bf16 units are
recorded.

Usage: python bench/generation_speed.py [--batch 8] [--prompts 16] [--max_new_tokens 48] [--repeats 3]
       [--settings greedy sampling] [--precisions fp32 bf16] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

QUESTIONS = ["What is a good name for a small grey cat?", "Write one sentence about the sea at night.",
             "Give me a tip for learning to cook.", "Describe autumn in a few words.",
             "Why do people keep diaries?", "Name three things to pack for a picnic.",
             "What makes a good morning routine?", "Write a short thank-you note to a neighbour."]


def prompt_ids(tokenizer, n: int) -> list[list[int]]:
    from preftune.generate import encode_prompts

    chats = [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)] + (" Be brief." if i >= 8 else "")}]
             for i in range(n)]
    return encode_prompts(tokenizer, chats)


def ours(model, tokenizer, prompts, settings, batch: int, seed: int, precision: str = "fp32") -> list[list[int]]:
    from preftune.engines import TransformersEngine

    engine = TransformersEngine(model, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                batch_size=batch, precision=precision)
    return engine.generate(prompts, settings, seed=seed).response_ids


def plain(model, tokenizer, prompts, settings, batch: int, seed: int, precision: str = "fp32") -> list[list[int]]:
    """``model.generate`` on the same left-padded batches, cut after the first EOS like ours."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=settings.max_new_tokens, do_sample=settings.do_sample,
                              temperature=settings.temperature if settings.do_sample else None, top_k=None,
                              top_p=None, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    responses = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        for row in out[:, width:].tolist():
            cut = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
            responses.append(row[:cut])
    return responses


def row_steps(responses: list[list[int]], batch: int) -> int:
    """Decoding work done: per batch, its rows x the steps until its last row ended (both sides stop there)."""
    chunks = [responses[k:k + batch] for k in range(0, len(responses), batch)]
    return sum(len(c) * max(len(r) for r in c) for c in chunks)


def timed(fn, *args) -> tuple[float, float, list[list[int]]]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    return time.perf_counter() - wall, time.process_time() - cpu, out


def measure(model, tokenizer, prompts, settings, batch: int, repeats: int, precisions=("fp32",)) -> dict:
    sides = [(f"{name} {p}", fn, p) for p in precisions for name, fn in (("preftune", ours), ("model.generate", plain))]
    runs: dict[str, list[tuple[float, float, int, int]]] = {name: [] for name, _, _ in sides}
    outputs = {}
    for r in range(repeats):
        for name, fn, precision in sides:
            wall, cpu, out = timed(fn, model, tokenizer, prompts, settings, batch, r, precision)
            runs[name].append((wall, cpu, sum(len(o) for o in out), row_steps(out, batch)))
            outputs[name] = out
    row = {}
    for name, values in runs.items():
        row[name] = {"tokens": statistics.median(v[2] for v in values),
                     "row_steps": statistics.median(v[3] for v in values),
                     "wall_s": statistics.median(v[0] for v in values),
                     "cpu_s": statistics.median(v[1] for v in values),
                     "tokens_per_s": statistics.median(v[2] / v[0] for v in values),
                     "tokens_per_cpu_s": statistics.median(v[2] / v[1] for v in values),
                     "row_steps_per_cpu_s": statistics.median(v[3] / v[1] for v in values)}
    if not settings.do_sample:
        for p in precisions:
            row[f"identical_outputs {p}"] = outputs[f"preftune {p}"] == outputs[f"model.generate {p}"]
    if "fp32" in precisions and "bf16" in precisions:
        row["bf16 vs fp32"] = {clock: row["preftune bf16"][clock] / row["preftune fp32"][clock]
                               for clock in ("tokens_per_s", "tokens_per_cpu_s", "row_steps_per_cpu_s")}
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--settings", nargs="+", default=["greedy", "sampling"], choices=["greedy", "sampling"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from preftune.generate import SamplingSettings
    from preftune.models import _detected_cpu, load_causal_lm, load_tokenizer
    from preftune.realmodel import obtain_checkpoint

    model_dir = obtain_checkpoint()
    tokenizer, model = load_tokenizer(str(model_dir)), load_causal_lm(str(model_dir)).eval()
    prompts = prompt_ids(tokenizer, args.prompts)
    results = {"batch": args.batch, "prompts": args.prompts, "max_new_tokens": args.max_new_tokens,
               "threads": 1, "load_average": os.getloadavg()[0], "cpus": os.cpu_count(),
               "cpu_bf16": dict(zip(("amx_bf16", "avx512_bf16", "capability"), _detected_cpu()))}
    for name, settings in (("greedy", SamplingSettings(max_new_tokens=args.max_new_tokens, do_sample=False)),
                           ("sampling", SamplingSettings(max_new_tokens=args.max_new_tokens, temperature=1.0))):
        if name not in args.settings:
            continue
        results[name] = measure(model, tokenizer, prompts, settings, args.batch, args.repeats, args.precisions)
        print(json.dumps({name: results[name]}), flush=True)
    results["load_average_after"] = os.getloadavg()[0]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
