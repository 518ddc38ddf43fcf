"""The recipes that came to images through the modality interface: KTO and ``preftune score`` (GRPO, online DPO
and iterate: test_vision_online).

Tiny vision-language models from tests/toyvision.py; the task is to name the dominant colour of a noisy
solid-colour image.
"""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from helpers import write_jsonl
from preftune import KTOConfig, RewardConfig
from preftune.cli import main
from preftune.data import TokenizeSettings, load_records
from preftune.modality import TOKENS, VISION, CompletionLogprobs, modality_for
from preftune.multimodal.data import collate_prompts, tokenize_vision_labelled
from preftune.multimodal.logprobs import image_inputs
from preftune.recipes.kto import train_kto
from preftune.recipes.reward import train_reward
from toyvision import build_tiny_vlm, build_vision_processor, make_colour_pairs

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("colours")
    return {"train": write_jsonl(root / "train.jsonl", make_colour_pairs(64, root / "images", seed=1)),
            "eval": write_jsonl(root / "eval.jsonl", make_colour_pairs(32, root / "images", seed=2)),
            "root": root}


def config(cls, data, out, **overrides):
    values = dict(dataset=str(data["train"]), eval_dataset=str(data["eval"]), output_dir=str(out),
                  per_device_batch_size=8, learning_rate=1e-3, max_length=128, logging_steps=5, max_steps=40,
                  warmup_ratio=0.0, seed=0)
    values.update(overrides)
    cfg = cls(**values)
    cfg.validate(require_model=False)
    return cfg


def summary(run) -> dict:
    return json.loads((Path(run.run_dir) / "summary.json").read_text())["eval"]


def test_kto_learns_the_dominant_colour_with_a_cached_image_reference(colour_data, tmp_path):
    processor = build_vision_processor("llava")
    cfg = config(KTOConfig, colour_data, tmp_path / "kto", precompute_ref=True, cache_dir=str(tmp_path / "cache"),
                 eval_on_start=True)
    assert modality_for(cfg) is VISION
    run = train_kto(cfg, model=build_tiny_vlm(processor, "llava"), tokenizer=processor)
    first = json.loads((run.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert first["eval/rewards/accuracies"] == 0.0     # the policy starts as its reference: every reward is 0
    assert summary(run)["eval/rewards/accuracies"] > 0.9
    # The cached reference log-probs are the starting model's, each own completion after its prompt and images.
    cached = load_file(json.loads((run.run_dir / "reference_cache.json").read_text())["eval"]["path"])["logps"]
    examples, _ = tokenize_vision_labelled(load_records(str(colour_data["eval"])), processor,
                                           TokenizeSettings(max_length=128))
    model = build_tiny_vlm(processor, "llava").eval()
    batch = collate_prompts([e.prompt for e in examples[:6]], [e.completion_ids for e in examples[:6]],
                            processor.tokenizer.pad_token_id, repeats=1)
    with torch.no_grad():
        expected = full_logits_logps(model, batch)
    torch.testing.assert_close(cached.view(-1, 2)[:6, 0], expected, rtol=0, atol=1e-4)   # (own, mismatched) each


def full_logits_logps(model, batch) -> torch.Tensor:
    """Summed completion log-probs from the model's own forward and its full logits (pixels given per row)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   **image_inputs(batch)).logits.float()
    logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (logps * batch["completion_mask"][:, 1:]).sum(-1)


def test_score_reads_image_rows_with_a_trained_vision_reward_model(colour_data, tmp_path):
    processor = build_vision_processor("llava")
    run = train_reward(config(RewardConfig, colour_data, tmp_path / "rm", max_steps=40),
                       model=build_tiny_vlm(processor, "llava"), tokenizer=processor)
    rows = [json.loads(line) for line in colour_data["eval"].read_text().splitlines()][:8]
    to_score = [{"prompt": r["prompt"], "response": r[kind][0]["content"],
                 "images": [str(colour_data["root"] / i) for i in r["images"]], "kind": kind}
                for r in rows for kind in ("chosen", "rejected")]
    scored_file = tmp_path / "scored.jsonl"
    assert main(["score", "--model", str(run.model_dir), "--input", str(write_jsonl(tmp_path / "in.jsonl", to_score)),
                 "--output", str(scored_file), "--batch_size", "3", "--device", "cpu"]) == 0
    scored = [json.loads(line) for line in scored_file.read_text().splitlines()]
    assert [s["kind"] for s in scored] == [r["kind"] for r in to_score]
    rewards = torch.tensor([s["reward"] for s in scored]).view(-1, 2)
    assert float((rewards[:, 0] > rewards[:, 1]).float().mean()) > 0.8    # it learnt: chosen above rejected
    # Each reward is the saved head on the saved model's last hidden state, computed here by the model's own forward.
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(run.model_dir).eval()
    head = load_file(str(run.model_dir / "reward_head.safetensors"))
    for number, row in enumerate(to_score[:4]):
        prompt = processor.tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        inputs = processor(text=[prompt], images=[[Image.open(row["images"][0]).convert("RGB")]], return_tensors="pt",
                           add_special_tokens=False)
        response = processor.tokenizer(row["response"], add_special_tokens=False)["input_ids"]
        ids = torch.cat([inputs["input_ids"], torch.tensor([response + [processor.tokenizer.eos_token_id]])], 1)
        with torch.no_grad():
            last = model.model(input_ids=ids, pixel_values=inputs["pixel_values"]).last_hidden_state[0, -1]
        expected = float(last @ head["weight"][0] + head["bias"][0])
        assert abs(scored[number]["reward"] - expected) < 1e-4


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_the_vision_policy_takes_the_speed_switches(family, colour_data, tmp_path):
    """One prepare_policy for text and images: fused layers reach the language model, with the same log-probs."""
    from preftune import DPOConfig
    from preftune.multimodal.data import collate_vision_pairs, tokenize_vision_pairs
    from preftune.multimodal.models import LANGUAGE_MODELS, named_part
    from preftune.speed.fused_layers import patched

    processor = build_vision_processor(family)
    records = load_records(str(colour_data["train"]))
    pairs, _ = tokenize_vision_pairs(records, processor, TokenizeSettings(max_length=128))
    batch = collate_vision_pairs(pairs[:4], processor.tokenizer.pad_token_id)
    logps = []
    for fused in (False, True):
        cfg = config(DPOConfig, colour_data, tmp_path, fused_layers=fused, fused_lora=fused, lora=True, lora_r=4)
        policy = VISION.prepare_policy(build_tiny_vlm(processor, family), cfg)
        language = named_part(policy, LANGUAGE_MODELS)[0][1]
        # 2 decoder layers of 2 norms, a gated MLP and 7 LoRA linears, and the final norm: fused layers and fused LoRA
        assert sum(patched(m) for m in language.modules()) == (2 * (3 + 7) + 1 if fused else 0)
        trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
        assert trainable and all("lora_" in n and any(f".{lm}." in n for lm in LANGUAGE_MODELS) for n in trainable)
        logps.append(CompletionLogprobs(policy, VISION, 8)(batch, TOKENS).values)
    torch.testing.assert_close(logps[1], logps[0], rtol=0, atol=1e-5)
