"""GRPO's synced reference (``sync_ref_model``): after a sync the reference holds the policy's weights
(alpha 1) or the mix alpha x policy + (1 - alpha) x reference; its weights travel in checkpoints, so a
resumed run with syncs reproduces the uninterrupted one exactly. And two processes train as one.
Same toy task as tests/test_grpo.py."""

import json

import pytest
import torch
from safetensors.torch import load_file

from preftune.errors import ConfigError
from preftune.recipes.grpo import train_grpo
from preftune.recipes.ppo import read_metrics
from test_grpo import config, setup  # noqa: F401  (setup is the shared module-scoped fixture)
from test_train_dpo import one_and_two_processes

pytestmark = pytest.mark.usefixtures("one_thread")


def checkpoint(run_dir, step):
    """(policy weights named as the reference's, reference weights) of checkpoint ``step`` (the policy is
    saved in the transformers layout, ``model.safetensors``)."""
    path = run_dir / "checkpoints" / f"step-{step}"
    policy = load_file(path / "model.safetensors")
    return policy, load_file(path / "step.safetensors")


def test_a_sync_copies_the_policy_into_the_reference(setup, tmp_path):  # noqa: F811
    run = train_grpo(config(setup, tmp_path / "copy", beta=0.1, sync_ref_model=True, ref_model_sync_steps=2,
                            ref_model_mixup_alpha=1.0, max_steps=3, save_steps=2, per_device_batch_size=16))
    policy, reference = checkpoint(run.run_dir, 2)
    start = load_file(setup["model"] / "model.safetensors")
    assert set(reference) <= set(policy) and "model.embed_tokens.weight" in reference
    for name, weight in reference.items():
        assert torch.equal(weight, policy[name]), name
    assert any(not torch.equal(reference[name], start[name]) for name in reference)   # it did move
    kl = [r["kl"] for r in read_metrics(run.run_dir)]
    assert kl[0] == pytest.approx(0.0, abs=1e-7) and kl[1] > 1e-3   # the policy drifts from the start...
    assert kl[2] == pytest.approx(0.0, abs=1e-6)                     # ...and the synced reference is the policy


def test_a_sync_with_alpha_below_one_mixes_policy_and_reference(setup, tmp_path):  # noqa: F811
    run = train_grpo(config(setup, tmp_path / "mix", beta=0.1, sync_ref_model=True, ref_model_sync_steps=1,
                            ref_model_mixup_alpha=0.25, max_steps=2, save_steps=1, per_device_batch_size=16))
    start = load_file(setup["model"] / "model.safetensors")
    policy1, reference1 = checkpoint(run.run_dir, 1)
    policy2, reference2 = checkpoint(run.run_dir, 2)
    for name in reference1:
        mixed1 = 0.25 * policy1[name] + 0.75 * start[name]
        torch.testing.assert_close(reference1[name], mixed1, rtol=0, atol=1e-6, msg=name)
        torch.testing.assert_close(reference2[name], 0.25 * policy2[name] + 0.75 * mixed1, rtol=0, atol=1e-6, msg=name)
    assert any((reference2[name] - policy2[name]).abs().max() > 1e-4 for name in reference2)   # a mix, not a copy


def test_resume_with_a_synced_reference_is_exact(setup, tmp_path):  # noqa: F811
    # 2 updates an iteration, a sync every 3 updates: syncs in iterations 2 and 3, around the checkpoint at 2
    options = dict(beta=0.1, sync_ref_model=True, ref_model_sync_steps=3, ref_model_mixup_alpha=0.5, max_steps=4,
                   save_steps=2, per_device_batch_size=8, steps_per_generation=2)
    full = train_grpo(config(setup, tmp_path / "full", **options))
    resumed = train_grpo(config(setup, tmp_path / "resumed", resume=str(tmp_path / "full" / "checkpoints" / "step-2"),
                                **options))
    a, b = checkpoint(full.run_dir, 4), checkpoint(resumed.run_dir, 4)
    for x, y in zip(a, b):
        for name in x:
            torch.testing.assert_close(x[name], y[name], rtol=0, atol=1e-6, msg=name)
    full_records, resumed_records = read_metrics(full.run_dir), read_metrics(resumed.run_dir)
    assert [r["step"] for r in resumed_records] == [3, 4]
    for x, y in zip(full_records[2:], resumed_records):
        for key in ("reward", "kl", "loss", "entropy"):
            assert y[key] == pytest.approx(x[key], abs=1e-6), key


def test_sync_needs_a_separate_frozen_reference(setup, tmp_path):  # noqa: F811
    with pytest.raises(ConfigError, match="adapter-disabled reference"):
        config(setup, tmp_path, lora=True, beta=0.1, sync_ref_model=True)
    with pytest.raises(ConfigError, match="needs beta > 0"):
        config(setup, tmp_path, sync_ref_model=True)
    with pytest.raises(ConfigError, match="ref_model_mixup_alpha in"):
        config(setup, tmp_path, beta=0.1, sync_ref_model=True, ref_model_mixup_alpha=0.0)


@pytest.mark.slow
def test_two_processes_sample_score_and_train_as_one(setup, tmp_path):  # noqa: F811
    """4 prompts x 4 completions a step, on one process or split over two: each group's completions are
    seeded by its prompt's place in the step, the batch-wide std (scale_rewards batch) and the logged
    statistics cover both processes, so samples, rewards, losses and weights agree (to float rounding:
    the batches are padded differently; weights within 1e-5)."""
    options = ["--reward_funcs", setup["reward"], "--num_generations", "4", "--max_completion_length", "8",
               "--beta", "0.1", "--num_iterations", "2", "--scale_rewards", "batch", "--log_samples_steps", "1",
               "--log_samples", "8", "--seed", "3"]   # seed 3: the two processes' token counts are close
    one, two = one_and_two_processes("grpo", setup["model"], setup["prompts"], tmp_path, options, batch=16)
    for a, b in zip(one, two):
        for key in ("reward", "reward_std", "rewards/calm_fraction/std", "frac_reward_zero_std", "loss",
                    "completions/min_length", "completions/max_length", "completions/mean_length"):
            assert b[key] == pytest.approx(a[key], abs=1e-5), key
        # per-token metrics are token means of each process's micro-batches, then averaged over processes
        # (as TRL logs them): they agree only up to the processes' different token counts
        for key in ("kl", "entropy"):
            assert b[key] == pytest.approx(a[key], rel=0.05), key
    assert one[-1]["kl"] > 0 and len({r["completions/mean_length"] for r in one}) > 1
    samples = [[json.loads(line)["completion"] for line in (tmp_path / run / "samples.jsonl").read_text().splitlines()]
               for run in ("one", "two")]
    assert samples[0] == samples[1]
