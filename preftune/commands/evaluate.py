"""``preftune eval`` and ``preftune report``: their arguments and handlers (listed in :mod:`.table`)."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..errors import DataError

out = Console()


def eval_arguments(ev) -> None:
    ev.add_argument("--model", required=True, help="Model (directory or hub name; a peft adapter directory works).")
    ev.add_argument("--prompts", required=True, help="File with a 'prompt' column (JSONL, JSON, CSV, Parquet, ...).")
    ev.add_argument("--judge", help="reward_model:PATH, function:module:function or llm:BASE_URL (OpenAI-compatible). "
                                    "A function gets (prompts, responses): each prompt as in the file (a string or a "
                                    "list of messages), each response as text.")
    ev.add_argument("--judge_model", default="judge", help="Model name sent to an LLM judge.")
    ev.add_argument("--ref_model", help="Reference model for KL(policy || reference).")
    ev.add_argument("--baseline_model", help="Baseline model whose samples the win rate is measured against.")
    ev.add_argument("--pairs", help="Held-out preference pairs (any format training reads, conversational too): with "
                                    "a scoring judge, report its pair accuracy.")
    ev.add_argument("--max_new_tokens", type=int, default=48, help="Longest response sampled per prompt.")
    ev.add_argument("--temperature", type=float, default=1.0,
                    help="Sampling temperature (KL is exact only at 1: the samples must come from the policy).")
    ev.add_argument("--top_k", type=int, default=0, help="Sample from the top k tokens only (0: all).")
    ev.add_argument("--top_p", type=float, default=1.0, help="Nucleus sampling threshold (1: off).")
    ev.add_argument("--seed", type=int, default=0, help="Sampling seed (the baseline samples with seed + 1).")
    ev.add_argument("--batch_size", type=int, default=16, help="Prompts per generation and scoring batch.")
    ev.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                    help="Sampling precision: auto (bf16 where the GPU or CPU has fast bf16 products, else fp32), "
                         "fp32, bf16 or fp16 (GPU).")
    ev.add_argument("--independent", help="A second scorer (reward_model:PATH or function:module:function) that did "
                                          "not train the model: its mean score, and the reward-hacking monitor's gap "
                                          "between it and the judge (needs --baseline_model).")
    ev.add_argument("--monitor", nargs="*", default=[], metavar="NAME=NUMBER",
                    help="Reward-hacking monitor thresholds (preftune/monitors.py: min_ended, max_length_ratio, ...); "
                         "the baseline model's samples are the reference for ratios and drops.")
    ev.add_argument("--output_dir", required=True, help="Writes eval.json, samples.jsonl and metrics.jsonl (the "
                                                        "monitors) here.")


def report_arguments(rep) -> None:
    rep.add_argument("runs", nargs="+", help="Run directories (metrics.jsonl, summary.json and/or eval.json).")
    rep.add_argument("--output", default="report.html", help="HTML file to write.")
    rep.add_argument("--title", default="preftune report", help="Title of the page.")


def _prompts(path: str, tokenizer) -> list:
    """The 'prompt' column: strings, or lists of chat messages (checked by rendering them with the chat template)."""
    from ..data import load_records
    from ..data.messages import prompt_text
    from ..data.rows import InvalidRow

    records = load_records(path)
    for row, number in zip(records.rows, records.row_numbers):
        try:
            prompt_text(tokenizer, row.get("prompt"))
        except InvalidRow as invalid:
            raise invalid.problem(records.name, number).error from None
    return [row["prompt"] for row in records.rows]


def _pairs(path: str) -> tuple[list, list[str], list[str]]:
    """Held-out pairs validated as training reads them: prompts as given, responses as plain text."""
    from ..data import load_records
    from ..data.messages import reply_plain_text
    from ..data.preference import validate_rows

    rows, problems = validate_rows(load_records(path))
    if problems:
        raise problems[0].error
    return ([r.prompt for r in rows], [reply_plain_text(r.chosen) for r in rows],
            [reply_plain_text(r.rejected) for r in rows])


def run_eval(args) -> int:
    from ..evaluate.sampling import evaluate_policy, pair_accuracy, sample_responses
    from ..generate import SamplingSettings
    from ..models import load_any_causal_lm, load_tokenizer
    from ..scoring import make_scorer
    from ..scoring.judges import is_pointwise, make_judge

    tokenizer = load_tokenizer(args.model)
    prompts = _prompts(args.prompts, tokenizer)
    judge = make_judge(args.judge, judge_model=args.judge_model) if args.judge else None
    model = load_any_causal_lm(args.model)
    settings = SamplingSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p)
    from ..monitors import parse_thresholds

    limits = parse_thresholds(args.monitor, "--monitor")
    independent = make_scorer(args.independent, option="--independent") if args.independent else None
    baseline, base_samples = None, None
    if args.baseline_model:
        base_model = load_any_causal_lm(args.baseline_model)
        base_samples = sample_responses(base_model, load_tokenizer(args.baseline_model), prompts, settings,
                                        seed=args.seed + 1, batch_size=args.batch_size, precision=args.precision)
        baseline = base_samples.responses
    ref = load_any_causal_lm(args.ref_model) if args.ref_model else None
    result = evaluate_policy(model, tokenizer, prompts, settings, judge=judge, ref_model=ref,
                             baseline_responses=baseline,
                             seed=args.seed, batch_size=args.batch_size, precision=args.precision)
    metrics = dict(result.metrics)
    if args.pairs:
        if judge is None or not is_pointwise(judge):
            raise DataError(args.pairs, "pair accuracy needs a scoring judge (reward_model: or function:)")
        metrics.update(pair_accuracy(judge, *_pairs(args.pairs)))
    if args.temperature != 1.0 and "kl" in metrics:
        metrics["kl_note"] = "samples drawn at temperature != 1: KL is approximate"
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    watched = watch(result, base_samples, judge, independent, limits)
    (output / "metrics.jsonl").write_text(json.dumps(watched.pop("monitor_metrics")) + "\n")
    (output / "eval.json").write_text(json.dumps({**metrics, **watched}, indent=2))
    (output / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in result.sample_rows()))
    table = Table(title=f"evaluation of {args.model} on {len(prompts)} prompts")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    if independent is not None:
        table.add_row("independent score", f"{watched['monitor']['independent_mean']:.4f}")
    out.print(table)
    out.print(f"written: {output / 'eval.json'}, {output / 'samples.jsonl'}")
    return 0


def watch(result, base_samples, judge, independent, limits) -> dict:
    """The reward-hacking monitors over the evaluated samples, against the baseline model's when there are any."""
    from ..evaluate.monitors import Monitor, flat_metrics, measure_samples
    from ..scoring.judges import is_pointwise

    prompts = result.samples.prompts

    def scores(scorer, samples):
        return scorer.score(prompts, samples.responses) if scorer is not None and is_pointwise(scorer) else None

    current = measure_samples(result.samples, kls=result.kls, judge=result.scores,
                              independent=scores(independent, result.samples))
    base = None
    if base_samples is not None:
        base = measure_samples(base_samples, judge=scores(judge, base_samples),
                               independent=scores(independent, base_samples))
    alarms = Monitor(limits, warn=lambda text: out.print(f"[bold yellow]{text}")).check(current, base or {}, "eval")
    return {"monitor": current, "monitor_baseline": base, "alarms": alarms,
            "monitor_metrics": flat_metrics(current, alarms)}


def run_report(args) -> int:
    from ..evaluate.report import write_report

    path = write_report(args.runs, args.output, title=args.title)
    out.print(f"report written to {path}")
    return 0
