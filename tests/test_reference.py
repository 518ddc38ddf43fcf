"""make_reference's four kinds against log-probs computed here from full logits."""

from dataclasses import asdict
from types import SimpleNamespace

import pytest
import torch

from preftune.config.shared import SpeedSettings
from preftune.data.collate import collate_completions
from preftune.modality.text import row_keys, sequence_key
from preftune.models import apply_lora
from preftune.runtime.reference import make_reference
from preftune.runtime.run import RunContext, make_accelerator

SEQUENCES = [([1, 40, 41], [50, 51, 2]), ([1, 42], [52, 2]), ([1, 43, 44, 45], [53, 54, 55, 2]), ([1, 40, 41], [56, 2])]

pytestmark = pytest.mark.usefixtures("one_thread")


def settings(tmp_path, **overrides):
    values = dict(ref_model_name_or_path=None, model_name_or_path=None, logprob_chunk_size=7,
                  cache_dir=str(tmp_path / "cache"), per_device_batch_size=1, **asdict(SpeedSettings()))
    return SimpleNamespace(**{**values, **overrides})


def context(tmp_path):
    return RunContext(make_accelerator("fp32", [], tmp_path), tmp_path / "run", "fp32")


def batch_of(sequences, pad=0):
    prompts, completions = zip(*sequences)
    return collate_completions(list(prompts), list(completions), pad)


def plain_logps(model, sequences) -> torch.Tensor:
    """Sum of log softmax over each completion, one sequence at a time, from the model's full logits."""
    out = []
    with torch.no_grad():
        for prompt, completion in sequences:
            ids = torch.tensor([prompt + completion])
            logits = model(input_ids=ids).logits[0, :-1].double()
            picked = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
            out.append(picked[len(prompt) - 1:].sum())
    return torch.stack(out).float()


def test_no_reference_for_reference_free_losses(tiny_model, tmp_path):
    reference = make_reference(settings(tmp_path), context(tmp_path), tiny_model, needed=False)
    assert reference.kind == "none"
    with pytest.raises(RuntimeError):
        reference.sequence_logps(batch_of(SEQUENCES))


def test_frozen_copy_of_the_policy_matches_plain_logps(tiny_model, tmp_path):
    reference = make_reference(settings(tmp_path), context(tmp_path), tiny_model)
    assert reference.kind == "model" and reference.model is not tiny_model
    assert not any(p.requires_grad for p in reference.model.parameters())
    batch = batch_of(SEQUENCES)
    expected = plain_logps(tiny_model, SEQUENCES)
    torch.testing.assert_close(reference.sequence_logps(batch), expected, atol=1e-5, rtol=0)
    lengths = batch["completion_mask"].sum(-1).tolist()
    per_token = torch.split(reference.token_logps(batch), lengths)
    torch.testing.assert_close(torch.stack([t.sum() for t in per_token]).float(), expected, atol=1e-5, rtol=0)
    with torch.no_grad():  # the copy does not follow later changes to the policy
        next(tiny_model.parameters()).add_(1.0)
    torch.testing.assert_close(reference.sequence_logps(batch), expected, atol=1e-5, rtol=0)


def test_lora_policy_uses_its_base_weights_with_adapters_disabled(tiny_tokenizer, tmp_path):
    from preftune.toy import build_tiny_llama

    base = build_tiny_llama(tiny_tokenizer)
    expected = plain_logps(base, SEQUENCES)
    policy = apply_lora(build_tiny_llama(tiny_tokenizer), r=4, alpha=8, dropout=0.0,
                        target_modules=["q_proj", "v_proj"])
    with torch.no_grad():  # a trained adapter: B != 0, so the policy differs from its base
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    reference = make_reference(settings(tmp_path), context(tmp_path), policy)
    assert reference.kind == "adapter" and reference.model is policy
    batch = batch_of(SEQUENCES)
    torch.testing.assert_close(reference.sequence_logps(batch), expected, atol=1e-5, rtol=0)
    assert (plain_logps(policy, SEQUENCES) - expected).abs().max() > 1e-3   # the adapters are back on afterwards


def test_explicit_reference_model_wins_over_the_adapters(tiny_tokenizer, tmp_path):
    from preftune.toy import build_tiny_llama

    other = build_tiny_llama(tiny_tokenizer, seed=7)
    policy = apply_lora(build_tiny_llama(tiny_tokenizer), r=4, alpha=8, dropout=0.0, target_modules=["q_proj"])
    reference = make_reference(settings(tmp_path), context(tmp_path), policy, ref_model=other)
    assert reference.kind == "model" and reference.model is other
    torch.testing.assert_close(reference.sequence_logps(batch_of(SEQUENCES)), plain_logps(other, SEQUENCES),
                               atol=1e-5, rtol=0)


def test_precomputed_equals_live_is_cached_and_keyed_by_tokens(tiny_model, tmp_path, monkeypatch):
    cfg, ctx = settings(tmp_path), context(tmp_path)
    splits = {"train": SEQUENCES[:3], "eval": SEQUENCES[3:]}
    reference = make_reference(cfg, ctx, tiny_model, precompute=splits, pad_token_id=0)
    assert reference.kind == "precomputed"
    # rows in another order, with other padding, still find their own values
    shuffled = [SEQUENCES[3], SEQUENCES[0], SEQUENCES[2], SEQUENCES[1]]
    batch = batch_of(shuffled, pad=3)
    assert row_keys(batch) == [sequence_key(*s) for s in shuffled]
    torch.testing.assert_close(reference.sequence_logps(batch), plain_logps(tiny_model, shuffled), atol=1e-5, rtol=0)

    from preftune.runtime import reference as reference_module

    def must_not_run(*args, **kwargs):
        raise AssertionError("the reference model ran although its log-probs were cached")

    monkeypatch.setattr(reference_module.LiveReference, "sequence_logps", must_not_run)
    again = make_reference(cfg, ctx, tiny_model, precompute=splits, pad_token_id=0)
    assert again.table == reference.table
    monkeypatch.undo()
    changed = make_reference(cfg, ctx, tiny_model, precompute={"train": SEQUENCES[:2]}, pad_token_id=0)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 3   # other tokens: another cache entry
    with pytest.raises(RuntimeError, match="no precomputed"):
        changed.sequence_logps(batch_of(SEQUENCES[2:3]))
