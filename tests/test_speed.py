"""preftune.speed: one entry point, one switch per mechanism, each recorded in config.json; every switch off gives
the same numbers as on (to float rounding); no getter changes a model."""

import copy
import json

import pytest
import torch

from preftune.config import DPOConfig
from preftune.config.shared import SpeedSettings
from preftune.logprobs import packed_sequence_logprobs
from preftune.models import prepare_policy
from preftune.speed import MODEL_SWITCHES, apply
from preftune.speed.attention import IMPLEMENTATION, attention_implementation, packed_model_inputs
from preftune.speed.fused_layers import patched
from test_packed import collate_blocks, gqa_llama, pair_blocks, toy_pairs

pytestmark = pytest.mark.usefixtures("one_thread")


def sums_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    sums = packed_sequence_logprobs(model, batch, chunk_size=5)
    (sums * torch.linspace(-1, 1, sums.shape[0])).sum().backward()
    return sums.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_every_switch_off_gives_the_numbers_of_all_on(tiny_tokenizer, lora):
    vocab = len(tiny_tokenizer)
    torch.manual_seed(0)
    base = gqa_llama(vocab)
    batch = collate_blocks(pair_blocks(toy_pairs(vocab), True))
    runs = {}
    for off in (None, *MODEL_SWITCHES):
        cfg = DPOConfig(lora=lora, lora_r=4, lora_alpha=8, **({off: False} if off else {}))
        torch.manual_seed(1)
        model = prepare_policy(copy.deepcopy(base), cfg)
        runs[off] = sums_and_grads(model, batch)
    on_sums, on_grads = runs[None]
    assert on_grads and any(g.abs().max() > 0 for g in on_grads.values())
    for off, (sums, grads) in runs.items():
        torch.testing.assert_close(sums, on_sums, rtol=0, atol=1e-5, msg=f"{off} off")
        for name, grad in grads.items():
            scale = float(on_grads[name].abs().max())
            torch.testing.assert_close(grad, on_grads[name], rtol=0, atol=1e-5 * max(scale, 1.0), msg=f"{off} off")


def test_apply_installs_what_is_switched_on_and_is_idempotent(tiny_tokenizer):
    model = gqa_llama(len(tiny_tokenizer))
    applied = apply(model, SpeedSettings())
    assert applied.fused_layers > 0 and applied.fused_head and applied.blockwise_attention
    assert attention_implementation(model) == IMPLEMENTATION
    again = apply(model, SpeedSettings())
    assert again.fused_layers == 0                       # already patched: left as it is
    plain = gqa_llama(len(tiny_tokenizer))
    off = apply(plain, SpeedSettings(fused_layers=False, fused_head=False, blockwise_attention=False))
    assert (off.fused_layers, off.fused_head, off.blockwise_attention) == (0, False, False)
    assert not any(patched(m) for m in plain.modules()) and attention_implementation(plain) == "sdpa"


def test_packed_inputs_of_an_unswitched_model_change_nothing(tiny_tokenizer):
    """Building a packed batch's inputs is a getter: it neither registers nor switches attention."""
    vocab = len(tiny_tokenizer)
    model = gqa_llama(vocab)
    batch = collate_blocks(pair_blocks(toy_pairs(vocab), True))
    inputs = packed_model_inputs(model, batch)
    assert attention_implementation(model) == "sdpa" and inputs["attention_mask"].dim() == 4   # the dense mask
    switched = copy.deepcopy(model)
    apply(switched, SpeedSettings())
    torch.testing.assert_close(packed_sequence_logprobs(model, batch), packed_sequence_logprobs(switched, batch),
                               rtol=0, atol=1e-5)


def test_speed_settings_are_recorded_in_config_json(tiny_tokenizer, tiny_model_dir, tmp_path):
    from helpers import write_jsonl
    from preftune.recipes.dpo import train_dpo
    from toydata import make_toy_preferences

    data = write_jsonl(tmp_path / "pairs.jsonl", make_toy_preferences(8))
    cfg = DPOConfig(model_name_or_path=str(tiny_model_dir), dataset=str(data), output_dir=str(tmp_path / "run"),
                    max_steps=1, per_device_batch_size=4, fused_head=False, trim_freed_memory=3, eval_fraction=0.0)
    run = train_dpo(cfg)
    recorded = json.loads((run.run_dir / "config.json").read_text())
    recorded = recorded.get("config", recorded)
    for name in ("fused_layers", "fused_lora", "fused_head", "blockwise_attention", "reuse_freed_memory",
                 "trim_freed_memory"):
        assert recorded[name] == getattr(cfg, name), name
