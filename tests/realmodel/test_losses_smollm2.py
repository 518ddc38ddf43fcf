"""One LoRA step of every preference loss of the table on SmolLM2-135M-Instruct (two conversational pairs)."""

import json
import math

import pytest

from preftune.config.losses import PAIR_LOSSES
from toydata import make_toy_preferences


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in make_toy_preferences(2, conversational=True)))
    return path


@pytest.mark.parametrize("name", sorted(PAIR_LOSSES))
def test_one_step_of_each_loss(name, smollm2_dir, pairs, tmp_path, one_thread):
    from preftune import DPOConfig
    from preftune.recipes.dpo import train_dpo

    cfg = DPOConfig(model_name_or_path=str(smollm2_dir), dataset=str(pairs), output_dir=str(tmp_path / "run"),
                    loss_type=name, beta=2.0 if name in ("simpo", "sigmoid_norm") else 0.1, per_device_batch_size=2,
                    max_length=128, logging_steps=1, max_steps=1, warmup_ratio=0.0, seed=0, lora=True, lora_r=8,
                    lora_alpha=16, learning_rate=2e-3)
    cfg.validate()
    train_dpo(cfg)
    step = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line][0]
    assert math.isfinite(step["loss"]) and step["grad_norm"] > 0
    assert (tmp_path / "run" / "model" / "adapter_model.safetensors").is_file()
