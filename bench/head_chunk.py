"""Forward + backward of the output head's log-probs: before (module call under activation checkpointing,
``logit[target] - logsumexp``) against ``preftune.speed.head`` (hand-written backward, fused log-softmax).

    python bench/head_chunk.py            # one thread; medians of process CPU time over --repeats runs

Shapes: SmolLM2-135M's head over one DPO step's completion tokens ([1288, 576] x [49152, 576]), with the
head trainable (full fine-tuning) and frozen (LoRA), and the developers' toy Llama ([512, 256] x [32000, 256]).
Prints a table; each row also checks that both give the same log-probs and gradients.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.checkpoint import checkpoint

from preftune.speed.head import linear_head_logprobs

CHUNK = 1024


def before_chunk(head, hidden, targets):
    """The chunk as computed before preftune.speed.head: module call, gather, logsumexp."""
    logits = head(hidden).float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def before(head, hidden, targets):
    return torch.cat([checkpoint(before_chunk, head, hidden[s:s + CHUNK], targets[s:s + CHUNK], use_reentrant=False)
                      for s in range(0, hidden.shape[0], CHUNK)])


def after(head, hidden, targets):
    return linear_head_logprobs(head, hidden, targets, CHUNK, 1.0, False)[0]


def step(fn, head, hidden, targets, weights):
    """One forward + backward; returns (process CPU seconds, log-probs, d/dhidden, d/dW or None)."""
    head.zero_grad(set_to_none=True)
    hidden.grad = None
    start = time.process_time()
    logp = fn(head, hidden, targets)
    (logp * weights).sum().backward()
    seconds = time.process_time() - start
    return seconds, logp.detach(), hidden.grad, head.weight.grad


def compare(rows: int, hidden_size: int, vocab: int, trainable: bool, repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(hidden_size, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden_size, generator=g) * hidden_size ** -0.5)
    head.weight.requires_grad_(trainable)
    hidden = torch.randn(rows, hidden_size, generator=g).requires_grad_(True)
    targets = torch.randint(0, vocab, (rows,), generator=g)
    weights = torch.rand(rows, generator=g)
    times: dict[str, list[float]] = {"before": [], "after": []}
    results = {}
    for _ in range(repeats):   # interleaved, so both meet the same machine load
        for name, fn in (("before", before), ("after", after)):
            seconds, *results[name] = step(fn, head, hidden, targets, weights)
            times[name].append(seconds)
    errors = [float((a - b).abs().max()) for a, b in zip(results["after"], results["before"]) if a is not None]
    old, new = (statistics.median(times[k]) for k in ("before", "after"))
    return {"shape": f"[{rows}, {hidden_size}] x [{vocab}, {hidden_size}]",
            "head": "trainable" if trainable else "frozen", "before": old, "after": new,
            "speedup": old / new, "max_abs_diff": max(errors)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cases = [(1288, 576, 49152, True), (1288, 576, 49152, False), (512, 256, 32000, True), (512, 256, 32000, False)]
    print(f"torch {torch.__version__}, 1 thread, chunk {CHUNK} rows, median of {args.repeats} (process CPU s)")
    print("| shape | head | before s | after s | speed-up | max abs diff (logp, grads) |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for case in cases:
        r = compare(*case, repeats=args.repeats)
        print(f"| {r['shape']} | {r['head']} | {r['before']:.3f} | {r['after']:.3f} | {r['speedup']:.2f}x "
              f"| {r['max_abs_diff']:.1e} |", flush=True)


if __name__ == "__main__":
    main()
