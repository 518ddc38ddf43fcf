"""Online DPO end to end on the toy online task: the oracle reward rises, the metrics are TRL's, the
pairs really are the judge's choice, resume is exact and the command line works.

The policy is PPO's toy "SFT" model (2-5 calm or loud words, then EOS); the judge is a Python
function, the fraction of calm words: about 0.4 before training.
"""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from preftune.config import OnlineDPOConfig
from preftune.errors import ConfigError
from preftune.recipes.online_dpo import train_online_dpo
from preftune.recipes.ppo import read_metrics
from test_grpo import cli
from test_ppo import moved, never_ending, online_setup

pytestmark = pytest.mark.usefixtures("one_thread")
KEYS = {"objective/scores", "objective/scores_margin", "objective/kl", "objective/non_score_reward",
        "objective/rlhf_reward", "objective/ties", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
        "rewards/margins", "logps/chosen", "logps/rejected", "val/contain_eos_token", "completions/mean_length",
        "beta", "loss", "grad_norm", "learning_rate", "pairs/s"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer, one_thread):
    return online_setup(tmp_path_factory, tiny_tokenizer, "online-dpo")


def config(setup, out, require_judge=True, **overrides):
    values = dict(model_name_or_path=str(setup["model"]), dataset=str(setup["prompts"]), output_dir=str(out),
                  judge=f"function:{setup['reward']}", per_device_batch_size=16, max_new_tokens=8,
                  learning_rate=5e-3, beta=0.1, max_steps=15, seed=0)
    values.update(overrides)
    cfg = OnlineDPOConfig(**values)
    cfg.validate(require_judge=require_judge)
    return cfg


def mean(values):
    return sum(values) / len(values)


def test_online_dpo_raises_the_oracle_reward(setup, tmp_path):
    run = train_online_dpo(config(setup, tmp_path / "run"))
    records = read_metrics(run.run_dir)
    assert [r["step"] for r in records] == list(range(1, 16))
    assert KEYS <= set(records[0])
    scores = [r["objective/scores"] for r in records]
    assert scores[0] < 0.6
    assert mean(scores[-5:]) > 0.75 and mean(scores[-5:]) > scores[0] + 0.3
    assert records[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)     # the first samples: policy == reference
    assert max(r["objective/kl"] for r in records) > 0.1
    for r in records:
        assert r["objective/scores_margin"] >= 0.0                         # chosen is never the lower score
        assert r["objective/rlhf_reward"] == pytest.approx(r["objective/scores"] - 0.1 * r["objective/kl"], abs=1e-5)
    samples = [json.loads(line) for line in (run.run_dir / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {1, 10}
    assert set(samples[0]) == {"step", "prompt", "chosen", "rejected", "chosen_score", "rejected_score"}
    assert all(s["chosen_score"] >= s["rejected_score"] for s in samples)
    assert (run.model_dir / "model.safetensors").is_file()


class CalmJudge:
    """A pairwise judge (like the LLM judge): the probability that the first completion is calmer."""

    def __init__(self, scorer):
        self.scorer = scorer
        self.calls = 0

    def compare(self, prompts, first, second):
        self.calls += 1
        a, b = self.scorer(prompts, first), self.scorer(prompts, second)
        return [1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)]


def test_lora_ipo_with_a_pairwise_judge_learns_against_the_adapter_disabled_reference(setup, tmp_path):
    from preftune.loading import load_callable

    judge = CalmJudge(load_callable(setup["reward"], "judge"))
    cfg = config(setup, tmp_path / "lora", require_judge=False, judge=None, lora=True, lora_r=8, lora_alpha=16, seed=1,
                 learning_rate=3e-2, loss_type="ipo", beta=0.1, max_steps=12, log_samples_steps=1, log_samples=16)
    run = train_online_dpo(cfg, judge=judge)
    records = read_metrics(run.run_dir)
    assert judge.calls == 12 and "objective/scores" not in records[0]    # no scores from a pairwise judge
    assert records[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5) and records[-1]["objective/kl"] > 0.05
    samples = [json.loads(line) for line in (run.run_dir / "samples.jsonl").read_text().splitlines()]
    calm = load_callable(setup["reward"], "judge")
    for s in samples:   # the judge's choice: the chosen completion is never the less calm one
        assert calm([s["prompt"]], [s["chosen"]])[0] >= calm([s["prompt"]], [s["rejected"]])[0]
    calmness = {}    # per step: the mean calm fraction of everything the policy sampled
    for s in samples:
        calmness.setdefault(s["step"], []).extend(calm([s["prompt"]] * 2, [s["chosen"], s["rejected"]]))
    early, late = mean(calmness[1] + calmness[2]), mean(calmness[11] + calmness[12])
    assert late > early + 0.2
    assert (run.model_dir / "adapter_config.json").is_file()


def test_config_errors(setup, tmp_path):
    with pytest.raises(ConfigError, match="judge is required"):
        config(setup, tmp_path, judge=None)
    with pytest.raises(ConfigError, match="beta must be a positive number"):
        config(setup, tmp_path, beta=0.0)
    with pytest.raises(ConfigError, match="missing_eos_penalty must be a finite number"):
        config(setup, tmp_path, missing_eos_penalty=math.inf)
    with pytest.raises(ConfigError, match="fewer than one batch of 128"):
        train_online_dpo(config(setup, tmp_path / "big", per_device_batch_size=128))
    with pytest.raises(ConfigError, match="unknown kind 'func'"):
        train_online_dpo(config(setup, tmp_path / "kind", judge="func:x"))


def test_cli_killed_online_dpo_run_resumes_exactly(setup, tmp_path):
    from preftune.config import load_config

    yaml_file = tmp_path / "online-dpo.yaml"
    yaml_file.write_text(f"model_name_or_path: {setup['model']}\ndataset: {setup['prompts']}\n"
                         f"judge: function:{setup['reward']}\nper_device_batch_size: 8\n"
                         "gradient_accumulation_steps: 2\nmax_new_tokens: 8\nlearning_rate: 0.003\nmax_steps: 4\n"
                         "save_steps: 2\nloss_type: hinge\nmissing_eos_penalty: 1.0\nlog_samples_steps: 1\n")
    killed = cli("online-dpo", "--config", str(yaml_file), "--output_dir", str(tmp_path / "resumed"),
                 env_extra={"KILL_AT_STEP": "3"})
    train_online_dpo(load_config(OnlineDPOConfig, yaml_file, {"output_dir": str(tmp_path / "full")}))
    assert killed.wait() == -9, killed.stderr.read()
    assert (tmp_path / "resumed" / "checkpoints" / "step-2" / "state.json").is_file()
    train_online_dpo(load_config(OnlineDPOConfig, yaml_file, {"output_dir": str(tmp_path / "resumed"),
                                                               "resume": "latest"}))
    a = load_file(tmp_path / "full" / "model" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    full, resumed = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for x, y in zip(full, resumed):
        for key in ("objective/scores", "objective/kl", "loss", "rewards/margins", "learning_rate"):
            assert y[key] == pytest.approx(x[key], abs=1e-6), key
    samples = lambda d: [json.loads(line) for line in (d / "samples.jsonl").read_text().splitlines()]  # noqa: E731
    assert samples(tmp_path / "resumed") == samples(tmp_path / "full")


@pytest.mark.parametrize("mode", ["drop", "keep"])
def test_missing_eos_drop_never_makes_an_unfinished_completion_chosen_or_rejected(setup, tmp_path, mode,
                                                                                tiny_tokenizer):
    run = train_online_dpo(config(setup, tmp_path / mode, max_new_tokens=3, max_steps=1, missing_eos=mode),
                           tokenizer=never_ending(tiny_tokenizer))
    first = read_metrics(run.run_dir)[0]
    assert first["val/contain_eos_token"] == 0.0 and first["monitor/ended"] == 0.0
    assert first["pairs_dropped_unfinished"] == (16.0 if mode == "drop" else 0.0)
    assert (moved(setup, run) == 0.0) == (mode == "drop")
