"""Controlled sentiment generation: continue a movie-review prefix; the oracle rewards positive text.

The DPO paper's first experiment (IMDb prefixes, a sentiment classifier as the true reward) made
runnable offline. No pretrained model can be downloaded, so this module generates a varied review
corpus (real vocabulary, mixed sentiment within and across reviews) for a small base model to be
pretrained on, and scores continuations with VADER, a lexicon and rule-based sentiment analyser of
~7,500 words (Hutto & Gilbert 2014), as the ground-truth reward.

The corpus is built so that the same neutral opening is followed by praise in some reviews and by
complaints in others: a model trained on it continues a prefix with text of varying sentiment, and
that variation is what preference learning can exploit.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

OPENERS = [
    "I watched this movie last night and", "I saw this film with my friends and", "This film", "The movie",
    "I rented this one on a whim and", "Going in, I expected little, and", "The director's new film",
    "After all the hype,", "My honest opinion:", "I have seen it twice now and", "The story",
    "From the first scene,", "The cast", "Overall,", "This picture", "At the cinema tonight,",
]
ASPECTS = ["acting", "plot", "story", "script", "music", "soundtrack", "ending", "cast", "dialogue", "direction",
           "camera work", "pacing", "characters", "humor", "score", "lead actor", "villain", "finale"]
POSITIVE = ["wonderful", "brilliant", "beautiful", "great", "excellent", "charming", "moving", "delightful",
            "superb", "fantastic", "lovely", "funny", "clever", "touching", "amazing", "gorgeous", "inspiring",
            "enjoyable", "fresh", "powerful"]
NEGATIVE = ["awful", "boring", "terrible", "dull", "bad", "weak", "horrible", "stupid", "painful", "annoying",
            "poor", "ugly", "tedious", "disappointing", "pathetic", "lame", "dreadful", "bland", "messy", "silly"]
ADVERBS = ["really", "truly", "quite", "very", "so", "simply", "rather", "totally", "pretty"]
POSITIVE_VERBS = ["loved", "enjoyed", "adored", "liked", "admired", "appreciated"]
NEGATIVE_VERBS = ["hated", "disliked", "regretted", "could not stand", "was bored by", "hated every minute of"]
POSITIVE_CLOSERS = ["I would watch it again.", "Highly recommended.", "A real joy to watch.", "Worth every minute.",
                    "Go and see it.", "One of the best films this year."]
NEGATIVE_CLOSERS = ["I want my money back.", "Avoid it.", "A waste of time.", "Skip this one.",
                    "I almost walked out.", "One of the worst films this year."]
NEUTRAL = ["it runs about two hours", "it was shown in the evening", "the theater was half full",
           "it is based on a novel", "the film was shot in winter", "it came out last spring"]


def _sentence(rng: random.Random, positive: bool) -> str:
    adjectives = POSITIVE if positive else NEGATIVE
    verbs = POSITIVE_VERBS if positive else NEGATIVE_VERBS
    closers = POSITIVE_CLOSERS if positive else NEGATIVE_CLOSERS
    aspect = rng.choice(ASPECTS)
    pattern = rng.randrange(6)
    if pattern == 0:
        return f"the {aspect} was {rng.choice(ADVERBS)} {rng.choice(adjectives)}."
    if pattern == 1:
        return f"I {rng.choice(verbs)} the {aspect}."
    if pattern == 2:
        return f"the {aspect} felt {rng.choice(adjectives)} and {rng.choice(adjectives)}."
    if pattern == 3:
        return f"it was {rng.choice(ADVERBS)} {rng.choice(adjectives)} from start to finish."
    if pattern == 4:
        return f"{rng.choice(NEUTRAL)}, and the {aspect} was {rng.choice(adjectives)}."
    return closers[rng.randrange(len(closers))]


def review_continuation(rng: random.Random, positivity: float, sentences: int) -> str:
    """A continuation whose sentences are positive with probability ``positivity`` each."""
    parts = [_sentence(rng, rng.random() < positivity) for _ in range(sentences)]
    text = " ".join(parts)
    return " " + text


def make_review(rng: random.Random) -> tuple[str, str]:
    """(opener, continuation) with a review-level sentiment mixture, so the same opener goes both ways."""
    positivity = rng.choice([0.05, 0.2, 0.35, 0.5, 0.65, 0.8, 0.95])
    return rng.choice(OPENERS), review_continuation(rng, positivity, rng.randint(2, 4))


def review_corpus(n: int, seed: int = 0) -> list[str]:
    """``n`` whole reviews, for pretraining the base model."""
    rng = random.Random(seed)
    return [opener + continuation for opener, continuation in (make_review(rng) for _ in range(n))]


def review_pairs(n: int, seed: int = 0) -> list[dict]:
    """``n`` prompt/completion rows (opener -> continuation), for supervised fine-tuning."""
    rng = random.Random(seed)
    reviews = (make_review(rng) for _ in range(n))
    return [{"prompt": opener, "completion": continuation} for opener, continuation in reviews]


def prefixes(n: int, seed: int) -> list[str]:
    """Prompts: an opener, sometimes with the first words of a neutral sentence after it."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        opener = rng.choice(OPENERS)
        if rng.random() < 0.5:
            opener += f" the {rng.choice(ASPECTS)}"
        out.append(opener)
    return out


@lru_cache(maxsize=1)
def _analyzer():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def sentiment_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """The oracle: VADER compound sentiment of each continuation, in [-1, 1] (the prompt is ignored).

    Usable anywhere preftune takes a ``module:function`` reward or judge:
    ``preftune.demo.sentiment:sentiment_reward``.
    """
    analyzer = _analyzer()
    return [float(analyzer.polarity_scores(text)["compound"]) for text in responses]


@dataclass
class SentimentTask:
    """Held-out and training prefixes plus the corpus and the oracle, with fixed seeds."""

    train_prompts: int = 256
    eval_prompts: int = 64
    seed: int = 0

    def train_prefixes(self) -> list[str]:
        return prefixes(self.train_prompts, self.seed + 1)

    def eval_prefixes(self) -> list[str]:
        return prefixes(self.eval_prompts, self.seed + 2)

    def corpus(self, n: int) -> list[str]:
        return review_corpus(n, self.seed + 3)

    def sft_rows(self, n: int) -> list[dict]:
        return review_pairs(n, self.seed + 4)

    @staticmethod
    def reward(prompts: list[str], responses: list[str]) -> list[float]:
        return sentiment_reward(prompts, responses)
