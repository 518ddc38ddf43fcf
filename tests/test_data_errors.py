"""Every kind of malformed dataset names the file, the row, the field and what is wrong."""

import copy
import json

import pytest

from preftune.data import Records, TokenizeSettings, load_records, tokenize_preferences
from preftune.errors import ConfigError, DataError


def good(i=0):
    return {"prompt": f"Describe the river {i} in a few words:", "chosen": " calm kind", "rejected": " loud rude"}


def message(role, content):
    return {"role": role, "content": content}


def good_chat():
    return {"prompt": [message("user", "Describe the river in a few words:")],
            "chosen": [message("assistant", "calm kind")], "rejected": [message("assistant", "loud rude")]}


def jsonl(*rows):
    return "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)


# (case id, file name, file text, settings, row, field, reason substring)
CASES = [
    ("missing field", "missing.jsonl", jsonl(good(), {"prompt": "Q", "chosen": " yes"}),
     {}, 2, "rejected", "missing field"),
    ("null field", "null.jsonl", jsonl(good(), good(), {"prompt": None, "chosen": " yes", "rejected": " no"}),
     {}, 3, "prompt", "missing field (the value is empty or null)"),
    ("wrong type", "type.jsonl", jsonl(good(), {"prompt": "Q", "chosen": 42, "rejected": " no"}),
     {}, 2, "chosen", "wrong type: expected a string, found a number"),
    ("empty response", "empty_response.jsonl", jsonl({"prompt": "Q", "chosen": " yes", "rejected": "  \n"}),
     {}, 1, "rejected", "empty response"),
    ("identical", "same.jsonl", jsonl(good(), good(), {"prompt": "Q", "chosen": " yes", "rejected": " yes"}),
     {}, 3, "rejected", "chosen and rejected are identical"),
    ("probability", "prob.jsonl", jsonl({**good(), "preference_prob": 1.5}),
     {}, 1, "preference_prob", "probability out of range: must be between 0 and 1, found 1.5"),
    ("boolean probability", "bool.jsonl", jsonl(good(), {**good(), "preference_prob": True}),
     {}, 2, "preference_prob", "expected a number, found a boolean"),
    ("too long", "long.jsonl", jsonl(good(), {"prompt": "Q", "chosen": " calm" * 30, "rejected": " no"}),
     {"max_length": 20}, 2, "chosen", "needs at least 32 tokens"),
    ("too long for error mode", "strict.jsonl", jsonl(good(), good(1)),
     {"max_length": 8, "truncation_mode": "error"}, 1, "chosen", "but max_length is 8"),
    ("invalid json line", "broken.jsonl", jsonl(good(), "", '{"prompt": "Q", "chosen": " yes",'),
     {}, 3, None, "invalid JSON"),
    ("non-object row", "array_row.jsonl", jsonl(good(), [1, 2]),
     {}, 2, None, "expected a JSON object, found an array"),
    ("non-object in json array", "rows.json", json.dumps([good(), "oops"]),
     {}, 2, None, "expected a JSON object, found a string"),
    ("malformed message", "chat.jsonl",
     jsonl(good_chat(), {**good_chat(), "chosen": [{"role": "assistant", "text": "hi"}]}),
     {}, 2, "chosen", "malformed message 1: no 'content'"),
    ("message not an object", "chat2.jsonl", jsonl(good_chat(), {**good_chat(), "rejected": ["hello"]}),
     {}, 2, "rejected", "malformed message 1: expected an object"),
    ("empty message content", "chat3.jsonl", jsonl({**good_chat(), "chosen": [message("assistant", " ")]}),
     {}, 1, "chosen", "empty response: message 1 has empty content"),
    ("mixed formats", "mixed.jsonl", jsonl(good(), good(1), good_chat()),
     {}, 3, "chosen", "mixed formats"),
    ("no shared prompt", "implicit.jsonl",
     jsonl({"chosen": "Q: A calm", "rejected": "Q: A loud"}, {"chosen": "calm kind", "rejected": "loud rude"}),
     {}, 2, "chosen", "no shared prompt"),
    ("non-finite margin", "margin.csv", "prompt,chosen,rejected,margin\nQ,yes,no,1.0\nQ2,yes,no,inf\n",
     {}, 2, "margin", "margin must be a finite number, found inf"),
    ("empty csv cell", "cells.csv", "prompt,chosen,rejected\nQ,yes,no\nQ2,,no\n",
     {}, 2, "chosen", "missing field"),
]


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_malformed_dataset_names_file_row_field_and_reason(tmp_path, tiny_tokenizer, case):
    _, name, text, settings, row, field, reason = case
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError) as info:
        tokenize_preferences(load_records(str(path)), tiny_tokenizer, TokenizeSettings(**settings))
    error = info.value
    assert (error.source, error.row, error.field) == (str(path), row, field)
    assert reason in error.reason
    assert str(error).startswith(f"{path}: row {row}")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError) as info:
        load_records(str(path))
    assert info.value.source == str(path) and info.value.row is None
    assert "empty" in info.value.reason


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere.jsonl"
    with pytest.raises(DataError) as info:
        load_records(str(path))
    assert str(info.value) == f"{path}: file not found"


def test_unknown_extension(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("hello\n")
    with pytest.raises(DataError, match="unknown file extension '.txt'"):
        load_records(str(path))


def test_invalid_json_array_names_the_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"prompt": "Q"},\n  {"prompt": }\n]')
    with pytest.raises(DataError, match="invalid JSON at line 3"):
        load_records(str(path))


def test_chat_template_that_is_not_prefix_stable(tmp_path, tiny_tokenizer):
    # not a thinking template either (tests/test_thinking_template.py): the reply's content is not in the rendering
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] | upper }}{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|> {% endif %}")
    path = tmp_path / "chat.jsonl"
    path.write_text(jsonl(good_chat()))
    with pytest.raises(DataError) as info:
        tokenize_preferences(load_records(str(path)), tokenizer, TokenizeSettings())
    assert info.value.row == 1 and "not prefix-stable" in info.value.reason


def test_the_first_invalid_row_is_reported(tmp_path, tiny_tokenizer):
    rows = [good(), {"prompt": "Q", "chosen": " calm" * 30, "rejected": " no"}, {"prompt": "Q", "chosen": 1}]
    path = tmp_path / "two_problems.jsonl"
    path.write_text(jsonl(*rows))
    with pytest.raises(DataError) as info:
        tokenize_preferences(load_records(str(path)), tiny_tokenizer, TokenizeSettings(max_length=20))
    assert info.value.row == 2 and "too long" in info.value.reason


def test_skip_invalid_counts_each_reason(tmp_path, tiny_tokenizer):
    rows = [good(0), {"prompt": "Q", "chosen": " yes"}, good(1), {"prompt": "Q", "chosen": " a", "rejected": " a"},
            good(2), {"prompt": "Q", "chosen": " b", "rejected": " b"}, {**good(3), "preference_prob": -0.1},
            {"prompt": "Q", "chosen": " calm" * 30, "rejected": " no"}, good(4), {**good(5), "margin": "big"}]
    path = tmp_path / "some_bad.jsonl"
    path.write_text(jsonl(*rows))
    pairs, report = tokenize_preferences(load_records(str(path)), tiny_tokenizer, TokenizeSettings(max_length=20),
                                         skip_invalid=True)
    assert [p.row for p in pairs] == [1, 3, 5, 9]
    assert (report.total, report.kept) == (10, 4)
    assert report.skipped == {"missing field": 1, "identical responses": 2, "probability out of range": 1,
                              "too long": 1, "wrong type": 1}
    assert report.examples[0].startswith(f"{path}: row 2: field 'rejected'")


def test_skip_invalid_still_fails_when_no_row_is_valid(tmp_path, tiny_tokenizer):
    path = tmp_path / "all_bad.jsonl"
    path.write_text(jsonl({"prompt": "Q", "chosen": " a", "rejected": " a"}, {"prompt": "Q"}))
    with pytest.raises(DataError, match="no valid rows: all 2 rows are invalid"):
        tokenize_preferences(load_records(str(path)), tiny_tokenizer, TokenizeSettings(), skip_invalid=True)


def test_bad_settings_and_tokenizer_are_config_errors(tiny_tokenizer):
    records = Records("x", [good()], [1])
    with pytest.raises(ConfigError, match="truncation_mode"):
        tokenize_preferences(records, tiny_tokenizer, TokenizeSettings(truncation_mode="middle"))
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = None
    with pytest.raises(ConfigError, match="chat template"):
        tokenize_preferences(Records("x", [good_chat()], [1]), tokenizer, TokenizeSettings())
