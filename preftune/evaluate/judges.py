"""Judges: who decides which response is better, and the win rate they give.

A judge comes from :mod:`preftune.scoring` (``--judge`` is a scorer spec):

* a scorer (a reward model, or any Python ``module:function(prompts, responses) -> scores``) gives
  each response a number; one response beats another when its score is higher;
* an LLM judge (:class:`preftune.scoring.llm.LLMJudge`) compares two responses directly, asking
  both orders to cancel its position bias.
"""

from __future__ import annotations

from ..scoring import Scorer, make_scorer


def make_judge(spec: str, *, judge_model: str = "judge", device=None):
    """``reward_model:PATH``, ``function:module:function`` or ``llm:BASE_URL`` (OpenAI-compatible)."""
    return make_scorer(spec, option="--judge", judge_model=judge_model, device=device)


def is_scoring(judge) -> bool:
    """True for judges that give each response a number (not only pairwise verdicts)."""
    return isinstance(judge, Scorer)


def compare(judge, prompts: list, first: list[str], second: list[str]) -> list[float]:
    """Per prompt, the probability that ``first`` beats ``second`` (ties one half)."""
    if not is_scoring(judge):
        return judge.compare(prompts, first, second)
    a, b = judge.score(prompts, first), judge.score(prompts, second)
    return [1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)]


def win_rate(judge, prompts: list, candidate: list[str], baseline: list[str]) -> float:
    """Fraction of prompts where ``candidate`` beats ``baseline`` (ties one half)."""
    verdicts = compare(judge, prompts, candidate, baseline)
    return sum(verdicts) / len(verdicts) if verdicts else 0.0
