"""Every setting of a training run (``TrainConfig``) and its validation."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import torch

from ..data import parse_data_spec
from ..losses import OBJECTIVES, TERMS
from ..model import PRESETS, CheckpointError, preset_config


class ConfigError(ValueError):
    """An invalid combination of settings; the message names the flag."""


# ---------------------------------------------------------------------------------------------- defaults
# The no-argument run: tiny model from scratch on synthetic data, sized to finish within ~4 minutes of
# training on a 2-core CPU (DESIGN §8). Tuned values; see README "Default run".
DEFAULT_STEPS_SCRATCH = 440
DEFAULT_LR_SCRATCH = 5e-4
DEFAULT_LR_FINETUNE = 1e-6
DEFAULT_TIME_LIMIT_SYNTHETIC = 240.0


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX); elsewhere bf16 autocast is slower."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's own capability checks
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


@dataclass
class TrainConfig:
    """Every setting of a training run; written to ``config.json`` fully resolved."""

    preset: str = "tiny"
    model_overrides: dict = field(default_factory=dict)
    data: str = "synthetic"
    image_root: str | None = None
    init: str | None = None
    freeze_positions: int = 20
    loss: str = "mulclip"
    wpr: bool = True
    sap: bool = True
    weights: dict = field(default_factory=dict)
    sap_pairing: str = "matched"
    sap_topk_ratio: float = 0.25
    sap_raw_patches: bool = False
    max_subcaptions: int = 8
    fine_start: float = 0.8
    fine_ramp: float = 0.05
    steps: int | None = None
    epochs: int | None = None
    time_limit: float = 0.0
    batch_size: int = 32
    lr: float | None = None
    weight_decay: float = 0.1
    warmup: float = 0.05
    seed: int = 0
    train_size: int = 1_000_000
    twin_fraction: float = 0.5
    out: str = "runs/default"
    device: str = "cpu"
    backend: str = "auto"
    num_workers: int = 0
    log_every: int = 1
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    val_every: int = 0
    val_pairs: int = 256
    eval_pairs: int = 1000
    threads: int = 0
    precision: str = "fp32"
    grad_checkpointing: bool = False
    accum_steps: int = 1
    compile: str | None = None  # a torch.compile backend for the towers' transformers ("inductor"), or None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def resolve_config(config: TrainConfig) -> TrainConfig:
    """Fill the defaults that depend on other settings and validate everything; raises ConfigError."""
    c = dataclasses.replace(config, weights=dict(config.weights), model_overrides=dict(config.model_overrides))
    if c.preset not in PRESETS:
        raise ConfigError(f"unknown --preset {c.preset!r}; choose one of {sorted(PRESETS)}")
    if c.loss not in OBJECTIVES:
        raise ConfigError(f"unknown --loss {c.loss!r}; choose one of {sorted(OBJECTIVES)}")
    parse_data_spec(c.data)  # raises DataError with the reason
    if c.init is not None:
        kind, _, path = c.init.partition(":")
        if kind not in ("openai", "longclip") or not path:
            raise ConfigError(f"--init must be openai:PATH or longclip:PATH, got {c.init!r}")
        if not os.path.isfile(path):
            raise CheckpointError(f"--init checkpoint not found: {path}")
    if c.precision not in ("fp32", "bf16"):
        raise ConfigError(f"--precision must be fp32 or bf16, got {c.precision!r}")
    if c.compile is not None and c.compile not in torch._dynamo.list_backends(exclude_tags=()):
        raise ConfigError(
            f"--compile backend {c.compile!r} unknown; torch.compile knows {torch._dynamo.list_backends()}"
        )
    if c.accum_steps < 1 or c.batch_size % c.accum_steps:
        raise ConfigError(f"--accum-steps must be >= 1 and divide --batch-size {c.batch_size}, got {c.accum_steps}")
    if c.steps is not None and c.epochs is not None:
        raise ConfigError("give --steps or --epochs, not both")
    if c.steps is None and c.epochs is None:
        c.steps = DEFAULT_STEPS_SCRATCH
    for name in ("steps", "epochs"):
        value = getattr(c, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name} must be >= 1, got {value}")
    if c.lr is None:
        c.lr = DEFAULT_LR_FINETUNE if c.init else DEFAULT_LR_SCRATCH
    checks = {
        "batch-size": c.batch_size >= 2,
        "lr": c.lr > 0,
        "weight-decay": c.weight_decay >= 0,
        "warmup": 0 <= c.warmup < 1,
        "fine-start": 0 <= c.fine_start <= 1,
        "fine-ramp": 0 <= c.fine_ramp <= 1,
        "time-limit": c.time_limit >= 0,
        "max-subcaptions": c.max_subcaptions >= 1,
        "sap-topk-ratio": 0 < c.sap_topk_ratio <= 1,
        "freeze-positions": 0 <= c.freeze_positions <= 248,
        "keep-checkpoints": c.keep_checkpoints >= 1,
        "log-every": c.log_every >= 1,
        "eval-pairs": c.eval_pairs >= 0,
        "val-pairs": c.val_pairs >= 1,
        "num-workers": c.num_workers >= 0,
        "train-size": c.train_size >= c.batch_size,
        "twin-fraction": 0 <= c.twin_fraction <= 1,
    }
    bad = [name for name, ok in checks.items() if not ok]
    if bad:
        raise ConfigError(f"invalid value for --{bad[0]} ({getattr(c, bad[0].replace('-', '_'))})")
    if c.sap_pairing not in ("matched", "all"):
        raise ConfigError(f"--sap-pairing must be matched or all, got {c.sap_pairing!r}")
    unknown = set(c.weights) - set(TERMS)
    if unknown:
        raise ConfigError(f"unknown loss term weight(s) {sorted(unknown)}")
    try:
        preset_config(c.preset, **c.model_overrides)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad --model override: {exc}") from None
    if c.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {c.device} requested but CUDA is not available")
    return c
