"""Runs a person can follow: Ctrl-C says how to resume, a resumed run says where it resumed from and
records changed settings, each run starts with a summary and logs one plain line per step off a terminal,
and every step checkpoint is a model transformers and peft load."""

import json
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from preftune.cli import main
from test_cli import read_metrics, subprocess_env, write_jsonl
from toydata import make_toy_preferences

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", make_toy_preferences(32))


def dpo_args(model_dir, data, out, *extra) -> list[str]:
    return ["dpo", "--model_name_or_path", str(model_dir), "--dataset", str(data), "--output_dir", str(out),
            "--per_device_batch_size", "4", "--max_length", "64", "--logging_steps", "1", "--learning_rate", "1e-4",
            *extra]


def start(args, cwd) -> subprocess.Popen:
    """``python -m preftune.cli ARGS`` with Ctrl-C delivered as in a terminal (SIGINT not inherited as ignored)."""
    return subprocess.Popen([sys.executable, "-m", "preftune.cli", *args], cwd=cwd, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def interrupt_after_checkpoint(process, checkpoint, timeout=900) -> tuple[str, str]:
    deadline = time.time() + timeout
    while not (checkpoint / "state.json").is_file():
        assert process.poll() is None and time.time() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    return process.communicate(timeout=600)


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, tiny_model_dir, pairs):
    """A 500-step run stopped with Ctrl-C after its step-2 checkpoint, then continued by the printed command
    (run from the same directory, with --max_steps lowered to two steps past the checkpoint, and a learning rate
    the checkpoint's optimiser state overrides)."""
    cwd = tmp_path_factory.mktemp("interrupted")
    with_a_bad_row = write_jsonl(cwd / "pairs.jsonl", make_toy_preferences(32) + [{"prompt": "Hi", "chosen": " x"}])
    args = dpo_args(tiny_model_dir, with_a_bad_row.name, "out", "--max_steps", "500", "--save_steps", "2",
                    "--skip_invalid")
    process = start(args, cwd)
    stdout, stderr = interrupt_after_checkpoint(process, cwd / "out" / "checkpoints" / "step-2")
    words = shlex.split(stderr.split("resume with:")[1].strip().splitlines()[0]) if "resume with:" in stderr else []
    checkpoint_step = int(words[-1].rsplit("step-", 1)[1]) if words else -1
    resumed = subprocess.run([sys.executable, "-m", "preftune.cli", *words[1:], "--max_steps", str(checkpoint_step + 2),
                              "--learning_rate", "1e-3"], cwd=cwd, env=subprocess_env(), capture_output=True, text=True)
    return dict(cwd=cwd, args=args, code=process.returncode, stdout=stdout, stderr=stderr, words=words,
                step=checkpoint_step, resumed=resumed)


def test_ctrl_c_prints_the_last_checkpoint_and_the_command_to_resume(interrupted):
    run = interrupted
    assert run["code"] == 130, run["stderr"][-3000:]
    assert "Traceback" not in run["stderr"]
    step = run["step"]
    assert step >= 2 and step % 2 == 0                       # checkpoints every 2 steps
    assert f"last checkpoint: out/checkpoints/step-{step} (step {step})" in run["stderr"]
    stopped_at = int(run["stderr"].split("interrupted at step ")[1].split(" ")[0])
    assert step <= stopped_at < step + 2 + 1
    # the command is the one typed, with --resume naming the checkpoint
    assert run["words"] == ["preftune", *run["args"], "--resume", f"out/checkpoints/step-{step}"]


def test_the_printed_command_resumes_and_says_from_which_step(interrupted):
    resumed, step = interrupted["resumed"], interrupted["step"]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {step} of {step + 2} (out/checkpoints/step-{step})" in resumed.stdout
    assert f"resuming with max_steps changed: 500 -> {step + 2}" in resumed.stderr
    assert ("resuming with learning_rate changed: 0.0001 -> 0.001 (no effect: the optimiser state in the checkpoint "
            "keeps the old value)") in resumed.stderr
    out = interrupted["cwd"] / "out"
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, step + 3))
    assert max(r["learning_rate"] for r in records) <= 1e-4 * (1 + 1e-9)     # indeed no effect


def test_config_json_keeps_the_original_settings_and_records_the_resume(interrupted):
    step = interrupted["step"]
    config = json.loads((interrupted["cwd"] / "out" / "config.json").read_text())
    assert config["max_steps"] == 500 and config["resume"] is None          # as the run started
    [entry] = config["resumes"]
    assert entry["from_step"] == step and entry["checkpoint"] == f"out/checkpoints/step-{step}"
    assert entry["changed"] == {"max_steps": [500, step + 2], "learning_rate": [1e-4, 1e-3]}


def test_resume_refuses_a_changed_seed_or_batch(interrupted, capsys, monkeypatch):
    monkeypatch.chdir(interrupted["cwd"])
    code = main([*interrupted["args"], "--resume", "--seed", "7", "--per_device_batch_size", "8"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "seed (42 -> 7), per_device_batch_size (4 -> 8); start a new run in another --output_dir" in err


def test_each_run_starts_with_a_summary_and_logs_a_plain_line_per_step(interrupted):
    lines = interrupted["stdout"].splitlines()
    assert lines[0] == "data: pairs.jsonl: 33 rows (standard preference pairs); 32 kept, 1 skipped (1 missing field)"
    assert lines[1] == "examples: 32 training pairs; 689 tokens in the training pairs"
    assert lines[2].startswith("steps: 500 (62.5 epochs of 8 steps), per device batch 4 x 1 processes x 1 "
                               "accumulation; learning rate 0.0001 (linear)")
    assert lines[3].startswith("precision: trainable weights in float32, no autocast, on cpu; 46,240 of 46,240 "
                               "parameters trained (100%); fp32 (auto: CPU without fast bf16 products")   # pinned
    assert lines[4] == "reference: a frozen copy of the starting model"
    steps = [line for line in lines if line.startswith("step ")]
    assert len(steps) >= interrupted["step"]
    for number, line in enumerate(steps, start=1):   # one complete line per logged step, never cut
        assert line.startswith(f"step {number}/500  loss=") and "tokens/s=" in line, line
    assert steps[0].startswith("step 1/500  loss=0.6931  rewards/accuracies=0  rewards/margins=0  learning_rate=")


def test_resume_with_nothing_to_resume_fails_before_loading_the_model(tmp_path, pairs, capsys):
    code = main(dpo_args(tmp_path / "no-such-model", pairs, tmp_path / "fresh", "--resume"))
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"nothing to resume, no checkpoint found in {tmp_path / 'fresh' / 'checkpoints'}" in err
    assert "no-such-model" not in err                          # the model was never looked at
    code = main(dpo_args(tmp_path / "no-such-model", pairs, tmp_path / "fresh", "--resume", str(tmp_path)))
    assert code == 2 and "is not a checkpoint (no state.json)" in capsys.readouterr().err


# ------------------------------------------------------------------ step checkpoints are models


def test_a_full_step_checkpoint_is_a_transformers_model_stored_once(tmp_path, tiny_model_dir, pairs):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "full"
    assert main(dpo_args(tiny_model_dir, pairs, out, "--max_steps", "2", "--save_steps", "2")) == 0
    step = out / "checkpoints" / "step-2"
    final = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    loaded = AutoModelForCausalLM.from_pretrained(step).state_dict()
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert set(loaded) == set(final)
    assert all(torch.equal(loaded[k], final[k]) for k in final)            # the step-2 weights, exactly
    assert any(not torch.equal(loaded[k], start[k]) for k in start)
    assert load_file(step / "trainable.safetensors") == {}                   # the weights are not stored twice
    assert {"optimizer.pt", "scheduler.pt", "state.json", "rng-0.pt"} <= {p.name for p in step.iterdir()}


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory, tiny_model_dir, pairs):
    """A 3-step LoRA run checkpointing every step, and a run resumed from its step-1 checkpoint."""
    root = tmp_path_factory.mktemp("lora")
    lora = ["--lora", "--lora_r", "4", "--lora_dropout", "0.1", "--no-disable_dropout", "--learning_rate", "1e-2",
            "--max_steps", "3", "--save_steps", "1", "--save_total_limit", "0"]
    assert main(dpo_args(tiny_model_dir, pairs, root / "full", *lora)) == 0
    resume = str(root / "full" / "checkpoints" / "step-1")
    assert main(dpo_args(tiny_model_dir, pairs, root / "resumed", *lora, "--resume", resume)) == 0
    return root


def test_a_lora_step_checkpoint_is_a_peft_adapter(lora_runs, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    step = lora_runs / "full" / "checkpoints" / "step-3"
    assert (step / "adapter_config.json").is_file() and (step / "adapter_model.safetensors").is_file()
    ids = torch.tensor([[5, 9, 14, 3, 22, 7]])
    logits = {}
    for name, path in (("step-3", step), ("final", lora_runs / "full" / "model"),
                       ("step-1", lora_runs / "full" / "checkpoints" / "step-1")):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), path).eval()
        with torch.no_grad():
            logits[name] = model(ids).logits
            with model.disable_adapter():
                logits["base"] = model(ids).logits
    assert torch.equal(logits["step-3"], logits["final"])           # the last checkpoint is the final model
    assert (logits["step-1"] - logits["base"]).abs().max() > 1e-4     # step 1 already moved it...
    assert (logits["step-3"] - logits["step-1"]).abs().max() > 1e-4   # ...and steps 2-3 moved it further


def test_resuming_a_lora_run_from_a_step_checkpoint_is_exact(lora_runs):
    full = load_file(lora_runs / "full" / "model" / "adapter_model.safetensors")
    resumed = load_file(lora_runs / "resumed" / "model" / "adapter_model.safetensors")
    assert set(full) == set(resumed)
    for name in full:
        assert torch.equal(full[name], resumed[name]), name           # dropout RNG restored: bit for bit
    first = read_metrics(lora_runs / "full" / "metrics.jsonl")
    again = read_metrics(lora_runs / "resumed" / "metrics.jsonl")
    assert [r["step"] for r in again] == [2, 3]
    assert [r["loss"] for r in again] == [r["loss"] for r in first[1:]]
