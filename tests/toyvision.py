"""Tiny vision-language models and their processors, built from configs offline, and a toy colour task.

Each family (Llava, Idefics3 / SmolVLM, Qwen2-VL) gets a processor assembled from a local image
processor and the toy tokenizer with the family's image tokens added, and a randomly initialised model
a few thousand parameters wide. The task: a solid-colour image (with a little noise); the chosen
answer names its colour, the rejected one another colour.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from PIL import Image
from transformers import Qwen2VLImageProcessorPil, Qwen2VLProcessor

from preftune.toy import build_toy_tokenizer

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
QUESTIONS = ["What colour is this?", "Which colour do you see?", "Name the colour.", "What is the main colour?"]
IMAGE_TOKENS = ["<image>", "<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<fake_token_around_image>",
                "<global-img>", "<end_of_utterance>"]
FAMILIES = ("llava", "qwen2_vl", "idefics3")
IMAGE_SIZE = 28

# The toy chat template, taught to render content parts: an image part becomes the family's placeholder.
VISION_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}IMAGE_PLACEHOLDER"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] != 'assistant' or not loop.last %}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
PLACEHOLDERS = {"llava": "<image>", "idefics3": "<image>", "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>"}


def colour_corpus() -> list[str]:
    words = [f"<|user|>{q}\n<|assistant|>It is {c}." for q in QUESTIONS for c in COLOURS]
    return words * 4


def colour_image(name: str, seed: int, size: int = IMAGE_SIZE) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.array(COLOURS[name], dtype=np.float32)
    pixels = base + rng.normal(0, 20, size=(size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def make_colour_pairs(n: int, image_dir: Path, seed: int = 0, style: str = "parts") -> list[dict]:
    """``n`` pairs whose images are written under ``image_dir`` (paths relative to its parent).

    ``style``: "parts" puts an image part in the prompt message, "column" gives plain string contents
    (the reader adds the image part) — both with an ``images`` column.
    """
    rng = random.Random(seed)
    image_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        colour = rng.choice(list(COLOURS))
        other = rng.choice([c for c in COLOURS if c != colour])
        name = f"{seed}-{i}.png"
        colour_image(colour, seed * 100_000 + i).save(image_dir / name)
        question = rng.choice(QUESTIONS)
        content = [{"type": "image"}, {"type": "text", "text": question}] if style == "parts" else question
        rows.append({"prompt": [{"role": "user", "content": content}],
                     "chosen": [{"role": "assistant", "content": f"It is {colour}."}],
                     "rejected": [{"role": "assistant", "content": f"It is {other}."}],
                     "images": [f"{image_dir.name}/{name}"]})
    return rows


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2-VL's processor without its video processor (which needs torchvision, not installed here)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)


def build_vision_processor(family: str):
    tokenizer = build_toy_tokenizer(colour_corpus(), vocab_size=300)
    tokenizer.add_tokens(IMAGE_TOKENS, special_tokens=True)
    template = VISION_TEMPLATE.replace("IMAGE_PLACEHOLDER", PLACEHOLDERS[family])
    tokenizer.chat_template = template
    if family == "llava":
        from transformers import CLIPImageProcessorPil, LlavaProcessor

        images = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE}, crop_size=IMAGE_SIZE)
        return LlavaProcessor(images, tokenizer, patch_size=7, vision_feature_select_strategy="default",
                              chat_template=template, num_additional_image_tokens=1)
    if family == "qwen2_vl":
        images = Qwen2VLImageProcessorPil(min_pixels=IMAGE_SIZE * IMAGE_SIZE, max_pixels=IMAGE_SIZE * IMAGE_SIZE,
                                       patch_size=7, merge_size=2, temporal_patch_size=2)
        return ImageOnlyQwen2VLProcessor(images, tokenizer, chat_template=template)
    if family == "idefics3":
        from transformers import Idefics3ImageProcessorPil, Idefics3Processor

        images = Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": IMAGE_SIZE},
                                        max_image_size={"longest_edge": IMAGE_SIZE})
        return Idefics3Processor(images, tokenizer, image_seq_len=4, chat_template=template)
    raise ValueError(f"unknown family {family}")


def _text_config(tokenizer, hidden: int) -> dict:
    return dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)


def _vision_config(hidden: int, patch: int) -> dict:
    return dict(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=1, num_attention_heads=2,
                image_size=IMAGE_SIZE, patch_size=patch)


def build_tiny_vlm(processor, family: str, hidden: int = 32, seed: int = 0):
    """A randomly initialised vision-language model of ``family`` matching ``processor``."""
    import torch

    tokenizer = processor.tokenizer
    image_token = tokenizer.convert_tokens_to_ids(processor.image_token)
    text = _text_config(tokenizer, hidden)
    torch.manual_seed(seed)
    if family == "llava":
        from transformers import LlavaConfig, LlavaForConditionalGeneration

        config = LlavaConfig(vision_config={"model_type": "clip_vision_model", **_vision_config(hidden, 7),
                                            "projection_dim": hidden},
                             text_config={"model_type": "llama", **text}, image_token_index=image_token,
                             vision_feature_layer=-1, image_seq_length=16, tie_word_embeddings=False)
        return LlavaForConditionalGeneration(config)
    if family == "qwen2_vl":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        vision = dict(depth=1, embed_dim=hidden, hidden_size=hidden, num_heads=2, mlp_ratio=2, patch_size=7,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
        text = {**text, "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0}}
        config = Qwen2VLConfig(vision_config=vision, text_config=text, image_token_id=image_token,
                               vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
                               vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
                               video_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>") + 1000,
                               tie_word_embeddings=False)
        return Qwen2VLForConditionalGeneration(config)
    if family == "idefics3":
        from transformers import Idefics3Config, Idefics3ForConditionalGeneration

        config = Idefics3Config(vision_config=_vision_config(hidden, 7), text_config={"model_type": "llama", **text},
                                image_token_id=image_token, scale_factor=2, tie_word_embeddings=False)
        return Idefics3ForConditionalGeneration(config)
    raise ValueError(f"unknown family {family}")
