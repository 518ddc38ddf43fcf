"""Run configuration: YAML + flags, type coercion, validation, sanity warnings and --help coverage."""

import dataclasses
import re

import pytest
import yaml

from preftune.cli import build_parser, main
from preftune.config import DPOConfig, config_from_args, config_to_dict, load_config, parse_constraint_spec
from preftune.errors import ConfigError, PreftuneError

REQUIRED = {"model_name_or_path": "some/model", "dataset": "pairs.jsonl"}


def write_yaml(tmp_path, text: str, name: str = "run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def make(**overrides) -> DPOConfig:
    return load_config(DPOConfig, None, {**REQUIRED, **overrides})


def parse_flags(*flags: str) -> DPOConfig:
    return config_from_args(DPOConfig, build_parser().parse_args(["dpo", *flags]))


# ------------------------------------------------------------------ YAML loading and flags


def test_yaml_values_are_read_with_their_types(tmp_path):
    path = write_yaml(tmp_path, """
model_name_or_path: tiny
dataset: pairs.jsonl
beta: 1              # an int in YAML, a float option
learning_rate: 5e-6  # PyYAML reads this as a string: it must still become a float
max_length: 128
max_prompt_length: 64
lora: true
lora_r: 4
loss_type: ipo
lora_target_modules: q_proj   # a single string becomes a one-element list
report_to: [tensorboard]
constraints: ["mod:fn=0.5"]
eval_dataset: null
resume: latest
""")
    cfg = load_config(DPOConfig, path)
    assert cfg.model_name_or_path == "tiny" and cfg.dataset == "pairs.jsonl"
    assert cfg.beta == 1.0 and type(cfg.beta) is float
    assert cfg.learning_rate == pytest.approx(5e-6) and type(cfg.learning_rate) is float
    assert cfg.max_length == 128 and type(cfg.max_length) is int
    assert cfg.max_prompt_length == 64
    assert cfg.lora is True and cfg.lora_r == 4 and cfg.loss_type == "ipo"
    assert cfg.lora_target_modules == ["q_proj"]
    assert cfg.report_to == ["tensorboard"]
    assert cfg.constraints == ["mod:fn=0.5"]
    assert cfg.eval_dataset is None and cfg.resume == "latest"
    # untouched options keep their defaults
    assert cfg.per_device_batch_size == DPOConfig.per_device_batch_size
    assert cfg.label_smoothing == 0.0


def test_overrides_win_over_yaml(tmp_path):
    path = write_yaml(tmp_path, "model_name_or_path: tiny\ndataset: a.jsonl\nbeta: 0.2\nlearning_rate: 5.0e-6\n")
    cfg = load_config(DPOConfig, path, {"beta": 0.3, "dataset": "b.jsonl"})
    assert (cfg.beta, cfg.dataset, cfg.learning_rate) == (0.3, "b.jsonl", 5e-6)


def test_flags_override_yaml_and_unset_flags_do_not(tmp_path):
    path = write_yaml(tmp_path, "model_name_or_path: tiny\ndataset: a.jsonl\nbeta: 0.2\nlearning_rate: 5.0e-6\n"
                                "lora: true\nmax_prompt_length: 32\n")
    cfg = parse_flags("--config", str(path), "--beta", "0.4", "--no-lora", "--max_prompt_length", "none",
                      "--report_to", "tensorboard", "tensorboard")
    assert cfg.beta == 0.4 and cfg.lora is False and cfg.max_prompt_length is None
    assert cfg.report_to == ["tensorboard"]
    assert cfg.learning_rate == 5e-6      # from the YAML: an unset flag must not reset it to the default
    assert cfg.model_name_or_path == "tiny"


def test_flags_alone():
    cfg = parse_flags("--model_name_or_path", "m", "--dataset", "d.jsonl", "--max_steps", "3",
                      "--per_device_batch_size", "4", "--resume")
    assert (cfg.max_steps, cfg.per_device_batch_size, cfg.resume) == (3, 4, "latest")


def test_config_round_trips_through_yaml(tmp_path):
    original = make(beta=0.25, lora=True, report_to=["tensorboard"], constraints=["a.b:c=2"], max_prompt_length=16)
    path = write_yaml(tmp_path, yaml.safe_dump(config_to_dict(original)))
    assert load_config(DPOConfig, path) == original


def test_unknown_yaml_key_suggests_the_closest_option(tmp_path):
    path = write_yaml(tmp_path, "model_name_or_path: tiny\ndataset: a.jsonl\nlearnig_rate: 1.0e-5\n")
    with pytest.raises(ConfigError) as info:
        load_config(DPOConfig, path)
    message = str(info.value)
    assert str(path) in message and "unknown option 'learnig_rate'" in message
    assert "did you mean 'learning_rate'?" in message


def test_unknown_yaml_key_without_a_close_match(tmp_path):
    path = write_yaml(tmp_path, "model_name_or_path: tiny\ndataset: a.jsonl\nzzzzzz: 1\n")
    with pytest.raises(ConfigError, match="unknown option 'zzzzzz'") as info:
        load_config(DPOConfig, path)
    assert "did you mean" not in str(info.value)


def test_unknown_override_is_rejected():
    with pytest.raises(ConfigError, match="unknown option 'bta'"):
        load_config(DPOConfig, None, {**REQUIRED, "bta": 0.1})


@pytest.mark.parametrize("line, option", [
    ('beta: "high"', "beta"),
    ("lora: 3", "lora"),
    ('lora: "yes"', "lora"),
    ("max_steps: 2.5", "max_steps"),
    ("max_length: true", "max_length"),
    ("per_device_batch_size: [8]", "per_device_batch_size"),
    ("constraints: 3", "constraints"),
    ("learning_rate: {a: 1}", "learning_rate"),
])
def test_wrong_type_names_the_option(tmp_path, line, option):
    path = write_yaml(tmp_path, f"model_name_or_path: tiny\ndataset: a.jsonl\n{line}\n")
    with pytest.raises(ConfigError) as info:
        load_config(DPOConfig, path)
    message = str(info.value)
    assert f"'{option}' must be" in message and str(path) in message


def test_wrong_type_override_says_command_line():
    with pytest.raises(ConfigError, match=r"command line: 'beta' must be float, got 'high'"):
        load_config(DPOConfig, None, {**REQUIRED, "beta": "high"})


@pytest.mark.parametrize("text, match", [
    ("model_name_or_path: [unclosed\n", "not valid YAML"),
    ("- a\n- b\n", "expected a mapping"),
])
def test_malformed_yaml_file(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_config(DPOConfig, write_yaml(tmp_path, text))


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(DPOConfig, tmp_path / "nope.yaml")


@pytest.mark.parametrize("overrides, match", [
    ({"loss_type": "foo"}, "unknown loss_type 'foo'; the preference losses are: sigmoid, "),
    ({"precision": "fp8"}, "precision must be one of"),
    ({"truncation_mode": "middle"}, "truncation_mode must be one of"),
    ({"lr_scheduler": "step"}, "lr_scheduler must be one of"),
    ({"label_smoothing": 0.6}, "label_smoothing must be in"),
    ({"label_smoothing": 0.5}, "label_smoothing must be in"),
    ({"label_smoothing": -0.1}, "label_smoothing must be in"),
    ({"eval_fraction": 1.5}, "eval_fraction must be in"),
    ({"eval_fraction": 1.0}, "eval_fraction must be in"),
    ({"eval_fraction": -0.1}, "eval_fraction must be in"),
    ({"per_device_batch_size": -1}, "per_device_batch_size must be positive"),
    ({"per_device_batch_size": 0}, "per_device_batch_size must be positive"),
    ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps must be positive"),
    ({"max_length": 0}, "max_length must be positive"),
    ({"logging_steps": 0}, "logging_steps must be positive"),
    ({"logprob_chunk_size": -5}, "logprob_chunk_size must be positive"),
    ({"max_length": 64, "max_prompt_length": 64}, r"max_prompt_length \(64\) must be smaller than max_length \(64\)"),
    ({"max_length": 64, "max_prompt_length": 100}, "max_prompt_length"),
    ({"learning_rate": 0.0}, "learning_rate must be a positive number"),
    ({"learning_rate": -1e-5}, "learning_rate must be a positive number"),
    ({"learning_rate": float("nan")}, "learning_rate must be a positive number"),
    ({"num_epochs": -1.0}, "num_epochs must be a positive number"),
    ({"max_grad_norm": float("nan")}, "max_grad_norm must be a non-negative number"),
    ({"lora_dropout": 1.0}, "lora_dropout must be in"),
    ({"lora_r": 0}, "lora_r must be positive"),
    ({"constraints": ["m:f="]}, "is not a number"),
    ({"constraints": ["m:f=nan"]}, "must be a finite number"),
    ({"beta": 0.0}, "beta must be a positive number"),
    ({"beta": -0.1}, "beta must be a positive number"),
    ({"beta": float("inf")}, "beta must be a positive number"),
    ({"warmup_ratio": 1.5}, "warmup_ratio must be in"),
    ({"report_to": ["mlflow"]}, "unknown tracker 'mlflow'"),
    ({"constraints": ["no_colon"]}, "constraint 'no_colon' must look like"),
])
def test_invalid_values(overrides, match):
    with pytest.raises(ConfigError, match=match):
        make(**overrides)


def test_invalid_choice_in_yaml(tmp_path):
    path = write_yaml(tmp_path, "model_name_or_path: tiny\ndataset: a.jsonl\nf_divergence_type: foo\n")
    with pytest.raises(ConfigError, match="f_divergence_type must be one of"):
        load_config(DPOConfig, path)


def test_boundary_values_are_accepted():
    cfg = make(label_smoothing=0.49, eval_fraction=0.0, max_length=64, max_prompt_length=63, warmup_ratio=1.0,
               loss_type="simpo", precision="fp32")
    assert cfg.max_prompt_length == 63


@pytest.mark.parametrize("missing, match", [("model_name_or_path", "model_name_or_path is required"),
                                            ("dataset", "dataset is required")])
def test_missing_model_or_dataset(missing, match):
    values = {k: v for k, v in REQUIRED.items() if k != missing}
    with pytest.raises(ConfigError, match=match):
        load_config(DPOConfig, None, values)


def test_empty_yaml_file_reports_the_missing_model(tmp_path):
    with pytest.raises(ConfigError, match="model_name_or_path is required"):
        load_config(DPOConfig, write_yaml(tmp_path, ""))


def test_null_model_in_yaml_is_missing(tmp_path):
    path = write_yaml(tmp_path, "model_name_or_path: null\ndataset: a.jsonl\n")
    with pytest.raises(ConfigError, match="model_name_or_path is required"):
        load_config(DPOConfig, path)


def test_config_errors_are_user_errors():
    assert issubclass(ConfigError, PreftuneError) and ConfigError.exit_code == 2


def test_bad_flag_values_are_argparse_errors(capsys):
    for flags in (["--beta", "high"], ["--f_divergence_type", "foo"], ["--max_steps", "2.5"]):
        with pytest.raises(SystemExit) as info:
            main(["dpo", "--model_name_or_path", "m", "--dataset", "d.jsonl", *flags])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert flags[0] in err and "Traceback" not in err
    # loss names (one, or several separated by commas) are checked against the loss table: exit 2 too
    assert main(["dpo", "--model_name_or_path", "m", "--dataset", "d.jsonl", "--loss_type", "sigmoid,foo"]) == 2
    err = capsys.readouterr().err
    assert "unknown loss_type 'foo'" in err and "Traceback" not in err


def test_config_error_through_main_exits_2(tmp_path, capsys):
    path = write_yaml(tmp_path, "model_name_or_path: tiny\ndataset: a.jsonl\nlabel_smoothing: 0.6\n")
    assert main(["dpo", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "label_smoothing must be in [0, 0.5), got 0.6" in err


# ------------------------------------------------------------------ constraint specs


@pytest.mark.parametrize("spec, expected", [
    ("m:f", ("m:f", 1.0)),
    ("m:f=0.5", ("m:f", 0.5)),
    ("pkg.sub.mod:penalty=2", ("pkg.sub.mod:penalty", 2.0)),
    ("path/to/file.py:fn=-1e-3", ("path/to/file.py:fn", -1e-3)),
])
def test_constraint_spec_parsing(spec, expected):
    assert parse_constraint_spec(spec) == expected


@pytest.mark.parametrize("spec, match", [
    ("mf", "must look like 'module:function'"),
    (":f", "must look like"),
    ("m:", "must look like"),
    ("", "must look like"),
    ("=0.5", "must look like"),
    ("m:f=abc", "weight 'abc' is not a number"),
    ("m:f=0.5=1", "is not a number"),
])
def test_bad_constraint_specs(spec, match):
    with pytest.raises(ConfigError, match=match):
        parse_constraint_spec(spec)


def test_constraints_are_validated_with_the_config():
    assert make(constraints=["a:b", "c.d:e=0.1"]).constraints == ["a:b", "c.d:e=0.1"]
    with pytest.raises(ConfigError, match="weight 'x' is not a number"):
        make(constraints=["a:b", "c:d=x"])


# ------------------------------------------------------------------ sanity warnings


def test_sensible_defaults_produce_no_warnings():
    assert make().sanity_warnings() == []
    assert make(beta=0.5, learning_rate=5e-6, per_device_batch_size=4,
                gradient_accumulation_steps=16).sanity_warnings() == []


@pytest.mark.parametrize("overrides, word", [
    ({"beta": 5.0}, "beta=5.0"),
    ({"beta": 0.001}, "beta=0.001"),
    ({"learning_rate": 1e-2}, "learning_rate=0.01"),
    ({"learning_rate": 1e-9}, "learning_rate=1e-09"),
    ({"per_device_batch_size": 1}, "1 pairs per optimiser step"),
    ({"per_device_batch_size": 512, "gradient_accumulation_steps": 4}, "2048 pairs"),
])
def test_each_odd_value_gives_one_warning(overrides, word):
    notes = make(**overrides).sanity_warnings()
    assert len(notes) == 1 and word in notes[0]


def test_lora_learning_rates_are_judged_against_lora_s_range():
    assert make(learning_rate=3e-4, lora=True).sanity_warnings() == []      # usual for an adapter
    assert "learning_rate=0.0003" in make(learning_rate=3e-4).sanity_warnings()[0]   # high for all weights
    assert "for LoRA" in make(learning_rate=1e-2, lora=True).sanity_warnings()[0]


def test_warnings_accumulate():
    notes = make(beta=5.0, learning_rate=1e-2, per_device_batch_size=1).sanity_warnings()
    assert len(notes) == 3


def test_small_batch_with_accumulation_is_fine():
    assert make(per_device_batch_size=1, gradient_accumulation_steps=8).sanity_warnings() == []


def test_simpo_uses_its_own_beta_range():
    assert make(loss_type="simpo", beta=2.0).sanity_warnings() == []
    assert make(loss_type="simpo", beta=10.0).sanity_warnings() == []
    assert "beta=0.1" in " ".join(make(loss_type="simpo", beta=0.1).sanity_warnings())
    assert "beta=20.0" in " ".join(make(loss_type="simpo", beta=20.0).sanity_warnings())
    # ... and the DPO range does not stretch to SimPO's
    assert "beta=2.0" in " ".join(make(loss_type="sigmoid", beta=2.0).sanity_warnings())


# ------------------------------------------------------------------ documentation


def test_every_field_has_help_text():
    fields = dataclasses.fields(DPOConfig)
    assert len(fields) > 40
    missing = [f.name for f in fields if not str(f.metadata.get("help", "")).strip()]
    assert missing == []


def test_dpo_help_lists_every_field(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["dpo", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "--config" in text
    absent = [f.name for f in dataclasses.fields(DPOConfig) if not re.search(rf"--{f.name}(?![\w-])", text)]
    assert absent == []
    # bool options come with their negation
    assert "--no-lora" in text and "--no-disable_dropout" in text
    # a field's help text appears with its default
    assert "Strength of the KL constraint" in text


def test_every_command_help_renders(capsys):
    """argparse formats help texts with %: a percent sign in any option's help must not break ``--help``."""
    from preftune.commands.table import COMMANDS

    for command in COMMANDS:
        with pytest.raises(SystemExit) as info:
            build_parser().parse_args([*command.name.split(), "--help"])
        assert info.value.code == 0, command.name
    text = capsys.readouterr().out
    assert "20% highest-entropy" in text and "~8% slower" in text
