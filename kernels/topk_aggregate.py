"""SAP's top-k softmax aggregate of patches per subcaption, fused (docs/method.md, "SAP"; docs/kernels.md).

One program owns a block of ``BLOCK_M`` subcaptions of one sample and the whole score row over the
``N ≤ BLOCK_N`` patches (``BLOCK_N`` = next power of two ≥ N, at most 256, ``limits.TOPK_MAX_PATCHES``):

1. scores ``s = sub · xᵀ`` with ``tl.dot`` over d chunks;
2. top-k on chip (``topk_select.topk_selection``, the selection rule shared with the all-pairs kernels):
   a radix select over order-preserving keys finds each row's k-th largest score, ties at it go to the
   lowest patch index, so exactly ``min(k, valid)`` patches are chosen — no sort, no ``[M, k]`` index tensor;
3. softmax over the chosen scores / τ, aggregate ``u = p x`` chunk by chunk, normalise.

Backward recomputes 1–3 from the inputs (nothing of size ``[B, M, k, d]`` or ``[B, M, N]`` is saved by
forward) and writes the probabilities ``P`` and score gradients ``dS`` (``[B, M, N]``, small) and ``du``
(``[B, M, d]``) to scratch, from which a second kernel forms ``dx = Pᵀ du + dSᵀ sub`` per patch block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._aot import CompileSpec, autotune, autotuned_specs, dot_precision, dtype_class, pointer, settle_cache_keys
from ._launch import LAUNCH_OPTIONS, checked_grid, dense, on_device_of, upcast
from .tiles import block_and_set, similarity_tile
from .topk_select import BLOCK_NS, score_row_block, topk_selection

# The whole score row of 16 subcaptions lives in registers ([16, BLOCK_N] scores, uint32 keys, probabilities
# and, in backward, their gradients). Up to limits.TOPK_MAX_PATCHES (256: ViT-B/16's 196, ViT-L/14's 256)
# this compiles without spills for sm_80/sm_90 (see compile_check); larger N takes another backend.
SUBCAPTIONS_PER_PROGRAM = 16  # tl.dot's minimum tile
BLOCK_M: tl.constexpr = tl.constexpr(SUBCAPTIONS_PER_PROGRAM)
NORMALIZE_EPS: tl.constexpr = tl.constexpr(1e-12)  # F.normalize's
# The chunk width of the score row's dot, the same in forward and backward whatever their launch BLOCK_D:
# the backward re-selects the top k from recomputed scores, and chunking the dot differently would sum in
# another order, so a near-tie at the k-th score could fall the other way and the gradient would belong to
# another selection than the forward's output. For the same reason both take scores and selection from _row_block.
SCORE_BLOCK_D: tl.constexpr = tl.constexpr(16)

# Launch settings of the row kernels, fixed rather than autotuned: the register budget, not speed, decides
# (a [BLOCK_N, BLOCK_D] patch tile and its addresses sit next to the score row). Each is the spill-free
# choice on sm_80 and sm_90 for its score row (compile_check, with the runtime's alignment hints): warps by
# BLOCK_N where one count does not fit every row width.
FWD_LAUNCH = {
    "half": {"BLOCK_D": 32, "num_warps": {256: 8}, "num_stages": 1},
    "fp32": {"BLOCK_D": 16, "num_warps": {256: 8}, "num_stages": 1},
}
BWD_LAUNCH = {
    "half": {"BLOCK_D": 16, "num_warps": {64: 8, 128: 16, 256: 8}, "num_stages": 1},
    "fp32": {"BLOCK_D": 16, "num_warps": {16: 8, 32: 16, 256: 8}, "num_stages": 1},
}


def launch_settings(table: dict, dtype, block_n: int) -> dict:
    """``BLOCK_D``, ``num_warps``, ``num_stages`` of a row kernel; ``num_warps`` maps the largest
    ``BLOCK_N`` of each range to its warp count (``{32: 16, 256: 8}``: 16 up to 32, 8 above)."""
    settings = dict(table[dtype_class(dtype)])
    settings["num_warps"] = next(w for limit, w in sorted(settings["num_warps"].items()) if block_n <= limit)
    return settings


_PATCH_CONFIGS = [
    triton.Config({"BLOCK_P": 64, "BLOCK_D": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_P": 32, "BLOCK_D": 64}, num_warps=4, num_stages=2),
]


@triton.jit
def _topk_probabilities(s, valid, cols, k, scale, BLOCK_N: tl.constexpr):
    """Softmax over the top-k valid entries of each row of ``s`` (``[BLOCK_M, BLOCK_N]``), zeros elsewhere.

    Rows with fewer than k valid entries use all of them; rows without any give zeros.
    """
    chosen = topk_selection(s, valid, cols, k, BLOCK_M, BLOCK_N)
    row_max = tl.max(tl.where(chosen, s, float("-inf")), axis=1)
    row_max = tl.where(row_max == float("-inf"), 0.0, row_max)
    e = tl.where(chosen, tl.exp((s - row_max[:, None]) * scale), 0.0)
    total = tl.sum(e, axis=1)
    return e / tl.where(total > 0, total, 1.0)[:, None]


@triton.jit
def _row_block(
    Sub, X, XMask, M, N, D, k, scale,
    BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """The opening of both row kernels, one code path so that backward re-selects exactly the top k that
    forward pooled (see ``SCORE_BLOCK_D``). Returns ``(pid_b, rows, row_in, Xb, cols, col_in, p)``: this
    program's sample and its ``BLOCK_M`` subcaption rows, the sample's patches and the score row's patch
    columns, and the top-k probabilities ``[BLOCK_M, BLOCK_N]`` of the rows' scores against those patches."""
    pid_m, pid_b = block_and_set(M, BLOCK_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = rows < M
    Subb = Sub + pid_b * M * D
    Xb = X + pid_b * N * D
    XMaskb = XMask + pid_b * N
    cols = tl.arange(0, BLOCK_N)
    col_in = cols < N
    valid = (tl.load(XMaskb + cols, mask=col_in, other=0) != 0) & col_in
    s = similarity_tile(
        Subb, rows, row_in, Xb, cols, col_in, D, UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_N, SCORE_BLOCK_D
    )  # fmt: skip
    return pid_b, rows, row_in, Xb, cols, col_in, _topk_probabilities(s, valid, cols, k, scale, BLOCK_N)


@triton.jit
def _pooled_chunk(p, Xb, cols, col_in, d0, D, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``u[:, d0:d0+BLOCK_D] = p · x[:, chunk]`` (float32) and the chunk's column indices."""
    d_cols = d0 + tl.arange(0, BLOCK_D)
    d_in = d_cols < D
    x = tl.load(Xb + cols[:, None] * D + d_cols[None, :], mask=col_in[:, None] & d_in[None, :], other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return tl.dot(p.to(x.dtype), x, input_precision=DOT_PRECISION), d_cols, d_in


@triton.jit
def _topk_aggregate_fwd(
    Sub, X, SubMask, XMask, Out, M, N, D, k, scale,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """``Out[b, i] = normalize(Σ_{j ∈ top-k} softmax_j(s_j·scale) x_j)``, zero for invalid subcaptions."""
    pid_b, rows, row_in, Xb, cols, col_in, p = _row_block(
        Sub, X, XMask, M, N, D, k, scale, BLOCK_N, UPCAST, DOT_PRECISION
    )  # fmt: skip
    sum_sq = tl.zeros([BLOCK_M], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        u, _, _ = _pooled_chunk(p, Xb, cols, col_in, d0, D, BLOCK_D, UPCAST, DOT_PRECISION)
        sum_sq += tl.sum(u * u, axis=1)
    sub_valid = tl.load(SubMask + pid_b * M + rows, mask=row_in, other=0) != 0
    factor = tl.where(sub_valid, 1.0 / tl.maximum(tl.sqrt(sum_sq), NORMALIZE_EPS), 0.0)
    Outb = Out + pid_b * M * D
    for d0 in range(0, D, BLOCK_D):  # recompute u rather than round it through Out's dtype
        u, d_cols, d_in = _pooled_chunk(p, Xb, cols, col_in, d0, D, BLOCK_D, UPCAST, DOT_PRECISION)
        out = u * factor[:, None]
        tl.store(
            Outb + rows[:, None] * D + d_cols[None, :],
            out.to(Out.dtype.element_ty),
            mask=row_in[:, None] & d_in[None, :],
        )


@triton.jit
def _topk_aggregate_bwd_rows(
    Sub, X, SubMask, XMask, G, dSub, P, dS, dU, M, N, D, k, scale,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Per subcaption: ``du`` through the normalisation, ``dp = du xᵀ``, softmax backward
    ``dS = scale · p ∘ (dp − Σ p dp)``, ``dSub = dS x``; writes ``P``, ``dS`` ``[B, M, N]`` and ``dU``."""
    pid_b, rows, row_in, Xb, cols, col_in, p = _row_block(
        Sub, X, XMask, M, N, D, k, scale, BLOCK_N, UPCAST, DOT_PRECISION
    )  # fmt: skip
    sub_valid = tl.load(SubMask + pid_b * M + rows, mask=row_in, other=0) != 0
    grad_rows = row_in & sub_valid
    Gb = G + pid_b * M * D
    # pass 1: ‖u‖² and ⟨u, g⟩
    sum_sq = tl.zeros([BLOCK_M], dtype=tl.float32)
    dot_ug = tl.zeros([BLOCK_M], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        u, d_cols, d_in = _pooled_chunk(p, Xb, cols, col_in, d0, D, BLOCK_D, UPCAST, DOT_PRECISION)
        g = tl.load(Gb + rows[:, None] * D + d_cols[None, :], mask=grad_rows[:, None] & d_in[None, :], other=0.0)
        sum_sq += tl.sum(u * u, axis=1)
        dot_ug += tl.sum(u * g.to(tl.float32), axis=1)
    # F.normalize backward: du = g / max(‖u‖, eps) − u ⟨u, g⟩ / ‖u‖³ (second term only above eps)
    norm = tl.sqrt(sum_sq)
    clamped = tl.maximum(norm, NORMALIZE_EPS)
    radial = tl.where(norm > NORMALIZE_EPS, dot_ug / clamped / clamped / clamped, 0.0)
    # pass 2: du, and dp = du · xᵀ
    dp = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    dUb = dU + pid_b * M * D
    for d0 in range(0, D, BLOCK_D):
        u, d_cols, d_in = _pooled_chunk(p, Xb, cols, col_in, d0, D, BLOCK_D, UPCAST, DOT_PRECISION)
        g = tl.load(Gb + rows[:, None] * D + d_cols[None, :], mask=grad_rows[:, None] & d_in[None, :], other=0.0)
        du = g.to(tl.float32) / clamped[:, None] - u * radial[:, None]
        tl.store(dUb + rows[:, None] * D + d_cols[None, :], du, mask=row_in[:, None] & d_in[None, :])
        x = tl.load(Xb + cols[:, None] * D + d_cols[None, :], mask=col_in[:, None] & d_in[None, :], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
        dp = tl.dot(du.to(x.dtype), tl.trans(x), dp, input_precision=DOT_PRECISION)
    ds = p * (dp - tl.sum(p * dp, axis=1)[:, None]) * scale
    tile = pid_b * M * N + rows[:, None] * N + cols[None, :]
    tile_in = row_in[:, None] & col_in[None, :]
    tl.store(P + tile, p, mask=tile_in)
    tl.store(dS + tile, ds, mask=tile_in)
    # pass 3: dSub = dS · x
    dSubb = dSub + pid_b * M * D
    for d0 in range(0, D, BLOCK_D):
        d_sub, d_cols, d_in = _pooled_chunk(ds, Xb, cols, col_in, d0, D, BLOCK_D, UPCAST, DOT_PRECISION)
        tl.store(
            dSubb + rows[:, None] * D + d_cols[None, :],
            d_sub.to(dSub.dtype.element_ty),
            mask=row_in[:, None] & d_in[None, :],
        )


@autotune(configs=_PATCH_CONFIGS, key=["M", "N", "D"])
@triton.jit
def _topk_aggregate_bwd_patches(
    Sub, P, dS, dU, dX, M, N, D,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """``dX[b, patches, chunk] = Σ_i P[i, patches]ᵀ du_i[chunk] + dS[i, patches]ᵀ sub_i[chunk]`` (IEEE fp32)."""
    pid_p, pid_b = block_and_set(N, BLOCK_P)
    pid_d = tl.program_id(1)
    patches = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    patch_in = patches < N
    d_cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_in = d_cols < D
    acc = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_in = rows < M
        tile = pid_b * M * N + rows[:, None] * N + patches[None, :]
        tile_in = row_in[:, None] & patch_in[None, :]
        p = tl.load(P + tile, mask=tile_in, other=0.0)
        ds = tl.load(dS + tile, mask=tile_in, other=0.0)
        chunk = pid_b * M * D + rows[:, None] * D + d_cols[None, :]
        chunk_in = row_in[:, None] & d_in[None, :]
        du = tl.load(dU + chunk, mask=chunk_in, other=0.0)
        sub = tl.load(Sub + chunk, mask=chunk_in, other=0.0).to(tl.float32)
        acc = tl.dot(tl.trans(p), du, acc, input_precision="ieee")
        acc = tl.dot(tl.trans(ds), sub, acc, input_precision="ieee")
    out = dX + pid_b * N * D + patches[:, None] * D + d_cols[None, :]
    tl.store(out, acc.to(dX.dtype.element_ty), mask=patch_in[:, None] & d_in[None, :])


def topk_aggregate_forward(sub, patches, sub_mask, patch_mask, k, tau):
    """``[B, M, d]`` aggregates in ``sub``'s dtype (the module docstring's forward)."""
    sub, patches, sub_mask, patch_mask = dense(sub, patches, sub_mask, patch_mask)
    batch, m, width = sub.shape
    n = patches.shape[1]
    out = torch.empty_like(sub)
    grid = checked_grid((batch * triton.cdiv(m, SUBCAPTIONS_PER_PROGRAM),))
    block_n = score_row_block(n)
    with on_device_of(sub):
        _topk_aggregate_fwd[grid](
            sub, patches, sub_mask, patch_mask, out, m, n, width, k, 1.0 / tau,
            BLOCK_N=block_n, UPCAST=upcast(sub.dtype), DOT_PRECISION=dot_precision(sub.dtype),
            **launch_settings(FWD_LAUNCH, sub.dtype, block_n), **LAUNCH_OPTIONS,
        )  # fmt: skip
    return out


def topk_aggregate_backward(sub, patches, sub_mask, patch_mask, k, tau, grad_out):
    """``(d_sub, d_patches)`` in the inputs' dtypes, recomputed from the inputs."""
    sub, patches, sub_mask, patch_mask, grad_out = dense(sub, patches, sub_mask, patch_mask, grad_out)
    batch, m, width = sub.shape
    n = patches.shape[1]
    f32 = {"dtype": torch.float32, "device": sub.device}
    probs, d_scores = torch.empty(batch, m, n, **f32), torch.empty(batch, m, n, **f32)
    d_pooled = torch.empty(batch, m, width, **f32)
    d_sub, d_patches = torch.empty_like(sub), torch.empty_like(patches)
    rows_grid = checked_grid((batch * triton.cdiv(m, SUBCAPTIONS_PER_PROGRAM),))

    def patches_grid(meta):
        return checked_grid((batch * triton.cdiv(n, meta["BLOCK_P"]), triton.cdiv(width, meta["BLOCK_D"])))

    block_n = score_row_block(n)
    with on_device_of(sub):
        _topk_aggregate_bwd_rows[rows_grid](
            sub, patches, sub_mask, patch_mask, grad_out, d_sub, probs, d_scores, d_pooled, m, n, width, k,
            1.0 / tau, BLOCK_N=block_n, UPCAST=upcast(sub.dtype), DOT_PRECISION=dot_precision(sub.dtype),
            **launch_settings(BWD_LAUNCH, sub.dtype, block_n), **LAUNCH_OPTIONS,
        )  # fmt: skip
        _topk_aggregate_bwd_patches[patches_grid](
            sub, probs, d_scores, d_pooled, d_patches, m, n, width, **LAUNCH_OPTIONS
        )
    return d_sub, d_patches


def _fixed_specs(kernel, name, args, constexprs, launch) -> list[CompileSpec]:
    """The single launch of a kernel that is not autotuned, as a compile spec."""
    values = {**constexprs, "BLOCK_D": launch["BLOCK_D"]}
    signature = {arg: "constexpr" if arg in values else args[arg] for arg in kernel.arg_names}
    config = f"BLOCK_D={launch['BLOCK_D']},w{launch['num_warps']},s{launch['num_stages']}"
    return [CompileSpec(name, kernel, signature, values, launch["num_warps"], launch["num_stages"], config)]


def compile_specs(dtype) -> list[CompileSpec]:
    """Every kernel × launch, the row kernels at every score row a launch can pick (:data:`BLOCK_NS`)."""
    ptr = pointer(dtype)
    scalars = {"M": "i32", "N": "i32", "D": "i32", "k": "i32", "scale": "fp32", "SubMask": "*i1", "XMask": "*i1"}
    base = {"UPCAST": False, "DOT_PRECISION": dot_precision(dtype)}
    specs = []
    for block_n in BLOCK_NS:
        constexprs = {**base, "BLOCK_N": block_n}
        specs += _fixed_specs(
            _topk_aggregate_fwd,
            f"topk_aggregate_fwd[N<={block_n}]",
            {**scalars, "Sub": ptr, "X": ptr, "Out": ptr},
            constexprs,
            launch_settings(FWD_LAUNCH, dtype, block_n),
        )
        specs += _fixed_specs(
            _topk_aggregate_bwd_rows,
            f"topk_aggregate_bwd_rows[N<={block_n}]",
            {**scalars, "Sub": ptr, "X": ptr, "G": ptr, "dSub": ptr, "P": "*fp32", "dS": "*fp32", "dU": "*fp32"},
            constexprs,
            launch_settings(BWD_LAUNCH, dtype, block_n),
        )
    specs += autotuned_specs(
        _topk_aggregate_bwd_patches,
        "topk_aggregate_bwd_patches",
        args={"M": "i32", "N": "i32", "D": "i32", "Sub": ptr, "P": "*fp32", "dS": "*fp32", "dU": "*fp32", "dX": ptr},
        constexprs={},
    )
    return specs


settle_cache_keys(globals())
