"""KTO training: learning on the toy preference, exact resume, LoRA with a cached reference, data parallelism."""

import json
import math
import random

import pytest
import torch
from safetensors.torch import load_file

import test_train_dpo
from preftune import KTOConfig
from preftune.recipes.kto import train_kto, weight_advice
from test_train_dpo import cli, killed_and_resumed, one_and_two_processes, step_records, write_jsonl
from toydata import make_toy_preferences


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("kto-data")
    pairs = make_toy_preferences(128, seed=1)
    rng = random.Random(0)
    unpaired = [{"prompt": p["prompt"], "completion": p[kind], "label": kind == "chosen"}
                for p in pairs for kind in ("chosen", "rejected") if kind == "rejected" or rng.random() < 0.5]
    return {
        "train": write_jsonl(root / "train.jsonl", pairs),
        "eval": write_jsonl(root / "eval.jsonl", make_toy_preferences(64, seed=2)),
        "unpaired": write_jsonl(root / "unpaired.jsonl", unpaired),
    }


def config(model_dir, data, out, **overrides) -> KTOConfig:
    return test_train_dpo.config(model_dir, data, out, cls=KTOConfig, **overrides)


def test_kto_learns_toy_preference_on_held_out_pairs(tiny_model_dir, toy_data, tmp_path, one_thread):
    cfg = config(tiny_model_dir, toy_data["train"], tmp_path / "run", eval_dataset=str(toy_data["eval"]),
                 eval_split="train", max_steps=-1, num_epochs=2, learning_rate=5e-4, beta=0.1, precompute_ref=True,
                 eval_on_start=True)
    result = train_kto(cfg)
    first = step_records(tmp_path / "run")[0]
    assert first["loss"] == pytest.approx(0.5, abs=1e-6)  # policy == reference: λ·(1 - σ(0)) for every example
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)
    before = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert before["step"] == 0 and before["eval/loss"] == pytest.approx(0.5, abs=1e-6)
    # untrained: every reward is 0 (up to the float noise of computing the reference in other batches)
    for key in ("eval/rewards/chosen", "eval/rewards/rejected", "eval/rewards/margins"):
        assert before[key] == pytest.approx(0.0, abs=1e-5), key
    held_out = result.train.eval_metrics
    assert held_out["eval/rewards/accuracies"] > 0.9  # 64 held-out pairs, each scored chosen vs rejected
    assert held_out["eval/rewards/chosen"] > 0 > held_out["eval/rewards/rejected"]
    assert held_out["eval/rewards/margins"] > 0.3
    assert held_out["eval/loss"] < 0.47
    assert held_out["eval/kl"] >= 0


def test_killed_run_resumes_to_the_same_final_weights(tiny_model_dir, toy_data, tmp_path):
    start, a, b = killed_and_resumed("kto", tiny_model_dir, toy_data["train"], tmp_path)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    full_records, resumed_records = step_records(tmp_path / "full"), step_records(tmp_path / "resumed")
    assert [r["step"] for r in resumed_records] == list(range(1, 9))
    for key in ("loss", "kl", "rewards/margins"):
        assert [r[key] for r in resumed_records] == pytest.approx([r[key] for r in full_records], abs=1e-6)
    assert any(not torch.allclose(start[n], a[n]) for n in a)  # the weights moved: equality is not trivial


def test_lora_with_precomputed_reference_reuses_its_cache(tiny_model_dir, toy_data, tmp_path, monkeypatch, one_thread):
    lora = dict(lora=True, lora_r=4, lora_alpha=8, learning_rate=5e-3, max_steps=8)
    live = train_kto(config(tiny_model_dir, toy_data["train"], tmp_path / "live", **lora))
    first = train_kto(config(tiny_model_dir, toy_data["train"], tmp_path / "pre1", precompute_ref=True, **lora))
    cache = json.loads((tmp_path / "pre1" / "reference_cache.json").read_text())["train"]
    assert cache["reused"] is False and cache["sequences"] == 512  # 128 pairs -> 256 examples, each scored twice
    stored = load_file(cache["path"])["logps"]  # each example's own completion, then its mismatched completion
    assert stored.shape == (512,) and not torch.allclose(stored[:256], stored[256:])

    from preftune.runtime import reference as reference_module

    def must_not_run(*args, **kwargs):
        raise AssertionError("the reference model ran although its log-probs were cached")

    monkeypatch.setattr(reference_module.LiveReference, "sequence_logps", must_not_run)
    second = train_kto(config(tiny_model_dir, toy_data["train"], tmp_path / "pre2", precompute_ref=True, **lora))
    assert json.loads((tmp_path / "pre2" / "reference_cache.json").read_text())["train"]["reused"] is True
    monkeypatch.undo()  # without the KL term only the own completions are scored: another cache entry
    no_kl = train_kto(config(tiny_model_dir, toy_data["train"], tmp_path / "nokl", precompute_ref=True, kto_kl=False,
                             **lora))

    runs = {name: step_records(run.run_dir) for name, run in
            {"live": live, "pre1": first, "pre2": second, "nokl": no_kl}.items()}
    for key in ("loss", "kl", "rewards/margins"):
        assert [r[key] for r in runs["pre2"]] == [r[key] for r in runs["pre1"]]
        assert [r[key] for r in runs["pre1"]] == pytest.approx([r[key] for r in runs["live"]], abs=1e-5)
    losses = [r["loss"] for r in runs["live"]]
    assert losses[0] == pytest.approx(0.5, abs=1e-6) and losses[-1] < losses[0] - 0.01
    assert any(r["kl"] > 0 for r in runs["live"])  # the reference point was in play ...
    assert all(r["kl"] == 0 for r in runs["nokl"])  # ... and is 0 without the KL term
    assert [r["loss"] for r in runs["nokl"]] != pytest.approx(losses, abs=1e-7)
    saved = live.model_dir
    assert (saved / "adapter_config.json").is_file() and not (saved / "model.safetensors").exists()


def test_unpaired_rows_train_from_the_command_line_and_imbalance_is_flagged(tiny_model_dir, toy_data, tmp_path):
    run = cli("kto", "--model_name_or_path", str(tiny_model_dir), "--dataset", str(toy_data["unpaired"]),
              "--output_dir", str(tmp_path / "run"), "--max_steps", "3", "--per_device_batch_size", "8",
              "--learning_rate", "1e-3", "--max_length", "64", "--logging_steps", "1", "--eval_fraction", "0.1")
    assert run.returncode == 0, run.stderr
    stderr = " ".join(run.stderr.split())
    assert "outside the range [1, 4/3] the KTO paper advises" in stderr and "--desirable_weight" in stderr
    records = step_records(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2, 3] and records[0]["loss"] == pytest.approx(0.5, abs=1e-6)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "eval/rewards/chosen" in summary["eval"] and "eval/rewards/accuracies" not in summary["eval"]  # no pairs


def test_weight_advice_follows_the_paper():
    cfg = KTOConfig(model_name_or_path="m", dataset="d")
    assert weight_advice(cfg, 100, 100) is None  # 1·100 / (1·100) = 1
    advice = weight_advice(cfg, 10, 90)  # 10 / 90 = 0.111: desirable examples need a weight of 9 to 12
    assert "0.111" in advice and "between 9 and 12" in advice
    cfg.desirable_weight = 10.0
    assert weight_advice(cfg, 10, 90) is None  # 100 / 90 = 1.11
    cfg.desirable_weight = 1.0
    assert "between 0.111 and 0.148" in weight_advice(cfg, 90, 10)  # 9: too many desirable examples
    assert "no undesirable examples" in weight_advice(cfg, 5, 0)


@pytest.mark.slow
def test_two_process_data_parallel_matches_one_process(tiny_model_dir, toy_data, tmp_path):
    one, two = one_and_two_processes("kto", tiny_model_dir, toy_data["train"], tmp_path)
    for a, b in zip(one, two):
        for key in ("loss", "kl", "rewards/chosen", "rewards/rejected", "logps/chosen"):
            assert b[key] == pytest.approx(a[key], abs=1e-5), key
    assert any(r["kl"] > 0 for r in one[1:])  # z₀ matters: it is estimated over both processes' examples


def test_config_refuses_pairwise_options_and_bad_weights():
    from preftune.config import load_config
    from preftune.errors import ConfigError

    base = {"model_name_or_path": "m", "dataset": "d"}
    cfg = load_config(KTOConfig, overrides={**base, "desirable_weight": 1.33, "kto_kl": False})
    assert (cfg.desirable_weight, cfg.undesirable_weight, cfg.kto_kl, cfg.loss_type) == (1.33, 1.0, False, "kto")
    for bad, message in [({"nll_weight": 0.5}, "KTO does not use it"), ({"undesirable_weight": 0.0}, "positive"),
                         ({"loss_type": "sigmoid"}, "loss_type must be one of kto")]:
        with pytest.raises(ConfigError, match=message):
            load_config(KTOConfig, overrides={**base, **bad})


def test_a_micro_batch_without_desirable_examples_leaves_the_logged_means_finite(tiny_model_dir, tmp_path, one_thread):
    from preftune.runtime.loop import epoch_order

    pairs = make_toy_preferences(32, seed=5)
    good = [i % 4 == 0 for i in range(32)]  # 8 desirable examples among 32: many micro-batches have none
    rows = [{"prompt": p["prompt"], "completion": p["chosen" if g else "rejected"], "label": g}
            for p, g in zip(pairs, good)]
    data = write_jsonl(tmp_path / "few-good.jsonl", rows)
    run = train_kto(config(tiny_model_dir, data, tmp_path / "run", per_device_batch_size=2,
                           gradient_accumulation_steps=2, max_steps=8, desirable_weight=3.0))
    order = epoch_order(32, 0, 0)  # the loop's order: step s takes order[4s:4s+4], micro-batches of 2
    records = step_records(run.run_dir)
    mixed_steps = 0
    for step, record in enumerate(records):
        micro = [[good[i] for i in order[4 * step + 2 * k:4 * step + 2 * k + 2]] for k in range(2)]
        has_good = [any(m) for m in micro]
        mixed_steps += has_good.count(True) == 1
        # a mean over desirable examples exists iff the step has one, whichever micro-batch holds it
        # (metrics.jsonl holds null, not a bare NaN, for a mean with no example)
        assert (record["rewards/chosen"] is not None) == any(has_good), (step, micro)
        assert (record["logps/chosen"] is not None) == any(has_good), (step, micro)
        assert math.isfinite(record["rewards/rejected"]) and math.isfinite(record["loss"])
    assert mixed_steps >= 2  # steps where one micro-batch has no desirable example and the other has
    assert records[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at the first step
