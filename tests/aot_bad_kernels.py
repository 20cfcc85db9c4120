"""Kernels the AOT compile check must reject (used by tests/test_compile_check.py, never launched).

Each one breaks a different rule of the compile check (docs/kernels.md, "Verification without a GPU"): a
compile error, shared memory above every target's limit, and register spills.
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
def _too_much_shared_memory(X, Y, K, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.arange(0, BLOCK)
    inner = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):  # pipelined over num_stages: each stage buffers two 256 x 64 fp32 tiles
        a = tl.load(X + rows[:, None] * K + k0 + inner[None, :])
        b = tl.load(X + (k0 + inner[:, None]) * BLOCK + rows[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(Y + rows[:, None] * BLOCK + rows[None, :], acc)


@triton.jit
def _spills_registers(X, Y, BLOCK: tl.constexpr):
    rows = tl.arange(0, BLOCK)
    tile = tl.load(X + rows[:, None] * BLOCK + rows[None, :])  # 128 x 128 fp32 kept live in one warp
    tl.store(Y + rows[:, None] * BLOCK + rows[None, :], tile - tl.max(tile, axis=1)[:, None])


def compile_specs(dtype):
    ptr = pointer(dtype)
    return [
        CompileSpec("does_not_compile", _does_not_compile, {"X": ptr, "BLOCK": "constexpr"}, {"BLOCK": 16}, 4, 1),
        CompileSpec(
            "too_much_shared_memory",
            _too_much_shared_memory,
            {"X": ptr, "Y": ptr, "K": "i32", "BLOCK": "constexpr", "BLOCK_K": "constexpr"},
            {"BLOCK": 256, "BLOCK_K": 64},
            8,
            4,
        ),
        CompileSpec(
            "spills_registers", _spills_registers, {"X": ptr, "Y": ptr, "BLOCK": "constexpr"}, {"BLOCK": 128}, 1, 1
        ),
    ]
