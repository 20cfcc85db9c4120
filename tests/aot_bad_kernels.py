"""Kernels the AOT compile check must reject (used by tests/test_compile_check.py, never launched).

Each one breaks a different rule of DESIGN §5.2: a compile error, shared memory above every target's
limit, and register spills.
"""

from __future__ import annotations

import triton
import triton.language as tl
from mulclip_fast.kernels._aot import CompileSpec, pointer


@triton.jit
def _does_not_compile(X, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(X + offsets, tl.load(X + offsets) @ tl.load(X + offsets))  # rank-1 operands: no tl.dot


@triton.jit
def _too_much_shared_memory(X, Y, BLOCK: tl.constexpr):
    rows = tl.arange(0, BLOCK)
    tile = tl.load(X + rows[:, None] * BLOCK + rows[None, :])
    tl.store(Y + rows[:, None] * BLOCK + rows[None, :], tl.dot(tile, tile))


@triton.jit
def _spills_registers(X, Y, BLOCK: tl.constexpr):
    rows = tl.arange(0, BLOCK)
    tile = tl.load(X + rows[:, None] * BLOCK + rows[None, :])  # 256 x 256 fp32 in one warp's registers
    tl.store(Y + rows[:, None] * BLOCK + rows[None, :], tl.sort(tile, dim=1) * tl.sum(tile, axis=0)[None, :])


def compile_specs(dtype):
    ptr = pointer(dtype)
    return [
        CompileSpec("does_not_compile", _does_not_compile, {"X": ptr, "BLOCK": "constexpr"}, {"BLOCK": 16}, 4, 1),
        CompileSpec(
            "too_much_shared_memory",
            _too_much_shared_memory,
            {"X": ptr, "Y": ptr, "BLOCK": "constexpr"},
            {"BLOCK": 512},
            8,
            3,
        ),
        CompileSpec(
            "spills_registers", _spills_registers, {"X": ptr, "Y": ptr, "BLOCK": "constexpr"}, {"BLOCK": 256}, 1, 1
        ),
    ]
