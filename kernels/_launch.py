"""What every launcher does before a kernel runs, so that a kernel sees exactly what it indexes.

- **Layout.** The kernels index their tensors as dense row-major arrays (``row * D + col``): a launcher
  passes every tensor through :func:`dense`, which copies only views that are not (an expanded mask with
  stride 0, a sliced or transposed token tensor, a batch taken as a view of a larger tensor).
- **Device.** Triton launches on the *current* CUDA device, not the tensors': :func:`on_device_of`
  makes the tensors' device current for the launch (a single process with tensors on ``cuda:1`` would
  otherwise run the kernel on ``cuda:0`` and fault).
- **Grid.** CUDA caps grid axes 1 and 2 at 65535 programs (axis 0 at 2³¹ − 1): the launchers put every
  dimension that grows with the batch on axis 0 (flattened with the row blocks where both grow), and
  :func:`checked_grid` refuses a grid that still breaks a cap, instead of a launch failure on a GPU.
- **Options.** Every launch passes :data:`LAUNCH_OPTIONS`, and the compile check compiles with them.
"""

from __future__ import annotations

import contextlib

import torch

from . import interpreter_enabled

MAX_GRID = (2**31 - 1, 65535, 65535)

# Compile options every launch states instead of taking Triton's default. ``enable_fp_fusion``: whether a
# multiply followed by an add compiles to one FMA (one rounding instead of two). Triton has fused by default
# through 3.9, which warns that its default turns to unfused in 3.10; stated here, a Triton upgrade does not
# change the compiled kernels (their numerics, registers and speed) behind the compile check's back. Fused,
# as every kernel here has been compiled, checked and measured so far.
LAUNCH_OPTIONS = {"enable_fp_fusion": True}


def dense(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Each tensor as a contiguous (row-major, no stride-0) tensor; already contiguous ones unchanged."""
    return [t.contiguous() for t in tensors]


def on_device_of(tensor: torch.Tensor):
    """A context that makes ``tensor``'s CUDA device current (nothing for CPU tensors, the interpreter's)."""
    return torch.cuda.device(tensor.device) if tensor.device.type == "cuda" else contextlib.nullcontext()


def checked_grid(grid: tuple[int, ...]) -> tuple[int, ...]:
    """``grid`` itself, after checking each axis against CUDA's limits (:data:`MAX_GRID`)."""
    for axis, (size, limit) in enumerate(zip(grid, MAX_GRID, strict=False)):
        if size > limit:
            raise ValueError(f"kernel grid axis {axis} has {size} programs, above CUDA's limit of {limit}: {grid}")
    return grid


def upcast(dtype: torch.dtype) -> bool:
    """The kernels' ``UPCAST`` flag: cast loaded 16-bit tiles to fp32, needed under the interpreter
    (which computes bf16 on raw bits); on a GPU the tensor cores take the 16-bit tiles."""
    return interpreter_enabled() and dtype != torch.float32
