"""One on-policy distillation step on SmolLM2-135M-Instruct: a LoRA student starting as its own teacher samples a
completion, and the generalised JSD between the two (the same distributions) is zero up to rounding."""

import json
import math

import pytest

from toydata import make_toy_preferences

pytestmark = pytest.mark.heavy


def test_one_on_policy_distill_step_with_a_lora_student(smollm2_dir, tmp_path, one_thread):
    from preftune import DistillConfig
    from preftune.recipes.distill import train_distill

    rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in make_toy_preferences(2, conversational=True)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DistillConfig(model_name_or_path=str(smollm2_dir), teacher_model_name_or_path=str(smollm2_dir),
                        dataset=str(data), output_dir=str(tmp_path / "run"), per_device_batch_size=2, lmbda=1.0,
                        max_new_tokens=8, max_length=128, max_prompt_length=64, logging_steps=1, max_steps=1,
                        warmup_ratio=0.0, seed=0, lora=True, learning_rate=1e-3, logprob_chunk_size=16)
    cfg.validate()
    train_distill(cfg)
    step = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line][0]
    assert step["on_policy"] == 1.0 and step["completions/mean_length"] > 0
    assert math.isfinite(step["loss"]) and abs(step["loss"]) < 1e-5    # adapters start at zero: student = teacher
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["source"] == "student" for s in samples)
    assert (tmp_path / "run" / "model" / "adapter_model.safetensors").is_file()
