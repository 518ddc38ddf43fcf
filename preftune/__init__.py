"""preftune: align language models with human preferences.

The Python API mirrors the CLI: build a config object and call the function the command calls
(``train_pretrain``, ``train_sft``, ``train_reward``, ``train_ppo``, ``train_grpo``, ``train_dpo``,
``train_kto``, ``train_online_dpo``, ``train_distill``, ``train_iterate``)::

    from preftune import DPOConfig, train_dpo
    result = train_dpo(DPOConfig(model_name_or_path="my-sft-model", dataset="pairs.jsonl", output_dir="runs/dpo"))
"""

__version__ = "0.1.0"

from .config import (  # noqa: E402
    DistillConfig,
    DPOConfig,
    GRPOConfig,
    IterateConfig,
    KTOConfig,
    OnlineDPOConfig,
    PPOConfig,
    PretrainConfig,
    RewardConfig,
    RLOOConfig,
    SFTConfig,
    load_config,  # noqa: E402
)
from .errors import ConfigError, DataError, PreftuneError  # noqa: E402


def _lazy(name: str, summary: str):
    """``preftune.<name>``: calls ``preftune.<module>.<name>``, importing torch and the trainer on first use."""
    module = "iterate.rounds" if name == "train_iterate" else "recipes." + name.removeprefix("train_")

    def run(cfg, **objects):
        from importlib import import_module

        return getattr(import_module(f".{module}", __name__), name)(cfg, **objects)

    run.__name__ = run.__qualname__ = name
    run.__doc__ = f"{summary} (see :func:`preftune.{module}.{name}`)."
    return run


train_dpo = _lazy("train_dpo", "DPO or a relative")
train_kto = _lazy("train_kto", "KTO on desirable / undesirable examples")
train_pretrain = _lazy("train_pretrain", "Next-token pretraining on raw text")
train_sft = _lazy("train_sft", "Supervised fine-tuning")
train_reward = _lazy("train_reward", "A scalar reward model on preference pairs")
train_ppo = _lazy("train_ppo", "PPO against a reward model or function")
train_grpo = _lazy("train_grpo", "GRPO, or RLOO with an ``RLOOConfig``")
train_iterate = _lazy("train_iterate", "Iterative DPO (or KTO) with rejection sampling, judged by a scorer or people")
train_online_dpo = _lazy("train_online_dpo", "Online DPO: pairs sampled from the policy, judged each step")
train_distill = _lazy("train_distill", "On-policy distillation (GKD) of a student towards a teacher")


__all__ = ["DPOConfig", "DistillConfig",
           "GRPOConfig", "IterateConfig", "KTOConfig", "OnlineDPOConfig", "PPOConfig", "PretrainConfig",
           "RLOOConfig",
           "RewardConfig", "SFTConfig", "load_config", "train_dpo", "train_kto", "train_pretrain", "train_sft",
           "train_reward", "train_ppo", "train_grpo", "train_online_dpo", "train_distill",
           "train_iterate", "PreftuneError", "DataError", "ConfigError",
           "__version__"]
