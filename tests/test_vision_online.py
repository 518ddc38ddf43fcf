"""The online recipes on prompts with images, through the modality: GRPO learns to name the colour of the image
(a reward it can only earn by looking), and online DPO's first step equals an independent computation: its
pairs are what the sampler draws with the images, its loss and log-probs those of the models' own forwards.

Tiny Llava models from tests/toyvision.py. The policy first learns the answer's form ("It is <colour>.") by SFT
on answers whose colours are drawn at random, so it names a colour without knowing which one.
"""

import copy
import dataclasses
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import read_jsonl, write_jsonl
from preftune import SFTConfig
from preftune.config import GRPOConfig, OnlineDPOConfig
from preftune.generate import SamplingSettings, generate_ids
from preftune.modality import VISION
from preftune.multimodal.data import collate_prompts
from preftune.multimodal.logprobs import image_inputs, vision_token_logprobs
from preftune.recipes import online_dpo
from preftune.recipes.grpo import train_grpo
from preftune.recipes.online import load_prompts
from preftune.recipes.online_dpo import train_online_dpo
from preftune.recipes.sft import train_sft
from preftune.runtime.seeds import mix_seed
from toyvision import COLOURS, build_tiny_vlm, build_vision_processor, make_colour_pairs

pytestmark = pytest.mark.usefixtures("one_thread")


def colour_of(pair_row: dict) -> str:
    return pair_row["chosen"][0]["content"].split()[-1].rstrip(".")


def colour_match(completions, colour, **_):
    """1 when the first colour the completion names is the image's (the row's ``colour`` column), else 0."""
    named = [[w.strip(".") for w in text.split() if w.strip(".") in COLOURS] for text in completions]
    return [1.0 if words and words[0] == want else 0.0 for words, want in zip(named, colour)]


@pytest.fixture(scope="module")
def colours(tmp_path_factory, one_thread):
    """Prompt files with images (and each image's colour), and a tiny Llava that answers with random colours."""
    root = tmp_path_factory.mktemp("online-colours")
    rng = random.Random(0)
    files = {}
    for split, seed, n in (("train", 1, 64), ("eval", 2, 32)):
        pairs = make_colour_pairs(n, root / "images", seed=seed)
        files[split] = write_jsonl(root / f"{split}.jsonl", [{"prompt": r["prompt"], "images": r["images"],
                                                               "colour": colour_of(r)} for r in pairs])
        if split == "train":
            write_jsonl(root / "sft.jsonl", [
                {"prompt": r["prompt"], "images": r["images"],
                 "completion": [{"role": "assistant", "content": f"It is {rng.choice(list(COLOURS))}."}]}
                for r in pairs])
    processor = build_vision_processor("llava")
    cfg = SFTConfig(dataset=str(root / "sft.jsonl"), output_dir=str(root / "sft"), per_device_batch_size=8,
                    learning_rate=1e-2, max_length=128, max_steps=80, warmup_ratio=0.0, seed=0)
    cfg.validate(require_model=False)
    run = train_sft(cfg, model=build_tiny_vlm(processor, "llava"), tokenizer=processor)
    return {"root": root, "processor": processor, "model": run.model_dir, **files}


def load_policy(path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path).eval()


def colour_accuracy(model, prompts, processor) -> float:
    """How often "It is <colour>." is most likely for the image's own colour, among the four colours."""
    tokenizer = processor.tokenizer
    answers = [tokenizer(f"It is {c}.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
               for c in COLOURS]
    right = 0
    for example in prompts:
        batch = collate_prompts([example.encoded] * len(answers), answers, tokenizer.pad_token_id, repeats=1)
        with torch.no_grad():
            best = int(vision_token_logprobs(model, batch).sum(-1).argmax())
        right += list(COLOURS)[best] == example.columns["colour"]
    return right / len(prompts)


def test_grpo_learns_to_name_the_colour_of_the_image(colours, tmp_path):
    processor = colours["processor"]
    held_out = load_prompts(str(colours["eval"]), "train", processor, 512, modality=VISION)
    before = colour_accuracy(load_policy(colours["model"]), held_out, processor)
    cfg = GRPOConfig(model_name_or_path=str(colours["model"]), dataset=str(colours["train"]),
                     output_dir=str(tmp_path / "grpo"), per_device_batch_size=64, num_generations=8,
                     max_completion_length=8, learning_rate=5e-3, max_steps=40, warmup_ratio=0.0, seed=0)
    cfg.validate(require_reward=False)
    run = train_grpo(cfg, tokenizer=processor, reward_funcs=[colour_match])
    rewards = [r["reward"] for r in read_jsonl(run.run_dir / "metrics.jsonl")]
    assert len(rewards) == 40
    first, last = sum(rewards[:5]) / 5, sum(rewards[-10:]) / 10
    # One colour in four by chance (less while the answer's form is still loose); only the image tells which.
    assert first < 0.3 and last > first + 0.12
    after = colour_accuracy(load_policy(run.model_dir), held_out, processor)
    assert after > 0.6 and after > before + 0.2
    samples = read_jsonl(run.run_dir / "samples.jsonl")
    assert samples and all("<image>" in s["prompt"] for s in samples)


def full_forward_sums(model, prompts, completions, pad) -> torch.Tensor:
    """Summed completion log-probs from the model's own forward over every row (pixels given per row) and its
    full logits."""
    batch = collate_prompts(prompts, completions, pad, repeats=1)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       **image_inputs(batch)).logits.float()
    logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (logps * batch["completion_mask"][:, 1:]).sum(-1)


def test_online_dpo_step_with_images_equals_an_independent_computation(colours, tmp_path, monkeypatch):
    processor = colours["processor"]
    pad = processor.tokenizer.pad_token_id
    policy = load_policy(colours["model"])
    start = copy.deepcopy(policy)
    reference = build_tiny_vlm(processor, "llava", seed=7).eval()   # another model: the loss is not log 2
    drawn = []
    original = online_dpo.OnlineDPOStep.pairs

    def recording(self, prompts, step, first):
        out = original(self, prompts, step, first)
        drawn.append((prompts, out[0]))
        return out

    monkeypatch.setattr(online_dpo.OnlineDPOStep, "pairs", recording)
    cfg = OnlineDPOConfig(model_name_or_path=str(colours["model"]), dataset=str(colours["train"]),
                          output_dir=str(tmp_path / "odpo"), per_device_batch_size=6, max_new_tokens=8,
                          learning_rate=1e-3, beta=0.2, max_steps=1, seed=3)
    cfg.validate(require_judge=False)
    run = train_online_dpo(cfg, model=policy, tokenizer=processor, ref_model=copy.deepcopy(reference),
                           judge=lambda prompts, completions: [len(c) for c in completions])
    record = read_jsonl(run.run_dir / "metrics.jsonl")[0]
    (prompts, pairs), = drawn
    assert len(pairs) == 6 and all(p.prompt.image_inputs for p in pairs)

    # The completions are what the starting policy samples with each prompt's images, seed by seed.
    ids = [p.ids for p in prompts for _ in range(2)]
    seeds = [mix_seed(cfg.seed, 0, i, j) for i in range(len(prompts)) for j in range(2)]
    settings = SamplingSettings(max_new_tokens=8, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
    tokenizer = processor.tokenizer
    resampled = generate_ids(start, ids, settings, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                             batch_size=cfg.sampling_batch_size, row_seeds=seeds,
                             prompt_inputs=[p.encoded.image_inputs for p in prompts for _ in range(2)])
    for i, pair in enumerate(pairs):
        drawn_pair = resampled.response_ids[2 * i:2 * i + 2]
        assert sorted([pair.chosen_ids, pair.rejected_ids]) == sorted(drawn_pair)

    # The step's loss and log-probs: the starting policy and the reference on the pairs, with their images.
    prompts_of = [p.prompt for p in pairs]
    chosen = full_forward_sums(start, prompts_of, [p.chosen_ids for p in pairs], pad)
    rejected = full_forward_sums(start, prompts_of, [p.rejected_ids for p in pairs], pad)
    ref_chosen = full_forward_sums(reference, prompts_of, [p.chosen_ids for p in pairs], pad)
    ref_rejected = full_forward_sums(reference, prompts_of, [p.rejected_ids for p in pairs], pad)
    loss = -F.logsigmoid(cfg.beta * ((chosen - ref_chosen) - (rejected - ref_rejected))).mean()
    assert record["loss"] == pytest.approx(float(loss), abs=1e-5)
    assert record["logps/chosen"] == pytest.approx(float(chosen.mean()), abs=1e-4)
    assert record["logps/rejected"] == pytest.approx(float(rejected.mean()), abs=1e-4)
    assert record["rewards/chosen"] == pytest.approx(float(cfg.beta * (chosen - ref_chosen).mean()), abs=1e-5)
    # Without the images the same completions score otherwise: the forward really read them.
    blind = full_forward_sums(start, [dataclasses.replace(p.prompt, image_inputs={k: torch.zeros_like(v) for k, v in
                                                                             p.prompt.image_inputs.items()})
                                      for p in pairs], [p.chosen_ids for p in pairs], pad)
    assert float((blind - chosen).abs().max()) > 1e-3


def test_prompt_files_with_images_are_refused_where_they_cannot_be_read(colours, tiny_tokenizer):
    from preftune.errors import DataError
    from preftune.modality import TEXT

    with pytest.raises(DataError, match="has images, but this trainer reads text prompts only") as error:
        load_prompts(str(colours["train"]), "train", tiny_tokenizer, 512, modality=TEXT)   # PPO's reading
    assert "row 1" in str(error.value) and "images" in str(error.value)
    with pytest.raises(DataError, match="never truncated"):
        load_prompts(str(colours["train"]), "train", colours["processor"], 20, modality=VISION)
    kept = load_prompts(str(colours["train"]), "train", colours["processor"], 512, modality=VISION)
    assert len(kept) == 64 and all(p.ids == p.encoded.ids and p.encoded.image_inputs for p in kept)
    assert all(Path(image).is_absolute() and Path(image).is_file() for p in kept for image in p.carry["images"])


def test_iterate_runs_a_round_on_prompts_with_images(colours, tmp_path):
    from preftune.config.iterate import IterateConfig
    from preftune.iterate.rounds import train_iterate

    cfg = IterateConfig(model_name_or_path=str(colours["model"]), dataset=str(colours["train"]),
                        eval_dataset=str(colours["eval"]), eval_split="train", output_dir=str(tmp_path / "it"),
                        rounds=1, samples_per_prompt=2, max_new_tokens=8, max_length=128, learning_rate=1e-3,
                        max_steps=4, per_device_batch_size=8, beta=0.1, warmup_ratio=0.0, seed=0,
                        cache_dir=str(tmp_path / "cache"))
    result = train_iterate(cfg, judge=lambda prompts, completions: [len(c) for c in completions])
    first, second = result.rounds
    assert first["eval"]["kl"] == 0.0 and 0.0 < second["eval"]["kl"] < float("inf")
    assert second["pairs_kept"] > 0 and (result.model_dir / "model.safetensors").is_file()
    pairs = read_jsonl(result.run_dir / "rounds" / "1" / "pairs.jsonl")
    assert pairs and all(Path(i).is_absolute() and Path(i).is_file() for row in pairs for i in row["images"])
    # The held-out samples of round 0 are what the initial model samples with each prompt's images.
    processor = colours["processor"]
    held_out = load_prompts(str(colours["eval"]), "train", processor, cfg.prompt_limit(), modality=VISION)
    settings = SamplingSettings(max_new_tokens=8, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
    tokenizer = processor.tokenizer
    generation = generate_ids(load_policy(colours["model"]), [p.ids for p in held_out], settings,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                              batch_size=cfg.sampling_batch_size, seed=cfg.seed + 7919,
                              prompt_inputs=[p.encoded.image_inputs for p in held_out])
    texts = tokenizer.batch_decode(generation.response_ids, skip_special_tokens=True)
    assert [r["response"] for r in read_jsonl(result.run_dir / "rounds" / "0" / "eval_samples.jsonl")] == texts


@pytest.mark.parametrize("family", ["qwen2_vl", "idefics3"])
def test_grpo_runs_on_the_other_families(family, colours, tmp_path):
    """Two GRPO iterations, two passes each, with a KL to the reference: the sampling policy's and the reference's
    log-probs of the completions after their images (Qwen2-VL: 3-D positions in the sampler and in training)."""
    processor = build_vision_processor(family)
    cfg = GRPOConfig(model_name_or_path="unused", dataset=str(colours["train"]), output_dir=str(tmp_path / family),
                     per_device_batch_size=8, num_generations=4, max_completion_length=6, learning_rate=1e-3,
                     max_steps=2, num_iterations=2, beta=0.1, warmup_ratio=0.0, seed=0)
    cfg.validate(require_model=False, require_reward=False)
    def length(prompts, completions):   # a random model names no colour: reward what differs between its samples
        return [float(len(c)) for c in completions]

    run = train_grpo(cfg, model=build_tiny_vlm(processor, family), tokenizer=processor, reward_funcs=[length])
    records = read_jsonl(run.run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    assert all(0.0 <= r["kl"] < 1.0 and abs(r["loss"]) < 10.0 for r in records) and records[1]["kl"] > 0
