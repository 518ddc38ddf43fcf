"""TRL's option names work in YAML and on the command line; options whose meaning differs are refused
with what to use instead; an unknown flag gets a "did you mean"; help texts list choices."""

import pytest

from preftune.cli import build_parser, main
from preftune.config import DPOConfig, GRPOConfig, PPOConfig, RewardConfig, SFTConfig, config_from_args, load_config
from preftune.errors import ConfigError

REQUIRED = {"model_name_or_path": "m", "dataset": "d.jsonl"}


def from_yaml(tmp_path, cls, text: str):
    path = tmp_path / "run.yaml"
    path.write_text("model_name_or_path: m\ndataset: d.jsonl\n" + text)
    return load_config(cls, path)


def from_flags(*words):
    args = build_parser().parse_args(list(words))
    return config_from_args(args.handler.args[0], args)


def test_trl_names_in_yaml(tmp_path):
    cfg = from_yaml(tmp_path, DPOConfig, """
per_device_train_batch_size: 4
num_train_epochs: 2
use_peft: true
lr_scheduler_type: constant_with_warmup
precompute_ref_log_probs: true
rpo_alpha: 0.5
bf16: true
gradient_checkpointing: true
resume_from_checkpoint: true
report_to: none
""")
    assert (cfg.per_device_batch_size, cfg.num_epochs, cfg.lora, cfg.lr_scheduler) == (4, 2.0, True, "constant")
    assert (cfg.precompute_ref, cfg.nll_weight, cfg.precision) == (True, 0.5, "bf16")
    assert (cfg.gradient_checkpointing, cfg.resume, cfg.report_to) == (True, "latest", [])


def test_trl_names_as_flags():
    cfg = from_flags("dpo", "--model_name_or_path", "m", "--dataset", "d.jsonl", "--per_device_train_batch_size", "4",
                     "--num_train_epochs", "3", "--use_peft", "--lr_scheduler_type", "cosine", "--bf16", "false",
                     "--resume_from_checkpoint", "out/checkpoints/step-2", "--rpo_alpha", "0.25",
                     "--precompute_ref_log_probs", "--gradient_checkpointing")
    assert (cfg.per_device_batch_size, cfg.num_epochs, cfg.lora, cfg.lr_scheduler) == (4, 3.0, True, "cosine")
    assert (cfg.precision, cfg.resume, cfg.nll_weight, cfg.precompute_ref) == ("fp32", "out/checkpoints/step-2", 0.25,
                                                                               True)
    assert cfg.gradient_checkpointing
    assert from_flags("dpo", "--model_name_or_path", "m", "--dataset", "d", "--fp16").precision == "fp16"
    resume = from_flags("dpo", "--model_name_or_path", "m", "--dataset", "d", "--resume_from_checkpoint").resume
    assert resume == "latest"


def test_each_command_maps_trl_names_to_its_own_options(tmp_path):
    assert from_yaml(tmp_path, PPOConfig, "max_completion_length: 20\nreward_function: m:f\n").max_new_tokens == 20
    assert from_yaml(tmp_path, PPOConfig, "response_length: 24\nreward_function: m:f\n").max_new_tokens == 24
    grpo = from_yaml(tmp_path, GRPOConfig, "max_completion_length: 20\nreward_funcs: [m:f]\n")
    assert grpo.max_completion_length == 20                      # GRPO's own option, as in TRL
    assert from_yaml(tmp_path, RewardConfig, "center_rewards_coefficient: 0.01\n").centering_coef == 0.01
    assert from_yaml(tmp_path, SFTConfig, "max_seq_length: 256\n").max_length == 256
    assert load_config(SFTConfig, overrides={"dataset_name": "d", "model_name_or_path": "m"}).dataset == "d"


@pytest.mark.parametrize("text, message", [
    ("max_completion_length: 64\n", "set max_length (and max_prompt_length for the prompt)"),
    ("per_device_eval_batch_size: 4\n", "held-out batches use per_device_batch_size"),
    ("reference_free: true\n", "loss_type simpo"),
    ("eval_strategy: steps\n", "set eval_steps"),
    ("num_train_epochs: 2\nnum_epochs: 3\n", "both 'num_train_epochs' (TRL's name) and 'num_epochs' are given"),
    ("bf16: true\nfp16: true\n", "bf16 and fp16 cannot both be true"),
    ("lr_scheduler_type: polynomial\n", "lr_scheduler must be one of linear, cosine, constant, got 'polynomial'"),
    ("use_peft: maybe\n", "'lora' must be bool"),
    ("per_device_train_batch_size: 0\n", "per_device_batch_size must be positive"),
])
def test_trl_names_with_another_meaning_are_refused_with_the_reason(tmp_path, text, message):
    with pytest.raises(ConfigError) as error:
        from_yaml(tmp_path, DPOConfig, text)
    assert message in str(error.value)


def test_a_refused_trl_flag_exits_2_with_the_reason(capsys):
    assert main(["dpo", "--model_name_or_path", "m", "--dataset", "d", "--max_completion_length", "64"]) == 2
    err = capsys.readouterr().err
    assert "'max_completion_length' (a TRL option) is not supported" in err and "Traceback" not in err


def test_an_unknown_flag_gets_did_you_mean_and_exit_2(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["dpo", "--model_name_or_path", "m", "--learnig_rate", "1e-5"])
    assert stop.value.code == 2
    assert "unknown option '--learnig_rate' (did you mean '--learning_rate'?)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        main(["sft", "--per_device_train_batchsize", "4"])
    assert stop.value.code == 2
    assert "(did you mean '--per_device_train_batch_size'?)" in capsys.readouterr().err


def test_an_unknown_yaml_name_suggests_the_trl_name_too(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'num_train_epochs'"):
        from_yaml(tmp_path, DPOConfig, "num_train_epoch: 2\n")


def command_help(capsys, *words) -> str:
    with pytest.raises(SystemExit):
        main([*words, "--help"])
    return " ".join(capsys.readouterr().out.split())


def test_help_lists_choices_hides_aliases_and_speaks_of_examples(capsys):
    text = command_help(capsys, "dpo")
    assert "--lr_scheduler {linear,cosine,constant}" in text and "One of: linear, cosine, constant." in text
    assert "per_device_train_batch_size" not in text                     # accepted, not listed
    assert "Training examples per device per forward pass" in text
    assert "Pairs per device" not in command_help(capsys, "sft")


def test_every_eval_option_is_described():
    parser = build_parser()
    args = parser.parse_args(["eval", "--model", "m", "--prompts", "p", "--output_dir", "o"])
    undocumented = [a.dest for a in args.parser._actions if not a.help]
    assert undocumented == []
