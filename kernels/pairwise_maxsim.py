"""Triton kernels of the all-pairs late-interaction max-sim (FILIP / FineLIP; docs/method.md, "Baselines").

One direction at a time: for query tokens ``q [Bq, Lq, d]`` (flattened to rows ``r = b·Lq + i``) and key
sets ``k [Bk, Lk, d]``::

    val[c, r] = max_{j valid in c} f(⟨q_r, k_cj⟩)      (0 when key set c is empty)
    idx[c, r] = the arg-max j                          (int32)

with ``f`` the identity or LeakyReLU. Only these ``O(Bq·Bk·Lq)`` statistics are written; the
``[Lq, Lk]`` similarities of a pair live in registers one ``BLOCK_R × BLOCK_J`` tile at a time. The
bidirectional score runs the same kernels with the roles of ``q`` and ``k`` swapped.

Backward (deterministic, no atomics), given per-row weights ``w[c, r] = ∂L/∂val[c, r] · f'``:

- ``dq[r] = Σ_c w[c, r] · k[c, idx[c, r]]``: a gather, one program per (row block, d block);
- ``dk[c, j] = Σ_r [idx[c, r] = j] · w[c, r] · q[r]``: a one-hot GEMM, one program per
  (key set, key block, d block), so every output element is written by exactly one program.

Precision (docs/kernels.md, "Precision"): ``tl.dot`` runs IEEE fp32 for fp32 inputs (``DOT_PRECISION="ieee"``);
fp16/bf16 tiles go to the tensor cores with fp32 accumulation; the one-hot weights of the dk GEMM are fp32 with
TF32 rounding for 16-bit inputs (relative error 2⁻¹¹, far inside the 2e-2 tolerance). ``UPCAST`` casts
loaded tiles to fp32, needed under the interpreter, which computes bf16 on raw bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._aot import autotune, autotuned_specs, dot_precision, pointer, settle_cache_keys
from ._launch import LAUNCH_OPTIONS, checked_grid, dense, on_device_of, upcast
from .tiles import block_and_set, similarity_tile

# Spill-free on sm_80 and sm_90 (``python -m mulclip_fast.kernels.compile_check``); see _aot.autotune.
_FORWARD = {
    "half": [
        triton.Config({"BLOCK_R": 64, "BLOCK_J": 64, "BLOCK_D": 32}, num_warps=8, num_stages=2),
        # [128, 64] tiles spill on sm_80 with aligned pointers (compile_check); [128, 32] do not
        triton.Config({"BLOCK_R": 128, "BLOCK_J": 32, "BLOCK_D": 32}, num_warps=8, num_stages=3),
    ],
    "fp32": [
        triton.Config({"BLOCK_R": 32, "BLOCK_J": 32, "BLOCK_D": 16}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_R": 64, "BLOCK_J": 64, "BLOCK_D": 16}, num_warps=8, num_stages=2),
    ],
}
_GATHER = {
    "half": [
        triton.Config({"BLOCK_R": 32, "BLOCK_D": 64}, num_warps=4, num_stages=1),
        triton.Config({"BLOCK_R": 64, "BLOCK_D": 64}, num_warps=8, num_stages=1),
    ],
    "fp32": [
        triton.Config({"BLOCK_R": 32, "BLOCK_D": 64}, num_warps=4, num_stages=1),
        triton.Config({"BLOCK_R": 64, "BLOCK_D": 64}, num_warps=8, num_stages=1),
    ],
}
_SCATTER = {
    "half": [
        triton.Config({"BLOCK_J": 32, "BLOCK_R": 32, "BLOCK_D": 32}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_J": 64, "BLOCK_R": 16, "BLOCK_D": 64}, num_warps=4, num_stages=2),
    ],
    "fp32": [
        triton.Config({"BLOCK_J": 32, "BLOCK_R": 32, "BLOCK_D": 32}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_J": 64, "BLOCK_R": 16, "BLOCK_D": 64}, num_warps=8, num_stages=2),
    ],
}


@autotune(_FORWARD, dtype_arg="Q", key=["len_k", "dim", "HAS_SLOPE"])
@triton.jit
def _maxsim_forward_kernel(
    Q,  # [n_rows, dim] query tokens, rows r = b·Lq + i
    K,  # [n_k, len_k, dim] key tokens
    KMask,  # [n_k, len_k] bool
    Val,  # [n_k, n_rows] fp32 out
    Idx,  # [n_k, n_rows] int32 out
    n_rows,
    len_k,
    dim,
    negative_slope,
    HAS_SLOPE: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_r, c = block_and_set(n_rows, BLOCK_R)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    best = tl.full([BLOCK_R], float("-inf"), tl.float32)
    arg = tl.zeros([BLOCK_R], tl.int32)
    Kc = K + c * len_k * dim
    for j0 in range(0, len_k, BLOCK_J):
        cols = j0 + tl.arange(0, BLOCK_J)
        col_in = cols < len_k
        col_ok = col_in & (tl.load(KMask + c * len_k + cols, mask=col_in, other=0) != 0)
        sim = similarity_tile(
            Q, rows.to(tl.int64), row_ok, Kc, cols, col_in, dim, UPCAST, DOT_PRECISION, BLOCK_R, BLOCK_J, BLOCK_D
        )
        if HAS_SLOPE:  # FineLIP's LeakyReLU before the max
            sim = tl.where(sim > 0, sim, sim * negative_slope)
        sim = tl.where(col_ok[None, :], sim, float("-inf"))
        tile_best = tl.max(sim, axis=1)
        tile_arg = tl.argmax(sim, axis=1).to(tl.int32) + j0
        # strict '>' keeps the first (lowest j) of tied maxima across tiles, as argmax does within one
        better = tile_best > best
        best = tl.where(better, tile_best, best)
        arg = tl.where(better, tile_arg, arg)
    best = tl.where(best == float("-inf"), 0.0, best)  # empty key set scores 0
    tl.store(Val + c * n_rows + rows, best, mask=row_ok)
    tl.store(Idx + c * n_rows + rows, arg, mask=row_ok)


@autotune(_GATHER, dtype_arg="K", key=["n_k", "dim"])
@triton.jit
def _maxsim_gather_kernel(
    K,  # [n_k, len_k, dim]
    Weight,  # [n_k, n_rows] fp32
    Idx,  # [n_k, n_rows] int32
    DQ,  # [n_rows, dim] fp32 out
    n_rows,
    n_k,
    len_k,
    dim,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``dq[r] = Σ_c w[c, r] · k[c, idx[c, r]]`` for one (row block, d block), accumulated in fp32."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    d_ok = dd < dim
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for key_set in range(0, n_k):
        c = tl.cast(key_set, tl.int64)  # c · n_rows passes 2³¹ at large gathered batches (4096 × 197 rows, 4096 sets)
        w = tl.load(Weight + c * n_rows + rows, mask=row_ok, other=0.0)
        j = tl.load(Idx + c * n_rows + rows, mask=row_ok, other=0)
        take = row_ok & (w != 0)
        k = tl.load(K + (c * len_k + j[:, None]) * dim + dd[None, :], mask=take[:, None] & d_ok[None, :], other=0.0)
        acc += w[:, None] * k.to(tl.float32)
    tl.store(
        DQ + rows[:, None].to(tl.int64) * dim + dd[None, :],
        acc.to(DQ.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )


@autotune(_SCATTER, dtype_arg="Q", key=["n_rows", "len_k", "dim"])
@triton.jit
def _maxsim_scatter_kernel(
    Q,  # [n_rows, dim]
    Weight,  # [n_k, n_rows] fp32
    Idx,  # [n_k, n_rows] int32
    DK,  # [n_k, len_k, dim] fp32 out
    n_rows,
    len_k,
    dim,
    DOT_PRECISION: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``dk[c, j] = Σ_r [idx[c, r] = j] w[c, r] q[r]`` as a one-hot GEMM for one (c, j block, d block)."""
    c = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    dd = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < len_k
    d_ok = dd < dim
    acc = tl.zeros([BLOCK_J, BLOCK_D], tl.float32)
    for r0 in range(0, n_rows, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < n_rows
        w = tl.load(Weight + c * n_rows + rows, mask=row_ok, other=0.0)
        j = tl.load(Idx + c * n_rows + rows, mask=row_ok, other=-1)
        onehot = tl.where(j[None, :] == cols[:, None], w[None, :], 0.0)  # [BLOCK_J, BLOCK_R]
        q = tl.load(Q + rows[:, None].to(tl.int64) * dim + dd[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        acc = tl.dot(onehot, q.to(tl.float32), acc, input_precision=DOT_PRECISION)
    out = DK + (c * len_k + cols[:, None]) * dim + dd[None, :]
    tl.store(out, acc.to(DK.dtype.element_ty), mask=col_ok[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------------------------------
# Launchers: one direction each; ``mulclip_fast.ops`` combines the two directions and the row weights
# ----------------------------------------------------------------------------------------------------


def one_way_forward(q, k, k_mask, negative_slope):
    """``(val, idx)``, both ``[Bk, Bq, Lq]``, of ``max_{j valid} f(⟨q_bi, k_cj⟩)``."""
    q, k, k_mask = dense(q, k, k_mask)
    (n_q, len_q, dim), (n_k, len_k, _) = q.shape, k.shape
    n_rows = n_q * len_q
    val = torch.empty((n_k, n_q, len_q), dtype=torch.float32, device=q.device)
    idx = torch.empty((n_k, n_q, len_q), dtype=torch.int32, device=q.device)
    if n_rows == 0 or n_k == 0:
        return val, idx

    def grid(meta):
        return checked_grid((n_k * triton.cdiv(n_rows, meta["BLOCK_R"]),))

    with on_device_of(q):
        _maxsim_forward_kernel[grid](
            q, k, k_mask, val, idx, n_rows, len_k, dim, 0.0 if negative_slope is None else float(negative_slope),
            HAS_SLOPE=negative_slope is not None, UPCAST=upcast(q.dtype), DOT_PRECISION=dot_precision(q.dtype),
            **LAUNCH_OPTIONS,
        )  # fmt: skip
    return val, idx


def one_way_backward(q, k, weight, idx):
    """``(dq, dk)`` in fp32 from per-row weights ``[Bk, Bq, Lq]`` and arg-maxes (the caller casts)."""
    (n_q, len_q, dim), (n_k, len_k, _) = q.shape, k.shape
    n_rows = n_q * len_q
    # fp32 gradients: the two directions of a bidirectional score are summed before the final cast
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    if n_rows == 0 or n_k == 0:
        return dq, dk
    q, k, weight, idx = dense(q, k, weight.to(torch.float32), idx)

    def gather_grid(meta):
        return checked_grid((triton.cdiv(n_rows, meta["BLOCK_R"]), triton.cdiv(dim, meta["BLOCK_D"])))

    def scatter_grid(meta):
        return checked_grid((n_k, triton.cdiv(len_k, meta["BLOCK_J"]), triton.cdiv(dim, meta["BLOCK_D"])))

    with on_device_of(q):
        _maxsim_gather_kernel[gather_grid](k, weight, idx, dq, n_rows, n_k, len_k, dim, **LAUNCH_OPTIONS)
        _maxsim_scatter_kernel[scatter_grid](
            q, weight, idx, dk, n_rows, len_k, dim, DOT_PRECISION=dot_precision(q.dtype), **LAUNCH_OPTIONS
        )
    return dq, dk


def compile_specs(dtype: torch.dtype):
    """Every kernel × autotune config this module launches for inputs of ``dtype`` (see ``_aot.py``)."""
    ptr = pointer(dtype)
    sizes = {"n_rows": "i32", "len_k": "i32", "dim": "i32"}
    forward = {**sizes, "Q": ptr, "K": ptr, "KMask": "*i1", "Val": "*fp32", "Idx": "*i32", "negative_slope": "fp32"}
    specs = []
    for has_slope in (False, True):
        specs += autotuned_specs(
            _maxsim_forward_kernel,
            f"pairwise_maxsim_fwd[slope={has_slope}]",
            args=forward,
            constexprs={"HAS_SLOPE": has_slope, "UPCAST": False, "DOT_PRECISION": dot_precision(dtype)},
            dtype=dtype,
        )
    specs += autotuned_specs(
        _maxsim_gather_kernel,
        "pairwise_maxsim_bwd_dq",
        args={**sizes, "K": ptr, "Weight": "*fp32", "Idx": "*i32", "DQ": "*fp32", "n_k": "i32"},
        constexprs={},
        dtype=dtype,
    )
    specs += autotuned_specs(
        _maxsim_scatter_kernel,
        "pairwise_maxsim_bwd_dk",
        args={**sizes, "Q": ptr, "Weight": "*fp32", "Idx": "*i32", "DK": "*fp32"},
        constexprs={"DOT_PRECISION": dot_precision(dtype)},
        dtype=dtype,
    )
    return specs


settle_cache_keys(globals())
