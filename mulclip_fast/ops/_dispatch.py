"""Backend choice for the fused ops (docs/kernels.md, "Backends").

``auto`` runs the Triton kernels on CUDA tensors and the memory-lean chunked PyTorch path elsewhere;
patch sets the Triton top-k kernels refuse go to the CUDA extension of ``csrc/`` where it is built, else
to the torch path. ``triton`` on CPU tensors is allowed only under Triton's interpreter
(``TRITON_INTERPRET=1``), which is how the kernels' numerics are tested on machines without a GPU.
``cpp`` and ``cuda_ext`` are the extension's CPU twin and CUDA kernels (``extension``), for the ops that
have them (the top-k aggregates).
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from ..kernels import interpreter_enabled
from ..reference.checks import check_positive

BACKENDS = ("auto", "triton", "torch", "reference", "cpp", "cuda_ext")
# The extension's backends and the device type of the tensors each runs on.
EXTENSION_DEVICES = {"cpp": "cpu", "cuda_ext": "cuda"}
# Backends that take the whole batch in its input dtype (their kernels bound the memory and accumulate in
# fp32); the torch path instead upcasts chunks of the batch.
FUSED_BACKENDS = ("triton", "cpp", "cuda_ext")
# The dtypes the Triton kernels are compiled for; float64 runs on the torch path.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend (``triton``, ``torch``, ``reference``, ``cpp`` or ``cuda_ext``) for tensors on
    ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend in EXTENSION_DEVICES and device.type != EXTENSION_DEVICES[backend]:
        raise ValueError(
            f"backend={backend!r} runs on {EXTENSION_DEVICES[backend]} tensors, got {device.type} tensors: use "
            "'cpp' for CPU tensors, 'cuda_ext' for CUDA tensors, or 'auto'"
        )
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


def constant_temperature(name: str, value) -> float:
    """A positive temperature as the Python float the fused ops take: they hold temperatures as constants.

    A tensor temperature is accepted as the constant it holds, but not one that requires grad: the reference
    differentiates through it, and passing its value on would lose that gradient silently.
    """
    if isinstance(value, torch.Tensor) and value.requires_grad:
        raise ValueError(
            f"{name} is a tensor that requires grad: the fused ops take temperatures as constants and would not "
            "learn it; pass a float (or a detached tensor), or use backend='reference' to learn it"
        )
    check_positive(name, value)
    if torch.compiler.is_compiling() and not isinstance(value, torch.Tensor):
        # A float that differs between compiled calls is traced as a symbolic float: the op takes it as it is.
        return value
    return float(value)


def refuse_double_backward(backward_op, op_name: str) -> None:
    """Give ``backward_op``, the backward custom op of the public op ``op_name``, an autograd formula that
    says the op has no double backward. Without one, PyTorch's error names the internal op and asks the
    caller to register a formula."""

    def formula(ctx, *grads):
        raise RuntimeError(
            f"{op_name} has no double backward on its fused backends (a gradient of its gradient, such as a "
            "gradient penalty, needs one): use backend='reference', which differentiates twice"
        )

    backward_op.register_autograd(formula, setup_context=lambda ctx, inputs, output: None)


def check_backend_name(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def kernel_backend(
    backend: str, x: torch.Tensor, n_patches: int = 0, max_patches: int | None = None, has_extension: bool = False
) -> str:
    """The concrete backend for an op on tensors like ``x`` (``reference`` is handled by the callers).

    What the Triton kernels cannot take — float64 inputs, or more than ``max_patches`` patches per image
    for the kernels that hold a whole score row on chip — is refused under ``triton``; under ``auto`` the
    patch sets go to the CUDA extension when the op ``has_extension`` and it is built, else (and float64
    always) to the torch path. ``cpp``/``cuda_ext`` need an op with an extension kernel, a kernel dtype, and
    the extension (built here on first use, or a ``ValueError`` saying how to build it).
    """
    resolved = resolve_backend(backend, x.device)
    if resolved in EXTENSION_DEVICES:
        if not has_extension:
            raise ValueError(
                f"backend={backend!r} implements topk_patch_aggregate and pairwise_topk_aggregate_cosines only; "
                "use 'auto' or 'torch' for this op"
            )
        if x.dtype not in KERNEL_DTYPES:
            raise ValueError(f"backend={backend!r} supports float16, bfloat16 and float32 inputs, got {x.dtype}")
        from . import extension

        extension.require(resolved)
        return resolved
    if resolved != "triton":
        return resolved
    if x.dtype not in KERNEL_DTYPES:
        problem = f"backend='triton' supports float16, bfloat16 and float32 inputs, got {x.dtype}"
    elif max_patches is not None and n_patches > max_patches:
        problem = f"backend='triton' takes at most {max_patches} patches per image, got N = {n_patches}"
        if backend == "auto" and has_extension:
            from . import extension

            return "cuda_ext" if extension.cuda_available() else "torch"
    else:
        return "triton"
    if backend == "auto":
        return "torch"
    raise ValueError(f"{problem}: use backend='torch' or 'auto'")
