"""Generation engines: one interface through which every sampler draws completions from a policy.

PPO rollouts, GRPO/RLOO groups, online DPO pairs, evaluation samples and annotation candidates all
sample through a :class:`GenerationEngine`: token-id prompts in, a :class:`~preftune.generate.Generation`
out. Two engines implement it:

* :class:`TransformersEngine` (``generation_engine: transformers``, the default): preftune's own
  batched sampler (:mod:`preftune.generate`) run on the live policy itself, so pushing weights costs
  nothing;
* :class:`~.vllm_engine.VLLMEngine` (``generation_engine: vllm``, the ``vllm`` extra): vLLM in the
  training process (its share of GPU memory set by ``vllm_gpu_memory_utilization``; asleep while the
  trainer updates), or a separate ``vllm serve`` at ``vllm_server_url``.

An engine that holds its own copy of the weights gets the policy's current ones by :meth:`sync`
(LoRA adapters merged, :func:`~.weights.merged_weights`) before each sampling phase. Samplers never
use an engine's log-probs: the trainer recomputes every sampled token's log-prob with the same
forward its updates use.
"""

from __future__ import annotations

from .base import ENGINES, GenerationEngine, make_engine, online_engine, sample_with
from .local import TransformersEngine
from .weights import merged_weights

__all__ = ["ENGINES", "GenerationEngine", "TransformersEngine", "make_engine", "merged_weights",
           "online_engine", "sample_with"]
