"""Backend choice for the fused ops (docs/kernels.md, "Backends").

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
# The dtypes the Triton kernels are compiled for; float64 runs on the torch path.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


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


def check_backend_name(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def kernel_backend(backend: str, x: torch.Tensor, n_patches: int = 0, max_patches: int | None = None) -> str:
    """``triton`` or ``torch`` for an op on tensors like ``x`` (``reference`` is handled by the callers).

    What the Triton kernels cannot take — float64 inputs, or more than ``max_patches`` patches per image
    for the kernels that hold a whole score row on chip — goes to the torch path under ``auto`` and is
    refused under ``triton``.
    """
    resolved = resolve_backend(backend, x.device)
    if resolved != "triton":
        return resolved
    if x.dtype not in KERNEL_DTYPES:
        problem = f"backend='triton' supports float16, bfloat16 and float32 inputs, got {x.dtype}"
    elif max_patches is not None and n_patches > max_patches:
        problem = f"backend='triton' takes at most {max_patches} patches per image, got N = {n_patches}"
    else:
        return "triton"
    if backend == "auto":
        return "torch"
    raise ValueError(f"{problem}: use backend='torch' or 'auto'")
