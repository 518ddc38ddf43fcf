"""Image preference training with a real language model: SmolLM2-135M-Instruct as the language model of a
Llava, behind a small vision tower built from a config (no pretrained vision model is obtainable offline).

It checks what the tiny models cannot: a real tokenizer's chat format with an added image token, the real
model's weights carried into the vision-language model, LoRA on its 30 layers, and a falling DPO loss.
"""

import json

import torch

from helpers import write_jsonl
from preftune.models import load_causal_lm
from toyvision import make_colour_pairs

CHATML_PARTS = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def smollm2_llava(smollm2_dir, smollm2_tokenizer):
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = smollm2_tokenizer
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    tokenizer.chat_template = CHATML_PARTS
    images = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size=28)
    processor = LlavaProcessor(images, tokenizer, patch_size=7, vision_feature_select_strategy="default",
                               chat_template=CHATML_PARTS, num_additional_image_tokens=1)
    language = load_causal_lm(str(smollm2_dir))
    text = language.config.to_dict()
    vision = dict(model_type="clip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=7, projection_dim=64)
    config = LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-1, image_seq_length=16,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         tie_word_embeddings=language.config.tie_word_embeddings)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    model.model.language_model.load_state_dict(language.model.state_dict())
    model.resize_token_embeddings(len(tokenizer))
    model.lm_head.weight = model.model.language_model.embed_tokens.weight      # SmolLM2 ties them
    return model, processor, language


def test_dpo_on_image_prompts_with_smollm2_as_the_language_model(smollm2_dir, smollm2_tokenizer, one_thread,
                                                                   tmp_path):
    from preftune import DPOConfig
    from preftune.recipes.dpo import train_dpo

    model, processor, language = smollm2_llava(smollm2_dir, smollm2_tokenizer)
    rows = make_colour_pairs(4, tmp_path / "images", seed=3)
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    # The text positions run exactly the real model: the question alone scores as SmolLM2 scores it.
    ids = smollm2_tokenizer("It is red.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits[:, :, :language.config.vocab_size],
                                   language(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    cfg = DPOConfig(dataset=str(data), output_dir=str(tmp_path / "run"), per_device_batch_size=4, max_length=96,
                    logging_steps=1, max_steps=4, warmup_ratio=0.0, seed=0, lora=True, lora_r=8, learning_rate=2e-3)
    cfg.validate(require_model=False)
    run = train_dpo(cfg, model=model, tokenizer=processor)
    losses = [json.loads(line)["loss"] for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert abs(losses[0] - 0.6931) < 1e-3            # the policy starts as its reference (adapters off)
    assert losses[-1] < losses[0] - 0.05             # and learns the four pairs it keeps seeing
    adapted = [name for name, _ in model.named_modules() if name.endswith(".lora_A")]
    assert len(adapted) == 7 * 30 and all(".language_model." in name for name in adapted)   # LoRA on the LM only
    assert (run.model_dir / "adapter_model.safetensors").is_file()
