"""Judges: who decides which of two responses is better, and the win rate they give.

A :data:`Judge` is one of the two kinds of :mod:`preftune.scoring`:

* a pointwise :class:`~preftune.scoring.base.Scorer` (a reward model, a Python function) gives each response a
  number; one response beats another when its score is higher;
* a :class:`PairwiseJudge` (an LLM judge, :class:`preftune.scoring.llm.LLMJudge`) compares two responses
  directly and gives the probability that the first is better.

Trainers, ``iterate`` and ``eval`` ask through :func:`compare` and :func:`is_pointwise`, never by the
judge's attributes.
"""

from __future__ import annotations

from typing import Protocol, Union, runtime_checkable

from ..errors import ConfigError
from .base import Scorer, as_scorer
from .specs import make_scorer


@runtime_checkable
class PairwiseJudge(Protocol):
    """Anything that compares two responses to one prompt: per prompt, P(first is better), ties one half."""

    def compare(self, prompts: list, first: list[str], second: list[str]) -> list[float]: ...


Judge = Union[Scorer, PairwiseJudge]


def make_judge(spec: str, *, judge_model: str = "judge", device=None) -> Judge:
    """``reward_model:PATH``, ``function:module:function`` or ``llm:BASE_URL`` (OpenAI-compatible)."""
    return make_scorer(spec, option="--judge", judge_model=judge_model, device=device)


def as_judge(obj, option: str = "judge") -> Judge:
    """A pairwise judge as it is; anything else as a checked scorer (a scorer, a callable, a function name)."""
    if isinstance(obj, PairwiseJudge) and not isinstance(obj, Scorer):
        return obj
    return as_scorer(obj, option)


def is_pointwise(judge: Judge) -> bool:
    """True for judges that give each response a number (a scorer), False for pairwise-only judges."""
    if isinstance(judge, Scorer):
        return True
    if isinstance(judge, PairwiseJudge):
        return False
    raise ConfigError(f"a judge must score responses or compare two of them, got {type(judge).__name__}")


def compare(judge: Judge, prompts: list, first: list[str], second: list[str]) -> list[float]:
    """Per prompt, the probability that ``first`` beats ``second`` (ties one half)."""
    if not is_pointwise(judge):
        return judge.compare(prompts, first, second)
    a, b = judge.score(prompts, first), judge.score(prompts, second)
    return [1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)]


def win_rate(judge: Judge, prompts: list, candidate: list[str], baseline: list[str]) -> float:
    """Fraction of prompts where ``candidate`` beats ``baseline`` (ties one half)."""
    verdicts = compare(judge, prompts, candidate, baseline)
    return sum(verdicts) / len(verdicts) if verdicts else 0.0
