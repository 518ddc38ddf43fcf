"""label_smoothing applies per pair: a pair's p never depends on its batch mates (issue 9)."""

import math

import pytest
import torch

from preftune.config import DPOConfig
from preftune.data import Records, TokenizeSettings, tokenize_preferences
from preftune.losses.preference import sigmoid_loss
from preftune.modality import SUMS, Logprobs
from preftune.recipes.dpo import DPOTask

BETA, EPS = 0.5, 0.1


REF_CHOSEN, REF_REJECTED = -3.0, -2.0


class FixedReference:
    """Every chosen row has reference log-prob -3, every rejected row -2."""

    kind = "fixed"

    def sequence_logps(self, batch):
        half = batch["input_ids"].shape[0] // 2
        return torch.tensor([REF_CHOSEN] * half + [REF_REJECTED] * half)


def fake_policy(input_ids, attention_mask, completion_mask):
    """Deterministic per-token log-probs from the ids: a pair's log-probs depend on that pair alone."""
    return -(input_ids.float() % 7 + 1) / 10 * completion_mask


def fake_module(batch, shape, **_):
    """:func:`fake_policy` as the log-prob module (``CompletionLogprobs``) DPO calls: per-sequence sums."""
    assert shape == SUMS
    return Logprobs(fake_policy(batch["input_ids"], batch["attention_mask"], batch["completion_mask"]).sum(-1))


def pair_losses(task, examples):
    batch = task.collate(examples)
    return sigmoid_loss(task.logps(fake_module, batch), BETA, label_smoothing=EPS).losses


def test_the_same_pair_has_the_same_loss_in_any_batch(tiny_tokenizer):
    rows = [{"prompt": "the cat", "chosen": " sat on the mat", "rejected": " ran"},          # no preference_prob
            {"prompt": "a dog", "chosen": " barked", "rejected": " slept all day", "preference_prob": 0.7},
            {"prompt": "the sun", "chosen": " rose", "rejected": " set", "preference_prob": 1.0}]
    records = Records("pairs.jsonl", rows, [1, 2, 3])
    pairs, _ = tokenize_preferences(records, tiny_tokenizer, TokenizeSettings(max_length=64))
    assert math.isnan(pairs[0].preference_prob) and pairs[2].preference_prob == 1.0
    task = DPOTask(DPOConfig(beta=BETA, label_smoothing=EPS), tiny_tokenizer.pad_token_id, reference=FixedReference())
    examples = pairs
    with_soft = pair_losses(task, [examples[0], examples[1]])      # a batch mate with p < 1
    with_hard = pair_losses(task, [examples[0], examples[2]])      # a batch mate with a given p = 1
    alone = pair_losses(task, [examples[0]])
    assert with_soft[0].item() == with_hard[0].item() == alone[0].item()

    # independently: p = 1 - ε for the pair without a column, its own p for the others
    def expected(example, p):
        batch = task.collate([example])
        lp = fake_policy(batch["input_ids"], batch["attention_mask"], batch["completion_mask"]).sum(-1)
        z = BETA * ((lp[0] - REF_CHOSEN) - (lp[1] - REF_REJECTED))
        return -(p * math.log(torch.sigmoid(z)) + (1 - p) * math.log(torch.sigmoid(-z)))

    assert with_soft[0].item() == pytest.approx(expected(examples[0], 1 - EPS), rel=1e-6)
    assert with_soft[1].item() == pytest.approx(expected(examples[1], 0.7), rel=1e-6)
    assert with_hard[1].item() == pytest.approx(expected(examples[2], 1.0), rel=1e-6)   # a given 1.0 is not smoothed
