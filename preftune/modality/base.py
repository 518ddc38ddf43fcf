"""The modality interface: everything that differs between a text policy and a vision-language one.

A recipe asks :func:`preftune.modality.modality_for` once and then only talks to the answer; it never
asks whether the data has images. Two implementations: :class:`preftune.modality.text.TextModality`
(token ids; packing and prefix sharing where the attention allows) and
:class:`preftune.modality.vision.VisionModality` (a processor turns prompts with images into token ids
and image tensors; the model encodes each prompt's images alongside its tokens).

A *prompt* is whatever the modality's examples hold as one: a list of token ids for text, a
:class:`~preftune.multimodal.data.VisionPrompt` (ids, image tensors, image digest) for images. A
*sequence* is ``(prompt, completion ids)``: the unit of precomputed reference log-probs. The online
trainers and iterate read prompt files into :class:`~preftune.data.prompts.PromptExample` rows whose
``encoded`` is such a prompt; the sampler gets each prompt's further inputs (its image tensors) from
:meth:`Modality.sampling_inputs`.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import torch
from torch import nn


class Modality(Protocol):
    name: str
    packs: bool                   # whether rows may be packed (prefix sharing, padding-free SFT)
    # tokenize(records, processor, settings, skip_invalid) -> (items, SkipReport), for runtime.run.tokenized_reader
    tokenize_pairs: Callable      # preference pairs (chosen and rejected after one prompt)
    tokenize_labelled: Callable   # KTO's labelled completions

    # ---- models
    def load_processor(self, name_or_path: str, settings=None) -> Any:
        """The tokenizer (text) or processor (images) of a checkpoint (``settings``: a command's model settings,
        for their loading options: :func:`preftune.models.from_pretrained_options`)."""

    def tokenizer_of(self, processor) -> Any:
        """The text tokenizer inside ``processor`` (pad and EOS ids, decoding)."""

    def load_model(self, name_or_path: str, dtype: torch.dtype = torch.float32, settings=None) -> nn.Module:
        """The generative model of a checkpoint (a causal LM, or an image-text-to-text model)."""

    def prepare_policy(self, model: nn.Module, cfg, **peft) -> nn.Module:
        """:func:`preftune.models.prepare_policy`, told which parts of ``model`` train."""

    # ---- examples and batches
    def prompt(self, item) -> Any:
        """The prompt of a pair, a labelled completion or an SFT example."""

    def prompt_ids(self, prompt) -> list[int]:
        """A prompt's token ids (image tokens included)."""

    def pair(self, prompt, chosen: list[int], rejected: list[int], row: int, preference_prob: float = 1.0) -> Any:
        """A pair of completions after one prompt (no margin; ``preference_prob`` NaN: the pair has none)."""

    def read_prompts(self, records, processor, max_prompt_length: int, skip_invalid: bool = False) -> tuple:
        """``(PromptExample rows, SkipReport)`` of a prompt file (online trainers, iterate)."""

    def sampling_inputs(self, prompts: list) -> list[dict] | None:
        """Per prompt, what the sampler gives the model besides the token ids (image tensors); None for text."""

    def pair_collator(self, cfg, pad_token_id: int, model: nn.Module | None) -> Callable:
        """Pairs -> one batch: every chosen row, then every rejected row; ``.packed`` says whether it packs."""

    def collate_completions(self, prompts: list, completions: list[list[int]], pad_token_id: int,
                            packed: bool = False) -> dict:
        """Rows ``prompt + completion`` with a completion mask (packed into one row where ``packed``)."""

    def sft_tokenizer(self, cfg) -> Callable:
        """The ``tokenize`` function that reads SFT rows under ``cfg``'s settings."""

    def lm_rows(self, examples: list, cfg) -> list:
        """SFT examples as the rows :meth:`collate_lm` batches (packed where ``cfg.packing`` and text)."""

    def collate_lm(self, examples: list, pad_token_id: int, packed: bool, padding_free: bool) -> dict:
        """SFT examples (or packed LM rows) -> a batch with a ``loss_mask``."""

    # ---- log-probs
    def hidden_states(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """Final hidden states of a batch (what the output projection receives): ``[rows, L, H]`` of padded rows,
        ``[1, T, H]`` of a packed one; :class:`~.logprobs.CompletionLogprobs` projects those that predict
        completion tokens."""

    # ---- reference cache
    def sequence_key(self, prompt, completion: list[int]) -> tuple:
        """The lookup key of one sequence's precomputed reference log-prob."""

    def batch_keys(self, batch: dict) -> list[tuple]:
        """:meth:`sequence_key` of every sequence of a batch."""

    def digest(self, sequences: list[tuple]) -> str:
        """A digest of exactly what the reference reads of ``sequences`` (token ids, and image bytes)."""

    def reference_logps(self, reference, sequences: list[tuple], pad_token_id: int, layout, device) -> torch.Tensor:
        """``[len(sequences)]`` summed log-probs of ``reference`` (one batch), on the CPU, in the given order."""

    # ---- reward models
    def reward_processor(self, processor) -> Any:
        """``processor`` made fit to read pairs for a reward model."""

    def reward_scorer(self, cfg, model: nn.Module | None, processor) -> nn.Module:
        """The module a reward model trains: a batch of pairs -> one reward per row (loaded when ``model`` is None)."""

    def rewards(self, scorer: nn.Module, batch: dict) -> torch.Tensor:
        """``[rows]`` rewards of a batch through :meth:`reward_scorer`'s module."""

    def reward_collator(self, cfg, pad_token_id: int, model: nn.Module | None) -> Callable:
        """Pairs -> the batch :meth:`rewards` reads, laid out for the reward model ``model`` (None: padded)."""

    def save_reward(self, scorer: nn.Module, model_dir) -> None:
        """Write what the saved backbone does not hold (the vision reward head)."""

    def score_file(self, model_path, input_path, output_path, batch_size: int = 16, max_length: int | None = None,
                   split: str = "train", device=None) -> Any:
        """``preftune score``: each prompt/response row of ``input_path`` and its reward, into ``output_path``."""
