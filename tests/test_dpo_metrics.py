"""TRL's num_tokens: the tokens trained on so far (kept across a resume: tests/test_loop_steps.py)."""

from pathlib import Path

from helpers import read_jsonl, write_jsonl
from preftune import DPOConfig
from preftune.data import TokenizeSettings, load_records, tokenize_preferences
from preftune.models import load_tokenizer
from preftune.recipes.dpo import train_dpo
from toydata import make_toy_preferences


def test_num_tokens_counts_every_trained_token_as_trl_does(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", make_toy_preferences(16, seed=3))
    cfg = DPOConfig(model_name_or_path=str(tiny_model_dir), dataset=str(data), output_dir=str(tmp_path / "run"),
                    per_device_batch_size=4, max_steps=4, logging_steps=1, max_length=64, learning_rate=1e-3,
                    padding_free=False, prefix_sharing=False, cache_dir=str(tmp_path / "cache"))
    cfg.validate()
    run = train_dpo(cfg)
    counts = [row["num_tokens"] for row in read_jsonl(Path(run.run_dir) / "metrics.jsonl") if "num_tokens" in row]
    pairs, _ = tokenize_preferences(load_records(str(data)), load_tokenizer(str(tiny_model_dir)),
                                    TokenizeSettings(max_length=64))
    # one epoch: every pair once, as TRL counts a pair (the prompt with each of its two responses)
    expected = sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    assert counts[-1] == expected and counts == sorted(set(counts)) and len(counts) == 4
