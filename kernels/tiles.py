"""Tile helpers shared by the kernels: the program's place in a flattened grid, and the masked
load-and-dot loop that every similarity tile is built with."""

from __future__ import annotations

import triton
import triton.language as tl

from ._aot import settle_cache_keys


@triton.jit
def block_and_set(n, BLOCK: tl.constexpr):
    """``(block, set)`` of this program when grid axis 0 enumerates the ``cdiv(n, BLOCK)`` blocks of
    set 0, then those of set 1, …: the unbounded count of sets (samples, gathered key sets) shares
    axis 0, whose limit is 2³¹ − 1, instead of sitting on axis 1 or 2 (65535). The set index is 64-bit,
    as it multiplies whole-set offsets."""
    pid = tl.program_id(0)
    blocks = tl.cdiv(n, BLOCK)
    return pid % blocks, (pid // blocks).to(tl.int64)


@triton.jit
def similarity_tile(
    A,
    a_rows,
    a_ok,
    B,
    b_rows,
    b_ok,
    dim,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``[BLOCK_A, BLOCK_B]`` fp32 ``A[a_rows] · B[b_rows]ᵀ`` of two row-major ``[·, dim]`` matrices, over
    the full width in ``BLOCK_D`` chunks; rows outside ``a_ok``/``b_ok`` load as zeros. ``UPCAST`` casts
    the loaded tiles to fp32 (the interpreter computes 16-bit floats on raw bits)."""
    acc = tl.zeros([BLOCK_A, BLOCK_B], dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < dim
        a = tl.load(A + a_rows[:, None] * dim + cols[None, :], mask=a_ok[:, None] & col_ok[None, :], other=0.0)
        b = tl.load(B + b_rows[:, None] * dim + cols[None, :], mask=b_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)
    return acc


settle_cache_keys(globals())
