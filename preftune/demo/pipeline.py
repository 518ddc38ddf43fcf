"""The built-in experiment: controlled sentiment generation, every method on one reward-vs-KL chart.

pretrain (cached) -> SFT -> sample 4 continuations per training prefix -> label pairs with the
oracle (the simulated annotator) -> reward model -> DPO at several beta, PPO with the learned reward
model at several KL coefficients, best-of-N with the learned reward model -> evaluate everything on
held-out prefixes with the oracle -> report.html and summary.json.

Each stage is an ordinary preftune run (the same functions the CLI calls) writing into its own
directory, so any of them can be inspected, re-run or reported on by hand.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..config import DPOConfig, PPOConfig, PretrainConfig, RewardConfig, SFTConfig
from ..toy import build_tiny_llama, build_toy_tokenizer
from .sentiment import SentimentTask, review_corpus, sentiment_reward

console = Console()


@dataclass
class DemoScale:
    """Sizes of every stage. ``full`` fits in ~10 minutes on 2 CPU cores; ``quick`` is for tests."""

    corpus_reviews: int = 8000
    hidden_size: int = 192
    layers: int = 4
    vocab_size: int = 1200
    pretrain_epochs: float = 3.0
    sft_rows: int = 3000
    train_prompts: int = 320
    eval_prompts: int = 96
    samples_per_prompt: int = 4
    max_new_tokens: int = 32
    reward_epochs: float = 2.0
    dpo_betas: tuple[float, ...] = (0.05, 0.1, 0.5, 1.0)
    dpo_epochs: float = 2.0
    dpo_learning_rate: float = 2e-4
    ppo_kl_coefs: tuple[float, ...] = (0.02, 0.1)
    ppo_iterations: int = 70
    ppo_learning_rate: float = 1e-4
    best_of_n: int = 8
    eval_repeats: int = 2   # samples per held-out prefix (more samples, less noise in the reward estimate)
    seed: int = 0
    precision: str = "fp32"   # of every stage (the README's figures were measured in fp32); --precision sets it

    @classmethod
    def quick(cls) -> "DemoScale":
        return cls(corpus_reviews=1500, hidden_size=64, layers=2, vocab_size=700, pretrain_epochs=2.0, sft_rows=800,
                   train_prompts=96, eval_prompts=32, max_new_tokens=24, reward_epochs=2.0, dpo_betas=(0.1,),
                   dpo_epochs=2.0, ppo_kl_coefs=(0.1,), ppo_iterations=6, best_of_n=4)


@dataclass
class MethodResult:
    name: str
    family: str
    run_dir: str
    metrics: dict = field(default_factory=dict)


def _write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _stage(title: str):
    console.rule(f"[bold]{title}")
    return time.perf_counter()


# ---------------------------------------------------------------------- stages


def base_model(scale: DemoScale, cache_root: Path) -> Path:
    """Pretrain a small Llama on the review corpus once; later demos reuse it from the cache."""
    from ..recipes.pretrain import train_pretrain

    fields = ("corpus_reviews", "hidden_size", "layers", "vocab_size", "pretrain_epochs", "seed", "precision")
    key = hashlib.sha256(json.dumps([asdict(scale)[k] for k in fields]).encode()).hexdigest()[:12]
    cached = cache_root / f"base-{key}"
    if (cached / "model" / "config.json").is_file():
        console.print(f"base model: reusing the cached pretrained model at {cached / 'model'}")
        return cached / "model"
    corpus = review_corpus(scale.corpus_reviews, seed=scale.seed + 3)
    tokenizer = build_toy_tokenizer(corpus, vocab_size=scale.vocab_size)
    init = cached / "init"
    build_tiny_llama(tokenizer, hidden_size=scale.hidden_size, layers=scale.layers, heads=4,
                     seed=scale.seed).save_pretrained(init)
    tokenizer.save_pretrained(init)
    data = _write_jsonl([{"text": t} for t in corpus], cached / "corpus.jsonl")
    cfg = PretrainConfig(model_name_or_path=str(init), precision=scale.precision,
                         dataset=str(data), output_dir=str(cached / "run"),
                         max_length=128, per_device_batch_size=16, num_epochs=scale.pretrain_epochs, learning_rate=2e-3,
                         warmup_ratio=0.05, lr_scheduler="cosine", logging_steps=20, eval_fraction=0.05,
                         seed=scale.seed, overwrite_output_dir=True)
    result = train_pretrain(cfg)
    result.model_dir.rename(cached / "model")
    return cached / "model"


def supervised_model(scale: DemoScale, base: Path, root: Path) -> Path:
    from ..recipes.sft import train_sft

    task = SentimentTask(seed=scale.seed)
    data = _write_jsonl(task.sft_rows(scale.sft_rows), root / "data" / "sft.jsonl")
    cfg = SFTConfig(model_name_or_path=str(base), precision=scale.precision,
                    dataset=str(data), output_dir=str(root / "sft"), max_length=96,
                    per_device_batch_size=32, num_epochs=1.0, learning_rate=5e-4, warmup_ratio=0.05,
                    logging_steps=10, eval_fraction=0.05, seed=scale.seed, overwrite_output_dir=True)
    return train_sft(cfg).model_dir


def preference_pairs(scale: DemoScale, sft: Path, root: Path) -> tuple[Path, dict]:
    """Sample continuations of training prefixes; the oracle orders every pair of them (the annotator)."""
    from ..generate import SamplingSettings, generate_texts
    from ..models import load_causal_lm, load_tokenizer

    model, tokenizer = load_causal_lm(str(sft)), load_tokenizer(str(sft))
    model.eval()
    prompts = SentimentTask(train_prompts=scale.train_prompts, seed=scale.seed).train_prefixes()
    settings = SamplingSettings(max_new_tokens=scale.max_new_tokens)
    samples = generate_texts(model, tokenizer, prompts, settings, n=scale.samples_per_prompt, batch_size=64,
                             seed=scale.seed, precision=scale.precision)
    rows, spreads = [], []
    for prompt, texts in zip(prompts, samples):
        scores = sentiment_reward([prompt] * len(texts), texts)
        spreads.append(max(scores) - min(scores))
        for (a, sa), (b, sb) in itertools.combinations(zip(texts, scores), 2):
            if abs(sa - sb) >= 0.1 and a.strip() and b.strip() and a != b:
                chosen, rejected = (a, b) if sa > sb else (b, a)
                rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    path = _write_jsonl(rows, root / "data" / "pairs.jsonl")
    stats = {"prompts": len(prompts), "samples": len(prompts) * scale.samples_per_prompt, "pairs": len(rows),
             "mean_oracle_spread_within_prompt": statistics.mean(spreads)}
    console.print(f"labelled {len(rows)} pairs from {stats['samples']} samples "
                  f"(mean oracle spread within a prompt: {stats['mean_oracle_spread_within_prompt']:.2f})")
    return path, stats


def reward_model(scale: DemoScale, sft: Path, pairs: Path, root: Path) -> tuple[Path, dict]:
    from ..recipes.reward import train_reward

    cfg = RewardConfig(model_name_or_path=str(sft), precision=scale.precision,
                       dataset=str(pairs), output_dir=str(root / "reward"), max_length=96,
                       per_device_batch_size=32, num_epochs=scale.reward_epochs, learning_rate=3e-4, logging_steps=10,
                       eval_fraction=0.1, seed=scale.seed, overwrite_output_dir=True)
    result = train_reward(cfg)
    return result.model_dir, result.train.eval_metrics


def dpo_runs(scale: DemoScale, sft: Path, pairs: Path, root: Path) -> list[Path]:
    from ..recipes.dpo import train_dpo

    dirs = []
    for beta in scale.dpo_betas:
        cfg = DPOConfig(model_name_or_path=str(sft), precision=scale.precision,
                        dataset=str(pairs), output_dir=str(root / f"dpo-beta{beta:g}"),
                        beta=beta, max_length=96, per_device_batch_size=32, num_epochs=scale.dpo_epochs,
                        learning_rate=scale.dpo_learning_rate, warmup_ratio=0.1, logging_steps=10, eval_fraction=0.1,
                        precompute_ref=True,
                        cache_dir=str(root / "cache"), seed=scale.seed, overwrite_output_dir=True)
        dirs.append(train_dpo(cfg).run_dir)
    return dirs


def ppo_runs(scale: DemoScale, sft: Path, reward: Path, root: Path) -> list[Path]:
    from ..recipes.ppo import train_ppo

    prompts = _write_jsonl([{"prompt": p} for p in SentimentTask(train_prompts=scale.train_prompts,
                                                                  seed=scale.seed).train_prefixes()],
                           root / "data" / "prompts.jsonl")
    dirs = []
    for coef in scale.ppo_kl_coefs:
        cfg = PPOConfig(model_name_or_path=str(sft), precision=scale.precision,
                        dataset=str(prompts), reward_model_path=str(reward),
                        output_dir=str(root / f"ppo-kl{coef:g}"), kl_coef=coef, max_new_tokens=scale.max_new_tokens,
                        per_device_batch_size=16, num_mini_batches=2, num_ppo_epochs=2, max_steps=scale.ppo_iterations,
                        learning_rate=scale.ppo_learning_rate, normalize_scores=True, missing_eos_penalty=1.0,
                        sampling_batch_size=64,
                        logging_steps=5, log_samples_steps=10, seed=scale.seed, overwrite_output_dir=True)
        dirs.append(train_ppo(cfg).run_dir)
    return dirs


# ---------------------------------------------------------------------- evaluation


def evaluate_all(scale: DemoScale, sft: Path, reward: Path | None, runs: list[Path], root: Path) -> list[MethodResult]:
    """Every model samples once per held-out prefix; the oracle scores, KL is measured against SFT. Best-of-N
    with the learned ``reward`` model is added unless ``reward`` is None."""
    from ..evaluate.sampling import evaluate_policy
    from ..generate import SamplingSettings
    from ..models import load_causal_lm, load_tokenizer
    from ..scoring import FunctionScorer

    prompts = SentimentTask(eval_prompts=scale.eval_prompts, seed=scale.seed).eval_prefixes() * scale.eval_repeats
    settings = SamplingSettings(max_new_tokens=scale.max_new_tokens)
    oracle = FunctionScorer("preftune.demo.sentiment:sentiment_reward")
    tokenizer = load_tokenizer(str(sft))
    reference = load_causal_lm(str(sft))
    reference.eval()
    results = []
    candidates = [("sft", "sft", root / "sft", sft)] + [(d.name, d.name.split("-")[0], d, d / "model") for d in runs]
    sft_samples = None
    for name, family, run_dir, model_dir in candidates:
        model = reference if name == "sft" else load_causal_lm(str(model_dir))
        evaluation = evaluate_policy(model, tokenizer, prompts, settings, judge=oracle, ref_model=reference,
                                     baseline_responses=sft_samples, seed=scale.seed + 7, batch_size=64,
                                     precision=scale.precision)
        if name == "sft":
            sft_samples = evaluation.samples.responses
        _save_evaluation(run_dir, evaluation.metrics, evaluation.sample_rows())
        results.append(MethodResult(name, family, str(run_dir), evaluation.metrics))
    if reward is not None:
        results.append(best_of_n(scale, reference, tokenizer, reward, prompts, settings, root, oracle, sft_samples))
    return results


def best_of_n(scale, sft_model, tokenizer, reward: Path, prompts, settings, root: Path, oracle,
              sft_samples) -> MethodResult:
    """Sample N continuations from SFT, keep the one the learned reward model likes best.

    Its KL to SFT is the known closed form log N - (N - 1) / N (Stiennon et al. 2020, appendix)."""
    from ..diversity import diversity_metrics
    from ..generate import generate_texts
    from ..scoring.judges import win_rate
    from ..scoring.reward_model import RewardModelScorer

    n = scale.best_of_n
    rm = RewardModelScorer(str(reward), batch_size=64)
    samples = generate_texts(sft_model, tokenizer, prompts, settings, n=n, batch_size=64, seed=scale.seed + 11,
                             precision=scale.precision)
    picked = []
    for prompt, texts in zip(prompts, samples):
        scores = rm.score([prompt] * n, texts)
        picked.append(texts[max(range(n), key=scores.__getitem__)])
    scores = oracle.score(prompts, picked)
    metrics = {"n": float(len(prompts)), "reward": statistics.mean(scores), "reward_std": statistics.pstdev(scores),
               "kl": math.log(n) - (n - 1) / n, "win_rate": win_rate(oracle, prompts, picked, sft_samples),
               **diversity_metrics(picked)}
    run_dir = root / f"best-of-{n}"
    rows = [{"prompt": p, "response": r, "score": s} for p, r, s in zip(prompts, picked, scores)]
    _save_evaluation(run_dir, metrics, rows)
    return MethodResult(run_dir.name, "best", str(run_dir), metrics)


def _save_evaluation(run_dir: Path, metrics: dict, rows: list[dict]) -> None:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "eval.json").write_text(json.dumps(metrics, indent=2))
    _write_jsonl(rows, run_dir / "eval_samples.jsonl")


# ---------------------------------------------------------------------- the whole experiment


def results_table(results: list[MethodResult]) -> Table:
    table = Table(title="held-out prefixes: oracle reward (VADER), KL to SFT, diversity")
    for column in ("method", "reward", "win vs SFT", "KL", "distinct-2", "self-BLEU", "entropy"):
        table.add_column(column, justify="right")
    for r in results:
        m = r.metrics
        table.add_row(r.name, f"{m['reward']:+.3f}", f"{m.get('win_rate', float('nan')):.2f}", f"{m.get('kl', 0):.2f}",
                      f"{m.get('distinct_2', 0):.3f}", f"{m.get('self_bleu', 0):.3f}",
                      f"{m['entropy']:.2f}" if "entropy" in m else "-")
    return table


def honest_summary(results: list[MethodResult]) -> list[str]:
    """Plain sentences comparing the methods, derived from the numbers (not written in advance)."""
    by_name = {r.name: r.metrics for r in results}
    sft = by_name["sft"]["reward"]
    notes = []
    families: dict[str, list[MethodResult]] = {}
    for r in results:
        families.setdefault(r.family, []).append(r)
    for family in ("dpo", "ppo", "best"):
        if family not in families:
            continue
        best = max(families[family], key=lambda r: r.metrics["reward"])
        notes.append(f"best {family.upper() if family != 'best' else 'best-of-N'} run {best.name}: oracle reward "
                     f"{best.metrics['reward']:+.3f} vs SFT {sft:+.3f} ({best.metrics['reward'] - sft:+.3f}) at KL "
                     f"{best.metrics.get('kl', 0):.2f}, distinct-2 {best.metrics.get('distinct_2', 0):.3f} "
                     f"(SFT {by_name['sft'].get('distinct_2', 0):.3f}).")
    if "dpo" in families and "ppo" in families:
        ppo = max(families["ppo"], key=lambda r: r.metrics["reward"])
        kl_ppo = ppo.metrics.get("kl", 0.0)
        comparable = [r for r in families["dpo"] if r.metrics.get("kl", 0.0) <= 1.5 * kl_ppo + 0.5]
        if comparable:
            dpo = max(comparable, key=lambda r: r.metrics["reward"])
            gap = dpo.metrics["reward"] - ppo.metrics["reward"]
            noise = 2 * math.sqrt(sum(r.metrics.get("reward_std", 0.0) ** 2 / max(r.metrics.get("n", 1.0), 1.0)
                                      for r in (dpo, ppo)))
            verdict = ("the two are within sampling noise of each other" if abs(gap) < noise else
                       f"{'DPO' if gap > 0 else 'PPO'} did better")
            notes.append(f"At comparable KL {verdict}: {dpo.name} {dpo.metrics['reward']:+.3f} at KL "
                         f"{dpo.metrics.get('kl', 0):.2f} against {ppo.name} {ppo.metrics['reward']:+.3f} at KL "
                         f"{kl_ppo:.2f} (difference {gap:+.3f}; two standard errors: {noise:.3f}).")
        else:
            lowest = min(families["dpo"], key=lambda r: r.metrics.get("kl", 0.0))
            notes.append(f"No DPO run stayed as close to SFT as {ppo.name} (KL {kl_ppo:.2f}; the closest DPO run, "
                         f"{lowest.name}, is at KL {lowest.metrics.get('kl', 0):.2f}), so this run cannot rank them at "
                         "equal KL; compare their points on the frontier plot.")
        notes.append("PPO optimises the learned reward model, DPO the oracle-labelled pairs directly, best-of-N picks "
                     "with the learned reward model; all are small models trained for minutes, so one run is one "
                     "sample, not a verdict.")
    return notes


def run_pipeline(output_dir: str | Path, scale: DemoScale | None = None, cache_dir: str | Path | None = None) -> dict:
    from ..evaluate.report import write_report

    scale = scale or DemoScale()
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    cache_root = Path(cache_dir) if cache_dir else Path(os.environ.get("PREFTUNE_CACHE") or
                                                        Path.home() / ".cache" / "preftune") / "demo"
    timings = {}
    started = time.perf_counter()
    t = _stage("1/7 base model (pretrained once on a generated review corpus, then cached)")
    base = base_model(scale, cache_root)
    timings["pretrain"] = time.perf_counter() - t
    t = _stage("2/7 supervised fine-tuning on review continuations")
    sft = supervised_model(scale, base, root)
    timings["sft"] = time.perf_counter() - t
    t = _stage("3/7 sample continuations, label pairs with the oracle")
    pairs, pair_stats = preference_pairs(scale, sft, root)
    timings["label"] = time.perf_counter() - t
    t = _stage("4/7 reward model")
    reward, reward_eval = reward_model(scale, sft, pairs, root)
    timings["reward"] = time.perf_counter() - t
    t = _stage("5/7 DPO at several beta")
    runs = dpo_runs(scale, sft, pairs, root)
    timings["dpo"] = time.perf_counter() - t
    t = _stage("6/7 PPO with the learned reward model at several KL coefficients")
    runs += ppo_runs(scale, sft, reward, root)
    timings["ppo"] = time.perf_counter() - t
    t = _stage("7/7 evaluation on held-out prefixes (oracle), best-of-N, report")
    results = evaluate_all(scale, sft, reward, runs, root)
    timings["evaluate"] = time.perf_counter() - t
    notes = honest_summary(results)
    report = write_report([r.run_dir for r in results], root / "report.html",
                          title="preftune demo: controlled sentiment", names=[r.name for r in results], notes=notes)
    timings["total"] = time.perf_counter() - started
    summary = {"scale": asdict(scale), "pairs": pair_stats, "reward_model_eval": reward_eval,
               "results": [asdict(r) for r in results], "notes": notes, "timings_s": timings, "report": str(report)}
    (root / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print(results_table(results))
    for note in notes:
        console.print(note)
    console.print(f"report: [bold]{report}[/]   summary: [bold]{root / 'summary.json'}[/]   "
                  f"({timings['total']:.0f} s)")
    return summary
