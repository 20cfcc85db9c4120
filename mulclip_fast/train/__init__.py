"""``python -m mulclip_fast.train``: train MulCLIP, its ablations and baselines."""

from .loop import (
    ConfigError,
    TrainConfig,
    Trainer,
    build_parser,
    config_from_args,
    find_latest_checkpoint,
    load_training_checkpoint,
    main,
    resolve_backend,
    resolve_config,
    train,
)

__all__ = [
    "ConfigError",
    "TrainConfig",
    "Trainer",
    "build_parser",
    "config_from_args",
    "find_latest_checkpoint",
    "load_training_checkpoint",
    "main",
    "resolve_backend",
    "resolve_config",
    "train",
]
