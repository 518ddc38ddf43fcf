"""Reward models: last-token reading, ECE, learning with each loss, encoders, LoRA, scoring and the CLI."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import write_jsonl
from preftune.cli import main
from preftune.config import RewardConfig
from preftune.data import TokenizeSettings, collate_pairs, load_records, tokenize_preferences
from preftune.modality.text import RewardScorer
from preftune.recipes.reward import expected_calibration_error, train_reward
from preftune.scoring.reward_model import load_reward_model, score_texts, sequence_rewards
from toydata import CALM_WORDS, LOUD_WORDS, TOPICS, make_toy_preferences


def env(**extra) -> dict:
    values = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "KILL_AT_STEP")}
    values.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", NO_COLOR="1",
                  COLUMNS="200", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **extra)
    return values


def start_cli(*args, **extra):
    return subprocess.Popen([sys.executable, "-m", "preftune.cli", *args], env=env(**extra), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward-data")
    soft = [row | {"preference_prob": [0.8, 0.9, 1.0][i % 3]}
            for i, row in enumerate(make_toy_preferences(128, seed=1))]
    # first half unsure, second half sure: a model over-confident on one half is under-confident on the other
    soft_eval = [row | {"preference_prob": 0.55 if i < 32 else 1.0}
                 for i, row in enumerate(make_toy_preferences(64, seed=2))]
    return {"train": write_jsonl(root / "train.jsonl", make_toy_preferences(128, seed=1)),
            "eval": write_jsonl(root / "eval.jsonl", make_toy_preferences(64, seed=2)),
            "soft_eval": write_jsonl(root / "soft_eval.jsonl", soft_eval),
            "soft": write_jsonl(root / "soft.jsonl", soft),
            "bad": write_jsonl(root / "bad.jsonl", make_toy_preferences(3) + [{"prompt": "Hi", "chosen": " calm"}]),
            "bad_score": write_jsonl(root / "bad_score.jsonl", [{"prompt": "Hi", "response": " calm"},
                                                                {"prompt": "Hi", "response": 3}])}


def config(model_dir, data, out, **overrides) -> RewardConfig:
    values = dict(model_name_or_path=str(model_dir), dataset=str(data["train"]), eval_dataset=str(data["eval"]),
                  eval_split="train", output_dir=str(out), per_device_batch_size=8, learning_rate=1e-3, max_length=64,
                  logging_steps=1, max_steps=16, warmup_ratio=0.0, seed=0)
    values.update(overrides)
    return RewardConfig(**values)


# ---------------------------------------------------------------------- reading the last token


def classifier(kind, tokenizer, pad_token_id):
    from transformers import GPT2Config, GPT2ForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=4, num_labels=1, pad_token_id=pad_token_id)
        return LlamaForSequenceClassification(cfg).eval()
    cfg = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, num_labels=1, pad_token_id=pad_token_id)
    return GPT2ForSequenceClassification(cfg).eval()


def padded(sequences, pad_id, left: bool):
    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), pad_id)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        where = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, where], mask[i, where] = torch.tensor(s), 1
    return ids, mask


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_reward_is_read_where_transformers_reads_it_for_any_padding(tiny_tokenizer, kind):
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    assert pad != eos
    sequences = [[1, 40, 41, 42, 43, 44, eos], [1, 50, 51, eos], [1, 60, eos]]  # all end in EOS
    for pad_id in (pad, eos):  # pad == eos: transformers reads the token before EOS, and so must we
        model = classifier(kind, tiny_tokenizer, pad_id)

        def alone(rows):
            return torch.cat([sequence_rewards(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))
                              for s in rows])

        with torch.no_grad():
            single = alone(sequences)
            assert single.abs().min() > 0  # non-trivial values
            for left in (False, True):
                ids, mask = padded(sequences, pad_id, left)
                torch.testing.assert_close(sequence_rewards(model, ids, mask), single, atol=1e-5, rtol=1e-5)
            ids, mask = padded(sequences, pad_id, left=False)
            library = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
            torch.testing.assert_close(library, single, atol=1e-5, rtol=1e-5)  # same head, same place as the library
            without_eos = alone([s[:-1] for s in sequences])   # a causal model: the states before EOS do not change
        if pad_id == eos:
            torch.testing.assert_close(single, without_eos, atol=1e-5, rtol=1e-5)
        else:
            assert (single - without_eos).abs().min() > 1e-4   # read at the EOS itself


def test_training_gives_the_tokenizer_a_pad_token_other_than_eos(tiny_tokenizer):
    import copy

    from preftune.scoring.reward_model import distinct_pad_token

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.pad_token = tokenizer.eos_token
    distinct_pad_token(tokenizer)
    assert tokenizer.pad_token == "<s>"   # no unknown token: BOS
    tokenizer.pad_token = tokenizer.unk_token = tokenizer.eos_token
    tokenizer.bos_token = "<|user|>"
    distinct_pad_token(tokenizer)
    assert tokenizer.pad_token == "<|user|>"
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    end = "<|endoftext|>"     # GPT-2 style: one special token for everything
    gpt2_like = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({end: 0, "a": 1}, unk_token=end)),
                                        eos_token=end, bos_token=end, unk_token=end, pad_token=end)
    distinct_pad_token(gpt2_like)
    assert gpt2_like.pad_token == end and len(gpt2_like) == 2    # kept: the vocabulary is not changed


def test_expected_calibration_error_on_a_fixed_example():
    probs = torch.tensor([0.05, 0.15, 0.12, 0.55, 0.95, 0.99, 1.0])
    outcomes = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.5])
    # bins: [0,.1): {.05|0}; [.1,.2): {.15|1, .12|0}; [.5,.6): {.55|1}; [.9,1]: {.95|1, .99|1, 1.0|.5}
    expected = (1 * 0.05 + 2 * abs(0.135 - 0.5) + 1 * 0.45 + 3 * abs(0.98 - 2.5 / 3)) / 7
    assert expected_calibration_error(probs, outcomes) == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(1.67 / 7)
    hard = torch.tensor([0.3, 0.6, 0.9, 0.95])  # hard labels: every outcome is 1, so ECE = 1 - mean(q)
    assert expected_calibration_error(hard, torch.ones(4)) == pytest.approx(1 - 2.75 / 4, abs=1e-6)
    assert expected_calibration_error(torch.tensor([0.1]), torch.tensor([0.1])) == pytest.approx(0.0, abs=1e-7)


# ---------------------------------------------------------------------- training


@pytest.mark.parametrize("loss_type", ["bradley_terry", "ranking", "soft_label"])
def test_reward_model_learns_the_toy_preference_with_each_loss(tiny_model_dir, data, tmp_path, loss_type):
    from transformers import AutoModelForSequenceClassification

    dataset = data["soft"] if loss_type == "soft_label" else data["train"]
    result = train_reward(config(tiny_model_dir, data, tmp_path / "run", dataset=str(dataset), loss_type=loss_type,
                                 eval_dataset=str(data["soft_eval"]), eval_on_start=True, centering_coef=0.01))
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["step"] == 0 and lines[0]["eval/accuracy"] < 0.7  # untrained
    held_out = result.train.eval_metrics
    assert held_out["eval/accuracy"] > 0.9
    assert held_out["eval/margin"] > 0 and held_out["eval/rewards/chosen"] > held_out["eval/rewards/rejected"]
    assert 0 <= held_out["eval/ece"] < lines[0]["eval/ece"]
    assert {"loss", "accuracy", "margin", "rewards/chosen", "rewards/rejected", "loss/centering"} <= set(lines[1])

    # an ordinary checkpoint; ECE (outcome: preference_prob) was computed over all held-out pairs at once
    model = AutoModelForSequenceClassification.from_pretrained(result.model_dir)
    tokenizer = load_reward_model(result.model_dir)[1]
    pairs, _ = tokenize_preferences(load_records(str(data["soft_eval"])), tokenizer, TokenizeSettings(max_length=64))
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    with torch.no_grad():
        rewards = sequence_rewards(model, batch["input_ids"], batch["attention_mask"])
    chosen, rejected = rewards[:len(pairs)], rewards[len(pairs):]
    assert held_out["eval/accuracy"] == pytest.approx(float((chosen > rejected).float().mean()))
    probs, outcomes = torch.sigmoid(chosen - rejected), batch["preference_prob"]
    ece = expected_calibration_error(probs, outcomes)
    assert held_out["eval/ece"] == pytest.approx(ece, abs=1e-5)
    per_batch = sum(expected_calibration_error(probs[i:i + 8], outcomes[i:i + 8]) for i in range(0, 64, 8)) / 8
    assert abs(per_batch - ece) > 1e-3  # so the comparison above tells the two apart


def bert_tokenizer(path: Path):
    from transformers import BertTokenizer

    words = sorted({w.lower() for t in TOPICS for w in t.split()} | set(CALM_WORDS) | set(LOUD_WORDS)
                   | {"describe", "in", "a", "few", "words", ":"})
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(tokens)})
    tokenizer.save_pretrained(path)
    return tokenizer


def test_encoder_reward_model_trains_and_scores(data, tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer = bert_tokenizer(tmp_path / "bert")
    cfg = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    BertForSequenceClassification(cfg).save_pretrained(tmp_path / "bert")
    result = train_reward(config(tmp_path / "bert", data, tmp_path / "run", max_steps=24, learning_rate=2e-3))
    assert result.train.eval_metrics["eval/accuracy"] > 0.9

    model, tok = load_reward_model(result.model_dir)
    assert tok.eos_token == "[SEP]"
    prompt, calm, loud = "Describe the river in a few words:", " calm gentle kind", " loud rude angry"
    # the sequence is BERT's sentence pair: [CLS] prompt [SEP] response [SEP], token types 0 then 1
    pair = tok(prompt, calm, return_tensors="pt")
    with torch.no_grad():
        expected = model(**pair).logits.squeeze()
    scores = score_texts(model, tok, [prompt, prompt], [calm, loud])
    assert scores[0] == pytest.approx(float(expected), abs=1e-5)
    assert scores[0] > scores[1]


def test_lora_reward_model_trains_its_head_and_reloads(tiny_model_dir, data, tmp_path):
    result = train_reward(config(tiny_model_dir, data, tmp_path / "lora", lora=True, lora_r=4, lora_alpha=8,
                                 max_steps=4, learning_rate=5e-3, eval_dataset=None))
    saved = result.model_dir
    assert (saved / "adapter_config.json").is_file() and not (saved / "model.safetensors").exists()
    adapter = load_file(saved / "adapter_model.safetensors")
    assert any("score" in name for name in adapter) and any("lora_A" in name for name in adapter)
    model, tokenizer = load_reward_model(saved)
    base, _ = load_reward_model(tiny_model_dir)  # the same base with a freshly drawn head
    prompts, responses = ["Describe the city in a few words:"] * 2, [" calm kind", " loud rude"]
    tuned = score_texts(model, tokenizer, prompts, responses)
    assert tuned != pytest.approx(score_texts(base, tokenizer, prompts, responses), abs=1e-4)
    assert tuned[0] > tuned[1]


def test_a_model_without_a_one_output_head_is_refused(tiny_model, tiny_tokenizer, data, tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    from preftune.errors import ConfigError

    with pytest.raises(ConfigError, match="no classification head"):
        train_reward(config(None, data, tmp_path / "a"), model=tiny_model, tokenizer=tiny_tokenizer)
    two_labels = BertForSequenceClassification(BertConfig(vocab_size=len(tiny_tokenizer), hidden_size=32,
                                                          num_hidden_layers=1,
                                                          num_attention_heads=4, intermediate_size=64))
    with pytest.raises(ConfigError, match="one output, this one has 2"):
        train_reward(config(None, data, tmp_path / "b"), model=two_labels, tokenizer=tiny_tokenizer)


def test_killed_reward_run_resumes_to_the_same_weights(tiny_model_dir, data, tmp_path):
    common = ["reward", "--model_name_or_path", str(tiny_model_dir), "--dataset", str(data["train"]), "--max_steps",
              "8",
              "--per_device_batch_size", "8", "--learning_rate", "1e-3", "--max_length", "64", "--save_steps", "3",
              "--logging_steps", "1", "--lr_scheduler", "cosine", "--warmup_steps", "2", "--seed", "3"]
    killed = start_cli(*common, "--output_dir", str(tmp_path / "resumed"), KILL_AT_STEP="5")
    full = config(tiny_model_dir, data, tmp_path / "full", eval_dataset=None, max_steps=8, save_steps=3,
                  lr_scheduler="cosine", warmup_steps=2, seed=3)
    train_reward(full)  # meanwhile, the uninterrupted run in this process
    killed.communicate()
    assert killed.returncode == -9 and not (tmp_path / "resumed" / "model").exists()
    resumed = start_cli(*common, "--output_dir", str(tmp_path / "resumed"), "--resume")
    stdout, stderr = resumed.communicate()
    assert resumed.returncode == 0, stderr
    assert "model saved to" in stdout
    a = load_file(tmp_path / "full" / "model" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and "score.weight" in a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    start = load_file(Path(tiny_model_dir) / "model.safetensors")
    assert not torch.allclose(start["model.embed_tokens.weight"], a["model.embed_tokens.weight"])


# ---------------------------------------------------------------------- scoring and the command line


@pytest.fixture(scope="module")
def trained(tiny_model_dir, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    return train_reward(config(tiny_model_dir, data, out, eval_dataset=None, max_steps=12))


def test_score_matches_training_for_strings_and_conversations(trained, tmp_path, capsys):
    model, tokenizer = load_reward_model(trained.model_dir)
    for conversational in (False, True):
        rows = make_toy_preferences(6, seed=5, conversational=conversational)
        pairs, _ = tokenize_preferences(load_records(str(write_jsonl(tmp_path / "p.jsonl", rows))), tokenizer,
                                        TokenizeSettings(max_length=64))
        batch = collate_pairs(pairs, tokenizer.pad_token_id)
        with torch.no_grad():
            in_training = RewardScorer(model)(batch["input_ids"], batch["attention_mask"])[:6].tolist()
        scoring = [{"prompt": r["prompt"], "response": r["chosen"], "id": i} for i, r in enumerate(rows)]
        if conversational:  # a plain string reply to a conversation is the assistant's message
            scoring[0]["response"] = rows[0]["chosen"][0]["content"]
        source = write_jsonl(tmp_path / "rows.jsonl", scoring)
        assert main(["score", "--model", str(trained.model_dir), "--input", str(source),
                     "--output", str(tmp_path / "out" / "scored.jsonl"), "--batch_size", "4"]) == 0
        scored = [json.loads(line) for line in (tmp_path / "out" / "scored.jsonl").read_text().splitlines()]
        assert [s["id"] for s in scored] == list(range(6)) and scored[1]["prompt"] == scoring[1]["prompt"]
        assert [s["reward"] for s in scored] == pytest.approx(in_training, abs=1e-5)
    assert "scored 6 rows" in capsys.readouterr().out


def test_score_texts_is_independent_of_batching(trained):
    model, tokenizer = load_reward_model(trained.model_dir)
    prompts = [f"Describe {t} in a few words:" for t in TOPICS[:5]]
    responses = [" calm", " loud rude angry harsh cold", " gentle kind</s>", " noisy", " warm soft quiet"]
    one = score_texts(model, tokenizer, prompts, responses, batch_size=1)
    assert score_texts(model, tokenizer, prompts, responses, batch_size=3) == pytest.approx(one, abs=1e-5)
    # a trailing EOS in the text is not doubled
    assert one[2] == pytest.approx(score_texts(model, tokenizer, prompts[2:3], [" gentle kind"])[0], abs=1e-6)
    assert min(one[0], one[2], one[4]) > max(one[1], one[3])
    cut = score_texts(model, tokenizer, prompts, responses, max_length=6)
    assert all(math.isfinite(x) for x in cut)


def test_reward_help_and_yaml_config(tiny_model_dir, data, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["reward", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--loss_type" in text and "soft_label" in text and "--centering_coef" in text
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(f"model_name_or_path: {tiny_model_dir}\ndataset: {data['train']}\n"
                         f"output_dir: {tmp_path / 'out'}\n"
                         "loss_type: ranking\nmargin: 0.5\nmax_steps: 2\nper_device_batch_size: 4\nmax_length: 64\n")
    assert main(["reward", "--config", str(yaml_file), "--max_steps", "3"]) == 0
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["loss_type"] == "ranking" and saved["margin"] == 0.5 and saved["max_steps"] == 3
    assert "model saved to" in capsys.readouterr().out
    yaml_file.write_text("loss_type: hinge\n")
    assert main(["reward", "--config", str(yaml_file)]) == 2


def test_bad_rows_exit_2_naming_file_row_and_field(tiny_model_dir, trained, data, tmp_path):
    reward = start_cli("reward", "--model_name_or_path", str(tiny_model_dir), "--dataset", str(data["bad"]),
                       "--output_dir", str(tmp_path / "out"))
    score = start_cli("score", "--model", str(trained.model_dir), "--input", str(data["bad_score"]),
                      "--output", str(tmp_path / "scored.jsonl"))
    for process, row, field, reason in ((reward, 4, "rejected", "missing field"), (score, 2, "response", "wrong type")):
        _, stderr = process.communicate()
        assert process.returncode == 2, stderr
        assert "Traceback" not in stderr
        assert f"row {row}: field '{field}': {reason}" in stderr and ".jsonl" in stderr
    assert not (tmp_path / "scored.jsonl").exists()
