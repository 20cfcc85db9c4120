"""``python -m mulclip_fast.train``: train MulCLIP, its ablations and baselines (see ``docs/``).

With no arguments it trains the ``tiny`` preset from scratch on the built-in synthetic long-caption
dataset, on the CPU, in a few minutes, and evaluates it on held-out synthetic pairs. With flags it
fine-tunes an OpenAI / Long-CLIP checkpoint on DOCCI or ShareGPT4V files.

The parts: ``config`` (``TrainConfig``, every setting with its command-line flag, and its validation),
``trainer`` (``Trainer.step``, one optimisation step on one batch), ``loop`` (``train``, a whole job:
logging, checkpoints, signals, evaluation), ``checkpoint`` (atomic writes, RNG states), ``report`` (logs,
plots, summary) and ``cli`` (the parser generated from ``TrainConfig`` and ``main``).
"""

from ..run_checkpoints import load_latest_training_checkpoint, load_training_checkpoint
from .cli import build_parser, config_from_args, main
from .config import ConfigError, TrainConfig, resolve_config
from .loop import train
from .trainer import Trainer

__all__ = [
    "ConfigError",
    "TrainConfig",
    "Trainer",
    "build_parser",
    "config_from_args",
    "load_latest_training_checkpoint",
    "load_training_checkpoint",
    "main",
    "resolve_config",
    "train",
]
