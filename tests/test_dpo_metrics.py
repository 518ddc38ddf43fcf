"""TRL's num_tokens: the tokens trained on so far (kept across a resume: tests/test_loop_steps.py)."""

from pathlib import Path

import pytest
import torch

from helpers import read_jsonl, write_jsonl
from preftune import DPOConfig
from preftune.data import TokenizeSettings, load_records, tokenize_preferences
from preftune.models import load_tokenizer
from preftune.recipes.dpo import train_dpo
from toydata import make_toy_preferences


def test_num_tokens_counts_every_trained_token_as_trl_does(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", make_toy_preferences(16, seed=3))
    cfg = DPOConfig(model_name_or_path=str(tiny_model_dir), dataset=str(data), output_dir=str(tmp_path / "run"),
                    per_device_batch_size=4, max_steps=4, logging_steps=1, max_length=64, learning_rate=1e-3,
                    padding_free=False, prefix_sharing=False, cache_dir=str(tmp_path / "cache"))
    cfg.validate()
    run = train_dpo(cfg)
    counts = [row["num_tokens"] for row in read_jsonl(Path(run.run_dir) / "metrics.jsonl") if "num_tokens" in row]
    pairs, _ = tokenize_preferences(load_records(str(data)), load_tokenizer(str(tiny_model_dir)),
                                    TokenizeSettings(max_length=64))
    # one epoch: every pair once, as TRL counts a pair (the prompt with each of its two responses)
    expected = sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    assert counts[-1] == expected and counts == sorted(set(counts)) and len(counts) == 4


@pytest.mark.parametrize("layout", ["padded", "packed", "prefix_shared"])
@pytest.mark.parametrize("fused_head", [True, False])
def test_logits_accuracy_and_entropy_equal_trl_definitions_on_full_logits(tiny_model_dir, layout, fused_head):
    """logits/chosen, logits/rejected (mean logit of completion tokens), mean_token_accuracy (argmax = next token,
    chosen completions) and entropy (all completion tokens), taken chunk by chunk from the head, equal the same
    numbers computed as TRL does from the full [batch, seq, vocab] logits of padded rows."""
    import torch

    from preftune.data import collate_pairs
    from preftune.data.preference import TokenizedPair
    from preftune.modality import TEXT, CompletionLogprobs
    from preftune.models import load_causal_lm, prepare_policy
    from preftune.recipes.dpo import DPOTask
    from preftune.runtime.reference import Reference

    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_causal_lm(str(tiny_model_dir))
    pairs = []
    for row, pair in enumerate(make_toy_preferences(6, seed=4)):   # chosen: the model's own greedy tokens
        prompt = tokenizer(pair["prompt"])["input_ids"]
        greedy = model.generate(torch.tensor([prompt]), max_new_tokens=3 + row % 3, do_sample=False,
                                eos_token_id=None, pad_token_id=tokenizer.pad_token_id)[0, len(prompt):].tolist()
        rejected = tokenizer(pair["rejected"], add_special_tokens=False)["input_ids"]
        pairs.append(TokenizedPair(prompt, greedy + [tokenizer.eos_token_id], rejected + [tokenizer.eos_token_id],
                                   float("nan"), 0.0, row))
    cfg = DPOConfig(model_name_or_path=str(tiny_model_dir), dataset="unused", loss_type="simpo", fused_head=fused_head,
                    padding_free=layout != "padded", prefix_sharing=layout == "prefix_shared", logprob_chunk_size=7)
    cfg.validate()
    policy = prepare_policy(model, cfg)
    task = DPOTask(cfg, tokenizer.pad_token_id, Reference(), policy=policy)
    batch = task.collate(pairs)
    with torch.no_grad():
        _, metrics = task.loss(CompletionLogprobs(policy, TEXT, cfg.logprob_chunk_size), batch)

        padded = collate_pairs(pairs, tokenizer.pad_token_id)
        logits = policy(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits[:, :-1]
    mask = padded["completion_mask"][:, 1:].bool()
    labels = padded["input_ids"][:, 1:]
    chosen, rejected = mask.clone(), mask.clone()
    chosen[len(pairs):], rejected[:len(pairs)] = False, False
    logp = torch.log_softmax(logits.float(), -1)
    expected = {"logits/chosen": logits[chosen].mean(-1).mean(), "logits/rejected": logits[rejected].mean(-1).mean(),
                "mean_token_accuracy": (logits.argmax(-1) == labels)[chosen].float().mean(),
                "entropy": (-(logp.exp() * logp).sum(-1))[mask].mean()}
    for key, value in expected.items():
        assert float(metrics[key]) == pytest.approx(float(value), abs=1e-5), key
    assert 0.5 < float(metrics["mean_token_accuracy"]) < 1.0   # the greedy tokens hit, their EOS need not


def test_token_stats_taken_in_row_blocks_equal_the_whole_chunk_at_once(monkeypatch):
    from preftune.speed import head

    torch.manual_seed(0)
    for rows in (1, head.STATS_ROWS - 1, head.STATS_ROWS, head.STATS_ROWS + 1, 3 * head.STATS_ROWS + 5):
        logits = torch.randn(rows, 500) * 3
        logp, targets = torch.log_softmax(logits, -1), torch.randint(0, 500, (rows,))
        blocked = head.token_stats(logits, logp, targets)
        monkeypatch.setattr(head, "STATS_ROWS", 10**9)
        whole = head.token_stats(logits, logp, targets)
        monkeypatch.undo()
        assert blocked.shape == (rows, len(head.STAT_COLUMNS)) and torch.equal(blocked, whole)
