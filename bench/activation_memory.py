"""Activation memory and time of one DPO forward + backward on SmolLM2-135M-Instruct, per batch layout.

Every setting runs with ``fused_layers`` (on by default) unless it says "fused_layers off".
The batch is the real-model issue's shape: 4 pairs, prompts of 100 tokens, responses of 100-200
(random token ids: memory and time do not depend on the values), fp32, one thread. For each setting
a fresh process loads the model and runs the policy's forward and backward once, reporting:

* ``tokens``: tokens the model computes (padding and repeated prompts included);
* ``saved MB``: bytes autograd keeps for the backward pass (every tensor saved by the graph, counted
  once per storage, parameters excluded) — the activation memory;
* ``MB/token``: saved MB over the tokens the pairs really hold (each prompt once, no padding), so
  the layouts compare on the same work;
* ``peak RSS MB``: the process's peak resident memory minus that after loading the model;
* ``s`` / ``cpu s``: wall and process CPU seconds of the forward + backward (on a shared machine the
  CPU figure is the steadier one).

Usage: python bench/activation_memory.py [--only NAME ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

SETTINGS = {
    "padded": dict(padding_free=False, prefix_sharing=False),
    "padding-free": dict(padding_free=True, prefix_sharing=False),
    "prefix-shared": dict(padding_free=True, prefix_sharing=True),
    "padded, LoRA r16 dropout 0.05": dict(padding_free=False, prefix_sharing=False, lora=True, lora_dropout=0.05),
    "padded, LoRA r16 dropout 0": dict(padding_free=False, prefix_sharing=False, lora=True, lora_dropout=0.0),
    "prefix-shared, LoRA r16 dropout 0.05": dict(padding_free=True, prefix_sharing=True, lora=True,
                                                 lora_dropout=0.05),
    "prefix-shared, LoRA r16 dropout 0": dict(padding_free=True, prefix_sharing=True, lora=True, lora_dropout=0.0),
    "prefix-shared, fused_layers off": dict(padding_free=True, prefix_sharing=True, fused_layers=False,
                                             fused_lora=False),
    "prefix-shared, LoRA r16 dropout 0, fused_layers off": dict(padding_free=True, prefix_sharing=True, lora=True,
                                                                lora_dropout=0.0, fused_layers=False, fused_lora=False),
    "prefix-shared, gradient checkpointing": dict(padding_free=True, prefix_sharing=True,
                                                  gradient_checkpointing=True),
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def toy_pairs(vocab: int, n: int = 4, seed: int = 0):
    import torch

    from preftune.data.preference import TokenizedPair

    generator = torch.Generator().manual_seed(seed)

    def ids(length):
        return torch.randint(10, vocab, (length,), generator=generator).tolist()

    lengths = torch.randint(100, 201, (n, 2), generator=generator).tolist()
    return [TokenizedPair(ids(100), ids(c), ids(r), 1.0, 0.0, i) for i, (c, r) in enumerate(lengths)]


class SavedBytes:
    """Counts the bytes autograd saves for the backward pass (one count per storage, parameters left out)."""

    def __init__(self, parameters):
        self.skip = {p.untyped_storage().data_ptr() for p in parameters}
        self.seen: dict[int, int] = {}

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.skip:
            self.seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def megabytes(self) -> float:
        return sum(self.seen.values()) / 2**20


def measure(name: str) -> dict:
    """One forward + backward of the policy under setting ``name`` (run in a fresh process)."""
    import torch

    from preftune.config import DPOConfig
    from preftune.modality import TEXT, CompletionLogprobs, sequence_sums
    from preftune.modality.text import PairCollator
    from preftune.models import load_causal_lm, prepare_policy
    from preftune.realmodel import obtain_checkpoint

    torch.set_num_threads(1)
    cfg = DPOConfig(lora_r=16, lora_alpha=32, **SETTINGS[name])
    policy = prepare_policy(load_causal_lm(str(obtain_checkpoint())), cfg)
    policy.train()
    lm = CompletionLogprobs(policy, TEXT)
    pairs = toy_pairs(policy.config.vocab_size)
    batch = PairCollator.for_model(cfg, 0, policy)(pairs)
    real_tokens = sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    base_rss = peak_rss_mb()
    counter = SavedBytes(policy.parameters())
    start, cpu = time.perf_counter(), time.process_time()
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
        sums, _ = sequence_sums(lm, batch)
    sums.sum().backward()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"setting": name, "tokens": int(batch["input_ids"].numel()), "real_tokens": real_tokens,
            "saved_mb": round(counter.megabytes, 1), "mb_per_token": round(counter.megabytes / real_tokens, 3),
            "peak_rss_mb": round(peak_rss_mb() - base_rss), "seconds": round(seconds, 1), "cpu_s": round(cpu, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--json", help="write the rows here too")
    parser.add_argument("--one", help=argparse.SUPPRESS)   # the child process: measure one setting
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one)))
        return
    rows = []
    print(f"{'setting':40} {'tokens':>6} {'saved MB':>9} {'MB/token':>9} {'peak RSS MB':>12} {'s':>6} {'cpu s':>6}")
    for name in args.only:
        out = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{name:40} {row['tokens']:>6} {row['saved_mb']:>9} {row['mb_per_token']:>9} "
              f"{row['peak_rss_mb']:>12} {row['seconds']:>6} {row['cpu_s']:>6}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
