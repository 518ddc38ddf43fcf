import json

import pytest
from rich.console import Console

from preftune.data import TokenizeSettings, check_dataset, render_report, report_to_dict
from preftune.errors import DataError

RIVER = "Describe the river in a few words:"   # 11 tokens with BOS
CITY = "Describe the city in a few words:"     # 10 tokens with BOS

# Token counts with EOS: " calm kind quiet" 4, " loud" 2, " kind" 2, " rude harsh" 3, " warm soft" 3, " cold" 2.
ROWS = [
    {"prompt": RIVER, "chosen": " calm kind quiet", "rejected": " loud"},                  # total 15, +2
    {"prompt": RIVER, "chosen": " calm kind quiet", "rejected": " loud"},                  # duplicate of row 1
    {"prompt": RIVER, "chosen": " kind", "rejected": " rude harsh"},                       # total 14, -1
    {"prompt": CITY, "chosen": " warm soft", "rejected": " cold", "preference_prob": 0.6},  # total 13, +1
    {"prompt": CITY, "chosen": " same", "rejected": " same"},                              # invalid
    {"prompt": RIVER, "chosen": " calm kind quiet", "rejected": " loud"},                  # duplicate of row 1
]


@pytest.fixture()
def dataset(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return str(path)


def test_report_numbers(dataset, tiny_tokenizer):
    report = check_dataset(dataset, tiny_tokenizer, TokenizeSettings(max_length=14))
    assert (report.source, report.format, report.rows, report.kept) == (dataset, "standard", 6, 5)
    assert report.skipped == {"identical responses": 1}
    assert report.examples == [f"{dataset}: row 5: field 'rejected': chosen and rejected are identical, "
                               "so the pair expresses no preference"]
    assert report.duplicate_rows == 2
    assert report.duplicate_prompts == 3
    assert report.chosen_longer_fraction == pytest.approx(0.8)
    assert report.rejected_longer_fraction == pytest.approx(0.2)
    assert report.mean_length_difference == pytest.approx(1.2)
    assert (report.over_max_length, report.truncated) == (3, 3)
    total = report.lengths["total"]
    assert (total.min, total.max, total.mean, total.p50, total.p90) == (13, 15, pytest.approx(14.4), 15, 15)
    prompt = report.lengths["prompt"]
    assert (prompt.min, prompt.max, prompt.mean) == (10, 11, pytest.approx(10.8))
    assert report.lengths["chosen"].mean == pytest.approx(3.4)
    assert report.lengths["rejected"].mean == pytest.approx(2.2)
    assert report.preference_prob.min == pytest.approx(0.6) and report.preference_prob.mean == pytest.approx(0.92)
    assert report.margin is None


def test_report_warnings(dataset, tiny_tokenizer):
    report = check_dataset(dataset, tiny_tokenizer, TokenizeSettings(max_length=14))
    text = "\n".join(report.warnings)
    assert "1 of 6 rows are invalid" in text
    assert "chosen is longer than rejected in 80% of pairs: a length bias DPO will learn" in text
    assert "2 rows (40%) repeat an earlier row exactly" in text
    assert "3 rows (60%) would be truncated" in text


def test_too_long_rows_are_counted_but_still_measured(dataset, tiny_tokenizer):
    report = check_dataset(dataset, tiny_tokenizer, TokenizeSettings(max_length=14, truncation_mode="error"))
    assert report.kept == 2
    assert report.skipped == {"identical responses": 1, "too long": 3}
    assert report.lengths["total"].max == 15 and report.truncated == 0


def test_report_renders_and_serialises(dataset, tiny_tokenizer):
    report = check_dataset(dataset, tiny_tokenizer, TokenizeSettings(max_length=14, max_prompt_length=10))
    assert report.over_max_prompt_length == 4
    data = json.loads(json.dumps(report_to_dict(report)))
    assert data["duplicate_rows"] == 2 and data["lengths"]["total"]["max"] == 15
    console = Console(record=True, width=140)
    render_report(report, console=console)
    output = console.export_text()
    for expected in ("standard", "duplicate rows", "p99", "identical responses", "length bias"):
        assert expected in output


def test_every_row_invalid_is_reported_not_raised(tmp_path, tiny_tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "Q", "chosen": " a", "rejected": " a"}) + "\n")
    report = check_dataset(str(path), tiny_tokenizer, TokenizeSettings())
    assert (report.rows, report.kept, report.lengths) == (1, 0, {})
    render_report(report, console=Console(record=True))


def test_file_level_errors_still_raise(tmp_path, tiny_tokenizer):
    with pytest.raises(DataError, match="file not found"):
        check_dataset(str(tmp_path / "missing.jsonl"), tiny_tokenizer, TokenizeSettings())


# ---------------------------------------------------------------- without a tokenizer, columns, exit codes


def write(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_without_a_tokenizer_structure_and_validity_are_checked(dataset):
    report = check_dataset(dataset)
    assert (report.format, report.rows, report.kept, report.tokenized) == ("standard", 6, 5, False)
    assert report.skipped == {"identical responses": 1}
    assert (report.duplicate_rows, report.duplicate_prompts) == (2, 3)     # the same counts as from token ids
    assert report.lengths == {} and report.chosen_longer_fraction is None
    assert report.preference_prob.mean == pytest.approx(0.92)
    console = Console(record=True, width=140)
    render_report(report, console=console)
    assert "need --tokenizer" in console.export_text()


def test_message_roles_are_checked_without_a_tokenizer(tmp_path):
    good = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello"}],
            "rejected": [{"role": "assistant", "content": "Go away"}]}
    typo = good | {"rejected": [{"role": "asistant", "content": "Go away"}]}
    report = check_dataset(write(tmp_path / "chat.jsonl", [good, typo]))
    assert (report.format, report.kept, report.skipped) == ("conversational", 1, {"bad message": 1})
    assert report.examples == [f"{tmp_path / 'chat.jsonl'}: row 2: field 'rejected': message 1 has an unknown role "
                               "'asistant'; did you mean 'assistant'? (roles are system, user, assistant, tool)"]


def test_columns_preftune_does_not_read_are_reported(tmp_path, tiny_tokenizer):
    rows = [{"prompt": "Q", "chosen": " calm", "rejected": " loud", "id": 1, "source": "web"}]
    report = check_dataset(write(tmp_path / "extra.jsonl", rows), tiny_tokenizer)
    assert report.unknown_columns == ["id", "source"] and report.kept == 1
    assert "columns preftune does not read (training ignores them): 'id', 'source'" in report.warnings


def test_implicit_prompt_only_when_the_columns_are_exactly_chosen_and_rejected(tmp_path, tiny_tokenizer):
    from preftune.data import load_records, tokenize_preferences

    implicit = [{"chosen": "Tell me about the river. It is calm", "rejected": "Tell me about the river. It is loud",
                 "margin": 1.0}]
    assert check_dataset(write(tmp_path / "implicit.jsonl", implicit)).format == "implicit_prompt"
    question = write(tmp_path / "question.jsonl", [{"question": "Q?", "chosen": " calm", "rejected": " loud"}])
    expected = f"{question}: field 'question': unexpected column 'question': preference rows need 'prompt'"
    with pytest.raises(DataError) as raised:
        check_dataset(question)
    assert str(raised.value).startswith(expected) and "rename 'question' to 'prompt'" in str(raised.value)
    with pytest.raises(DataError, match="unexpected column 'question'"):   # training reads rows the same way
        tokenize_preferences(load_records(question), tiny_tokenizer, TokenizeSettings())


def test_a_training_run_on_question_chosen_rejected_exits_2(tmp_path, tiny_model_dir, capsys):
    from preftune.cli import main

    question = write(tmp_path / "question.jsonl", [{"question": "Q?", "chosen": " calm", "rejected": " loud"}])
    assert main(["dpo", "--model_name_or_path", str(tiny_model_dir), "--dataset", question,
                 "--output_dir", str(tmp_path / "out")]) == 2
    assert "field 'question': unexpected column 'question'" in capsys.readouterr().err


def test_data_check_exit_code_gates_a_pipeline(tmp_path, dataset, tiny_model_dir, capsys):
    from preftune.cli import main

    valid = write(tmp_path / "valid.jsonl", ROWS[:4])
    invalid = write(tmp_path / "invalid.jsonl", [ROWS[4]])
    assert main(["data", "check", valid]) == 0
    assert main(["data", "check", valid, "--tokenizer", str(tiny_model_dir)]) == 0
    capsys.readouterr()
    assert main(["data", "check", dataset]) == 2
    assert "1 of 6 rows are invalid (pass --skip_invalid" in capsys.readouterr().err
    assert main(["data", "check", dataset, "--skip_invalid"]) == 0    # 5 valid rows remain
    assert main(["data", "check", invalid, "--skip_invalid"]) == 2
    assert "no row is valid" in capsys.readouterr().err


def test_a_byte_that_is_not_utf8_is_reported_by_row(tmp_path):
    good = json.dumps(ROWS[0]).encode()
    jsonl = tmp_path / "latin1.jsonl"
    jsonl.write_bytes(good + b"\n" + good + b"\n" + json.dumps({"prompt": "caf", "chosen": " a", "rejected": " b"})
                      .encode().replace(b"caf", b"caf\xe9") + b"\n")
    with pytest.raises(DataError) as raised:
        check_dataset(str(jsonl))
    assert (raised.value.row, raised.value.source) == (3, str(jsonl))
    assert "row 3: not UTF-8 text: byte 0xe9 at line 3, column 16" in str(raised.value)
    csv = tmp_path / "latin1.csv"
    csv.write_bytes(b"prompt,chosen,rejected\nQ,a,b\nQ,caf\xe9,b\n")
    with pytest.raises(DataError) as raised:
        check_dataset(str(csv))
    assert raised.value.row == 2 and "byte 0xe9 at line 3" in str(raised.value)
