"""Preference losses against hand formulas written here with plain ``math`` in float64."""

import math

import pytest
import torch

from preftune.errors import ConfigError
from preftune.losses import (
    LOSSES,
    REFERENCE_FREE,
    PreferenceLogps,
    hinge_loss,
    ipo_loss,
    load_constraint,
    preference_loss,
    robust_loss,
    sigmoid_loss,
    simpo_loss,
)

# policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_len, rejected_len, prob, margin
ROWS = [
    (-12.0, -15.0, -13.0, -14.0, 4, 6, 1.0, 0.0),
    (-20.5, -9.0, -18.0, -10.5, 8, 3, 0.8, 0.5),
    (-5.0, -7.25, -6.5, -6.0, 2, 5, 0.3, -1.0),
    (-30.0, -31.0, -29.0, -33.0, 10, 12, 0.55, 2.0),
]
BETA = 0.1
ORIGINAL = ["sigmoid", "ipo", "hinge", "robust", "simpo"]   # the variants' tests are in test_loss_variants.py


def make_lp(rows=ROWS, probs=False, margins=False, reference=True, dtype=torch.float64):
    cols = list(zip(*rows))

    def t(i):
        return torch.tensor(cols[i], dtype=dtype)

    return PreferenceLogps(
        policy_chosen=t(0), policy_rejected=t(1),
        ref_chosen=t(2) if reference else None, ref_rejected=t(3) if reference else None,
        chosen_lengths=t(4), rejected_lengths=t(5),
        preference_prob=t(6) if probs else None, margin=t(7) if margins else None,
    )


# ---- hand formulas (plain math, float64) ----

def log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def delta(row):
    pc, pr, rc, rr = row[:4]
    return (pc - rc) - (pr - rr)


def label(row, probs, smoothing):
    return row[6] if probs else 1.0 - smoothing


def hand_sigmoid(row, beta, probs, margins, smoothing=0.0):
    z = beta * delta(row) - (row[7] if margins else 0.0)
    p = label(row, probs, smoothing)
    return -(p * log_sigmoid(z) + (1 - p) * log_sigmoid(-z))


def hand_ipo(row, beta, probs, smoothing=0.0):
    p = label(row, probs, smoothing)
    return (delta(row) - (2 * p - 1) / (2 * beta)) ** 2


def hand_hinge(row, beta, probs, margins, smoothing=0.0):
    z = beta * delta(row) - (row[7] if margins else 0.0)
    p = label(row, probs, smoothing)
    return p * max(0.0, 1 - z) + (1 - p) * max(0.0, 1 + z)


def hand_robust(row, beta, eps, margins):
    z = beta * delta(row) - (row[7] if margins else 0.0)
    return ((1 - eps) * -log_sigmoid(z) - eps * -log_sigmoid(-z)) / (1 - 2 * eps)


def hand_simpo(row, beta, gamma, probs, margins, smoothing=0.0):
    pc, pr, _, _, lc, lr = row[:6]
    z = beta * (pc / lc - pr / lr) - gamma - (row[7] if margins else 0.0)
    p = label(row, probs, smoothing)
    return -(p * log_sigmoid(z) + (1 - p) * log_sigmoid(-z))


def check(out, expected):
    assert out.losses.dtype == torch.float64
    torch.testing.assert_close(out.losses, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("probs,margins,smoothing", [(False, False, 0.0), (True, True, 0.0), (False, True, 0.2)])
def test_sigmoid(probs, margins, smoothing):
    out = sigmoid_loss(make_lp(probs=probs, margins=margins), BETA, label_smoothing=smoothing)
    check(out, [hand_sigmoid(r, BETA, probs, margins, smoothing) for r in ROWS])


@pytest.mark.parametrize("probs,smoothing", [(False, 0.0), (True, 0.0), (False, 0.1)])
def test_ipo_ignores_margin(probs, smoothing):
    out = ipo_loss(make_lp(probs=probs, margins=True), BETA, label_smoothing=smoothing)
    check(out, [hand_ipo(r, BETA, probs, smoothing) for r in ROWS])
    # p = 1 gives the paper's target 1/(2β)
    plain = ipo_loss(make_lp(), 0.5)
    check(plain, [(delta(r) - 1.0) ** 2 for r in ROWS])


@pytest.mark.parametrize("probs,margins,smoothing", [(False, False, 0.0), (True, True, 0.0), (False, False, 0.25)])
def test_hinge(probs, margins, smoothing):
    out = hinge_loss(make_lp(probs=probs, margins=margins), BETA, label_smoothing=smoothing)
    check(out, [hand_hinge(r, BETA, probs, margins, smoothing) for r in ROWS])


@pytest.mark.parametrize("eps,margins", [(0.0, False), (0.2, True), (0.45, False)])
def test_robust_ignores_preference_prob(eps, margins):
    out = robust_loss(make_lp(probs=True, margins=margins), BETA, label_smoothing=eps)
    check(out, [hand_robust(r, BETA, eps, margins) for r in ROWS])
    if eps == 0.0:  # plain DPO
        check(out, [hand_sigmoid(r, BETA, False, margins) for r in ROWS])


@pytest.mark.parametrize("probs,margins,gamma", [(False, False, 0.5), (True, True, 1.2), (False, True, 0.0)])
def test_simpo(probs, margins, gamma):
    beta = 2.0
    out = simpo_loss(make_lp(probs=probs, margins=margins), beta, simpo_gamma=gamma)
    check(out, [hand_simpo(r, beta, gamma, probs, margins) for r in ROWS])
    expected_chosen = [beta * r[0] / r[4] for r in ROWS]
    torch.testing.assert_close(out.chosen_rewards, torch.tensor(expected_chosen, dtype=torch.float64))


def test_simpo_ignores_reference():
    with_ref = simpo_loss(make_lp(probs=True, margins=True), 2.0)
    without = simpo_loss(make_lp(probs=True, margins=True, reference=False), 2.0)
    torch.testing.assert_close(with_ref.losses, without.losses, rtol=0, atol=0)
    assert REFERENCE_FREE == {"simpo", "orpo", "cpo", "sft"}
    total, metrics = preference_loss("simpo", make_lp(reference=False), 2.0, simpo_gamma=0.7)
    expected = sum(hand_simpo(r, 2.0, 0.7, False, False) for r in ROWS) / len(ROWS)
    assert total.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("name", ORIGINAL)
def test_gradients_pass_gradcheck(name):
    lp = make_lp(probs=True, margins=True)
    kwargs = {"label_smoothing": 0.2} if name == "robust" else {}

    def f(pc, pr, rc, rr):
        lp2 = PreferenceLogps(pc, pr, rc, rr, lp.chosen_lengths, lp.rejected_lengths,
                              lp.preference_prob, lp.margin)
        return LOSSES[name](lp2, BETA, **kwargs).losses

    inputs = tuple(x.clone().requires_grad_(True)
                   for x in (lp.policy_chosen, lp.policy_rejected, lp.ref_chosen, lp.ref_rejected))
    if name == "hinge":  # every row must be away from the kinks at z = ±1
        z = BETA * (inputs[0] - inputs[2] - inputs[1] + inputs[3]).detach() - lp.margin
        assert torch.all((z.abs() - 1).abs() > 0.05)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6)


def test_dpo_at_reference_is_log2():
    pol = torch.tensor([-3.0, -17.5, -0.25])
    lp = PreferenceLogps(pol, pol - 1, pol.clone(), pol - 1, torch.ones(3), torch.ones(3))
    out = sigmoid_loss(lp, 0.3)
    assert torch.equal(out.losses, torch.full((3,), math.log(2.0)))
    total, _ = preference_loss("sigmoid", lp, 0.3)
    assert total.item() == pytest.approx(math.log(2.0), abs=1e-7)


def test_rewards_and_accuracies():
    # chosen log-ratios 1, -2; rejected log-ratios -1, 1; beta 0.5
    lp = PreferenceLogps(
        policy_chosen=torch.tensor([-4.0, -10.0], requires_grad=True),
        policy_rejected=torch.tensor([-6.0, -7.0], requires_grad=True),
        ref_chosen=torch.tensor([-5.0, -8.0]), ref_rejected=torch.tensor([-5.0, -8.0]),
        chosen_lengths=torch.tensor([2.0, 5.0]), rejected_lengths=torch.tensor([3.0, 7.0]),
    )
    out = sigmoid_loss(lp, 0.5)
    assert out.chosen_rewards.tolist() == [0.5, -1.0]
    assert out.rejected_rewards.tolist() == [-0.5, 0.5]
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    total, m = preference_loss("sigmoid", lp, 0.5)
    assert total.requires_grad
    assert m["rewards/chosen"].item() == pytest.approx(-0.25)
    assert m["rewards/rejected"].item() == pytest.approx(0.0)
    assert m["rewards/accuracies"].item() == pytest.approx(0.5)
    assert m["rewards/margins"].item() == pytest.approx((1.0 + -1.5) / 2)
    assert m["logps/chosen"].item() == pytest.approx(-7.0)
    assert m["logps/rejected"].item() == pytest.approx(-6.5)
    expected = (-log_sigmoid(0.5 * (1 - -1)) - log_sigmoid(0.5 * (-2 - 1))) / 2
    assert m["loss"].item() == pytest.approx(expected, rel=1e-6)
    assert m["loss/preference"].item() == pytest.approx(expected, rel=1e-6)
    assert "loss/nll" not in m
    assert all(not v.requires_grad and v.dim() == 0 for v in m.values())


def safety_penalty(lp):
    """A per-pair penalty: relu(mean chosen NLL - 2)."""
    return torch.relu(-lp.policy_chosen / lp.chosen_lengths - 2.0)


def test_nll_and_constraint_terms_add_their_weighted_means():
    lp = make_lp(probs=True, margins=True)
    base, _ = preference_loss("sigmoid", lp, BETA)
    scalar_constraint = lambda lp: lp.policy_rejected.sum() * 0 + 0.75  # noqa: E731
    total, m = preference_loss("sigmoid", lp, BETA, nll_weight=0.3,
                               constraints=[(safety_penalty, 2.0), (scalar_constraint, -1.0)])
    nll = sum(-r[0] / r[4] for r in ROWS) / len(ROWS)
    penalty = sum(max(0.0, -r[0] / r[4] - 2.0) for r in ROWS) / len(ROWS)
    assert penalty > 0
    expected_pref = sum(hand_sigmoid(r, BETA, True, True) for r in ROWS) / len(ROWS)
    assert base.item() == pytest.approx(expected_pref, rel=1e-12)
    assert total.item() == pytest.approx(expected_pref + 0.3 * nll + 2.0 * penalty - 0.75, rel=1e-12)
    assert m["loss"].item() == pytest.approx(total.item(), rel=1e-15)
    assert m["loss/nll"].item() == pytest.approx(nll, rel=1e-12)
    assert m["loss/constraint/safety_penalty"].item() == pytest.approx(penalty, rel=1e-12)
    assert m["loss/constraint/<lambda>"].item() == pytest.approx(0.75)


def test_options_pass_through_preference_loss():
    lp = make_lp()
    for name, fn in ((n, LOSSES[n]) for n in ORIGINAL):
        smoothing = 0.1
        total, _ = preference_loss(name, lp, BETA, label_smoothing=smoothing)
        direct = fn(lp, BETA, label_smoothing=smoothing).losses.mean()
        assert total.item() == pytest.approx(direct.item(), rel=1e-15)


def test_errors():
    with pytest.raises(ConfigError, match="sigmoid.*simpo|ipo"):
        preference_loss("dpo-typo", make_lp(), BETA)
    no_ref = make_lp(reference=False)
    for name in ("sigmoid", "ipo", "hinge", "robust"):
        with pytest.raises(ValueError, match="reference"):
            LOSSES[name](no_ref, BETA)
        with pytest.raises(ValueError, match="reference"):
            preference_loss(name, no_ref, BETA)
    with pytest.raises(ValueError, match="0.5"):
        robust_loss(make_lp(), BETA, label_smoothing=0.5)
    with pytest.raises(ValueError, match="beta"):
        sigmoid_loss(make_lp(), 0.0)


def test_load_constraint(tmp_path):
    assert load_constraint("math:sqrt") is math.sqrt
    import os.path

    assert load_constraint("os:path.join") is os.path.join
    for bad, message in [("math", "package.module:function"), ("math:nope", "no attribute"),
                         ("math:pi", "not a function"), ("no_such_module_xyz:f", "cannot import"),
                         (str(tmp_path / "missing.py") + ":f", "does not exist")]:
        with pytest.raises(ConfigError, match=message):
            load_constraint(bad)
    source = tmp_path / "my_rules.py"
    source.write_text("import torch\n\ndef short_answers(lp):\n    return lp.chosen_lengths / 100\n")
    fn = load_constraint(f"{source}:short_answers")
    total, m = preference_loss("sigmoid", make_lp(), BETA, constraints=[(fn, 1.0)])
    assert m["loss/constraint/short_answers"].item() == pytest.approx(sum(r[4] for r in ROWS) / 400)
