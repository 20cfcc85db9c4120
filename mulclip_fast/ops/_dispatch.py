"""Backend choice for the fused ops (DESIGN §4, "Backends").

``auto`` runs the Triton kernels on CUDA tensors and the memory-lean chunked PyTorch path elsewhere.
``triton`` on CPU tensors is allowed only under Triton's interpreter (``TRITON_INTERPRET=1``), which
is how the kernels' numerics are tested on machines without a GPU.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "torch", "reference")


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend (``triton``, ``torch`` or ``reference``) for tensors on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton' needs the triton package (pip install triton)")
        if device.type != "cuda" and not interpreter_enabled():
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got {device.type}); on a CPU set TRITON_INTERPRET=1 "
                "before importing mulclip_fast to run the kernels in Triton's interpreter, or use backend='torch'"
            )
    return backend
