"""A run a person can follow, on SmolLM2 from its .gguf file: a short LoRA DPO run prints its summary,
writes step checkpoints that peft loads, and resumes from one exactly."""

import json

import pytest
import torch
from safetensors.torch import load_file

from preftune.cli import main
from toydata import make_toy_preferences


@pytest.fixture(scope="module")
def lora_run(smollm2_gguf, tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2-runs")
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in make_toy_preferences(2, conversational=True)))
    common = ["dpo", "--model_name_or_path", str(smollm2_gguf), "--lora", "--dataset", str(pairs),
              "--per_device_batch_size", "2", "--max_length", "128", "--learning_rate", "2e-3", "--logging_steps", "1",
              "--warmup_ratio", "0", "--max_steps", "2", "--save_steps", "1", "--save_total_limit", "0",
              "--cache_dir", str(root / "ref-cache")]
    return root, common


def test_lora_dpo_from_the_gguf_summary_step_checkpoint_and_exact_resume(lora_run, smollm2_dir, smollm2_tokenizer,
                                                                         capsys, one_thread):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root, common = lora_run
    assert main([*common, "--output_dir", str(root / "full")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"data: {root / 'pairs.jsonl'}: 2 rows (conversational preference pairs); 2 kept, 0 skipped"
    assert lines[1].startswith("examples: 2 training pairs;") and " tokens in the training pairs" in lines[1]
    assert lines[2].startswith("steps: 2 (2 epochs of 1 step), per device batch 2")
    assert lines[3].startswith("precision: trainable weights in float32") and "parameters trained" in lines[3]
    assert lines[4] == "reference: the policy with its LoRA adapters disabled"
    assert [line.split("  ")[0] for line in lines if line.startswith("step ")] == ["step 1/2", "step 2/2"]

    step1 = root / "full" / "checkpoints" / "step-1"
    assert (step1 / "adapter_config.json").is_file() and (step1 / "adapter_model.safetensors").is_file()
    base_name = json.loads((step1 / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base_name.endswith(".gguf")          # the file the user gave, not preftune's cache of its conversion
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2_dir), step1).eval()
    ids = torch.tensor([smollm2_tokenizer.apply_chat_template([{"role": "user", "content": "Name a colour."}],
                                                              add_generation_prompt=True, tokenize=True,
                                                              return_dict=True)["input_ids"]])
    with torch.no_grad():
        tuned = model(ids).logits
        with model.disable_adapter():
            base = model(ids).logits
    assert (tuned - base).abs().max() > 1e-4                         # one step moved the adapter

    assert main([*common, "--output_dir", str(root / "resumed"), "--resume", str(step1)]) == 0
    assert f"resumed from step 1 of 2 ({step1})" in capsys.readouterr().out
    full = load_file(root / "full" / "model" / "adapter_model.safetensors")
    resumed = load_file(root / "resumed" / "model" / "adapter_model.safetensors")
    assert set(full) == set(resumed) and all(torch.equal(full[k], resumed[k]) for k in full)
