"""GRPO and RLOO on the shared loop: a group of completions per prompt, a baseline from the group, no critic.

One *iteration* (the ``step`` in ``metrics.jsonl``, checkpoints and ``max_steps``) is the loop's step
function (:class:`GRPOStep`): sample ``num_generations`` completions for each of its prompts and
score them with every reward function (:mod:`.groups`), turn the weighted total into advantages (GRPO: group-centred
and scaled; RLOO: leave-one-out with the KL folded into the reward), then take ``num_iterations x
updates_per_generation`` optimiser updates over the completions with the clipped loss. Every formula is
in :mod:`preftune.losses.grpo`; this module only moves data.

Forwards are skipped when they cannot matter: the sampling policy's log-probs only when the updates
go off-policy (``num_iterations > 1``, several minibatches, or RLOO's KL), the reference only when
``beta > 0`` (otherwise no reference is even loaded). Exact resume: generation seeds, resampling
prompts and minibatch orders are functions of (seed, iteration, attempt, prompt or process).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import GRPOConfig
from ..engines import online_engine
from ..errors import ConfigError
from ..losses.grpo import grpo_loss
from ..modality import FLAT, TEXT, CompletionLogprobs, Modality
from ..runtime.loop import Trainer
from ..runtime.reference import make_reference, sync_reference
from ..runtime.run import RunResult, finish_run, save_final_model
from ..wrappers import disable_dropout
from .groups import Completion, GroupSampler, reward_scorers
from .online import OnlineStep, Sampled, minibatch_updates, pad_rows, start_online_run


class GRPOTask:
    """A micro-batch of completions -> the clipped GRPO loss (:func:`preftune.losses.grpo.grpo_loss`)."""

    def __init__(self, cfg: GRPOConfig, pad_token_id: int, modality: Modality = TEXT):
        self.cfg = cfg
        self.pad_token_id = pad_token_id
        self.modality = modality

    def collate(self, samples: list[Completion]) -> dict[str, Tensor]:
        """Padded completions and their targets; an update's micro-batch also carries the update's token-mean
        denominator (``loss_tokens``, :class:`~.online.MicroBatch`); without one the loss counts its own."""
        batch = self.modality.collate_completions([s.prompt for s in samples], [s.response_ids for s in samples],
                                                  self.pad_token_id)
        lengths = torch.tensor([len(s.response_ids) for s in samples])
        batch["response_mask"] = torch.arange(int(lengths.max()))[None, :] < lengths[:, None]
        if isinstance(samples[0].advantage, Tensor):   # per token (REINFORCE++)
            batch["advantages"] = pad_rows([s.advantage for s in samples])[0]
        else:
            batch["advantages"] = torch.tensor([s.advantage for s in samples], dtype=torch.float32)
        batch["truncated"] = torch.tensor([s.truncated for s in samples])
        for name in ("old_logps", "ref_logps"):
            if getattr(samples[0], name) is not None:
                batch[name] = pad_rows([getattr(s, name) for s in samples])[0]
        if getattr(samples, "loss_tokens", None) is not None:
            batch["loss_tokens"] = torch.tensor(float(samples.loss_tokens))
        return batch

    def loss(self, model, batch):
        cfg = self.cfg
        logps_flat, entropy = model(batch, FLAT, with_entropy=True)[:2]
        mask = batch["response_mask"]
        logps = torch.zeros(mask.shape, dtype=logps_flat.dtype, device=mask.device).masked_scatter(mask, logps_flat)
        entropies = torch.zeros_like(logps).masked_scatter(mask, entropy.to(logps.dtype))
        out = grpo_loss(logps, batch["advantages"], mask, old_logps=batch.get("old_logps"),
                        ref_logps=batch.get("ref_logps") if cfg.advantage == "grpo" else None,   # RLOO: in the reward
                        beta=cfg.beta if cfg.advantage == "grpo" else 0.0,
                        epsilon_low=cfg.epsilon, epsilon_high=cfg.epsilon_high, aggregation=cfg.aggregation,
                        max_completion_length=cfg.max_completion_length,
                        truncated=batch["truncated"] if cfg.eos_mode() == "drop" else None,
                        num_tokens=float(batch["loss_tokens"]) if "loss_tokens" in batch and
                        cfg.aggregation == "token_mean" else None,
                        entropy=entropies, **cfg.policy_options())
        return out.loss, {"loss": out.loss.detach(), "entropy": entropy.detach().mean(), **out.metrics()}

    def eval_metrics(self, model, batch):
        return self.loss(model, batch)[1]

    def loss_tokens(self, samples: list[Completion]) -> int:
        """Completion tokens that enter the loss (truncated completions out when they are masked)."""
        return sum(len(s.response_ids) for s in samples if not (self.cfg.eos_mode() == "drop" and s.truncated))


def train_grpo(cfg: GRPOConfig, *, model=None, tokenizer=None, ref_model=None, reward_funcs=None) -> RunResult:
    """Fine-tune a policy with GRPO (or RLOO: ``cfg.advantage == "rloo"``). ``model``/``tokenizer``/``ref_model``
    may be objects (prompts with images: a vision-language model and its processor); ``reward_funcs`` a list of
    callables ``(prompts, completions) -> scores`` (or scorers) used instead of ``cfg.reward_funcs``."""
    cfg.validate(require_model=model is None, require_reward=not reward_funcs)
    start = start_online_run(cfg, tokenizer, "completions")
    ctx, modality, tokenizer, prompts = start.ctx, start.modality, start.tokenizer, start.prompts
    acc = ctx.accelerator
    scorers = reward_scorers(cfg, acc.device, reward_funcs)

    policy = modality.prepare_policy(model if model is not None else
                                     modality.load_model(cfg.model_name_or_path, settings=cfg), cfg)
    disable_dropout(policy, keep_lora_dropout=False)
    reference = make_reference(cfg, ctx, policy, ref_model=ref_model, needed=cfg.beta > 0, modality=modality)
    module = CompletionLogprobs(policy, modality, cfg.logprob_chunk_size, cfg.temperature)

    per_update = cfg.per_device_batch_size * cfg.gradient_accumulation_steps
    updates = cfg.updates_per_generation(acc.num_processes)
    local_prompts = per_update * updates // cfg.num_generations
    if len(prompts) < local_prompts * acc.num_processes:
        raise ConfigError(f"{len(prompts)} prompts are fewer than one rollout batch of "
                          f"{local_prompts * acc.num_processes} (per_device_batch_size x processes x "
                          "steps_per_generation / num_generations)")
    task = GRPOTask(cfg, tokenizer.pad_token_id, modality)
    sampler = GroupSampler(cfg, acc, module, scorers, tokenizer, reference,
                           online_engine(cfg, policy, tokenizer, ctx.run_dir))
    trainer = Trainer.from_run(ctx, model=module, task=task, train_examples=prompts, unit="samples",
                               step=GRPOStep(cfg, sampler, task, local_prompts),
                               examples_per_step=local_prompts * acc.num_processes,
                               updates_per_step=cfg.num_iterations * updates)
    result = trainer.train()
    model_dir = save_final_model(acc, trainer.unwrapped().model, start.processor, ctx.run_dir / "model",
                                 cfg.merge_lora)
    return finish_run(ctx, model_dir, result)


class GRPOStep(OnlineStep):
    """One GRPO/RLOO iteration (:class:`~.online.OnlineStep`): sample and score the groups, then
    ``num_iterations`` passes of ``updates_per_generation`` optimiser updates over the completions.
    Its only state is a synced reference's weights (``sync_ref_model``: :meth:`tensors`); the RNG, the
    trainable weights and the prompt order are the loop's."""

    def __init__(self, cfg: GRPOConfig, sampler: GroupSampler, task: GRPOTask, local_prompts: int):
        super().__init__(cfg)
        self.sampler = sampler
        self.task = task
        self.local_prompts = local_prompts

    def tensors(self) -> dict[str, Tensor]:
        if not self.cfg.sync_ref_model:
            return {}
        return dict(self.sampler.reference.model.named_parameters())

    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, Tensor]) -> None:
        for name, weight in self.tensors().items():
            weight.copy_(tensors[name])

    def sync(self, trainer: Trainer, step: int) -> None:
        """``sync_ref_model``: one reference update for every ``ref_model_sync_steps``-th optimiser update of
        this iteration, made at its end (the reference is next used by the next iteration's rollout)."""
        every, done = self.cfg.ref_model_sync_steps, trainer.updates_per_step
        for _ in range((step + 1) * done // every - step * done // every):
            sync_reference(self.sampler.reference, trainer.unwrapped().model, self.cfg.ref_model_mixup_alpha)

    def sample(self, trainer: Trainer, step: int) -> Sampled:
        batch = self.sampler.collect(trainer, step, self.local_prompts)
        return Sampled(batch.completions, batch.stats, batch.examples, len(batch.completions) * trainer.world,
                       batch.replies)

    def update(self, trainer: Trainer, items: list[Completion], step: int) -> tuple[dict[str, list], int]:
        cfg = self.cfg
        return minibatch_updates(trainer, items, epochs=cfg.num_iterations,
                                 per_update=cfg.per_device_batch_size * cfg.gradient_accumulation_steps,
                                 micro=cfg.per_device_batch_size, seed=cfg.seed, step=step,
                                 loss_tokens=self.task.loss_tokens)

    def after_update(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> dict[str, float]:
        if self.cfg.sync_ref_model:
            self.sync(trainer, step)
        return {}
