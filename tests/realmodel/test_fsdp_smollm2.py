"""FSDP2 on the real model: SmolLM2-135M-Instruct (its output projection tied to its input embedding),
full weights sharded over two CPU processes, DPO with precomputed reference log-probs."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from toydata import make_toy_preferences

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_fsdp_dpo_on_smollm2_starts_at_ln2_learns_and_saves_an_ordinary_checkpoint(smollm2_dir, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in make_toy_preferences(2, conversational=True)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("KILL_AT_STEP", None)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "preftune.cli", "dpo", "--model_name_or_path", str(smollm2_dir),
                          "--dataset", str(pairs),
                          "--fsdp", "full_shard", "--precompute_ref", "--cache_dir", str(tmp_path / "ref-cache"),
                          "--per_device_batch_size", "1", "--max_steps", "2", "--max_length", "64",
                          "--learning_rate", "1e-5", "--warmup_ratio", "0", "--logging_steps", "1",
                          "--output_dir", str(tmp_path / "run")], capture_output=True, text=True, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "distributed: fsdp over 2 processes" in run.stderr
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)  # the policy is its reference at the first step
    assert losses[1] < losses[0] - 1e-3                        # the same two pairs again: the loss falls
    start, trained = load_file(smollm2_dir / "model.safetensors"), load_file(tmp_path / "run" / "model" /
                                                                              "model.safetensors")
    assert trained.keys() == start.keys()  # gathered from the shards; the tied projection written once
    assert any(not torch.equal(start[k], trained[k]) for k in start)
