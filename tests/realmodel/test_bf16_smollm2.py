"""bf16 on SmolLM2-135M-Instruct: log-prob sums against fp32 within a stated bound, the default DPO path (prefix
sharing, fused layers, the head function, LoRA, a precomputed reference) in bf16 starting at exactly ln 2.

Run where the CPU has fast bf16 (AMX-BF16 or AVX512-BF16) or on a GPU; elsewhere bf16 is emulated and these
are skipped (the tiny-model bf16 tests in tests/test_bf16.py run everywhere)."""

import json
import math

import pytest
import torch
from test_head_smollm2 import batch

from preftune.logprobs import sequence_logprobs
from preftune.models import _detected_cpu, load_causal_lm

amx, avx512_bf16, _ = _detected_cpu()
pytestmark = pytest.mark.skipif(not (amx or avx512_bf16 or torch.cuda.is_available()),
                                reason="this CPU has neither AMX-BF16 nor AVX512-BF16: bf16 would be emulated")

# Measured on an AMD EPYC (Zen 4, AVX512-BF16), torch 2.13: the summed log-probs of the two answers (20 and 4
# tokens; -67.73 and -13.79 in fp32) differ from fp32 by 0.28 and 0.08: 0.014 and 0.020 per completion token.
# Bound: 0.05 per completion token (bf16 rounds each product to 2^-8 relative, through 30 layers).
PER_TOKEN_BOUND = 0.05


def test_bf16_logprob_sums_stay_within_the_bound_of_fp32(smollm2_dir, smollm2_tokenizer, one_thread):
    model = load_causal_lm(str(smollm2_dir)).eval()
    inputs = batch(smollm2_tokenizer)
    with torch.no_grad():
        full, lengths = sequence_logprobs(model, *inputs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half, _ = sequence_logprobs(model, *inputs)
    assert half.dtype == torch.float32 and torch.all(full < -1.0)
    assert torch.all((half - full).abs() <= PER_TOKEN_BOUND * lengths), (half, full)


def test_default_dpo_path_in_bf16_starts_at_ln2(smollm2_dir, smollm2_tokenizer, tmp_path, one_thread):
    from preftune import DPOConfig
    from preftune.recipes.dpo import train_dpo

    rows = [{"prompt": "Name a fruit.", "chosen": "An apple.", "rejected": "A chair."},
            {"prompt": "What colour is the sky?", "chosen": "Blue, on a clear day.", "rejected": "It is loud."}]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    cfg = DPOConfig(model_name_or_path=str(smollm2_dir), dataset=str(data), output_dir=str(out),
                    per_device_batch_size=2, max_steps=1, learning_rate=1e-5, logging_steps=1, precision="bf16",
                    precompute_ref=True, cache_dir=str(tmp_path / "cache"), lora=True)
    train_dpo(cfg)   # prefix sharing and fused layers are on by default: the path that crashed in bf16
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-7)
