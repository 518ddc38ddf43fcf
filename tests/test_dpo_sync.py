"""TR-DPO in ``preftune dpo`` (``sync_ref_model``): the frozen reference becomes α·policy + (1 - α)·reference every
``ref_model_sync_steps`` steps (the one sync function GRPO uses), checkpointed with the run; and the settings it
cannot work with are refused."""

import pytest
import torch
from safetensors.torch import load_file

from preftune import DPOConfig, KTOConfig
from preftune.errors import ConfigError
from preftune.recipes.dpo import train_dpo
from test_train_dpo import config, toy_data  # noqa: F401  (the module's fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_reference_follows_the_policy_every_sync_steps(tiny_model_dir, toy_data, tmp_path):  # noqa: F811
    cfg = config(tiny_model_dir, toy_data["train"], tmp_path / "run", max_steps=4, save_steps=2,
                 sync_ref_model=True, ref_model_sync_steps=2, ref_model_mixup_alpha=0.5)
    run = train_dpo(cfg)
    start = load_file(tiny_model_dir / "model.safetensors")
    middle = load_file(run.run_dir / "checkpoints" / "step-2" / "model.safetensors")
    final = load_file(run.run_dir / "model" / "model.safetensors")
    reference = load_file(run.run_dir / "checkpoints" / "step-4" / "step.safetensors")
    moved = 0
    for name, weight in reference.items():
        # two syncs: after step 2, r = (p0 + p2) / 2; after step 4, r = (r + p4) / 2
        expected = 0.25 * start[name] + 0.25 * middle[name] + 0.5 * final[name]
        torch.testing.assert_close(weight, expected, rtol=1e-5, atol=1e-6, msg=name)
        moved += not torch.equal(weight, start[name])
    assert moved > len(reference) // 2    # the reference did move


def test_settings_that_cannot_sync_are_refused(tiny_model_dir, toy_data, tmp_path):  # noqa: F811
    for overrides, message in ((dict(precompute_ref=True), "cannot be precomputed"),
                               (dict(loss_type="simpo", beta=2.0), "uses no reference model"),
                               (dict(lora=True), "adapter-disabled reference"),
                               (dict(ref_model_mixup_alpha=0.0), "ref_model_mixup_alpha in")):
        with pytest.raises(ConfigError, match=message):
            config(tiny_model_dir, toy_data["train"], tmp_path, sync_ref_model=True, **overrides)
    with pytest.raises(ConfigError, match="offered by preftune dpo"):
        KTOConfig(model_name_or_path="m", dataset="d", sync_ref_model=True).validate()
    assert DPOConfig(model_name_or_path="m", dataset="d", sync_ref_model=True).ref_model_sync_steps == 512
