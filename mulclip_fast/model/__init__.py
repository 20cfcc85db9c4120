"""CLIP towers in OpenAI's layout, presets, checkpoint loading and MulCLIP feature extraction."""

from .calibration import LocalTokenCalibration
from .clip import (
    CLIP,
    LONG_CONTEXT,
    PRESETS,
    SHORT_CONTEXT,
    CLIPConfig,
    checked_preset_config,
    parse_model_overrides,
    preset_config,
)
from .loading import (
    CheckpointError,
    check_device,
    checkpoint_read_error,
    describe_clip_state_dict,
    load_clip_weights,
    read_state_dict,
)

__all__ = [
    "CLIP",
    "CLIPConfig",
    "CheckpointError",
    "LocalTokenCalibration",
    "LONG_CONTEXT",
    "PRESETS",
    "SHORT_CONTEXT",
    "check_device",
    "checked_preset_config",
    "checkpoint_read_error",
    "describe_clip_state_dict",
    "load_clip_weights",
    "parse_model_overrides",
    "preset_config",
    "read_state_dict",
]
