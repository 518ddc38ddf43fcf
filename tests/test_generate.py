"""Sampling: left padding, greedy equivalence, seeds, EOS truncation and masks, filters, text helpers."""

import pytest
import torch

from preftune.generate import SamplingSettings, encode_prompts, generate_ids, generate_texts

PROMPTS = ["Describe the river in a few words:", "Tell me", "Describe a small cat in a few words: calm and quiet"]


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    from preftune.toy import build_tiny_llama

    return build_tiny_llama(tiny_tokenizer, seed=3)


def ids_of(tokenizer):
    return encode_prompts(tokenizer, PROMPTS)


def generate(model, tokenizer, prompt_ids, settings, **kwargs):
    return generate_ids(model, prompt_ids, settings, pad_token_id=tokenizer.pad_token_id,
                        eos_token_id=tokenizer.eos_token_id, **kwargs)


def test_left_padded_greedy_matches_one_by_one_and_hf_generate(model, tiny_tokenizer):
    prompt_ids = ids_of(tiny_tokenizer)
    assert len({len(p) for p in prompt_ids}) == 3  # different lengths: the batch really is padded
    greedy = SamplingSettings(max_new_tokens=12, do_sample=False)
    batched = generate(model, tiny_tokenizer, prompt_ids, greedy, batch_size=8)
    for i, prompt in enumerate(prompt_ids):
        alone = generate(model, tiny_tokenizer, [prompt], greedy)
        assert batched.response_ids[i] == alone.response_ids[0]
        reference = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                   pad_token_id=tiny_tokenizer.pad_token_id, eos_token_id=tiny_tokenizer.eos_token_id)
        expected = reference[0, len(prompt):].tolist()
        assert batched.response_ids[i] == expected[:len(batched.response_ids[i])]
    assert batched.prompt_ids == prompt_ids


def test_same_seed_same_samples_and_global_rng_untouched(model, tiny_tokenizer):
    prompt_ids = ids_of(tiny_tokenizer) * 4
    settings = SamplingSettings(max_new_tokens=10)
    model.train()
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a = generate(model, tiny_tokenizer, prompt_ids, settings, seed=7, batch_size=5)
    assert torch.equal(torch.get_rng_state(), before)
    assert model.training  # the mode is restored
    b = generate(model, tiny_tokenizer, prompt_ids, settings, seed=7, batch_size=5)
    c = generate(model, tiny_tokenizer, prompt_ids, settings, seed=8, batch_size=5)
    assert a.response_ids == b.response_ids and a.ended == b.ended
    assert a.response_ids != c.response_ids
    # identical prompts in one batch still get different samples
    assert len({tuple(r) for r in a.response_ids[::3]}) > 1


def test_responses_stop_after_first_eos_and_mask_excludes_padding(tiny_tokenizer):
    from preftune.toy import build_tiny_llama

    eos = tiny_tokenizer.eos_token_id
    model = build_tiny_llama(tiny_tokenizer, seed=0)
    with torch.no_grad():  # make EOS likely but not certain, so some responses end and others do not
        model.lm_head.weight[eos, :] = 0.0
        bias = torch.zeros(model.config.vocab_size)
        bias[eos] = 4.0
        model.lm_head.register_forward_hook(lambda m, i, o: o + bias)
    generation = generate(model, tiny_tokenizer, ids_of(tiny_tokenizer) * 6, SamplingSettings(max_new_tokens=6), seed=1)
    assert any(generation.ended) and not all(generation.ended)
    for response, ended in zip(generation.response_ids, generation.ended):
        assert 1 <= len(response) <= 6
        if ended:
            assert response[-1] == eos and response.count(eos) == 1
        else:
            assert eos not in response and len(response) == 6
    ids, mask = generation.response_tensors(tiny_tokenizer.pad_token_id)
    assert ids.shape == mask.shape == (18, max(len(r) for r in generation.response_ids))
    for i, response in enumerate(generation.response_ids):
        assert mask[i].sum() == len(response) and mask[i, :len(response)].all()
        assert ids[i, :len(response)].tolist() == response
        assert (ids[i, len(response):] == tiny_tokenizer.pad_token_id).all()


def test_top_k_one_and_tiny_top_p_are_greedy(model, tiny_tokenizer):
    prompt_ids = ids_of(tiny_tokenizer)
    greedy = generate(model, tiny_tokenizer, prompt_ids, SamplingSettings(max_new_tokens=8, do_sample=False))
    top_k = generate(model, tiny_tokenizer, prompt_ids, SamplingSettings(max_new_tokens=8, top_k=1), seed=3)
    top_p = generate(model, tiny_tokenizer, prompt_ids, SamplingSettings(max_new_tokens=8, top_p=1e-6), seed=4)
    cold = generate(model, tiny_tokenizer, prompt_ids, SamplingSettings(max_new_tokens=8, temperature=1e-4), seed=5)
    assert top_k.response_ids == greedy.response_ids == top_p.response_ids == cold.response_ids


def test_top_k_and_top_p_restrict_the_support():
    from preftune.generate import _next_token

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    gen = torch.Generator().manual_seed(0)
    picks = _next_token(logits, SamplingSettings(top_k=2), gen)
    assert set(picks.tolist()) == {0, 1}
    picks = _next_token(logits, SamplingSettings(top_p=0.7), gen)  # 0.5 < 0.7: token 1 is still needed
    assert set(picks.tolist()) == {0, 1}
    picks = _next_token(logits, SamplingSettings(), gen)
    assert set(picks.tolist()) == {0, 1, 2, 3}
    assert abs((picks == 0).float().mean().item() - 0.5) < 0.05


def test_generate_texts_n_per_prompt_and_chat(model, tiny_tokenizer):
    settings = SamplingSettings(max_new_tokens=5)
    texts = generate_texts(model, tiny_tokenizer, PROMPTS[:2], settings, n=3, seed=0)
    assert len(texts) == 2 and all(len(t) == 3 and all(isinstance(s, str) for s in t) for t in texts)
    assert texts == generate_texts(model, tiny_tokenizer, PROMPTS[:2], settings, n=3, seed=0)
    assert not any("</s>" in s or "<pad>" in s for t in texts for s in t)
    chat_ids = encode_prompts(tiny_tokenizer, ["hello"], chat=True)[0]
    assert tiny_tokenizer.decode(chat_ids).startswith("<s><|user|>hello")
    assert tiny_tokenizer.decode(chat_ids).endswith("<|assistant|>")
    assert len(generate_texts(model, tiny_tokenizer, [[{"role": "user", "content": "hi"}]], settings, seed=0)[0]) == 1


def test_bad_settings_are_rejected(model, tiny_tokenizer):
    for bad in (SamplingSettings(max_new_tokens=0), SamplingSettings(temperature=0.0), SamplingSettings(top_p=0.0),
                SamplingSettings(top_k=-1)):
        with pytest.raises(ValueError):
            generate(model, tiny_tokenizer, [[1, 2]], bad)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, tiny_tokenizer, [[]], SamplingSettings())


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs.double() * counts.sum()
    return float(((counts.double() - expected) ** 2 / expected).sum())


def test_categorical_draws_from_the_softmax():
    """Pearson's chi-square of 100,000 draws against softmax(logits): with 7 degrees of freedom it exceeds
    29.9 with probability 1e-4 when the sampler is right; a sampler that moved 1% of probability between
    the two likeliest tokens would score ~120."""
    from preftune.generate import categorical

    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -2.0, -4.0, 1.5])
    probs = torch.softmax(logits, -1)
    draws = categorical(logits.repeat(100_000, 1), torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=8)
    assert chi_square(counts, probs) < 29.9
    skewed = probs.clone()
    skewed[0] += 0.01
    skewed[1] -= 0.01
    assert chi_square(counts, skewed) > 29.9   # the test has the power to see a 1% error
    # one generator per row: each row's draws follow its own distribution, whatever the batch holds
    rows = torch.stack([logits, logits.flip(0)])
    generators = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    picks = torch.stack([categorical(rows, generators) for _ in range(20_000)])
    for row in range(2):
        assert chi_square(torch.bincount(picks[:, row], minlength=8), torch.softmax(rows[row], -1)) < 29.9
    alone = torch.Generator().manual_seed(2)
    assert [int(categorical(rows[1:], [alone])) for _ in range(50)] == picks[:50, 1].tolist()


@pytest.mark.parametrize("vocab", [32_000, 1_000])
def test_categorical_on_a_large_vocabulary_with_filtered_tokens(vocab):
    """Most of the mass on a few hundred tokens, a filtered (-inf) range never drawn, blocks of the two-level
    search full (32,000 = 125 x 256) or not (1,000); the frequency of the 50 most likely tokens and of the
    rest match their probabilities (chi-square, 50 degrees of freedom: 99.99th percentile 96.0)."""
    from preftune.generate import categorical

    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(0)) * 3
    logits[300:600] = float("-inf")
    logits[-5:] += 4.0          # some mass in the last, partial block
    probs = torch.softmax(logits, -1)
    draws = categorical(logits.repeat(20_000, 1), torch.Generator().manual_seed(1))
    assert not ((draws >= 300) & (draws < 600)).any() and (draws >= vocab - 5).any()
    top = probs.topk(50).indices
    counts = torch.bincount(draws, minlength=vocab)
    binned = torch.cat([counts[top], (counts.sum() - counts[top].sum())[None]])
    expected = torch.cat([probs[top], (1 - probs[top].sum())[None]])
    assert chi_square(binned, expected) < 96.0


def test_categorical_rejects_non_finite_logits():
    from preftune.generate import categorical

    with pytest.raises(ValueError, match="NaN"):
        categorical(torch.tensor([[0.0, float("nan")]]), torch.Generator().manual_seed(0))
