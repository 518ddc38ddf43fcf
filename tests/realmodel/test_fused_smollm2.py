"""``fused_layers`` on SmolLM2-135M-Instruct: the same log-probs and gradients, fewer bytes kept for the backward."""

import pytest
import torch

from preftune.config import DPOConfig
from preftune.data.preference import TokenizedPair
from preftune.modality import TEXT, CompletionLogprobs, sequence_sums
from preftune.modality.text import PairCollator
from preftune.models import load_causal_lm
from preftune.speed.fused_layers import fuse_layers
from saved_bytes import SavedBytes


def chat_pairs(tokenizer) -> list[TokenizedPair]:
    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    prompt = ids("<|im_start|>user\nName a colour of the sky.<|im_end|>\n<|im_start|>assistant\n")
    return [TokenizedPair(prompt, ids("Blue, on a clear day.<|im_end|>"), ids("Seven.<|im_end|>"), 1.0, 0.0, 0),
            TokenizedPair(prompt[:-3], ids("Grey when it rains<|im_end|>"), ids("A fish<|im_end|>"), 1.0, 0.0, 1)]


def forward_backward(model, batch):
    """Summed log-probs per sequence, a few gradients, and the bytes autograd keeps (once per storage)."""
    model.zero_grad(set_to_none=True)
    with SavedBytes(model).counting() as saved:
        sums, _ = sequence_sums(CompletionLogprobs(model, TEXT), batch)
    (sums * torch.tensor([1.0, -1.0, 0.5, -0.5])).sum().backward()
    layer = model.model.layers[3]
    grads = {"embed": model.model.embed_tokens.weight.grad, "gate": layer.mlp.gate_proj.weight.grad,
             "down": layer.mlp.down_proj.weight.grad, "norm": layer.post_attention_layernorm.weight.grad,
             "q": layer.self_attn.q_proj.weight.grad, "final_norm": model.model.norm.weight.grad}
    return sums.detach(), {k: v.clone() for k, v in grads.items()}, saved.total


def test_fused_layers_equal_log_probs_and_gradients_with_fewer_saved_bytes(smollm2_dir, smollm2_tokenizer,
                                                                             one_thread):
    model = load_causal_lm(str(smollm2_dir))
    model.train()
    batch = PairCollator.for_model(DPOConfig(), 0, model)(chat_pairs(smollm2_tokenizer))
    tokens = batch["input_ids"].numel()
    sums, grads, saved = forward_backward(model, batch)
    config = model.config
    assert fuse_layers(model) == 3 * config.num_hidden_layers + 1
    fused_sums, fused_grads, fused_saved = forward_backward(model, batch)
    assert torch.equal(fused_sums, sums)        # the forward runs the same operations
    for name, grad in grads.items():
        scale = float(grad.abs().max())
        assert scale > 0, name
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-5, atol=1e-5 * scale, msg=name)
    # per token and layer: two normalised tensors (hidden), silu(gate) and the product (intermediate); + final norm
    floats = config.num_hidden_layers * (2 * config.hidden_size + 2 * config.intermediate_size) + config.hidden_size
    assert (saved - fused_saved) / tokens == pytest.approx(4 * floats, rel=0.1)
