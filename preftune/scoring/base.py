"""The scoring interface: ``score(prompts, responses) -> one finite float per response``.

Every caller that turns generations into numbers goes through a :class:`Scorer`: PPO rewards, the
eval judges, ``preftune score`` and the annotation queue's reward-model ordering. A prompt is a
string or a list of chat messages; a response is a string. :class:`CheckedScorer` applies the one
set of checks every kind shares (equal batch sizes, exactly one score per response, finite numbers),
so a broken reward function stops the run with an error naming it instead of training on NaN.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

from ..errors import ConfigError, PreftuneError
from ..loading import load_callable


@runtime_checkable
class Scorer(Protocol):
    """Anything that gives each (prompt, response) a number; higher is better."""

    name: str

    def score(self, prompts: list, responses: list[str]) -> list[float]: ...


def check_batch(name: str, prompts: list, responses: list) -> None:
    """One prompt per response, and every response a string."""
    if len(prompts) != len(responses):
        raise PreftuneError(f"scorer '{name}' was given {len(prompts)} prompts for {len(responses)} responses")
    for index, response in enumerate(responses):
        if not isinstance(response, str):
            raise PreftuneError(f"scorer '{name}': response {index} is {type(response).__name__}, not a string")


def check_scores(name: str, values, expected: int) -> list[float]:
    """``values`` (a list or tensor) as ``expected`` finite floats; else a PreftuneError naming the scorer."""
    if hasattr(values, "detach"):  # a tensor
        values = values.detach().float().reshape(-1).tolist()
    try:
        scores = [float(v) for v in values]
    except (TypeError, ValueError):
        raise PreftuneError(f"scorer '{name}' must return one number per response, "
                            f"got {type(values).__name__}") from None
    if len(scores) != expected:
        raise PreftuneError(f"scorer '{name}' returned {len(scores)} scores for {expected} responses")
    for index, value in enumerate(scores):
        if not math.isfinite(value):
            raise PreftuneError(f"scorer '{name}' returned a score that is not a finite number: {value} "
                                f"for response {index}")
    return scores


def check_batch_size(name: str, batch_size: int) -> int:
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ConfigError(f"scorer '{name}': batch_size must be a positive integer, got {batch_size!r}")
    return batch_size


class CheckedScorer:
    """Base of every kind: :meth:`score` checks the batch and the scores around :meth:`raw_scores`."""

    name = "scorer"

    def raw_scores(self, prompts: list, responses: list[str]):
        raise NotImplementedError

    def score(self, prompts: list, responses: list[str]) -> list[float]:
        prompts, responses = list(prompts), list(responses)
        check_batch(self.name, prompts, responses)
        if not responses:
            return []
        return check_scores(self.name, self.raw_scores(prompts, responses), len(responses))

    def __call__(self, prompts: list, responses: list[str]) -> list[float]:
        return self.score(prompts, responses)


class FunctionScorer(CheckedScorer):
    """A Python function ``fn(prompts, responses) -> scores``, or its ``module:function`` name.

    ``option`` names the setting the function came from, for load errors ("--judge", "reward_function").
    """

    def __init__(self, fn, option: str = "function", name: str | None = None):
        if isinstance(fn, str):
            name, fn = name or fn, load_callable(fn, option)
        self.fn = fn
        self.name = name or getattr(fn, "__name__", None) or type(fn).__name__

    def raw_scores(self, prompts, responses):
        return self.fn(prompts, responses)


def as_scorer(obj, option: str = "scorer") -> CheckedScorer:
    """A checked scorer from a scorer, an object with ``score``, a callable or a ``module:function`` name."""
    if isinstance(obj, CheckedScorer):
        return obj
    if isinstance(obj, Scorer):
        return FunctionScorer(obj.score, name=obj.name)
    if isinstance(obj, str) or callable(obj):
        return FunctionScorer(obj, option)
    raise ConfigError(f"{option} must be a function (prompts, responses) -> scores, got {type(obj).__name__}")
