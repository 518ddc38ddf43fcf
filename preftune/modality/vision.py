"""Images, the second modality: prompts with images, read through the model's processor.

What differs from text is only how rows are read (:mod:`preftune.multimodal.data`: the processor expands
each image into the model's image tokens and tensors), how a batch becomes hidden states (the model
encodes the images alongside the tokens; a pair's images once for both rows,
:mod:`preftune.multimodal.logprobs`), which weights train (:func:`preftune.multimodal.models.trainable_parts`,
handed to the one :func:`preftune.models.prepare_policy`) and the reference's cache key (token ids and a
digest of the image bytes). Rows are never packed: image tensors belong to a row.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn

from ..data.load import Records, load_records
from ..data.preference import TokenizeSettings
from ..errors import ConfigError
from ..models import from_pretrained_options, peft_wrapping, prepare_policy
from ..multimodal.data import (
    VisionPair,
    collate_prompts,
    collate_vision_examples,
    collate_vision_pairs,
    tokenize_vision_examples,
    tokenize_vision_labelled,
    tokenize_vision_pairs,
    tokenize_vision_prompts,
)
from ..multimodal.logprobs import VisionRewardScorer, vision_hidden_states
from ..multimodal.models import load_processor, load_vision_model, trainable_parts
from ..scoring.files import ScoreResult, write_scored
from .text import row_keys, sequence_key, token_fingerprint

REWARD_HEAD = "reward_head.safetensors"


class VisionPairCollator:
    """Pairs with images -> every chosen row, then every rejected row; each pair's image tensors once."""

    packed = share_prefix = False

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, pairs):
        return collate_vision_pairs(pairs, self.pad_token_id)


class VisionModality:
    """Prompts with images; the policy is an image-text-to-text model, the reward model its backbone and a head."""

    name = "vision"
    packs = False
    tokenize_pairs = staticmethod(tokenize_vision_pairs)
    tokenize_labelled = staticmethod(tokenize_vision_labelled)

    def load_processor(self, name_or_path, settings=None):
        return load_processor(name_or_path, from_pretrained_options(settings, name_or_path, weights=False))

    def tokenizer_of(self, processor):
        return processor.tokenizer

    def load_model(self, name_or_path, dtype=torch.float32, settings=None):
        return load_vision_model(name_or_path, dtype, from_pretrained_options(settings, name_or_path))

    def prepare_policy(self, model, cfg, **peft):
        return prepare_policy(model, cfg, **{**trainable_parts(model, cfg), **peft})

    def prompt(self, item):
        return item.prompt

    def prompt_ids(self, prompt):
        return prompt.ids

    def pair(self, prompt, chosen, rejected, row, preference_prob=1.0):
        return VisionPair(prompt, chosen, rejected, preference_prob, 0.0, row)

    def read_prompts(self, records, processor, max_prompt_length, skip_invalid=False):
        return tokenize_vision_prompts(records, processor, max_prompt_length, skip_invalid)

    def sampling_inputs(self, prompts):
        return [prompt.image_inputs for prompt in prompts]

    def pair_collator(self, cfg, pad_token_id, model):
        return VisionPairCollator(pad_token_id)

    def collate_completions(self, prompts, completions, pad_token_id, packed=False):
        return collate_prompts(prompts, completions, pad_token_id, repeats=1)

    def sft_tokenizer(self, cfg):
        return tokenize_vision_examples

    def lm_rows(self, examples, cfg):
        return examples

    def collate_lm(self, examples, pad_token_id, packed, padding_free):
        return collate_vision_examples(examples, pad_token_id)

    def hidden_states(self, model, batch):
        return vision_hidden_states(model, batch)

    def sequence_key(self, prompt, completion):
        return sequence_key(prompt.ids, completion), prompt.image_key

    def batch_keys(self, batch):
        return list(zip(row_keys(batch), batch["image_keys"].tolist()))

    def digest(self, sequences):
        images = hashlib.sha256(b"".join(p.image_key.to_bytes(8, "little") for p, _ in sequences)).hexdigest()
        return f"vision:{token_fingerprint([(p.ids, c) for p, c in sequences])}:{images}"

    def reference_logps(self, reference, sequences, pad_token_id, layout, device):
        batch = collate_prompts([p for p, _ in sequences], [c for _, c in sequences], pad_token_id, repeats=1)
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return reference.sequence_logps(batch).cpu()

    def reward_processor(self, processor):
        return processor

    def reward_scorer(self, cfg, model, processor):
        model = model if model is not None else self.load_model(cfg.model_name_or_path, settings=cfg)
        torch.manual_seed(cfg.seed)   # the new head's initial weights
        hidden = model.config.get_text_config().hidden_size
        return VisionRewardScorer(self.prepare_policy(model, cfg), nn.Linear(hidden, 1))

    def reward_collator(self, cfg, pad_token_id, model):
        return VisionPairCollator(pad_token_id)

    def rewards(self, scorer, batch):
        return scorer(batch)

    def save_reward(self, scorer, model_dir):
        head = {k: v.contiguous() for k, v in scorer.head.state_dict().items()}
        save_file(head, str(model_dir / REWARD_HEAD))

    def score_file(self, model_path, input_path, output_path, batch_size=16, max_length=None, split="train",
                   device=None) -> ScoreResult:
        """``preftune score`` on rows whose prompts hold images: each row's ``prompt`` (with its images) and
        ``response`` through a reward model trained by ``preftune reward`` on image pairs."""
        if batch_size <= 0:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        records = load_records(str(input_path), split=split)
        processor = self.load_processor(str(model_path))
        responses = Records(records.name, [{**row, "completion": row.get("response")} for row in records.rows],
                            records.row_numbers)
        settings = TokenizeSettings(max_length=max_length or 1 << 30, truncation_mode="keep_start")
        examples, _ = tokenize_vision_examples(responses, processor, settings)
        scorer = load_vision_reward_model(model_path, device)
        device = next(scorer.parameters()).device
        rewards = []
        with torch.inference_mode():
            for start in range(0, len(examples), batch_size):
                chunk = examples[start:start + batch_size]
                batch = collate_prompts([e.prompt for e in chunk], [e.completion_ids for e in chunk],
                                        processor.tokenizer.pad_token_id, repeats=1)
                rewards += scorer({k: v.to(device) if isinstance(v, torch.Tensor) else v
                                   for k, v in batch.items()}).tolist()
        return write_scored(records, rewards, output_path)


def load_vision_reward_model(path, device=None) -> VisionRewardScorer:
    """A reward model saved by ``preftune reward`` on image pairs (the backbone, in full or as a LoRA adapter, and
    its head), in eval mode on ``device`` (default: cuda when available)."""
    path = Path(path)
    if not (path / REWARD_HEAD).is_file():
        raise ConfigError(f"{path} has no {REWARD_HEAD}: it is not a reward model trained on data with images")
    adapter = path / "adapter_config.json"
    if adapter.is_file():
        base = json.loads(adapter.read_text()).get("base_model_name_or_path")
        if not base:
            raise ConfigError(f"{adapter}: no base_model_name_or_path to load the adapter onto")
        with peft_wrapping():
            model = PeftModel.from_pretrained(load_vision_model(base), str(path)).merge_and_unload()
    else:
        model = load_vision_model(str(path))
    head = nn.Linear(model.config.get_text_config().hidden_size, 1)
    head.load_state_dict(load_file(str(path / REWARD_HEAD)))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return VisionRewardScorer(model, head).to(device).eval()


VISION = VisionModality()
