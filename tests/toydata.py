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


def toy_prompt_rows(n: int, seed: int = 0, conversational: bool = False) -> list[dict]:
    """``n`` rows with a ``prompt`` only (the toy topics), for online methods that sample their own responses."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = f"Describe {rng.choice(TOPICS)} in a few words:"
        rows.append({"prompt": [{"role": "user", "content": prompt}] if conversational else prompt})
    return rows


def _count(words: list[str], text: str) -> int:
    return sum(text.count(word) for word in words)


def calm_count(prompts: list, responses: list[str]) -> list[float]:
    """A toy judge: how many calm words a response holds."""
    return [float(_count(CALM_WORDS, r)) for r in responses]


def calm_minus_loud(prompts: list, responses: list[str]) -> list[float]:
    """A toy oracle that training never sees: calm words minus loud words."""
    return [float(_count(CALM_WORDS, r) - _count(LOUD_WORDS, r)) for r in responses]
