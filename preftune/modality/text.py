"""Text, the first modality: token ids in, per-token log-probs of the completions out.

A batch's final hidden states (:func:`hidden_states`: padded rows, a packed row of blocks, packed
language-modelling rows) are what :class:`~.logprobs.CompletionLogprobs` projects onto the vocabulary; the
reward model trains as :class:`RewardScorer`, the module the loop prepares (and, under data parallelism,
wraps) so that the distributed wrapper sees the forward. Pairs are packed into one row of
blocks (a prompt shared by its two responses) where the model's attention allows
(:class:`PairCollator`); :class:`TextModality` gathers it all behind :class:`~.base.Modality`.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from ..data.collate import (
    add_length_weights,
    collate_completions,
    collate_completions_packed,
    collate_pairs,
    collate_pairs_packed,
)
from ..data.kto import tokenize_kto
from ..data.packed import PackedLayout, adjacent_blocks, collate_blocks, is_packed, packed_sequences
from ..data.packing import collate_rows, join_rows, pack_examples, single_row
from ..data.preference import TokenizedPair, tokenize_preferences
from ..data.prompts import read_text_prompts
from ..data.text import SFTSettings, tokenize_sft
from ..logprobs import final_hidden_states
from ..losses.weighting import active_ld_alpha
from ..models import base_model, load_causal_lm, load_tokenizer, prepare_policy
from ..scoring import reward_model as rm
from ..scoring.files import score_file
from ..speed.attention import (
    check_block_attention,
    packed_lm_inputs,
    packed_model_inputs,
    supports_packing,
    supports_prefix_sharing,
)


def hidden_states(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Final hidden states of a text batch: ``[1, T, H]`` of a packed row of blocks (pairs, completions), else
    ``[rows, L, H]`` of padded rows or of packed language-modelling rows (``position_ids`` restarting at 0)."""
    if is_packed(batch):
        return final_hidden_states(model, batch["input_ids"], **packed_model_inputs(model, batch))
    if "position_ids" in batch:
        inputs = packed_lm_inputs(model, batch["attention_mask"], batch["position_ids"])
        return final_hidden_states(model, batch["input_ids"], inputs.pop("attention_mask"), inputs.pop("position_ids"),
                                   **inputs)
    return final_hidden_states(model, batch["input_ids"], batch["attention_mask"])


class PairCollator:
    """Pairs -> padded rows, or one packed row (prefix-shared blocks, or a block per sequence)."""

    def __init__(self, pad_token_id: int, packed: bool = False, share_prefix: bool = False,
                 ld_alpha: float | None = None):
        self.pad_token_id = pad_token_id
        self.packed = packed
        self.share_prefix = share_prefix and packed
        self.ld_alpha = active_ld_alpha(ld_alpha)   # LD-DPO: each batch carries its token weights

    @classmethod
    def for_model(cls, cfg, pad_token_id: int, model: nn.Module | None) -> PairCollator:
        """The layout the config asks for, as far as ``model``'s attention allows (None: padded)."""
        ld_alpha = getattr(cfg, "ld_alpha", None)
        if model is None:
            return cls(pad_token_id, ld_alpha=ld_alpha)
        share = getattr(cfg, "prefix_sharing", False) and supports_prefix_sharing(model)
        packed = (share or getattr(cfg, "padding_free", False)) and supports_packing(model)
        if packed and not check_block_attention(model):   # attention that ignores the layout: stay padded
            return cls(pad_token_id, ld_alpha=ld_alpha)
        return cls(pad_token_id, packed, share, ld_alpha)

    def __call__(self, pairs) -> dict[str, torch.Tensor]:
        if self.packed:
            batch = collate_pairs_packed(pairs, self.share_prefix)
        else:
            batch = collate_pairs(pairs, self.pad_token_id)
        return add_length_weights(batch, self.ld_alpha)


class RewardScorer(nn.Module):
    """Token ids -> rewards; the loop prepares (and under data parallelism wraps) this module."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids=None, position_ids=None, prompt_lengths=None,
                completion_lengths=None) -> torch.Tensor:
        if completion_lengths is not None:
            return packed_rewards(self.model, {"input_ids": input_ids, "attention_mask": attention_mask,
                                               "position_ids": position_ids, "prompt_lengths": prompt_lengths,
                                               "completion_lengths": completion_lengths})
        return rm.sequence_rewards(self.model, input_ids, attention_mask, token_type_ids)


def packed_rewards(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """One float32 reward per sequence of a packed batch (a decoder classifier: its head on each sequence's
    last token), in the batch's sequence order; equal to :func:`sequence_rewards` on padded rows."""
    hf = base_model(model)
    backbone = getattr(hf, hf.base_model_prefix)
    hidden = backbone(input_ids=batch["input_ids"], use_cache=False, **packed_model_inputs(hf, batch))
    last = PackedLayout.of(batch).last_positions().to(batch["input_ids"].device)
    return hf.score(hidden.last_hidden_state[0, last]).squeeze(-1).float()


def prepare_reward_model(model, cfg):
    """Dropout, gradient checkpointing and LoRA (the head is trained in full: ``modules_to_save``)."""
    return prepare_policy(model, cfg, task_type="SEQ_CLS", modules_to_save=[rm.head_name(model)])


# ---------------------------------------------------------------------- reference cache keys


def sequence_key(prompt_ids: list[int], completion_ids: list[int]) -> tuple:
    return tuple(prompt_ids) + tuple(completion_ids), len(completion_ids)


def row_keys(batch: dict[str, torch.Tensor]) -> list[tuple]:
    """:func:`sequence_key` of every sequence of a batch: the rows of a padded one (any padding side), or
    the sequences of a packed one."""
    if is_packed(batch):
        return [sequence_key(prompt, completion) for prompt, completion in packed_sequences(batch)]
    ids, attended = batch["input_ids"].cpu(), batch["attention_mask"].cpu().bool()
    completion = batch["completion_mask"].cpu().bool().sum(-1).tolist()
    return [(tuple(ids[i][attended[i]].tolist()), completion[i]) for i in range(ids.shape[0])]


def token_fingerprint(sequences: list[tuple[list[int], list[int]]]) -> str:
    digest = hashlib.sha256()
    for sequence in sequences:
        for ids in sequence:
            digest.update(len(ids).to_bytes(4, "little"))
            digest.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
    return digest.hexdigest()


class TextModality:
    """Token-id prompts; the policy is a causal LM, the reward model a sequence classifier."""

    name = "text"
    packs = True   # pairs and SFT rows may be packed into one row where the attention allows
    tokenize_pairs = staticmethod(tokenize_preferences)
    tokenize_labelled = staticmethod(tokenize_kto)

    def load_processor(self, name_or_path, settings=None):
        return load_tokenizer(name_or_path, settings)

    def tokenizer_of(self, processor):
        return processor

    def load_model(self, name_or_path, dtype=torch.float32, settings=None):
        return load_causal_lm(name_or_path, dtype, settings)

    def prepare_policy(self, model, cfg, **peft):
        return prepare_policy(model, cfg, **peft)

    def prompt(self, item):
        return item.prompt_ids

    def prompt_ids(self, prompt):
        return prompt

    def pair(self, prompt, chosen, rejected, row, preference_prob=1.0):
        return TokenizedPair(prompt, chosen, rejected, preference_prob, 0.0, row)

    def read_prompts(self, records, processor, max_prompt_length, skip_invalid=False):
        return read_text_prompts(records, processor, max_prompt_length, skip_invalid)

    def sampling_inputs(self, prompts):
        return None

    def pair_collator(self, cfg, pad_token_id, model):
        return PairCollator.for_model(cfg, pad_token_id, model)

    def collate_completions(self, prompts, completions, pad_token_id, packed=False):
        if packed:
            return collate_completions_packed(prompts, completions)
        return collate_completions(prompts, completions, pad_token_id)

    def sft_tokenizer(self, cfg):
        settings = SFTSettings(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                               truncation_mode=cfg.truncation_mode, completion_only_loss=cfg.completion_only_loss)
        return lambda records, tokenizer, _settings, skip_invalid=False: tokenize_sft(records, tokenizer, settings,
                                                                                     skip_invalid)

    def lm_rows(self, examples, cfg):
        return pack_examples(examples, cfg.max_length) if cfg.packing else [single_row(e) for e in examples]

    def collate_lm(self, rows, pad_token_id, packed, padding_free):
        """Padded rows (one example each, or packed ones), or with ``padding_free`` all of them in one row."""
        if padding_free:
            return collate_rows([join_rows(rows)], pad_token_id)
        batch = collate_rows(rows, pad_token_id)
        if not packed:
            del batch["position_ids"]  # one example per row: the ordinary padding mask is enough
        return batch

    def hidden_states(self, model, batch):
        return hidden_states(model, batch)

    def sequence_key(self, prompt, completion):
        return sequence_key(prompt, completion)

    def batch_keys(self, batch):
        return row_keys(batch)

    def digest(self, sequences):
        return token_fingerprint(sequences)

    def reference_logps(self, reference, sequences, pad_token_id, layout, device):
        prompts, completions = (list(part) for part in zip(*sequences))
        ld_alpha = getattr(layout, "ld_alpha", None)   # LD-DPO: sequences 2i and 2i + 1 are a pair
        if layout is None or not layout.packed:
            batch = add_length_weights(collate_completions(prompts, completions, pad_token_id), ld_alpha, True)
            return reference.sequence_logps({k: v.to(device) for k, v in batch.items()}).cpu()
        blocks = adjacent_blocks(prompts, completions, layout.share_prefix)
        batch = add_length_weights(collate_blocks(blocks), ld_alpha, adjacent=len(blocks[0][1]) == 1)
        logps = reference.sequence_logps({k: v.to(device) for k, v in batch.items()}).cpu()
        return logps.view(len(blocks[0][1]), -1).t().reshape(-1)   # back to the given order

    def reward_processor(self, processor):
        return rm.prepare_tokenizer(processor)   # responses end with EOS: an encoder's SEP where it has none

    def reward_scorer(self, cfg, model, processor):
        if model is None:
            torch.manual_seed(cfg.seed)  # the new head's initial weights
            model = rm.load_classifier(cfg.model_name_or_path, new_head=True, settings=cfg)
        rm.check_reward_model(model)
        rm.distinct_pad_token(processor)   # saved with the model: the reward is read at EOS, here and by transformers
        model.config.pad_token_id = processor.pad_token_id
        return RewardScorer(prepare_reward_model(model, cfg))

    def reward_collator(self, cfg, pad_token_id, model):
        decoder = model is not None and rm.reads_last_token(model)   # encoders read [CLS]: padded rows
        return PairCollator.for_model(cfg, pad_token_id, model if decoder else None)

    def rewards(self, scorer, batch):
        if is_packed(batch):
            return scorer(batch["input_ids"], batch["attention_mask"], None,
                          *(batch[key] for key in ("position_ids", "prompt_lengths", "completion_lengths")))
        return scorer(batch["input_ids"], batch["attention_mask"], batch["completion_mask"].long())

    def save_reward(self, scorer, model_dir):
        pass   # the classifier's head is saved with it

    def score_file(self, model_path, input_path, output_path, batch_size=16, max_length=None, split="train",
                   device=None):
        return score_file(model_path, input_path, output_path, batch_size, max_length, split, device)


TEXT = TextModality()
