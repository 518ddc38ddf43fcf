"""KTO data: unpaired prompt/completion/label rows and pairs split in two, from every file type."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from helpers import write_jsonl
from preftune.data import TokenizeSettings, load_records, tokenize_preferences
from preftune.data.kto import KTOExample, label_counts, mismatched_completions, tokenize_kto
from preftune.errors import DataError

ROWS = [
    {"prompt": "Describe the river in a few words:", "completion": " calm kind quiet", "label": True},
    {"prompt": "Describe a garden in a few words:", "completion": " loud rude", "label": False},
    {"prompt": "Describe the city in a few words:", "completion": " gentle warm", "label": 1},
    {"prompt": "Describe the market in a few words:", "completion": " harsh cold", "label": 0},
]
SETTINGS = TokenizeSettings(max_length=64)


def message(role, content):
    return {"role": role, "content": content}


def tokenize(path, tokenizer, **kwargs):
    return tokenize_kto(load_records(str(path)), tokenizer, kwargs.pop("settings", SETTINGS), **kwargs)


def expected(tokenizer, rows):
    return [KTOExample(tokenizer(r["prompt"])["input_ids"],
                       tokenizer(r["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id],
                       bool(r["label"]), i + 1) for i, r in enumerate(rows)]


def write_any(path, rows):
    """Write ``rows`` in the format its extension names (a directory: datasets' save_to_disk)."""
    if path.suffix == ".jsonl":
        return write_jsonl(path, rows)
    if path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path)
    elif path.suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        import datasets

        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("name", ["data.jsonl", "data.json", "data.parquet", "data.csv", "saved"])
def test_unpaired_rows_from_every_file_type(tmp_path, tiny_tokenizer, name):
    one_type = name in ("data.parquet", "saved")  # a column of one type
    rows = [dict(r, label=bool(r["label"])) for r in ROWS] if one_type else ROWS
    if name == "data.csv":  # a CSV column holds either booleans or numbers
        rows = [dict(r, label=int(r["label"])) for r in ROWS]
    examples, report = tokenize(write_any(tmp_path / name, rows), tiny_tokenizer)
    assert examples == expected(tiny_tokenizer, ROWS)
    assert [e.desirable for e in examples] == [True, False, True, False]
    assert label_counts(examples) == (2, 2)
    assert report.kept == report.total == 4


def test_csv_booleans_are_real_booleans(tmp_path, tiny_tokenizer):
    path = tmp_path / "bools.csv"
    path.write_text("prompt,completion,label\nHello there,calm kind,true\nHi there,loud rude,False\n")
    examples, _ = tokenize(path, tiny_tokenizer)
    assert [e.desirable for e in examples] == [True, False]


def test_conversational_unpaired_rows_use_the_chat_template(tmp_path, tiny_tokenizer):
    rows = [{"prompt": [message("user", "Describe the river:")], "completion": [message("assistant", "calm kind")],
             "label": True},
            {"prompt": [message("user", "Describe the city:")], "completion": [message("assistant", "loud rude")],
             "label": False}]
    examples, _ = tokenize(write_jsonl(tmp_path / "chat.jsonl", rows), tiny_tokenizer)
    prompt_text = tiny_tokenizer.apply_chat_template(rows[0]["prompt"], tokenize=False, add_generation_prompt=True)
    assert prompt_text.startswith("<s><|user|>Describe the river:") and prompt_text.endswith("<|assistant|>")
    assert examples[0].prompt_ids == tiny_tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    assert examples[0].completion_ids == tiny_tokenizer("calm kind", add_special_tokens=False)["input_ids"] + [
        tiny_tokenizer.eos_token_id]
    assert [e.desirable for e in examples] == [True, False]


@pytest.mark.parametrize("conversational", [False, True])
def test_pairs_give_one_desirable_and_one_undesirable_example(tmp_path, tiny_tokenizer, conversational):
    from toydata import make_toy_preferences

    path = write_jsonl(tmp_path / "pairs.jsonl", make_toy_preferences(5, seed=3, conversational=conversational))
    pairs, _ = tokenize_preferences(load_records(str(path)), tiny_tokenizer, SETTINGS)
    examples, report = tokenize(path, tiny_tokenizer)
    assert report.total == 5 and len(examples) == 10
    for pair, good, bad in zip(pairs, examples[0::2], examples[1::2]):
        assert (good.prompt_ids, good.completion_ids, good.desirable, good.row) == (
            pair.prompt_ids, pair.chosen_ids, True, pair.row)
        assert (bad.prompt_ids, bad.completion_ids, bad.desirable, bad.row) == (
            pair.prompt_ids, pair.rejected_ids, False, pair.row)


BAD = [
    ("string label", {"label": "good"}, "label", "bad label: expected true/false or 1/0, found a string ('good')"),
    ("string true", {"label": "true"}, "label", "found a string ('true')"),
    ("label 2", {"label": 2}, "label", "found a number (2)"),
    ("label 0.5", {"label": 0.5}, "label", "found a number (0.5)"),
    ("null label", {"label": None}, "label", "missing field"),
    ("no completion", {"completion": None}, "completion", "missing field"),
    ("empty completion", {"completion": "  "}, "completion", "empty response"),
    ("number prompt", {"prompt": 7}, "prompt", "wrong type: expected a string, found a number"),
    ("messages among strings", {"completion": [message("assistant", "hi")]}, "completion", "mixed formats"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_a_bad_row_names_file_row_and_field(tmp_path, tiny_tokenizer, case):
    _, change, field, reason = case
    rows = [ROWS[0], ROWS[1], {**ROWS[2], **change}, ROWS[3]]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as caught:
        tokenize(path, tiny_tokenizer)
    assert (caught.value.source, caught.value.row, caught.value.field) == (str(path), 3, field)
    assert reason in caught.value.reason


def test_a_completion_that_cannot_fit_names_the_completion(tmp_path, tiny_tokenizer):
    rows = [ROWS[0], {**ROWS[1], "completion": " loud" * 40}]
    with pytest.raises(DataError) as caught:
        tokenize(write_jsonl(tmp_path / "long.jsonl", rows), tiny_tokenizer,
                 settings=TokenizeSettings(max_length=16, truncation_mode="error"))
    assert (caught.value.row, caught.value.field) == (2, "completion")
    assert "too long" in caught.value.reason and "chosen" not in caught.value.reason
    kept, _ = tokenize(write_jsonl(tmp_path / "long.jsonl", rows), tiny_tokenizer,
                       settings=TokenizeSettings(max_length=16, truncation_mode="keep_start"))
    assert len(kept[1].prompt_ids) + len(kept[1].completion_ids) == 16


def test_skip_invalid_drops_and_counts_bad_rows(tmp_path, tiny_tokenizer):
    rows = [ROWS[0], {**ROWS[1], "label": "bad"}, ROWS[2], {**ROWS[3], "label": None}]
    examples, report = tokenize(write_jsonl(tmp_path / "skip.jsonl", rows), tiny_tokenizer, skip_invalid=True)
    assert [e.row for e in examples] == [1, 3]
    assert report.skipped == {"bad label": 1, "missing field": 1} and report.kept == 2 and report.total == 4


def test_cli_reports_a_bad_label_with_exit_code_2(tmp_path, tiny_model_dir):
    path = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], {**ROWS[1], "label": "good"}])
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "preftune.cli", "kto", "--model_name_or_path", str(tiny_model_dir),
                           "--dataset", str(path), "--output_dir", str(tmp_path / "run")],
                          capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert f"{path}: row 2: field 'label': bad label" in " ".join(done.stderr.split())


def test_mismatched_completions_are_seeded_and_never_the_examples_own():
    examples = [KTOExample([1, 100 + i], [200 + i, 2], i % 2 == 0, i // 2) for i in range(10)]  # 5 pairs
    first = mismatched_completions(examples, seed=3, max_length=64)
    assert first == mismatched_completions(examples, seed=3, max_length=64)
    assert first != mismatched_completions(examples, seed=4, max_length=64)
    for i, other in enumerate(first):
        assert other != examples[i].completion_ids
        source = next(e for e in examples if e.completion_ids == other)
        assert source.row != examples[i].row  # not the other half of its own pair
    # here a permutation: every completion is used once
    assert sorted(map(tuple, first)) == sorted(tuple(e.completion_ids) for e in examples)
    cut = mismatched_completions([KTOExample([1, 2, 3], [4, 5, 6, 7], True, 1),
                                  KTOExample([1], [8, 9, 10, 11], False, 2)], seed=0, max_length=5)
    assert cut == [[8, 9], [4, 5, 6, 7]]


def test_weight_and_label_prob_columns_give_each_example_its_weight(tmp_path, tiny_tokenizer):
    rows = [dict(ROWS[0], weight=0.25), dict(ROWS[1], label_prob=0.9), ROWS[2], dict(ROWS[3], label_prob=1.0)]
    examples, _ = tokenize(write_jsonl(tmp_path / "w.jsonl", rows), tiny_tokenizer)
    assert [e.weight for e in examples] == pytest.approx([0.25, 0.8, 1.0, 1.0])
    for bad in ({"weight": 1.5}, {"weight": "high"}, {"label_prob": 0.3}, {"label_prob": True}):
        with pytest.raises(DataError, match="bad (weight|label_prob)"):
            tokenize(write_jsonl(tmp_path / "bad.jsonl", [dict(ROWS[0], **bad)] + ROWS[1:]), tiny_tokenizer)
