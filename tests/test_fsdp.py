"""FSDP2 through accelerate on CPU processes (gloo): two sharded processes train as one.

Every test runs the same few steps once in this process (one process, no sharding) and once as two
FSDP2 processes (half the batch each), and compares the logged losses and the final weights. The
tolerance: losses within 1e-5 and weights within 1e-5 absolute (1e-4 relative); the measured
differences are ~1e-7, float rounding of the sharded reductions. A killed FSDP run resumed from its
sharded checkpoint reproduces the uninterrupted one exactly.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import write_jsonl
from preftune.config import DPOConfig, GRPOConfig, SFTConfig
from preftune.recipes.dpo import train_dpo
from preftune.recipes.grpo import train_grpo
from preftune.recipes.sft import train_sft
from preftune.runtime.distributed import eval_chunks
from test_ppo import online_setup
from toydata import make_toy_preferences

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
ROOT = Path(__file__).resolve().parents[1]
ATOL, RTOL, LOSS_TOL = 1e-5, 1e-4, 1e-5


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp-data")
    pairs = make_toy_preferences(64, seed=1)
    return {"pairs": write_jsonl(root / "pairs.jsonl", pairs), "root": root,
            "eval": write_jsonl(root / "eval.jsonl", make_toy_preferences(13, seed=2)),
            "sft": write_jsonl(root / "sft.jsonl", [{"prompt": p["prompt"], "completion": p["chosen"]} for p in pairs])}


def launch_env(extra: dict | None = None) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("KILL_AT_STEP", None)
    return {**env, **(extra or {})}


def torchrun(command: str, config: Path, *options: str, env_extra=None, launcher=("--standalone",)):
    """``torchrun --nproc_per_node 2 -m preftune.cli <command> --config <config> <options>``."""
    args = [sys.executable, "-m", "torch.distributed.run", *launcher, "--nproc_per_node", "2", "-m", "preftune.cli",
            command, "--config", str(config), *options]
    return subprocess.run(args, capture_output=True, text=True, env=launch_env(env_extra), cwd=ROOT)


def write_config(values: dict, path: Path, **changes) -> Path:
    path.write_text(yaml.safe_dump({k: str(v) if isinstance(v, Path) else v for k, v in {**values, **changes}.items()}))
    return path


def step_records(run_dir) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if '"loss"' in line]


def weights(run_dir, name="model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(Path(run_dir) / "model" / name)


def assert_same_run(one: Path, two: Path, keys=("loss",), name="model.safetensors", engine="fsdp") -> None:
    """Equal step losses and final weights (within the tolerance), and the second run really used ``engine``
    over two processes."""
    a, b = step_records(one), step_records(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] and len(a) >= 3
    for ra, rb in zip(a, b):
        for key in keys:
            assert rb[key] == pytest.approx(ra[key], abs=LOSS_TOL), (key, ra["step"])
    w1, w2 = weights(one, name), weights(two, name)
    assert w1.keys() == w2.keys()
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], atol=ATOL, rtol=RTOL, msg=key)
    summary = json.loads((two / "summary.json").read_text())
    assert summary["distributed"] == {"engine": engine, "processes": 2}


def dpo_values(tiny_model_dir, data, out: Path, **changes) -> dict:
    return {"model_name_or_path": tiny_model_dir, "dataset": data["pairs"], "output_dir": out, "max_steps": 4,
            "learning_rate": 1e-3, "logging_steps": 1, "warmup_ratio": 0.0, "max_length": 64, "seed": 0,
            "per_device_batch_size": 8, "cache_dir": data["root"] / "ref-cache", **changes}


def test_sharded_evaluation_gives_every_process_as_many_batches():
    """Each forward of a sharded model is a collective: a process with one batch more would wait forever."""
    examples = list(range(37))
    for world, size in [(2, 8), (3, 4), (2, 1), (4, 16)]:
        chunks = eval_chunks(examples, size, world, sharded=True)
        assert len(chunks) % world == 0 and sorted(x for c in chunks for x in c) == examples
        assert all(0 < len(c) <= 2 * size for c in chunks)
    assert eval_chunks(examples, 8, 2, sharded=False) == [examples[i:i + 8] for i in range(0, 37, 8)]
    assert eval_chunks([], 8, 2, sharded=True) == []


def test_the_fsdp_option_takes_transformers_words_and_refuses_others(tiny_model_dir, data, tmp_path):
    from preftune.errors import ConfigError
    from preftune.runtime.distributed import fsdp_plugin

    plugin = fsdp_plugin("full_shard auto_wrap")
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert fsdp_plugin("shard_grad_op").reshard_after_forward is False
    for bad in ("full", "full_shard shard_grad_op", "offload"):
        with pytest.raises(ConfigError, match="fsdp: '.*' is not a sharding setting"):
            DPOConfig(**{k: str(v) for k, v in dpo_values(tiny_model_dir, data, tmp_path).items()
                         if k in ("model_name_or_path", "dataset")}, fsdp=bad).validate()


def test_dpo_with_a_live_reference_model_under_fsdp_trains_as_one_process(tiny_model_dir, data, tmp_path):
    """With a held-out set of 13 pairs evaluated every 2 steps (7 and 6 pairs on the two processes)."""
    values = dpo_values(tiny_model_dir, data, tmp_path / "one", eval_dataset=data["eval"], eval_split="train",
                        eval_steps=2)
    train_dpo(DPOConfig(**{k: str(v) if isinstance(v, Path) else v for k, v in values.items()}))
    config = write_config(values, tmp_path / "dpo.yaml", output_dir=tmp_path / "two", per_device_batch_size=4)
    run = torchrun("dpo", config, "--fsdp", "full_shard auto_wrap")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "distributed: fsdp over 2 processes" in run.stderr
    assert_same_run(tmp_path / "one", tmp_path / "two", keys=("loss", "rewards/margins", "grad_norm"))
    assert step_records(tmp_path / "two")[-1]["loss"] < step_records(tmp_path / "two")[0]["loss"]
    evals = [[r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval/loss" in r]
             for run in (tmp_path / "one", tmp_path / "two")]
    assert [r["step"] for r in evals[1]] == [2, 4]
    for a, b in zip(*evals):
        assert b["eval/loss"] == pytest.approx(a["eval/loss"], abs=LOSS_TOL)


def test_dpo_with_precomputed_reference_under_fsdp_resumes_exactly_after_a_kill(tiny_model_dir, data, tmp_path):
    """6 steps, sharded checkpoints every 2: two FSDP processes killed during step 4 (before its checkpoint)
    and resumed from step 2 redo step 3 exactly as logged before the kill, and end as one process does."""
    values = dpo_values(tiny_model_dir, data, tmp_path / "one", precompute_ref=True, max_steps=6, save_steps=2)
    train_dpo(DPOConfig(**{k: str(v) if isinstance(v, Path) else v for k, v in values.items()}))
    config = write_config(values, tmp_path / "two.yaml", output_dir=tmp_path / "two", per_device_batch_size=4,
                          fsdp="full_shard")
    killed = torchrun("dpo", config, env_extra={"KILL_AT_STEP": "4"})
    assert killed.returncode != 0 and not (tmp_path / "two" / "model").exists()
    before_kill = step_records(tmp_path / "two")
    assert [r["step"] for r in before_kill] == [1, 2, 3]  # killed during step 4, before its metrics
    checkpoint = tmp_path / "two" / "checkpoints" / "step-2"
    assert (checkpoint / "state.json").is_file() and (checkpoint / "sharded").is_dir()
    assert not (checkpoint / "trainable.safetensors").exists()  # sharded state, not one process's copy
    resumed = torchrun("dpo", config, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = step_records(tmp_path / "two")
    for key in ("loss", "grad_norm", "rewards/margins"):
        assert [r[key] for r in after[:3]] == [r[key] for r in before_kill], key
    assert_same_run(tmp_path / "one", tmp_path / "two", keys=("loss", "grad_norm"))
    cache = json.loads((tmp_path / "two" / "reference_cache.json").read_text())
    assert cache["train"]["reused"]  # the one-process run computed the reference log-probs; FSDP reused them


def test_sft_with_lora_under_the_shipped_fsdp2_accelerate_config(tiny_model_dir, data, tmp_path):
    """``accelerate launch --config_file configs/fsdp2.yaml`` (made CPU-sized: 2 processes, fp32): the adapter
    trained under FSDP2 equals the one-process adapter."""
    values = {"model_name_or_path": tiny_model_dir, "dataset": data["sft"], "output_dir": tmp_path / "one",
              "max_steps": 4, "learning_rate": 5e-3, "logging_steps": 1, "warmup_ratio": 0.0, "max_length": 64,
              "seed": 0, "per_device_batch_size": 8, "lora": True, "lora_r": 4, "lora_dropout": 0.0}
    train_sft(SFTConfig(**{k: str(v) if isinstance(v, Path) else v for k, v in values.items()}))
    accelerate_config = yaml.safe_load((ROOT / "configs" / "fsdp2.yaml").read_text())
    assert accelerate_config["fsdp_config"]["fsdp_version"] == 2
    accelerate_config.update(num_processes=2, mixed_precision="no", use_cpu=True)
    (tmp_path / "fsdp2.yaml").write_text(yaml.safe_dump(accelerate_config))
    config = write_config(values, tmp_path / "sft.yaml", output_dir=tmp_path / "two", per_device_batch_size=4)
    args = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "fsdp2.yaml"),
            "--main_process_port", str(free_port()), "-m", "preftune.cli", "sft", "--config", str(config)]
    run = subprocess.run(args, capture_output=True, text=True, env=launch_env(), cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert_same_run(tmp_path / "one", tmp_path / "two", name="adapter_model.safetensors")


def test_grpo_under_fsdp_samples_scores_and_trains_as_one_process(tmp_path_factory, tiny_tokenizer, tmp_path):
    """Generation runs on the gathered policy (the processes stop sampling at different lengths), the frozen
    reference beside it; 2 iterations over each batch of 4 prompts x 4 completions."""
    setup = online_setup(tmp_path_factory, tiny_tokenizer, "grpo-fsdp")
    values = {"model_name_or_path": setup["model"], "dataset": setup["prompts"], "output_dir": tmp_path / "one",
              "reward_funcs": [setup["reward"]], "num_generations": 4, "max_completion_length": 8, "beta": 0.1,
              "num_iterations": 2, "scale_rewards": "batch", "max_steps": 3, "learning_rate": 1e-3,
              "logging_steps": 1, "warmup_ratio": 0.0, "seed": 0, "per_device_batch_size": 16}
    train_grpo(GRPOConfig(**{k: str(v) if isinstance(v, Path) else v for k, v in values.items()}))
    config = write_config(values, tmp_path / "grpo.yaml", output_dir=tmp_path / "two", per_device_batch_size=8)
    run = torchrun("grpo", config, "--fsdp", "full_shard")
    assert run.returncode == 0, run.stderr[-3000:]
    assert_same_run(tmp_path / "one", tmp_path / "two", keys=("loss", "reward", "completions/mean_length"))


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
