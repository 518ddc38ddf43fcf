"""Training behaviour: learning, exact resume, LoRA, reference caching, accumulation, data parallelism."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import write_jsonl
from preftune import DPOConfig
from preftune.recipes.dpo import train_dpo
from toydata import make_toy_preferences

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy-data")
    return {
        "train": write_jsonl(root / "train.jsonl", make_toy_preferences(128, seed=1)),
        "eval": write_jsonl(root / "eval.jsonl", make_toy_preferences(64, seed=2)),
    }


def config(model_dir, data, out, cls=DPOConfig, **overrides) -> DPOConfig:
    values = dict(model_name_or_path=str(model_dir), dataset=str(data), output_dir=str(out), per_device_batch_size=8,
                  learning_rate=1e-3, max_length=64, logging_steps=1, max_steps=6, warmup_ratio=0.0, seed=0,
                  cache_dir=str(Path(out).parent / "ref-cache"))
    values.update(overrides)
    cfg = cls(**values)
    cfg.validate()
    return cfg


def step_records(run_dir) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if '"loss"' in line]


def cli(*args, env_extra=None, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "preftune.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd)


def killed_and_resumed(command: str, model_dir, data, tmp_path) -> tuple[dict, dict, dict]:
    """Train 8 steps in one go, and again killed during step 5 then resumed from the step-3 checkpoint, both
    with dropout on (the resumed run must also restore RNG states). The start, full and resumed weights."""
    dropout_dir = tmp_path / "dropout-model"
    shutil.copytree(model_dir, dropout_dir)
    model_config = json.loads((dropout_dir / "config.json").read_text())
    (dropout_dir / "config.json").write_text(json.dumps({**model_config, "attention_dropout": 0.2}))
    common = [command, "--model_name_or_path", str(dropout_dir), "--dataset", str(data), "--max_steps", "8",
              "--per_device_batch_size", "8", "--learning_rate", "1e-3", "--max_length", "64", "--save_steps", "3",
              "--logging_steps", "1", "--no-disable_dropout", "--lr_scheduler", "cosine", "--warmup_steps", "2"]
    full = cli(*common, "--output_dir", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr
    killed = cli(*common, "--output_dir", str(tmp_path / "resumed"), env_extra={"KILL_AT_STEP": "5"})
    assert killed.returncode == -9  # SIGKILL during step 5: the last checkpoint is step 3
    assert not (tmp_path / "resumed" / "model").exists()
    assert (tmp_path / "resumed" / "checkpoints" / "step-3" / "state.json").is_file()
    resumed = cli(*common, "--output_dir", str(tmp_path / "resumed"), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    return tuple(load_file(path / "model.safetensors") for path in
                 (dropout_dir, tmp_path / "full" / "model", tmp_path / "resumed" / "model"))


def one_and_two_processes(command: str, model_dir, data, tmp_path, options=("--max_length", "64"),
                          batch: int = 8) -> tuple[list[dict], list[dict]]:
    """4 steps on one process (``batch`` examples a step), and on two (half each) with accelerate's launcher;
    the same final weights. ``options``: the command's own. Returns both runs' step records."""
    common = ["--model_name_or_path", str(model_dir), "--dataset", str(data), "--max_steps", "4",
              "--learning_rate", "1e-3", "--logging_steps", "1", "--warmup_ratio", "0", *options]
    single = cli(command, *common, "--per_device_batch_size", str(batch), "--output_dir", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # on a machine without CUDA, accelerate's torchrun-based launcher gives gloo data parallelism
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "preftune.cli",
              command, *common, "--per_device_batch_size", str(batch // 2), "--output_dir", str(tmp_path / "two")]
    double = subprocess.run(launch, capture_output=True, text=True, env=env)
    assert double.returncode == 0, double.stderr[-3000:]
    w1 = load_file(tmp_path / "one" / "model" / "model.safetensors")
    w2 = load_file(tmp_path / "two" / "model" / "model.safetensors")
    for name in w1:
        torch.testing.assert_close(w1[name], w2[name], atol=1e-5, rtol=1e-4)
    one, two = step_records(tmp_path / "one"), step_records(tmp_path / "two")
    assert len(one) == len(two) == 4
    return one, two


def test_dpo_learns_toy_preference_on_held_out_pairs(tiny_model_dir, toy_data, tmp_path):
    cfg = config(tiny_model_dir, toy_data["train"], tmp_path / "run", eval_dataset=str(toy_data["eval"]),
                 eval_split="train", max_steps=-1, num_epochs=3, learning_rate=5e-4, beta=0.1, precompute_ref=True,
                 eval_on_start=True)
    result = train_dpo(cfg)
    first = step_records(tmp_path / "run")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at the first step
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    before = lines[0]
    assert before["step"] == 0 and before["eval/loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert before["eval/rewards/accuracies"] == 0.0  # untrained: no pair is separated yet
    held_out = result.train.eval_metrics
    assert held_out["eval/rewards/accuracies"] > 0.9
    assert held_out["eval/loss"] < 0.6
    assert held_out["eval/rewards/margins"] > 0


def test_killed_run_resumes_to_the_same_final_weights(tiny_model_dir, toy_data, tmp_path):
    start, a, b = killed_and_resumed("dpo", tiny_model_dir, toy_data["train"], tmp_path)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    losses_full = [r["loss"] for r in step_records(tmp_path / "full")]
    losses_resumed = [r["loss"] for r in step_records(tmp_path / "resumed")]
    assert [r["step"] for r in step_records(tmp_path / "resumed")] == list(range(1, 9))
    assert losses_resumed == pytest.approx(losses_full, abs=1e-6)
    # the weights really moved, so equality is not trivial
    assert any(not torch.allclose(start[n], a[n]) for n in a)


def test_lora_uses_adapter_disabled_reference_and_saves_loadable_adapter(tiny_model_dir, toy_data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = config(tiny_model_dir, toy_data["train"], tmp_path / "lora", lora=True, lora_r=4, lora_alpha=8,
                 learning_rate=5e-3, max_steps=8)
    result = train_dpo(cfg)
    records = step_records(tmp_path / "lora")
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert records[-1]["loss"] < records[0]["loss"]
    saved = result.model_dir
    assert (saved / "adapter_config.json").is_file() and not (saved / "model.safetensors").exists()

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), saved)
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    with torch.no_grad():
        base_logits = base(ids).logits
        tuned_logits = tuned(ids).logits
        with tuned.disable_adapter():
            disabled_logits = tuned(ids).logits
    assert not torch.allclose(base_logits, tuned_logits, atol=1e-4)  # the adapter learned something
    torch.testing.assert_close(disabled_logits, base_logits)  # and the base weights are untouched

    merged_cfg = config(tiny_model_dir, toy_data["train"], tmp_path / "merged", lora=True, lora_r=4, lora_alpha=8,
                        learning_rate=5e-3, max_steps=8, merge_lora=True)
    merged = AutoModelForCausalLM.from_pretrained(train_dpo(merged_cfg).model_dir)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, tuned_logits, atol=1e-5, rtol=1e-5)


def test_precomputed_reference_is_cached_reused_and_matches_live(tiny_model_dir, toy_data, tmp_path, monkeypatch):
    live = train_dpo(config(tiny_model_dir, toy_data["train"], tmp_path / "live"))
    first = train_dpo(config(tiny_model_dir, toy_data["train"], tmp_path / "pre1", precompute_ref=True))
    assert json.loads((tmp_path / "pre1" / "reference_cache.json").read_text())["train"]["reused"] is False

    from preftune.runtime import reference as reference_module

    def must_not_run(*args, **kwargs):
        raise AssertionError("the reference model ran although its log-probs were cached")

    monkeypatch.setattr(reference_module.LiveReference, "sequence_logps", must_not_run)
    second = train_dpo(config(tiny_model_dir, toy_data["train"], tmp_path / "pre2", precompute_ref=True))
    cache = json.loads((tmp_path / "pre2" / "reference_cache.json").read_text())["train"]
    assert cache["reused"] is True and Path(cache["path"]).is_file()

    losses = {name: [r["loss"] for r in step_records(run.run_dir)] for name, run in
              {"live": live, "pre1": first, "pre2": second}.items()}
    assert losses["pre2"] == losses["pre1"]
    assert losses["pre1"] == pytest.approx(losses["live"], abs=1e-5)
    assert losses["live"][-1] < losses["live"][0]

    # changing the tokenisation changes the fingerprint: no stale reuse
    monkeypatch.undo()
    third = train_dpo(config(tiny_model_dir, toy_data["train"], tmp_path / "pre3", precompute_ref=True,
                             max_prompt_length=4))
    assert json.loads((third.run_dir / "reference_cache.json").read_text())["train"]["reused"] is False


def test_gradient_accumulation_matches_a_larger_batch(tiny_model_dir, toy_data, tmp_path):
    big = train_dpo(config(tiny_model_dir, toy_data["train"], tmp_path / "big", per_device_batch_size=8, max_steps=4))
    accum = train_dpo(config(tiny_model_dir, toy_data["train"], tmp_path / "acc", per_device_batch_size=4,
                             gradient_accumulation_steps=2, max_steps=4))
    a = [r["loss"] for r in step_records(big.run_dir)]
    b = [r["loss"] for r in step_records(accum.run_dir)]
    assert b == pytest.approx(a, abs=1e-5)
    assert a[-1] < a[0]


def test_gradient_checkpointing_gives_the_same_training(tiny_model_dir, toy_data, tmp_path):
    plain = train_dpo(config(tiny_model_dir, toy_data["train"], tmp_path / "plain", max_steps=3))
    ckpt = train_dpo(config(tiny_model_dir, toy_data["train"], tmp_path / "ckpt", max_steps=3,
                            gradient_checkpointing=True))
    assert [r["loss"] for r in step_records(ckpt.run_dir)] == pytest.approx(
        [r["loss"] for r in step_records(plain.run_dir)], abs=1e-5)


def test_nll_and_constraint_terms_enter_the_loss(tiny_model_dir, toy_data, tmp_path, monkeypatch):
    module = tmp_path / "my_constraints.py"
    module.write_text("import torch\n\ndef long_rejected(lp):\n    return torch.relu(-lp.policy_rejected / "
                      "lp.rejected_lengths - 1.0)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    run = train_dpo(config(tiny_model_dir, toy_data["train"], tmp_path / "c", max_steps=2, nll_weight=0.5,
                           constraints=["my_constraints:long_rejected=2.0"]))
    first = step_records(run.run_dir)[0]
    penalty = first["loss/constraint/long_rejected"]
    assert penalty > 0
    assert first["loss"] == pytest.approx(first["loss/preference"] + 0.5 * first["loss/nll"] + 2.0 * penalty, rel=1e-5)


@pytest.mark.slow
def test_two_process_data_parallel_matches_one_process(tiny_model_dir, toy_data, tmp_path):
    one, two = one_and_two_processes("dpo", tiny_model_dir, toy_data["train"], tmp_path)
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["rewards/margins"] == pytest.approx(a["rewards/margins"], abs=1e-5)
    assert one[-1]["loss"] < one[0]["loss"]


def test_an_earlier_run_is_never_silently_mixed_or_lost(tiny_model_dir, toy_data, tmp_path):
    from preftune.errors import ConfigError

    first = train_dpo(config(tiny_model_dir, toy_data["train"], tmp_path / "run", max_steps=2))
    weights = (first.model_dir / "model.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="already holds a run"):
        train_dpo(config(tiny_model_dir, toy_data["train"], tmp_path / "run", max_steps=3))
    assert (first.model_dir / "model.safetensors").read_bytes() == weights  # untouched
    again = train_dpo(config(tiny_model_dir, toy_data["train"], tmp_path / "run", max_steps=3,
                             overwrite_output_dir=True))
    assert [r["step"] for r in step_records(again.run_dir)] == [1, 2, 3]
    assert not (tmp_path / "run" / "model.partial").exists()


def test_metrics_reach_tensorboard_when_asked(tiny_model_dir, toy_data, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = train_dpo(config(tiny_model_dir, toy_data["train"], tmp_path / "tb", max_steps=3, report_to=["tensorboard"]))
    events = list(Path(run.run_dir).rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file written"
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert "loss" in acc.Tags()["scalars"] and "rewards/accuracies" in acc.Tags()["scalars"]
    logged = [e.value for e in acc.Scalars("loss")]
    assert logged == pytest.approx([r["loss"] for r in step_records(run.run_dir)], abs=1e-6)
