"""The ``preftune`` command line: user errors exit 2 with a message (no traceback), and a real DPO run.

The user-error paths run the real entry point in subprocesses. They are started together, once per
module, so that their interpreter start-ups overlap; each test then inspects one finished run.
"""

import argparse
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import write_jsonl
from preftune.cli import build_parser, main
from toydata import make_toy_preferences

LN2 = math.log(2.0)
STEP_KEYS = {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
             "logps/rejected", "grad_norm", "learning_rate", "pairs/s", "tokens/s"}
TIMING_KEYS = {"pairs/s", "tokens/s"}

GOOD_ROW = {"prompt": "Describe the river in a few words:", "chosen": " calm kind", "rejected": " loud rude"}
MISSING_REJECTED = {"prompt": "Describe the city in a few words:", "chosen": " warm soft"}


def subprocess_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "KILL_AT_STEP")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               NO_COLOR="1", COLUMNS="200", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **extra)
    return env


@dataclass
class Run:
    cwd: Path
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory, tiny_model_dir):
    """Start every subprocess scenario at once, wait for all, return their results by name."""
    model = str(tiny_model_dir)
    scenarios = {}

    def scenario(name, args, setup=None, **env):
        cwd = tmp_path_factory.mktemp(name)
        if setup:
            setup(cwd)
        scenarios[name] = (cwd, args, env)

    scenario("missing_rejected",
             ["dpo", "--model_name_or_path", model, "--dataset", "bad.jsonl", "--output_dir", "out"],
             lambda d: write_jsonl(d / "bad.jsonl", [GOOD_ROW, GOOD_ROW | {"chosen": " kind"}, MISSING_REJECTED]))
    scenario("unknown_key", ["dpo", "--config", "run.yaml"],
             lambda d: (d / "run.yaml").write_text(f"model_name_or_path: {model}\ndataset: pairs.jsonl\n"
                                                   "output_dir: out\nlearnig_rate: 1.0e-5\n"))
    scenario("missing_dataset",
             ["dpo", "--model_name_or_path", model, "--dataset", "missing.jsonl", "--output_dir", "out"])
    scenario("check_bad", ["data", "check", "bad.jsonl", "--tokenizer", model],
             lambda d: write_jsonl(d / "bad.jsonl", [GOOD_ROW, MISSING_REJECTED]))
    scenario("check_missing", ["data", "check", "missing.jsonl", "--tokenizer", model])
    # A run that dies mid-training (SIGKILL after step 1 of 3) must not leave a model/ behind.
    scenario("killed",
             ["dpo", "--model_name_or_path", model, "--dataset", "pairs.jsonl", "--output_dir", "out",
              "--per_device_batch_size", "4", "--max_steps", "3", "--max_length", "64", "--logging_steps", "1",
              "--learning_rate", "1e-4"],
             lambda d: write_jsonl(d / "pairs.jsonl", make_toy_preferences(8)), KILL_AT_STEP="1")

    running = {name: (cwd, subprocess.Popen([sys.executable, "-m", "preftune.cli", *args], cwd=cwd,
                                            env=subprocess_env(**env), stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, text=True))
               for name, (cwd, args, env) in scenarios.items()}
    results = {}
    for name, (cwd, process) in running.items():
        try:
            stdout, stderr = process.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        results[name] = Run(cwd, process.returncode, stdout, stderr)
    return results


def assert_user_error(run: Run, *fragments: str) -> None:
    assert "Traceback" not in run.stderr, run.stderr
    assert run.returncode == 2, (run.returncode, run.stdout, run.stderr)
    assert "error:" in run.stderr
    for fragment in fragments:
        assert fragment in run.stderr, (fragment, run.stderr)


# ------------------------------------------------------------------ user errors, real entry point


def test_row_missing_rejected(cli_runs):
    run = cli_runs["missing_rejected"]
    assert_user_error(run, "bad.jsonl: row 3: field 'rejected': missing field")


def test_failed_run_leaves_no_model_dir(cli_runs):
    out = cli_runs["missing_rejected"].cwd / "out"
    assert not (out / "model").exists()
    assert not (out / "metrics.jsonl").exists()


def test_unknown_config_key(cli_runs):
    assert_user_error(cli_runs["unknown_key"], "run.yaml", "unknown option 'learnig_rate'",
                      "did you mean 'learning_rate'?")


def test_nonexistent_dataset(cli_runs):
    run = cli_runs["missing_dataset"]
    assert_user_error(run, "missing.jsonl: file not found")
    assert not (run.cwd / "out" / "model").exists()


def test_data_check_reports_invalid_rows_and_exits_2(cli_runs):
    run = cli_runs["check_bad"]
    assert_user_error(run, "bad.jsonl: 1 of 2 rows are invalid (pass --skip_invalid")   # it gates a pipeline
    assert "bad.jsonl: row 2: field 'rejected': missing field" in run.stdout
    assert "missing field" in run.stdout and "Invalid rows" in run.stdout
    assert "1 of 2 rows are invalid" in run.stdout


def test_data_check_missing_file_exits_2(cli_runs):
    assert_user_error(cli_runs["check_missing"], "missing.jsonl: file not found")


def test_killed_run_leaves_no_model_dir(cli_runs):
    run = cli_runs["killed"]
    assert run.returncode == -9, (run.returncode, run.stderr[-2000:])
    out = run.cwd / "out"
    assert (out / "config.json").is_file()          # it did start training...
    assert not (out / "model").exists()             # ...but never wrote a final model


def test_too_little_data_fails_cleanly_after_loading(tmp_path, tiny_model_dir, capsys):
    """4 pairs cannot fill one batch of 8: a user error raised after the models load, no model/ written."""
    data = write_jsonl(tmp_path / "few.jsonl", make_toy_preferences(4))
    out = tmp_path / "out"
    code = main(["dpo", "--model_name_or_path", str(tiny_model_dir), "--dataset", str(data), "--output_dir", str(out),
                 "--per_device_batch_size", "8", "--max_steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "fewer than one global batch of 8" in err
    assert not (out / "model").exists()


# ------------------------------------------------------------------ a successful run, in process


def dpo_flags(model_dir, data, out, max_steps=3) -> list[str]:
    return ["--model_name_or_path", str(model_dir), "--dataset", str(data), "--per_device_batch_size", "8",
            "--max_steps", str(max_steps), "--learning_rate", "1e-4", "--max_length", "64", "--logging_steps", "1",
            "--output_dir", str(out)]


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", make_toy_preferences(32))


@pytest.fixture(scope="module")
def flag_run(tmp_path_factory, tiny_model_dir, toy_data):
    out = tmp_path_factory.mktemp("flag-run") / "run"
    code = main(["dpo", *dpo_flags(tiny_model_dir, toy_data, out)])
    return code, out


def test_run_succeeds(flag_run):
    code, out = flag_run
    assert code == 0
    assert (out / "config.json").is_file() and (out / "summary.json").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3


def test_metrics_have_one_record_per_step(flag_run):
    _, out = flag_run
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    for record in records:
        missing = STEP_KEYS - set(record)
        assert not missing, missing
        assert all(math.isfinite(record[k]) for k in STEP_KEYS)
        assert record["pairs/s"] > 0 and record["tokens/s"] > 0
        assert 0.0 <= record["rewards/accuracies"] <= 1.0
        assert record["rewards/margins"] == pytest.approx(record["rewards/chosen"] - record["rewards/rejected"],
                                                          abs=1e-6)
    assert records[0]["learning_rate"] == pytest.approx(1e-4)


def test_first_step_loss_is_ln2(flag_run):
    """At step 1 the policy is the reference: every implicit reward is 0 and the sigmoid loss is ln 2."""
    _, out = flag_run
    first = read_metrics(out / "metrics.jsonl")[0]
    assert first["loss"] == pytest.approx(LN2, abs=1e-5)
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-5)
    assert first["rewards/rejected"] == pytest.approx(0.0, abs=1e-5)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    later = read_metrics(out / "metrics.jsonl")[-1]
    assert later["loss"] != first["loss"]           # training moved the policy


def test_saved_model_and_tokenizer_load(flag_run, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, out = flag_run
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(tiny_model_dir).get_vocab()
    assert tokenizer.pad_token == "<pad>" and tokenizer.eos_token == "</s>"
    trained, start = model.state_dict(), original.state_dict()
    assert set(trained) == set(start)
    assert any(not torch.equal(trained[k], start[k]) for k in start)     # weights were updated
    ids = tokenizer("Describe the river in a few words:", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer)) and torch.isfinite(logits).all()


def test_yaml_config_matches_flags(tmp_path, flag_run, tiny_model_dir, toy_data):
    _, flag_out = flag_run
    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(f"""
model_name_or_path: {tiny_model_dir}
dataset: {toy_data}
per_device_batch_size: 8
max_steps: 1
learning_rate: 1e-4
max_length: 64
logging_steps: 1
output_dir: {out}
""")
    assert main(["dpo", "--config", str(config)]) == 0
    from_yaml = read_metrics(out / "metrics.jsonl")[0]
    from_flags = read_metrics(flag_out / "metrics.jsonl")[0]
    assert from_yaml["loss"] == pytest.approx(LN2, abs=1e-5)
    assert from_yaml["loss"] == pytest.approx(from_flags["loss"], abs=1e-6)
    # same data order and model: the whole first step agrees, not just the loss (which is ln 2 regardless)
    for key in STEP_KEYS - TIMING_KEYS:
        assert from_yaml[key] == pytest.approx(from_flags[key], rel=1e-5, abs=1e-6), key
    saved = json.loads((out / "config.json").read_text())
    assert saved["learning_rate"] == 1e-4 and saved["max_length"] == 64


def test_data_check_json(tmp_path, tiny_model_dir, toy_data, capsys):
    assert main(["data", "check", str(toy_data), "--tokenizer", str(tiny_model_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows"] == 32 and report["kept"] == 32
    assert report["format"] == "standard" and report["skipped"] == {}
    assert report["source"] == str(toy_data)
    assert set(report["lengths"]) == {"prompt", "chosen", "rejected", "total"}


# ------------------------------------------------------------------ the command table


def _leaf_parsers(parser, path=()):
    """(words, parser) for every command the parser accepts, walking groups such as ``annotate token``."""
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subparsers:
        yield path, parser
        return
    for name, sub in subparsers[0].choices.items():
        yield from _leaf_parsers(sub, (*path, name))


def test_the_parser_has_exactly_the_commands_of_the_table():
    from preftune.commands.table import COMMANDS

    names = [command.name for command in COMMANDS]
    assert len(names) == len(set(names))
    leaves = dict(_leaf_parsers(build_parser()))
    assert set(leaves) == {tuple(name.split()) for name in names}
    for command in COMMANDS:
        assert leaves[tuple(command.name.split())].get_default("handler") is command.run


def test_help_lists_every_command_of_the_table(capsys, monkeypatch):
    from preftune.commands.table import COMMANDS, GROUPS

    monkeypatch.setenv("COLUMNS", "200")
    for name in [c.name for c in COMMANDS] + list(GROUPS):
        *parent, word = name.split()
        with pytest.raises(SystemExit) as info:
            main([*parent, "--help"])
        assert info.value.code == 0
        help_text = GROUPS[name][0] if name in GROUPS else next(c.help for c in COMMANDS if c.name == name)
        assert re.search(rf"^\s+{word}\s+{re.escape(help_text)}$", capsys.readouterr().out, re.M), name


def test_preftune_help_lists_every_top_level_command():
    from preftune.commands.table import COMMANDS

    done = subprocess.run([sys.executable, "-m", "preftune.cli", "--help"], capture_output=True, text=True,
                          env=subprocess_env(), timeout=120)
    assert done.returncode == 0
    listed = set(re.findall(r"^    ([\w-]+)(?:  |$)", done.stdout, re.M))   # a long name has its help below
    assert listed == {command.name.split()[0] for command in COMMANDS}


def test_every_listed_option_is_snake_case():
    for path, parser in _leaf_parsers(build_parser()):
        for action in parser._actions:
            shown = [s for s in action.option_strings if s not in getattr(action, "old_spellings", ())]
            bad = [s for s in shown if not re.fullmatch(r"-h|--help|--(no-)?[a-z0-9_]+", s)]
            assert bad == [], (path, bad)


ANNOTATE_SNAKE = [
    ["annotate", "serve", "--reward_model", "rm", "--rerank_interval", "5", "--max_body", "2048", "--lease_minutes",
     "3",
     "--secure_cookies", "--log_level", "debug"],
    ["annotate", "import", "rows.jsonl", "--project", "p", "--num_candidates", "3", "--max_new_tokens", "7", "--top_p",
     "0.9", "--top_k", "5", "--batch_size", "4"],
    ["annotate", "rank", "--reward_model", "rm", "--batch_size", "8"],
    ["annotate", "export", "--project", "p", "--output", "o.jsonl", "--min_votes", "2", "--margin_scale", "0.5"],
]


@pytest.mark.parametrize("snake", ANNOTATE_SNAKE, ids=lambda argv: argv[1])
def test_annotate_takes_snake_case_flags_and_the_old_kebab_spelling(snake, capsys, monkeypatch):
    kebab = [arg.replace("_", "-") if arg.startswith("--") else arg for arg in snake]
    assert kebab != snake
    parser = build_parser()
    new, old = parser.parse_args(snake), parser.parse_args(kebab)
    assert vars(new) == vars(old)
    given = {arg[2:] for arg in snake if arg.startswith("--")}
    assert all(getattr(new, name) not in (None, False) for name in given)
    # --help shows the snake_case spelling only
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit):
        parser.parse_args([*snake[:2], "--help"])
    text = capsys.readouterr().out
    assert all(f"--{name}" in text for name in given)
    assert not any(f"--{name.replace('_', '-')}" in text for name in given if "_" in name)
