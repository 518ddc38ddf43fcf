"""SmolLM2 with LoRA on every linear layer: the in-place adapter update changes no number."""

import copy

import torch


def test_in_place_lora_equals_peft_on_smollm2(smollm2_dir, smollm2_tokenizer):
    from preftune.config import DPOConfig
    from preftune.logprobs import sequence_logprobs
    from preftune.models import load_causal_lm, prepare_policy

    torch.manual_seed(0)
    cfg = DPOConfig(lora=True, lora_r=8, lora_alpha=16, lora_dropout=0.0)
    fused = prepare_policy(load_causal_lm(str(smollm2_dir)), cfg)
    for name, p in fused.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.01)
    plain = copy.deepcopy(fused)
    unpatched = 0
    for module in plain.modules():
        if "forward" in vars(module):
            del module.forward
            unpatched += 1
    assert unpatched >= 7 * fused.config.num_hidden_layers    # LoRA layers, and the fused norms and MLPs
    text = "The village library decided to open on Sundays, so that more families could visit."
    ids = torch.tensor([smollm2_tokenizer(text)["input_ids"]])
    completion = torch.zeros_like(ids)
    completion[:, 6:] = 1
    values = {}
    for name, model in (("plain", plain), ("fused", fused)):
        logps, _ = sequence_logprobs(model, ids, torch.ones_like(ids), completion)
        lora = [p for n, p in model.named_parameters() if p.requires_grad]
        values[name] = (logps.detach(), torch.autograd.grad(logps.sum(), lora))
    torch.testing.assert_close(values["fused"][0], values["plain"][0], rtol=0, atol=1e-4)
    for a, b in zip(values["plain"][1], values["fused"][1]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * float(a.abs().max()))
    assert values["plain"][0].item() < -10    # a real sentence under a real model
