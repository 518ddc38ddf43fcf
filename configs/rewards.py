"""Example reward functions for configs/grpo.yaml (and a judge for configs/iterate.yaml).

A reward function takes the prompts and completions of a batch (plain text, or chat messages whose last message
is the completion) and any dataset column it names as an argument, and returns one number per completion.
"""

from __future__ import annotations


def text_of(completion) -> str:
    """A completion's text: the string itself, or the content of the last chat message."""
    if isinstance(completion, list):
        return str(completion[-1].get("content", "")) if completion else ""
    return str(completion)


def concise(prompts, completions, **columns) -> list[float]:
    """Summaries of about 40 words that end a sentence: 1 at 40 words, falling by 0.02 per word away from it,
    0.2 less for a completion that stops mid-sentence."""
    rewards = []
    for completion in completions:
        text = text_of(completion).strip()
        words = len(text.split())
        ends_sentence = text.endswith((".", "!", "?"))
        rewards.append(1.0 - 0.02 * abs(words - 40) - (0.0 if ends_sentence else 0.2))
    return rewards
