"""Multi-node launch on loopback: two "machines" (torchrun node ranks 0 and 1, one process each, rank 0's
address 127.0.0.1) train DPO exactly as one process does (losses within 1e-5, weights within 1e-5)."""

import subprocess
import sys
from pathlib import Path

import pytest

from preftune.config import DPOConfig
from preftune.recipes.dpo import train_dpo
from test_fsdp import ROOT, assert_same_run, data, dpo_values, free_port, launch_env, write_config  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def test_two_machines_on_loopback_train_as_one_process(tiny_model_dir, data, tmp_path):  # noqa: F811
    values = dpo_values(tiny_model_dir, data, tmp_path / "one")
    train_dpo(DPOConfig(**{k: str(v) if isinstance(v, Path) else v for k, v in values.items()}))
    config = write_config(values, tmp_path / "dpo.yaml", output_dir=tmp_path / "two", per_device_batch_size=4)
    port = str(free_port())
    machines = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank",
                                  str(rank), "--master_addr", "127.0.0.1", "--master_port", port,
                                  "--nproc_per_node", "1", "-m", "preftune.cli", "dpo", "--config", str(config)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=launch_env(), cwd=ROOT)
                for rank in (0, 1)]
    outputs = [machine.communicate(timeout=600) for machine in machines]
    for machine, (_, err) in zip(machines, outputs):
        assert machine.returncode == 0, err[-3000:]
    assert "distributed: ddp over 2 processes" in outputs[0][1]
    assert_same_run(tmp_path / "one", tmp_path / "two", keys=("loss", "rewards/margins", "grad_norm"),
                    engine="ddp")
