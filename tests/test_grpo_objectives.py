"""GRPO's newer objectives (GSPO, LUSPO, CISPO, SAPO, VESPO, two-sided clipping, the off-policy mask, entropy
masking and bonus, REINFORCE++) against formulas written here per token in plain float64 Python, gradcheck,
and each one raising the toy reward end to end."""

import math

import pytest
import torch

from preftune.losses.grpo import grpo_loss, high_entropy_mask, reinforce_pp_advantages
from preftune.recipes.ppo import read_metrics
from test_grpo import assert_learns, config, setup  # noqa: F401  (the module's fixture)

LOGPS = [[-1.2, -0.4, -2.0, -0.9], [-0.3, -1.7, -0.8, 0.0], [-2.2, -0.6, -1.1, -0.5]]
OLD = [[-1.0, -0.9, -1.5, -0.2], [-0.7, -1.1, -0.8, 0.0], [-1.9, -1.2, -0.4, -0.7]]
MASK = [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]]
ADV = [0.8, -1.3, 0.5]
ENTROPY = [[0.3, 1.2, 0.1, 2.0], [0.9, 0.05, 1.5, 0.0], [0.7, 0.2, 0.0, 0.0]]


def tensors():
    t = lambda rows: torch.tensor(rows, dtype=torch.float64)  # noqa: E731
    return t(LOGPS), t(OLD), torch.tensor(MASK, dtype=torch.bool), t(ADV), t(ENTROPY)


def tokens(i):
    return [t for t in range(4) if MASK[i][t]]


def ratio(i, t, level):
    if level == "sequence":   # GSPO: exp of the mean log-ratio of the sequence
        return math.exp(sum(LOGPS[i][s] - OLD[i][s] for s in tokens(i)) / len(tokens(i)))
    return math.exp(LOGPS[i][t] - OLD[i][t])


def token_loss(i, t, objective, level="token", eps=(0.2, 0.28), delta=None, taus=(1.0, 1.05), cap=5.0,
               shape=(2.0, 3.0, 3.0, 2.0)):
    r, a = ratio(i, t, level), ADV[i]
    if objective == "clip":
        first = r if delta is None else min(r, delta)
        return -min(first * a, min(max(r, 1 - eps[0]), 1 + eps[1]) * a)
    if objective == "cispo":
        return -min(r, cap) * a * LOGPS[i][t]
    if objective == "sapo":
        tau = taus[0] if a > 0 else taus[1]
        return -4 / tau / (1 + math.exp(-tau * (r - 1))) * a
    # vespo: φ(w) = exp(λ + k log w - λ w), w the sequence's ratio (product over its tokens)
    log_w = sum(LOGPS[i][s] - OLD[i][s] for s in tokens(i))
    k, lam = shape[:2] if a >= 0 else shape[2:]
    return -math.exp(lam + k * log_w - lam * math.exp(log_w)) * a * LOGPS[i][t]


def token_mean(fn):
    values = [fn(i, t) for i in range(3) for t in tokens(i)]
    return sum(values) / len(values)


def sequence_mean(fn):
    return sum(sum(fn(i, t) for t in tokens(i)) / len(tokens(i)) for i in range(3)) / 3


def sequence_sum(fn):
    return sum(sum(fn(i, t) for t in tokens(i)) for i in range(3)) / 3


@pytest.mark.parametrize("objective, options, aggregation, expected", [
    ("clip", {"importance_sampling_level": "sequence"}, "sequence_mean",
     lambda: sequence_mean(lambda i, t: token_loss(i, t, "clip", "sequence"))),            # GSPO
    ("clip", {"importance_sampling_level": "sequence"}, "sequence_sum",
     lambda: sequence_sum(lambda i, t: token_loss(i, t, "clip", "sequence"))),             # LUSPO
    ("clip", {"delta": 1.4}, "token_mean", lambda: token_mean(lambda i, t: token_loss(i, t, "clip", delta=1.4))),
    ("cispo", {}, "token_mean", lambda: token_mean(lambda i, t: token_loss(i, t, "cispo"))),
    ("sapo", {}, "sequence_mean", lambda: sequence_mean(lambda i, t: token_loss(i, t, "sapo"))),
    ("vespo", {}, "token_mean", lambda: token_mean(lambda i, t: token_loss(i, t, "vespo"))),
])
def test_objectives_match_their_formulas(objective, options, aggregation, expected):
    logps, old, mask, adv, _ = tensors()
    eps_high = 5.0 if objective == "cispo" else 0.28
    out = grpo_loss(logps, adv, mask, old_logps=old, epsilon_high=eps_high, aggregation=aggregation,
                    objective=objective, **options)
    assert out.loss.item() == pytest.approx(expected(), rel=1e-12, abs=1e-14)


def test_off_policy_mask_drops_negative_sequences_that_drifted():
    logps, old, mask, adv, _ = tensors()
    # sequence 1 (A < 0) drifted by mean(old - new) = (-0.4 + 0.6 + 0) / 3 = 0.067; sequence 0 has A > 0
    kept = grpo_loss(logps, adv, mask, old_logps=old, epsilon_high=0.28, off_policy_threshold=0.05)
    loose = grpo_loss(logps, adv, mask, old_logps=old, epsilon_high=0.28, off_policy_threshold=0.1)
    values = [token_loss(i, t, "clip") for i in range(3) for t in tokens(i)]
    dropped = [token_loss(i, t, "clip") for i in (0, 2) for t in tokens(i)]
    assert loose.loss.item() == pytest.approx(sum(values) / len(values), rel=1e-12)
    assert kept.loss.item() == pytest.approx(sum(dropped) / len(values), rel=1e-12)   # still over all tokens


def test_entropy_mask_keeps_the_top_quantile_and_the_bonus_subtracts_their_mean():
    logps, old, mask, adv, entropy = tensors()
    keep = high_entropy_mask(entropy, mask, 0.34)
    values = sorted(ENTROPY[i][t] for i in range(3) for t in tokens(i))   # 9 tokens: the top 34% are 3 of them
    assert sorted(entropy[keep].tolist()) == values[-3:]
    out = grpo_loss(logps, adv, mask, old_logps=old, epsilon_high=0.28, entropy=entropy, top_entropy_quantile=0.34,
                    entropy_coef=0.1)
    chosen = [(i, t) for i in range(3) for t in tokens(i) if ENTROPY[i][t] >= values[-3]]
    policy = sum(token_loss(i, t, "clip") for i, t in chosen) / 9
    assert out.loss.item() == pytest.approx(policy - 0.1 * sum(values[-3:]) / 3, rel=1e-12)


def test_reinforce_pp_returns_are_kl_penalised_and_whitened_over_the_batch():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.25], dtype=torch.float64)
    kl = torch.tensor([[0.1, 0.2, 0.05], [0.0, 0.3, 0.1], [0.2, 0.0, 0.0], [0.1, 0.1, 0.1]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    adv = reinforce_pp_advantages(rewards, kl, mask, beta=0.5, group_size=2)
    centred = [0.5, -0.5, 0.125, -0.125]
    returns = {(i, t): centred[i] - 0.5 * sum(kl[i, s].item() for s in range(t, 3) if mask[i, s])
               for i in range(4) for t in range(3) if mask[i, t]}
    mean = sum(returns.values()) / len(returns)
    std = math.sqrt(sum((v - mean) ** 2 for v in returns.values()) / len(returns))
    for (i, t), value in returns.items():
        assert adv[i, t].item() == pytest.approx((value - mean) / (std + 1e-8), rel=1e-10)
    assert adv[~mask].abs().sum() == 0


@pytest.mark.parametrize("objective, options", [("clip", {"importance_sampling_level": "sequence"}),
                                                ("clip", {"delta": 1.4}), ("cispo", {}), ("sapo", {}),
                                                ("vespo", {})])
def test_objectives_pass_gradcheck(objective, options):
    logps, old, mask, adv, entropy = tensors()

    def f(lp, ent):
        # CISPO's and VESPO's weights carry no gradient: hold the ratio where it is, so that the finite
        # differences see the gradient the objective means (the weight times A·∇log π)
        held = lp.detach() - (logps - old) if objective in ("cispo", "vespo") else old
        return grpo_loss(lp, adv, mask, old_logps=held, epsilon_high=5.0 if objective == "cispo" else 0.28,
                         objective=objective, entropy=ent, entropy_coef=0.05, **options).loss

    assert torch.autograd.gradcheck(f, (logps.clone().requires_grad_(True), entropy.clone().requires_grad_(True)))


@pytest.mark.parametrize("options", [
    {"loss_type": "grpo", "importance_sampling_level": "sequence"},   # GSPO
    {"loss_type": "luspo", "importance_sampling_level": "sequence"},
    {"loss_type": "cispo", "epsilon_high": 5.0},
    {"loss_type": "sapo"},
    {"loss_type": "vespo"},
    {"delta": 1.5, "epsilon_high": 0.28, "off_policy_mask_threshold": 0.5, "num_iterations": 2},
    {"top_entropy_quantile": 0.5, "entropy_coef": 0.01, "max_steps": 25},   # half the tokens: more steps
], ids=["gspo", "luspo", "cispo", "sapo", "vespo", "delta+off_policy", "entropy"])
def test_each_objective_raises_the_toy_reward(setup, tmp_path, options):  # noqa: F811
    run = __import__("preftune.recipes.grpo", fromlist=["train_grpo"]).train_grpo(config(setup, tmp_path / "run",
                                                                                       **options))
    assert_learns(read_metrics(run.run_dir))
