"""Rows with images: every way of giving an image, and a row-numbered error for each malformed one."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from helpers import write_jsonl
from preftune.data import TokenizeSettings, load_records
from preftune.data.images import has_images
from preftune.errors import DataError
from preftune.multimodal.data import tokenize_vision_pairs
from toyvision import build_tiny_vlm, build_vision_processor, colour_image, make_colour_pairs

SETTINGS = TokenizeSettings(max_length=128)


@pytest.fixture(scope="module")
def processor():
    return build_vision_processor("llava")


def read(rows, tmp_path, processor, **kwargs):
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    return tokenize_vision_pairs(load_records(str(path)), processor, SETTINGS, **kwargs)


def good_rows(tmp_path, n=2):
    return make_colour_pairs(n, tmp_path / "images", seed=5)


def expect_error(rows, tmp_path, processor, row, field, words):
    with pytest.raises(DataError) as caught:
        read(rows, tmp_path, processor)
    message = str(caught.value)
    assert caught.value.row == row and caught.value.field == field, message
    assert str(tmp_path / "data.jsonl") in message
    for word in words:
        assert word in message, message


def test_image_parts_and_an_images_column_give_the_same_tokens(tmp_path, processor):
    parts = good_rows(tmp_path)
    column = [{**r, "prompt": [{"role": "user", "content": r["prompt"][0]["content"][1]["text"]}]} for r in parts]
    absolute = [{**r, "images": [str(tmp_path / i) for i in r["images"]]} for r in parts]
    results = [read(rows, tmp_path, processor)[0] for rows in (parts, column, absolute)]
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    for pairs in results:
        assert [p.prompt.ids for p in pairs] == [p.prompt.ids for p in results[0]]
        assert [p.prompt.image_key for p in pairs] == [p.prompt.image_key for p in results[0]]
        assert pairs[0].prompt.ids.count(image_token) == 16       # (28 / 7)^2 patches, the CLS dropped
        assert pairs[0].chosen_ids[-1] == processor.tokenizer.eos_token_id
    assert results[0][0].prompt.image_inputs["pixel_values"].shape == (1, 3, 28, 28)


def test_sft_rows_as_messages_and_replies_as_text_parts(tmp_path, processor):
    from preftune.multimodal.data import tokenize_vision_examples

    rows = good_rows(tmp_path)
    plain = [{"prompt": r["prompt"], "completion": r["chosen"], "images": r["images"]} for r in rows]
    parts = [{"messages": r["prompt"] + [{"role": "assistant", "content": [{"type": "text", "text": c["content"]}]}
                                          for c in r["chosen"]], "images": r["images"]} for r in rows]
    read_rows = [tokenize_vision_examples(load_records(str(write_jsonl(tmp_path / f"{i}.jsonl", data))), processor,
                                          SETTINGS)[0] for i, data in enumerate((plain, parts))]
    assert [e.completion_ids for e in read_rows[0]] == [e.completion_ids for e in read_rows[1]]
    assert [e.prompt.ids for e in read_rows[0]] == [e.prompt.ids for e in read_rows[1]]
    text = processor.tokenizer.decode(read_rows[0][0].completion_ids[:-1])
    assert text == rows[0]["chosen"][0]["content"]


def test_a_saved_dataset_with_an_image_feature(tmp_path, processor):
    import datasets

    rows = good_rows(tmp_path)
    images = [Image.open(tmp_path / r["images"][0]) for r in rows]
    table = {k: [r[k] for r in rows] for k in ("prompt", "chosen", "rejected")}
    dataset = datasets.Dataset.from_dict({**table, "images": [[i] for i in images]},
                                         features=None).cast_column("images", datasets.Sequence(datasets.Image()))
    dataset.save_to_disk(str(tmp_path / "saved"))
    records = load_records(str(tmp_path / "saved"))
    assert has_images(records.rows)
    pairs, _ = tokenize_vision_pairs(records, processor, SETTINGS)
    from_files, _ = read(rows, tmp_path, processor)
    assert [p.prompt.ids for p in pairs] == [p.prompt.ids for p in from_files]
    for a, b in zip(pairs, from_files):
        assert (a.prompt.image_inputs["pixel_values"] - b.prompt.image_inputs["pixel_values"]).abs().max() < 1e-6


def test_a_missing_image_names_the_row(tmp_path, processor):
    rows = good_rows(tmp_path)
    rows[1]["images"] = ["images/nowhere.png"]
    expect_error(rows, tmp_path, processor, 2, "images", ["file not found", "nowhere.png"])


def test_an_unreadable_image_names_the_row(tmp_path, processor):
    rows = good_rows(tmp_path)
    (tmp_path / "images" / "text.png").write_text("not an image")
    rows[0]["images"] = ["images/text.png"]
    expect_error(rows, tmp_path, processor, 1, "images", ["cannot be read as an image"])


def test_an_unsupported_mode_names_the_row(tmp_path, processor):
    rows = good_rows(tmp_path)
    Image.new("I;16", (28, 28)).save(tmp_path / "images" / "deep.png")
    rows[1]["images"] = ["images/deep.png"]
    expect_error(rows, tmp_path, processor, 2, "images", ["unsupported mode"])


def test_an_image_count_that_does_not_match_the_placeholders(tmp_path, processor):
    rows = good_rows(tmp_path)
    rows[0]["images"] = rows[0]["images"] * 2           # two images, one {"type": "image"} part
    expect_error(rows, tmp_path, processor, 1, "images", ["1 image placeholder", "2 image"])
    rows = good_rows(tmp_path)
    rows[1]["prompt"] = "<image><image>What colour is this?"
    expect_error(rows, tmp_path, processor, 2, "images", ["2 image placeholder", "1 image"])


def test_a_malformed_content_part(tmp_path, processor):
    rows = good_rows(tmp_path)
    rows[0]["prompt"][0]["content"].append({"type": "video"})
    expect_error(rows, tmp_path, processor, 1, "prompt", ["content part"])


def test_bad_rows_can_be_skipped(tmp_path, processor):
    rows = good_rows(tmp_path, 3)
    rows[1]["images"] = ["images/nowhere.png"]
    pairs, report = read(rows, tmp_path, processor, skip_invalid=True)
    assert [p.row for p in pairs] == [1, 3] and report.skipped == {"missing image": 1}


def test_the_command_line_trains_and_refuses_bad_images(tmp_path, processor):
    model_dir = tmp_path / "tiny-llava"
    build_tiny_vlm(processor, "llava").save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    rows = good_rows(tmp_path, 8)
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    base = [sys.executable, "-m", "preftune.cli", "dpo", "--model_name_or_path", str(model_dir), "--max_steps", "2",
            "--per_device_batch_size", "4", "--max_length", "128", "--learning_rate", "1e-4"]
    done = subprocess.run([*base, "--dataset", str(data), "--output_dir", str(tmp_path / "run")],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and (tmp_path / "run" / "model" / "model.safetensors").is_file()
    colour_image("red", 1).convert("F").save(tmp_path / "images" / "float.tiff")
    rows[3]["images"] = ["images/float.tiff"]
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    failed = subprocess.run([*base, "--dataset", str(bad), "--output_dir", str(tmp_path / "bad-run")],
                            capture_output=True, text=True, env=env)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    assert "row 4" in failed.stderr and "images" in failed.stderr and "unsupported mode 'F'" in failed.stderr


def test_kto_rows_with_images_unpaired_and_paired(tmp_path, processor):
    from preftune.multimodal.data import tokenize_vision_labelled

    pairs = good_rows(tmp_path, n=3)
    paired = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    examples, _ = tokenize_vision_labelled(load_records(str(paired)), processor, SETTINGS)
    expected, _ = tokenize_vision_pairs(load_records(str(paired)), processor, SETTINGS)
    assert [(e.row, e.desirable) for e in examples] == [(1, True), (1, False), (2, True), (2, False), (3, True),
                                                        (3, False)]
    assert examples[2].prompt.ids == expected[1].prompt.ids and examples[3].completion_ids == expected[1].rejected_ids
    assert examples[0].prompt.image_key == expected[0].prompt.image_key != expected[1].prompt.image_key

    unpaired = [{"prompt": r["prompt"], "completion": r["chosen"], "label": i % 2 == 0, "images": r["images"]}
                for i, r in enumerate(pairs)]
    found, _ = tokenize_vision_labelled(load_records(str(write_jsonl(tmp_path / "u.jsonl", unpaired))), processor,
                                        SETTINGS)
    assert [(e.row, e.desirable) for e in found] == [(1, True), (2, False), (3, True)]
    assert [e.completion_ids for e in found] == [p.chosen_ids for p in expected]
    unpaired[1]["label"] = "good"
    with pytest.raises(DataError) as caught:
        tokenize_vision_labelled(load_records(str(write_jsonl(tmp_path / "u.jsonl", unpaired))), processor, SETTINGS)
    assert caught.value.row == 2 and caught.value.field == "label"
