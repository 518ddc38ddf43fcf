"""Sampling from a vision-language model: the prompt's images go in on the prompt's forward, then decoding
runs from the KV cache (:func:`preftune.generate.generate_ids`, the transformers engine). Qwen2-VL's 3-D
positions over the image are computed for the left-padded prompts and continued for the response."""

import pytest
import torch

from helpers import write_jsonl
from preftune.data import TokenizeSettings, load_records
from preftune.engines import TransformersEngine, sample_with
from preftune.generate import SamplingSettings
from preftune.multimodal.data import tokenize_vision_pairs
from toyvision import build_tiny_vlm, build_vision_processor, make_colour_pairs

pytestmark = pytest.mark.usefixtures("one_thread")


def greedy_alone(model, prompt, steps: int, eos: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding of one prompt with full forwards and no cache (the pixels on every forward): the tokens
    and each step's next-token logits."""
    ids = torch.tensor([prompt.ids])
    out, logits = [], []
    for _ in range(steps):
        types = {}
        if prompt.token_types is not None:   # Qwen2-VL: the processor's token types place the image's 3-D positions
            types["mm_token_type_ids"] = torch.tensor([prompt.token_types + [0] * len(out)])
        with torch.no_grad():
            logits.append(model(input_ids=ids, **prompt.image_inputs, **types).logits[0, -1])
        token = int(logits[-1].argmax())
        out.append(token)
        if token == eos:
            break
        ids = torch.cat([ids, torch.tensor([[token]])], 1)
    return out, logits


@pytest.mark.parametrize("family", ["llava", "idefics3", "qwen2_vl"])
def test_greedy_samples_equal_decoding_each_prompt_alone(family, tmp_path):
    processor = build_vision_processor(family)
    model = build_tiny_vlm(processor, family, seed=4).eval()
    rows = make_colour_pairs(3, tmp_path / "images", seed=3)
    rows[1]["prompt"][0]["content"][1]["text"] += " Please answer in a few words."   # prompts of unequal lengths
    pairs, _ = tokenize_vision_pairs(load_records(str(write_jsonl(tmp_path / "d.jsonl", rows))), processor,
                                     TokenizeSettings(max_length=256))
    prompts = [p.prompt for p in pairs]
    assert len({len(p.ids) for p in prompts}) > 1
    tokenizer = processor.tokenizer
    engine = TransformersEngine(model, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                batch_size=3)
    settings = SamplingSettings(max_new_tokens=6, do_sample=False)
    seen = []   # the sampler's next-token logits, step by step (the prompt's forward, then each cached one)
    hook = model.register_forward_hook(lambda module, args, out: seen.append(out.logits[:, -1]))
    generation = sample_with(engine, model, [p.ids for p in prompts], settings,
                             prompt_inputs=[p.image_inputs for p in prompts])
    hook.remove()
    alone = [greedy_alone(model, p, 6, tokenizer.eos_token_id) for p in prompts]
    assert generation.response_ids == [tokens for tokens, _ in alone]
    # Not only the argmax: every step's logits are those of the prompt decoded alone (Qwen2-VL: its 3-D positions)
    for i, (_, logits) in enumerate(alone):
        for step, expected in enumerate(logits):
            torch.testing.assert_close(seen[step][i], expected, rtol=0, atol=1e-5)
    # The images reach the sampler: other pixels give other samples.
    swapped = [{k: -v.flip(-1) if k == "pixel_values" else v for k, v in p.image_inputs.items()} for p in prompts]
    other = sample_with(engine, model, [p.ids for p in prompts], settings, prompt_inputs=swapped)
    assert other.response_ids != generation.response_ids
