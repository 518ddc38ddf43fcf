"""One scoring interface, ``score(prompts, responses) -> scores``, and its kinds.

* :class:`FunctionScorer` (here): a Python function ``fn(prompts, responses) -> scores``, or its name;
* :class:`preftune.scoring.reward_model.RewardModelScorer`: a reward model trained with ``preftune reward``
  (with ``load_reward_model`` and ``score_texts``; ``preftune.scoring.files.score_file`` scores a file);
* :class:`preftune.scoring.llm.LLMJudge`: a chat model over HTTP comparing two responses.

PPO rewards, the eval judges, ``preftune score`` and the annotation queue all score through here, and
every score passes the same checks (:func:`check_scores`). The reward-model and LLM kinds live in their
own modules, imported where used, so that scoring with a function needs neither torch nor HTTP.
"""

from .base import (
                   CheckedScorer,
                   FunctionScorer,
                   Scorer,
                   as_scorer,
                   check_batch,
                   check_batch_size,
                   check_scores,
)
from .specs import SPEC_HELP, make_scorer

__all__ = ["SPEC_HELP", "CheckedScorer", "FunctionScorer", "Scorer", "as_scorer", "check_batch", "check_batch_size",
           "check_scores", "make_scorer"]
