"""MulCLIP's losses and fused ops inside other CLIP trainers (open_clip, Hugging Face ``transformers``).

- ``hf`` / ``open_clip``: feature adapters. They read the model object you built — CLS, patch tokens,
  EOT and word tokens through the model's own final LayerNorm and projection, the words-only mask —
  and stretch its text positions to 248 (Long-CLIP's rule). Neither library is imported by this package.
- ``token_calibrations`` / ``calibrate``: MulCLIP's local token calibration of those tokens (``V'``, ``T'``).
- ``MulCLIPClipLoss``: open_clip's ``ClipLoss`` calling convention and distributed options, plus the
  token-level terms when token features are passed.
"""

from . import hf, open_clip
from ._common import (
    ImageTokenFeatures,
    TextTokenFeatures,
    as_clip_loss_inputs,
    calibrate,
    token_calibrations,
    word_token_mask,
)
from .clip_loss import MulCLIPClipLoss

__all__ = [
    "ImageTokenFeatures",
    "MulCLIPClipLoss",
    "TextTokenFeatures",
    "as_clip_loss_inputs",
    "calibrate",
    "hf",
    "open_clip",
    "token_calibrations",
    "word_token_mask",
]
