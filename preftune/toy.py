"""Tiny offline building blocks: a tokenizer trained on the spot, a small Llama, a learnable toy preference.

Nothing here touches a model hub. The tests and the offline demo use these so that a full DPO run
fits in seconds on a laptop CPU. The toy preference is simple enough to learn and generalise:
a chosen response is made of "calm" words, a rejected one of "loud" words, prompts vary.
"""

from __future__ import annotations

import random

CALM_WORDS = ["gentle", "kind", "quiet", "warm", "soft", "patient", "clear", "careful", "calm", "honest"]
LOUD_WORDS = ["angry", "rude", "harsh", "noisy", "cold", "bitter", "sloppy", "vague", "loud", "false"]
TOPICS = ["the weather", "a garden", "the river", "an old book", "the city", "a small cat", "the market",
          "a long walk", "the kitchen", "a new song", "the harbour", "a winter night"]

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}{% if message['role'] != 'assistant' or not loop.last %}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def toy_corpus() -> list[str]:
    """Text the toy tokenizer is trained on: every word the toy data can produce."""
    lines = []
    for topic in TOPICS:
        lines.append(f"Describe {topic} in a few words:")
        lines.append(" ".join(CALM_WORDS) + " " + " ".join(LOUD_WORDS))
        lines.append(f"Tell me about {topic}. It is " + " and ".join(CALM_WORDS[:3] + LOUD_WORDS[:3]) + ".")
    lines.append("<|system|><|user|><|assistant|> the a an of and is")
    return lines


def build_toy_tokenizer(corpus: list[str] | None = None, vocab_size: int = 400):
    """Train a byte-level BPE tokenizer on ``corpus`` and wrap it as a ``PreTrainedTokenizerFast``.

    It has BOS, EOS and PAD tokens and a small chat template, like a real chat model's tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus or toy_corpus(), trainer=trainer)
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                      additional_special_tokens=special[3:])
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def build_tiny_llama(tokenizer, hidden_size: int = 32, layers: int = 2, heads: int = 4, seed: int = 0,
                     vocab_size: int | None = None):
    """A randomly initialised Llama small enough to train on a CPU in seconds."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def make_toy_preferences(n: int, seed: int = 0, words: int = 4, conversational: bool = False) -> list[dict]:
    """``n`` preference rows where chosen responses use calm words and rejected ones loud words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        topic = rng.choice(TOPICS)
        prompt = f"Describe {topic} in a few words:"
        chosen = " " + " ".join(rng.choice(CALM_WORDS) for _ in range(words))
        rejected = " " + " ".join(rng.choice(LOUD_WORDS) for _ in range(words))
        if conversational:
            rows.append({
                "prompt": [{"role": "user", "content": prompt}],
                "chosen": [{"role": "assistant", "content": chosen.strip()}],
                "rejected": [{"role": "assistant", "content": rejected.strip()}],
            })
        else:
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows
