"""Options and metrics that share a name with TRL 1.16's GRPO/RLOO trainers mean what they mean there:
``steps_per_generation`` counts forward passes, ``reward_std`` is the batch's reward std, ``frac_reward_zero_std``
is the share of completions whose scaling std is 0, and RLOO's ``kl`` is the k1 estimate it subtracts."""

import json
import statistics
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

from preftune.config import GRPOConfig, RLOOConfig
from preftune.errors import ConfigError
from preftune.losses.grpo import frac_reward_zero_std
from preftune.recipes.grpo import train_grpo
from preftune.recipes.ppo import read_metrics
from test_grpo import config, setup  # noqa: F401  (the module's fixture)


def grpo(**overrides):
    cfg = GRPOConfig(model_name_or_path="m", dataset="d", reward_funcs=["f:g"], **overrides)
    cfg.validate()
    return cfg


def test_steps_per_generation_counts_forward_passes_as_in_trl():
    # TRL: a generation holds per_device_batch_size x processes x steps_per_generation completions, and an
    # optimiser step every gradient_accumulation_steps of them
    cfg = grpo(per_device_batch_size=4, gradient_accumulation_steps=2, steps_per_generation=6, num_generations=4)
    assert cfg.updates_per_generation == 3
    default = grpo(per_device_batch_size=4, gradient_accumulation_steps=2, num_generations=4)
    assert default.updates_per_generation == 1      # TRL's default: steps_per_generation = gradient_accumulation
    with pytest.raises(ConfigError, match="multiple of gradient_accumulation_steps"):
        grpo(per_device_batch_size=4, gradient_accumulation_steps=2, steps_per_generation=3, num_generations=2)
    with pytest.raises(ConfigError, match="per_device_batch_size x steps_per_generation = 6"):
        grpo(per_device_batch_size=2, steps_per_generation=3, num_generations=4)


def trl_frac_zero_std(rewards, group, batch_scaled=False):
    """TRL: torch.isclose(std, 0) per completion, std being the group's or (batch scaling) the batch's."""
    if batch_scaled:
        return float(statistics.stdev(rewards) <= 1e-8)
    stds = [statistics.stdev(rewards[i:i + group]) for i in range(0, len(rewards), group)]
    return sum(s <= 1e-8 for s in stds) / len(stds)


def test_frac_reward_zero_std_follows_the_std_the_advantages_are_scaled_by():
    values = [1.0, 1.0, 1.0, 0.0, 2.0, 2.0, 0.5, 0.25, 3.0, 3.0, 3.0, 3.0]
    rewards = torch.tensor(values, dtype=torch.float64)
    assert frac_reward_zero_std(rewards, 4).item() == trl_frac_zero_std(values, 4) == 1 / 3
    assert frac_reward_zero_std(rewards, 4, scale_rewards="batch").item() == trl_frac_zero_std(values, 4, True) == 0
    constant = torch.full((8,), 0.5, dtype=torch.float64)
    assert frac_reward_zero_std(constant, 4, scale_rewards="batch").item() == 1.0


def test_logged_reward_std_and_zero_std_fraction_are_trls_over_the_logged_completions(setup, tmp_path):  # noqa: F811
    run = train_grpo(config(setup, tmp_path / "run", max_steps=2, log_samples_steps=1, log_samples=1000,
                            per_device_batch_size=16, num_generations=4))
    rows = [json.loads(line) for line in (run.run_dir / "samples.jsonl").read_text().splitlines()]
    records = read_metrics(run.run_dir)
    for record in records:
        step_rows = [r["reward"] for r in rows if r["step"] == record["step"]]
        assert len(step_rows) == 16
        assert record["reward_std"] == pytest.approx(statistics.stdev(step_rows), abs=1e-6)
        assert record["frac_reward_zero_std"] == pytest.approx(trl_frac_zero_std(step_rows, 4), abs=1e-9)


def test_rloo_logs_the_k1_kl_it_subtracts(tiny_tokenizer):
    """The sampling statistics of an RLOO batch carry TRL's kl: Σ (log π_old - log π_ref) over every completion
    token / their number, recomputed here with the log-prob function on the two models (not the k3 estimate)."""
    from preftune.logprobs import token_logprobs
    from preftune.recipes.groups import Groups, GroupSampler
    from preftune.recipes.grpo import PolicyTokens
    from preftune.recipes.online import PromptExample
    from preftune.runtime.reference import ModelReference
    from preftune.toy import build_tiny_llama

    policy, ref = build_tiny_llama(tiny_tokenizer, seed=1), build_tiny_llama(tiny_tokenizer, seed=2)
    cfg = RLOOConfig(model_name_or_path="m", dataset="d", reward_funcs=["f:g"], num_generations=2,
                     per_device_batch_size=4, beta=0.1)
    cfg.validate()
    acc = SimpleNamespace(num_processes=1, process_index=0, device=torch.device("cpu"), autocast=nullcontext)
    sampler = GroupSampler(cfg, acc, PolicyTokens(policy), [("r", None)], tiny_tokenizer,
                           ModelReference(ref, 64), None)
    prompts = [PromptExample("a", "a", [5, 6, 7], 0), PromptExample("b", "b", [8, 9], 1)]
    responses = [[10, 11, 12], [13, 14], [15], [16, 17, 18, 19]]
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5])
    groups = Groups(prompts, responses, ["x"] * 4, [True] * 4, rewards[:, None], rewards, rewards)
    batch = sampler.finish(groups, {})
    total, tokens, shaped = 0.0, 0, []
    for i, response in enumerate(responses):
        ids = torch.tensor([prompts[i // 2].ids + response])
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[0, -len(response):] = True
        with torch.no_grad():
            k1 = float((token_logprobs(policy, ids, None, mask) - token_logprobs(ref, ids, None, mask)).sum())
        total, tokens = total + k1, tokens + len(response)
        shaped.append(float(rewards[i]) - 0.1 * k1)
    assert batch.stats["kl"] == pytest.approx(total / tokens, rel=1e-5, abs=1e-7)
    assert batch.stats["frac_reward_zero_std"] == trl_frac_zero_std(shaped, 2)   # TRL: after the KL shaping
