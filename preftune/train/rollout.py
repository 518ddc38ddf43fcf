"""PPO rollouts: prompts in, scored samples with per-token advantages and returns out.

One rollout samples a response per prompt (:mod:`preftune.generate`), scores each with the reward
source, recomputes every log-prob and value with the same forward the updates use (no grad, dropout
off, same temperature), builds the KL-penalised per-token reward with the score on the last response
token, and runs GAE and advantage whitening (:mod:`preftune.losses.ppo`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from rich.console import Console

from ..data import load_records
from ..data.collate import collate_completions
from ..errors import DataError, PreftuneError
from ..generate import SamplingSettings, generate_ids
from ..losses import load_callable
from ..losses.ppo import explained_variance, gae_advantages, kl_penalty, masked_whiten, token_rewards

console = Console(stderr=True)


# ---------------------------------------------------------------------- prompts


@dataclass
class PromptExample:
    prompt: str | list        # as in the data: handed to reward functions
    text: str                 # the prompt as the policy reads it (chat template applied)
    ids: list[int]
    row: int


def load_prompts(source: str, split: str, tokenizer, max_prompt_length: int, skip_invalid: bool = False) -> list[PromptExample]:
    """Read and validate the ``prompt`` column; long prompts keep their last ``max_prompt_length`` tokens."""
    records = load_records(source, split=split)
    examples, skipped = [], {}
    for row, number in zip(records.rows, records.row_numbers):
        try:
            examples.append(_prompt_example(row, number, tokenizer, max_prompt_length))
        except DataError as error:
            if not skip_invalid:
                raise DataError(records.name, error.reason, row=number, field="prompt") from None
            skipped[error.reason] = skipped.get(error.reason, 0) + 1
    if skipped:
        reasons = ", ".join(f"{n} x {reason}" for reason, n in sorted(skipped.items()))
        console.print(f"[yellow]{records.name}: skipped {sum(skipped.values())} of {len(records.rows)} rows ({reasons})")
    if not examples:
        raise DataError(records.name, "no valid prompts")
    return examples


def _prompt_example(row: dict, number: int, tokenizer, max_prompt_length: int) -> PromptExample:
    value = row.get("prompt")
    if value is None:
        raise DataError("", "missing field (every row needs a 'prompt')")
    if isinstance(value, str):
        if not value.strip():
            raise DataError("", "empty prompt")
        text, ids = value, list(tokenizer(value, add_special_tokens=True)["input_ids"])
    elif isinstance(value, list):
        _check_messages(value)
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("", "the prompt is a list of messages, but the tokenizer has no chat template")
        text = tokenizer.apply_chat_template(value, tokenize=False, add_generation_prompt=True)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    else:
        raise DataError("", f"wrong type: expected a string or a list of messages, found {type(value).__name__}")
    if not ids:
        raise DataError("", "the prompt has no tokens")
    return PromptExample(value, text, ids[-max_prompt_length:], number)


def _check_messages(messages: list) -> None:
    if not messages:
        raise DataError("", "empty prompt: no messages")
    for i, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or not all(isinstance(message.get(k), str) for k in ("role", "content")):
            raise DataError("", f"malformed message {i}: expected an object with string 'role' and 'content'")


# ---------------------------------------------------------------------- reward sources


class FunctionReward:
    """``module:function`` called as ``fn(prompts, responses) -> rewards``."""

    def __init__(self, spec_or_fn):
        self.fn = load_callable(spec_or_fn, "reward function") if isinstance(spec_or_fn, str) else spec_or_fn
        self.name = spec_or_fn if isinstance(spec_or_fn, str) else getattr(spec_or_fn, "__name__", "reward function")

    def __call__(self, prompts: list[PromptExample], responses: list[str]) -> list[float]:
        return checked_scores(self.fn([p.prompt for p in prompts], responses), len(responses), self.name)


class ModelReward:
    """A trained reward model (``preftune reward``) scoring prompt + response text."""

    def __init__(self, path: str, device, batch_size: int = 16):
        from .reward import load_reward_model

        self.model, self.tokenizer = load_reward_model(path, device)
        self.model.requires_grad_(False)
        self.batch_size = batch_size
        self.name = str(path)

    def __call__(self, prompts: list[PromptExample], responses: list[str]) -> list[float]:
        from .reward import score_texts

        scores = [0.0] * len(prompts)
        plain = [i for i, p in enumerate(prompts) if isinstance(p.prompt, str)]
        chat = [i for i, p in enumerate(prompts) if not isinstance(p.prompt, str)]
        if plain:
            values = score_texts(self.model, self.tokenizer, [prompts[i].prompt for i in plain],
                                 [responses[i] for i in plain], self.batch_size)
            for i, v in zip(plain, values):
                scores[i] = v
        if chat:
            rendered = [self._render(prompts[i]) for i in chat]
            values = score_texts(self.model, self.tokenizer, rendered, [responses[i] for i in chat], self.batch_size,
                                 prompt_special_tokens=False)
            for i, v in zip(chat, values):
                scores[i] = v
        return checked_scores(scores, len(responses), self.name)

    def _render(self, prompt: PromptExample) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(prompt.prompt, tokenize=False, add_generation_prompt=True)
        return prompt.text


def checked_scores(values, expected: int, name: str) -> list[float]:
    if isinstance(values, torch.Tensor):
        values = values.detach().float().reshape(-1).tolist()
    try:
        scores = [float(v) for v in values]
    except (TypeError, ValueError):
        raise PreftuneError(f"reward '{name}' must return one number per response, got {type(values).__name__}") from None
    if len(scores) != expected:
        raise PreftuneError(f"reward '{name}' returned {len(scores)} scores for {expected} responses")
    if not all(math.isfinite(s) for s in scores):
        raise PreftuneError(f"reward '{name}' returned a score that is not a finite number")
    return scores


@dataclass
class RunningMoments:
    """Mean and standard deviation of every score seen so far (Chan et al.'s parallel update)."""

    count: float = 0.0
    mean: float = 0.0
    m2: float = 0.0

    def update(self, values: torch.Tensor) -> None:
        n = float(values.numel())
        if n == 0:
            return
        batch_mean = float(values.double().mean())
        batch_m2 = float(((values.double() - batch_mean) ** 2).sum())
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta ** 2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count > 1 else 1.0


# ---------------------------------------------------------------------- rollouts


@dataclass
class Sample:
    """One response and its per-token training targets (1-D tensors over the response tokens)."""

    prompt_ids: list[int]
    response_ids: list[int]
    old_logps: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor


@dataclass
class Rollout:
    samples: list[Sample]
    stats: dict[str, float]
    examples: list[dict] = field(default_factory=list)   # prompt / response / score rows for samples.jsonl


def pad_rows(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D tensors -> ``(padded [B, T], mask [B, T])``, zeros after each row's end."""
    width = max(r.numel() for r in rows)
    out = rows[0].new_zeros((len(rows), width))
    mask = torch.zeros((len(rows), width), dtype=torch.bool, device=rows[0].device)
    for i, r in enumerate(rows):
        out[i, :r.numel()] = r
        mask[i, :r.numel()] = True
    return out, mask


def adjusted_scores(raw: torch.Tensor, ended: torch.Tensor, missing_eos_penalty: float,
                    moments: RunningMoments | None, all_scores: torch.Tensor | None, clip: float) -> torch.Tensor:
    """The score PPO optimises: penalise responses without EOS, then normalise (running) and clip."""
    scores = raw - missing_eos_penalty * (~ended).to(raw.dtype)
    if moments is not None:
        moments.update(all_scores if all_scores is not None else scores)
        scores = (scores - moments.mean) / (moments.std + 1e-8)
    if clip > 0:
        scores = scores.clamp(-clip, clip)
    return scores


class RolloutWorker:
    """Everything a rollout needs that stays fixed over the run."""

    def __init__(self, *, cfg, accelerator, policy_value, reward, tokenizer, reference):
        self.cfg = cfg
        self.acc = accelerator
        self.policy_value = policy_value          # unwrapped PolicyValue
        self.reward = reward
        self.tokenizer = tokenizer
        self.reference = reference                # a live reference (train/reference.py)
        self.settings = SamplingSettings(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                         top_k=cfg.top_k, top_p=cfg.top_p, do_sample=True)

    def collect(self, prompts: list[PromptExample], seed: int, kl_coef: float, moments: RunningMoments | None) -> Rollout:
        cfg, device = self.cfg, self.acc.device
        policy = self.policy_value.policy
        with self.acc.autocast():
            generation = generate_ids(policy, [p.ids for p in prompts], self.settings, pad_token_id=self.tokenizer.pad_token_id,
                                      eos_token_id=self.tokenizer.eos_token_id, batch_size=cfg.generation_batch_size,
                                      seed=seed)
        texts = self.tokenizer.batch_decode(generation.response_ids, skip_special_tokens=True)
        raw = torch.tensor(self.reward(prompts, texts), dtype=torch.float32, device=device)
        ended = torch.tensor(generation.ended, device=device)
        all_scores = None
        if cfg.normalize_scores:  # every process keeps the same statistics: update them with all scores
            all_scores = self.acc.gather(raw - cfg.missing_eos_penalty * (~ended).float())
        scores = adjusted_scores(raw, ended, cfg.missing_eos_penalty, moments if cfg.normalize_scores else None,
                                 all_scores, cfg.score_clip)

        logps, values, entropy, ref_logps = self.forward_all(generation.prompt_ids, generation.response_ids)
        logps, mask = pad_rows(logps)
        values, entropy, ref_logps = pad_rows(values)[0], pad_rows(entropy)[0], pad_rows(ref_logps)[0]
        kl = kl_penalty(logps, ref_logps, cfg.kl_estimator) * mask
        rewards = token_rewards(scores, kl, mask, kl_coef)
        advantages, returns = gae_advantages(rewards, values, mask, cfg.gamma, cfg.lam)
        advantages = masked_whiten(advantages, mask)

        lengths = mask.sum(-1)
        samples = [Sample(list(p), list(r), logps[i, :n], values[i, :n], advantages[i, :n], returns[i, :n])
                   for i, (p, r, n) in enumerate(zip(generation.prompt_ids, generation.response_ids, lengths.tolist()))]
        non_score = (-kl_coef * kl).sum(-1)
        stats = {
            "objective/scores": float(raw.mean()),
            "objective/kl": float(kl.sum(-1).mean()),
            "objective/entropy": float((entropy * mask).sum(-1).mean()),
            "objective/non_score_reward": float(non_score.mean()),
            "objective/rlhf_reward": float((non_score + scores).mean()),
            "val/explained_variance": explained_variance(values, returns, mask),
            "val/mean": float(values[mask].mean()),
            "response/length": float(lengths.float().mean()),
            "response/ended": float(ended.float().mean()),
        }
        examples = [{"prompt": p.text, "response": t, "score": s, "ended": e}
                    for p, t, s, e in zip(prompts, texts, raw.tolist(), generation.ended)]
        return Rollout(samples, stats, examples)

    @torch.no_grad()
    def forward_all(self, prompt_ids, response_ids) -> tuple[list[torch.Tensor], ...]:
        """Per response: policy log-probs, values, entropies and reference log-probs (1-D tensors)."""
        module = self.policy_value
        was_training = module.training
        module.eval()
        out: tuple[list, list, list, list] = ([], [], [], [])
        size = self.cfg.generation_batch_size
        try:
            for start in range(0, len(prompt_ids), size):
                batch = collate_completions(prompt_ids[start:start + size], response_ids[start:start + size],
                                            self.tokenizer.pad_token_id)
                batch = {k: v.to(self.acc.device) for k, v in batch.items()}
                lengths = batch["completion_mask"].sum(-1).tolist()
                with self.acc.autocast():
                    logps, values, entropy = module(batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                                                    with_entropy=True)
                    ref = self.reference.token_logps(batch, self.cfg.temperature)
                for target, flat in zip(out, (logps, values, entropy, ref)):
                    target += list(torch.split(flat.float(), lengths))
        finally:
            module.train(was_training)
        return out
