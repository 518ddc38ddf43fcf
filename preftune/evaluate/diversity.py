"""How varied a model's outputs are: alignment should not collapse its range (seed 003).

* distinct-n (Li et al. 2016): unique n-grams / all n-grams over the whole set of outputs;
* self-BLEU (Zhu et al. 2018): mean BLEU-4 of each output against all the others as references
  (high = the outputs repeat each other);
* mean token entropy of the model's next-token distributions along its own samples (computed
  where the model is at hand, see :mod:`preftune.evaluate.sampling`).
"""

from __future__ import annotations

import math
from collections import Counter


def _tokens(text: str) -> list[str]:
    return text.split()


def _ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: list[str], n: int) -> float:
    """Unique n-grams divided by the total number of n-grams across ``texts`` (0 when there are none)."""
    grams = [g for text in texts for g in _ngrams(_tokens(text), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def bleu(hypothesis: list[str], references: list[list[str]], max_n: int = 4) -> float:
    """Sentence BLEU with uniform weights, clipped counts, brevity penalty and add-one smoothing
    (Lin & Och 2004) for n > 1 so short texts do not collapse to 0."""
    if not hypothesis or not references:
        return 0.0
    log_precision = 0.0
    for n in range(1, max_n + 1):
        hyp = Counter(_ngrams(hypothesis, n))
        max_ref: Counter = Counter()
        for ref in references:
            for gram, count in Counter(_ngrams(ref, n)).items():
                max_ref[gram] = max(max_ref[gram], count)
        matched = sum(min(count, max_ref[gram]) for gram, count in hyp.items())
        total = sum(hyp.values())
        if n == 1:
            if matched == 0:
                return 0.0
            precision = matched / total
        else:
            precision = (matched + 1) / (total + 1)
        log_precision += math.log(precision) / max_n
    closest = min((abs(len(r) - len(hypothesis)), len(r)) for r in references)[1]
    brevity = 1.0 if len(hypothesis) > closest else math.exp(1 - closest / len(hypothesis))
    return brevity * math.exp(log_precision)


def self_bleu(texts: list[str], max_n: int = 4, max_texts: int = 200) -> float:
    """Mean BLEU of each text against the others (the first ``max_texts`` texts, for speed)."""
    sample = [_tokens(t) for t in texts[:max_texts]]
    if len(sample) < 2:
        return 0.0
    scores = [bleu(sample[i], sample[:i] + sample[i + 1:], max_n) for i in range(len(sample))]
    return sum(scores) / len(scores)


def diversity_metrics(texts: list[str]) -> dict[str, float]:
    return {"distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2), "self_bleu": self_bleu(texts)}
