"""A launch that asked for several processes but got one is said so (accelerate launch --cpu --num_processes 2)."""

import json
import subprocess
import sys
from pathlib import Path

from helpers import subprocess_env, write_jsonl
from preftune.runtime.distributed import launcher_warning
from toydata import make_toy_preferences

SIMPLE_LAUNCH = {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1"}


def test_warning_only_where_the_launcher_asked_for_more_processes_than_run():
    assert "started only this one" in launcher_warning(1, SIMPLE_LAUNCH)
    assert launcher_warning(2, {**SIMPLE_LAUNCH, "WORLD_SIZE": "2"}) is None        # torchrun-style: they all run
    assert launcher_warning(1, {k: v for k, v in SIMPLE_LAUNCH.items() if k != "MASTER_ADDR"}) is None   # asked one
    assert launcher_warning(1, {}) is None                                            # no launcher at all


def test_accelerate_launch_cpu_with_two_processes_warns(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", make_toy_preferences(8))
    done = subprocess.run([Path(sys.executable).with_name("accelerate"), "launch", "--cpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "-m", "preftune.cli", "dpo", "--model_name_or_path", str(tiny_model_dir), "--dataset",
                           str(data), "--output_dir", str(tmp_path / "run"), "--max_steps", "1",
                           "--per_device_batch_size", "4", "--max_length", "64"],
                          capture_output=True, text=True, env=subprocess_env(OMP_NUM_THREADS="1"), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "accelerate launch was asked for several processes but started only this one" in done.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["distributed"]["processes"] == 1
