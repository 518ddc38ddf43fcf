"""GRPO and RLOO on the shared loop: a group of completions per prompt, a baseline from the group, no critic.

One *iteration* (the ``step`` in ``metrics.jsonl``, checkpoints and ``max_steps``) is the loop's step
function (:class:`GRPOStep`): sample ``num_generations`` completions for each of its prompts
(:mod:`preftune.generate`; the ``G`` completions of a prompt are contiguous), score them with every
reward function (:mod:`preftune.scoring`), turn the weighted total into advantages (GRPO: group-centred
and scaled; RLOO: leave-one-out with the KL folded into the reward), then take ``num_iterations x
steps_per_generation`` optimiser updates over the completions with the clipped loss. Every formula is
in :mod:`preftune.losses.grpo`; this module only moves data.

Forwards are skipped when they cannot matter: the sampling policy's log-probs only when the updates
go off-policy (``num_iterations > 1``, several minibatches, or RLOO's KL), the reference only when
``beta > 0`` (otherwise no reference is even loaded). Exact resume: generation seeds, resampling
prompts and minibatch orders are functions of (seed, iteration, attempt, process).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..config import GRPOConfig
from ..data.collate import collate_completions
from ..errors import ConfigError
from ..generate import SamplingSettings, generate_ids
from ..logprobs import completion_logprobs, final_hidden_states
from ..losses.grpo import (
    combined_rewards,
    group_advantages,
    group_std,
    grpo_loss,
    overlong_penalty,
    rloo_advantages,
    sequence_kl,
    zero_std_groups,
)
from ..models import load_causal_lm, load_tokenizer, prepare_policy
from ..scoring import FunctionScorer, as_scorer
from .loop import StepOutput, Trainer, window_mean
from .reference import make_reference
from .rollout import PromptExample, load_prompts, mean_over_processes, minibatch_updates, no_dropout, pad_rows
from .run import RunResult, finish_run, save_final_model, start_run


class PolicyTokens(nn.Module):
    """The module the loop trains: flat ``[N]`` log-probs (and entropies) of the completion tokens, row-major."""

    def __init__(self, policy: nn.Module, chunk_size: int = 1024, temperature: float = 1.0):
        super().__init__()
        self.policy = policy
        self.chunk_size = chunk_size
        self.temperature = temperature

    def forward(self, input_ids, attention_mask, completion_mask, with_entropy: bool = False):
        hidden = final_hidden_states(self.policy, input_ids, attention_mask)
        return completion_logprobs(self.policy, hidden, input_ids, completion_mask, self.chunk_size,
                                   self.temperature, with_entropy)


@dataclass
class Completion:
    """One sampled completion and what its updates need (per-token tensors over its tokens, or None)."""

    prompt_ids: list[int]
    response_ids: list[int]
    advantage: float
    truncated: bool                       # reached max_completion_length without EOS
    old_logps: Tensor | None = None       # the sampling policy's, when the updates go off-policy
    ref_logps: Tensor | None = None       # the reference's, when beta > 0


class GRPOTask:
    """A micro-batch of completions -> the clipped GRPO loss (:func:`preftune.losses.grpo.grpo_loss`)."""

    def __init__(self, cfg: GRPOConfig, pad_token_id: int):
        self.cfg = cfg
        self.pad_token_id = pad_token_id
        self.num_tokens: float | None = None   # token_mean's denominator, set by the step before each update

    def collate(self, samples: list[Completion]) -> dict[str, Tensor]:
        batch = collate_completions([s.prompt_ids for s in samples], [s.response_ids for s in samples],
                                    self.pad_token_id)
        lengths = torch.tensor([len(s.response_ids) for s in samples])
        batch["response_mask"] = torch.arange(int(lengths.max()))[None, :] < lengths[:, None]
        batch["advantages"] = torch.tensor([s.advantage for s in samples], dtype=torch.float32)
        batch["truncated"] = torch.tensor([s.truncated for s in samples])
        for name in ("old_logps", "ref_logps"):
            if getattr(samples[0], name) is not None:
                batch[name] = pad_rows([getattr(s, name) for s in samples])[0]
        return batch

    def loss(self, model, batch):
        cfg = self.cfg
        logps_flat, entropy = model(batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                                    with_entropy=True)
        mask = batch["response_mask"]
        logps = torch.zeros(mask.shape, dtype=logps_flat.dtype, device=mask.device).masked_scatter(mask, logps_flat)
        out = grpo_loss(logps, batch["advantages"], mask, old_logps=batch.get("old_logps"),
                        ref_logps=batch.get("ref_logps"), beta=cfg.beta if cfg.advantage == "grpo" else 0.0,
                        epsilon_low=cfg.epsilon, epsilon_high=cfg.epsilon_high, aggregation=cfg.aggregation,
                        max_completion_length=cfg.max_completion_length,
                        truncated=batch["truncated"] if cfg.mask_truncated_completions else None,
                        num_tokens=self.num_tokens if cfg.aggregation == "token_mean" else None)
        return out.loss, {"loss": out.loss.detach(), "entropy": entropy.detach().mean(), **out.metrics()}

    def eval_metrics(self, model, batch):
        return self.loss(model, batch)[1]

    def loss_tokens(self, samples: list[Completion]) -> int:
        """Completion tokens that enter the loss (truncated completions out when they are masked)."""
        return sum(len(s.response_ids) for s in samples if not (self.cfg.mask_truncated_completions and s.truncated))


def train_grpo(cfg: GRPOConfig, *, model=None, tokenizer=None, ref_model=None, reward_funcs=None) -> RunResult:
    """Fine-tune a policy with GRPO (or RLOO: ``cfg.advantage == "rloo"``). ``model``/``tokenizer``/``ref_model``
    may be objects; ``reward_funcs`` a list of callables ``(prompts, completions) -> scores`` (or scorers) used
    instead of ``cfg.reward_funcs``."""
    cfg.validate(require_model=model is None, require_reward=not reward_funcs)
    ctx = start_run(cfg, cfg.sanity_warnings())
    acc = ctx.accelerator
    tokenizer = tokenizer or load_tokenizer(cfg.tokenizer_name_or_path or cfg.model_name_or_path)
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no EOS token; completions end at EOS")
    prompts = load_prompts(cfg.dataset, cfg.split, tokenizer, cfg.max_prompt_length, cfg.skip_invalid)
    scorers = reward_scorers(cfg, acc.device, reward_funcs)

    policy = prepare_policy(model if model is not None else load_causal_lm(cfg.model_name_or_path), cfg)
    no_dropout(policy)
    reference = make_reference(cfg, ctx, policy, ref_model=ref_model, needed=cfg.beta > 0)
    module = PolicyTokens(policy, cfg.logprob_chunk_size, cfg.temperature)

    per_update = cfg.per_device_batch_size * cfg.gradient_accumulation_steps
    local_prompts = per_update * cfg.steps_per_generation // cfg.num_generations
    if len(prompts) < local_prompts * acc.num_processes:
        raise ConfigError(f"{len(prompts)} prompts are fewer than one rollout batch of "
                          f"{local_prompts * acc.num_processes} (per_device_batch_size x processes x "
                          "gradient_accumulation_steps x steps_per_generation / num_generations)")
    task = GRPOTask(cfg, tokenizer.pad_token_id)
    sampler = GroupSampler(cfg, acc, module, scorers, tokenizer, reference)
    trainer = Trainer.from_run(ctx, model=module, task=task, train_examples=prompts, unit="samples",
                               step=GRPOStep(cfg, sampler, task, local_prompts),
                               examples_per_step=local_prompts * acc.num_processes,
                               updates_per_step=cfg.num_iterations * cfg.steps_per_generation)
    result = trainer.train()
    model_dir = save_final_model(acc, trainer.unwrapped().policy, tokenizer, ctx.run_dir / "model", cfg.merge_lora)
    return finish_run(ctx, model_dir, result)


def reward_scorers(cfg: GRPOConfig, device, given=None) -> list:
    """One checked scorer per reward function: the given objects, else ``cfg.reward_funcs`` (a
    ``module:function`` name, or a reward model directory). Names are unique: they key the metrics."""
    if given:
        scorers = [as_scorer(obj, "reward_funcs") for obj in given]
    else:
        scorers = []
        for spec in cfg.reward_funcs:
            if Path(spec).is_dir():
                from ..scoring.reward_model import RewardModelScorer

                scorers.append(RewardModelScorer(spec, device=device, batch_size=cfg.generation_batch_size))
            else:
                scorers.append(FunctionScorer(spec, option="reward_funcs", name=spec.rpartition(":")[2]))
    if cfg.reward_weights and len(cfg.reward_weights) != len(scorers):
        raise ConfigError(f"{len(cfg.reward_weights)} reward_weights for {len(scorers)} reward functions")
    names = [Path(str(s.name)).name or "reward" for s in scorers]
    return [(name if names.count(name) == 1 else f"{name}_{i}", s) for i, (name, s) in enumerate(zip(names, scorers))]


@dataclass
class Groups:
    """Sampled groups, flat: completion ``i`` belongs to prompt ``i // G``."""

    prompts: list[PromptExample]
    response_ids: list[list[int]]
    texts: list[str]
    ended: list[bool]
    per_function: Tensor                  # [N, K] rewards of each reward function
    total: Tensor                         # [N] what the advantages use: weighted sum (of normalised rewards
                                          # with normalize_rewards), plus the overlong penalty
    reward: Tensor                        # [N] the same of the raw rewards (logged)

    def select(self, groups: list[int], size: int) -> "Groups":
        rows = [g * size + j for g in groups for j in range(size)]
        return Groups([self.prompts[g] for g in groups], [self.response_ids[i] for i in rows],
                      [self.texts[i] for i in rows], [self.ended[i] for i in rows], self.per_function[rows],
                      self.total[rows], self.reward[rows])

    @staticmethod
    def join(parts: list["Groups"]) -> "Groups":
        return Groups([p for g in parts for p in g.prompts], [r for g in parts for r in g.response_ids],
                      [t for g in parts for t in g.texts], [e for g in parts for e in g.ended],
                      *(torch.cat([getattr(g, name) for g in parts]) for name in ("per_function", "total", "reward")))


@dataclass
class Batch:
    completions: list[Completion]
    stats: dict[str, float]
    examples: list[dict] = field(default_factory=list)


class GroupSampler:
    """Prompts in, scored groups of completions with their advantages out."""

    def __init__(self, cfg: GRPOConfig, accelerator, module: PolicyTokens, scorers: list, tokenizer, reference):
        self.cfg = cfg
        self.acc = accelerator
        self.module = module              # unwrapped PolicyTokens
        self.scorers = scorers            # [(name, scorer)]
        self.tokenizer = tokenizer
        self.reference = reference
        self.settings = SamplingSettings(max_new_tokens=cfg.max_completion_length, temperature=cfg.temperature,
                                         top_k=cfg.top_k, top_p=cfg.top_p, do_sample=True)
        weights = cfg.reward_weights or [1.0] * len(scorers)
        self.weights = torch.tensor(weights, dtype=torch.float32)

    def sample(self, prompts: list[PromptExample], seed: int) -> Groups:
        """``G`` completions of each prompt, scored."""
        cfg, size = self.cfg, self.cfg.num_generations
        repeated = [p for p in prompts for _ in range(size)]
        with self.acc.autocast():
            generation = generate_ids(self.module.policy, [p.ids for p in repeated], self.settings, seed=seed,
                                      pad_token_id=self.tokenizer.pad_token_id,
                                      eos_token_id=self.tokenizer.eos_token_id, batch_size=cfg.generation_batch_size)
        texts = self.tokenizer.batch_decode(generation.response_ids, skip_special_tokens=True)
        columns = [scorer.score([p.prompt for p in repeated], texts) for _, scorer in self.scorers]
        per_function = torch.tensor(columns, dtype=torch.float32).T.reshape(len(texts), len(columns))
        reward = combined_rewards(per_function, self.weights)
        total = combined_rewards(per_function, self.weights, size, normalize=True) if cfg.normalize_rewards else reward
        if cfg.overlong_cache:
            lengths = torch.tensor([len(r) for r in generation.response_ids])
            penalty = overlong_penalty(lengths, cfg.max_completion_length, cfg.overlong_cache)
            reward, total = reward + penalty, total + penalty
        return Groups(prompts, generation.response_ids, texts, generation.ended, per_function, total, reward)

    def collect(self, trainer: Trainer, step: int, local_prompts: int) -> Batch:
        """The step's groups (with dynamic sampling: groups with a reward spread, resampled), then advantages."""
        cfg, size = self.cfg, self.cfg.num_generations
        first = self.sample(trainer.step_examples(step, local_prompts), _seed(cfg.seed, step, trainer.rank, 0))
        zero = zero_std_groups(first.total, size)
        stats = {"frac_reward_zero_std": float(zero.float().mean())}
        groups = first
        if cfg.dynamic_sampling:
            groups, attempts = self.resample(trainer, step, first, local_prompts)
            stats["dynamic_sampling/attempts"] = float(attempts)
        return self.finish(groups, stats)

    def resample(self, trainer: Trainer, step: int, first: Groups, wanted: int) -> tuple[Groups, int]:
        """DAPO dynamic sampling: keep groups whose rewards differ, sample more prompts until ``wanted``
        groups (at most ``max_resample_attempts`` more rounds), then fill up with all-equal groups."""
        cfg, size = self.cfg, self.cfg.num_generations
        kept, dropped, current, attempt = [], [], first, 0
        while True:
            zero = zero_std_groups(current.total, size).tolist()
            kept.append(current.select([g for g, z in enumerate(zero) if not z], size))
            dropped.append(current.select([g for g, z in enumerate(zero) if z], size))
            missing = wanted - sum(len(k.prompts) for k in kept)
            if missing <= 0 or attempt == cfg.max_resample_attempts:
                break
            attempt += 1
            seed = _seed(cfg.seed, step, trainer.rank, attempt)
            generator = torch.Generator().manual_seed(seed)
            picks = torch.randint(len(trainer.train_examples), (missing,), generator=generator)
            current = self.sample([trainer.train_examples[i] for i in picks.tolist()], seed)
        groups = Groups.join(kept + dropped)
        return groups.select(list(range(wanted)), size), attempt + 1

    def finish(self, groups: Groups, stats: dict[str, float]) -> Batch:
        cfg, size = self.cfg, self.cfg.num_generations
        prompt_ids = [p.ids for p in groups.prompts for _ in range(size)]
        rloo_kl = cfg.advantage == "rloo" and cfg.beta > 0
        off_policy = cfg.num_iterations > 1 or cfg.steps_per_generation > 1 or rloo_kl
        old, ref = self.token_logps(prompt_ids, groups.response_ids, off_policy, cfg.beta > 0)
        if cfg.advantage == "rloo":
            kl = torch.zeros_like(groups.total)
            if rloo_kl:
                (old_pad, mask), ref_pad = pad_rows(old), pad_rows(ref)[0]
                kl = sequence_kl(old_pad, ref_pad, mask).cpu()
            advantages = rloo_advantages(groups.total, kl, cfg.beta, size)
        else:
            advantages = group_advantages(groups.total, size, cfg.scale_rewards)
        completions = [Completion(p, r, float(a), not e, old[i] if old else None, ref[i] if ref else None)
                       for i, (p, r, a, e) in enumerate(zip(prompt_ids, groups.response_ids, advantages.tolist(),
                                                            groups.ended))]
        stats.update(self.reward_stats(groups))
        examples = [{"prompt": p.text, "completion": t, "reward": r}
                    for p, t, r in zip([p for p in groups.prompts for _ in range(size)], groups.texts,
                                       groups.reward.tolist())]
        return Batch(completions, stats, examples)

    def reward_stats(self, groups: Groups) -> dict[str, float]:
        lengths = torch.tensor([len(r) for r in groups.response_ids], dtype=torch.float32)
        stats = {"reward": float(groups.reward.mean()),
                 "reward_std": float(group_std(groups.reward, self.cfg.num_generations).mean()),
                 "completions/mean_length": float(lengths.mean()), "completions/min_length": float(lengths.min()),
                 "completions/max_length": float(lengths.max()),
                 "completions/clipped_ratio": 1.0 - sum(groups.ended) / len(groups.ended)}
        for k, (name, _) in enumerate(self.scorers):
            column = groups.per_function[:, k]
            stats[f"rewards/{name}/mean"] = float(column.mean())
            stats[f"rewards/{name}/std"] = float(column.std()) if column.numel() > 1 else 0.0
        return stats

    @torch.no_grad()
    def token_logps(self, prompt_ids, response_ids, want_old: bool, want_ref: bool):
        """Per completion (1-D tensors): the sampling policy's log-probs and the reference's, each only if wanted."""
        if not (want_old or want_ref):
            return None, None
        old, ref = [], []
        was_training = self.module.training
        self.module.eval()
        try:
            for start in range(0, len(prompt_ids), self.cfg.generation_batch_size):
                end = start + self.cfg.generation_batch_size
                batch = collate_completions(prompt_ids[start:end], response_ids[start:end], self.tokenizer.pad_token_id)
                batch = {k: v.to(self.acc.device) for k, v in batch.items()}
                lengths = [len(r) for r in response_ids[start:end]]
                with self.acc.autocast():
                    if want_old:
                        old += torch.split(self.module(batch["input_ids"], batch["attention_mask"],
                                                       batch["completion_mask"])[0].float(), lengths)
                    if want_ref:
                        ref += torch.split(self.reference.token_logps(batch, self.cfg.temperature).float(), lengths)
        finally:
            self.module.train(was_training)
        return old or None, ref or None


def _seed(seed: int, step: int, rank: int, attempt: int) -> int:
    return (seed * 1_000_003 + step * 7_919 + rank * 104_729 + attempt * 15_485_863) % 2**62


class GRPOStep:
    """One GRPO/RLOO iteration, as the loop's step function: sample and score the groups, then
    ``num_iterations`` passes of ``steps_per_generation`` optimiser updates over the completions.
    It holds no state of its own: the RNG, the weights and the prompt order are the loop's."""

    gauges: tuple[str, ...] = ()

    def __init__(self, cfg: GRPOConfig, sampler: GroupSampler, task: GRPOTask, local_prompts: int):
        self.cfg = cfg
        self.sampler = sampler
        self.task = task
        self.local_prompts = local_prompts

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def run(self, trainer: Trainer, step: int) -> StepOutput:
        cfg = self.cfg
        started = time.perf_counter()
        batch = self.sampler.collect(trainer, step, self.local_prompts)
        rollout_time = time.perf_counter() - started
        updates, tokens = minibatch_updates(trainer, batch.completions, epochs=cfg.num_iterations,
                                            per_update=cfg.per_device_batch_size * cfg.gradient_accumulation_steps,
                                            micro=cfg.per_device_batch_size, seed=cfg.seed, step=step,
                                            before_update=lambda chosen: self.count_tokens(trainer, chosen))
        metrics = {**mean_over_processes(trainer.acc, batch.stats), **{k: window_mean(v) for k, v in updates.items()},
                   "learning_rate": updates["learning_rate"][-1], "time/rollout": rollout_time,
                   "time/update": time.perf_counter() - started - rollout_time}
        logged = cfg.log_samples_steps and ((step + 1) % cfg.log_samples_steps == 0 or step == 0)
        return StepOutput(metrics, len(batch.completions) * trainer.world, tokens,
                          batch.examples[:cfg.log_samples] if logged else [])

    def count_tokens(self, trainer: Trainer, chosen: list[Completion]) -> None:
        """token_mean over the whole optimiser batch: its loss tokens on every process, divided by the
        number of micro-batch losses the loop and data parallelism average (accumulation x processes)."""
        local = torch.tensor(float(self.task.loss_tokens(chosen)), device=trainer.acc.device)
        total = float(trainer.acc.reduce(local, reduction="sum")) if trainer.world > 1 else float(local)
        self.task.num_tokens = max(total, 1.0) / (self.cfg.gradient_accumulation_steps * trainer.world)
