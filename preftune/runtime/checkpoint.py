"""Checkpoints on disk: trainable weights, optimiser, scheduler, RNG states and the loop's state.

A checkpoint is the directory ``<run_dir>/checkpoints/step-<N>``, written to ``step-<N>.partial``
and renamed, so a crash never leaves a half-written one. It is also a model anyone can load: the
policy inside the loop's module (itself, or its ``policy`` / ``model`` attribute: see
:func:`saved_model`) is written with ``save_pretrained`` (``adapter_config.json`` +
``adapter_model.safetensors`` for a peft adapter, ``config.json`` + ``model.safetensors`` for a whole
model), so ``AutoModelForCausalLM`` / ``PeftModel.from_pretrained`` open ``step-<N>/`` directly.
``trainable.safetensors`` holds the trainable weights those files do not (a value head, a separate
critic; every adapter weight, which is small); resume reads each weight from where it was written, in
full precision, so it is exact. ``optimizer.pt``, ``scheduler.pt`` and ``rng-<process>.pt`` sit beside
them. ``state.json`` holds the step, the settings that must match on resume (global batch, seed) and
``extra``: the JSON state of an online step (PPO's KL coefficient, say) that the loop hands back on
resume, and ``step.safetensors``: the tensors of a step function that has ``tensors()`` /
``load_tensors()`` (GRPO's synced reference weights).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..errors import ConfigError, PreftuneError
from .distributed import is_sharded, load_sharded_state, save_sharded_state

PREFIX = "step-"


def find_checkpoint(checkpoint_dir: Path, resume: str) -> Path:
    """``resume`` is ``latest`` (the newest complete checkpoint in ``checkpoint_dir``) or a checkpoint's path."""
    if resume == "latest":
        found = newest_checkpoint(checkpoint_dir)
        if found is None:
            raise ConfigError(f"--resume: nothing to resume, no checkpoint found in {checkpoint_dir}")
        return found
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise ConfigError(f"--resume: {path} is not a checkpoint (no state.json)")
    return path


def newest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The complete checkpoint of the highest step in ``checkpoint_dir``, if there is one."""
    found = [p for p in sorted(checkpoint_dir.glob(f"{PREFIX}*"), key=step_of)
             if (p / "state.json").is_file() and not p.name.endswith(".partial")]
    return found[-1] if found else None


def trainable_parameters(model) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(acc, final: Path, model, optimizer, scheduler, state: dict, keep: int, step=None) -> Path:
    """Write ``final`` atomically (every process calls this); keep the newest ``keep`` checkpoints (0: all).
    ``step``: the loop's step function, whose ``tensors()`` (if it has them, the same on every process) are saved."""
    staging = final.with_name(final.name + ".partial")
    acc.wait_for_everyone()
    if acc.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        if not is_sharded(acc):
            save_weights_and_optimizer(staging, model, optimizer)
        torch.save(scheduler.state_dict(), staging / "scheduler.pt")
        tensors = getattr(step, "tensors", dict)()
        if tensors:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, staging / "step.safetensors")
    acc.wait_for_everyone()
    if is_sharded(acc):  # every process writes its shards
        save_sharded_state(acc, staging, model, optimizer)
    torch.save(rng_state(), staging / f"rng-{acc.process_index}.pt")
    acc.wait_for_everyone()
    if acc.is_main_process:
        (staging / "state.json").write_text(json.dumps(state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
        prune(final.parent, keep)
    acc.wait_for_everyone()
    return final


def load_checkpoint(acc, path: Path, model, optimizer, scheduler, expected: dict, step=None) -> dict:
    """Restore what :func:`save_checkpoint` wrote; ``expected`` settings (global batch, seed) must match."""
    state = json.loads((path / "state.json").read_text())
    if any(state[key] != value for key, value in expected.items()):
        written = ", ".join(f"{k} {state[k]}" for k in expected)
        wanted = ", ".join(f"{k} {v}" for k, v in expected.items())
        raise ConfigError(f"{path}: checkpoint was written with {written}; this run has {wanted}")
    if is_sharded(acc):
        load_sharded_state(acc, path, model, optimizer)
    else:
        load_weights_and_optimizer(acc, path, model, optimizer)
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    if (path / "step.safetensors").is_file() and hasattr(step, "load_tensors"):
        step.load_tensors(load_file(path / "step.safetensors"))
    rng_file = path / f"rng-{acc.process_index}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return state


def save_weights_and_optimizer(directory: Path, model, optimizer) -> None:
    """One process's copy of the trainable weights and the optimiser state (unsharded runs): the model in
    transformers / peft layout (loadable as it is) plus the trainable weights it does not hold."""
    in_model_files = save_policy(model, directory)
    weights = {name: p.detach().cpu().contiguous() for name, p in trainable_parameters(model).items()
               if name not in in_model_files}
    save_file(weights, directory / "trainable.safetensors")
    torch.save(optimizer.state_dict(), directory / "optimizer.pt")


def load_weights_and_optimizer(acc, path: Path, model, optimizer) -> None:
    if not (path / "trainable.safetensors").is_file():
        raise ConfigError(f"{path}: this checkpoint holds sharded state (FSDP2 or DeepSpeed); resume it with the "
                          "engine and number of processes that wrote it")
    params = trainable_parameters(model)
    weights = saved_weights(path, model, set(params))
    if set(weights) != set(params):
        raise PreftuneError(f"{path}: checkpoint weights do not match this model's trainable parameters")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor.to(params[name].device))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=acc.device, weights_only=False))


def saved_model(module):
    """The Hugging Face (or peft) model inside the loop's module: itself, or its ``policy`` or ``model``."""
    for candidate in (module, getattr(module, "policy", None), getattr(module, "model", None)):
        if callable(getattr(candidate, "save_pretrained", None)):
            return candidate
    return None


def save_policy(module, directory: Path) -> set[str]:
    """``save_pretrained`` the model inside ``module`` into ``directory``; the names (in ``module``) of the
    trainable weights its ``model.safetensors`` holds, so that they are not written twice. An adapter's
    weights are renamed by peft: they are kept in ``trainable.safetensors`` as well (they are small)."""
    policy = saved_model(module)
    if policy is None:
        return set()
    policy.save_pretrained(directory)
    if hasattr(policy, "peft_config"):
        return set()
    in_files = set(tensor_files(directory))
    names = {id(p): name for name, p in policy.named_parameters()}
    return {name for name, p in trainable_parameters(module).items() if names.get(id(p)) in in_files}


def saved_weights(path: Path, module, wanted: set[str]) -> dict[str, torch.Tensor]:
    """The trainable weights of a checkpoint, by their names in ``module``: from ``trainable.safetensors``,
    and the rest from the model files ``save_pretrained`` wrote."""
    weights = load_file(path / "trainable.safetensors")
    policy = saved_model(module)
    missing = wanted - set(weights)
    if not missing or policy is None:
        return weights
    files = tensor_files(path)
    own = {id(p): name for name, p in policy.named_parameters()}
    keys = {name: own.get(id(p)) for name, p in module.named_parameters() if name in missing}
    for file in {files[key] for key in keys.values() if key in files}:
        with safe_open(file, framework="pt") as handle:
            weights.update({name: handle.get_tensor(key) for name, key in keys.items() if files.get(key) == file})
    return weights


def tensor_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> the ``model*.safetensors`` file of ``directory`` that holds it (sharded or not)."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return {k: directory / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    single = directory / "model.safetensors"
    if not single.is_file():
        return {}
    with safe_open(single, framework="pt") as handle:
        return {key: single for key in handle.keys()}


def prune(checkpoint_dir: Path, keep: int) -> None:
    found = sorted((p for p in checkpoint_dir.glob(f"{PREFIX}*") if not p.name.endswith(".partial")), key=step_of)
    for old in found[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def step_of(path: Path) -> int:
    try:
        return int(path.name.removeprefix(PREFIX).split(".")[0])
    except ValueError:
        return -1


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def truncate_records(path: Path, step: int) -> None:
    """Drop the JSON lines of ``path`` written after ``step`` (a resumed run writes them again)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept))
