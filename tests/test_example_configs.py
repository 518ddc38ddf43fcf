"""The example configs in configs/: each loads as written, and a tiny run of each trains with the same settings, only
the model swapped for a tiny local one, the data for toy files and the steps and lengths cut (this test's own
overrides), in fp32 on CPU."""

import math
from pathlib import Path

import pytest

from helpers import read_jsonl, write_jsonl
from preftune.config import DPOConfig, GRPOConfig, IterateConfig, KTOConfig
from preftune.config.base import load_config
from toydata import make_toy_preferences, toy_prompt_rows

pytestmark = pytest.mark.usefixtures("one_thread")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
EXAMPLES = {"dpo": DPOConfig, "kto": KTOConfig, "grpo": GRPOConfig, "iterate": IterateConfig}


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_config_loads_as_a_lora_bf16_run_of_a_hub_model(name):
    cfg = load_config(EXAMPLES[name], CONFIGS / f"{name}.yaml")
    assert cfg.model_name_or_path == "Qwen/Qwen2.5-1.5B-Instruct"
    assert (cfg.lora, cfg.precision, cfg.attn_implementation, cfg.load_in_4bit) == (True, "bf16", "sdpa", False)
    assert cfg.output_dir.startswith("runs/")


def test_grpo_example_reward_function_scores_text_and_messages():
    from preftune.loading import load_callable

    concise = load_callable(f"{CONFIGS / 'rewards.py'}:concise", "reward_funcs")
    forty = " ".join(["word"] * 39) + " end."
    scores = concise(["p"] * 3, [forty, [{"role": "assistant", "content": "Too short"}], "Ten words " * 5 + "x."])
    assert scores == pytest.approx([1.0, 1.0 - 0.02 * 38 - 0.2, 1.0 - 0.02 * 29])


@pytest.fixture(scope="module")
def toy_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("example-data")
    pairs = make_toy_preferences(16, seed=1)
    labelled = [{"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
                for p in pairs for side in ("chosen", "rejected")]
    return {"pairs": write_jsonl(root / "pairs.jsonl", pairs), "labelled": write_jsonl(root / "kto.jsonl", labelled),
            "prompts": write_jsonl(root / "prompts.jsonl", toy_prompt_rows(8, seed=0))}


def tiny_run(name, tiny_model_dir, out, **overrides):
    """The example's config with this test's overrides: the tiny model, toy data, fp32, a few short steps."""
    values = dict(model_name_or_path=str(tiny_model_dir), precision="fp32", output_dir=str(out), max_steps=2,
                  per_device_batch_size=4, gradient_accumulation_steps=1, logging_steps=1, eval_steps=0, save_steps=0,
                  report_to=["none"], attn_implementation="sdpa")
    values.update(overrides)
    return load_config(EXAMPLES[name], CONFIGS / f"{name}.yaml", values)


def losses(run_dir) -> list[float]:
    return [row["loss"] for row in read_jsonl(Path(run_dir) / "metrics.jsonl") if "loss" in row]


def test_dpo_example_trains(tiny_model_dir, toy_files, tmp_path):
    from preftune.recipes.dpo import train_dpo

    cfg = tiny_run("dpo", tiny_model_dir, tmp_path / "dpo", dataset=str(toy_files["pairs"]),
                   eval_dataset=str(toy_files["pairs"]), eval_split="train", max_length=64, max_prompt_length=32,
                   cache_dir=str(tmp_path / "cache"))
    assert (cfg.lora, cfg.loss_type, cfg.beta, cfg.lr_scheduler) == (True, "sigmoid", 0.1, "cosine")   # the YAML's
    result = train_dpo(cfg)
    assert losses(result.run_dir)[0] == pytest.approx(math.log(2), abs=1e-4)   # LoRA starts at the reference
    assert (result.model_dir / "adapter_config.json").is_file()


def test_kto_example_trains(tiny_model_dir, toy_files, tmp_path):
    from preftune.recipes.kto import train_kto

    cfg = tiny_run("kto", tiny_model_dir, tmp_path / "kto", dataset=str(toy_files["labelled"]),
                   eval_dataset=str(toy_files["labelled"]), eval_split="train", max_length=64, max_prompt_length=32,
                   per_device_batch_size=8, cache_dir=str(tmp_path / "cache"))
    result = train_kto(cfg)
    assert len(losses(result.run_dir)) == 2 and all(math.isfinite(loss) for loss in losses(result.run_dir))
    assert (result.model_dir / "adapter_config.json").is_file()


def test_grpo_example_trains_with_its_reward_function(tiny_model_dir, toy_files, tmp_path):
    from preftune.recipes.grpo import train_grpo

    cfg = tiny_run("grpo", tiny_model_dir, tmp_path / "grpo", dataset=str(toy_files["prompts"]),
                   reward_funcs=[f"{CONFIGS / 'rewards.py'}:concise"], num_generations=4, max_completion_length=8,
                   per_device_batch_size=8, generation_batch_size=8)
    result = train_grpo(cfg)
    rows = [row for row in read_jsonl(result.run_dir / "metrics.jsonl") if "reward" in row]
    assert len(rows) == 2 and all(row["reward"] < 1.0 for row in rows)   # 8-token completions are far from 40 words
    assert (result.model_dir / "adapter_config.json").is_file()


def test_iterate_example_runs_a_round(tiny_model_dir, toy_files, tmp_path):
    from preftune.iterate.rounds import train_iterate

    cfg = tiny_run("iterate", tiny_model_dir, tmp_path / "iterate", dataset=str(toy_files["prompts"]),
                   eval_dataset=str(toy_files["prompts"]), eval_split="train", rounds=1, samples_per_prompt=2,
                   max_new_tokens=8, max_length=64, sampling_batch_size=8,
                   judge=f"function:{CONFIGS / 'rewards.py'}:concise")
    result = train_iterate(cfg)
    assert (Path(cfg.output_dir) / "rounds.jsonl").is_file()
    assert len(read_jsonl(Path(cfg.output_dir) / "rounds.jsonl")) >= 1, result
