"""Sampling from a vision-language model: the prompt's images go in on the prompt's forward, then decoding
runs from the KV cache (:func:`preftune.generate.generate_ids`, the transformers engine)."""

import pytest
import torch

from helpers import write_jsonl
from preftune.data import TokenizeSettings, load_records
from preftune.engines import TransformersEngine, sample_with
from preftune.generate import SamplingSettings
from preftune.multimodal.data import tokenize_vision_pairs
from toyvision import build_tiny_vlm, build_vision_processor, make_colour_pairs

pytestmark = pytest.mark.usefixtures("one_thread")


def greedy_alone(model, prompt, steps: int, eos: int) -> list[int]:
    """Greedy decoding of one prompt with full forwards and no cache: the pixels on every forward."""
    ids = torch.tensor([prompt.ids])
    out = []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, **prompt.image_inputs).logits[0, -1]
        token = int(logits.argmax())
        out.append(token)
        if token == eos:
            break
        ids = torch.cat([ids, torch.tensor([[token]])], 1)
    return out


@pytest.mark.parametrize("family", ["llava", "idefics3"])
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
    generation = sample_with(engine, model, [p.ids for p in prompts], settings,
                             prompt_inputs=[p.image_inputs for p in prompts])
    expected = [greedy_alone(model, p, 6, tokenizer.eos_token_id) for p in prompts]
    assert generation.response_ids == expected
    # The images reach the sampler: other pixels give other samples.
    swapped = [{k: -v.flip(-1) if k == "pixel_values" else v for k, v in p.image_inputs.items()} for p in prompts]
    other = sample_with(engine, model, [p.ids for p in prompts], settings, prompt_inputs=swapped)
    assert other.response_ids != generation.response_ids
