"""Warnings a user cannot act on are not shown: a LoRA DPO run, generation, and online-RL notes."""

import json
import warnings

import pytest

from preftune import DPOConfig, GRPOConfig, PPOConfig
from preftune.generate import SamplingSettings, encode_prompts, generate_ids
from preftune.recipes.dpo import train_dpo
from toydata import make_toy_preferences

NOISY = (FutureWarning, DeprecationWarning, PendingDeprecationWarning, UserWarning)


def caught(action) -> list[str]:
    """Run ``action``; the deprecation-style warnings it raised, as "Category: message" lines."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        action()
    return [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in seen
            if issubclass(w.category, NOISY)]


def test_a_lora_dpo_run_with_gradient_checkpointing_warns_nothing(tiny_model_dir, tmp_path, one_thread):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_toy_preferences(8)))
    cfg = DPOConfig(model_name_or_path=str(tiny_model_dir), dataset=str(data), output_dir=str(tmp_path / "run"),
                    per_device_batch_size=4, max_steps=2, max_length=64, lora=True, lora_r=4, lora_alpha=8,
                    gradient_checkpointing=True, logging_steps=1, cache_dir=str(tmp_path / "ref-cache"))
    cfg.validate()
    assert caught(lambda: train_dpo(cfg)) == []
    assert (tmp_path / "run" / "model" / "adapter_config.json").is_file()   # the run did train and save an adapter


def test_generation_with_a_lora_model_warns_nothing(tiny_model, tiny_tokenizer):
    from preftune.models import apply_lora

    model = apply_lora(tiny_model, 4, 8, 0.0, ["all-linear"])
    prompts = encode_prompts(tiny_tokenizer, ["Describe the river in a few words:", "Tell me"])
    settings = SamplingSettings(max_new_tokens=6, do_sample=False)
    results = []

    def generate():
        pad = tiny_tokenizer.pad_token_id
        results.append(generate_ids(model, prompts, settings, pad_token_id=pad, eos_token_id=None))

    assert caught(generate) == []
    assert [len(r) for r in results[0].response_ids] == [6, 6]


@pytest.mark.parametrize("cls", [PPOConfig, GRPOConfig])
def test_lora_dropout_is_reported_ignored_only_when_the_user_set_it(cls):
    def notes(**values):
        return [n for n in cls(model_name_or_path="m", dataset="d", lora=True, **values).sanity_warnings()
                if "lora_dropout" in n]

    assert notes() == []
    assert len(notes(lora_dropout=0.1)) == 1
