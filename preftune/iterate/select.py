"""Iterative DPO's judging and rejection sampling: scores for each prompt's k samples, then training rows.

A scorer (reward model, Python function) gives every sample a number. A pairwise judge (an LLM)
compares the samples of a prompt two by two and a sample's score is its share of wins (ties half).
Selection turns each prompt's scored samples into rows for the round's trainer:

* ``best_worst`` (rejection sampling, the default): the highest-scored sample is chosen, the lowest rejected;
* ``all_pairs``: every pair of samples, the higher-scored one chosen;
* KTO: the best sample is desirable, the worst undesirable.

A pair whose scores differ by ``min_score_gap`` or less (or whose texts are equal) is dropped and
counted, and so is one with an empty text (training rows need text). ``margin_scale`` turns the score
difference into a per-pair ``margin``; ``preference_prob_scale`` into a soft label
``preference_prob = sigmoid(scale x difference)``.

Samples that never ended (no EOS within ``max_new_tokens``) follow ``missing_eos``: ``drop`` (the
default) leaves them out before the rule picks, so a cut-off reply is never chosen nor rejected;
``penalize`` subtracts ``missing_eos_penalty`` from their scores first; ``keep`` selects them as they
are and marks the row (``chosen_ended`` / ``rejected_ended`` false), so the trainer appends no EOS.
"""

from __future__ import annotations

import math
from itertools import combinations

from ..losses.reward import eos_penalized
from ..scoring.judges import compare, is_pointwise


def judge_samples(judge, prompts: list, samples: list[list[str]]) -> list[list[float]]:
    """One score per sample: the judge's own score, or for a pairwise judge the sample's share of wins."""
    if is_pointwise(judge):
        flat_prompts = [p for p, texts in zip(prompts, samples) for _ in texts]
        flat = judge.score(flat_prompts, [t for texts in samples for t in texts])
        out, start = [], 0
        for texts in samples:
            out.append(flat[start:start + len(texts)])
            start += len(texts)
        return out
    return [round_robin(judge, prompt, texts) for prompt, texts in zip(prompts, samples)]


def round_robin(judge, prompt, texts: list[str]) -> list[float]:
    """Each text's share of wins against every other text of the prompt (a pairwise judge)."""
    pairs = list(combinations(range(len(texts)), 2))
    if not pairs:
        return [0.0] * len(texts)
    verdicts = compare(judge, [prompt] * len(pairs), [texts[i] for i, _ in pairs], [texts[j] for _, j in pairs])
    wins = [0.0] * len(texts)
    for (i, j), p in zip(pairs, verdicts):
        wins[i] += p
        wins[j] += 1.0 - p
    return [w / (len(texts) - 1) for w in wins]


def _completion(prompt, text: str):
    """A response in the prompt's format: an assistant message after a conversation, else the text."""
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def _pair_row(cfg, prompt, best: tuple, worst: tuple) -> dict:
    gap = best[1] - worst[1]
    row = {"prompt": prompt, "chosen": _completion(prompt, best[0]), "rejected": _completion(prompt, worst[0]),
           "score_chosen": best[1], "score_rejected": worst[1]}
    if not (best[2] and worst[2]):
        row.update(chosen_ended=best[2], rejected_ended=worst[2])
    if cfg.margin_scale > 0:
        row["margin"] = cfg.margin_scale * gap
    if cfg.preference_prob_scale > 0:
        row["preference_prob"] = 1.0 / (1.0 + math.exp(-cfg.preference_prob_scale * gap))
    return row


def eligible(cfg, texts: list[str], scores: list[float], ended: list[bool]) -> list[tuple[str, float, bool]]:
    """(text, score, ended) of the samples selection may use, under ``cfg``'s missing_eos rule."""
    mode = cfg.eos_mode()
    if mode == "drop":
        return [(t, s, True) for t, s, e in zip(texts, scores, ended) if e]
    if mode == "penalize":
        penalized = eos_penalized(scores, ended, cfg.missing_eos_penalty).tolist()
        return [(t, s, e) for t, s, e in zip(texts, penalized, ended)]
    return list(zip(texts, scores, ended))


def _candidates(cfg, samples: list[tuple[str, float, bool]]) -> list[tuple[tuple, tuple]]:
    """(better, worse) sample pairs of one prompt that the selection rule considers."""
    ranked = sorted(samples, key=lambda ts: -ts[1])  # stable: ties keep sampling order
    if cfg.selection == "all_pairs" and cfg.loss_type != "kto":
        return [(ranked[i], ranked[j]) for i, j in combinations(range(len(ranked)), 2)]
    return [(ranked[0], ranked[-1])]


def select_rows(cfg, prompts: list, samples: list[list[str]], scores: list[list[float]],
                ended: list[list[bool]] | None = None, carried: list[dict] | None = None) -> tuple[list[dict], dict]:
    """Training rows (pairs, or KTO examples) and counts: ``pairs_considered``, ``pairs_kept``, ``pairs_dropped``,
    ``samples_ended`` (share of samples that end) and ``samples_unfinished_dropped``. ``carried``: per prompt,
    fields every row written from it keeps (its images)."""
    rows, considered, dropped = [], 0, 0
    ended = ended if ended is not None else [[True] * len(texts) for texts in samples]
    flat = [e for flags in ended for e in flags]
    for number, (prompt, texts, values, flags) in enumerate(zip(prompts, samples, scores, ended)):
        extra = carried[number] if carried else {}
        usable = eligible(cfg, texts, values, flags)
        if not usable:
            continue
        for best, worst in _candidates(cfg, usable):
            considered += 1
            blank = not (best[0].strip() and worst[0].strip())
            if best[1] - worst[1] <= cfg.min_score_gap or best[0] == worst[0] or blank:
                dropped += 1
                continue
            if cfg.loss_type == "kto":
                rows += [{"prompt": prompt, "completion": _completion(prompt, text), "label": good, "score": score,
                          **extra} for (text, score, _), good in ((best, True), (worst, False))]
            else:
                rows.append({**_pair_row(cfg, prompt, best, worst), **extra})
    stats = {"pairs_considered": considered, "pairs_kept": considered - dropped, "pairs_dropped": dropped,
             "samples_ended": sum(flat) / len(flat) if flat else None,
             "samples_unfinished_dropped": (len(flat) - sum(flat)) if cfg.eos_mode() == "drop" else 0}
    return rows, stats
