"""PPO end to end on a tiny Llama: learning a toy reward, KL control, EOS penalty, masking, LoRA, resume, CLI.

The policy is a tiny Llama given a few seconds of "SFT" on toy replies (2-5 calm or loud words, then
EOS, half of each), so that PPO starts from a sensible policy, as in practice. The reward is the
fraction of reply words that are calm: about 0.5 before PPO.
"""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from preftune.config import PPOConfig
from preftune.errors import ConfigError, DataError
from preftune.recipes.ppo import read_metrics, train_ppo
from toydata import CALM_WORDS, LOUD_WORDS, TOPICS

REWARD_MODULE = f"""
CALM = set({CALM_WORDS!r})

def calm_fraction(prompts, responses):
    return [sum(w in CALM for w in r.split()) / max(1, len(r.split())) for r in responses]

def half(prompts, responses):
    return [0.5] * len(responses)
"""
KEYS = {"objective/scores", "objective/kl", "objective/entropy", "objective/kl_coef", "policy/clipfrac",
        "policy/approxkl", "loss/policy", "loss/value", "val/explained_variance", "grad_norm", "learning_rate",
        "samples/s", "tokens/s", "response/length", "response/ended"}


def toy_sft_model(tokenizer, steps: int = 80, seed: int = 0):
    from preftune.data.collate import collate_completions
    from preftune.toy import build_tiny_llama

    rng = random.Random(seed)
    model = build_tiny_llama(tokenizer, seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        prompts, replies = [], []
        for _ in range(32):
            words = CALM_WORDS if rng.random() < 0.5 else LOUD_WORDS
            prompts.append(tokenizer(f"Describe {rng.choice(TOPICS)} in a few words:")["input_ids"])
            reply = " " + " ".join(rng.choice(words) for _ in range(rng.randint(2, 5)))
            replies.append(tokenizer(reply, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
        batch = collate_completions(prompts, replies, tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        mask = batch["completion_mask"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[mask], batch["input_ids"][:, 1:][mask])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


pytestmark = pytest.mark.usefixtures("one_thread")


def online_setup(tmp_path_factory, tiny_tokenizer, name: str) -> dict:
    """A small SFT model, 64 prompts and a file of toy reward functions, for the online trainers' tests."""
    root = tmp_path_factory.mktemp(name)
    model_dir = root / "sft"
    toy_sft_model(tiny_tokenizer).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    rng = random.Random(0)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Describe {rng.choice(TOPICS)} in a few words:"}) + "\n"
                               for _ in range(64)))
    (root / "toy_rewards.py").write_text(REWARD_MODULE)
    return {"root": root, "model": model_dir, "prompts": prompts, "reward": f"{root / 'toy_rewards.py'}:calm_fraction",
            "half": f"{root / 'toy_rewards.py'}:half"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer, one_thread):
    return online_setup(tmp_path_factory, tiny_tokenizer, "ppo")


def config(setup, out, **overrides) -> PPOConfig:
    values = dict(model_name_or_path=str(setup["model"]), dataset=str(setup["prompts"]), output_dir=str(out),
                  reward_function=setup["reward"], per_device_batch_size=16, max_new_tokens=8, learning_rate=1e-3,
                  num_ppo_epochs=2, kl_coef=0.05, max_steps=12, seed=0)
    values.update(overrides)
    cfg = PPOConfig(**values)
    cfg.validate()
    return cfg


def mean(values):
    return sum(values) / len(values)


def test_ppo_raises_the_toy_reward_with_bounded_kl(setup, tmp_path):
    # 4 epochs at 2e-3 reach ~0.9 in 14 iterations on most seeds (2 at 1e-3 plateau near the 0.8 asserted)
    run = train_ppo(config(setup, tmp_path / "run", max_steps=14, num_ppo_epochs=4, learning_rate=2e-3, seed=1))
    records = read_metrics(run.run_dir)
    assert [r["step"] for r in records] == list(range(1, 15))
    assert KEYS <= set(records[0])
    scores = [r["objective/scores"] for r in records]
    assert scores[0] < 0.7
    assert mean(scores[-5:]) > 0.8 and mean(scores[-5:]) > scores[0] + 0.2
    assert records[0]["objective/kl"] == 0.0            # the policy starts as its reference
    assert all(r["objective/kl"] < 3.0 for r in records)  # and stays close to it
    assert max(r["objective/kl"] for r in records) > 0.05
    samples = [json.loads(line) for line in (run.run_dir / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {1, 10} and len(samples) == 8
    assert set(samples[0]) == {"step", "prompt", "response", "score", "ended"}
    assert (run.model_dir / "model.safetensors").is_file()


def test_lora_one_model_ppo_shares_backbone_and_reference(setup, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # seed 1: on seed 0 the first batch happens to score 0.63, far above the 0.4-0.5 of most seeds
    cfg = config(setup, tmp_path / "lora", lora=True, lora_r=8, lora_alpha=16, learning_rate=1e-2, num_ppo_epochs=1,
                 max_steps=10, lora_dropout=0.1, seed=1)
    run = train_ppo(cfg)
    records = read_metrics(run.run_dir)
    first = records[0]
    # one PPO epoch, one minibatch: the update sees exactly the rollout's log-probs (same mode, no dropout)
    assert first["policy/approxkl"] < 1e-10 and first["policy/clipfrac"] == 0.0
    assert first["objective/kl"] == 0.0                 # reference = the policy with adapters disabled
    assert mean([r["objective/scores"] for r in records[-4:]]) > first["objective/scores"] + 0.15
    assert (run.model_dir / "adapter_config.json").is_file()
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(setup["model"]), run.model_dir)
    base = AutoModelForCausalLM.from_pretrained(setup["model"])
    ids = torch.tensor([[1, 40, 41, 42]])
    with torch.no_grad(), tuned.disable_adapter():
        torch.testing.assert_close(tuned(ids).logits, base(ids).logits)


def test_shared_critic_without_lora_trains_policy_and_value_and_reports_to_trackers(setup, tmp_path):
    run = train_ppo(config(setup, tmp_path / "shared", value_model="shared", max_steps=3, kl_estimator="k3",
                           report_to=["tensorboard"]))
    records = read_metrics(run.run_dir)
    assert all(r["loss/value"] > 0 for r in records) and records[0]["objective/kl"] == 0.0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list(Path(run.run_dir).rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file written"
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    logged = [e.value for e in acc.Scalars("objective/scores")]
    assert logged == pytest.approx([r["objective/scores"] for r in records], abs=1e-6)


def test_adaptive_kl_coefficient_moves_towards_the_target(setup, tmp_path):
    common = dict(adaptive_kl=True, kl_horizon=64, max_steps=8, kl_coef=0.05)
    tight = read_metrics(train_ppo(config(setup, tmp_path / "tight", target_kl=0.01, **common)).run_dir)
    loose = read_metrics(train_ppo(config(setup, tmp_path / "loose", target_kl=50.0, **common)).run_dir)
    assert tight[0]["objective/kl_coef"] == loose[0]["objective/kl_coef"] == 0.05
    # after the first step the KL exceeds 0.01: beta grows by the capped 20% x 16/64 = 5% per iteration
    assert tight[-1]["objective/kl_coef"] > 0.05 * 1.04 ** 5
    assert loose[-1]["objective/kl_coef"] == pytest.approx(0.05 * 0.95 ** 7)


def test_missing_eos_gets_the_penalty(setup, tmp_path):
    from preftune.recipes.ppo_rollout import adjusted_scores

    scores = adjusted_scores(torch.tensor([1.0, 1.0, 0.2]), torch.tensor([True, False, False]), 0.5, None, None, 0.0)
    torch.testing.assert_close(scores, torch.tensor([1.0, 0.5, -0.3]))
    # end to end: 2 new tokens are too few for most replies, so many never emit EOS
    run = train_ppo(config(setup, tmp_path / "eos", reward_function=setup["half"], max_new_tokens=2, max_steps=1,
                           missing_eos_penalty=2.0))
    first = read_metrics(run.run_dir)[0]
    assert 0.0 < first["response/ended"] < 1.0
    assert first["objective/scores"] == pytest.approx(0.5)   # the raw reward is logged as is
    assert first["objective/rlhf_reward"] == pytest.approx(0.5 - 2.0 * (1 - first["response/ended"]), abs=1e-6)


def test_padding_after_eos_is_masked(setup, tiny_tokenizer):
    """A sample's log-probs, values and loss are the same alone and in a padded micro-batch."""
    from transformers import AutoModelForCausalLM

    from preftune.recipes.ppo import PolicyValue, PPOTask
    from preftune.recipes.ppo_rollout import Sample

    policy = AutoModelForCausalLM.from_pretrained(setup["model"])
    head = torch.nn.Linear(policy.config.hidden_size, 1)
    module = PolicyValue(policy, head).eval()
    cfg = config(setup, "unused")
    eos = tiny_tokenizer.eos_token_id
    prompt = tiny_tokenizer("Describe the river in a few words:")["input_ids"]
    short = prompt[:4], [301, eos]                       # ended early: the batch pads after its EOS
    long = prompt, [305, 306, 307, 308, 309, eos]
    task = PPOTask(cfg, tiny_tokenizer.pad_token_id)

    def sample(p, r, seed):
        g = torch.Generator().manual_seed(seed)
        rand = lambda: torch.randn(len(r), generator=g, dtype=torch.float32)  # noqa: E731
        return Sample(list(p), list(r), -rand().abs(), rand(), rand(), rand())

    a, b = sample(*short, 1), sample(*long, 2)
    batch = task.collate([a, b])
    assert batch["response_mask"].tolist() == [[True, True] + [False] * 4, [True] * 6]
    with torch.no_grad():
        together = module(batch)
        alone = module(task.collate([a]))
        torch.testing.assert_close(together[0][:2], alone[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(together[1][:2], alone[1], atol=1e-5, rtol=0)
        loss_ab = task.loss(module, batch)[1]
        loss_a, loss_b = task.loss(module, task.collate([a]))[1], task.loss(module, task.collate([b]))[1]
    # token-weighted: 2 tokens of a, 6 of b; padding adds nothing
    expected = (2 * loss_a["loss/policy"] + 6 * loss_b["loss/policy"]) / 8
    torch.testing.assert_close(loss_ab["loss/policy"], expected, atol=1e-6, rtol=0)


def test_reward_model_and_conversational_prompts(setup, tmp_path, tiny_tokenizer):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    reward_dir = tmp_path / "rm"
    rm_config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=2, num_labels=1,
                            pad_token_id=tiny_tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForSequenceClassification(rm_config).save_pretrained(reward_dir)
    tiny_tokenizer.save_pretrained(reward_dir)
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"prompt": [{"role": "user",
                                                     "content": f"Describe {t} in a few words:"}]}) + "\n"
                             for t in TOPICS[:8]) * 2)
    run = train_ppo(config(setup, tmp_path / "rm-run", reward_function=None, reward_model_path=str(reward_dir),
                           dataset=str(chats), max_steps=2, log_samples_steps=1))
    records = read_metrics(run.run_dir)
    assert len(records) == 2 and all(r["objective/scores"] != 0.0 for r in records)
    sample = json.loads((run.run_dir / "samples.jsonl").read_text().splitlines()[0])
    assert sample["prompt"].startswith("<s><|user|>Describe") and sample["prompt"].endswith("<|assistant|>")


def test_config_and_prompt_errors_are_for_people(setup, tmp_path):
    with pytest.raises(ConfigError, match="exactly one reward source"):
        config(setup, tmp_path / "x", reward_model_path="somewhere")
    with pytest.raises(ConfigError, match="dropout"):
        config(setup, tmp_path / "x", disable_dropout=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "fine"}) + "\n" + json.dumps({"prompt": 3}) + "\n"
                   + json.dumps({"prompt": [{"role": "user"}]}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl: row 2: field 'prompt': wrong type"):
        train_ppo(config(setup, tmp_path / "bad-run", dataset=str(bad)))
    with pytest.raises(ConfigError, match="fewer than one rollout batch"):  # 1 valid row after skipping
        train_ppo(config(setup, tmp_path / "skip-run", dataset=str(bad), skip_invalid=True, overwrite_output_dir=True))
    with pytest.raises(ConfigError, match="reward_function .* cannot import"):
        train_ppo(config(setup, tmp_path / "fn-run", reward_function="no_such_module:fn", overwrite_output_dir=True))


def cli(*args, env_extra=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env_extra or {})}
    env.pop("KILL_AT_STEP", None)
    env.update(env_extra or {})
    return subprocess.Popen([sys.executable, "-m", "preftune.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def test_cli_yaml_help_and_killed_run_resumes_exactly(setup, tmp_path):
    yaml_file = tmp_path / "ppo.yaml"
    yaml_file.write_text(f"model_name_or_path: {setup['model']}\ndataset: {setup['prompts']}\n"
                         f"reward_function: {setup['reward']}\nper_device_batch_size: 8\n"
                         f"gradient_accumulation_steps: 2\n"
                         "num_mini_batches: 2\nmax_new_tokens: 8\nlearning_rate: 0.001\nmax_steps: 6\nsave_steps: 2\n"
                         "adaptive_kl: true\ntarget_kl: 0.05\nkl_horizon: 64\nnormalize_scores: true\n"
                         "lr_scheduler: cosine\nlog_samples_steps: 1\n")
    full = cli("ppo", "--config", str(yaml_file), "--output_dir", str(tmp_path / "full"))
    killed = cli("ppo", "--config", str(yaml_file), "--output_dir", str(tmp_path / "resumed"),
                 env_extra={"KILL_AT_STEP": "5"})
    assert full.wait() == 0, full.stderr.read()
    assert killed.wait() == -9
    assert (tmp_path / "resumed" / "checkpoints" / "step-4" / "state.json").is_file()
    assert not (tmp_path / "resumed" / "model").exists()
    resumed = cli("ppo", "--config", str(yaml_file), "--output_dir", str(tmp_path / "resumed"), "--resume")
    assert resumed.wait() == 0, resumed.stderr.read()

    a = load_file(tmp_path / "full" / "model" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    start = load_file(setup["model"] / "model.safetensors")
    assert any(not torch.allclose(start[n], a[n]) for n in a)
    full_records, resumed_records = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in resumed_records] == list(range(1, 7))
    for x, y in zip(full_records, resumed_records):
        for key in ("objective/scores", "objective/kl", "objective/kl_coef", "loss/policy", "loss/value"):
            assert y[key] == pytest.approx(x[key], abs=1e-6), key
    assert full_records[-1]["objective/kl_coef"] != full_records[0]["objective/kl_coef"]
    samples = lambda d: [json.loads(line) for line in (d / "samples.jsonl").read_text().splitlines()]  # noqa: E731
    assert samples(tmp_path / "resumed") == samples(tmp_path / "full")

    from preftune.cli import build_parser

    help_text = build_parser()._subparsers._group_actions[0].choices["ppo"].format_help()
    for flag in ("--reward_model_path", "--reward_function", "--kl_coef", "--kl_estimator", "--missing_eos_penalty",
                 "--num_ppo_epochs", "--value_model", "--resume"):
        assert flag in help_text


def never_ending(tokenizer):
    """The tokenizer with BOS as its EOS: the toy model never writes it, so no sampled reply ends."""
    import copy

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.eos_token = tokenizer.bos_token
    return tokenizer


def moved(setup, run) -> float:
    """The largest change of any policy weight from the starting model."""
    before, after = load_file(str(setup["model"] / "model.safetensors")), load_file(str(run.model_dir /
                                                                                         "model.safetensors"))
    return max(float((after[k] - before[k]).abs().max()) for k in before)


@pytest.mark.parametrize("mode", ["drop", "keep"])
def test_missing_eos_drop_never_updates_on_unfinished_replies(setup, tmp_path, mode, tiny_tokenizer):
    run = train_ppo(config(setup, tmp_path / mode, max_new_tokens=3, max_steps=1, missing_eos=mode),
                    tokenizer=never_ending(tiny_tokenizer))
    first = read_metrics(run.run_dir)[0]
    assert first["response/ended"] == 0.0 and first["monitor/ended"] == 0.0
    assert first["monitor/alarm/ended"] == 1.0          # the monitor saw that no reply ends
    assert (moved(setup, run) == 0.0) == (mode == "drop")   # drop: no advantage, no policy update; keep: trained
