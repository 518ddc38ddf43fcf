"""preftune.speed.head on SmolLM2-135M-Instruct (tied 49,152 x 576 head): the summed completion log-probs and their
gradients equal those of the module-called, checkpointed path, with the head trainable and frozen."""

import pytest
import torch

from preftune.logprobs import sequence_logprobs
from preftune.models import load_causal_lm

ANSWERS = [("What colour is a clear daytime sky?", "The sky is blue on a clear day, because air scatters blue "
            "sunlight more than red."),
           ("Name a fruit.", "An apple.")]


def batch(tokenizer):
    rows = []
    for question, answer in ANSWERS:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                               tokenize=True, return_dict=True)["input_ids"]
        rows.append((prompt, tokenizer(answer + "<|im_end|>", add_special_tokens=False).input_ids))
    length = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((len(rows), length), tokenizer.pad_token_id)
    attention = torch.zeros(len(rows), length, dtype=torch.long)
    completion = torch.zeros(len(rows), length, dtype=torch.bool)
    for b, (p, c) in enumerate(rows):
        ids[b, :len(p) + len(c)] = torch.tensor(p + c)
        attention[b, :len(p) + len(c)] = 1
        completion[b, len(p):len(p) + len(c)] = True
    return ids, attention, completion


def logps_and_grads(model, inputs, params, module_path):
    head = model.get_output_embeddings()
    handle = head.register_forward_hook(lambda *args: None) if module_path else None  # a hook rules the fused path out
    try:
        logps, _ = sequence_logprobs(model, *inputs, chunk_size=8)
        grads = torch.autograd.grad((logps * torch.tensor([1.0, 0.5])).sum(), params)
    finally:
        if handle is not None:
            handle.remove()
    return logps.detach(), grads


@pytest.mark.parametrize("head", ["trainable", "frozen"])
def test_fused_head_equals_the_checkpointed_module_path(head, smollm2_dir, smollm2_tokenizer, one_thread):
    model = load_causal_lm(str(smollm2_dir)).eval()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight   # tied
    inputs = batch(smollm2_tokenizer)
    layer = model.model.layers[-1]
    params = [model.model.norm.weight, layer.mlp.down_proj.weight, layer.self_attn.q_proj.weight]
    if head == "trainable":
        params.append(model.get_output_embeddings().weight)
    else:
        model.get_output_embeddings().weight.requires_grad_(False)
    fused, fused_grads = logps_and_grads(model, inputs, params, module_path=False)
    plain, plain_grads = logps_and_grads(model, inputs, params, module_path=True)
    assert inputs[2].sum() > 2 * 8 and torch.all(fused < -1.0)   # several chunks; real log-probs
    torch.testing.assert_close(fused, plain, rtol=0, atol=1e-4)
    for ours, ref in zip(fused_grads, plain_grads):
        assert ref.abs().max() > 0
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4 * float(ref.abs().max()))
