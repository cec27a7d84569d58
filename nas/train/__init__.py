"""Training: the recipe (`TrainConfig`, presets), the one loop, checkpoints, the search's short mode."""

from nas.space.distill import DistillConfig
from nas.train.config import PRESETS, EMAConfig, TrainConfig, load_config
from nas.train.loop import NonFiniteLoss, TrainResult, proxy_train, train, train_arch

__all__ = [
    "PRESETS",
    "DistillConfig",
    "EMAConfig",
    "NonFiniteLoss",
    "TrainConfig",
    "TrainResult",
    "load_config",
    "proxy_train",
    "train",
    "train_arch",
]
