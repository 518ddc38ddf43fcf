"""One LoRA step of every preference loss of the table, and of DPO with each loss modifier (LD-DPO's ld_alpha,
WPO's use_weighting), on SmolLM2-135M-Instruct (two conversational pairs)."""

import json
import math

import pytest

from preftune.config.losses import PAIR_LOSSES
from toydata import make_toy_preferences

pytestmark = pytest.mark.heavy


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in make_toy_preferences(2, conversational=True)))
    return path


@pytest.mark.parametrize("name, options", [pytest.param(name, {}, id=name) for name in sorted(PAIR_LOSSES)] + [
    pytest.param("sigmoid", {"ld_alpha": 0.5}, id="ld_alpha"),
    pytest.param("sigmoid", {"use_weighting": True}, id="use_weighting"),
    pytest.param("sigmoid", {"ld_alpha": 0.5, "use_weighting": True, "precompute_ref": True}, id="both-precomputed")])
def test_one_step_of_each_loss(name, options, smollm2_dir, pairs, tmp_path, one_thread):
    from preftune import DPOConfig
    from preftune.recipes.dpo import train_dpo

    cfg = DPOConfig(model_name_or_path=str(smollm2_dir), dataset=str(pairs), output_dir=str(tmp_path / "run"),
                    loss_type=name, beta=2.0 if name in ("simpo", "sigmoid_norm") else 0.1, per_device_batch_size=2,
                    max_length=128, logging_steps=1, max_steps=1, warmup_ratio=0.0, seed=0, lora=True, lora_r=8,
                    lora_alpha=16, learning_rate=2e-3, cache_dir=str(tmp_path / "cache"), **options)
    cfg.validate()
    train_dpo(cfg)
    step = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line][0]
    assert math.isfinite(step["loss"]) and step["grad_norm"] > 0
    assert (tmp_path / "run" / "model" / "adapter_model.safetensors").is_file()
