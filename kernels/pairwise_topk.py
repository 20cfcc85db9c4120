"""Triton kernels of the all-pairs top-k SAP logits (docs/method.md, "SAP", all-pairs; docs/kernels.md).

Rows ``r = b·M + m`` are subcaptions ``t_r`` of ``sub [Bq, M, d]``; ``x_cn`` the patches of image ``c`` in
``patches [Bk, N, d]``. For every (row, image)::

    s_n   = ⟨t_r, x_cn⟩                           over valid patches n
    S     = top-k of s (ties at the k-th value keep the lowest n); all valid n if fewer than k
    w_n   = softmax_{n∈S}(s_n / τ)
    a     = Σ_{n∈S} w_n x_cn,   ν = max(‖a‖, 1e-12),   out[b, c, m] = ⟨t_r, a⟩ / ν = Σ_n w_n s_n / ν

A program takes a ``BLOCK_R`` block of rows and one image and holds the whole ``[BLOCK_R, BLOCK_N]`` score
tile in registers (``BLOCK_N`` = N rounded up to a power of two, at most ``limits.TOPK_MAX_PATCHES``: 256 for
ViT-B/16's 196 patches). The k-th largest score of each row is found by a bitwise radix select over the
tile (32 compare-and-count passes; no sorted copy of the tile, and no power-of-two k as ``tl.topk``
needs — SAP's k = ⌈N/4⌉ = 49 is not one). The aggregate is never stored: ``⟨t, a⟩ = Σ w s`` comes from the
score tile, and ``a`` is built one ``BLOCK_D`` slice of d at a time, only for ``‖a‖`` (and ``X a`` in
backward). Forward writes the logits, ``lse`` of the selected scores and the top-k set packed 8 patches
per byte (``Bq·Bk·M·⌈N/8⌉`` bytes, 4× less than int16 indices at k = N/4).

Reductions over the patches (``a = w X``, ``d_sub = α X``) are batched dots over ``BLOCK_J``-patch
slices (``_contract_patches``): a single ``tl.dot`` with K = ``BLOCK_N`` hands every warp the whole
``[BLOCK_R, BLOCK_N]`` operand and spills registers from 256 patches on.

Backward (derivation in ``mulclip_fast.ops._torch_pairwise.topk_aggregate_cosines_backward``), with ``u = a/ν``,
``q_n = ⟨u, x_n⟩`` and upstream ``g``::

    ∂out/∂s_n = w_n (s_n − out·q_n) / (τν),   α_n = g (w_n/ν + ∂out/∂s_n),   β_n = −g w_n out / ν
    d_sub_r  = Σ_c Σ_n α_n x_cn             d_patch_cn = Σ_r α_n t_r + β_n u_rc

Two deterministic kernels (no atomics) recompute ``s``, ``w``, ``a`` and ``Xa`` from the inputs, the
packed selection and ``lse``: one owns a block of subcaption rows and a slice of images (partial sums
over image slices are added by the launcher in a fixed order), the other owns one image's patches and
loops over all subcaption rows. Each accumulates its own fp32 output rows in global memory one
``BLOCK_D`` slice at a time (read, add, write, ordered by ``tl.debug_barrier()``). Float atomics would let
one kernel serve both outputs, at the price of run-to-run differences; without a GPU to time it on,
there is no atomic variant.

Precision: IEEE fp32 ``tl.dot`` for fp32 inputs; 16-bit inputs are upcast tile by tile and multiplied
in TF32 (exact for 16-bit values; fp32 weights rounded to 11 bits).

Registers bound the patch count: each kernel holds two to three ``[16, BLOCK_N]`` fp32 tiles, which fit
at ``BLOCK_N`` = 256 (4 warps up to 64 patches, 8 at 256; at 128, 8 for fp32 and 4 for 16-bit inputs:
``_num_warps``) and spill at 512. Larger patch sets take the
chunked torch path (``mulclip_fast.ops.pairwise`` routes them there).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._aot import autotune, autotuned_specs, dot_precision, pointer, settle_cache_keys
from ._launch import LAUNCH_OPTIONS, checked_grid, dense, on_device_of, upcast
from .tiles import block_and_set, similarity_tile
from .topk_select import BLOCK_NS, score_row_block, topk_selection

# F.normalize's epsilon, as in the reference.
NORMALIZE_EPS = tl.constexpr(1e-12)


def _num_warps(block_n: int, dtype: torch.dtype) -> int:
    """Warps for a ``[16, block_n]`` tile: 4 up to 64 patches, 8 at 256 (4 spill there). At 128 patches
    the d_patches kernel spills with 4 warps in fp32 (sm_90) and with 8 in fp16/bf16 (sm_80), once the
    runtime knows its pointers aligned (compile_check)."""
    if block_n == 128:
        return 8 if dtype == torch.float32 else 4
    return 4 if block_n <= 64 else 8


def _config(num_warps: int) -> triton.Config:
    return triton.Config({"BLOCK_R": 16, "BLOCK_D": 16, "BLOCK_J": 16}, num_warps=num_warps, num_stages=1)


# Spill-free on sm_80 and sm_90 in fp32, fp16 and bf16 for every tile in BLOCK_NS (compile_check), for the
# forward and both backward kernels: one config per warp count, the same for every dtype; a launch keeps
# the one of its BLOCK_N (``_for_tile``).
_CONFIGS = [_config(4), _config(8)]


def _for_tile(config: triton.Config, named_args: dict, launch_constexprs: dict) -> bool:
    return config.num_warps == _num_warps(launch_constexprs["BLOCK_N"], named_args["T"].dtype)


@triton.jit
def _scores(
    Tb,
    Xb,
    row_ok,
    col_in,
    dim,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``s = t Xᵀ`` for a ``[BLOCK_R, BLOCK_N]`` tile. ``Tb`` points at the first row of the block and
    ``Xb`` at the first patch of the image (64-bit scalars), so the offsets within them stay int32 tiles
    (one image or row block is far below 2³¹ elements)."""
    r = tl.arange(0, BLOCK_R)
    n = tl.arange(0, BLOCK_N)
    return similarity_tile(Tb, r, row_ok, Xb, n, col_in, dim, UPCAST, DOT_PRECISION, BLOCK_R, BLOCK_N, BLOCK_D)


@triton.jit
def _load_patches(Xb, col_in, d0, dim, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """The ``[BLOCK_N, BLOCK_D]`` fp32 tile of one image's patches at feature offset ``d0``."""
    n = tl.arange(0, BLOCK_N)
    dd = d0 + tl.arange(0, BLOCK_D)
    x = tl.load(Xb + n[:, None] * dim + dd[None, :], mask=col_in[:, None] & (dd < dim)[None, :], other=0.0)
    return x.to(tl.float32)


@triton.jit
def _contract_patches(
    w, x, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr
):
    """``w x`` for ``w [BLOCK_R, BLOCK_N]`` and ``x [BLOCK_N, BLOCK_D]``: a reduction over all patches.

    One ``tl.dot`` with K = ``BLOCK_N`` would give every warp the whole ``[BLOCK_R, BLOCK_N]`` operand
    (BLOCK_N / 2 registers per thread, 128 at 256 patches). Cut into ``BLOCK_N / BLOCK_J`` slices of
    ``BLOCK_J`` patches, it becomes a batched dot whose slices spread over the warps, then a sum of the
    partial products.
    """
    SPLIT: tl.constexpr = BLOCK_N // BLOCK_J
    w_slices = tl.permute(tl.reshape(w, [BLOCK_R, SPLIT, BLOCK_J]), [1, 0, 2])
    x_slices = tl.reshape(x, [SPLIT, BLOCK_J, x.shape[1]])
    return tl.sum(tl.dot(w_slices, x_slices, input_precision=DOT_PRECISION), axis=0)


@triton.jit
def _selected_weights(s, selected, lse, inv_tau):
    """``w = exp(s/τ − lse)`` on the selected patches, 0 elsewhere."""
    return tl.where(selected, tl.exp(s * inv_tau - lse[:, None]), 0.0)


@triton.jit
def _load_selection(Sel, c, n_rows, n_bytes, rows, row_ok, cols, col_in):
    """Unpack the bits ``Sel[c, r, n // 8] >> (n % 8)`` of a ``[BLOCK_R, BLOCK_N]`` tile."""
    ptrs = Sel + (c * n_rows + rows[:, None]) * n_bytes + cols[None, :] // 8
    packed = tl.load(ptrs, mask=row_ok[:, None] & col_in[None, :], other=0).to(tl.int32)
    return ((packed >> (cols[None, :] % 8)) & 1) != 0


@autotune(_CONFIGS, key=["n_patch", "dim", "BLOCK_N"], keep=_for_tile)
@triton.jit
def _sap_forward_kernel(
    T,  # [n_rows, dim] subcaptions
    X,  # [n_k, n_patch, dim] patches
    SubMask,  # [n_rows] bool
    PatchMask,  # [n_k, n_patch] bool
    Out,  # [n_q, n_k, n_sub] out (dtype of T)
    Sel,  # [n_k, n_rows, n_bytes] uint8 out
    LSE,  # [n_k, n_rows] fp32 out
    n_rows,
    n_sub,
    n_k,
    n_patch,
    n_bytes,
    dim,
    top_k,
    inv_tau,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    row_block, c = block_and_set(n_rows, BLOCK_R)
    row0 = row_block.to(tl.int64) * BLOCK_R
    rows = row0 + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    cols = tl.arange(0, BLOCK_N)
    col_in = cols < n_patch
    col_ok = col_in & (tl.load(PatchMask + c * n_patch + cols, mask=col_in, other=0) != 0)
    Tb = T + row0 * dim
    Xb = X + c * n_patch * dim
    s = _scores(Tb, Xb, row_ok, col_in, dim, UPCAST, DOT_PRECISION, BLOCK_R, BLOCK_N, BLOCK_D)
    selected = topk_selection(s, col_ok, cols, top_k, BLOCK_R, BLOCK_N)

    # Pack 8 selection bits per byte: [BLOCK_R, BLOCK_N] -> [BLOCK_R, BLOCK_N // 8, 8] -> weighted sum.
    bits = tl.reshape(selected.to(tl.int32), [BLOCK_R, BLOCK_N // 8, 8])
    packed = tl.sum(bits << tl.arange(0, 8)[None, None, :], axis=2).to(tl.uint8)
    byte_cols = tl.arange(0, BLOCK_N // 8)
    ptrs = Sel + (c * n_rows + rows[:, None]) * n_bytes + byte_cols[None, :]
    tl.store(ptrs, packed, mask=row_ok[:, None] & (byte_cols[None, :] < n_bytes))

    # Softmax over the selected scores, shifted by their maximum.
    top = tl.max(tl.where(selected, s, float("-inf")), axis=1)
    shift = tl.where(top == float("-inf"), 0.0, top) * inv_tau
    e = tl.where(selected, tl.exp(s * inv_tau - shift[:, None]), 0.0)
    total = tl.sum(e, axis=1)
    has_any = total > 0
    total = tl.where(has_any, total, 1.0)
    w = e / total[:, None]
    lse = tl.where(has_any, shift + tl.log(total), 0.0)
    # ⟨t, a⟩ = Σ_n w_n ⟨t, x_n⟩ = Σ_n w_n s_n: no d loop over t; only ‖a‖² needs a = w X.
    t_dot_a = tl.sum(w * s, axis=1)
    norm2 = tl.zeros([BLOCK_R], tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        a = _contract_patches(  # [BLOCK_R, BLOCK_D] chunk of a
            w, _load_patches(Xb, col_in, d0, dim, BLOCK_N, BLOCK_D), DOT_PRECISION, BLOCK_R, BLOCK_N, BLOCK_J
        )
        norm2 += tl.sum(a * a, axis=1)
    norm = tl.maximum(tl.sqrt(norm2), NORMALIZE_EPS)
    sub_ok = tl.load(SubMask + rows, mask=row_ok, other=0) != 0
    out = tl.where(sub_ok, t_dot_a / norm, 0.0)

    b = rows // n_sub
    m = rows % n_sub
    tl.store(Out + (b * n_k + c) * n_sub + m, out.to(Out.dtype.element_ty), mask=row_ok)
    tl.store(LSE + c * n_rows + rows, lse, mask=row_ok)


@triton.jit
def _backward_coefficients(
    T,
    X,
    Sel,
    LSE,
    Grad,
    SubMask,
    c,
    row0,
    n_rows,
    n_sub,
    n_k,
    n_patch,
    n_bytes,
    dim,
    inv_tau,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    """Recompute the (rows ``row0 …``, image ``c``) tile; return ``(w, α, γ)`` with ``γ = −g·out/ν²``, so
    that ``β_n u = w_n γ a`` (module docstring).

    Two ``[BLOCK_R, BLOCK_N]`` tiles live through the d loop (``w`` and ``X a``): ``s`` is dropped once
    ``⟨t, a⟩ = Σ w s`` is taken, and recovered afterwards from ``w = exp(s/τ − lse)`` as
    ``s/τ = ln w + lse`` on the patches whose weight is nonzero (the only ones ``α`` needs).
    """
    rows = row0 + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    cols = tl.arange(0, BLOCK_N)
    col_in = cols < n_patch
    Xb = X + c * n_patch * dim
    s = _scores(T + row0 * dim, Xb, row_ok, col_in, dim, UPCAST, DOT_PRECISION, BLOCK_R, BLOCK_N, BLOCK_D)
    selected = _load_selection(Sel, c, n_rows, n_bytes, rows, row_ok, cols, col_in)
    lse = tl.load(LSE + c * n_rows + rows, mask=row_ok, other=0.0)
    w = _selected_weights(s, selected, lse, inv_tau)
    t_dot_a = tl.sum(w * s, axis=1)
    norm2 = tl.zeros([BLOCK_R], tl.float32)
    xa = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        x = _load_patches(Xb, col_in, d0, dim, BLOCK_N, BLOCK_D)
        a = _contract_patches(w, x, DOT_PRECISION, BLOCK_R, BLOCK_N, BLOCK_J)  # [BLOCK_R, BLOCK_D] chunk of a
        norm2 += tl.sum(a * a, axis=1)
        xa = tl.dot(a, tl.trans(x), xa, input_precision=DOT_PRECISION)
    norm = tl.maximum(tl.sqrt(norm2), NORMALIZE_EPS)
    out = t_dot_a / norm
    b = rows // n_sub
    m = rows % n_sub
    sub_ok = tl.load(SubMask + rows, mask=row_ok, other=0) != 0
    g = tl.load(Grad + (b * n_k + c) * n_sub + m, mask=row_ok & sub_ok, other=0.0).to(tl.float32)
    # α = g (w/ν + ∂out/∂s) = (g/ν) · w · (1 + s/τ − out·(X a)/(ν τ))
    positive = w > 0
    s_over_tau = tl.log(tl.where(positive, w, 1.0)) + lse[:, None]
    alpha = tl.where(positive, w * (1.0 + s_over_tau - (out * inv_tau / norm)[:, None] * xa), 0.0)
    alpha = (g / norm)[:, None] * alpha
    gamma = -g * out / (norm * norm)
    return w, alpha, gamma


@autotune(_CONFIGS, key=["n_k", "n_patch", "dim", "BLOCK_N"], reset_to_zero=["DT"], keep=_for_tile)
@triton.jit
def _sap_dsub_kernel(
    T,
    X,
    SubMask,
    Sel,
    LSE,
    Grad,  # [n_q, n_k, n_sub]
    DT,  # [n_splits, n_rows, dim] fp32 zero-initialised partial sums, one per slice of images
    n_rows,
    n_sub,
    n_k,
    n_patch,
    n_bytes,
    dim,
    images_per_split,
    inv_tau,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_R
    split = tl.program_id(1).to(tl.int64)
    r = tl.arange(0, BLOCK_R)
    row_ok = row0 + r < n_rows
    col_in = tl.arange(0, BLOCK_N) < n_patch
    DTb = DT + (split * n_rows + row0) * dim
    c_begin = split * images_per_split
    c_end = tl.minimum(c_begin + images_per_split, n_k)
    for image in range(c_begin, c_end):
        c = tl.cast(image, tl.int64)  # multiplies whole-image offsets
        _, alpha, _ = _backward_coefficients(
            T, X, Sel, LSE, Grad, SubMask, c, row0, n_rows, n_sub, n_k, n_patch, n_bytes, dim, inv_tau,
            UPCAST, DOT_PRECISION, BLOCK_R, BLOCK_N, BLOCK_D, BLOCK_J,
        )  # fmt: skip
        Xb = X + c * n_patch * dim
        for d0 in range(0, dim, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            out = DTb + r[:, None] * dim + dd[None, :]
            out_ok = row_ok[:, None] & (dd < dim)[None, :]
            x = _load_patches(Xb, col_in, d0, dim, BLOCK_N, BLOCK_D)
            acc = tl.load(out, mask=out_ok, other=0.0) + _contract_patches(
                alpha, x, DOT_PRECISION, BLOCK_R, BLOCK_N, BLOCK_J
            )
            tl.store(out, acc, mask=out_ok)
        tl.debug_barrier()  # this program's stores are visible to all its threads before the next read


@autotune(_CONFIGS, key=["n_rows", "n_patch", "dim", "BLOCK_N"], reset_to_zero=["DX"], keep=_for_tile)
@triton.jit
def _sap_dpatches_kernel(
    T,
    X,
    SubMask,
    Sel,
    LSE,
    Grad,
    DX,  # [n_k, n_patch, dim] fp32 zero-initialised
    n_rows,
    n_sub,
    n_k,
    n_patch,
    n_bytes,
    dim,
    inv_tau,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    c = tl.program_id(0).to(tl.int64)
    n = tl.arange(0, BLOCK_N)
    col_in = n < n_patch
    r = tl.arange(0, BLOCK_R)
    Xb = X + c * n_patch * dim
    DXb = DX + c * n_patch * dim
    for row0 in range(0, n_rows, BLOCK_R):  # int32: topk_aggregate_cosines_backward checks n_rows · dim < 2³¹
        row_ok = row0 + r < n_rows
        w, alpha, gamma = _backward_coefficients(
            T, X, Sel, LSE, Grad, SubMask, c, row0, n_rows, n_sub, n_k, n_patch, n_bytes, dim, inv_tau,
            UPCAST, DOT_PRECISION, BLOCK_R, BLOCK_N, BLOCK_D, BLOCK_J,
        )  # fmt: skip
        w_t = tl.trans(w)  # [BLOCK_N, BLOCK_R]
        alpha_t = tl.trans(alpha)
        for d0 in range(0, dim, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            d_ok = dd < dim
            x = _load_patches(Xb, col_in, d0, dim, BLOCK_N, BLOCK_D)
            t = tl.load(T + (row0 + r[:, None]) * dim + dd[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            a = _contract_patches(w, x, DOT_PRECISION, BLOCK_R, BLOCK_N, BLOCK_J)  # [BLOCK_R, BLOCK_D] chunk of a
            out = DXb + n[:, None] * dim + dd[None, :]
            out_ok = col_in[:, None] & d_ok[None, :]
            acc = tl.load(out, mask=out_ok, other=0.0)
            acc = tl.dot(alpha_t, t.to(tl.float32), acc, input_precision=DOT_PRECISION)
            acc = tl.dot(w_t, a * gamma[:, None], acc, input_precision=DOT_PRECISION)  # Σ_r β_rn u_r
            tl.store(out, acc, mask=out_ok)
        tl.debug_barrier()


# ----------------------------------------------------------------------------------------------------
# Launchers (same signatures as mulclip_fast.ops._torch_pairwise)
# ----------------------------------------------------------------------------------------------------


def topk_aggregate_cosines_forward(sub, patches, sub_mask, patch_mask, k: int, tau: float):
    """``(logits [Bq, Bk, M], selected uint8 [Bk, Bq·M, ⌈N/8⌉], lse fp32 [Bk, Bq·M])``."""
    sub, patches, sub_mask, patch_mask = dense(sub, patches, sub_mask, patch_mask)
    (n_q, n_sub, dim), (n_k, n_patch, _) = sub.shape, patches.shape
    n_rows, n_bytes = n_q * n_sub, (n_patch + 7) // 8
    logits = torch.zeros((n_q, n_k, n_sub), dtype=sub.dtype, device=sub.device)
    selected = torch.zeros((n_k, n_rows, n_bytes), dtype=torch.uint8, device=sub.device)
    lse = torch.zeros((n_k, n_rows), dtype=torch.float32, device=sub.device)
    if n_rows == 0 or n_k == 0:
        return logits, selected, lse

    def grid(meta):
        return checked_grid((n_k * triton.cdiv(n_rows, meta["BLOCK_R"]),))

    with on_device_of(sub):
        _sap_forward_kernel[grid](
            sub, patches, sub_mask, patch_mask, logits, selected, lse, n_rows, n_sub, n_k, n_patch, n_bytes, dim,
            min(k, n_patch), 1.0 / tau,
            UPCAST=upcast(sub.dtype), DOT_PRECISION=dot_precision(sub.dtype), BLOCK_N=score_row_block(n_patch),
            **LAUNCH_OPTIONS,
        )  # fmt: skip
    return logits, selected, lse


def _image_splits(n_row_blocks: int, n_k: int, device: torch.device) -> int:
    """Slices of images for the d_sub kernel: enough programs to fill a GPU (subcaption rows are few),
    each slice costing one fp32 ``[Bq·M, d]`` partial sum."""
    if device.type != "cuda":
        return min(n_k, 2)  # the interpreter runs programs one by one; 2 still exercises the partial sums
    programs_wanted = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_k, 16, triton.cdiv(programs_wanted, n_row_blocks)))


def topk_aggregate_cosines_backward(grad, sub, patches, sub_mask, patch_mask, tau: float, selected, lse):
    """``(d_sub, d_patches)`` in fp32; same contract as ``_torch_pairwise.topk_aggregate_cosines_backward``."""
    grad, sub, patches, sub_mask, patch_mask, selected, lse = dense(
        grad, sub, patches, sub_mask, patch_mask, selected, lse
    )
    (n_q, n_sub, dim), (n_k, n_patch, _) = sub.shape, patches.shape
    n_rows, n_bytes = n_q * n_sub, (n_patch + 7) // 8
    d_patches = torch.zeros(patches.shape, dtype=torch.float32, device=patches.device)
    if n_rows == 0 or n_k == 0:
        return torch.zeros(sub.shape, dtype=torch.float32, device=sub.device), d_patches
    if n_rows * dim >= 2**31:  # the d_patches kernel walks the subcaption rows with int32 offsets
        raise ValueError(f"the Triton SAP backward takes fewer than 2³¹ subcaption elements, got {n_rows * dim}")
    block_n = score_row_block(n_patch)
    options = {
        "UPCAST": upcast(sub.dtype),
        "DOT_PRECISION": dot_precision(sub.dtype),
        "BLOCK_N": block_n,
        **LAUNCH_OPTIONS,
    }
    config_rows = _CONFIGS[0].kwargs["BLOCK_R"]
    splits = _image_splits(triton.cdiv(n_rows, config_rows), n_k, sub.device)
    images_per_split = triton.cdiv(n_k, splits)
    splits = triton.cdiv(n_k, images_per_split)
    d_sub_parts = torch.zeros((splits, n_rows, dim), dtype=torch.float32, device=sub.device)

    def dsub_grid(meta):  # splits ≤ 16 (``_image_splits``) on axis 1
        return checked_grid((triton.cdiv(n_rows, meta["BLOCK_R"]), splits))

    with on_device_of(sub):
        _sap_dsub_kernel[dsub_grid](
            sub, patches, sub_mask, selected, lse, grad, d_sub_parts, n_rows, n_sub, n_k, n_patch, n_bytes, dim,
            images_per_split, 1.0 / tau, **options,
        )  # fmt: skip
        _sap_dpatches_kernel[checked_grid((n_k,))](
            sub, patches, sub_mask, selected, lse, grad, d_patches, n_rows, n_sub, n_k, n_patch, n_bytes, dim,
            1.0 / tau, **options,
        )  # fmt: skip
    d_sub = d_sub_parts.sum(dim=0) if splits > 1 else d_sub_parts[0]
    return d_sub.view(n_q, n_sub, dim), d_patches


def compile_specs(dtype: torch.dtype):
    """Every kernel × launch config this module uses for inputs of ``dtype`` (see ``_aot.py``): each
    patch tile in :data:`BLOCK_NS` with the config that ``_for_tile`` keeps for it."""
    ptr = pointer(dtype)
    common = {"T": ptr, "X": ptr, "SubMask": "*i1", "LSE": "*fp32"}
    sizes = {"n_rows": "i32", "n_sub": "i32", "n_k": "i32", "n_patch": "i32", "n_bytes": "i32", "dim": "i32"}
    backward = {**common, **sizes, "Sel": "*u8", "Grad": ptr, "inv_tau": "fp32"}
    specs = []
    for block_n in BLOCK_NS:
        constexprs = {"UPCAST": False, "DOT_PRECISION": dot_precision(dtype), "BLOCK_N": block_n}
        forward = autotuned_specs(
            _sap_forward_kernel,
            f"pairwise_topk_fwd[N<={block_n}]",
            {**common, **sizes, "PatchMask": "*i1", "Out": ptr, "Sel": "*u8", "top_k": "i32", "inv_tau": "fp32"},
            constexprs,
        )
        dsub = autotuned_specs(
            _sap_dsub_kernel,
            f"pairwise_topk_bwd_dsub[N<={block_n}]",
            {**backward, "DT": "*fp32", "images_per_split": "i32"},
            constexprs,
        )
        dpatches = autotuned_specs(
            _sap_dpatches_kernel,
            f"pairwise_topk_bwd_dpatches[N<={block_n}]",
            {**backward, "DX": "*fp32"},
            constexprs,
        )
        specs += [spec for spec in forward + dsub + dpatches if spec.num_warps == _num_warps(block_n, dtype)]
    return specs


settle_cache_keys(globals())
