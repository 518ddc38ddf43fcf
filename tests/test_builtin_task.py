"""The built-in controlled-sentiment task at a small scale: DPO on oracle-labelled pairs raises the
oracle reward of the SFT model on held-out prefixes."""

import pytest

from preftune.demo.pipeline import DemoScale, base_model, dpo_runs, preference_pairs, supervised_model
from preftune.demo.sentiment import SentimentTask, review_corpus, sentiment_reward
from preftune.evaluate.sampling import evaluate_policy
from preftune.generate import SamplingSettings
from preftune.models import load_causal_lm, load_tokenizer
from preftune.scoring import FunctionScorer


def test_the_oracle_scores_sentiment_and_the_corpus_varies():
    assert sentiment_reward(["x"], [" the acting was truly wonderful. Highly recommended."])[0] > 0.5
    assert sentiment_reward(["x"], [" the plot was dull and painful. Avoid it."])[0] < -0.5
    scores = sentiment_reward([""] * 400, review_corpus(400, seed=1))
    assert min(scores) < -0.5 and max(scores) > 0.5  # both directions occur in the pretraining corpus


def test_dpo_raises_oracle_reward_over_sft(tmp_path):
    scale = DemoScale(corpus_reviews=2000, hidden_size=96, layers=2, vocab_size=600, pretrain_epochs=4, sft_rows=800,
                      train_prompts=96, eval_prompts=48, max_new_tokens=20, dpo_betas=(0.1,), dpo_epochs=4,
                      dpo_learning_rate=1e-3)
    base = base_model(scale, tmp_path / "cache")
    sft = supervised_model(scale, base, tmp_path)
    pairs, stats = preference_pairs(scale, sft, tmp_path)
    assert stats["pairs"] > 200 and stats["mean_oracle_spread_within_prompt"] > 0.5
    [dpo_dir] = dpo_runs(scale, sft, pairs, tmp_path)

    tokenizer, reference = load_tokenizer(str(sft)), load_causal_lm(str(sft))
    prompts = SentimentTask(eval_prompts=48, seed=scale.seed).eval_prefixes() * 2
    oracle = FunctionScorer("preftune.demo.sentiment:sentiment_reward")
    settings = SamplingSettings(max_new_tokens=20)
    before = evaluate_policy(reference, tokenizer, prompts, settings, judge=oracle, ref_model=reference, seed=5).metrics
    after = evaluate_policy(load_causal_lm(str(dpo_dir / "model")), tokenizer, prompts, settings, judge=oracle,
                            ref_model=reference, seed=5).metrics
    assert after["reward"] > before["reward"] + 0.15, (before["reward"], after["reward"])
    assert after["kl"] > 0.1 and before["kl"] == pytest.approx(0.0, abs=1e-4)
    assert after["distinct_2"] > 0.5 * before["distinct_2"]  # aligned, not collapsed
