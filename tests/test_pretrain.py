"""Pretraining: reading raw text, training from a config or a checkpoint, and pretrain -> SFT."""

import json
import random
from pathlib import Path

import pytest

from helpers import write_jsonl
from preftune.cli import main
from preftune.config import PretrainConfig, SFTConfig
from preftune.data.text import read_documents, tokenize_documents
from preftune.errors import ConfigError, DataError
from preftune.recipes.pretrain import fresh_model, train_pretrain
from preftune.recipes.sft import train_sft
from toydata import CALM_WORDS, TOPICS

pytestmark = pytest.mark.usefixtures("one_thread")


def toy_documents(n, seed):
    """Short documents in the toy language: descriptions of topics in calm words."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        lines = []
        for _ in range(rng.randint(2, 3)):
            topic = rng.choice(TOPICS)
            if rng.random() < 0.6:
                lines.append(f"Describe {topic} in a few words: " + " ".join(rng.choice(CALM_WORDS) for _ in range(4)))
            else:
                lines.append(f"Tell me about {topic}. It is {rng.choice(CALM_WORDS)} and {rng.choice(CALM_WORDS)}.")
        docs.append("\n".join(lines))
    return docs


def toy_sft(n, seed):
    rng = random.Random(seed)
    return [{"prompt": f"Describe {rng.choice(TOPICS)} in a few words:",
             "completion": " " + " ".join(rng.choice(CALM_WORDS) for _ in range(4))} for _ in range(n)]


def eval_losses(run_dir):
    lines = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [line["eval/loss"] for line in lines if "eval/loss" in line]


def test_text_sources_and_bad_rows(tmp_path, tiny_tokenizer):
    (tmp_path / "corpus.txt").write_text("first doc\nstill first\n\n\n  \nsecond doc\n\nthird\n")
    texts, _ = read_documents(str(tmp_path / "corpus.txt"))
    assert texts == ["first doc\nstill first", "second doc", "third"]
    (tmp_path / "dir" / "sub").mkdir(parents=True)
    (tmp_path / "dir" / "a.txt").write_text("alpha\n\nbeta\n")
    (tmp_path / "dir" / "sub" / "b.txt").write_text("gamma\n")
    assert read_documents(str(tmp_path / "dir"))[0] == ["alpha", "beta", "gamma"]
    rows = [{"text": "one"}, {"text": 5}, {"body": "x"}, {"text": "  "}, {"text": "two"}]
    write_jsonl(tmp_path / "docs.jsonl", rows)
    with pytest.raises(DataError, match=r"docs.jsonl: row 2: field 'text': wrong type: expected a string, found a "
                                        r"number"):
        read_documents(str(tmp_path / "docs.jsonl"))
    texts, report = read_documents(str(tmp_path / "docs.jsonl"), skip_invalid=True)
    assert texts == ["one", "two"]
    assert report.skipped == {"wrong type": 1, "missing field": 1, "empty text": 1}
    assert read_documents(str(tmp_path / "docs.jsonl"), text_column="body", skip_invalid=True)[0] == ["x"]
    [ids] = tokenize_documents(["gentle kind"], tiny_tokenizer)
    assert ids == tiny_tokenizer("gentle kind")["input_ids"] + [tiny_tokenizer.eos_token_id]
    assert ids[0] == tiny_tokenizer.bos_token_id


def test_model_choice_is_validated(tmp_path):
    base = dict(dataset="x.txt", output_dir=str(tmp_path / "o"))
    with pytest.raises(ConfigError, match="either model_name_or_path"):
        PretrainConfig(model_name_or_path="m", model_config="c.json", **base).validate()
    with pytest.raises(ConfigError, match="needs tokenizer_name_or_path"):
        PretrainConfig(model_config="c.json", **base).validate()
    with pytest.raises(ConfigError, match="model_name_or_path or model_config is required"):
        PretrainConfig(**base).validate()


def test_pretrain_from_config_then_sft_beats_sft_from_scratch(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(toy_documents(240, seed=1)) + "\n")
    common = dict(per_device_batch_size=8, max_length=64, logging_steps=5, warmup_ratio=0.0, seed=0, eval_on_start=True)
    pre = train_pretrain(PretrainConfig(model_config=str(Path(tiny_model_dir) / "config.json"),
                                        tokenizer_name_or_path=str(tiny_model_dir), dataset=str(corpus),
                                        eval_fraction=0.1, output_dir=str(tmp_path / "pre"), num_epochs=3,
                                        learning_rate=1e-2, **common))
    before, after = eval_losses(pre.run_dir)[0], eval_losses(pre.run_dir)[-1]
    assert after < 0.5 * before, (before, after)
    assert pre.train.eval_metrics["eval/perplexity"] < 15
    summary = json.loads((pre.run_dir / "summary.json").read_text())
    assert summary["train_documents"] == 216 and summary["eval_documents"] == 24

    train = write_jsonl(tmp_path / "sft.jsonl", toy_sft(64, seed=2))
    held = write_jsonl(tmp_path / "held.jsonl", toy_sft(24, seed=3))
    sft = dict(dataset=str(train), eval_dataset=str(held), eval_split="train", max_steps=8, learning_rate=3e-3,
               **common)
    tuned = train_sft(SFTConfig(model_name_or_path=str(pre.model_dir), output_dir=str(tmp_path / "tuned"), **sft))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    scratch_model = fresh_model(str(Path(tiny_model_dir) / "config.json"), tokenizer, seed=0)
    scratch = train_sft(SFTConfig(output_dir=str(tmp_path / "scratch"), **sft), model=scratch_model,
                        tokenizer=tokenizer)
    tuned_start, tuned_end = eval_losses(tuned.run_dir)[0], eval_losses(tuned.run_dir)[-1]
    scratch_end = eval_losses(scratch.run_dir)[-1]
    assert tuned_end < tuned_start  # SFT improves on the pretrained model's own held-out loss
    assert tuned_end < 0.8 * scratch_end, (tuned_end, scratch_end)  # and pretraining helps SFT


def test_continue_pretraining_a_checkpoint_from_the_command_line(tiny_model_dir, tmp_path, capsys):
    write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in toy_documents(40, seed=4)])
    code = main(["pretrain", "--model_name_or_path", str(tiny_model_dir), "--dataset", str(tmp_path / "docs.jsonl"),
                 "--output_dir", str(tmp_path / "out"), "--max_length", "32", "--per_device_batch_size", "4",
                 "--max_steps", "3", "--logging_steps", "1", "--lora", "--lora_r", "4"])
    assert code == 0
    assert "model saved to" in capsys.readouterr().out
    lines = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3]
    assert {"loss", "samples/s", "tokens/s", "grad_norm", "learning_rate"} <= set(lines[0])
    assert (tmp_path / "out" / "model" / "adapter_config.json").is_file()
    assert main(["pretrain", "--model_name_or_path", str(tiny_model_dir), "--dataset", "missing.txt",
                 "--output_dir", str(tmp_path / "out2")]) == 2
    assert "missing.txt: file not found" in capsys.readouterr().err
