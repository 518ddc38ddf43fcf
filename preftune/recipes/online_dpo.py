"""Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback") on the shared loop.

Each step (:class:`OnlineDPOStep`, the loop's step function) takes a batch of prompts, samples two
completions of each from the current policy through the run's generation engine
(:mod:`preftune.engines`), lets the judge pick the preferred one (a scorer's higher score, missing EOS
penalised, or a pairwise judge's verdict), and takes one optimiser update of the configured
DPO-family loss on these fresh pairs: :class:`~.dpo.DPOTask` (one concatenated forward, the loss by
name from :data:`preftune.losses.LOSSES`). The reference is live (a frozen copy, or the LoRA policy
with adapters disabled): pairs are new every step, so nothing can be precomputed.

Exact resume: sampling seeds are functions of (seed, step, prompt, completion); the prompts of a step
and the RNG are the loop's.
"""

from __future__ import annotations

import torch

from ..config.losses import needs_reference
from ..config.online_dpo import OnlineDPOConfig
from ..engines import online_engine, sample_with
from ..errors import ConfigError
from ..generate import SamplingSettings
from ..losses.reward import eos_penalized
from ..modality import TEXT, CompletionLogprobs, Modality
from ..runtime.loop import Trainer
from ..runtime.reference import make_reference
from ..runtime.run import RunResult, finish_run, save_final_model
from ..runtime.seeds import mix_seed
from ..scoring import make_scorer
from ..scoring.judges import as_judge, compare, is_pointwise
from .dpo import DPOTask
from .online import OnlineStep, Replies, Sampled, start_online_run


def train_online_dpo(cfg: OnlineDPOConfig, *, model=None, tokenizer=None, ref_model=None, judge=None) -> RunResult:
    """Fine-tune a policy with online DPO. ``model``/``tokenizer``/``ref_model`` may be objects (prompts with
    images: a vision-language model and its processor); ``judge`` a scorer, a callable ``(prompts, completions)
    -> scores`` or a pairwise judge, used instead of ``cfg.judge``."""
    cfg.validate(require_model=model is None, require_judge=judge is None)
    start = start_online_run(cfg, tokenizer, "completions")
    ctx, modality, tokenizer, prompts = start.ctx, start.modality, start.tokenizer, start.prompts
    acc = ctx.accelerator
    judge = _judge(judge, cfg, acc.device)
    policy = modality.prepare_policy(model if model is not None else
                                     modality.load_model(cfg.model_name_or_path, settings=cfg), cfg)
    reference = make_reference(cfg, ctx, policy, ref_model=ref_model, needed=needs_reference(cfg.loss_type),
                               modality=modality)
    if cfg.eos_mode() == "drop" and acc.num_processes > 1:
        raise ConfigError("online DPO with missing_eos: drop leaves each process its own number of pairs, which "
                          "several processes cannot update on together; use missing_eos: penalize")
    local_prompts = cfg.per_device_batch_size * cfg.gradient_accumulation_steps
    if len(prompts) < local_prompts * acc.num_processes:
        raise ConfigError(f"{len(prompts)} prompts are fewer than one batch of {local_prompts * acc.num_processes} "
                          "(per_device_batch_size x processes x gradient_accumulation_steps)")
    step = OnlineDPOStep(cfg, online_engine(cfg, policy, tokenizer, ctx.run_dir), judge, tokenizer, policy,
                         local_prompts, modality)
    trainer = Trainer.from_run(ctx, model=CompletionLogprobs(policy, modality, cfg.logprob_chunk_size),
                               task=DPOTask(cfg, tokenizer.pad_token_id, reference, modality=modality),
                               train_examples=prompts, unit="pairs", step=step,
                               examples_per_step=local_prompts * acc.num_processes)
    result = trainer.train()
    model_dir = save_final_model(acc, trainer.unwrapped().model, start.processor, ctx.run_dir / "model",
                                 cfg.merge_lora)
    return finish_run(ctx, model_dir, result)


def _judge(given, cfg: OnlineDPOConfig, device):
    if given is None:
        return make_scorer(cfg.judge, option="judge", device=device, batch_size=cfg.sampling_batch_size)
    return as_judge(given, "judge")


class OnlineDPOStep(OnlineStep):
    """One online DPO step (:class:`~.online.OnlineStep`): sample two completions per prompt, judge them, one
    update on the pairs."""

    gauges = ("beta",)

    def __init__(self, cfg: OnlineDPOConfig, engine, judge, tokenizer, policy, local_prompts: int,
                 modality: Modality = TEXT):
        super().__init__(cfg)
        self.engine = engine
        self.judge = judge
        self.tokenizer = tokenizer
        self.modality = modality
        self.policy = policy                  # the module the engine samples (its weights pushed each step)
        self.local_prompts = local_prompts
        self.settings = SamplingSettings(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                         top_k=cfg.top_k, top_p=cfg.top_p, do_sample=True)

    def sample(self, trainer: Trainer, step: int) -> Sampled:
        prompts = trainer.step_examples(step, self.local_prompts)
        pairs, stats, examples, replies = self.pairs(prompts, step, trainer.rank * self.local_prompts)
        return Sampled(pairs, stats, examples, len(pairs) * trainer.world, replies)

    def update(self, trainer: Trainer, items: list, step: int) -> tuple[dict[str, list], int]:
        """One optimiser update over the step's pairs, in their order."""
        micro = self.cfg.per_device_batch_size
        out = trainer.optimizer_step([items[k:k + micro] for k in range(0, len(items), micro)])
        return {k: [v] for k, v in out.metrics.items()}, out.tokens

    def after_update(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> dict[str, float]:
        return {"beta": self.cfg.beta, **kl_metrics(metrics, self.cfg)}

    def pairs(self, prompts: list, step: int, first: int) -> tuple[list, dict, list[dict], Replies]:
        """The step's pairs (the modality's: a :class:`TokenizedPair`, or a pair after a prompt with images):
        completions ``2i`` and ``2i + 1`` are prompt ``i``'s, ordered chosen first; with ``missing_eos: drop`` a
        prompt whose completions did not both end gives no pair."""
        repeated = [p for p in prompts for _ in range(2)]
        seeds = [mix_seed(self.cfg.seed, step, first + i, j) for i in range(len(prompts)) for j in range(2)]
        images = self.modality.sampling_inputs([p.encoded for p in repeated])   # None for text
        generation = sample_with(self.engine, self.policy, [p.ids for p in repeated], self.settings, row_seeds=seeds,
                                 prompt_inputs=images)
        texts = self.tokenizer.batch_decode(generation.response_ids, skip_special_tokens=True)
        first_wins, scores = self.verdicts([p.prompt for p in prompts], texts, generation.ended)
        pairs, examples, drop = [], [], self.cfg.eos_mode() == "drop"
        for i, prompt in enumerate(prompts):
            if drop and not (generation.ended[2 * i] and generation.ended[2 * i + 1]):
                continue   # an unfinished completion is never the chosen nor the rejected one
            win, lose = (2 * i, 2 * i + 1) if first_wins[i] >= 0.5 else (2 * i + 1, 2 * i)
            responses = generation.response_ids
            pairs.append(self.modality.pair(prompt.encoded, responses[win], responses[lose], prompt.row,
                                            preference_prob=float("nan")))
            row = {"prompt": prompt.text, "chosen": texts[win], "rejected": texts[lose]}
            if scores is not None:
                row.update(chosen_score=scores[win], rejected_score=scores[lose])
            examples.append(row)
        lengths = torch.tensor([len(r) for r in generation.response_ids], dtype=torch.float32)
        stats = {"val/contain_eos_token": sum(generation.ended) / len(texts),
                 "completions/mean_length": float(lengths.mean()),
                 "objective/ties": sum(v == 0.5 for v in first_wins) / len(prompts),
                 "pairs_dropped_unfinished": float(len(prompts) - len(pairs))}
        if scores is not None:
            chosen = [r["chosen_score"] for r in examples]
            rejected = [r["rejected_score"] for r in examples]
            stats["objective/scores"] = sum(scores) / len(scores)
            if chosen:
                stats["objective/scores_margin"] = sum(c - r for c, r in zip(chosen, rejected)) / len(chosen)
        replies = Replies(texts, list(generation.ended), [len(r) for r in generation.response_ids], scores=scores)
        return pairs, stats, examples, replies

    def verdicts(self, prompts: list, texts: list[str], ended: list[bool]) -> tuple[list[float], list[float] | None]:
        """Per prompt, the probability that its first completion is preferred (ties 1/2), and the scores
        (missing EOS penalised) when the judge gives scores."""
        first, second = texts[0::2], texts[1::2]
        if not is_pointwise(self.judge):
            return compare(self.judge, prompts, first, second), None
        raw = self.judge.score([p for p in prompts for _ in range(2)], texts)
        scores = eos_penalized(raw, ended, self.cfg.missing_eos_penalty).tolist()
        wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores[0::2], scores[1::2])]
        return wins, scores


def kl_metrics(metrics: dict[str, float], cfg: OnlineDPOConfig) -> dict[str, float]:
    """TRL's ``objective/kl`` (mean log π/π_ref of the sampled completions, from the implicit rewards
    β·log-ratio the loss already computed), ``non_score_reward`` (-β·KL) and ``rlhf_reward``."""
    if not needs_reference(cfg.loss_type) or "rewards/chosen" not in metrics:
        return {}
    kl = (metrics["rewards/chosen"] + metrics["rewards/rejected"]) / (2 * cfg.beta)
    out = {"objective/kl": kl, "objective/non_score_reward": -cfg.beta * kl}
    if "objective/scores" in metrics:
        out["objective/rlhf_reward"] = metrics["objective/scores"] - cfg.beta * kl
    return out
