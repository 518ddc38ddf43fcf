import json

import pandas as pd
import pytest

from helpers import write_jsonl
from preftune.data import Records, load_records
from preftune.errors import DataError
from toydata import make_toy_preferences

ROWS = [
    {"prompt": "Describe the river in a few words:", "chosen": " calm", "rejected": " loud", "margin": 0.5},
    {"prompt": "Describe a garden in a few words:", "chosen": " kind", "rejected": " rude", "margin": 1.5},
    {"prompt": "Describe the city in a few words:", "chosen": " warm", "rejected": " cold", "margin": 2.0},
]


def test_jsonl_round_trip(tmp_path):
    records = load_records(str(write_jsonl(tmp_path / "d.jsonl", ROWS)))
    assert records.rows == ROWS
    assert records.row_numbers == [1, 2, 3]
    assert records.name == str(tmp_path / "d.jsonl")


def test_jsonl_blank_lines_keep_file_line_numbers(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n   \n" + json.dumps(ROWS[1]) + "\n" + json.dumps(ROWS[2]) + "\n\n")
    records = load_records(str(path))
    assert records.rows == ROWS
    assert records.row_numbers == [1, 4, 5]


def test_json_array_and_wrapped_object(tmp_path):
    array = tmp_path / "array.json"
    array.write_text(json.dumps(ROWS, indent=2))
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"version": 1, "data": ROWS}))
    for path in (array, wrapped):
        records = load_records(str(path))
        assert records.rows == ROWS
        assert records.row_numbers == [1, 2, 3]


def test_json_file_holding_json_lines(tmp_path):
    path = write_jsonl(tmp_path / "lines.json", ROWS)
    records = load_records(str(path))
    assert records.rows == ROWS
    assert records.row_numbers == [1, 2, 3]


def test_parquet_round_trip_keeps_message_lists(tmp_path):
    rows = make_toy_preferences(3, conversational=True)
    path = tmp_path / "d.parquet"
    pd.DataFrame(rows).to_parquet(path)
    records = load_records(str(path))
    assert records.rows == rows
    assert isinstance(records.rows[0]["chosen"], list) and isinstance(records.rows[0]["chosen"][0], dict)
    assert records.row_numbers == [1, 2, 3]


def test_csv_infers_numbers_and_turns_empty_cells_into_none(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,chosen,rejected,preference_prob,margin\n"
                    "Q1,42,NA,0.8,\n"
                    "Q2,yes,no,,1.5\n")
    records = load_records(str(path))
    assert records.rows == [
        {"prompt": "Q1", "chosen": "42", "rejected": "NA", "preference_prob": 0.8, "margin": None},
        {"prompt": "Q2", "chosen": "yes", "rejected": "no", "preference_prob": None, "margin": 1.5},
    ]
    assert type(records.rows[0]["preference_prob"]) is float
    assert records.row_numbers == [1, 2]


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "single"))
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                                   "test": datasets.Dataset.from_list(ROWS[:1])})
    splits.save_to_disk(str(tmp_path / "splits"))
    assert load_records(str(tmp_path / "single")).rows == ROWS
    assert load_records(str(tmp_path / "splits")).rows == ROWS
    test = load_records(str(tmp_path / "splits"), split="test")
    assert test.rows == ROWS[:1] and test.row_numbers == [1]
    with pytest.raises(DataError, match="split 'validation' not found; available splits: train, test"):
        load_records(str(tmp_path / "splits"), split="validation")


def test_hub_name_goes_through_load_dataset_once(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    records = load_records("someone/preferences", split="test")
    assert calls == [("someone/preferences", "test")]
    assert records == Records("someone/preferences", ROWS, [1, 2, 3])


def test_hub_failure_is_a_data_error(monkeypatch):
    import datasets

    def failing_load_dataset(name, split):
        raise FileNotFoundError("Dataset 'someone/missing' doesn't exist on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", failing_load_dataset)
    with pytest.raises(DataError) as info:
        load_records("someone/missing")
    assert info.value.source == "someone/missing"
    assert "doesn't exist on the Hub" in str(info.value)


def test_plain_data_directory_loads_through_load_dataset(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", ROWS)
    assert load_records(str(folder)).rows == ROWS


def test_byte_order_mark_and_empty_json(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(ROWS[0]).encode() + b"\n")
    assert load_records(str(path)).rows == ROWS[:1]
    empty = tmp_path / "empty.json"
    empty.write_text("  \n")
    with pytest.raises(DataError, match="the dataset is empty"):
        load_records(str(empty))
