"""Every preference loss of the table trains the toy task to held-out accuracy; those that need no reference
train with no reference loaded."""

import json

import pytest

from preftune import DPOConfig
from preftune.config.losses import PAIR_LOSSES
from preftune.recipes import dpo as dpo_module
from preftune.recipes.dpo import train_dpo
from toydata import make_toy_preferences


@pytest.fixture(scope="module")
def toy_pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy-pairs")
    paths = {}
    for split, (n, seed) in {"train": (64, 1), "eval": (32, 2)}.items():
        paths[split] = root / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in make_toy_preferences(n, seed=seed)))
    return paths


# DiscoPOP with its default τ = 0.05 has a positive slope at Δ = 0 (policy = reference): d loss/dz = 5·(1 - log 2)
# - 3/4 > 0, so it first pushes the margin down, towards its local minimum below 0; from a policy equal to its
# reference the toy test uses τ = 0.2, where the slope at 0 is negative
OPTIONS = {"discopop": {"discopop_tau": 0.2}}


def usual_beta(name: str) -> float:
    span = PAIR_LOSSES[name].beta_range or (0.1, 0.1)
    return min(max(0.1, span[0]), span[1])


@pytest.mark.parametrize("name", sorted(PAIR_LOSSES))
def test_each_loss_learns_the_toy_preference(name, tiny_model_dir, toy_pairs, tmp_path, monkeypatch):
    kinds = []

    def recording(*args, **kwargs):
        reference = make_reference(*args, **kwargs)
        kinds.append(reference.kind)
        return reference

    make_reference = dpo_module.make_reference
    monkeypatch.setattr(dpo_module, "make_reference", recording)
    cfg = DPOConfig(model_name_or_path=str(tiny_model_dir), dataset=str(toy_pairs["train"]),
                    eval_dataset=str(toy_pairs["eval"]), eval_split="train", output_dir=str(tmp_path / "run"),
                    loss_type=name, beta=usual_beta(name), per_device_batch_size=8, learning_rate=1e-3,
                    max_length=64, num_epochs=1, warmup_ratio=0.0, seed=0, logging_steps=4, eval_on_start=True,
                    **OPTIONS.get(name, {}))
    cfg.validate()
    result = train_dpo(cfg)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    before = next(line for line in lines if line.get("step") == 0 and "eval/rewards/accuracies" in line)
    after = result.train.eval_metrics
    assert len(kinds) == 1 and (kinds[0] != "none") == PAIR_LOSSES[name].needs_reference
    assert before["eval/rewards/accuracies"] < 0.7
    assert after["eval/rewards/accuracies"] > 0.9, after


@pytest.mark.parametrize("options", [{"ld_alpha": 0.5}, {"use_weighting": True}], ids=["ld_alpha", "use_weighting"])
def test_ld_dpo_and_wpo_learn_the_toy_preference(options, tiny_model_dir, toy_pairs, tmp_path):
    """LD-DPO (ld_alpha, the reference precomputed with it) and WPO-weighted DPO (use_weighting) train the toy task."""
    cfg = DPOConfig(model_name_or_path=str(tiny_model_dir), dataset=str(toy_pairs["train"]),
                    eval_dataset=str(toy_pairs["eval"]), eval_split="train", output_dir=str(tmp_path / "run"),
                    beta=0.1, per_device_batch_size=8, learning_rate=1e-3, max_length=64, num_epochs=1,
                    warmup_ratio=0.0, seed=0, logging_steps=4, eval_on_start=True,
                    precompute_ref="ld_alpha" in options, cache_dir=str(tmp_path / "cache"), **options)
    cfg.validate()
    result = train_dpo(cfg)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    before = next(line for line in lines if line.get("step") == 0 and "eval/rewards/accuracies" in line)
    assert before["eval/rewards/accuracies"] < 0.7
    assert result.train.eval_metrics["eval/rewards/accuracies"] > 0.9, result.train.eval_metrics
