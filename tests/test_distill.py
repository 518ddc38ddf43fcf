"""``preftune distill`` end to end on tiny Llamas: a randomly initialised, smaller student learns a teacher trained
with SFT on the toy data (held-out KL falls by more than half), LoRA, sequence-level KD, the tokenizer check,
exact resume after a crash, and the command."""

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import start_cli as cli
from preftune.config import DistillConfig, load_config
from preftune.errors import ConfigError
from preftune.recipes.distill import DistillStep, train_distill
from preftune.recipes.ppo import read_metrics
from preftune.toy import build_tiny_llama, build_toy_tokenizer
from test_ppo import toy_sft_model
from toydata import make_toy_preferences

pytestmark = pytest.mark.usefixtures("one_thread")
LAYERS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer, one_thread):
    root = tmp_path_factory.mktemp("distill")
    teacher, student = root / "teacher", root / "student"
    toy_sft_model(tiny_tokenizer, steps=60).save_pretrained(teacher)     # the teacher: SFT on the toy replies
    build_tiny_llama(tiny_tokenizer, hidden_size=16, layers=1, seed=7).save_pretrained(student)   # smaller, random
    for path in (teacher, student):
        tiny_tokenizer.save_pretrained(path)
    rows = [{"prompt": r["prompt"], "completion": r["chosen"] if i % 2 else r["rejected"]}
            for i, r in enumerate(make_toy_preferences(96, seed=3))]
    for name, part in (("train", rows[:64]), ("held", rows[64:])):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return {"root": root, "teacher": teacher, "student": student, "train": root / "train.jsonl",
            "held": root / "held.jsonl"}


def config(setup, out, **overrides):
    values = dict(model_name_or_path=str(setup["student"]), teacher_model_name_or_path=str(setup["teacher"]),
                  dataset=str(setup["train"]), eval_dataset=str(setup["held"]), eval_split="train",
                  output_dir=str(out), per_device_batch_size=16, learning_rate=1e-2, max_new_tokens=8,
                  max_steps=12, lmbda=0.5, beta=0.5, temperature=1.0, eval_on_start=True, logging_steps=1,
                  warmup_ratio=0.0, seed=0)
    values.update(overrides)
    cfg = DistillConfig(**values)
    cfg.validate()
    return cfg


def evaluations(run_dir):
    return [r for r in read_metrics(run_dir) if "eval/kl_forward" in r]


def test_student_halves_its_held_out_kl_to_the_teacher_on_its_own_samples_and_the_data(setup, tmp_path):
    run = train_distill(config(setup, tmp_path / "run", learning_rate=3e-2, max_steps=12))
    first, last = evaluations(run.run_dir)[0], evaluations(run.run_dir)[-1]
    assert last["eval/kl_forward"] < 0.5 * first["eval/kl_forward"]
    assert last["eval/kl_reverse"] < 0.5 * first["eval/kl_reverse"]
    assert last["eval/loss"] < 0.5 * first["eval/loss"]
    records = [r for r in read_metrics(run.run_dir) if "on_policy" in r]
    assert {r["on_policy"] for r in records} == {0.0, 1.0}     # lmbda 0.5: both kinds of step happen
    for r in records:   # the monitors watch the student's own samples, not the dataset's completions
        watched = {"monitor/ended", "monitor/distinct_2", "monitor/self_bleu"} <= set(r)
        assert watched == (r["on_policy"] == 1.0) and (not watched or 0.0 <= r["monitor/distinct_2"] <= 1.0)
    samples = [json.loads(line) for line in (run.run_dir / "samples.jsonl").read_text().splitlines()]
    assert {s["source"] for s in samples} <= {"student", "dataset"}


def test_lora_student_and_sequence_level_kd_learn(setup, tiny_tokenizer, tmp_path):
    # the student is the teacher's architecture from another seed, briefly trained, then trained through LoRA adapters
    # only (the output layer's too: a frozen head of a model this small cannot sharpen its distributions); the steps
    # that are not on-policy train on the teacher's own samples (seq_kd)
    other = setup["root"] / "student_same_size"
    if not other.exists():
        toy_sft_model(tiny_tokenizer, steps=25, seed=5).save_pretrained(other)
        tiny_tokenizer.save_pretrained(other)
    cfg = config(setup, tmp_path / "lora", model_name_or_path=str(other), lora=True, lora_r=16, lora_alpha=32,
                 lora_target_modules=[*LAYERS, "lm_head"],
                 learning_rate=1e-2, lmbda=0.25, seq_kd=True, beta=0.0)
    run = train_distill(cfg)
    first, last = evaluations(run.run_dir)[0], evaluations(run.run_dir)[-1]
    assert last["eval/kl_forward"] < 0.5 * first["eval/kl_forward"]
    assert (run.run_dir / "model" / "adapter_config.json").is_file()
    samples = [json.loads(line) for line in (run.run_dir / "samples.jsonl").read_text().splitlines()]
    assert {s["source"] for s in samples} <= {"student", "teacher"}
    sources = [DistillStep(cfg, None, None, None, None, None, 1).source(step) for step in range(200)]
    assert set(sources) == {"student", "teacher"} and 0.15 < sources.count("student") / 200 < 0.35


def test_teacher_with_another_tokenizer_and_bad_settings_are_refused(setup, tmp_path):
    other = setup["root"] / "other_tokenizer"
    if not other.exists():
        tokenizer = build_toy_tokenizer(["completely different words here", "nothing alike at all"], vocab_size=120)
        build_tiny_llama(tokenizer).save_pretrained(other)
        tokenizer.save_pretrained(other)
    with pytest.raises(ConfigError, match=r"the student \(.*student\) and the teacher \(.*other_tokenizer\) have "
                                          "different tokenizers"):
        train_distill(config(setup, tmp_path / "bad", teacher_model_name_or_path=str(other)))
    for field, value, message in (("lmbda", 1.5, "lmbda must be in"), ("beta", -0.1, "beta must be in"),
                                  ("teacher_model_name_or_path", None, "teacher_model_name_or_path is required")):
        with pytest.raises(ConfigError, match=message):
            config(setup, tmp_path, **{field: value})
    with pytest.raises(ConfigError, match="seq_kd"):
        config(setup, tmp_path, lmbda=1.0, seq_kd=True)


def test_cli_killed_distill_run_resumes_exactly(setup, tmp_path):
    yaml_file = tmp_path / "distill.yaml"
    yaml_file.write_text(f"model_name_or_path: {setup['student']}\nteacher_model_name_or_path: {setup['teacher']}\n"
                         f"dataset: {setup['train']}\nper_device_batch_size: 8\ngradient_accumulation_steps: 2\n"
                         "max_new_tokens: 6\nlearning_rate: 0.01\nmax_steps: 5\nsave_steps: 2\nlmbda: 0.5\n"
                         "beta: 0.3\nlr_scheduler: cosine\nlog_samples_steps: 1\nlogging_steps: 1\n")
    killed = cli("distill", "--config", str(yaml_file), "--output_dir", str(tmp_path / "resumed"),
                 env_extra={"KILL_AT_STEP": "3"})
    train_distill(load_config(DistillConfig, yaml_file, {"output_dir": str(tmp_path / "full")}))
    assert killed.wait() == -9, killed.stderr.read()
    assert (tmp_path / "resumed" / "checkpoints" / "step-2" / "state.json").is_file()
    train_distill(load_config(DistillConfig, yaml_file, {"output_dir": str(tmp_path / "resumed"), "resume": "latest"}))
    a = load_file(tmp_path / "full" / "model" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    full, resumed = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5]
    assert {r["on_policy"] for r in full} == {0.0, 1.0}
    for x, y in zip(full, resumed):
        for key in ("loss", "on_policy", "completions/mean_length", "learning_rate"):
            assert y[key] == pytest.approx(x[key], abs=1e-6), key
    samples = lambda d: [json.loads(line) for line in (d / "samples.jsonl").read_text().splitlines()]  # noqa: E731
    assert samples(tmp_path / "resumed") == samples(tmp_path / "full")
