"""TRL's dataset layouts with extra columns, scores as margins, and ``data check --kind`` for every trainer's data."""

import json

import pytest

from preftune.cli import main
from preftune.data import TokenizeSettings, load_records, tokenize_preferences
from preftune.data.columns import scores_as_margins
from preftune.data.kto import tokenize_kto
from preftune.data.text import SFTSettings, tokenize_sft

# ultrafeedback_binarized without its prompt column (implicit prompt) and with it
SCORED = [{"chosen": "Q: river? A: calm", "rejected": "Q: river? A: loud", "score_chosen": 8.0, "score_rejected": 3.5},
          {"chosen": "Q: city? A: warm", "rejected": "Q: city? A: cold", "score_chosen": 6.0, "score_rejected": 6.5}]
EXPLICIT = [{"prompt": "river?", "chosen": " calm", "rejected": " loud", "prompt_id": "a1", "score_chosen": 9}]
KTO_ROWS = [{"prompt": "river?", "completion": " calm", "label": True, "source": "web"},
            {"prompt": "city?", "completion": " cold", "label": False, "source": "web"}]
SFT_ROWS = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "id": 1}]
PROMPT_ROWS = [{"prompt": "river?", "answer": "calm", "completions": ["x"]}, {"prompt": "city?", "answer": "warm"}]


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_extra_columns_are_noted_not_refused(tmp_path, tiny_tokenizer, capsys):
    settings = TokenizeSettings()
    pairs, _ = tokenize_preferences(load_records(write(tmp_path / "uf.jsonl", SCORED)), tiny_tokenizer, settings)
    assert len(pairs) == 2 and [p.margin for p in pairs] == [0.0, 0.0]          # scores not read by default
    assert "columns 'score_chosen', 'score_rejected' not used in training" in capsys.readouterr().err
    pairs, _ = tokenize_preferences(load_records(write(tmp_path / "x.jsonl", EXPLICIT)), tiny_tokenizer, settings)
    assert len(pairs) == 1 and "'prompt_id', 'score_chosen' not used" in capsys.readouterr().err
    examples, _ = tokenize_kto(load_records(write(tmp_path / "k.jsonl", KTO_ROWS)), tiny_tokenizer, settings)
    assert len(examples) == 2 and "column 'source' not used in training" in capsys.readouterr().err
    examples, _ = tokenize_sft(load_records(write(tmp_path / "s.jsonl", SFT_ROWS)), tiny_tokenizer, SFTSettings())
    assert len(examples) == 1 and "column 'id' not used in training" in capsys.readouterr().err


def test_scores_become_margins_by_option(tmp_path, tiny_tokenizer, tiny_model_dir, capsys):
    records = scores_as_margins(load_records(write(tmp_path / "uf.jsonl", SCORED)))
    pairs, _ = tokenize_preferences(records, tiny_tokenizer, TokenizeSettings())
    assert [p.margin for p in pairs] == [4.5, -0.5]
    assert "not used in training" not in capsys.readouterr().err
    bad = write(tmp_path / "bad.jsonl", SCORED[:1] + [dict(SCORED[1], score_rejected="high")])
    code = main(["dpo", "--model_name_or_path", str(tiny_model_dir), "--dataset", bad, "--margin_from_scores",
                 "--output_dir", str(tmp_path / "run"), "--max_steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "row 2" in err and "score_rejected must be a finite number" in err
    code = main(["kto", "--model_name_or_path", str(tiny_model_dir), "--dataset", bad, "--margin_from_scores",
                 "--output_dir", str(tmp_path / "run2"), "--max_steps", "1"])
    assert code == 2 and "KTO does not use it" in capsys.readouterr().err


@pytest.mark.parametrize("rows, kind, fmt", [(KTO_ROWS, "kto", "kto unpaired"), (SFT_ROWS, "sft", "sft messages"),
                                             (PROMPT_ROWS, "prompt", "prompt"), (EXPLICIT, "preference", "standard")])
def test_data_check_detects_each_kind(tmp_path, rows, kind, fmt, capsys):
    path = write(tmp_path / "d.jsonl", rows)
    assert main(["data", "check", path, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["format"], report["rows"], report["kept"]) == (fmt, len(rows), len(rows))
    assert main(["data", "check", path, "--kind", kind, "--json"]) == 0


def test_data_check_kind_finds_invalid_rows(tmp_path, capsys):
    kto = write(tmp_path / "k.jsonl", KTO_ROWS + [{"prompt": "sea?", "completion": " wet", "label": "yes"}])
    assert main(["data", "check", kto, "--json"]) == 2
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert (report["rows"], report["kept"]) == (3, 2) and "row 3: field 'label'" in report["examples"][0]
    assert main(["data", "check", kto, "--kind", "kto", "--skip_invalid", "--json"]) == 0
    capsys.readouterr()
    assert main(["data", "check", kto, "--kind", "preference"]) == 2       # KTO rows are not pairs
    capsys.readouterr()
    prompts = write(tmp_path / "p.jsonl", PROMPT_ROWS + [{"prompt": "  "}])
    assert main(["data", "check", prompts, "--json"]) == 2
    report = json.loads(capsys.readouterr().out)
    assert report["skipped"] == {"empty prompt": 1} and report["unknown_columns"] == ["completions"]


def test_prompt_columns_named_like_reward_arguments_are_not_passed(tmp_path, tiny_tokenizer, capsys):
    from preftune.recipes.online import load_prompts

    examples = load_prompts(write(tmp_path / "p.jsonl", PROMPT_ROWS), "train", tiny_tokenizer, 64)
    assert [e.columns for e in examples] == [{"answer": "calm"}, {"answer": "warm"}]
    assert "column 'completions' not used in training (named like a reward function's" in capsys.readouterr().err


def test_report_to_all_none_and_a_missing_tracker(tmp_path):
    import importlib.util

    from preftune.config import DPOConfig
    from preftune.config.base import load_config
    from preftune.errors import ConfigError

    def parse(*flags):
        cfg = load_config(DPOConfig, None, {"model_name_or_path": "m", "dataset": "d.jsonl", "report_to": list(flags)})
        cfg.validate()
        return cfg

    installed = [name for name in ("tensorboard", "wandb") if importlib.util.find_spec(name)]
    assert parse("all").report_to == installed
    assert parse("none").report_to == []
    if "wandb" not in installed:
        with pytest.raises(ConfigError, match="wandb is not installed"):
            parse("wandb")


def test_abbreviated_options_are_refused(capsys):
    with pytest.raises(SystemExit) as raised:
        main(["dpo", "--learning_rat", "1e-5", "--model_name_or_path", "m", "--dataset", "d.jsonl"])
    assert raised.value.code == 2 and "--learning_rate" in capsys.readouterr().err


def test_metrics_jsonl_holds_null_not_nan(tmp_path):
    from preftune.runtime.records import finite_or_none

    line = json.dumps({k: finite_or_none(v) for k, v in {"rewards/rejected": float("nan"), "loss": 0.5}.items()})
    assert json.loads(line) == {"rewards/rejected": None, "loss": 0.5} and "NaN" not in line


def test_sft_token_count_is_not_doubled():
    from preftune.data.packing import LMRow
    from preftune.runtime.progress import example_tokens

    assert example_tokens(LMRow([5, 6, 7], [False, True, True], [0, 1, 2])) == 3


def test_score_reads_trl_completion_column(tiny_tokenizer):
    from preftune.scoring.files import _scoring_texts

    assert _scoring_texts({"prompt": "p", "completion": " c"}, False, tiny_tokenizer) == ("p", " c")
