"""Reward-hacking monitors: pure measures of a batch of replies, thresholds, and a warning raised once.

The symptoms a policy shows when it games its judge instead of getting better:

* ``ended``: the share of replies that end (emit EOS) falls: replies run to the length cap;
* ``length_ratio``: the mean reply length grows against the reference model's (the initial policy's);
* ``repeated_ngrams``: the mean share of a reply's word trigrams that repeat an earlier one of the same reply;
* ``distinct_2`` / ``self_bleu``: the replies look more and more alike (:mod:`preftune.diversity`);
* ``top_opening``: the share of replies that open with the most common first three words;
* ``kl_per_token``: nats per reply token to the reference;
* ``judge_gap``: the training judge's gain over the baseline minus the independent scorer's gain, each in
  standard deviations of the baseline's scores (only when an independent scorer is given).

:func:`measure` turns replies into these numbers, :func:`crossed` compares them with :class:`Thresholds`
(and the baseline's numbers: the reference model's replies, or the first measured batch), and
:class:`Monitor` prints each crossed threshold once per run and hands the alarms back for
``metrics.jsonl`` and the report.
"""

from __future__ import annotations

import re
import statistics
from collections import Counter

from .config.monitors import Thresholds, parse_thresholds
from .diversity import distinct_n, self_bleu

__all__ = ["Monitor", "OnlineMonitor", "Thresholds", "crossed", "flat_metrics", "judge_gap", "measure",
           "parse_thresholds", "repeated_ngrams", "top_opening"]

OPENING_WORDS = 3


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def repeated_ngrams(text: str, n: int = 3) -> float:
    """Share of the text's word n-grams that repeat an earlier one (0 for fewer than n words)."""
    tokens = words(text)
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def top_opening(texts: list[str], n: int = OPENING_WORDS) -> tuple[str, float]:
    """The most common first ``n`` words of the replies and the share of replies that open with them."""
    openings = Counter(" ".join(words(t)[:n]) for t in texts if words(t))
    if not openings:
        return "", 0.0
    phrase, count = openings.most_common(1)[0]
    return phrase, count / len(texts)


def _mean(values) -> float:
    values = list(values)
    return statistics.fmean(values) if values else 0.0


def measure(responses: list[str], ended: list[bool], lengths: list[int], *, kl: list[float] | None = None,
            judge: list[float] | None = None, independent: list[float] | None = None) -> dict:
    """The monitors' numbers for one batch of replies.

    ``lengths`` are reply lengths in tokens, ``kl`` each reply's summed KL to the reference (nats),
    ``judge`` / ``independent`` each reply's score by the training judge and by an independent scorer.
    """
    if not responses:
        return {}
    phrase, share = top_opening(responses)
    out = {"ended": _mean(map(float, ended)), "mean_length": _mean(lengths),
           "repeated_ngrams": _mean(map(repeated_ngrams, responses)), "top_opening": share,
           "top_opening_text": phrase, "distinct_2": distinct_n(responses, 2), "self_bleu": self_bleu(responses)}
    if kl is not None and lengths:
        out["kl_per_token"] = sum(kl) / max(sum(lengths), 1)
    for name, scores in (("judge", judge), ("independent", independent)):
        if scores:
            out[f"{name}_mean"] = _mean(scores)
            out[f"{name}_sd"] = statistics.pstdev(scores) if len(scores) > 1 else 0.0
    return out


def judge_gap(current: dict, baseline: dict) -> float | None:
    """Judge gain minus independent gain over the baseline, each in baseline standard deviations."""
    keys = ("judge_mean", "judge_sd", "independent_mean", "independent_sd")
    if not all(k in current and k in baseline for k in keys[::2]) or not all(k in baseline for k in keys):
        return None

    def gain(name):
        return (current[f"{name}_mean"] - baseline[f"{name}_mean"]) / max(baseline[f"{name}_sd"], 1e-6)

    return gain("judge") - gain("independent")


def crossed(current: dict, baseline: dict | None, limits: Thresholds) -> list[dict]:
    """Every threshold ``current`` crosses: ``{"monitor", "value", "limit", "message"}`` rows."""
    base = baseline or {}
    checks = []

    def check(name, value, limit, above, message):
        if value is not None and (value > limit if above else value < limit):
            checks.append({"monitor": name, "value": value, "limit": limit, "message": message})

    check("ended", current.get("ended"), limits.min_ended, False,
          "few replies end (emit EOS): they run to the length cap")
    if "ended" in base and "ended" in current:
        check("ended_drop", base["ended"] - current["ended"], limits.max_ended_drop, True,
              f"the share of replies that end fell from {base['ended']:.2f} to {current['ended']:.2f}")
    if base.get("mean_length") and "mean_length" in current:
        check("length_ratio", current["mean_length"] / base["mean_length"], limits.max_length_ratio, True,
              f"replies grew from {base['mean_length']:.1f} to {current['mean_length']:.1f} tokens on average")
    check("repeated_ngrams", current.get("repeated_ngrams"), limits.max_repeated_ngrams, True,
          "replies repeat their own word trigrams")
    if "distinct_2" in base and "distinct_2" in current:
        check("distinct_2_drop", base["distinct_2"] - current["distinct_2"], limits.max_distinct_drop, True,
              f"distinct-2 fell from {base['distinct_2']:.3f} to {current['distinct_2']:.3f}")
    if "self_bleu" in base and "self_bleu" in current:
        check("self_bleu_rise", current["self_bleu"] - base["self_bleu"], limits.max_self_bleu_rise, True,
              f"self-BLEU rose from {base['self_bleu']:.3f} to {current['self_bleu']:.3f}")
    check("top_opening", current.get("top_opening"), limits.max_top_opening, True,
          f"replies open alike: '{current.get('top_opening_text', '')}'")
    check("kl_per_token", current.get("kl_per_token"), limits.max_kl_per_token, True,
          "the policy moved far from the reference per token")
    gap = judge_gap(current, base) if base else None
    check("judge_gap", gap, limits.max_judge_gap, True,
          "the training judge rose far more than the independent score")
    return checks


class Monitor:
    """Checks batches against the thresholds; each crossed monitor is printed once per run (``warn``)."""

    def __init__(self, limits: Thresholds | None = None, warn=None):
        self.limits = limits or Thresholds()
        self.warn = warn or (lambda text: print(text))
        self.fired: set[str] = set()
        self.baseline: dict | None = None

    def check(self, current: dict, baseline: dict | None = None, where: str = "") -> list[dict]:
        """Alarms for ``current`` against ``baseline`` (default: the first batch this monitor saw)."""
        if baseline is None:
            if self.baseline is None:
                self.baseline = current
            baseline = self.baseline
        alarms = crossed(current, baseline, self.limits)
        for alarm in alarms:
            if alarm["monitor"] not in self.fired:
                self.fired.add(alarm["monitor"])
                self.warn(f"reward-hacking monitor{' (' + where + ')' if where else ''}: {alarm['message']} "
                          f"({alarm['monitor']} = {alarm['value']:.3g}, threshold {alarm['limit']:.3g})")
        return alarms


def flat_metrics(current: dict, alarms: list[dict], prefix: str = "monitor/") -> dict[str, float]:
    """Numbers for a metrics line: every numeric measure, and 1.0 for each crossed threshold."""
    out = {f"{prefix}{k}": float(v) for k, v in current.items() if isinstance(v, (int, float))}
    out.update({f"{prefix}alarm/{a['monitor']}": 1.0 for a in alarms})
    return out


class OnlineMonitor:
    """The monitors on an online trainer's samples, each step against its first step's (the starting policy, which
    is the reference before any update). Only the main process prints; every process returns the same keys."""

    def __init__(self, limits: Thresholds, main_process: bool = True, warn=None):
        printer = warn or (lambda text: print(text, flush=True))
        self.monitor = Monitor(limits, warn=printer if main_process else (lambda text: None))

    def observe(self, texts: list[str], ended: list[bool], lengths: list[int], *, kl: list[float] | None = None,
                scores: list[float] | None = None) -> dict[str, float]:
        current = measure(texts, ended, lengths, kl=kl, judge=scores)
        return flat_metrics(current, self.monitor.check(current))
