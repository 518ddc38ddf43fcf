"""Run configurations: one dataclass per command, read from YAML, every field also a command-line flag.

- :mod:`.base`: the machinery (:func:`option` fields with help text, :func:`with_default`, :func:`load_config`,
  flags);
- :mod:`.shared`: the settings commands share (model, data source, held-out data, training loop),
  each field declared once; :mod:`.online`: those the online commands (``ppo``, ``grpo``, ``rloo``, ``online-dpo``)
  share;
- :mod:`.preference` (``dpo``, ``kto``, ``reward``), :mod:`.lm` (``pretrain``, ``sft``), :mod:`.ppo`, :mod:`.grpo`
  (``grpo``, ``rloo``), :mod:`.online_dpo` (``online-dpo``), :mod:`.distill` (``distill``), :mod:`.iterate`: the
  commands' configs. Values are validated before any model is loaded.
"""

from .base import add_config_arguments, config_from_args, config_to_dict, load_config, option, with_default
from .distill import DistillConfig
from .grpo import GRPOConfig, RLOOConfig
from .iterate import IterateConfig
from .lm import PretrainConfig, SFTConfig
from .online_dpo import OnlineDPOConfig
from .ppo import PPOConfig
from .preference import DPOConfig, KTOConfig, RewardConfig, parse_constraint_spec
from .shared import DataSettings, DataSource, HeldOutData, ModelSettings, PaddingFree, PairLayout, TrainSettings

__all__ = ["DPOConfig", "DataSettings", "DataSource", "DistillConfig",
           "GRPOConfig", "HeldOutData", "IterateConfig", "KTOConfig",
           "ModelSettings",
           "OnlineDPOConfig", "PPOConfig", "PaddingFree", "PairLayout", "PretrainConfig", "RLOOConfig", "RewardConfig",
           "SFTConfig", "TrainSettings",
           "add_config_arguments", "config_from_args", "config_to_dict", "load_config", "option",
           "parse_constraint_spec", "with_default"]
