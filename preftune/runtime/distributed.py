"""Sharded training through ``accelerate``: FSDP2 (``fully_shard``) and DeepSpeed ZeRO, and the few
places where preftune must act differently under them.

The engine is accelerate's choice, made from its launcher's config file (``accelerate launch
--config_file configs/fsdp2.yaml``, or ``configs/zero2.yaml`` / ``configs/zero3.yaml``) or, for the simple
case, from preftune's TRL-style ``fsdp`` option (``--fsdp "full_shard auto_wrap"``). Data parallelism
(DDP) is what any other multi-process launch gives.

Under a sharded engine the loop prepares the same modules; what changes is handled here:

* **CPU**: accelerate only enables FSDP on accelerators; with ``gloo`` on CPU processes (the tests,
  and a laptop) :func:`make_accelerator` switches its state to FSDP itself, so the same code runs.
* **Checkpoints** hold sharded state: each process writes its shards with ``torch.distributed.checkpoint``
  (FSDP2) or the DeepSpeed engine's ``save_checkpoint``, and reads them back on resume.
* **The final model** is gathered into an ordinary ``save_pretrained`` checkpoint (or peft adapter):
  FSDP2's full state dict, or ZeRO-3's partitioned weights gathered (16-bit when trained in 16-bit).
* **Generation** (PPO, GRPO/RLOO) runs token by token, and processes stop at different lengths: so
  :func:`gathered` unshards the whole policy for it, and no collective runs inside the sampling loop.
* **DeepSpeed** takes the micro-batch size, accumulation and clipping from the training settings.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from ..config.shared import fsdp_words
from ..errors import ConfigError


def fsdp_plugin(spec: str):
    """accelerate's FSDP2 plugin for the ``fsdp`` option: words from TRL's / transformers' ``--fsdp``.

    ``full_shard`` shards parameters, gradients and optimiser state (parameters re-gathered for the
    backward pass); ``shard_grad_op`` keeps parameters gathered between forward and backward (ZeRO-2
    like: faster, more memory); ``offload`` keeps the shards in CPU memory; ``auto_wrap`` (implied)
    shards each transformer block separately.
    """
    from accelerate.utils import FullyShardedDataParallelPlugin

    words = fsdp_words(spec)
    return FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward="full_shard" in words,
                                          cpu_offload="offload" in words, auto_wrap_policy="transformer_based_wrap",
                                          state_dict_type="SHARDED_STATE_DICT")


def make_accelerator(precision: str, report_to: list[str], run_dir: Path, fsdp: str = ""):
    """The run's ``Accelerator``: mixed precision, trackers, and the engine (``fsdp``, else the launcher's)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    mixed = {"bf16": "bf16", "fp16": "fp16"}.get(precision, "no")
    plugin = fsdp_plugin(fsdp) if fsdp else None
    state = AcceleratorState._shared_state
    if state and str(state.get("_mixed_precision", mixed)) != mixed:
        # an earlier run of this process (the Python API, a notebook) used another precision: accelerate keeps
        # one per process, so start its accelerator state afresh (the process group, if any, is kept)
        AcceleratorState._reset_state(reset_partial_state=False)
    # cpu=True on a machine without CUDA lets torchrun-style launchers (`accelerate launch --multi_gpu`,
    # `torchrun`) start gloo data parallelism across CPU processes.
    accelerator = Accelerator(mixed_precision=mixed, log_with=report_to or None, project_dir=str(run_dir),
                              step_scheduler_with_optimizer=False, cpu=not torch.cuda.is_available(),
                              fsdp_plugin=plugin)
    _fsdp_on_cpu(accelerator, plugin)
    state = accelerator.state
    if engine_name(accelerator) == "fsdp" and state.fsdp_plugin.fsdp_version != 2:
        raise ConfigError("FSDP version 1 is not supported: set fsdp_version: 2 in the accelerate config "
                          "(preftune shards with FSDP2's fully_shard)")
    return accelerator


def launcher_warning(num_processes: int, env=os.environ) -> str | None:
    """A warning when ``accelerate launch`` was asked for several processes but started this one alone: its simple
    launcher (``--cpu`` without mpirun) sets ``MASTER_ADDR`` for a multi-process request, yet starts one process
    and no ``WORLD_SIZE``. None otherwise."""
    launched = "ACCELERATE_MIXED_PRECISION" in env and "MASTER_ADDR" in env and "WORLD_SIZE" not in env
    if not launched or num_processes > 1:
        return None
    return ("accelerate launch was asked for several processes but started only this one (its --cpu launcher "
            "runs one process without mpirun): for data parallelism on CPUs use accelerate launch --multi_gpu "
            "--num_processes N (it runs on CPU too) or torchrun --nproc_per_node N")


def _fsdp_on_cpu(accelerator, plugin) -> None:
    """accelerate ignores an FSDP request on CPU processes (it enables FSDP on accelerators only) and runs
    DDP; FSDP2 itself works on CPU with gloo, so switch accelerate's state to it when FSDP was asked for."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    asked = plugin is not None or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if asked and state.distributed_type == DistributedType.MULTI_CPU:
        state.fsdp_plugin = plugin or FullyShardedDataParallelPlugin()  # the launcher's settings, from FSDP_* vars
        state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # what later states copy


def engine_name(accelerator) -> str:
    """``fsdp``, ``deepspeed``, ``ddp`` (several processes) or ``single``."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        return "fsdp"
    if kind == DistributedType.DEEPSPEED:
        return "deepspeed"
    return "ddp" if accelerator.num_processes > 1 else "single"


def is_sharded(accelerator) -> bool:
    """True when weights (or optimiser state) are split across processes: FSDP2 or DeepSpeed."""
    return engine_name(accelerator) in ("fsdp", "deepspeed")


def zero_stage(accelerator) -> int:
    return accelerator.state.deepspeed_plugin.zero_stage if engine_name(accelerator) == "deepspeed" else 0


# ---------------------------------------------------------------------- DeepSpeed settings


def configure_deepspeed(accelerator, settings) -> None:
    """Give DeepSpeed the loop's micro-batch size, accumulation and clipping (its config may say ``auto``).

    The loop calls the engine once per micro-batch; DeepSpeed applies the update at the end of each
    ``gradient_accumulation_steps`` micro-batches and averages the loss over them itself."""
    if engine_name(accelerator) != "deepspeed":
        return
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = settings.per_device_batch_size
    config["gradient_accumulation_steps"] = settings.gradient_accumulation_steps
    config["train_batch_size"] = (settings.per_device_batch_size * settings.gradient_accumulation_steps
                                  * accelerator.num_processes)
    config["gradient_clipping"] = settings.max_grad_norm
    zero = config.get("zero_optimization", {})
    for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"):
        if zero.get(key) == "auto":  # accelerate sizes these from model.config, which the loop's module lacks
            del zero[key]            # DeepSpeed's defaults


def loss_divisor(accelerator, micro_batches: int) -> int:
    """What the loop divides each micro-batch loss by before ``backward``: DeepSpeed divides it itself."""
    return 1 if engine_name(accelerator) == "deepspeed" else micro_batches


def mark_boundary(accelerator, last: bool) -> None:
    """Tell DeepSpeed whether this micro-batch ends the optimiser step (it updates the weights only then)."""
    if engine_name(accelerator) == "deepspeed":
        accelerator.sync_gradients = last


def eval_chunks(examples: list, batch_size: int, world: int, sharded: bool) -> list[list]:
    """Evaluation batches of ``batch_size``, process ``r`` taking every ``world``-th from ``r``. Under a
    sharded engine every forward is a collective, so every process gets as many batches, of nearly equal
    sizes (at most ``2 x batch_size``; the per-example metrics are the same however examples are grouped)."""
    if not sharded:
        return [examples[i:i + batch_size] for i in range(0, len(examples), batch_size)]
    if examples and len(examples) < world:
        raise ConfigError(f"the held-out set has {len(examples)} examples, fewer than the {world} processes")
    parts = world * max(1, len(examples) // (batch_size * world)) if examples else 0
    bounds = [len(examples) * k // parts for k in range(parts + 1)] if parts else []
    return [examples[bounds[k]:bounds[k + 1]] for k in range(parts)]


# ---------------------------------------------------------------------- generation


@contextlib.contextmanager
def gathered(module: torch.nn.Module):
    """Every weight of ``module`` (the prepared root: the loop's unwrapped model) whole on every process for
    the block, with no collective inside it: for token-by-token generation, whose number of forward
    passes differs between processes. A no-op unless ``module`` is FSDP2-sharded; ZeRO-3 is refused."""
    if any(hasattr(p, "ds_id") for p in module.parameters()):
        raise ConfigError("generation under DeepSpeed ZeRO-3 is not supported; train online methods "
                          "(PPO, GRPO/RLOO) with ZeRO-2 or FSDP2")
    from torch.distributed.fsdp import FSDPModule

    sharded = [m for m in module.modules() if isinstance(m, FSDPModule)]
    if not sharded:
        yield module
        return
    root, children = sharded[0], sharded[1:]
    root._get_fsdp_state()._lazy_init()  # the root must be known before its children run alone
    for child in children:
        child.set_reshard_after_forward(False, recurse=False)
    for m in sharded:
        m.unshard()
    try:
        yield module
    finally:
        for m in sharded:
            m.reshard()
        for child in children:
            child.set_reshard_after_forward(_reshard_after_forward(), recurse=False)


def _reshard_after_forward() -> bool:
    from accelerate.state import AcceleratorState

    value = AcceleratorState().fsdp_plugin.reshard_after_forward
    return value if isinstance(value, bool) else str(value).upper().endswith("FULL_SHARD")


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) parameter's whole value; any other tensor as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


# ---------------------------------------------------------------------- final model


def full_state_dict(accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """``model``'s whole state dict on the main process (CPU tensors) when it is sharded, else None.
    Every process must call it: it gathers the shards."""
    name = engine_name(accelerator)
    if name == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return _without_tied_copies(model, get_model_state_dict(model, options=options))
    if name == "deepspeed" and zero_stage(accelerator) == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            if not accelerator.is_main_process:
                return {}
            return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return None


def _without_tied_copies(model: torch.nn.Module, state: dict) -> dict:
    """Drop the gathered copy of a tied weight (an output projection tied to the input embedding) that
    the state dict lists under both names: ``save_pretrained`` then writes it once, as unsharded."""
    kept = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    return {name: value for name, value in state.items() if name in kept}


# ---------------------------------------------------------------------- checkpoints


SHARDED_DIR = "sharded"


def save_sharded_state(accelerator, directory: Path, model, optimizer) -> None:
    """Every process writes its shards of the trainable weights and the optimiser state under ``directory``."""
    target = directory / SHARDED_DIR
    if engine_name(accelerator) == "deepspeed":
        accelerator.deepspeed_engine_wrapped.engine.save_checkpoint(str(target), tag="state")
        return
    import torch.distributed.checkpoint as dcp

    dcp.save(_dcp_state(model, optimizer), checkpoint_id=str(target))


def load_sharded_state(accelerator, directory: Path, model, optimizer) -> None:
    """Read back what :func:`save_sharded_state` wrote (the same engine and number of processes)."""
    target = directory / SHARDED_DIR
    if not target.is_dir():
        raise ConfigError(f"{directory}: this checkpoint was not written by a sharded run (no {SHARDED_DIR}/); "
                          "resume it with the engine that wrote it")
    if engine_name(accelerator) == "deepspeed":
        accelerator.deepspeed_engine_wrapped.engine.load_checkpoint(str(target), tag="state",
                                                                    load_lr_scheduler_states=False)
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _dcp_state(model, optimizer)
    dcp.load(state, checkpoint_id=str(target))
    set_state_dict(model, _inner(optimizer), model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=_dcp_options())


def _dcp_state(model, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    weights, optimiser = get_state_dict(model, _inner(optimizer), options=_dcp_options())
    return {"model": weights, "optimizer": optimiser}


def _dcp_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True)


def _inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)
