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
