"""SFT: exact completion masks, row validation, learning, token-weighted eval, exact resume, the CLI."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import write_jsonl
from preftune.cli import main
from preftune.config import SFTConfig
from preftune.data import Records
from preftune.data.text import SFTSettings, tokenize_sft
from preftune.errors import DataError
from preftune.recipes.sft import train_sft
from toydata import make_toy_preferences

pytestmark = pytest.mark.usefixtures("one_thread")


def toy_sft_rows(n, seed=0, conversational=False):
    rows = make_toy_preferences(n, seed=seed, conversational=conversational)
    if conversational:
        return [{"messages": r["prompt"] + r["chosen"]} for r in rows]
    return [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows]


def records(rows, name="sft.jsonl"):
    return Records(name, rows, list(range(1, len(rows) + 1)))


def ids(tokenizer, text, special=False):
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def config(model_dir, data, out, **overrides) -> SFTConfig:
    values = dict(model_name_or_path=str(model_dir), dataset=str(data), output_dir=str(out), per_device_batch_size=8,
                  learning_rate=3e-3, max_length=64, logging_steps=1, max_steps=6, warmup_ratio=0.0, seed=0)
    values.update(overrides)
    return SFTConfig(**values)


def subprocess_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "KILL_AT_STEP")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               NO_COLOR="1", COLUMNS="200", PYTHONWARNINGS="ignore", **extra)
    return env


RESUME_SETTINGS = dict(per_device_batch_size=4, learning_rate=3e-3, max_length=48, max_steps=8, save_steps=3,
                       logging_steps=1, lr_scheduler="cosine", warmup_steps=2, packing=True, eval_fraction=0.2,
                       eval_steps=4, seed=0)


def as_flags(settings: dict) -> list[str]:
    flags = []
    for key, value in settings.items():
        flags += [f"--{key}"] if value is True else [f"--{key}", str(value)]
    return flags


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory, tiny_model_dir):
    """The subprocess scenarios, started together so that their interpreter start-ups overlap."""
    root = tmp_path_factory.mktemp("sft-cli")
    data = write_jsonl(root / "train.jsonl", toy_sft_rows(64, seed=1))
    bad = write_jsonl(root / "bad.jsonl", toy_sft_rows(3) + [{"prompt": "Describe the city:", "completion": 7}])
    model = ["--model_name_or_path", str(tiny_model_dir)]
    scenarios = {
        "killed": (["sft", *model, "--dataset", str(data), "--output_dir", str(root / "resumed"),
                    *as_flags(RESUME_SETTINGS)],
                   {"KILL_AT_STEP": "5", "OMP_NUM_THREADS": "1"}),  # one thread, as in-process
        "bad_row": (["sft", *model, "--dataset", str(bad), "--output_dir", str(root / "bad")],
                    {"OMP_NUM_THREADS": "1"}),
    }
    running = {name: subprocess.Popen([sys.executable, "-m", "preftune.cli", *args], env=subprocess_env(**env),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for name, (args, env) in scenarios.items()}
    results = {name: (p.wait(timeout=300), *p.communicate()) for name, p in running.items()}
    return root, data, results


# ------------------------------------------------------------------ tokenisation and masks


def test_completion_only_mask_on_a_hand_example(tiny_tokenizer):
    prompt, completion = "Tell me about the river. It is ", "gentle"
    eos = tiny_tokenizer.eos_token_id
    [example], _ = tokenize_sft(records([{"prompt": prompt, "completion": completion}]), tiny_tokenizer, SFTSettings())
    p, c = ids(tiny_tokenizer, prompt, special=True), ids(tiny_tokenizer, completion)
    assert example.input_ids == p + c + [eos]  # tokenised apart: the prompt ids are an exact prefix
    assert example.input_ids != ids(tiny_tokenizer, prompt + completion, special=True) + [eos]
    assert example.loss_mask == [False] * len(p) + [True] * (len(c) + 1)
    [full], _ = tokenize_sft(records([{"prompt": prompt, "completion": completion}]), tiny_tokenizer,
                             SFTSettings(completion_only_loss=False))
    assert full.input_ids == example.input_ids and all(full.loss_mask)


def test_multi_turn_trains_every_assistant_turn_and_nothing_else(tiny_tokenizer):
    messages = [{"role": "system", "content": "Be calm."}, {"role": "user", "content": "Describe the river"},
                {"role": "assistant", "content": "gentle kind"}, {"role": "user", "content": "And the city?"},
                {"role": "assistant", "content": "warm soft"}]
    [example], _ = tokenize_sft(records([{"messages": messages}]), tiny_tokenizer, SFTSettings())
    eos = tiny_tokenizer.eos_token_id
    pieces = [(ids(tiny_tokenizer, "<s><|system|>Be calm.<|user|>Describe the river<|assistant|>"), False),
              (ids(tiny_tokenizer, "gentle kind") + [eos], True),
              (ids(tiny_tokenizer, "<|user|>And the city?<|assistant|>"), False),
              (ids(tiny_tokenizer, "warm soft") + [eos], True)]
    assert example.input_ids == sum((p for p, _ in pieces), [])
    assert example.loss_mask == sum(([t] * len(p) for p, t in pieces), [])
    trained = [i for i, m in zip(example.input_ids, example.loss_mask) if m]
    assert tiny_tokenizer.decode(trained) == "gentle kind</s>warm soft</s>"

    # prompt/completion given as message lists: the completion is trained, the prompt is not
    row = {"prompt": messages[:2], "completion": messages[2:3]}
    [pc], _ = tokenize_sft(records([row]), tiny_tokenizer, SFTSettings())
    assert pc.input_ids == pieces[0][0] + pieces[1][0]
    assert pc.loss_mask == [False] * len(pieces[0][0]) + [True] * len(pieces[1][0])


def test_truncation_modes(tiny_tokenizer):
    row = {"prompt": "Describe the weather in a few words:", "completion": " gentle kind quiet warm soft"}
    [whole], _ = tokenize_sft(records([row]), tiny_tokenizer, SFTSettings())
    n = len(whole.input_ids)
    [end], _ = tokenize_sft(records([row]), tiny_tokenizer, SFTSettings(max_length=n - 4))
    settings = SFTSettings(max_length=n - 4, truncation_mode="keep_start")
    [start], _ = tokenize_sft(records([row]), tiny_tokenizer, settings)
    [short], _ = tokenize_sft(records([row]), tiny_tokenizer, SFTSettings(max_prompt_length=3))
    assert end.input_ids == whole.input_ids[4:] and end.loss_mask == whole.loss_mask[4:]
    assert start.input_ids == whole.input_ids[:n - 4] and start.loss_mask == whole.loss_mask[:n - 4]
    assert short.input_ids == whole.input_ids[whole.loss_mask.index(True) - 3:]
    with pytest.raises(DataError, match="row 1: field 'completion': too long: needs"):
        tokenize_sft(records([row]), tiny_tokenizer, SFTSettings(max_length=n - 1, truncation_mode="error"))
    with pytest.raises(DataError, match="no token is left to train on"):
        tokenize_sft(records([row]), tiny_tokenizer, SFTSettings(max_length=4, truncation_mode="keep_start"))


BAD_ROWS = [
    ({"prompt": "Describe the city:"}, "row 2: field 'completion': missing field"),
    ({"prompt": "Describe the city:", "completion": ["calm"]},
     "row 2: field 'completion': wrong type: expected a string like the prompt"),
    ({"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant"}]},
     "row 2: field 'completion': malformed message 1: no 'content'"),
    ({"prompt": 3, "completion": " calm"}, "row 2: field 'prompt': wrong type: expected a string, found a number"),
    ({"prompt": "Describe the city:", "completion": "  "}, "row 2: field 'completion': empty completion"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "row 2: field 'messages': mixed formats"),
]


@pytest.mark.parametrize("bad, message", BAD_ROWS)
def test_bad_rows_name_file_row_and_field(tiny_tokenizer, bad, message):
    rows = toy_sft_rows(1) + [bad] + toy_sft_rows(2)
    with pytest.raises(DataError, match=f"^sft.jsonl: {message}"):
        tokenize_sft(records(rows), tiny_tokenizer, SFTSettings())
    kept, report = tokenize_sft(records(rows), tiny_tokenizer, SFTSettings(), skip_invalid=True)
    assert [e.row for e in kept] == [1, 3, 4] and report.kept == 3 and report.total == 4


def test_bad_conversations(tiny_tokenizer):
    good = toy_sft_rows(1, conversational=True)
    cases = [([{"role": "user", "content": "hi"}], "no assistant message"),
             ([{"role": "assistant", "content": "hi"}], "message 1 is from the assistant"),
             ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}],
              "message 2 (assistant) has empty"),
             ([{"role": "user"}], "malformed message 1: no 'content'"),
             ("hello", "wrong type: expected a list of messages")]
    for messages, message in cases:
        with pytest.raises(DataError, match=f"sft.jsonl: row 2: field 'messages': .*{re.escape(message)}"):
            tokenize_sft(records(good + [{"messages": messages}]), tiny_tokenizer, SFTSettings())


# ------------------------------------------------------------------ training


def metric_lines(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_sft_learns_with_token_weighted_eval_loss(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    train = write_jsonl(tmp_path / "train.jsonl", toy_sft_rows(96, seed=1, conversational=True))
    held = write_jsonl(tmp_path / "eval.jsonl", toy_sft_rows(13, seed=2, conversational=True))  # 13: uneven batches
    cfg = config(tiny_model_dir, train, tmp_path / "run", eval_dataset=str(held), eval_split="train",
                 max_steps=-1, num_epochs=2, eval_on_start=True, per_device_batch_size=6, learning_rate=1e-2)
    result = train_sft(cfg)
    lines = metric_lines(tmp_path / "run")
    before, after = lines[0], result.train.eval_metrics
    assert before["step"] == 0 and after["eval/loss"] < 0.6 * before["eval/loss"]
    assert after["eval/perplexity"] == pytest.approx(math.exp(after["eval/loss"]))

    # eval/loss is the mean NLL over every held-out completion token, whatever the batch split
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples, _ = tokenize_sft(records(toy_sft_rows(13, seed=2, conversational=True)), tokenizer, SFTSettings())
    nll, count = 0.0, 0
    with torch.no_grad():
        for e in examples:
            logp = torch.log_softmax(model(torch.tensor([e.input_ids])).logits[0, :-1], -1)
            picked = logp.gather(-1, torch.tensor(e.input_ids[1:])[:, None])[:, 0]
            mask = torch.tensor(e.loss_mask[1:])
            nll, count = nll - float(picked[mask].sum()), count + int(mask.sum())
    assert before["eval/loss"] == pytest.approx(nll / count, abs=1e-5)

    steps = [line for line in lines if "loss" in line]
    assert {"loss", "grad_norm", "learning_rate", "samples/s", "tokens/s"} <= set(steps[0])
    assert steps[-1]["loss"] < steps[0]["loss"]
    saved = AutoModelForCausalLM.from_pretrained(result.model_dir)
    assert saved.config.vocab_size == model.config.vocab_size


def test_lora_sft_saves_an_adapter(tiny_model_dir, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", toy_sft_rows(32, seed=1))
    result = train_sft(config(tiny_model_dir, train, tmp_path / "lora", lora=True, lora_r=4, max_steps=3, packing=True))
    assert (result.model_dir / "adapter_config.json").is_file()
    assert not (result.model_dir / "model.safetensors").exists()


def test_killed_run_resumes_to_the_same_final_weights(cli_runs, tiny_model_dir, tmp_path):
    root, data, results = cli_runs
    code, _, stderr = results["killed"]
    assert code == -9, stderr  # SIGKILL during step 5: the last checkpoint is step 3
    assert (root / "resumed" / "checkpoints" / "step-3" / "state.json").is_file()
    full = train_sft(config(tiny_model_dir, data, tmp_path / "full", **RESUME_SETTINGS))
    resumed = train_sft(config(tiny_model_dir, data, root / "resumed", resume="latest", **RESUME_SETTINGS))
    a = load_file(full.model_dir / "model.safetensors")
    b = load_file(resumed.model_dir / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    losses = [[line["loss"] for line in metric_lines(r.run_dir) if "loss" in line] for r in (full, resumed)]
    assert len(losses[1]) == 8 and losses[1] == pytest.approx(losses[0], abs=1e-6)
    assert resumed.train.eval_metrics["eval/loss"] == pytest.approx(full.train.eval_metrics["eval/loss"], abs=1e-6)
    start = load_file(Path(tiny_model_dir) / "model.safetensors")
    assert any(not torch.allclose(start[n], a[n]) for n in a)


# ------------------------------------------------------------------ command line


def test_bad_row_exits_2_naming_file_row_and_field(cli_runs):
    root, _, results = cli_runs
    code, stdout, stderr = results["bad_row"]
    assert code == 2 and "Traceback" not in stderr, stderr
    assert f"{root / 'bad.jsonl'}: row 4: field 'completion': wrong type: expected a string, found a number" in stderr
    assert not (root / "bad" / "model").exists()


def test_help_and_yaml_config(tiny_model_dir, tmp_path, capsys):
    for command in ("sft", "pretrain"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
    shown = capsys.readouterr().out
    assert "--completion_only_loss" in shown and "--packing" in shown and "--model_config" in shown

    train = write_jsonl(tmp_path / "train.jsonl", toy_sft_rows(16, seed=1))
    (tmp_path / "run.yaml").write_text(f"model_name_or_path: {tiny_model_dir}\ndataset: {train}\n"
                                       f"output_dir: {tmp_path / 'out'}\nmax_steps: 2\nper_device_batch_size: 4\n"
                                       "packing: true\nmax_length: 64\n")
    assert main(["sft", "--config", str(tmp_path / "run.yaml"), "--max_steps", "3"]) == 0
    assert "model saved to" in capsys.readouterr().out
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["max_steps"] == 3 and saved["packing"] is True
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["steps"] == 3
