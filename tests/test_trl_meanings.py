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
    assert cfg.updates_per_generation() == 3
    default = grpo(per_device_batch_size=4, gradient_accumulation_steps=2, num_generations=4)
    assert default.updates_per_generation() == 1      # TRL's default: steps_per_generation = gradient_accumulation
    with pytest.raises(ConfigError, match="multiple of gradient_accumulation_steps"):
        grpo(per_device_batch_size=4, gradient_accumulation_steps=2, steps_per_generation=3, num_generations=2)
    with pytest.raises(ConfigError, match="per_device_batch_size x steps_per_generation .* = 6"):
        grpo(per_device_batch_size=2, steps_per_generation=3, num_generations=4)
    # generation_batch_size: TRL's rollout size over all processes, fixing steps_per_generation
    sized = grpo(per_device_batch_size=4, gradient_accumulation_steps=2, generation_batch_size=32, num_generations=4)
    assert sized.forward_passes(processes=2) == 4 and sized.updates_per_generation(processes=2) == 2
    assert sized.forward_passes(processes=1) == 8
    with pytest.raises(ConfigError, match="multiple of per_device_batch_size x processes"):
        sized.forward_passes(processes=3)
    with pytest.raises(ConfigError, match="not both"):
        grpo(per_device_batch_size=4, generation_batch_size=16, steps_per_generation=4, num_generations=4)


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
    from preftune.modality import TEXT, CompletionLogprobs
    from preftune.recipes.groups import Groups, GroupSampler
    from preftune.recipes.online import PromptExample
    from preftune.runtime.reference import ModelReference
    from preftune.toy import build_tiny_llama

    policy, ref = build_tiny_llama(tiny_tokenizer, seed=1), build_tiny_llama(tiny_tokenizer, seed=2)
    cfg = RLOOConfig(model_name_or_path="m", dataset="d", reward_funcs=["f:g"], num_generations=2,
                     per_device_batch_size=4, beta=0.1)
    cfg.validate()
    acc = SimpleNamespace(num_processes=1, process_index=0, device=torch.device("cpu"), autocast=nullcontext)
    sampler = GroupSampler(cfg, acc, CompletionLogprobs(policy, TEXT), [("r", None)], tiny_tokenizer,
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


def trl_normalize_then_sum(per_function, weights, group):
    """TRL 1.16 normalize_then_sum: each function standardised in its group (Bessel std + 1e-4), weighted sum,
    then standardised over the batch (mean, Bessel std + 1e-4); plain float64 Python."""
    n, k = len(per_function), len(weights)
    normed = [[0.0] * k for _ in range(n)]
    for start in range(0, n, group):
        for j in range(k):
            column = [per_function[i][j] for i in range(start, start + group)]
            mean, std = statistics.fmean(column), statistics.stdev(column)
            for i in range(start, start + group):
                normed[i][j] = (per_function[i][j] - mean) / (std + 1e-4)
    total = [sum(w * v for w, v in zip(weights, row)) for row in normed]
    mean, std = statistics.fmean(total), statistics.stdev(total)
    return [(t - mean) / (std + 1e-4) for t in total]


def test_multi_objective_aggregation_normalize_then_sum_is_trls():
    from preftune.losses.grpo import combined_rewards, group_advantages

    generator = torch.Generator().manual_seed(0)
    per_function = torch.randn(12, 3, generator=generator, dtype=torch.float64) * torch.tensor([1.0, 10.0, 0.1])
    weights = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    cfg = grpo(multi_objective_aggregation="normalize_then_sum", num_generations=4, per_device_batch_size=4)
    assert cfg.normalized_sum and cfg.reward_scaling == "batch"
    total = combined_rewards(per_function, weights, 4, normalize=cfg.normalized_sum)
    ours = group_advantages(total, 4, cfg.reward_scaling)
    expected = trl_normalize_then_sum(per_function.tolist(), weights.tolist(), 4)
    torch.testing.assert_close(ours, torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    # preftune's own normalize_rewards keeps scale_rewards (group): another scaling, named apart
    own = grpo(normalize_rewards=True, num_generations=4, per_device_batch_size=4)
    assert own.normalized_sum and own.reward_scaling == "group"
    assert not torch.allclose(group_advantages(total, 4, own.reward_scaling), ours)
    with pytest.raises(ConfigError, match="normalize_then_sum is GRPO's"):
        RLOOConfig(model_name_or_path="m", dataset="d", reward_funcs=["f:g"], num_generations=4,
                   per_device_batch_size=4, multi_objective_aggregation="normalize_then_sum").validate()


def test_the_sampling_batch_keeps_its_own_name_and_the_old_one_is_refused_with_the_reason(tmp_path):
    from preftune.config import OnlineDPOConfig, PPOConfig, load_config

    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("model_name_or_path: m\ndataset: d\ngeneration_batch_size: 64\n")
    for cls in (PPOConfig, OnlineDPOConfig):
        with pytest.raises(ConfigError, match="rollout size .* sampling_batch_size"):
            load_config(cls, yaml_file)
    yaml_file.write_text("model_name_or_path: m\ndataset: d\nreward_funcs: [f:g]\ngeneration_batch_size: 64\n")
    assert load_config(GRPOConfig, yaml_file).generation_batch_size == 64   # TRL's meaning in grpo / rloo
