"""The DPO family beyond the original five, and the loss table: each loss against a formula written here from
its paper with plain ``math`` in float64, gradcheck in float64, and what the table derives."""

import math
import re
from pathlib import Path

import pytest
import torch

from preftune.config import DPOConfig
from preftune.config.losses import (
    PAIR_LOSSES,
    REFERENCE_FREE,
    beta_range,
    loss_help,
    markdown_table,
    needs_reference,
    parse_loss_types,
)
from preftune.errors import ConfigError
from preftune.losses import LOSSES, PreferenceLogps, f_scores, preference_loss

# policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_len, rejected_len, prob
ROWS = [
    (-12.0, -15.0, -13.0, -14.0, 4, 6, 0.9),
    (-20.5, -9.0, -18.0, -10.5, 8, 3, 0.8),
    (-5.0, -7.25, -6.5, -6.0, 2, 5, 0.3),
    (-30.0, -31.0, -29.0, -33.0, 10, 12, 0.55),
    (-1.5, -2.0, -1.0, -2.75, 3, 1, 0.95),
]
BETA = 0.2
README = Path(__file__).resolve().parents[1] / "README.md"


def make_lp(rows=ROWS, probs=False, reference=True):
    cols = [torch.tensor(c, dtype=torch.float64) for c in zip(*rows)]
    return PreferenceLogps(cols[0], cols[1], cols[2] if reference else None, cols[3] if reference else None,
                           cols[4], cols[5], preference_prob=cols[6] if probs else None)


def ls(x):  # log σ(x)
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x):
    return math.exp(ls(x))


def ratios(row):
    return row[0] - row[2], row[1] - row[3]


def score(u, kind="reverse_kl", a=0.5):
    """f'(π/π_ref) at log-ratio u, f normalised to f'(1) = 0 (f-DPO, Wang et al. 2023, Table 1)."""
    t = math.exp(u)
    return {"reverse_kl": math.log(t), "forward_kl": 1 - 1 / t, "js_divergence": math.log(2 * t / (1 + t)),
            "alpha_divergence": (t ** (a - 1) - 1) / (a - 1)}[kind]


# ---- the papers' formulas, per pair ----

def hand_sigmoid_norm(row, beta, p=1.0):
    uc, ur = ratios(row)
    z = beta * (uc / row[4] - ur / row[5])
    return -(p * ls(z) + (1 - p) * ls(-z))


def hand_ipo_norm(row, beta, p=1.0):
    uc, ur = ratios(row)
    return (uc / row[4] - ur / row[5] - (2 * p - 1) / (2 * beta)) ** 2


def hand_exo(row, beta, eps):
    uc, ur = ratios(row)
    z = beta * (uc - ur)
    q_w, q_l = sig(z), sig(-z)   # the model's distribution over (chosen wins, rejected wins)
    return q_w * math.log(q_w / (1 - eps)) + q_l * math.log(q_l / eps)


def hand_nca(row, beta):
    uc, ur = ratios(row)   # NCA, K = 2: the winner's reward against the noise, both rewards pushed below it
    return -math.log(sig(beta * uc)) - 0.5 * math.log(sig(-beta * uc)) - 0.5 * math.log(sig(-beta * ur))


def hand_bco(row, beta):
    uc, ur = ratios(row)
    return -ls(beta * uc) - ls(-beta * ur)


def hand_sppo(row, beta):
    uc, ur = ratios(row)
    return (uc - 1 / (2 * beta)) ** 2 + (ur + 1 / (2 * beta)) ** 2


def hand_apo_zero(row, beta):
    uc, ur = ratios(row)
    return 1 - sig(beta * uc) + sig(beta * ur)


def hand_apo_down(row, beta):
    uc, ur = ratios(row)
    return sig(beta * uc) + 1 - sig(beta * (uc - ur))


def hand_discopop(row, beta, tau):
    uc, ur = ratios(row)
    z = beta * (uc - ur)
    w = sig(z / tau)
    return (1 - w) * -ls(z) + w * math.exp(-z)


def token_nll(rows):   # cross-entropy over all chosen tokens of the batch
    return -sum(r[0] for r in rows) / sum(r[4] for r in rows)


def nll_terms(rows):   # per pair, whose mean is token_nll: -log π(y_c) over the batch's mean chosen length
    mean_length = sum(r[4] for r in rows) / len(rows)
    return [-r[0] / mean_length for r in rows]


def hand_orpo(rows, beta):
    def log_odds(avg):
        p = math.exp(avg)
        return math.log(p / (1 - p))

    return [nll - beta * ls(log_odds(r[0] / r[4]) - log_odds(r[1] / r[5])) for r, nll in zip(rows, nll_terms(rows))]


def hand_cpo(rows, beta, alpha, p=1.0):
    return [-(p * ls(beta * (r[0] - r[1])) + (1 - p) * ls(-beta * (r[0] - r[1]))) + alpha * nll
            for r, nll in zip(rows, nll_terms(rows))]


def hand_aot(rows, beta, eps, paired):
    if paired:
        a = sorted(r[0] - r[1] for r in rows)
        b = sorted(r[2] - r[3] for r in rows)
    else:
        a = sorted(ratios(r)[0] for r in rows)
        b = sorted(ratios(r)[1] for r in rows)
    return [-(1 - eps) * ls(beta * (x - y)) - eps * ls(-beta * (x - y)) for x, y in zip(a, b)]


def close(actual, expected):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)


# ---- the losses against them ----

@pytest.mark.parametrize("name, hand, kwargs", [
    ("sigmoid_norm", lambda r: hand_sigmoid_norm(r, BETA), {}),
    ("sigmoid_norm", lambda r: hand_sigmoid_norm(r, BETA, 0.9), {"label_smoothing": 0.1}),
    ("ipo_norm", lambda r: hand_ipo_norm(r, BETA), {}),
    ("ipo_norm", lambda r: hand_ipo_norm(r, BETA, 0.8), {"label_smoothing": 0.2}),
    ("exo_pair", lambda r: hand_exo(r, BETA, 0.1), {"label_smoothing": 0.1}),
    ("exo_pair", lambda r: hand_exo(r, BETA, 1e-3), {}),   # hard labels: the paper's ε = 1e-3
    ("nca_pair", lambda r: hand_nca(r, BETA), {}),
    ("bco_pair", lambda r: hand_bco(r, BETA), {}),
    ("sppo_hard", lambda r: hand_sppo(r, BETA), {}),
    ("apo_zero", lambda r: hand_apo_zero(r, BETA), {}),
    ("apo_down", lambda r: hand_apo_down(r, BETA), {}),
    ("discopop", lambda r: hand_discopop(r, BETA, 0.05), {}),
    ("discopop", lambda r: hand_discopop(r, BETA, 0.7), {"discopop_tau": 0.7}),
])
def test_pairwise_losses_match_their_papers(name, hand, kwargs):
    out = LOSSES[name](make_lp(), BETA, **kwargs)
    close(out.losses, [hand(r) for r in ROWS])
    close(out.chosen_rewards, [BETA * ratios(r)[0] for r in ROWS])   # rewards are β·log-ratio, unnormalised


@pytest.mark.parametrize("paired", [True, False])
@pytest.mark.parametrize("eps", [0.0, 0.15])
def test_aot_sorts_over_the_batch(paired, eps):
    out = LOSSES["aot" if paired else "aot_unpaired"](make_lp(), BETA, label_smoothing=eps)
    close(out.losses, hand_aot(ROWS, BETA, eps, paired))


def test_orpo_cpo_and_sft_need_no_reference():
    lp = make_lp(reference=False)
    close(LOSSES["orpo"](lp, BETA).losses, hand_orpo(ROWS, BETA))
    close(LOSSES["cpo"](lp, BETA).losses, hand_cpo(ROWS, BETA, 1.0))
    close(LOSSES["cpo"](lp, BETA, label_smoothing=0.1, cpo_alpha=0.3).losses, hand_cpo(ROWS, BETA, 0.3, 0.9))
    sft = LOSSES["sft"](lp, BETA).losses
    close(sft, nll_terms(ROWS))
    assert sft.mean().item() == pytest.approx(token_nll(ROWS), rel=1e-12)
    close(LOSSES["orpo"](lp, BETA).chosen_rewards, [BETA * r[0] / r[4] for r in ROWS])
    assert {"orpo", "cpo", "sft", "simpo"} == REFERENCE_FREE
    assert not needs_reference("orpo") and not needs_reference("cpo,sft") and needs_reference("cpo,sigmoid")


def test_ipo_conventions_differ_by_the_token_counts():
    """ipo regresses the summed log-ratio difference, ipo_norm the per-token one (TRL's offline DPO)."""
    lp = make_lp()
    row = ROWS[0]
    uc, ur = ratios(row)
    assert LOSSES["ipo"](lp, BETA).losses[0].item() == pytest.approx((uc - ur - 1 / (2 * BETA)) ** 2, rel=1e-12)
    assert LOSSES["ipo_norm"](lp, BETA).losses[0].item() == pytest.approx(
        (uc / row[4] - ur / row[5] - 1 / (2 * BETA)) ** 2, rel=1e-12)
    equal_lengths = make_lp([r[:4] + (1, 1) + r[6:] for r in ROWS])
    torch.testing.assert_close(LOSSES["ipo"](equal_lengths, BETA).losses,
                               LOSSES["ipo_norm"](equal_lengths, BETA).losses, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["forward_kl", "js_divergence", "alpha_divergence"])
def test_f_divergences_replace_the_log_ratio_by_its_score(kind):
    a = 0.3
    u = torch.tensor([ratios(r)[0] for r in ROWS], dtype=torch.float64)
    close(f_scores(u, kind, a), [score(x, kind, a) for x in u.tolist()])
    out = LOSSES["sigmoid"](make_lp(), BETA, f_divergence_type=kind, f_alpha_divergence_coef=a)
    expected = [-ls(BETA * (score(ratios(r)[0], kind, a) - score(ratios(r)[1], kind, a))) for r in ROWS]
    close(out.losses, expected)
    close(out.chosen_rewards, [BETA * ratios(r)[0] for r in ROWS])
    torch.testing.assert_close(f_scores(u, "alpha_divergence", 1.0), u, rtol=0, atol=0)   # a = 1: reverse KL


def test_mixing_adds_weighted_means_and_logs_each():
    lp = make_lp()
    total, m = preference_loss(["sigmoid", "bco_pair", "sft"], lp, BETA, loss_weights=[0.8, 0.2, 1.0])
    dpo = sum(-ls(BETA * (ratios(r)[0] - ratios(r)[1])) for r in ROWS) / len(ROWS)
    bco = sum(hand_bco(r, BETA) for r in ROWS) / len(ROWS)
    assert total.item() == pytest.approx(0.8 * dpo + 0.2 * bco + token_nll(ROWS), rel=1e-12)
    assert m["loss/bco_pair"].item() == pytest.approx(bco, rel=1e-12)
    assert m["loss/sft"].item() == pytest.approx(token_nll(ROWS), rel=1e-12)
    same, _ = preference_loss("sigmoid,bco_pair,sft", lp, BETA, loss_weights=[0.8, 0.2, 1.0])
    assert same.item() == total.item()
    with pytest.raises(ConfigError, match="2 loss_weights for 3 losses"):
        preference_loss("sigmoid,bco_pair,sft", lp, BETA, loss_weights=[1.0, 1.0])


@pytest.mark.parametrize("name", sorted(PAIR_LOSSES))
def test_every_loss_passes_gradcheck(name):
    base = make_lp(probs=True)
    reference = PAIR_LOSSES[name].needs_reference

    def f(pc, pr, rc, rr):
        lp = PreferenceLogps(pc, pr, rc if reference else None, rr if reference else None,
                             base.chosen_lengths, base.rejected_lengths, base.preference_prob)
        kwargs = {"label_smoothing": 0.2} if "label_smoothing" in PAIR_LOSSES[name].hyper else {}
        return LOSSES[name](lp, BETA, **kwargs).losses

    # ORPO's odds need mean log-probs below 0 and a hinge's z away from its kinks: ROWS are both
    inputs = tuple(x.clone().requires_grad_(True) for x in (base.policy_chosen, base.policy_rejected,
                                                            base.ref_chosen, base.ref_rejected))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7)


# ---- what the table derives ----

def test_config_offers_exactly_the_table():
    assert set(parse_loss_types(",".join(PAIR_LOSSES))) == set(LOSSES) == set(PAIR_LOSSES)
    for name in PAIR_LOSSES:
        assert name in loss_help()
        assert LOSSES[name].loss_spec is PAIR_LOSSES[name]
    with pytest.raises(ConfigError, match="did you mean 'sigmoid_norm'"):
        parse_loss_types("sigmoid_nrom")
    assert beta_range("simpo") == (0.5, 10.0) and beta_range("sigmoid") == (0.01, 1.0)


def test_options_a_loss_does_not_take_are_refused():
    base = {"model_name_or_path": "m", "dataset": "d.jsonl"}
    DPOConfig(**base, loss_type="discopop", discopop_tau=0.2).validate()
    with pytest.raises(ConfigError, match="discopop_tau is set but loss_type sigmoid does not use it"):
        DPOConfig(**base, discopop_tau=0.2).validate()
    with pytest.raises(ConfigError, match="label_smoothing is set but loss_type bco_pair"):
        DPOConfig(**base, loss_type="bco_pair", label_smoothing=0.1).validate()
    with pytest.raises(ConfigError, match="1 loss_weights for 2 losses"):
        DPOConfig(**base, loss_type="sigmoid,sft", loss_weights=[1.0]).validate()
    DPOConfig(**base, loss_type="sigmoid,sft", loss_weights=[1.0, 0.5], label_smoothing=0.1).validate()


def test_readme_loss_table_is_the_generated_one():
    """The README table is ``python -m preftune.config.losses``'s output, between its markers."""
    text = README.read_text()
    found = re.search(r"<!-- loss table: generated.*?-->\n(.*?)\n<!-- end of loss table -->", text, re.S)
    assert found, "README.md lacks the generated loss table"
    assert found.group(1).strip() == markdown_table().strip(), (
        "README's loss table is stale: paste the output of `python -m preftune.config.losses`")
