"""The toy preference the tests learn: chosen responses are made of calm words, rejected ones of loud words.

Simple enough to learn and generalise in seconds with the tiny models of :mod:`preftune.toy`.
"""

from __future__ import annotations

import random

CALM_WORDS = ["gentle", "kind", "quiet", "warm", "soft", "patient", "clear", "careful", "calm", "honest"]
LOUD_WORDS = ["angry", "rude", "harsh", "noisy", "cold", "bitter", "sloppy", "vague", "loud", "false"]
TOPICS = ["the weather", "a garden", "the river", "an old book", "the city", "a small cat", "the market",
          "a long walk", "the kitchen", "a new song", "the harbour", "a winter night"]

def toy_corpus() -> list[str]:
    """Text the toy tokenizer is trained on: every word the toy data can produce."""
    lines = []
    for topic in TOPICS:
        lines.append(f"Describe {topic} in a few words:")
        lines.append(" ".join(CALM_WORDS) + " " + " ".join(LOUD_WORDS))
        lines.append(f"Tell me about {topic}. It is " + " and ".join(CALM_WORDS[:3] + LOUD_WORDS[:3]) + ".")
    lines.append("<|system|><|user|><|assistant|> the a an of and is")
    return lines


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
