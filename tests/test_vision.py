"""Vision-language models: log-probs with images encoded once per pair, and training that learns a visual preference.

Tiny Llava, Qwen2-VL and Idefics3 models are built from configs (tests/toyvision.py); the task is to
name the dominant colour of a noisy solid-colour image.
"""

import json
from pathlib import Path

import pytest
import torch

from helpers import write_jsonl
from preftune import DPOConfig, RewardConfig, SFTConfig
from preftune.data import TokenizeSettings, load_records
from preftune.multimodal.data import collate_vision_pairs, tokenize_vision_pairs
from preftune.multimodal.logprobs import IMAGE_PREFIX, vision_token_logprobs
from preftune.multimodal.models import TOWERS, named_part
from preftune.recipes.dpo import train_dpo
from preftune.recipes.reward import train_reward
from preftune.recipes.sft import train_sft
from toyvision import FAMILIES, build_tiny_vlm, build_vision_processor, make_colour_pairs

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("colours")
    return {"train": write_jsonl(root / "train.jsonl", make_colour_pairs(64, root / "images", seed=1)),
            "eval": write_jsonl(root / "eval.jsonl", make_colour_pairs(32, root / "images", seed=2)),
            "root": root}


def vision_batch(processor, data_file, pairs=4):
    pairs_read, _ = tokenize_vision_pairs(load_records(str(data_file)), processor, TokenizeSettings(max_length=128))
    return collate_vision_pairs(pairs_read[:pairs], processor.tokenizer.pad_token_id)


def count_images_encoded(model) -> list[int]:
    """A list that grows by the number of images (or patch rows) each call of the vision tower receives."""
    seen = []
    tower = named_part(model, TOWERS)[0][1]
    tower.register_forward_pre_hook(lambda _m, args, kwargs: seen.append(
        (args[0] if args else next(iter(kwargs.values()))).shape[0]), with_kwargs=True)
    return seen


@pytest.mark.parametrize("family", FAMILIES)
def test_images_encoded_once_per_pair_equal_repeated_pixels(family, colour_data):
    torch.manual_seed(0)
    processor = build_vision_processor(family)
    model = build_tiny_vlm(processor, family).eval()
    batch = vision_batch(processor, colour_data["train"])
    seen = count_images_encoded(model)
    shared = vision_token_logprobs(model, batch, chunk_size=8, share_images=True)
    once = seen.pop()
    repeated = vision_token_logprobs(model, batch, chunk_size=8, share_images=False)
    assert seen.pop() == 2 * once        # the plain path encodes every image twice, the shared path once
    assert shared.shape == batch["input_ids"].shape
    torch.testing.assert_close(shared, repeated, rtol=0, atol=1e-5)
    # The images matter (the comparison is not between two text-only computations) ...
    other = dict(batch)
    pixels = IMAGE_PREFIX + "pixel_values"
    other[pixels] = batch[pixels].flip(0) if family != "qwen2_vl" else batch[pixels].roll(16, dims=0)
    assert (vision_token_logprobs(model, other, chunk_size=8) - shared).abs().max() > 1e-4
    # ... and only completion tokens are scored: never an image token or the prompt.
    assert bool((shared[~batch["completion_mask"]] == 0).all())
    assert bool((shared[batch["completion_mask"][:, 1:].nonzero()[:, 0], :].sum(-1) < 0).all())


def test_gradients_equal_on_both_paths(colour_data):
    processor = build_vision_processor("llava")
    batch = vision_batch(processor, colour_data["train"])
    grads = []
    for share in (True, False):
        model = build_tiny_vlm(processor, "llava", seed=3)
        vision_token_logprobs(model, batch, chunk_size=8, share_images=share).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def config(cls, data, out, **overrides):
    values = dict(dataset=str(data["train"]), eval_dataset=str(data["eval"]), output_dir=str(out),
                  per_device_batch_size=8, learning_rate=1e-3, max_length=128, logging_steps=5, max_steps=40,
                  warmup_ratio=0.0, seed=0)
    values.update(overrides)
    cfg = cls(**values)
    cfg.validate(require_model=False)
    return cfg


def eval_metrics(run) -> dict:
    return json.loads((Path(run.run_dir) / "summary.json").read_text())["eval"]


def test_dpo_learns_the_dominant_colour(colour_data, tmp_path):
    processor = build_vision_processor("llava")
    model = build_tiny_vlm(processor, "llava")
    tower = {k: v.clone() for k, v in named_part(model, TOWERS)[0][1].state_dict().items()}
    run = train_dpo(config(DPOConfig, colour_data, tmp_path / "dpo", eval_on_start=True),
                    model=model, tokenizer=processor)
    first = json.loads((run.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert first["eval/rewards/accuracies"] == 0.0     # the policy starts as its reference
    assert eval_metrics(run)["eval/rewards/accuracies"] > 0.9
    after = named_part(model, TOWERS)[0][1].state_dict()
    assert all(torch.equal(tower[k], after[k]) for k in tower)   # --freeze_vision_tower (the default)
    assert (run.model_dir / "processor_config.json").is_file() or (run.model_dir / "preprocessor_config.json").is_file()


def test_lora_adapts_the_language_model_only(colour_data, tmp_path):
    processor = build_vision_processor("idefics3")
    model = build_tiny_vlm(processor, "idefics3")
    cfg = config(DPOConfig, colour_data, tmp_path / "lora", lora=True, lora_r=8, learning_rate=5e-3, max_steps=40,
                 adapt_projector=True)
    run = train_dpo(cfg, model=model, tokenizer=processor)
    assert eval_metrics(run)["eval/rewards/accuracies"] > 0.9
    adapted = [name for name, _ in model.named_modules() if name.endswith(".lora_A")]
    assert len(adapted) == 7 * 2 and all(".text_model." in name for name in adapted)   # the language model only
    adapter = json.loads((run.model_dir / "adapter_config.json").read_text())
    assert adapter["modules_to_save"] == ["model.connector"]                          # --adapt_projector


def test_a_resumed_run_ends_with_the_same_weights(colour_data, tmp_path):
    processor = build_vision_processor("llava")
    full = build_tiny_vlm(processor, "llava")
    train_dpo(config(DPOConfig, colour_data, tmp_path / "full", max_steps=4, save_steps=2), model=full,
              tokenizer=processor)
    resumed = build_tiny_vlm(processor, "llava")
    train_dpo(config(DPOConfig, colour_data, tmp_path / "resumed", max_steps=4,
                     resume=str(tmp_path / "full" / "checkpoints" / "step-2")), model=resumed, tokenizer=processor)
    start = build_tiny_vlm(processor, "llava").state_dict()
    ends = full.state_dict(), resumed.state_dict()
    assert any(not torch.equal(start[k], ends[0][k]) for k in start)          # it trained
    assert all(torch.equal(ends[0][k], ends[1][k]) for k in start)


def test_precomputed_reference_is_cached_with_the_images(colour_data, tmp_path):
    processor = build_vision_processor("qwen2_vl")
    cache = tmp_path / "cache"
    runs = []
    for name, steps in (("first", 40), ("second", 1)):
        model = build_tiny_vlm(processor, "qwen2_vl")
        cfg = config(DPOConfig, colour_data, tmp_path / name, precompute_ref=True, cache_dir=str(cache),
                     max_steps=steps)
        runs.append(train_dpo(cfg, model=model, tokenizer=processor))
    described = [json.loads((r.run_dir / "reference_cache.json").read_text()) for r in runs]
    assert not described[0]["train"]["reused"] and described[1]["train"]["reused"]
    assert described[0]["train"]["path"] == described[1]["train"]["path"]
    assert eval_metrics(runs[0])["eval/rewards/accuracies"] > 0.9
    # The cached values are the live reference's, and one changed image changes the key.
    from safetensors.torch import load_file

    cached = load_file(described[0]["eval"]["path"])["logps"]
    model = build_tiny_vlm(processor, "qwen2_vl").eval()
    batch = vision_batch(processor, colour_data["eval"], pairs=32)
    with torch.no_grad():
        chosen, rejected = vision_token_logprobs(model, batch).sum(-1).chunk(2)
    torch.testing.assert_close(cached.view(-1, 2), torch.stack([chosen, rejected], 1), rtol=0, atol=1e-4)
    rows = [json.loads(line) for line in colour_data["eval"].read_text().splitlines()]
    image = colour_data["root"] / rows[0]["images"][0]
    from PIL import Image

    changed = tmp_path / "changed"
    changed.mkdir()
    Image.open(image).rotate(90).save(changed / "x.png")
    rows[0]["images"] = [str(changed / "x.png")]
    eval_file = write_jsonl(colour_data["root"] / "eval-changed.jsonl", rows)
    cfg = config(DPOConfig, {**colour_data, "eval": eval_file}, tmp_path / "third", precompute_ref=True,
                 cache_dir=str(cache), max_steps=1)
    third = train_dpo(cfg, model=build_tiny_vlm(processor, "qwen2_vl"), tokenizer=processor)
    described = json.loads((third.run_dir / "reference_cache.json").read_text())
    assert described["train"]["reused"] and not described["eval"]["reused"]


def test_reward_model_learns_the_dominant_colour(colour_data, tmp_path):
    processor = build_vision_processor("llava")
    run = train_reward(config(RewardConfig, colour_data, tmp_path / "rm", learning_rate=1e-3, max_steps=40),
                       model=build_tiny_vlm(processor, "llava"), tokenizer=processor)
    assert eval_metrics(run)["eval/accuracy"] > 0.9
    assert (run.model_dir / "reward_head.safetensors").is_file()


def test_sft_lowers_held_out_loss(colour_data, tmp_path):
    root = tmp_path / "sft"
    root.mkdir()
    for split in ("train", "eval"):
        rows = [{"prompt": r["prompt"], "completion": r["chosen"], "images": [str(colour_data["root"] / i)
                                                                          for i in r["images"]]}
                for r in map(json.loads, colour_data[split].read_text().splitlines())]
        write_jsonl(root / f"{split}.jsonl", rows)
    data = {"train": root / "train.jsonl", "eval": root / "eval.jsonl"}
    processor = build_vision_processor("qwen2_vl")
    run = train_sft(config(SFTConfig, data, root / "run", max_steps=40, learning_rate=1e-2, eval_on_start=True),
                    model=build_tiny_vlm(processor, "qwen2_vl"), tokenizer=processor)
    records = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    held = [r["eval/loss"] for r in records if "eval/loss" in r]
    assert held[-1] < 0.5 * held[0]
