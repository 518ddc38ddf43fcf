"""The exact per-token KL of :func:`preftune.logprobs.token_kl` equals the plain full-logits computation,
in chunks; the evaluation's KL built on it is never negative."""

import pytest
import torch

from preftune.logprobs import token_kl

pytestmark = pytest.mark.usefixtures("one_thread")


def plain_token_kl(model, ref, ids, attention, completion):
    """The textbook computation on whole [B, L, V] logits (fine for a tiny model)."""
    with torch.no_grad():
        logp = torch.log_softmax(model(ids, attention_mask=attention).logits.double(), -1)[:, :-1]
        logq = torch.log_softmax(ref(ids, attention_mask=attention).logits.double(), -1)[:, :-1]
    kl = (logp.exp() * (logp - logq)).sum(-1) * completion[:, 1:]
    return torch.nn.functional.pad(kl, (1, 0))


@pytest.fixture()
def two_models(tiny_tokenizer):
    from preftune.toy import build_tiny_llama

    return build_tiny_llama(tiny_tokenizer, seed=0).eval(), build_tiny_llama(tiny_tokenizer, seed=1).eval()


def batch(vocab: int):
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(3, vocab, (3, 9), generator=generator)
    attention = torch.ones_like(ids)
    attention[2, 7:] = 0                              # a padded row
    completion = torch.zeros_like(ids)
    completion[:, 4:] = 1
    completion[2, 7:] = 0
    return ids, attention, completion


@pytest.mark.parametrize("chunk_size", [1, 4, 1024])
def test_token_kl_equals_the_full_logits_computation(two_models, chunk_size):
    model, ref = two_models
    ids, attention, completion = batch(model.config.vocab_size)
    got = token_kl(model, ref, ids, attention, completion, chunk_size=chunk_size)
    expected = plain_token_kl(model, ref, ids, attention, completion)
    assert got.shape == ids.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-6)
    assert (got[completion == 0] == 0).all() and (got[completion.bool()] > 0).all()


def test_token_kl_of_a_model_to_itself_is_zero(two_models):
    model, _ = two_models
    ids, attention, completion = batch(model.config.vocab_size)
    assert token_kl(model, model, ids, attention, completion).abs().max() == 0


def test_eval_kl_is_the_summed_token_kl_and_never_negative(two_models, tiny_tokenizer):
    """A reference a hair away from the policy: the sampled log-ratio goes negative on some samples, the exact
    per-token KL never does."""
    from preftune.evaluate.sampling import evaluate_policy, response_statistics, sample_responses
    from preftune.generate import SamplingSettings

    model, _ = two_models
    ref = type(model)(model.config).eval()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 1e-3)
    prompts = ["Describe the river in a few words:", "Describe a garden in a few words:"] * 4
    settings = SamplingSettings(max_new_tokens=8)
    result = evaluate_policy(model, tiny_tokenizer, prompts, settings, ref_model=ref, seed=0)
    samples = sample_responses(model, tiny_tokenizer, prompts, settings, seed=0)
    stats = response_statistics(model, samples, tiny_tokenizer.pad_token_id, ref_model=ref)
    assert all(kl >= 0 for kl in stats["kl"]) and result.metrics["kl"] > 0
    assert result.metrics["kl"] == pytest.approx(sum(stats["kl"]) / len(prompts), rel=1e-6)
    from preftune.data.collate import collate_completions
    from preftune.logprobs import sequence_logprobs

    columns = collate_completions(samples.prompt_ids, samples.response_ids, tiny_tokenizer.pad_token_id)
    inputs = (columns["input_ids"], columns["attention_mask"], columns["completion_mask"])
    with torch.no_grad():
        ratio = sequence_logprobs(model, *inputs)[0] - sequence_logprobs(ref, *inputs)[0]
    assert (ratio < 0).any()               # what the old estimator averaged: some samples below zero
