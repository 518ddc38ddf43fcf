"""PPO on the shared loop: rollouts (``ppo_rollout.py``), then several epochs of clipped updates over them.

One *iteration* (the ``step`` in ``metrics.jsonl``, checkpoints and ``max_steps``) samples a rollout
batch of prompts, scores it, and takes ``num_ppo_epochs x num_mini_batches`` optimiser steps over it.
It is the loop's step function (:class:`PPOStep`): the loop owns logging, checkpoints and resume,
and each update goes through :meth:`Trainer.optimizer_step` (accumulation, clipping, the schedule).

The critic is a scalar head on a backbone's per-token hidden states. ``shared`` puts it on the
policy's own backbone (with LoRA: "1-model PPO": adapters serve policy and critic, the reference is
the policy with adapters disabled, so one copy of the weights is held). ``separate`` (the default
without LoRA) gives the critic its own copy of the policy's backbone, so value errors never move
the policy's weights; the reward model is not reused because it may have another tokenizer.

Exact resume: generation seeds and minibatch orders are functions of (seed, iteration, process), and
the KL coefficient and score statistics travel in the checkpoint.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from ..config import PPOConfig
from ..data.collate import collate_completions
from ..engines import online_engine
from ..errors import ConfigError
from ..losses.ppo import adaptive_kl_coef, policy_loss, value_loss
from ..modality import FLAT, TEXT, CompletionLogprobs
from ..models import base_model, enable_checkpointing, load_causal_lm, prepare_policy
from ..runtime.loop import Trainer
from ..runtime.records import METRICS, read_records
from ..runtime.reference import make_reference
from ..runtime.run import RunResult, finish_run, save_final_model
from ..runtime.seeds import mix_seed
from ..wrappers import disable_dropout
from .online import OnlineStep, Sampled, minibatch_updates, pad_rows, start_online_run
from .ppo_rollout import RolloutWorker, RunningMoments, Sample, reward_scorer


class PolicyValue(nn.Module):
    """The module the loop trains: the policy's log-prob module (:class:`~preftune.modality.CompletionLogprobs`) and
    a value head on the policy's own final hidden states (computed once, for both) or on a separate critic's."""

    def __init__(self, policy: nn.Module, value_head: nn.Linear, critic: nn.Module | None = None,
                 chunk_size: int = 1024, temperature: float = 1.0):
        super().__init__()
        self.logprobs = CompletionLogprobs(policy, TEXT, chunk_size, temperature)
        self.value_head = value_head
        self.critic = critic          # a separate backbone, or None to share the policy's

    @property
    def policy(self) -> nn.Module:
        return self.logprobs.model

    def forward(self, batch: dict, with_entropy: bool = False):
        """Flat ``[N]`` log-probs, values and (with ``with_entropy``, else None) entropies of the completion tokens,
        row-major."""
        out = self.logprobs(batch, FLAT, with_entropy=with_entropy, with_hidden=self.critic is None)
        hidden = out.hidden
        if self.critic is not None:
            states = self.critic(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            hidden = states[0] if isinstance(states, tuple) else states.last_hidden_state
        target = batch["completion_mask"][:, 1:].to(torch.bool)
        values = self.value_head(hidden[:, :-1][target]).squeeze(-1).float()
        return out.values, values, out.entropy


class PPOTask:
    """A micro-batch of rollout samples -> clipped policy loss + vf_coef x clipped value loss."""

    def __init__(self, cfg: PPOConfig, pad_token_id: int):
        self.cfg = cfg
        self.pad_token_id = pad_token_id

    def collate(self, samples: list[Sample]) -> dict[str, torch.Tensor]:
        batch = collate_completions([s.prompt_ids for s in samples], [s.response_ids for s in samples],
                                    self.pad_token_id)
        for name in ("old_logps", "old_values", "advantages", "returns"):
            batch[name], batch["response_mask"] = pad_rows([getattr(s, name) for s in samples])
        return batch

    def loss(self, model, batch):
        logps_flat, values_flat, _ = model(batch)
        mask = batch["response_mask"]
        logps = torch.zeros_like(batch["old_logps"]).masked_scatter(mask, logps_flat)
        values = torch.zeros_like(batch["old_values"]).masked_scatter(mask, values_flat)
        pg = policy_loss(logps, batch["old_logps"], batch["advantages"], mask, self.cfg.cliprange)
        vf, vf_clipfrac = value_loss(values, batch["old_values"], batch["returns"], mask, self.cfg.cliprange_value)
        loss = pg.loss + self.cfg.vf_coef * vf
        return loss, {"loss": loss.detach(), "loss/policy": pg.loss.detach(), "loss/value": vf.detach(),
                      "policy/clipfrac": pg.clipfrac, "policy/approxkl": pg.approxkl, "val/clipfrac": vf_clipfrac}

    def eval_metrics(self, model, batch):
        return self.loss(model, batch)[1]


def train_ppo(cfg: PPOConfig, *, model=None, tokenizer=None, ref_model=None, reward=None) -> RunResult:
    """Fine-tune a policy with PPO. ``model``/``tokenizer``/``ref_model`` may be objects; ``reward`` a
    callable ``(prompts, responses) -> scores`` used instead of ``cfg.reward_model_path``/``reward_function``."""
    cfg.validate(require_model=model is None, require_reward=reward is None)
    start = start_online_run(cfg, tokenizer, "PPO responses", TEXT)   # text prompts: a row with images is refused
    ctx, tokenizer, prompts = start.ctx, start.tokenizer, start.prompts
    acc = ctx.accelerator
    reward = reward_scorer(cfg, acc.device, reward)

    policy = model if model is not None else load_causal_lm(cfg.model_name_or_path, settings=cfg)
    shared = cfg.value_model == "shared" or (cfg.value_model == "auto" and cfg.lora)
    critic = None if shared else _critic_backbone(policy, cfg)
    policy = prepare_policy(policy, cfg)
    disable_dropout(policy, keep_lora_dropout=False)
    reference = make_reference(cfg, ctx, policy, ref_model=ref_model)
    value_head = nn.Linear(_hidden_size(policy), 1)
    nn.init.zeros_(value_head.weight)
    nn.init.zeros_(value_head.bias)
    module = PolicyValue(policy, value_head, critic, cfg.logprob_chunk_size, cfg.temperature)

    local_batch = cfg.per_device_batch_size * cfg.gradient_accumulation_steps * cfg.num_mini_batches
    global_batch = local_batch * acc.num_processes
    if len(prompts) < global_batch:
        raise ConfigError(f"{len(prompts)} prompts are fewer than one rollout batch of {global_batch} "
                          "(per_device_batch_size x processes x gradient_accumulation_steps x num_mini_batches)")
    worker = RolloutWorker(cfg=cfg, accelerator=acc, policy_value=module, reward=reward, tokenizer=tokenizer,
                           reference=reference, engine=online_engine(cfg, policy, tokenizer, ctx.run_dir))
    trainer = Trainer.from_run(ctx, model=module, task=PPOTask(cfg, tokenizer.pad_token_id), train_examples=prompts,
                               unit="samples", step=PPOStep(cfg, worker, local_batch), examples_per_step=global_batch,
                               updates_per_step=cfg.num_ppo_epochs * cfg.num_mini_batches)
    result = trainer.train()
    model_dir = save_final_model(acc, trainer.unwrapped().policy, tokenizer, ctx.run_dir / "model", cfg.merge_lora)
    return finish_run(ctx, model_dir, result)


class PPOStep(OnlineStep):
    """One PPO iteration (:class:`~.online.OnlineStep`): a rollout batch of prompts, then
    ``num_ppo_epochs x num_mini_batches`` optimiser updates over it. Its state is the KL coefficient
    (adaptive) and the running score statistics; the RNG, the weights (the critic's included) and
    the prompt order (a function of the step) are the loop's."""

    gauges = ("objective/kl_coef",)

    def __init__(self, cfg: PPOConfig, worker: RolloutWorker, local_batch: int):
        super().__init__(cfg)
        self.worker = worker
        self.local_batch = local_batch       # prompts per process and iteration
        self.load_state_dict({})

    def state_dict(self) -> dict:
        return {"kl_coef": self.kl_coef, "score_moments": self.moments.__dict__.copy()}

    def load_state_dict(self, state: dict) -> None:
        self.kl_coef = float(state.get("kl_coef", self.cfg.kl_coef))
        self.moments = RunningMoments(**state.get("score_moments", {}))

    def sample(self, trainer: Trainer, step: int) -> Sampled:
        seed = mix_seed(self.cfg.seed, step * 7_919 + trainer.rank * 104_729)   # the iteration's rollout seed
        rollout = self.worker.collect(trainer.step_examples(step, self.local_batch), seed, self.kl_coef, self.moments)
        return Sampled(rollout.samples, rollout.stats, rollout.examples, self.local_batch * trainer.world,
                       rollout.replies)

    def after_update(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> dict[str, float]:
        """The KL coefficient this iteration used; then, adaptive, the next one."""
        used, cfg = self.kl_coef, self.cfg
        if cfg.adaptive_kl:
            self.kl_coef = adaptive_kl_coef(used, metrics["objective/kl"], cfg.target_kl,
                                            self.local_batch * trainer.world, cfg.kl_horizon)
        return {"objective/kl_coef": used}

    def update(self, trainer: Trainer, samples: list[Sample], step: int) -> tuple[dict[str, list], int]:
        """``num_ppo_epochs`` shuffled passes over the rollout, one optimiser step per minibatch."""
        cfg = self.cfg
        return minibatch_updates(trainer, samples, epochs=cfg.num_ppo_epochs, micro=cfg.per_device_batch_size,
                                 per_update=cfg.per_device_batch_size * cfg.gradient_accumulation_steps,
                                 seed=cfg.seed, step=step)


def _critic_backbone(policy, cfg) -> nn.Module:
    """A trainable copy of the policy's backbone (without its vocabulary head) for a separate critic."""
    base = base_model(policy)
    backbone = copy.deepcopy(getattr(base, base.base_model_prefix))
    if cfg.gradient_checkpointing:
        enable_checkpointing(backbone)
    disable_dropout(backbone, keep_lora_dropout=False)
    return backbone.requires_grad_(True)


def _hidden_size(policy) -> int:
    base = base_model(policy)
    head = base.get_output_embeddings()
    return getattr(head, "in_features", None) or base.config.get_text_config().hidden_size


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The per-iteration records of a run's ``metrics.jsonl``."""
    return read_records(Path(run_dir) / METRICS)
