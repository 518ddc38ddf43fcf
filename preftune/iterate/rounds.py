"""Iterative DPO with rejection sampling (``preftune iterate``): sample -> judge -> select -> train -> evaluate.

Round r (``RUN/rounds/r/``) starts from the previous round's policy (round 0 is the initial model,
evaluated once as the baseline):

1. *sample*: ``samples_per_prompt`` completions per training prompt (:mod:`preftune.generate`; message
   prompts through the chat template) -> ``samples.jsonl``;
2. *judge*: a scorer (:mod:`preftune.scoring`) or people (:mod:`.iterate_people`) -> ``judged.json``;
3. *select*: rejection sampling (:mod:`.iterate_select`) -> ``pairs.jsonl`` and ``select.json``;
4. *train*: ``preftune dpo`` (or ``kto``) through its config, from the previous policy, its reference
   the previous policy (or the initial model with ``ref: initial``), reference log-probs precomputed
   -> ``train/`` (the policy in ``train/model``, LoRA merged);
5. *evaluate*: held-out prompts (:func:`preftune.evaluate.sampling.evaluate_policy`): judge score, the
   separate oracle's score, win rates against the initial model's samples, KL to the initial model,
   diversity -> ``eval.json`` and ``eval_samples.jsonl``; then ``round.json`` closes the round.

Every stage writes its output atomically and is skipped when its output exists, and every random
draw is seeded from (seed, round), so a run killed at any point and resumed (``--resume``) ends
with the same files an uninterrupted run writes. ``rounds.jsonl`` and ``report.html`` cover all rounds.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from ..config.iterate import IterateConfig
from ..config.preference import DPOConfig, KTOConfig
from ..errors import ConfigError

console = Console(stderr=True)
RESUME_SAFE = {"resume", "overwrite_output_dir", "rounds", "annotate_timeout", "annotate_poll_seconds", "report_to"}


@dataclass
class IterateResult:
    run_dir: Path
    model_dir: Path          # the last round's policy
    rounds: list[dict]       # round.json of every round, round 0 (the initial model) first
    report: Path


# ---------------------------------------------------------------------- files


def write_atomic(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)
    return path


def write_json(path: Path, value) -> Path:
    return write_atomic(path, json.dumps(value, indent=2, ensure_ascii=False))


def write_rows(path: Path, rows: list[dict]) -> Path:
    return write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def stage(path: Path, compute, write=write_json, read=lambda p: json.loads(p.read_text(encoding="utf-8"))):
    """The stage's output: read from ``path`` when a finished run wrote it, else computed and written."""
    if path.is_file():
        return read(path)
    value = compute()
    write(path, value)
    return value


# ---------------------------------------------------------------------- set-up


def prepare_run(cfg: IterateConfig) -> Path:
    """The run directory: new, overwritten (``overwrite_output_dir``) or continued (``resume``, same settings)."""
    run_dir = Path(cfg.output_dir)
    saved = run_dir / "config.json"
    current = dataclasses.asdict(cfg)
    if saved.is_file() and cfg.resume:
        before = json.loads(saved.read_text())
        changed = sorted(k for k in current if k not in RESUME_SAFE and before.get(k) != current[k])
        if changed:
            raise ConfigError(f"{run_dir} was started with other settings ({', '.join(changed)}); resume it with the "
                              f"same ones, or start afresh with --overwrite_output_dir")
    elif saved.is_file() or (run_dir / "rounds").exists():
        if not cfg.overwrite_output_dir:
            raise ConfigError(f"{run_dir} already holds an iterate run; pass --resume to continue it, "
                              f"--overwrite_output_dir to start afresh, or choose another --output_dir")
        for name in ("rounds", "cache", "config.json", "rounds.jsonl", "report.html", "summary.json", "metrics.jsonl"):
            target = run_dir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    write_json(saved, current)
    return run_dir


def round_config(cfg: IterateConfig, policy_dir, data: Path, out_dir: Path, round_: int, cache_dir: Path):
    """The round's ``preftune dpo`` / ``preftune kto`` config: every training option of ``cfg``, this round's files."""
    cls = KTOConfig if cfg.loss_type == "kto" else DPOConfig
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)}
    resumable = cfg.save_steps > 0 and any((out_dir / "checkpoints").glob("*"))
    values.update(model_name_or_path=str(policy_dir), dataset=str(data), split="train", eval_dataset=None,
                  eval_fraction=0.0, output_dir=str(out_dir), resume="latest" if resumable else None,
                  overwrite_output_dir=not resumable, merge_lora=True, seed=cfg.seed + round_, report_to=[],
                  ref_model_name_or_path=cfg.model_name_or_path if cfg.ref == "initial" else None,
                  cache_dir=cfg.cache_dir or str(cache_dir), eval_steps=0, eval_on_start=False)
    if cfg.tokenizer_name_or_path is None or round_ > 1:
        values["tokenizer_name_or_path"] = None  # a round's model directory holds its tokenizer
    return cls(**values)


def make_judges(cfg: IterateConfig, judge, oracle):
    from ..scoring import make_scorer
    from ..scoring.judges import as_judge

    def build(given, spec, option):
        if given is not None:
            return as_judge(given, option)
        return make_scorer(spec, option=option, judge_model=cfg.judge_model,
                           batch_size=cfg.sampling_batch_size) if spec else None

    judge, oracle = build(judge, cfg.judge, "--judge"), build(oracle, cfg.oracle, "--oracle")
    if judge is None and not cfg.annotate_db:
        raise ConfigError("iterate needs a judge: --judge (reward_model:PATH, function:module:function or "
                          "llm:BASE_URL) or people (--annotate_db URL --project NAME)")
    return judge, oracle


def split_prompts(cfg: IterateConfig, processor, modality):
    from ..data.split import hold_out
    from ..recipes.online import load_prompts

    def read(source, split):
        return load_prompts(source, split, processor, cfg.prompt_limit(), cfg.skip_invalid, modality)

    train = read(cfg.dataset, cfg.split)
    held = read(cfg.eval_dataset, cfg.eval_split) if cfg.eval_dataset else None
    if held is None:
        train, held = hold_out(train, cfg.eval_fraction, cfg.seed)
    if not held:
        raise ConfigError("iterate evaluates every round on held-out prompts: give --eval_dataset or --eval_fraction")
    return train, held


# ---------------------------------------------------------------------- the stages


class Rounds:
    """What every round shares: the config, modality, tokenizer, prompts, judges, device and the initial model's
    samples. Prompts with images (the modality's ``encoded`` prompts) are sampled and evaluated with their image
    tensors, and the training rows written from them carry their images (``PromptExample.carry``)."""

    def __init__(self, cfg: IterateConfig, run_dir: Path, modality, tokenizer, train_prompts, eval_prompts, judge,
                 oracle):
        import torch

        from ..generate import SamplingSettings

        self.cfg, self.run_dir, self.modality, self.tokenizer = cfg, run_dir, modality, tokenizer
        self.train_prompts, self.eval_prompts = train_prompts, eval_prompts
        self.judge, self.oracle = judge, oracle
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.settings = SamplingSettings(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                         top_k=cfg.top_k, top_p=cfg.top_p)
        self.baseline: list[str] | None = None

    def load(self, model_dir):
        model = self.modality.load_model(str(model_dir)).to(self.device)
        model.eval()
        return model

    def sample(self, policy_dir, round_: int) -> list[dict]:
        from ..generate import generate_ids

        k = self.cfg.samples_per_prompt
        ids = [p.ids for p in self.train_prompts for _ in range(k)]
        images = self.modality.sampling_inputs([p.encoded for p in self.train_prompts for _ in range(k)])
        generation = generate_ids(self.load(policy_dir), ids, self.settings, pad_token_id=self.tokenizer.pad_token_id,
                                  eos_token_id=self.tokenizer.eos_token_id, batch_size=self.cfg.sampling_batch_size,
                                  seed=self.cfg.seed * 1_000 + round_, prompt_inputs=images,
                                  precision=self.cfg.precision)
        texts = self.tokenizer.batch_decode(generation.response_ids, skip_special_tokens=True)
        return [{"prompt_index": i, "prompt": p.prompt, "samples": texts[i * k:(i + 1) * k],
                 "ended": generation.ended[i * k:(i + 1) * k]} for i, p in enumerate(self.train_prompts)]

    def judge_round(self, round_dir: Path, round_: int, rows: list[dict]) -> dict:
        prompts, samples = [r["prompt"] for r in rows], [r["samples"] for r in rows]
        if self.judge is None:
            from .people import judge_by_people

            return judge_by_people(self.cfg, round_dir, round_, prompts, samples)
        from .select import judge_samples

        return {"texts": samples, "scores": judge_samples(self.judge, prompts, samples), "stats": {}}

    def select(self, round_dir: Path, rows: list[dict], judged: dict) -> dict:
        from .select import select_rows

        carried = [self.train_prompts[r["prompt_index"]].carry for r in rows]   # a prompt's images
        ended = [judged_ended(row, texts) for row, texts in zip(rows, judged["texts"])]
        pairs, stats = select_rows(self.cfg, [r["prompt"] for r in rows], judged["texts"], judged["scores"], ended,
                                   carried)
        write_rows(round_dir / "pairs.jsonl", pairs)
        flat = [s for scores in judged["scores"] for s in scores]
        stats["sample_score_mean"] = sum(flat) / len(flat) if flat else None
        return {**stats, **judged["stats"]}

    def train(self, round_dir: Path, round_: int, policy_dir, selected: dict) -> Path:
        """The round's policy directory (the previous one when no pair was kept)."""
        model_dir = round_dir / "train" / "model"
        if (round_dir / "train" / "summary.json").is_file():  # written after the model: the stage finished
            return model_dir
        if selected["pairs_kept"] == 0:
            console.print(f"[yellow]round {round_}: no pair was kept; the policy is not trained this round")
            return Path(policy_dir)
        from ..recipes.dpo import train_dpo
        from ..recipes.kto import train_kto

        cfg = round_config(self.cfg, policy_dir, round_dir / "pairs.jsonl", round_dir / "train", round_,
                           self.run_dir / "cache")
        kept = selected["pairs_kept"] * (2 if self.cfg.loss_type == "kto" else 1)
        if kept < cfg.per_device_batch_size * cfg.gradient_accumulation_steps:
            console.print(f"[yellow]round {round_}: {kept} training rows, fewer than one batch; this round trains "
                          f"on batches of {kept} rows without accumulation")
            cfg.per_device_batch_size, cfg.gradient_accumulation_steps = kept, 1
        train = train_kto if self.cfg.loss_type == "kto" else train_dpo
        return train(cfg).model_dir

    def evaluate(self, policy_dir, reference) -> tuple[dict, list[dict]]:
        from ..evaluate.sampling import evaluate_policy
        from ..scoring.judges import win_rate

        repeated = self.eval_prompts * self.cfg.eval_samples_per_prompt
        prompts = [p.prompt for p in repeated]
        model = self.load(policy_dir)
        evaluation = evaluate_policy(model, self.tokenizer, prompts, self.settings, judge=self.judge,
                                     ref_model=reference, baseline_responses=self.baseline, seed=self.cfg.seed + 7919,
                                     batch_size=self.cfg.sampling_batch_size, prompt_ids=[p.ids for p in repeated],
                                     prompt_inputs=self.modality.sampling_inputs([p.encoded for p in repeated]),
                                     precision=self.cfg.precision)
        metrics, rows = evaluation.metrics, evaluation.sample_rows()
        if reference is None:
            metrics["kl"] = 0.0  # the initial model against itself
        independent = None
        if self.oracle is not None:
            responses = evaluation.samples.responses
            scores = independent = self.oracle.score(prompts, responses)
            mean = sum(scores) / len(scores)
            metrics["oracle_reward"] = mean
            metrics["oracle_reward_std"] = (sum((s - mean) ** 2 for s in scores) / len(scores)) ** 0.5
            if self.baseline is not None:
                metrics["oracle_win_rate"] = win_rate(self.oracle, prompts, responses, self.baseline)
            for row, score in zip(rows, scores):
                row["oracle_score"] = score
        from ..evaluate.monitors import measure_samples

        metrics["monitor"] = measure_samples(evaluation.samples, kls=evaluation.kls, judge=evaluation.scores,
                                             independent=independent)
        return metrics, rows

    def evaluation_stage(self, round_dir: Path, policy_dir, reference) -> dict:
        def compute():
            metrics, rows = self.evaluate(policy_dir, reference)
            write_rows(round_dir / "eval_samples.jsonl", rows)
            return metrics

        metrics = stage(round_dir / "eval.json", compute)
        if self.baseline is None:
            self.baseline = [r["response"] for r in read_rows(round_dir / "eval_samples.jsonl")]
        return metrics


def judged_ended(row: dict, texts: list[str]) -> list[bool]:
    """Whether each judged text ended: a text judged once for several equal samples ends only if all of them did."""
    flags: dict[str, bool] = {}
    for text, ended in zip(row["samples"], row.get("ended", [True] * len(row["samples"]))):
        flags[text] = flags.get(text, True) and bool(ended)
    return [flags.get(text, True) for text in texts]


def progress(round_: int, total: int, stage_name: str, text: str) -> None:
    """One line as a stage of a round starts."""
    console.print(f"round {round_}/{total} · {stage_name}: {text}")


def run_round(rounds: Rounds, round_: int, policy_dir, reference, timings: dict) -> tuple[Path, dict]:
    """One round (its finished stages reused); returns the new policy and the round's metrics."""
    round_dir = rounds.run_dir / "rounds" / str(round_)
    done = round_dir / "round.json"
    if done.is_file():
        return Path(json.loads(done.read_text())["policy"]), json.loads(done.read_text())
    spent = timings.setdefault(str(round_), {})

    def timed(name, work):
        started = time.perf_counter()
        value = work()
        spent[name] = round(time.perf_counter() - started, 2)
        return value

    cfg, total = rounds.cfg, rounds.cfg.rounds
    console.rule(f"[bold]iterate: round {round_} of {total}")
    progress(round_, total, "sample", f"{len(rounds.train_prompts) * cfg.samples_per_prompt} replies "
                                      f"({len(rounds.train_prompts)} prompts x {cfg.samples_per_prompt})")
    rows = timed("sample", lambda: stage(round_dir / "samples.jsonl", lambda: rounds.sample(policy_dir, round_),
                                          write_rows, read_rows))
    ended = [e for r in rows for e in r.get("ended", [])]
    progress(round_, total, "judge", f"{sum(ended)} of {len(ended)} samples ended; scoring them"
                                     + ("" if rounds.judge is not None else " (people)"))
    judged = timed("judge", lambda: stage(round_dir / "judged.json", lambda: rounds.judge_round(round_dir, round_,
                                                                                                  rows)))
    selected = timed("select", lambda: stage(round_dir / "select.json", lambda: rounds.select(round_dir, rows, judged)))
    progress(round_, total, "train", f"{selected['pairs_kept']} pairs kept of {selected['pairs_considered']} "
                                     f"(missing_eos {cfg.eos_mode()}: {selected.get('samples_unfinished_dropped', 0)} "
                                     f"unfinished samples left out)")
    policy = timed("train", lambda: rounds.train(round_dir, round_, policy_dir, selected))
    progress(round_, total, "evaluate", f"{len(rounds.eval_prompts) * cfg.eval_samples_per_prompt} held-out replies")
    metrics = timed("evaluate", lambda: rounds.evaluation_stage(round_dir, policy, reference))
    summary_file = round_dir / "train" / "summary.json"
    train = json.loads(summary_file.read_text())["train"] if summary_file.is_file() else {}
    record = {"round": round_, "policy": str(policy), **selected, "eval": metrics,
              "train": {k: train[k] for k in ("loss", "rewards/accuracies", "rewards/margins") if k in train}}
    write_json(done, record)
    from .report import round_line

    console.print(round_line(record))
    return policy, record


def watch_rounds(cfg: IterateConfig, run_dir: Path, records: list[dict]) -> None:
    """Each round's held-out replies against round 0's (the initial model's) through the monitors; crossed
    thresholds are printed once, kept in the record (``alarms``) and written to ``metrics.jsonl``."""
    from ..monitors import Monitor, flat_metrics

    monitor = Monitor(cfg.thresholds(), warn=lambda text: console.print(f"[bold yellow]{text}"))
    baseline = records[0]["eval"].get("monitor")
    lines = []
    for record in records:
        current = record["eval"].get("monitor")
        if current is None or baseline is None:
            continue
        record["alarms"] = monitor.check(current, baseline, where=f"round {record['round']}")
        lines.append({"round": record["round"], **flat_metrics(current, record["alarms"])})
    write_rows(run_dir / "metrics.jsonl", lines)


def train_iterate(cfg: IterateConfig, *, judge=None, oracle=None, title: str | None = None) -> IterateResult:
    """Run (or resume) ``cfg.rounds`` rounds. ``judge``/``oracle`` may be given as scorers or functions; ``title``
    names the model and task in the report's title."""
    from ..modality import modality_of_data
    from .report import report_title, write_iterate_report

    cfg.validate()
    judge, oracle = make_judges(cfg, judge, oracle)
    round_config(cfg, cfg.model_name_or_path, Path("pairs.jsonl"), Path(cfg.output_dir), 1, Path(".")).validate()
    modality = modality_of_data(cfg.dataset, cfg.split)   # prompts with images: a vision-language policy
    run_dir = prepare_run(cfg)
    processor = modality.load_processor(cfg.tokenizer_name_or_path or cfg.model_name_or_path, cfg)
    tokenizer = modality.tokenizer_of(processor)
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no EOS token; samples end at EOS")
    train_prompts, eval_prompts = split_prompts(cfg, processor, modality)
    if judge is None and any(p.carry for p in train_prompts):
        raise ConfigError("judging prompts with images by people (--annotate_db) is not supported yet; give --judge")
    try:   # each round's pairs are JSON lines: the images they carry must be paths
        json.dumps([p.carry for p in train_prompts])
    except TypeError:
        raise ConfigError(f"{cfg.dataset}: iterate writes each round's pairs as JSON lines, so their images must "
                          "be file paths (not bytes or decoded images)") from None
    rounds = Rounds(cfg, run_dir, modality, tokenizer, train_prompts, eval_prompts, judge, oracle)
    timings: dict = json.loads((run_dir / "timings.json").read_text()) if (run_dir / "timings.json").is_file() else {}
    progress(0, cfg.rounds, "evaluate", f"the initial model on {len(rounds.eval_prompts)} held-out prompts")
    records = [{"round": 0, "policy": cfg.model_name_or_path,
                "eval": rounds.evaluation_stage(run_dir / "rounds" / "0", cfg.model_name_or_path, None)}]
    reference = rounds.load(cfg.model_name_or_path)
    policy = Path(cfg.model_name_or_path)
    for round_ in range(1, cfg.rounds + 1):
        policy, record = run_round(rounds, round_, policy, reference, timings)
        records.append(record)
        write_json(run_dir / "timings.json", timings)
    watch_rounds(cfg, run_dir, records)
    write_rows(run_dir / "rounds.jsonl", records)
    report = write_iterate_report(run_dir, records, run_dir / "report.html", title=report_title(cfg, title))
    write_json(run_dir / "summary.json", {"model_dir": str(policy), "rounds": records, "report": str(report)})
    return IterateResult(run_dir, policy, records, report)
