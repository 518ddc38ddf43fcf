"""A scorer from its spec on the command line: ``reward_model:PATH``, ``function:module:function`` or
``llm:BASE_URL``. The reward-model and LLM kinds are imported only when asked for (torch, HTTP)."""

from __future__ import annotations

from ..errors import ConfigError
from .base import FunctionScorer

SPEC_HELP = "reward_model:PATH, function:module:function or llm:BASE_URL"


def make_scorer(spec: str, *, option: str = "--judge", judge_model: str = "judge", device=None, batch_size: int = 16):
    """A scorer from ``reward_model:PATH``, ``function:module:function`` or ``llm:BASE_URL``.

    The ``llm:`` kind is a pairwise judge (:class:`~preftune.scoring.llm.LLMJudge`): it compares two
    responses instead of scoring one.
    """
    kind, _, target = str(spec).partition(":")
    if not target:
        raise ConfigError(f"{option} '{spec}' must look like {SPEC_HELP}")
    if kind == "reward_model":
        from .reward_model import RewardModelScorer  # torch and transformers only when asked for

        return RewardModelScorer(target, device=device, batch_size=batch_size)
    if kind == "function":
        return FunctionScorer(target, option)
    if kind == "llm":
        from .llm import LLMJudge

        return LLMJudge(target, model=judge_model)
    raise ConfigError(f"{option} '{spec}': unknown kind '{kind}' (reward_model, function or llm)")
