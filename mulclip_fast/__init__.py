"""mulclip-fast: MulCLIP fine-tuning for long captions, with fused kernels for its token-level losses."""

from .reference.checks import set_finite_checks

__version__ = "0.1.0"
__all__ = ["set_finite_checks"]
