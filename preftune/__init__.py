"""preftune: align language models with human preferences.

The Python API mirrors the CLI: build a config object and call the function the command calls::

    from preftune import DPOConfig, train_dpo
    result = train_dpo(DPOConfig(model_name_or_path="my-sft-model", dataset="pairs.jsonl", output_dir="runs/dpo"))
"""

__version__ = "0.1.0"

from .config import DPOConfig, load_config  # noqa: E402
from .errors import ConfigError, DataError, PreftuneError  # noqa: E402


def train_dpo(cfg, **objects):
    """Train with DPO or a relative (see :func:`preftune.train.dpo.train_dpo`)."""
    from .train.dpo import train_dpo as _train_dpo

    return _train_dpo(cfg, **objects)


__all__ = ["DPOConfig", "load_config", "train_dpo", "PreftuneError", "DataError", "ConfigError", "__version__"]
