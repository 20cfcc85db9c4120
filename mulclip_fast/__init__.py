"""mulclip-fast: MulCLIP fine-tuning for long captions, with fused kernels for its token-level losses."""

__version__ = "0.1.0"
