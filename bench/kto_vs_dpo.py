"""KTO against DPO on the built-in sentiment task: does binary feedback do as well as pairs?

The demo's pipeline gives a small SFT model and oracle-labelled pairs (the VADER-style sentiment
scorer ``preftune.demo.sentiment:sentiment_reward`` orders samples of the SFT model). Then, from the
same N pairs:

* ``dpo``: DPO on the pairs;
* ``kto-pairs``: KTO on the same pairs split into 2N unpaired examples (chosen desirable, rejected
  undesirable), written as ``prompt`` / ``completion`` / ``label`` rows;
* ``kto-10pct``: KTO when only 10% of the desirable examples are kept (all undesirable ones), with
  λ_D raised so that λ_D·n_D = λ_U·n_U, as the paper advises; the paper's claim is that this still
  matches DPO.

Every model samples on held-out prefixes; the oracle scores them; the table gives the oracle reward,
the win rate against SFT's samples, KL to SFT and diversity (as ``preftune demo`` does).

    PYTHONPATH=. python bench/kto_vs_dpo.py --output_dir runs/kto-vs-dpo     # 3 seeds, a few minutes on 1 thread
    PYTHONPATH=. python bench/kto_vs_dpo.py --seeds 0 --pairs 200 --learning_rate 1e-3
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def split_pairs(pairs: list[dict], keep_desirable: float, seed: int) -> list[dict]:
    """Unpaired rows from pairs: every rejected response undesirable, a seeded ``keep_desirable`` share of the
    chosen ones desirable."""
    rng = random.Random(seed)
    rows = []
    for pair in pairs:
        if keep_desirable >= 1 or rng.random() < keep_desirable:
            rows.append({"prompt": pair["prompt"], "completion": pair["chosen"], "label": True})
        rows.append({"prompt": pair["prompt"], "completion": pair["rejected"], "label": False})
    return rows


def train(name: str, rows: list[dict], args, sft: Path, root: Path, seed: int) -> Path:
    from preftune import DPOConfig, KTOConfig, train_dpo, train_kto
    from preftune.demo.pipeline import _write_jsonl

    data = _write_jsonl(rows, root / "data" / f"{name}.jsonl")
    common = dict(model_name_or_path=str(sft), dataset=str(data), output_dir=str(root / name), beta=args.beta,
                  max_length=96, per_device_batch_size=args.batch_size, num_epochs=args.epochs,
                  learning_rate=args.learning_rate, warmup_ratio=0.1, logging_steps=10, precompute_ref=True,
                  cache_dir=str(root / "cache"), seed=seed, overwrite_output_dir=True)
    if name == "dpo":
        return train_dpo(DPOConfig(**common)).run_dir
    good = sum(r["label"] for r in rows)
    weight = (len(rows) - good) / good  # λ_D·n_D = λ_U·n_U
    return train_kto(KTOConfig(desirable_weight=max(1.0, weight), **common)).run_dir


def one_seed(args, seed: int) -> dict[str, dict]:
    """The whole experiment with one seed (base model, SFT, sampled pairs, training, sampling): name -> metrics."""
    from preftune.demo.pipeline import DemoScale, base_model, evaluate_all, preference_pairs, supervised_model

    root = Path(args.output_dir) / f"seed{seed}"
    # the scale of tests/test_builtin_task.py, where DPO measurably raises the oracle reward
    scale = DemoScale(corpus_reviews=2000, hidden_size=96, layers=2, vocab_size=600, pretrain_epochs=4, sft_rows=800,
                      train_prompts=96, eval_prompts=48, max_new_tokens=20, seed=seed)
    base = base_model(scale, root / "cache")
    sft = supervised_model(scale, base, root)
    pairs_file, _ = preference_pairs(scale, sft, root)
    pairs = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    random.Random(seed).shuffle(pairs)
    pairs = pairs[:args.pairs]
    datasets = {"dpo": pairs, "kto-pairs": split_pairs(pairs, 1.0, seed), "kto-10pct": split_pairs(pairs, 0.1, seed)}
    runs = [train(name, rows, args, sft, root, seed) for name, rows in datasets.items()]
    return {r.name: {**r.metrics, "examples": len(datasets.get(r.name, []))}
            for r in evaluate_all(scale, sft, None, runs, root)}


def markdown_table(by_seed: list[dict[str, dict]]) -> str:
    """Means over seeds; in brackets the lowest and highest seed's value."""
    lines = ["| method | training rows | oracle reward | win rate vs SFT | KL to SFT | distinct-2 | self-BLEU |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]

    def cell(name: str, key: str, form: str) -> str:
        values = [seed[name][key] for seed in by_seed if key in seed[name]]
        if not values or name == "sft" and key == "win_rate":
            return "-"
        low, high, mean = min(values), max(values), statistics.mean(values)
        return f"{mean:{form}}" if low == high else f"{mean:{form}} [{low:{form}}, {high:{form}}]"

    for name in by_seed[0]:
        examples = "-" if name == "sft" else cell(name, "examples", ".0f")
        lines.append(f"| {name} | {examples} | {cell(name, 'reward', '+.3f')} | {cell(name, 'win_rate', '.2f')} | "
                     f"{cell(name, 'kl', '.2f')} | {cell(name, 'distinct_2', '.3f')} | "
                     f"{cell(name, 'self_bleu', '.3f')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="runs/kto-vs-dpo")
    parser.add_argument("--pairs", type=int, default=400, help="N: oracle-labelled pairs every method learns from")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--learning_rate", type=float, default=5e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    by_seed = [one_seed(args, seed) for seed in args.seeds]
    table = markdown_table(by_seed)
    root = Path(args.output_dir)
    (root / "kto_vs_dpo.md").write_text(table + "\n")
    (root / "kto_vs_dpo.json").write_text(json.dumps({"args": vars(args), "by_seed": by_seed,
                                                      "seconds": time.perf_counter() - started}, indent=2))
    print(table)
    print(f"{time.perf_counter() - started:.0f} s; written to {root / 'kto_vs_dpo.md'}")


if __name__ == "__main__":
    main()
