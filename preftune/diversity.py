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
    ceilings = []
    for n in range(1, max_n + 1):
        max_ref: Counter = Counter()
        for ref in references:
            for gram, count in Counter(_ngrams(ref, n)).items():
                max_ref[gram] = max(max_ref[gram], count)
        ceilings.append(max_ref)
    return _bleu(hypothesis, [Counter(_ngrams(hypothesis, n)) for n in range(1, max_n + 1)],
                 lambda n, gram: ceilings[n - 1][gram], [len(r) for r in references])


def _bleu(hypothesis: list[str], counts: list[Counter], ceiling, reference_lengths: list[int]) -> float:
    """BLEU of a hypothesis from its n-gram ``counts`` (n = 1..max_n), ``ceiling(n, gram)`` (the most times any
    reference holds the gram) and the references' lengths."""
    log_precision, max_n = 0.0, len(counts)
    for n, hyp in enumerate(counts, start=1):
        matched = sum(min(count, ceiling(n, gram)) for gram, count in hyp.items())
        total = sum(hyp.values())
        if n == 1:
            if matched == 0:
                return 0.0
            precision = matched / total
        else:
            precision = (matched + 1) / (total + 1)
        log_precision += math.log(precision) / max_n
    closest = min((abs(length - len(hypothesis)), length) for length in reference_lengths)[1]
    brevity = 1.0 if len(hypothesis) > closest else math.exp(1 - closest / len(hypothesis))
    return brevity * math.exp(log_precision)


def self_bleu(texts: list[str], max_n: int = 4, max_texts: int = 200) -> float:
    """Mean BLEU of each text against the others (the first ``max_texts`` texts, for speed).

    Equal to calling :func:`bleu` on each text with all the others as references, in time linear in the
    texts' n-grams: for every gram the two largest counts across texts (and whose the largest is) give the
    most any *other* text holds, so no text's counts are merged once per hypothesis."""
    sample = [_tokens(t) for t in texts[:max_texts]]
    if len(sample) < 2:
        return 0.0
    counts = [[Counter(_ngrams(tokens, n)) for n in range(1, max_n + 1)] for tokens in sample]
    tops: list[dict] = [{} for _ in range(max_n)]     # gram -> (largest count, its text, second largest)
    for i, per_n in enumerate(counts):
        for top, grams in zip(tops, per_n):
            for gram, count in grams.items():
                first, owner, second = top.get(gram, (0, -1, 0))
                top[gram] = (count, i, first) if count > first else (first, owner, max(second, count))
    lengths = [len(tokens) for tokens in sample]
    scores = []
    for i, tokens in enumerate(sample):
        if not tokens:
            scores.append(0.0)
            continue

        def ceiling(n, gram, i=i):
            first, owner, second = tops[n - 1][gram]
            return second if owner == i else first

        scores.append(_bleu(tokens, counts[i], ceiling, lengths[:i] + lengths[i + 1:]))
    return sum(scores) / len(scores)


def diversity_metrics(texts: list[str]) -> dict[str, float]:
    return {"distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2), "self_bleu": self_bleu(texts)}
