"""REINFORCE++ advantages offered by the GRPO trainer (``advantage: reinforce_pp`` / ``reinforce_pp_baseline``):
the per-token advantages of a sampled batch against the paper's formula written here, and the toy reward rising."""

import math
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

from preftune.config import GRPOConfig
from preftune.recipes.grpo import train_grpo
from preftune.recipes.ppo import read_metrics
from test_grpo import assert_learns, config, setup  # noqa: F401  (the module's fixture)


@pytest.mark.parametrize("advantage", ["reinforce_pp", "reinforce_pp_baseline"])
def test_batch_advantages_are_the_whitened_kl_penalised_returns(tiny_tokenizer, advantage):
    from preftune.logprobs import token_logprobs
    from preftune.modality import TEXT, CompletionLogprobs
    from preftune.recipes.groups import Groups, GroupSampler
    from preftune.recipes.online import PromptExample
    from preftune.runtime.reference import ModelReference
    from preftune.toy import build_tiny_llama

    policy, ref = build_tiny_llama(tiny_tokenizer, seed=1), build_tiny_llama(tiny_tokenizer, seed=2)
    beta = 0.3
    cfg = GRPOConfig(model_name_or_path="m", dataset="d", reward_funcs=["f:g"], num_generations=2,
                     per_device_batch_size=4, beta=beta, advantage=advantage)
    cfg.validate()
    acc = SimpleNamespace(num_processes=1, process_index=0, device=torch.device("cpu"), autocast=nullcontext)
    sampler = GroupSampler(cfg, acc, CompletionLogprobs(policy, TEXT), [("r", None)], tiny_tokenizer,
                           ModelReference(ref, 64), None)
    prompts = [PromptExample("a", "a", [5, 6, 7], 0), PromptExample("b", "b", [8, 9], 1)]
    responses = [[10, 11, 12], [13, 14], [15], [16, 17, 18, 19]]
    rewards = [1.0, 0.0, 0.5, 0.75]
    total = torch.tensor(rewards)
    batch = sampler.finish(Groups(prompts, responses, ["x"] * 4, [True] * 4, total[:, None], total, total), {})
    # Hu 2025: R_t = r - β Σ_{s≥t} (log π - log π_ref)_s, then whitened over every token of the batch
    returns = []
    for i, response in enumerate(responses):
        ids = torch.tensor([prompts[i // 2].ids + response])
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[0, -len(response):] = True
        with torch.no_grad():
            k1 = (token_logprobs(policy, ids, None, mask) - token_logprobs(ref, ids, None, mask))[0, -len(response):]
        r = rewards[i]
        if advantage == "reinforce_pp_baseline":
            group = rewards[2 * (i // 2):2 * (i // 2) + 2]
            r -= sum(group) / 2
        returns.append([r - beta * float(k1[t:].sum()) for t in range(len(response))])
    flat = [v for row in returns for v in row]
    mean = sum(flat) / len(flat)
    std = math.sqrt(sum((v - mean) ** 2 for v in flat) / len(flat))
    for completion, row in zip(batch.completions, returns):
        expected = torch.tensor([(v - mean) / (std + 1e-8) for v in row])
        torch.testing.assert_close(completion.advantage, expected, rtol=1e-4, atol=1e-5)
    assert "kl" in batch.stats


def test_reinforce_pp_baseline_raises_the_toy_reward(setup, tmp_path):  # noqa: F811
    run = train_grpo(config(setup, tmp_path / "run", advantage="reinforce_pp_baseline", learning_rate=3e-3))
    assert_learns(read_metrics(run.run_dir))
