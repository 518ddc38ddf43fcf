"""The reward-hacking monitors (:mod:`preftune.monitors`) over an evaluation's samples, and their report section.

``eval`` and ``iterate`` measure their held-out samples here, with distinct-2 and self-BLEU from
:mod:`.diversity`; the online trainers use :mod:`preftune.monitors` directly.
"""

from __future__ import annotations

import html

from ..monitors import Monitor, Thresholds, crossed, flat_metrics, measure
from .diversity import diversity_metrics

__all__ = ["Monitor", "Thresholds", "crossed", "flat_metrics", "measure", "measure_samples", "monitor_section"]

SHOWN = [("ended", "replies that end"), ("mean_length", "length (tokens)"), ("repeated_ngrams", "repeated trigrams"),
         ("distinct_2", "distinct-2"), ("self_bleu", "self-BLEU"), ("top_opening", "most common opening"),
         ("kl_per_token", "KL per token"), ("judge_mean", "judge"), ("independent_mean", "independent score")]


def measure_samples(samples, *, kls=None, judge=None, independent=None) -> dict:
    """The monitors' numbers for a :class:`~preftune.evaluate.sampling.Samples`."""
    return measure(samples.responses, samples.ended, [len(r) for r in samples.response_ids], kl=kls or None,
                   judge=judge or None, independent=independent or None, diversity=diversity_metrics)


def monitor_section(rows: list[tuple[str, dict, list[dict]]]) -> str:
    """HTML: the monitors' numbers per row (a round, a step) and every crossed threshold, or a line saying none was."""
    from .report import html_table

    used = [(k, t) for k, t in SHOWN if any(k in m for _, m, _ in rows)]
    table = html_table(["", *[t for _, t in used]],
                       [[name, *[_cell(m, k) for k, _ in used]] for name, m, _ in rows])
    alarms = [(name, a) for name, _, found in rows for a in found]
    if not alarms:
        return table + "<p>No monitor crossed its threshold.</p>"
    items = "".join(f"<li><b>{html.escape(name)}</b>: {html.escape(a['message'])} ({html.escape(a['monitor'])} = "
                    f"{a['value']:.3g}, threshold {a['limit']:.3g})</li>" for name, a in alarms)
    return table + f"<ul class='alarms'>{items}</ul>"


def _cell(measures: dict, key: str):
    value = measures.get(key, "")
    if key == "top_opening" and measures.get("top_opening_text"):
        return f"{value:.2f} ('{measures['top_opening_text']}')"
    return value


def run_alarm_section(runs) -> str:
    """HTML for ``preftune report``: per run, each monitor that crossed its threshold and the first step (or the
    evaluation) where it did; empty when no run logged the monitors."""
    from .report import html_table

    rows, watched = [], False
    for run in runs:
        seen: set[str] = set()
        for record in run.records:
            watched = watched or any(k.startswith("monitor/") for k in record)
            for key in sorted(k for k in record if k.startswith("monitor/alarm/")):
                name = key.removeprefix("monitor/alarm/")
                if name not in seen:
                    seen.add(name)
                    rows.append([run.name, record.get("step", record.get("round", "")), name,
                                 record.get(f"monitor/{_measure_of(name)}", "")])
        for alarm in run.evaluation.get("alarms", []) if isinstance(run.evaluation, dict) else []:
            watched = True
            rows.append([run.name, "eval", alarm["monitor"], alarm["value"]])
        watched = watched or "monitor" in (run.evaluation or {})
    if not watched:
        return ""
    body = (html_table(["run", "first at", "monitor", "value"], rows) if rows
            else "<p>No monitor crossed its threshold.</p>")
    return "<h2>Reward-hacking monitors</h2>" + body


def _measure_of(alarm: str) -> str:
    """The logged measure behind an alarm (``length_ratio`` is a ratio of ``mean_length``, ...)."""
    return {"ended_drop": "ended", "length_ratio": "mean_length", "distinct_2_drop": "distinct_2",
            "self_bleu_rise": "self_bleu"}.get(alarm, alarm)
