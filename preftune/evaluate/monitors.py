"""The reward-hacking monitors (:mod:`preftune.monitors`) over an evaluation's samples, and their report section.

``eval`` and ``iterate`` measure their held-out samples here; the online trainers use :mod:`preftune.monitors`
directly.
"""

from __future__ import annotations

import html

from ..monitors import Monitor, Thresholds, crossed, flat_metrics, measure

__all__ = ["Monitor", "Thresholds", "crossed", "flat_metrics", "measure", "measure_samples", "monitor_section"]

SHOWN = [("ended", "replies that end"), ("mean_length", "length (tokens)"), ("repeated_ngrams", "repeated trigrams"),
         ("distinct_2", "distinct-2"), ("self_bleu", "self-BLEU"), ("top_opening", "most common opening"),
         ("kl_per_token", "KL per token"), ("judge_mean", "judge"), ("independent_mean", "independent score")]


def measure_samples(samples, *, kls=None, judge=None, independent=None) -> dict:
    """The monitors' numbers for a :class:`~preftune.evaluate.sampling.Samples`."""
    return measure(samples.responses, samples.ended, [len(r) for r in samples.response_ids], kl=kls or None,
                   judge=judge or None, independent=independent or None)


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

