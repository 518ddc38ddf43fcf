"""Evaluate a policy from its own samples: judged reward, win rate, KL to a reference, diversity.

For each prompt the policy samples a response; then

* ``reward``: the mean judge score (reward model or Python function judges);
* ``win_rate``: how often the judge prefers the policy's response to a baseline's for the same prompt;
* ``kl``: sequence-level KL(π ‖ π_ref), the mean over the samples y ~ π of Σ_t KL(π(·|x, y<t) ‖
  π_ref(·|x, y<t)), each term computed exactly from both next-token distributions
  (:func:`~preftune.logprobs.token_kl`): never negative, unlike the sampled log-ratio
  log π(y|x) − log π_ref(y|x), and unbiased at temperature 1 (at other temperatures the samples come
  from another distribution, and the report says so);
* ``entropy``: mean next-token entropy of π along its own response tokens;
* distinct-1/2 and self-BLEU of the responses.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import torch

from ..data.collate import collate_completions
from ..diversity import diversity_metrics
from ..generate import image_forward_inputs
from ..logprobs import token_kl, token_logprobs_and_entropy
from ..scoring.judges import is_pointwise, win_rate
from ..wrappers import evaluating


@dataclass
class Samples:
    prompts: list            # strings, or lists of chat messages (rendered with the chat template)
    responses: list[str]
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    ended: list[bool]
    prompt_inputs: list[dict] | None = None   # per prompt, its image tensors (prompts with images)


@dataclass
class Evaluation:
    metrics: dict[str, float]
    samples: Samples
    scores: list[float] = field(default_factory=list)
    kls: list[float] = field(default_factory=list)     # each sample's KL to the reference (nats), when one is given

    def sample_rows(self) -> list[dict]:
        rows = []
        for i, (prompt, response) in enumerate(zip(self.samples.prompts, self.samples.responses)):
            row = {"prompt": prompt, "response": response, "ended_with_eos": self.samples.ended[i]}
            if self.scores:
                row["score"] = self.scores[i]
            rows.append(row)
        return rows


def sample_responses(model, tokenizer, prompts: list, settings, *, seed: int = 0, batch_size: int = 16,
                     engine=None, prompt_ids: list[list[int]] | None = None,
                     prompt_inputs: list[dict] | None = None, precision: str | None = None) -> Samples:
    """One response per prompt from ``engine`` (a :mod:`preftune.engines` engine; default: ``model`` itself,
    sampled under ``precision``'s autocast). ``prompt_ids`` (default: the prompts tokenised as the trainers do)
    and ``prompt_inputs`` (each prompt's image tensors) come from whoever read prompts with images."""
    from ..engines import make_engine
    from ..generate import encode_prompts

    prompt_ids = prompt_ids if prompt_ids is not None else encode_prompts(tokenizer, prompts)
    engine = engine or make_engine("transformers", model, tokenizer, batch_size=batch_size, precision=precision)
    images = {"prompt_inputs": prompt_inputs} if prompt_inputs is not None else {}
    generation = engine.generate(prompt_ids, settings, seed=seed, **images)
    responses = [tokenizer.decode(ids, skip_special_tokens=True) for ids in generation.response_ids]
    return Samples(prompts, responses, prompt_ids, [list(r) for r in generation.response_ids], list(generation.ended),
                   prompt_inputs)


@torch.no_grad()
def response_statistics(model, samples: Samples, pad_token_id: int, *, ref_model=None, batch_size: int = 16,
                        chunk_size: int = 1024) -> dict[str, list[float]]:
    """Per sample: log π(y|x), mean token entropy under π, and the KL to the reference when one is given."""
    device = next(model.parameters()).device
    out: dict[str, list[float]] = {"logp": [], "entropy": [], "kl": []}
    for start in range(0, len(samples.prompts), batch_size):
        batch = collate_completions(samples.prompt_ids[start:start + batch_size],
                                    samples.response_ids[start:start + batch_size], pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        images = {} if samples.prompt_inputs is None else \
            image_forward_inputs(model, batch["input_ids"], samples.prompt_inputs[start:start + batch_size])
        mask = batch["completion_mask"].float()
        logps, entropy = token_logprobs_and_entropy(model, batch["input_ids"], batch["attention_mask"],
                                                    batch["completion_mask"], chunk_size=chunk_size,
                                                    model_kwargs=images)
        counts = mask.sum(-1).clamp(min=1)
        out["logp"] += logps.sum(-1).tolist()
        out["entropy"] += ((entropy * mask).sum(-1) / counts).tolist()
        if ref_model is not None:
            kl = token_kl(model, ref_model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                          chunk_size=chunk_size, model_kwargs=images)
            out["kl"] += kl.sum(-1).tolist()
    return out


def evaluate_policy(model, tokenizer, prompts: list, settings, *, judge=None, ref_model=None,
                    baseline_responses: list[str] | None = None, seed: int = 0, batch_size: int = 16,
                    prompt_ids: list[list[int]] | None = None, prompt_inputs: list[dict] | None = None,
                    precision: str | None = None) -> Evaluation:
    """Sample once per prompt (under ``precision``'s autocast) and measure everything that is available (see the
    module docstring). Prompts with images: ``prompt_ids`` and ``prompt_inputs`` (each prompt's image tensors)
    as read by the caller."""
    with evaluating(model):
        samples = sample_responses(model, tokenizer, prompts, settings, seed=seed, batch_size=batch_size,
                                   prompt_ids=prompt_ids, prompt_inputs=prompt_inputs, precision=precision)
        stats = response_statistics(model, samples, tokenizer.pad_token_id, ref_model=ref_model,
                                    batch_size=batch_size)
    metrics: dict[str, float] = {
        "n": float(len(prompts)),
        "mean_length": statistics.mean(len(r) for r in samples.response_ids) if prompts else 0.0,
        "eos_rate": sum(samples.ended) / max(len(prompts), 1),
        "entropy": statistics.mean(stats["entropy"]) if stats["entropy"] else 0.0,
        **diversity_metrics(samples.responses),
    }
    if ref_model is not None:
        kls = stats["kl"]
        metrics["kl"] = statistics.mean(kls)
        metrics["kl_std_error"] = statistics.pstdev(kls) / max(len(kls), 1) ** 0.5
    scores: list[float] = []
    if judge is not None and is_pointwise(judge):
        scores = judge.score(prompts, samples.responses)
        metrics["reward"] = statistics.mean(scores)
        metrics["reward_std"] = statistics.pstdev(scores)
    if judge is not None and baseline_responses is not None:
        metrics["win_rate"] = win_rate(judge, prompts, samples.responses, baseline_responses)
    return Evaluation(metrics, samples, scores, list(stats["kl"]))


def pair_accuracy(judge, prompts: list, chosen: list[str], rejected: list[str]) -> dict[str, float]:
    """How often a scoring judge (e.g. a reward model) ranks the chosen response above the rejected one."""
    a, b = judge.score(prompts, chosen), judge.score(prompts, rejected)
    wins = [1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)]
    return {"pair_accuracy": sum(wins) / max(len(wins), 1),
            "mean_margin": statistics.mean(x - y for x, y in zip(a, b)) if wins else 0.0}
