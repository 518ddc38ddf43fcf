"""RLOO as TRL 1.16 trains it (``rloo_objective: trl``): one clipped ratio per sequence, averaged over sequences,
against a formula written here in plain float64 Python; its on-policy gradient is the per-token loss's times the
mean completion length; the option is refused where it does not apply, and trains the toy reward end to end."""

import math

import pytest
import torch

from preftune.config import GRPOConfig, RLOOConfig
from preftune.errors import ConfigError
from preftune.losses.grpo import grpo_loss
from preftune.recipes.grpo import train_grpo
from preftune.recipes.ppo import read_metrics
from test_grpo import assert_learns, config, setup  # noqa: F401  (the module's fixture)

LOGPS = [[-1.2, -0.4, -2.0, -0.9], [-0.3, -1.7, -0.8, 0.0], [-2.2, -0.6, -1.1, -0.5], [-0.1, -0.2, -0.3, -0.4]]
OLD = [[-1.0, -0.9, -1.5, -0.2], [-0.7, -1.1, -0.8, 0.0], [-1.9, -1.2, -0.4, -0.7], [-0.15, -0.2, -0.3, -0.35]]
MASK = [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
ADV = [0.8, -1.3, 0.5, -0.2]


def trl_rloo_loss(eps_low, eps_high):
    """TRL 1.16 RLOO: per sequence, log π(o) - log π_old(o) summed over its tokens, ratio clipped, mean over B."""
    total = 0.0
    for logps, old, mask, advantage in zip(LOGPS, OLD, MASK, ADV):
        r = math.exp(sum((lp - o) * m for lp, o, m in zip(logps, old, mask)))
        clipped = min(max(r, 1 - eps_low), 1 + eps_high)
        total += -min(r * advantage, clipped * advantage)
    return total / len(ADV)


def options(**overrides):
    cfg = RLOOConfig(model_name_or_path="m", dataset="d", reward_funcs=["f:g"], rloo_objective="trl",
                     num_generations=4, per_device_batch_size=4, **overrides)
    cfg.validate()
    return dict(aggregation=cfg.aggregation, epsilon_low=cfg.epsilon, epsilon_high=cfg.epsilon_high,
                **cfg.policy_options())


@pytest.mark.parametrize("eps", [(0.2, None), (0.2, 0.28), (0.8, 0.9)])
def test_trl_rloo_objective_matches_the_formula(eps):
    t = lambda rows: torch.tensor(rows, dtype=torch.float64)  # noqa: E731
    logps = t(LOGPS).requires_grad_(True)
    out = grpo_loss(logps, t(ADV), torch.tensor(MASK, dtype=torch.bool), old_logps=t(OLD),
                    **options(epsilon=eps[0], epsilon_high=eps[1]))
    expected = trl_rloo_loss(eps[0], eps[0] if eps[1] is None else eps[1])
    assert float(out.loss.detach()) == pytest.approx(expected, rel=1e-12, abs=1e-14)
    # gradient: d/dlogp_it of -r_i·A_i / B where the ratio is not clipped away, else 0
    out.loss.backward()
    low, high = eps[0], eps[0] if eps[1] is None else eps[1]
    clipped = 0
    for i in range(len(ADV)):
        r = math.exp(sum((lp - o) * m for lp, o, m in zip(LOGPS[i], OLD[i], MASK[i])))
        active = not ((ADV[i] > 0 and r > 1 + high) or (ADV[i] < 0 and r < 1 - low))
        clipped += not active
        for k in range(4):
            want = -r * ADV[i] / len(ADV) if active and MASK[i][k] else 0.0
            assert float(logps.grad[i, k]) == pytest.approx(want, rel=1e-12, abs=1e-14)
    assert clipped == (0 if eps == (0.8, 0.9) else 1)    # both branches of the clip are exercised


def test_on_policy_gradient_is_the_token_mean_gradient_times_the_mean_length():
    t = lambda rows: torch.tensor(rows, dtype=torch.float64)  # noqa: E731
    mask = torch.tensor(MASK, dtype=torch.bool)
    grads = []
    for kwargs in (options(), dict(aggregation="token_mean")):
        logps = t(LOGPS).requires_grad_(True)
        grpo_loss(logps, t(ADV), mask, **kwargs).loss.backward()
        grads.append(logps.grad)
    mean_length = mask.sum() / mask.shape[0]
    torch.testing.assert_close(grads[0], grads[1] * mean_length, rtol=1e-12, atol=1e-14)


def test_trl_objective_is_refused_where_it_does_not_apply():
    with pytest.raises(ConfigError, match="rloo_objective trl .* needs advantage rloo"):
        GRPOConfig(model_name_or_path="m", dataset="d", reward_funcs=["f:g"], rloo_objective="trl",
                   num_generations=4, per_device_batch_size=4).validate()
    with pytest.raises(ConfigError, match="rloo_objective trl"):
        options(loss_type="cispo", epsilon_high=5.0)
    with pytest.raises(ConfigError, match="rloo_objective trl"):
        options(importance_sampling_level="sequence")


def test_trl_rloo_objective_raises_the_toy_reward(setup, tmp_path):  # noqa: F811
    run = train_grpo(config(setup, tmp_path / "run", cls=RLOOConfig, rloo_objective="trl", beta=0.0,
                            learning_rate=3e-3))
    assert_learns(read_metrics(run.run_dir))
