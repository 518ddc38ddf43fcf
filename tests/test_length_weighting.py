"""LD-DPO (``ld_alpha``) and WPO (``use_weighting``): the formulas against float64 values written here from the papers,
every layout and head path against the full-logits computation, and the precomputed reference's cache."""

import json
import math

import pytest
import torch

from preftune import DPOConfig
from preftune.data.collate import add_length_weights, collate_pairs, collate_pairs_packed
from preftune.data.preference import TokenizedPair
from preftune.errors import ConfigError
from preftune.logprobs import weighted_sums
from preftune.losses import PreferenceLogps, preference_loss
from preftune.losses.weighting import ld_token_weights, pair_shared_lengths, wpo_weights
from preftune.speed.head import STAT_COLUMNS, token_stats

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = [(3, 2, 5), (4, 6, 6), (2, 7, 1), (5, 3, 4)]   # (prompt, chosen, rejected) lengths


def random_pairs(vocab=40, seed=0):
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    return [TokenizedPair(ids(p), ids(c), ids(r), 1.0, 0.0, i) for i, (p, c, r) in enumerate(SHAPES)]


def ld_sum(token_logps: list[float], partner_length: int, alpha: float) -> float:
    """The paper's log π_LD(y): the first min(|y|, |y'|) tokens in full, the rest times α."""
    shared = min(len(token_logps), partner_length)
    return sum(token_logps[:shared]) + alpha * sum(token_logps[shared:])


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("packed", [False, True])
def test_ld_weights_give_the_papers_sums_in_float64(alpha, packed):
    pairs = random_pairs()
    g = torch.Generator().manual_seed(1)
    batch = collate_pairs_packed(pairs, True) if packed else collate_pairs(pairs, 0)
    batch = add_length_weights(batch, alpha)
    per_token = torch.randn(batch["input_ids"].shape, generator=g, dtype=torch.float64)
    sequences = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    half = len(pairs)
    if packed:   # sequence s's tokens, in the row
        from preftune.data.packed import PackedLayout
        spans = {s: (o, n) for s, _, _, o, n in PackedLayout.of(batch).completions()}
        tokens = [per_token[0, spans[s][0]:spans[s][0] + spans[s][1]].tolist() for s in range(2 * half)]
        values = torch.stack([(per_token[0, o:o + n] * batch["token_weights"][0, o:o + n].double()).sum()
                              for o, n in (spans[s] for s in range(2 * half))])
    else:
        mask = batch["completion_mask"].bool()
        tokens = [per_token[s][mask[s]].tolist() for s in range(2 * half)]
        values = weighted_sums(per_token * mask, batch["token_weights"])
    expected = [ld_sum(tokens[s], len(sequences[(s + half) % (2 * half)]), alpha) for s in range(2 * half)]
    assert [len(t) for t in tokens] == [len(s) for s in sequences]
    torch.testing.assert_close(values, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    assert batch["shared_lengths"].tolist() == [min(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs] * 2


def test_ld_weights_of_adjacent_pairs_and_their_gradient():
    lengths = torch.tensor([2, 5, 6, 6, 7, 1])
    assert pair_shared_lengths(lengths, adjacent=True).tolist() == [2, 2, 6, 6, 1, 1]
    assert pair_shared_lengths(lengths).tolist() == [2, 5, 1, 2, 5, 1]
    weights = ld_token_weights(torch.arange(7)[None], torch.tensor([[2], [0]]), 0.25)
    assert weights.tolist() == [[1, 1] + [0.25] * 5, [0.25] * 7]
    per_token = torch.randn(2, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: weighted_sums(x, weights), (per_token,))
    (grad,) = torch.autograd.grad(weighted_sums(per_token, weights).sum(), per_token)
    assert torch.equal(grad, weights.double())   # d log π_LD / d log π(y_j) = w_j


def full_softmax_wpo(logits: torch.Tensor, targets: torch.Tensor, sequence: list[int], pairs: int) -> list[float]:
    """WPO's Eq. 2 weight per pair, from full float64 softmaxes: exp(mean over y_c of log p_t - log Σ_v p_v² + the
    same over y_r)."""
    means = []
    for s in range(2 * pairs):
        rows = [i for i, q in enumerate(sequence) if q == s]
        terms = []
        for i in rows:
            p = torch.softmax(logits[i].double(), -1)
            terms.append(math.log(float(p[targets[i]])) - math.log(float((p * p).sum())))
        means.append(sum(terms) / max(len(terms), 1))
    return [math.exp(means[i] + means[pairs + i]) for i in range(pairs)]


def test_wpo_weights_equal_the_papers_formula_in_float64():
    g = torch.Generator().manual_seed(0)
    pairs, vocab = 3, 29
    sequence = [0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 4, 5, 5]   # pair 0: 3 and 4 tokens, pair 1: 2 and 1, pair 2: 1 and 2
    logits = 3.0 * torch.randn(len(sequence), vocab, generator=g, dtype=torch.float64)
    targets = torch.randint(0, vocab, (len(sequence),), generator=g)
    targets[[3, 4, 10]] = logits[[3, 4, 10]].argmax(-1)   # pair 1: the policy's likeliest tokens, log p > log Σ p²
    stats = token_stats(logits, torch.log_softmax(logits, -1), targets)
    assert stats.dtype == torch.float64
    weights = wpo_weights(stats[:, STAT_COLUMNS.index("wpo_aligned")], torch.tensor(sequence), pairs)
    expected = full_softmax_wpo(logits, targets, sequence, pairs)
    torch.testing.assert_close(weights, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)
    assert max(expected) > 1.0 > min(expected)   # not clamped at 1 (TRL 1.16 does not clamp)


def test_wpo_weights_multiply_each_pairs_loss_and_get_no_gradient():
    g = torch.Generator().manual_seed(2)
    b, beta = 5, 0.2
    chosen, rejected, ref_c, ref_r = (torch.randn(b, generator=g, dtype=torch.float64) for _ in range(4))
    weights = torch.rand(b, generator=g, dtype=torch.float64) * 2
    lengths = torch.full((b,), 3.0, dtype=torch.float64)

    def loss(policy_chosen):
        lp = PreferenceLogps(policy_chosen, rejected, ref_c, ref_r, lengths, lengths, pair_weights=weights)
        return preference_loss("sigmoid", lp, beta)[0]

    x = chosen.clone().requires_grad_(True)
    delta = (chosen - ref_c) - (rejected - ref_r)
    expected = sum(float(w) * -math.log(1 / (1 + math.exp(-beta * float(d)))) for w, d in zip(weights, delta)) / b
    assert float(loss(x).detach()) == pytest.approx(expected, abs=1e-13)
    assert torch.autograd.gradcheck(loss, (x,))
    lp = PreferenceLogps(chosen, rejected, ref_c, ref_r, lengths, lengths, pair_weights=weights)
    with pytest.raises(ValueError, match="aot"):
        preference_loss("aot", lp, beta)


def toy_task_pairs(tokenizer, model):
    """Pairs of clearly different lengths whose chosen responses are partly the model's greedy tokens."""
    from toydata import make_toy_preferences

    pairs = []
    for row, pair in enumerate(make_toy_preferences(5, seed=4)):
        prompt = tokenizer(pair["prompt"])["input_ids"]
        greedy = model.generate(torch.tensor([prompt]), max_new_tokens=2 + 2 * row, do_sample=False,
                                eos_token_id=None, pad_token_id=tokenizer.pad_token_id)[0, len(prompt):].tolist()
        rejected = tokenizer(pair["rejected"], add_special_tokens=False)["input_ids"][:1 + row % 3 * 3]
        pairs.append(TokenizedPair(prompt, greedy + [tokenizer.eos_token_id], rejected + [tokenizer.eos_token_id],
                                   float("nan"), 0.0, row))
    return pairs


@pytest.mark.parametrize("layout", ["padded", "packed", "prefix_shared"])
@pytest.mark.parametrize("fused_head", [True, False])
def test_every_layout_and_head_path_gives_the_full_logits_values(tiny_model_dir, layout, fused_head):
    """LD-DPO sums (policy and live reference) and WPO weights of DPOTask, chunk by chunk through the head, equal
    those computed here from the full logits of padded rows in float64; so all six paths equal one another."""
    from preftune.modality import TEXT, CompletionLogprobs
    from preftune.models import load_causal_lm, load_tokenizer, prepare_policy
    from preftune.recipes.dpo import DPOTask
    from preftune.runtime.reference import ModelReference

    tokenizer, model = load_tokenizer(str(tiny_model_dir)), load_causal_lm(str(tiny_model_dir))
    reference_model = load_causal_lm(str(tiny_model_dir))
    with torch.no_grad():
        for p in reference_model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    pairs = toy_task_pairs(tokenizer, model)
    alpha = 0.4
    cfg = DPOConfig(model_name_or_path=str(tiny_model_dir), dataset="unused", fused_head=fused_head,
                    padding_free=layout != "padded", prefix_sharing=layout == "prefix_shared", logprob_chunk_size=7,
                    ld_alpha=alpha, use_weighting=True)
    cfg.validate()
    policy = prepare_policy(model, cfg)
    task = DPOTask(cfg, tokenizer.pad_token_id, ModelReference(reference_model, 7), policy=policy)
    batch = task.collate(pairs)
    assert ("completion_lengths" in batch) == (layout != "padded")
    lp = task.logps(CompletionLogprobs(policy, TEXT, cfg.logprob_chunk_size), batch)

    padded = collate_pairs(pairs, tokenizer.pad_token_id)
    mask = padded["completion_mask"][:, 1:].bool()
    labels = padded["input_ids"][:, 1:]
    n = len(pairs)
    expected = {}
    with torch.no_grad():
        for name, net in (("policy", policy), ("ref", reference_model)):
            logits = net(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits[:, :-1]
            logp = torch.log_softmax(logits.double(), -1)
            picked = logp.gather(-1, labels[..., None])[..., 0]
            tokens = [picked[s][mask[s]].tolist() for s in range(2 * n)]
            sums = [ld_sum(tokens[s], len(tokens[(s + n) % (2 * n)]), alpha) for s in range(2 * n)]
            expected[f"{name}_chosen"], expected[f"{name}_rejected"] = sums[:n], sums[n:]
            if name == "policy":
                sequence = [s for s in range(2 * n) for _ in range(int(mask[s].sum()))]
                expected["weights"] = full_softmax_wpo(logits[mask], labels[mask], sequence, n)
    got = {"policy_chosen": lp.policy_chosen, "policy_rejected": lp.policy_rejected, "ref_chosen": lp.ref_chosen,
           "ref_rejected": lp.ref_rejected, "weights": lp.pair_weights}
    assert {len(p.chosen_ids) for p in pairs} != {len(p.rejected_ids) for p in pairs}   # the tails matter
    for key, values in expected.items():
        torch.testing.assert_close(got[key].double(), torch.tensor(values, dtype=torch.float64), rtol=1e-5,
                                   atol=1e-5, msg=key)
    assert not lp.pair_weights.requires_grad and lp.policy_chosen.requires_grad


def test_ld_alpha_one_and_unset_are_bit_identical_to_plain_sums(tiny_model_dir):
    from preftune.modality import TEXT, CompletionLogprobs, sequence_sums
    from preftune.modality.text import PairCollator
    from preftune.models import load_causal_lm, load_tokenizer

    tokenizer, model = load_tokenizer(str(tiny_model_dir)), load_causal_lm(str(tiny_model_dir))
    pairs = toy_task_pairs(tokenizer, model)
    module = CompletionLogprobs(model, TEXT, 7)
    for packed in (False, True):
        plain = PairCollator(tokenizer.pad_token_id, packed, packed)(pairs)
        for alpha in (None, 1.0):
            batch = PairCollator(tokenizer.pad_token_id, packed, packed, ld_alpha=alpha)(pairs)
            assert "token_weights" not in batch
            with torch.no_grad():
                assert torch.equal(sequence_sums(module, batch)[0], sequence_sums(module, plain)[0])


def test_precomputed_reference_holds_ld_sums_keyed_by_ld_alpha(tiny_model, tmp_path):
    from preftune.modality.text import PairCollator
    from preftune.runtime.reference import ModelReference, check_cache_file, make_reference
    from test_reference import context, settings

    pairs = random_pairs(vocab=60)
    # pair 1's chosen response (6 tokens, against 6) again, against 1 token: its LD value differs by pair
    pairs.append(TokenizedPair(pairs[1].prompt_ids, pairs[1].chosen_ids, pairs[2].rejected_ids, 1.0, 0.0, 9))
    sequences = [(p.prompt_ids, c) for p in pairs for c in (p.chosen_ids, p.rejected_ids)]
    ctx = context(tmp_path)
    cached = {}
    for alpha in (0.5, 0.2, 0.5):
        cfg = settings(tmp_path, ld_alpha=alpha, per_device_batch_size=2)
        reference = make_reference(cfg, ctx, tiny_model, precompute={"train": sequences}, pad_token_id=0)
        state = json.loads((ctx.run_dir / "reference_cache.json").read_text())["train"]
        cached.setdefault(alpha, []).append(state)
        live = ModelReference(tiny_model, 7)
        for packed in (False, True):
            batch = PairCollator(0, packed, packed, ld_alpha=alpha)(pairs)
            torch.testing.assert_close(reference.sequence_logps(batch), live.sequence_logps(batch), rtol=0, atol=1e-5)
    assert [s["reused"] for s in cached[0.5]] == [False, True] and not cached[0.2][0]["reused"]
    assert cached[0.5][0]["path"] != cached[0.2][0]["path"]   # ld_alpha is part of the key
    with pytest.raises(ConfigError, match="ld_alpha"):
        check_cache_file(type(tmp_path)(cached[0.5][0]["path"]), "fp32", 0.2)
    with pytest.raises(ConfigError, match="ld_alpha"):
        check_cache_file(type(tmp_path)(cached[0.5][0]["path"]), "fp32", None)


def test_first_loss_with_precomputed_ld_reference_is_ln2(tiny_model_dir, tmp_path):
    from preftune.recipes.dpo import train_dpo
    from toydata import make_toy_preferences

    data = tmp_path / "pairs.jsonl"
    rows = make_toy_preferences(8, seed=3)
    for i, row in enumerate(rows):
        row["rejected"] += " very" * (i % 4)   # lengths differ within pairs
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DPOConfig(model_name_or_path=str(tiny_model_dir), dataset=str(data), output_dir=str(tmp_path / "run"),
                    per_device_batch_size=4, max_length=64, logging_steps=1, max_steps=1, warmup_ratio=0.0, seed=0,
                    precompute_ref=True, ld_alpha=0.5, cache_dir=str(tmp_path / "cache"))
    cfg.validate()
    train_dpo(cfg)
    step = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line][0]
    assert step["loss"] == pytest.approx(math.log(2), abs=1e-7)


@pytest.mark.parametrize("options, message", [
    (dict(ld_alpha=1.5), "ld_alpha must be in [0, 1]"),
    (dict(ld_alpha=-0.1), "ld_alpha must be in [0, 1]"),
    (dict(use_weighting=True, loss_type="aot"), "use_weighting (WPO) cannot weight loss_type aot"),
    (dict(use_weighting=True, loss_type="sigmoid,aot_unpaired"), "cannot weight loss_type aot_unpaired"),
])
def test_bad_values_are_refused(options, message):
    cfg = DPOConfig(model_name_or_path="m", dataset="d", **options)
    with pytest.raises(ConfigError) as error:
        cfg.validate(require_model=False)
    assert message in str(error.value)


def test_flags_exit_2_where_refused_and_parse_where_offered(capsys, tmp_path):
    from preftune.cli import main
    from preftune.config import KTOConfig, OnlineDPOConfig, load_config

    assert main(["dpo", "--model_name_or_path", "m", "--dataset", "d", "--ld_alpha", "2"]) == 2
    err = capsys.readouterr().err
    assert "ld_alpha must be in [0, 1]" in err and "Traceback" not in err
    cfg = load_config(DPOConfig, overrides={"ld_alpha": "0.5", "use_weighting": True, "model_name_or_path": "m",
                                            "dataset": "d"})
    assert cfg.ld_alpha == 0.5 and cfg.use_weighting is True
    with pytest.raises(ConfigError, match="is an option of preftune dpo"):
        load_config(OnlineDPOConfig, overrides={"use_weighting": True})
    kto = KTOConfig(model_name_or_path="m", dataset="d", ld_alpha=0.5)
    with pytest.raises(ConfigError, match="KTO does not use it"):
        kto.validate(require_model=False)


@pytest.mark.slow
def test_ld_dpo_with_wpo_under_ddp_trains_as_one_process(tiny_model_dir, tmp_path):
    """Two DDP processes (half the pairs each, the precomputed LD reference shared) log the losses and reach the
    weights of one process: the LD weights and the WPO weights are per pair."""
    from pathlib import Path

    from preftune.recipes.dpo import train_dpo
    from test_fsdp import assert_same_run, dpo_values, torchrun, write_config
    from toydata import make_toy_preferences

    data = {"pairs": tmp_path / "pairs.jsonl", "root": tmp_path}
    rows = make_toy_preferences(32, seed=1)
    for i, row in enumerate(rows):
        row["rejected"] += " very" * (i % 3)
    data["pairs"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    values = dpo_values(tiny_model_dir, data, tmp_path / "one", ld_alpha=0.5, use_weighting=True, precompute_ref=True)
    train_dpo(DPOConfig(**{k: str(v) if isinstance(v, Path) else v for k, v in values.items()}))
    config = write_config(values, tmp_path / "dpo.yaml", output_dir=tmp_path / "two", per_device_batch_size=4)
    run = torchrun("dpo", config)
    assert run.returncode == 0, run.stderr[-3000:]
    assert_same_run(tmp_path / "one", tmp_path / "two", keys=("loss", "rewards/margins", "grad_norm"), engine="ddp")
