"""preftune: align language models with human preferences.

The Python API mirrors the CLI: build a config object and call the function the command calls
(``train_pretrain``, ``train_sft``, ``train_reward``, ``train_ppo``, ``train_grpo``, ``train_dpo``,
``train_kto``)::

    from preftune import DPOConfig, train_dpo
    result = train_dpo(DPOConfig(model_name_or_path="my-sft-model", dataset="pairs.jsonl", output_dir="runs/dpo"))
"""

__version__ = "0.1.0"

from .config import (  # noqa: E402
    DPOConfig,
    GRPOConfig,
    KTOConfig,
    PPOConfig,
    PretrainConfig,
    RewardConfig,
    RLOOConfig,
    SFTConfig,
    load_config,  # noqa: E402
)
from .errors import ConfigError, DataError, PreftuneError  # noqa: E402


def train_dpo(cfg, **objects):
    """DPO or a relative (see :func:`preftune.train.dpo.train_dpo`)."""
    from .train.dpo import train_dpo as run

    return run(cfg, **objects)


def train_kto(cfg, **objects):
    """KTO on desirable / undesirable examples (see :func:`preftune.train.kto.train_kto`)."""
    from .train.kto import train_kto as run

    return run(cfg, **objects)


def train_pretrain(cfg, **objects):
    """Next-token pretraining on raw text (see :func:`preftune.train.pretrain.train_pretrain`)."""
    from .train.pretrain import train_pretrain as run

    return run(cfg, **objects)


def train_sft(cfg, **objects):
    """Supervised fine-tuning (see :func:`preftune.train.sft.train_sft`)."""
    from .train.sft import train_sft as run

    return run(cfg, **objects)


def train_reward(cfg, **objects):
    """A scalar reward model on preference pairs (see :func:`preftune.train.reward.train_reward`)."""
    from .train.reward import train_reward as run

    return run(cfg, **objects)


def train_ppo(cfg, **objects):
    """PPO against a reward model or function (see :func:`preftune.train.ppo.train_ppo`)."""
    from .train.ppo import train_ppo as run

    return run(cfg, **objects)


def train_grpo(cfg, **objects):
    """GRPO, or RLOO with an ``RLOOConfig`` (see :func:`preftune.train.grpo.train_grpo`)."""
    from .train.grpo import train_grpo as run

    return run(cfg, **objects)


__all__ = ["DPOConfig", "GRPOConfig", "KTOConfig", "PPOConfig", "PretrainConfig", "RLOOConfig", "RewardConfig",
           "SFTConfig", "load_config", "train_dpo", "train_kto", "train_pretrain", "train_sft", "train_reward",
           "train_ppo", "train_grpo", "PreftuneError", "DataError", "ConfigError", "__version__"]
