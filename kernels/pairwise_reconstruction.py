"""Triton kernels of the all-pairs reconstruction scores (docs/method.md, "Baselines"; docs/kernels.md,
"All-pairs ops").

For query rows ``r = b·Lq + i`` of ``q [Bq, Lq, d]`` and every key set ``c`` of ``k [Bk, Lk, d]``, with
``s_j = ⟨q_r, k_cj⟩`` and ``p = softmax_j(s / τ)`` over the valid keys::

    r[c, r]   = Σ_j p_j s_j = ⟨q_r, Σ_j p_j k_cj⟩        (0 for an empty key set)
    lse[c, r] = log Σ_j exp(s_j / τ)                     (0 for an empty key set)

The forward is a flash-attention-style pass: an online softmax over key blocks keeps the running max,
sum and ``Σ p s`` of a ``BLOCK_R`` row block in registers, and writes only ``(r, lse)``: ``O(Bq·Bk·Lq)``.

Backward, with ``g[c, r] = ∂L/∂r[c, r]``: ``∂r/∂s_j = p_j (1 + (s_j − r) / τ)``, so
``dS = g ∘ p ∘ (1 + (s − r)/τ)``, ``dq = Σ_c dS k_c`` and ``dk_c = dSᵀ q``. Two deterministic kernels
(no atomics) recompute ``s`` and ``p`` tile by tile from ``lse``:

- the dq kernel owns a block of query rows and loops over every (key set, key block);
- the dk kernel owns a block of one key set's tokens and loops over every query row block.

Each program accumulates its own fp32 output rows in global memory, one ``BLOCK_D`` slice at a time
(read, add, write), because a full ``[BLOCK, d]`` accumulator for d = 512–1024 does not fit in
registers; the rows are the program's alone and ``tl.debug_barrier()`` orders its own read-modify-writes,
so the result is deterministic.

Precision as in ``pairwise_maxsim``: IEEE fp32 ``tl.dot`` for fp32 inputs, tensor-core 16-bit tiles for
the similarities otherwise; the fp32 ``dS`` tiles are multiplied in TF32 for 16-bit inputs.
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
        triton.Config({"BLOCK_R": 128, "BLOCK_J": 64, "BLOCK_D": 32}, num_warps=8, num_stages=3),
    ],
    "fp32": [
        triton.Config({"BLOCK_R": 32, "BLOCK_J": 32, "BLOCK_D": 16}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_R": 64, "BLOCK_J": 64, "BLOCK_D": 16}, num_warps=8, num_stages=2),
    ],
}
_BACKWARD_DQ = {
    "half": [
        triton.Config({"BLOCK_R": 32, "BLOCK_J": 32, "BLOCK_D": 16}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_R": 32, "BLOCK_J": 32, "BLOCK_D": 32}, num_warps=8, num_stages=2),
    ],
    "fp32": [triton.Config({"BLOCK_R": 32, "BLOCK_J": 16, "BLOCK_D": 16}, num_warps=4, num_stages=1)],
}
_BACKWARD_DK = {
    "half": [
        triton.Config({"BLOCK_R": 32, "BLOCK_J": 32, "BLOCK_D": 16}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_R": 32, "BLOCK_J": 32, "BLOCK_D": 32}, num_warps=8, num_stages=2),
    ],
    "fp32": [triton.Config({"BLOCK_R": 32, "BLOCK_J": 32, "BLOCK_D": 16}, num_warps=4, num_stages=2)],
}


@autotune(_FORWARD, dtype_arg="Q", key=["len_k", "dim"])
@triton.jit
def _reconstruction_forward_kernel(
    Q,  # [n_rows, dim]
    K,  # [n_k, len_k, dim]
    KMask,  # [n_k, len_k] bool
    R,  # [n_k, n_rows] fp32 out
    LSE,  # [n_k, n_rows] fp32 out
    n_rows,
    len_k,
    dim,
    inv_tau,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_r, c = block_and_set(n_rows, BLOCK_R)
    rows = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    row_ok = rows < n_rows
    run_max = tl.full([BLOCK_R], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_R], tl.float32)
    run_ps = tl.zeros([BLOCK_R], tl.float32)  # Σ exp(z − max) · s
    for j0 in range(0, len_k, BLOCK_J):
        cols = j0 + tl.arange(0, BLOCK_J)
        col_in = cols < len_k
        col_ok = col_in & (tl.load(KMask + c * len_k + cols, mask=col_in, other=0) != 0)
        sim = similarity_tile(
            Q, rows, row_ok, K, c * len_k + cols, col_in, dim, UPCAST, DOT_PRECISION, BLOCK_R, BLOCK_J, BLOCK_D
        )
        z = tl.where(col_ok[None, :], sim * inv_tau, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        # rows without a valid key so far keep max = -inf; shift by 0 there so no inf - inf appears
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.exp(run_max - shift)
        p = tl.exp(z - shift[:, None])
        run_sum = run_sum * rescale + tl.sum(p, axis=1)
        run_ps = run_ps * rescale + tl.sum(p * sim, axis=1)
        run_max = new_max
    has_key = run_sum > 0
    r = tl.where(has_key, run_ps / tl.where(has_key, run_sum, 1.0), 0.0)
    lse = tl.where(has_key, run_max + tl.log(tl.where(has_key, run_sum, 1.0)), 0.0)
    tl.store(R + c * n_rows + rows, r, mask=row_ok)
    tl.store(LSE + c * n_rows + rows, lse, mask=row_ok)


@triton.jit
def _score_gradient_tile(sim, col_ok, lse, r, g, inv_tau):
    """``dS = g p (1 + (s − r)/τ)`` with ``p = exp(s/τ − lse)`` on valid keys (0 elsewhere)."""
    p = tl.where(col_ok[None, :], tl.exp(sim * inv_tau - lse[:, None]), 0.0)
    return g[:, None] * p * (1.0 + (sim - r[:, None]) * inv_tau)


@autotune(_BACKWARD_DQ, dtype_arg="Q", key=["n_k", "len_k", "dim"], reset_to_zero=["DQ"])
@triton.jit
def _reconstruction_dq_kernel(
    Q,
    K,
    KMask,
    R,  # [n_k, n_rows] fp32
    LSE,  # [n_k, n_rows] fp32
    G,  # [n_k, n_rows] fp32: ∂L/∂r
    DQ,  # [n_rows, dim] fp32, zero-initialised; accumulated in place
    n_rows,
    n_k,
    len_k,
    dim,
    inv_tau,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    row_ok = rows < n_rows
    for key_set in range(0, n_k):
        c = tl.cast(key_set, tl.int64)  # c · n_rows passes 2³¹ at large gathered batches
        stat = c * n_rows + rows
        g = tl.load(G + stat, mask=row_ok, other=0.0)
        lse = tl.load(LSE + stat, mask=row_ok, other=0.0)
        r = tl.load(R + stat, mask=row_ok, other=0.0)
        for j0 in range(0, len_k, BLOCK_J):
            cols = j0 + tl.arange(0, BLOCK_J)
            col_in = cols < len_k
            col_ok = col_in & (tl.load(KMask + c * len_k + cols, mask=col_in, other=0) != 0)
            key_rows = c * len_k + cols
            sim = similarity_tile(
                Q, rows, row_ok, K, key_rows, col_in, dim, UPCAST, DOT_PRECISION, BLOCK_R, BLOCK_J, BLOCK_D
            )
            ds = _score_gradient_tile(sim, col_ok, lse, r, g, inv_tau)
            for d0 in range(0, dim, BLOCK_D):
                dd = d0 + tl.arange(0, BLOCK_D)
                d_ok = dd < dim
                k = tl.load(K + key_rows[:, None] * dim + dd[None, :], mask=col_in[:, None] & d_ok[None, :], other=0.0)
                out = DQ + rows[:, None] * dim + dd[None, :]
                out_ok = row_ok[:, None] & d_ok[None, :]
                acc = tl.load(out, mask=out_ok, other=0.0)
                acc = tl.dot(ds, k.to(tl.float32), acc, input_precision=DOT_PRECISION)
                tl.store(out, acc, mask=out_ok)
            tl.debug_barrier()  # this program's stores are visible to all its threads before the next read


@autotune(_BACKWARD_DK, dtype_arg="Q", key=["n_rows", "len_k", "dim"], reset_to_zero=["DK"])
@triton.jit
def _reconstruction_dk_kernel(
    Q,
    K,
    KMask,
    R,
    LSE,
    G,
    DK,  # [n_k, len_k, dim] fp32, zero-initialised; accumulated in place
    n_rows,
    len_k,
    dim,
    inv_tau,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    c = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    col_in = cols < len_k
    col_ok = col_in & (tl.load(KMask + c * len_k + cols, mask=col_in, other=0) != 0)
    key_rows = c * len_k + cols
    for r0 in range(0, n_rows, BLOCK_R):
        rows = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
        row_ok = rows < n_rows
        stat = c * n_rows + rows
        g = tl.load(G + stat, mask=row_ok, other=0.0)
        lse = tl.load(LSE + stat, mask=row_ok, other=0.0)
        r = tl.load(R + stat, mask=row_ok, other=0.0)
        sim = similarity_tile(
            Q, rows, row_ok, K, key_rows, col_in, dim, UPCAST, DOT_PRECISION, BLOCK_R, BLOCK_J, BLOCK_D
        )
        ds_t = tl.trans(_score_gradient_tile(sim, col_ok, lse, r, g, inv_tau))  # [BLOCK_J, BLOCK_R]
        for d0 in range(0, dim, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            d_ok = dd < dim
            q = tl.load(Q + rows[:, None] * dim + dd[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            out = DK + key_rows[:, None] * dim + dd[None, :]
            out_ok = col_in[:, None] & d_ok[None, :]
            acc = tl.load(out, mask=out_ok, other=0.0)
            acc = tl.dot(ds_t, q.to(tl.float32), acc, input_precision=DOT_PRECISION)
            tl.store(out, acc, mask=out_ok)
        tl.debug_barrier()


# ----------------------------------------------------------------------------------------------------
# Launchers: ``mulclip_fast.ops`` computes the row weights ``g`` and the scores from ``r``
# ----------------------------------------------------------------------------------------------------


def reconstruction_forward(q, k, q_mask, k_mask, tau: float):
    """``(r, lse)``, both ``[Bk, Bq, Lq]`` fp32; same contract as ``_torch_pairwise.reconstruction_forward``."""
    q, k, k_mask = dense(q, k, k_mask)
    (n_q, len_q, dim), (n_k, len_k, _) = q.shape, k.shape
    n_rows = n_q * len_q
    r = torch.zeros((n_k, n_q, len_q), dtype=torch.float32, device=q.device)
    lse = torch.zeros((n_k, n_q, len_q), dtype=torch.float32, device=q.device)
    if n_rows == 0 or n_k == 0:
        return r, lse

    def grid(meta):
        return checked_grid((n_k * triton.cdiv(n_rows, meta["BLOCK_R"]),))

    with on_device_of(q):
        _reconstruction_forward_kernel[grid](
            q, k, k_mask, r, lse, n_rows, len_k, dim, 1.0 / tau,
            UPCAST=upcast(q.dtype), DOT_PRECISION=dot_precision(q.dtype), **LAUNCH_OPTIONS,
        )  # fmt: skip
    return r, lse


def reconstruction_backward(g, q, k, k_mask, tau: float, r, lse):
    """``(dq, dk)`` in fp32 from the per-row weights ``g = ∂L/∂r`` (``[Bk, Bq, Lq]``) and the saved
    ``(r, lse)``."""
    q, k, k_mask, g, r, lse = dense(q, k, k_mask, g.to(torch.float32), r, lse)
    (n_q, len_q, dim), (n_k, len_k, _) = q.shape, k.shape
    n_rows = n_q * len_q
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    if n_rows == 0 or n_k == 0:
        return dq, dk
    options = {"UPCAST": upcast(q.dtype), "DOT_PRECISION": dot_precision(q.dtype), **LAUNCH_OPTIONS}

    def dq_grid(meta):
        return checked_grid((triton.cdiv(n_rows, meta["BLOCK_R"]),))

    def dk_grid(meta):
        return checked_grid((n_k, triton.cdiv(len_k, meta["BLOCK_J"])))

    with on_device_of(q):
        _reconstruction_dq_kernel[dq_grid](q, k, k_mask, r, lse, g, dq, n_rows, n_k, len_k, dim, 1.0 / tau, **options)
        _reconstruction_dk_kernel[dk_grid](q, k, k_mask, r, lse, g, dk, n_rows, len_k, dim, 1.0 / tau, **options)
    return dq, dk


def compile_specs(dtype: torch.dtype):
    """Every kernel × autotune config this module launches for inputs of ``dtype`` (see ``_aot.py``)."""
    ptr = pointer(dtype)
    common = {"Q": ptr, "K": ptr, "KMask": "*i1", "R": "*fp32", "LSE": "*fp32"}
    sizes = {"n_rows": "i32", "len_k": "i32", "dim": "i32", "inv_tau": "fp32"}
    constexprs = {"UPCAST": False, "DOT_PRECISION": dot_precision(dtype)}
    backward = {**common, **sizes, "G": "*fp32"}
    return (
        autotuned_specs(_reconstruction_forward_kernel, "pairwise_recon_fwd", {**common, **sizes}, constexprs, dtype)
        + autotuned_specs(
            _reconstruction_dq_kernel,
            "pairwise_recon_bwd_dq",
            {**backward, "DQ": "*fp32", "n_k": "i32"},
            constexprs,
            dtype,
        )
        + autotuned_specs(
            _reconstruction_dk_kernel, "pairwise_recon_bwd_dk", {**backward, "DK": "*fp32"}, constexprs, dtype
        )
    )


settle_cache_keys(globals())
