"""Softmax over the tokens of the same sample, flash-attention style: WPR's reconstruction and InfoNCE.

Both WPR pieces are a softmax over a token × token similarity within one sample (docs/method.md, "WPR"):

- reconstruction (``WITH_OUTPUT`` in forward, ``WITH_GRAD`` in backward): ``out = softmax(scale · q kᵀ) k``,
  attention whose values are the keys;
- in-sample InfoNCE (both flags off): the row log-sum-exp of ``scale · x yᵀ`` and its diagonal.

Three kernels, in the style of Triton's fused-attention tutorial, with an online softmax in forward and
the saved row log-sum-exp (``lse``) to rebuild probabilities tile by tile in backward, so the
``[B, Lq, Lk]`` matrix never exists:

- ``_token_softmax_fwd``        grid (B × row blocks, d chunks): ``out`` and ``lse`` (or ``lse`` and diag);
- ``_token_softmax_bwd_rows``   grid (B × row blocks, d chunks): the gradient of the query side;
- ``_token_softmax_bwd_cols``   grid (B × key blocks, d chunks): the gradient of the key (= value) side.

The batch shares grid axis 0 with the row (or key) blocks, which CUDA allows up to 2³¹ − 1 programs;
axis 1 holds the d chunks (at most 64 at d = 1024), far below its cap of 65535.

Widths up to 1024 are handled by looping over d in ``BLOCK_D`` chunks: each program owns one d chunk of
its output tile and recomputes the scores over the full width (``tiles.similarity_tile``), which keeps registers at
``[BLOCK_M, BLOCK_D]`` whatever d is, at the price of recomputing ``q kᵀ`` once per d chunk (d / BLOCK_D
times: 16 at d = 512). Within a pair the token counts are small (≤ 248), so this buys spill-free kernels
for little time; a faster layout would keep a [BLOCK_M, d] accumulator split over a second grid level.

Conventions: inputs contiguous ``[B, L, D]`` (row stride D), masks ``[B, L]`` bool (True = valid),
``lse``/row coefficients ``[B, L]`` float32. fp32 ``tl.dot`` runs in IEEE precision (``_aot.dot_precision``).
Under the interpreter ``UPCAST`` casts loaded tiles to float32 (it computes bf16 on raw bits).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._aot import autotune, autotuned_specs, dot_precision, pointer, settle_cache_keys
from ._launch import LAUNCH_OPTIONS, checked_grid, dense, on_device_of, upcast
from .tiles import block_and_set, similarity_tile

# (BLOCK_M, BLOCK_N, BLOCK_D, warps, stages), by operand width. The first is the interpreter's. Registers,
# not shared memory (at most ~40 KB), bound the blocks: these compile without spills on sm_80 and sm_90
# (compile_check, with the runtime's alignment hints). fp32 runs IEEE FMA dots whose operands live in
# registers, hence its smaller tiles; e.g. [64, 32] blocks with 32-wide d chunks spill in fp32 backward,
# 32-wide d chunks with 8 warps spill on sm_80 once pointers are known aligned, and [128, 64] blocks spill
# in fp16/bf16 on sm_80.
_CONFIGS = {
    "half": [
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_D": 32}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 32}, num_warps=8, num_stages=2),
    ],
    "fp32": [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_D": 16}, num_warps=4, num_stages=1)],
}
_KEY = ["Lq", "Lk", "D"]


@triton.jit
def _load_tile(X, rows, row_in, cols, col_in, D, UPCAST: tl.constexpr):
    """``X[rows, cols]`` of a ``[L, D]`` matrix, zeros outside; float32 when ``UPCAST``."""
    tile = tl.load(X + rows[:, None] * D + cols[None, :], mask=row_in[:, None] & col_in[None, :], other=0.0)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@autotune(configs=_CONFIGS, key=[*_KEY, "WITH_OUTPUT"], dtype_arg="Q")
@triton.jit
def _token_softmax_fwd(
    Q,
    K,
    Out,
    Lse,
    Diag,
    QMask,
    KMask,
    Lq,
    Lk,
    D,
    scale,
    WITH_OUTPUT: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Online softmax over the valid keys of each query row.

    ``WITH_OUTPUT``: ``Out[b, i, chunk] = Σ_j softmax_j(scale·⟨q_i, k_j⟩) k_j[chunk]`` (zero for invalid
    queries or samples without a valid key) and ``Lse``. Otherwise (InfoNCE, Lq = Lk, one d chunk):
    ``Lse`` and ``Diag[b, i] = scale·⟨q_i, k_i⟩``.
    """
    pid_m, pid_b = block_and_set(Lq, BLOCK_M)
    pid_d = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = rows < Lq
    Qb = Q + pid_b * Lq * D
    Kb = K + pid_b * Lk * D
    q_valid = tl.load(QMask + pid_b * Lq + rows, mask=row_in, other=0) != 0
    d_cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_in = d_cols < D

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    diag = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(0, Lk, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_in = cols < Lk
        k_valid = tl.load(KMask + pid_b * Lk + cols, mask=col_in, other=0) != 0
        s = scale * similarity_tile(
            Qb, rows, row_in, Kb, cols, col_in, D, UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D
        )
        if not WITH_OUTPUT:
            diag += tl.sum(tl.where(rows[:, None] == cols[None, :], s, 0.0), axis=1)
        s = tl.where(k_valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no valid key yet: keep exp() finite
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if WITH_OUTPUT:
            v = _load_tile(Kb, cols, col_in, d_cols, d_in, D, UPCAST)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    has_key = l_i > 0
    lse = tl.where(has_key, m_i + tl.log(tl.where(has_key, l_i, 1.0)), 0.0)
    first_chunk = (rows * 0 + pid_d) == 0  # a block, not a scalar: the interpreter rejects scalar masks
    tl.store(Lse + pid_b * Lq + rows, lse, mask=row_in & first_chunk)
    if WITH_OUTPUT:
        out = acc / tl.where(has_key, l_i, 1.0)[:, None]
        out = tl.where(q_valid[:, None], out, 0.0)
        Ob = Out + pid_b * Lq * D
        tl.store(
            Ob + rows[:, None] * D + d_cols[None, :],
            out.to(Out.dtype.element_ty),
            mask=row_in[:, None] & d_in[None, :],
        )
    else:
        tl.store(Diag + pid_b * Lq + rows, diag, mask=row_in & first_chunk)


@triton.jit
def _score_gradient(
    Qb,
    Kb,
    dOb,
    lse,
    coef,
    rows,
    cols,
    row_grad_in,
    row_in,
    col_in,
    k_valid,
    D,
    scale,
    WITH_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Probabilities ``P`` and score gradient ``dS`` of one ``[BLOCK_M, BLOCK_N]`` tile, rebuilt from lse.

    ``WITH_GRAD`` (reconstruction): ``dS = P ∘ (dO kᵀ − delta)`` with ``coef = delta``; otherwise
    (InfoNCE): ``dS = coef ∘ P`` with ``coef`` the per-row loss gradient.
    """
    s = scale * similarity_tile(Qb, rows, row_in, Kb, cols, col_in, D, UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
    s = tl.where(k_valid[None, :], s, float("-inf"))
    p = tl.exp(s - lse[:, None])
    if WITH_GRAD:
        dp = similarity_tile(
            dOb, rows, row_grad_in, Kb, cols, col_in, D, UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D
        )
        ds = p * (dp - coef[:, None])
    else:
        ds = p * coef[:, None]
    return p, ds


@autotune(configs=_CONFIGS, key=[*_KEY, "WITH_GRAD"], dtype_arg="Q")
@triton.jit
def _token_softmax_bwd_rows(
    Q,
    K,
    dO,
    Lse,
    Coef,
    QMask,
    KMask,
    dQ,
    Lq,
    Lk,
    D,
    scale,
    WITH_GRAD: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``dQ[b, rows, chunk] = scale · Σ_j dS[:, j] k_j[chunk]``: the query-side gradient."""
    pid_m, pid_b = block_and_set(Lq, BLOCK_M)
    pid_d = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = rows < Lq
    q_valid = tl.load(QMask + pid_b * Lq + rows, mask=row_in, other=0) != 0
    lse = tl.load(Lse + pid_b * Lq + rows, mask=row_in, other=0.0)
    coef = tl.load(Coef + pid_b * Lq + rows, mask=row_in, other=0.0)
    Qb = Q + pid_b * Lq * D
    Kb = K + pid_b * Lk * D
    dOb = dO + pid_b * Lq * D
    d_cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_in = d_cols < D
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(0, Lk, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_in = cols < Lk
        k_valid = tl.load(KMask + pid_b * Lk + cols, mask=col_in, other=0) != 0
        _, ds = _score_gradient(
            Qb, Kb, dOb, lse, coef, rows, cols, row_in & q_valid, row_in, col_in, k_valid, D, scale,
            WITH_GRAD, BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, DOT_PRECISION,
        )  # fmt: skip
        k_tile = _load_tile(Kb, cols, col_in, d_cols, d_in, D, UPCAST)
        acc = tl.dot(ds.to(k_tile.dtype), k_tile, acc, input_precision=DOT_PRECISION)
    dQb = dQ + pid_b * Lq * D
    tl.store(
        dQb + rows[:, None] * D + d_cols[None, :],
        (acc * scale).to(dQ.dtype.element_ty),
        mask=row_in[:, None] & d_in[None, :],
    )


@autotune(configs=_CONFIGS, key=[*_KEY, "WITH_GRAD"], dtype_arg="Q")
@triton.jit
def _token_softmax_bwd_cols(
    Q,
    K,
    dO,
    Lse,
    Coef,
    QMask,
    KMask,
    dK,
    Lq,
    Lk,
    D,
    scale,
    WITH_GRAD: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``dK[b, cols, chunk] = Σ_i P[i, cols]ᵀ dO_i[chunk] (WITH_GRAD) + scale · Σ_i dS[i, cols]ᵀ q_i[chunk]``."""
    pid_n, pid_b = block_and_set(Lk, BLOCK_N)
    pid_d = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_in = cols < Lk
    k_valid = tl.load(KMask + pid_b * Lk + cols, mask=col_in, other=0) != 0
    Qb = Q + pid_b * Lq * D
    Kb = K + pid_b * Lk * D
    dOb = dO + pid_b * Lq * D
    d_cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_in = d_cols < D
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for m0 in range(0, Lq, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_in = rows < Lq
        q_valid = tl.load(QMask + pid_b * Lq + rows, mask=row_in, other=0) != 0
        lse = tl.load(Lse + pid_b * Lq + rows, mask=row_in, other=0.0)
        coef = tl.load(Coef + pid_b * Lq + rows, mask=row_in, other=0.0)
        p, ds = _score_gradient(
            Qb, Kb, dOb, lse, coef, rows, cols, row_in & q_valid, row_in, col_in, k_valid, D, scale,
            WITH_GRAD, BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, DOT_PRECISION,
        )  # fmt: skip
        q_tile = _load_tile(Qb, rows, row_in, d_cols, d_in, D, UPCAST)
        acc = tl.dot(tl.trans(ds * scale).to(q_tile.dtype), q_tile, acc, input_precision=DOT_PRECISION)
        if WITH_GRAD:
            do_tile = _load_tile(dOb, rows, row_in & q_valid, d_cols, d_in, D, UPCAST)
            acc = tl.dot(tl.trans(p).to(do_tile.dtype), do_tile, acc, input_precision=DOT_PRECISION)
    dKb = dK + pid_b * Lk * D
    tl.store(
        dKb + cols[:, None] * D + d_cols[None, :], acc.to(dK.dtype.element_ty), mask=col_in[:, None] & d_in[None, :]
    )


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------


def token_softmax_forward(q, k, q_mask, k_mask, scale, out):
    """Row ``lse`` of ``scale · q kᵀ`` over the valid keys of each sample, ``[B, Lq]`` fp32, and either
    the reconstruction ``softmax(scale · q kᵀ) k`` written into ``out`` (``out`` given) or the diagonal
    ``scale · ⟨q_i, k_i⟩`` (``out=None``; in-sample InfoNCE, ``Lq = Lk``), returned as ``(lse, diag)``."""
    q, k, q_mask, k_mask = dense(q, k, q_mask, k_mask)
    batch, lq, width = q.shape
    with_output = out is not None
    lse = torch.empty(batch, lq, dtype=torch.float32, device=q.device)
    diag = lse if with_output else torch.empty_like(lse)
    if with_output and not out.is_contiguous():
        raise ValueError("token_softmax_forward writes into out as a dense [B, Lq, D] array: pass a contiguous out")
    target = out if with_output else q  # unused pointer in InfoNCE mode
    grid = lambda meta: checked_grid(  # noqa: E731
        (batch * triton.cdiv(lq, meta["BLOCK_M"]), triton.cdiv(width, meta["BLOCK_D"]) if with_output else 1)
    )
    with on_device_of(q):
        _token_softmax_fwd[grid](
            q, k, target, lse, diag, q_mask, k_mask, lq, k.shape[1], width, scale,
            WITH_OUTPUT=with_output, UPCAST=upcast(q.dtype), DOT_PRECISION=dot_precision(q.dtype), **LAUNCH_OPTIONS,
        )  # fmt: skip
    return lse, diag


def token_softmax_backward(q, k, grad_out, lse, coef, q_mask, k_mask, scale):
    """``(dq, dk)`` in fp32 from the saved row ``lse`` and per-row coefficients ``coef``: the
    reconstruction's (``grad_out`` given, ``coef`` = Σ_d grad_out ∘ out) or InfoNCE's (``grad_out=None``,
    ``coef`` = the loss gradient of each row)."""
    with_grad = grad_out is not None
    grad_out = q if grad_out is None else grad_out  # unused pointer in InfoNCE mode
    q, k, grad_out, lse, coef, q_mask, k_mask = dense(q, k, grad_out, lse, coef, q_mask, k_mask)
    batch, lq, width = q.shape
    lk = k.shape[1]
    dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.empty(k.shape, dtype=torch.float32, device=q.device)
    flags = {
        "WITH_GRAD": with_grad,
        "UPCAST": upcast(q.dtype),
        "DOT_PRECISION": dot_precision(q.dtype),
        **LAUNCH_OPTIONS,
    }
    args = (q, k, grad_out, lse, coef, q_mask, k_mask)
    rows_grid = lambda meta: checked_grid(  # noqa: E731
        (batch * triton.cdiv(lq, meta["BLOCK_M"]), triton.cdiv(width, meta["BLOCK_D"]))
    )
    cols_grid = lambda meta: checked_grid(  # noqa: E731
        (batch * triton.cdiv(lk, meta["BLOCK_N"]), triton.cdiv(width, meta["BLOCK_D"]))
    )
    with on_device_of(q):
        _token_softmax_bwd_rows[rows_grid](*args, dq, lq, lk, width, scale, **flags)
        _token_softmax_bwd_cols[cols_grid](*args, dk, lq, lk, width, scale, **flags)
    return dq, dk


def compile_specs(dtype) -> list:
    """Every kernel × launch variant × autotune config, for the AOT compile check (``_aot``), with the
    pointer types the launches pass: gradients are fp32; the reconstruction's output is in the input dtype,
    and also fp32 for 16-bit inputs (the backward rebuilds it in fp32 for its row sums)."""
    ptr, stat = pointer(dtype), "*fp32"
    common = {"Lq": "i32", "Lk": "i32", "D": "i32", "scale": "fp32", "QMask": "*i1", "KMask": "*i1"}
    base = {"UPCAST": False, "DOT_PRECISION": dot_precision(dtype)}
    forwards = [("recon", True, ptr), ("lse", False, ptr)]  # InfoNCE mode passes q as its unused Out
    if dtype != torch.float32:
        forwards.append(("recon,fp32 out", True, stat))
    specs = []
    for variant, with_output, out in forwards:
        specs += autotuned_specs(
            _token_softmax_fwd,
            f"token_softmax_fwd[{variant}]",
            args={**common, "Q": ptr, "K": ptr, "Out": out, "Lse": stat, "Diag": stat},
            constexprs={**base, "WITH_OUTPUT": with_output},
            dtype=dtype,
        )
    for variant, with_grad in (("recon", True), ("lse", False)):
        for kernel, label, grad in ((_token_softmax_bwd_rows, "rows", "dQ"), (_token_softmax_bwd_cols, "cols", "dK")):
            specs += autotuned_specs(
                kernel,
                f"token_softmax_bwd_{label}[{variant}]",
                args={**common, "Q": ptr, "K": ptr, "dO": ptr, "Lse": stat, "Coef": stat, grad: stat},
                constexprs={**base, "WITH_GRAD": with_grad},
                dtype=dtype,
            )
    return specs


settle_cache_keys(globals())
