"""The engine interface, the choice of an engine by name, and the sampling phase every trainer runs."""

from __future__ import annotations

from typing import Callable, Protocol

from ..generate import Generation, SamplingSettings


class GenerationEngine(Protocol):
    """Samples completions of token-id prompts; holds (or reads) a copy of the policy's weights."""

    name: str

    def generate(self, prompt_ids: list[list[int]], settings: SamplingSettings, *, seed: int | None = None,
                 row_seeds: list[int] | None = None, prompt_inputs: list[dict] | None = None) -> Generation:
        """One response per prompt, cut after its first EOS (kept). ``row_seeds``: one seed per row, so a
        row's sample does not depend on the other rows of its batch. ``prompt_inputs``: one dict of further
        inputs per prompt (its image tensors), given on the prompt's forward."""
        ...

    def sync(self, policy) -> None:
        """Make the engine sample from ``policy``'s current weights (a LoRA policy's adapters merged)."""
        ...

    def sleep(self) -> None:
        """Free what the engine holds on the accelerator while the trainer updates the policy."""
        ...

    def wake(self) -> None:
        """Undo :meth:`sleep` before the next sampling phase."""
        ...


def sample_with(engine: GenerationEngine, policy, prompt_ids: list[list[int]], settings: SamplingSettings, *,
                seed: int | None = None, row_seeds: list[int] | None = None,
                prompt_inputs: list[dict] | None = None) -> Generation:
    """One sampling phase: wake the engine, push ``policy``'s current weights, sample, put the engine back to sleep."""
    engine.wake()
    try:
        engine.sync(policy)
        images = {"prompt_inputs": prompt_inputs} if prompt_inputs is not None else {}   # text: the original call
        return engine.generate(prompt_ids, settings, seed=seed, row_seeds=row_seeds, **images)
    finally:
        engine.sleep()


def _transformers(policy, tokenizer, options: dict):
    from .local import TransformersEngine

    return TransformersEngine(policy, pad_token_id=_pad_id(tokenizer), eos_token_id=tokenizer.eos_token_id,
                              batch_size=options.get("batch_size", 16))


def _vllm(policy, tokenizer, options: dict):
    from .vllm_engine import VLLMEngine

    return VLLMEngine.create(policy, tokenizer, options)


# name -> factory(policy, tokenizer, options); ``generation_engine`` picks one
ENGINES: dict[str, Callable] = {"transformers": _transformers, "vllm": _vllm}


def make_engine(name: str, policy, tokenizer, **options) -> GenerationEngine:
    """The engine ``name`` for ``policy``. ``options``: ``batch_size`` (sequences per forward of the
    transformers engine); ``gpu_memory_utilization``, ``server_url``, ``sleep_mode``, ``model_path``,
    ``seed``, ``sync_dir``, ``dtype`` (vLLM)."""
    if name not in ENGINES:
        from ..errors import ConfigError

        raise ConfigError(f"unknown generation_engine '{name}'; choose one of: {', '.join(ENGINES)}")
    return ENGINES[name](policy, tokenizer, options)


def online_engine(cfg, policy, tokenizer, run_dir) -> GenerationEngine:
    """The engine an online config (:class:`~preftune.config.online.OnlineRLSettings`) asks for, sampling ``policy``."""
    return make_engine(cfg.generation_engine, policy, tokenizer, batch_size=cfg.generation_batch_size,
                       gpu_memory_utilization=cfg.vllm_gpu_memory_utilization, server_url=cfg.vllm_server_url,
                       sleep_mode=cfg.vllm_enable_sleep_mode, model_path=cfg.model_name_or_path, seed=cfg.seed,
                       sync_dir=run_dir)


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id
