"""Triton kernels of the all-pairs top-k SAP logits (DESIGN §3 "SAP", all-pairs variant; §4).

Rows ``r = b·M + m`` are subcaptions ``t_r`` of ``sub [Bq, M, d]``; ``x_cn`` the patches of image ``c`` in
``patches [Bk, N, d]``. For every (row, image)::

    s_n   = ⟨t_r, x_cn⟩                           over valid patches n
    S     = top-k of s (ties at the k-th value keep the lowest n); all valid n if fewer than k
    w_n   = softmax_{n∈S}(s_n / τ)
    a     = Σ_{n∈S} w_n x_cn,   ν = max(‖a‖, 1e-12),   out[b, c, m] = ⟨t_r, a⟩ / ν

A program takes a ``BLOCK_R`` block of rows and one image, holds the whole ``[BLOCK_R, BLOCK_N]`` score
tile (``BLOCK_N`` = N rounded up to a power of two, e.g. 256 for 196 patches) in registers, finds the
k-th largest score per row with ``tl.sort`` (a bitonic sort; ``tl.topk`` needs a power-of-two k, and SAP's
k = ⌈N/4⌉ = 49 is not), and computes the aggregate as a dense ``w X`` GEMM over d chunks: the
``[Bq, Bk, M, d]`` aggregates never exist. Forward writes the logits, ``lse`` of the selected scores and
the top-k set packed 8 patches per byte (``Bq·Bk·M·⌈N/8⌉`` bytes, 4× less than int16 indices at k = N/4).

Backward (derivation in ``mulclip_fast.ops._torch_pairwise.sap_backward``), with ``u = a/ν``,
``q_n = ⟨u, x_n⟩`` and upstream ``g``::

    ∂out/∂s_n = w_n (s_n − out·q_n) / (τν),   α_n = g (w_n/ν + ∂out/∂s_n),   β_n = −g w_n out / ν
    d_sub_r  = Σ_c Σ_n α_n x_cn             d_patch_cn = Σ_r α_n t_r + β_n u_rc

Two deterministic kernels (no atomics) recompute ``s``, ``w``, ``a`` and ``Xa`` from the inputs, the
packed selection and ``lse``: one owns a block of subcaption rows and a slice of images (partial sums
over image slices are added by the launcher in a fixed order), the other owns one image's patches and
loops over all subcaption rows. Each accumulates its own fp32 output rows in global memory one
``BLOCK_D`` slice at a time (read, add, write, ordered by ``tl.debug_barrier()``).

Precision: IEEE fp32 ``tl.dot`` for fp32 inputs; 16-bit inputs are upcast tile by tile and multiplied
in TF32 (exact for 16-bit values; fp32 weights rounded to 11 bits).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._aot import autotune, autotuned_specs, dot_precision, interpreter_enabled, pointer
from .pairwise_common import DtypeConfigs

# F.normalize's epsilon, as in the reference.
NORMALIZE_EPS = tl.constexpr(1e-12)

# Score tiles are [BLOCK_R, BLOCK_N] fp32 in registers and patch tiles [BLOCK_N, BLOCK_D] in shared
# memory. 16 warps keep the forward's BLOCK_N = 256 tiles and its sort spill-free on sm_80/sm_90; the
# backward kernels still spill at BLOCK_N = 256 (see the README, "Fused ops (all pairs)").
_FORWARD = DtypeConfigs(
    fp32=[triton.Config({"BLOCK_R": 16, "BLOCK_D": 16}, num_warps=16, num_stages=1)],
    half=[triton.Config({"BLOCK_R": 16, "BLOCK_D": 16}, num_warps=16, num_stages=1)],
    pointer_arg="T",
)
_BACKWARD = DtypeConfigs(
    fp32=[triton.Config({"BLOCK_R": 16, "BLOCK_D": 32}, num_warps=8, num_stages=2)],
    half=[triton.Config({"BLOCK_R": 16, "BLOCK_D": 16}, num_warps=8, num_stages=1)],
    pointer_arg="T",
)


@triton.jit
def _scores(
    T,
    X,
    rows,
    row_ok,
    patch_rows,
    col_in,
    dim,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``s = t Xᵀ`` for a ``[BLOCK_R, BLOCK_N]`` tile, over d in ``BLOCK_D`` chunks (fp32)."""
    s = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < dim
        t = tl.load(T + rows[:, None] * dim + dd[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        x = tl.load(X + patch_rows[:, None] * dim + dd[None, :], mask=col_in[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            t = t.to(tl.float32)
            x = x.to(tl.float32)
        s = tl.dot(t, tl.trans(x), s, input_precision=DOT_PRECISION)
    return s


@triton.jit
def _aggregate_stats(
    T,
    X,
    w,
    rows,
    row_ok,
    patch_rows,
    col_in,
    dim,
    WITH_PROJECTION: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``(⟨t, a⟩, ‖a‖², X a)`` for ``a = w X``, one d chunk of ``a`` at a time (``X a`` only if asked)."""
    t_dot_a = tl.zeros([BLOCK_R], tl.float32)
    norm2 = tl.zeros([BLOCK_R], tl.float32)
    proj = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < dim
        x = tl.load(X + patch_rows[:, None] * dim + dd[None, :], mask=col_in[:, None] & d_ok[None, :], other=0.0)
        x = x.to(tl.float32)
        a = tl.dot(w, x, input_precision=DOT_PRECISION)  # [BLOCK_R, BLOCK_D]
        t = tl.load(T + rows[:, None] * dim + dd[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        t_dot_a += tl.sum(t.to(tl.float32) * a, axis=1)
        norm2 += tl.sum(a * a, axis=1)
        if WITH_PROJECTION:
            proj = tl.dot(a, tl.trans(x), proj, input_precision=DOT_PRECISION)
    return t_dot_a, norm2, proj


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


@autotune(_FORWARD.all, key=["n_patch", "dim", "BLOCK_N"], prune_configs_by=_FORWARD.prune())
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
):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    row_ok = rows < n_rows
    cols = tl.arange(0, BLOCK_N)
    col_in = cols < n_patch
    col_ok = col_in & (tl.load(PatchMask + c * n_patch + cols, mask=col_in, other=0) != 0)
    patch_rows = c * n_patch + cols
    s = _scores(T, X, rows, row_ok, patch_rows, col_in, dim, UPCAST, DOT_PRECISION, BLOCK_R, BLOCK_N, BLOCK_D)

    # Top-k: the k-th largest valid score per row; everything above it, then ties at it by lowest index.
    z = tl.where(col_ok[None, :], s, float("-inf"))
    ranked = tl.sort(z, dim=1, descending=True)
    kth = tl.max(tl.where(cols[None, :] == top_k - 1, ranked, float("-inf")), axis=1)  # -inf if < k valid
    above = z > kth[:, None]
    tied = (z == kth[:, None]) & col_ok[None, :]
    still_needed = top_k - tl.sum(above.to(tl.int32), axis=1)
    tie_rank = tl.cumsum(tied.to(tl.int32), axis=1)
    selected = above | (tied & (tie_rank <= still_needed[:, None]))

    # Softmax over the selected scores (its max is the top score, ranked[:, 0]).
    top = tl.max(tl.where(selected, s, float("-inf")), axis=1)
    shift = tl.where(top == float("-inf"), 0.0, top) * inv_tau
    e = tl.where(selected, tl.exp(s * inv_tau - shift[:, None]), 0.0)
    total = tl.sum(e, axis=1)
    has_any = total > 0
    total = tl.where(has_any, total, 1.0)
    w = e / total[:, None]
    lse = tl.where(has_any, shift + tl.log(total), 0.0)

    t_dot_a, norm2, _ = _aggregate_stats(
        T, X, w, rows, row_ok, patch_rows, col_in, dim, False, DOT_PRECISION, BLOCK_R, BLOCK_N, BLOCK_D
    )
    norm = tl.maximum(tl.sqrt(norm2), NORMALIZE_EPS)
    sub_ok = tl.load(SubMask + rows, mask=row_ok, other=0) != 0
    out = tl.where(sub_ok, t_dot_a / norm, 0.0)

    b = rows // n_sub
    m = rows % n_sub
    tl.store(Out + (b * n_k + c) * n_sub + m, out.to(Out.dtype.element_ty), mask=row_ok)
    tl.store(LSE + c * n_rows + rows, lse, mask=row_ok)
    # Pack 8 selection bits per byte: [BLOCK_R, BLOCK_N] -> [BLOCK_R, BLOCK_N // 8, 8] -> weighted sum.
    bits = tl.reshape(selected.to(tl.int32), [BLOCK_R, BLOCK_N // 8, 8])
    weights = 1 << tl.arange(0, 8)
    packed = tl.sum(bits * weights[None, None, :], axis=2).to(tl.uint8)
    byte_cols = tl.arange(0, BLOCK_N // 8)
    ptrs = Sel + (c * n_rows + rows[:, None]) * n_bytes + byte_cols[None, :]
    tl.store(ptrs, packed, mask=row_ok[:, None] & (byte_cols[None, :] < n_bytes))


@triton.jit
def _backward_coefficients(
    T,
    X,
    Sel,
    LSE,
    Grad,
    SubMask,
    c,
    rows,
    row_ok,
    cols,
    col_in,
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
):
    """Recompute one (row block, image) tile and return ``(w, α, β, ν)`` of the backward formulas."""
    patch_rows = c * n_patch + cols
    s = _scores(T, X, rows, row_ok, patch_rows, col_in, dim, UPCAST, DOT_PRECISION, BLOCK_R, BLOCK_N, BLOCK_D)
    selected = _load_selection(Sel, c, n_rows, n_bytes, rows, row_ok, cols, col_in)
    lse = tl.load(LSE + c * n_rows + rows, mask=row_ok, other=0.0)
    w = _selected_weights(s, selected, lse, inv_tau)
    t_dot_a, norm2, xa = _aggregate_stats(
        T, X, w, rows, row_ok, patch_rows, col_in, dim, True, DOT_PRECISION, BLOCK_R, BLOCK_N, BLOCK_D
    )
    norm = tl.maximum(tl.sqrt(norm2), NORMALIZE_EPS)
    out = t_dot_a / norm
    b = rows // n_sub
    m = rows % n_sub
    sub_ok = tl.load(SubMask + rows, mask=row_ok, other=0) != 0
    g = tl.load(Grad + (b * n_k + c) * n_sub + m, mask=row_ok & sub_ok, other=0.0).to(tl.float32)
    ds = w * (s - out[:, None] * (xa / norm[:, None])) * (inv_tau / norm[:, None])
    alpha = g[:, None] * (w / norm[:, None] + ds)
    beta = -(g * out / norm)[:, None] * w
    return w, alpha, beta, norm


@autotune(
    _BACKWARD.all, key=["n_k", "n_patch", "dim", "BLOCK_N"], reset_to_zero=["DT"], prune_configs_by=_BACKWARD.prune()
)
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
):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    row_ok = rows < n_rows
    cols = tl.arange(0, BLOCK_N)
    col_in = cols < n_patch
    c_begin = split * images_per_split
    c_end = tl.minimum(c_begin + images_per_split, n_k)
    for c in range(c_begin, c_end):
        _, alpha, _, _ = _backward_coefficients(
            T, X, Sel, LSE, Grad, SubMask, c, rows, row_ok, cols, col_in, n_rows, n_sub, n_k, n_patch, n_bytes, dim,
            inv_tau, UPCAST, DOT_PRECISION, BLOCK_R, BLOCK_N, BLOCK_D,
        )  # fmt: skip
        for d0 in range(0, dim, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            d_ok = dd < dim
            x = tl.load(
                X + (c * n_patch + cols[:, None]) * dim + dd[None, :], mask=col_in[:, None] & d_ok[None, :], other=0.0
            )
            out = DT + (split * n_rows + rows[:, None]) * dim + dd[None, :]
            out_ok = row_ok[:, None] & d_ok[None, :]
            acc = tl.load(out, mask=out_ok, other=0.0)
            acc = tl.dot(alpha, x.to(tl.float32), acc, input_precision=DOT_PRECISION)
            tl.store(out, acc, mask=out_ok)
        tl.debug_barrier()  # this program's stores are visible to all its threads before the next read


@autotune(
    _BACKWARD.all, key=["n_rows", "n_patch", "dim", "BLOCK_N"], reset_to_zero=["DX"], prune_configs_by=_BACKWARD.prune()
)
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
):
    c = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    col_in = cols < n_patch
    for r0 in range(0, n_rows, BLOCK_R):
        rows = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
        row_ok = rows < n_rows
        w, alpha, beta, norm = _backward_coefficients(
            T, X, Sel, LSE, Grad, SubMask, c, rows, row_ok, cols, col_in, n_rows, n_sub, n_k, n_patch, n_bytes, dim,
            inv_tau, UPCAST, DOT_PRECISION, BLOCK_R, BLOCK_N, BLOCK_D,
        )  # fmt: skip
        alpha_t = tl.trans(alpha)  # [BLOCK_N, BLOCK_R]
        beta_t = tl.trans(beta)
        for d0 in range(0, dim, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            d_ok = dd < dim
            x = tl.load(
                X + (c * n_patch + cols[:, None]) * dim + dd[None, :], mask=col_in[:, None] & d_ok[None, :], other=0.0
            ).to(tl.float32)
            t = tl.load(T + rows[:, None] * dim + dd[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            u = tl.dot(w, x, input_precision=DOT_PRECISION) / norm[:, None]  # [BLOCK_R, BLOCK_D] chunk of a/ν
            out = DX + (c * n_patch + cols[:, None]) * dim + dd[None, :]
            out_ok = col_in[:, None] & d_ok[None, :]
            acc = tl.load(out, mask=out_ok, other=0.0)
            acc = tl.dot(alpha_t, t.to(tl.float32), acc, input_precision=DOT_PRECISION)
            acc = tl.dot(beta_t, u, acc, input_precision=DOT_PRECISION)
            tl.store(out, acc, mask=out_ok)
        tl.debug_barrier()


# ----------------------------------------------------------------------------------------------------
# Launchers (same signatures as mulclip_fast.ops._torch_pairwise)
# ----------------------------------------------------------------------------------------------------


def _upcast(dtype: torch.dtype) -> bool:
    return interpreter_enabled() and dtype != torch.float32


def _block_n(n_patch: int) -> int:
    # tl.dot needs >= 16 in every dimension; byte packing needs a multiple of 8
    return max(16, triton.next_power_of_2(n_patch))


def sap_forward(sub, patches, sub_mask, patch_mask, k: int, tau: float):
    """``(logits [Bq, Bk, M], selected uint8 [Bk, Bq·M, ⌈N/8⌉], lse fp32 [Bk, Bq·M])``."""
    (n_q, n_sub, dim), (n_k, n_patch, _) = sub.shape, patches.shape
    n_rows, n_bytes = n_q * n_sub, (n_patch + 7) // 8
    logits = torch.zeros((n_q, n_k, n_sub), dtype=sub.dtype, device=sub.device)
    selected = torch.zeros((n_k, n_rows, n_bytes), dtype=torch.uint8, device=sub.device)
    lse = torch.zeros((n_k, n_rows), dtype=torch.float32, device=sub.device)
    if n_rows == 0 or n_k == 0:
        return logits, selected, lse

    def grid(meta):
        return (triton.cdiv(n_rows, meta["BLOCK_R"]), n_k)

    _sap_forward_kernel[grid](
        sub, patches, sub_mask, patch_mask, logits, selected, lse, n_rows, n_sub, n_k, n_patch, n_bytes, dim,
        min(k, n_patch), 1.0 / tau,
        UPCAST=_upcast(sub.dtype), DOT_PRECISION=dot_precision(sub.dtype), BLOCK_N=_block_n(n_patch),
    )  # fmt: skip
    return logits, selected, lse


def _image_splits(n_row_blocks: int, n_k: int, device: torch.device) -> int:
    """Slices of images for the d_sub kernel: enough programs to fill a GPU (subcaption rows are few),
    each slice costing one fp32 ``[Bq·M, d]`` partial sum."""
    if device.type != "cuda":
        return min(n_k, 2)  # the interpreter runs programs one by one; 2 still exercises the partial sums
    programs_wanted = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_k, 16, triton.cdiv(programs_wanted, n_row_blocks)))


def sap_backward(grad, sub, patches, sub_mask, patch_mask, tau: float, selected, lse):
    """``(d_sub, d_patches)`` in fp32; same contract as ``_torch_pairwise.sap_backward``."""
    (n_q, n_sub, dim), (n_k, n_patch, _) = sub.shape, patches.shape
    n_rows, n_bytes = n_q * n_sub, (n_patch + 7) // 8
    d_patches = torch.zeros(patches.shape, dtype=torch.float32, device=patches.device)
    if n_rows == 0 or n_k == 0:
        return torch.zeros(sub.shape, dtype=torch.float32, device=sub.device), d_patches
    options = {"UPCAST": _upcast(sub.dtype), "DOT_PRECISION": dot_precision(sub.dtype), "BLOCK_N": _block_n(n_patch)}
    config_rows = _BACKWARD.for_dtype(sub.dtype)[0].kwargs["BLOCK_R"]
    splits = _image_splits(triton.cdiv(n_rows, config_rows), n_k, sub.device)
    images_per_split = triton.cdiv(n_k, splits)
    splits = triton.cdiv(n_k, images_per_split)
    d_sub_parts = torch.zeros((splits, n_rows, dim), dtype=torch.float32, device=sub.device)
    lse = lse.contiguous()

    def dsub_grid(meta):
        return (triton.cdiv(n_rows, meta["BLOCK_R"]), splits)

    _sap_dsub_kernel[dsub_grid](
        sub, patches, sub_mask, selected, lse, grad, d_sub_parts, n_rows, n_sub, n_k, n_patch, n_bytes, dim,
        images_per_split, 1.0 / tau, **options,
    )  # fmt: skip
    _sap_dpatches_kernel[(n_k,)](
        sub, patches, sub_mask, selected, lse, grad, d_patches, n_rows, n_sub, n_k, n_patch, n_bytes, dim, 1.0 / tau,
        **options,
    )  # fmt: skip
    d_sub = d_sub_parts.sum(dim=0) if splits > 1 else d_sub_parts[0]
    return d_sub.view(n_q, n_sub, dim), d_patches


def compile_specs(dtype: torch.dtype):
    """Every kernel × autotune config this module launches for inputs of ``dtype`` (see ``_aot.py``);
    ``BLOCK_N`` = 256 covers ViT-B/16's 196 patches, 1024 ViT-L/14-336's 576."""
    ptr = pointer(dtype)
    common = {"T": ptr, "X": ptr, "SubMask": "*i1", "LSE": "*fp32"}
    sizes = {"n_rows": "i32", "n_sub": "i32", "n_k": "i32", "n_patch": "i32", "n_bytes": "i32", "dim": "i32"}
    specs = []
    for block_n in (256, 1024):
        constexprs = {"UPCAST": False, "DOT_PRECISION": dot_precision(dtype), "BLOCK_N": block_n}
        forward = autotuned_specs(
            _sap_forward_kernel,
            f"pairwise_topk_fwd[N<={block_n}]",
            {**common, **sizes, "PatchMask": "*i1", "Out": ptr, "Sel": "*u8", "top_k": "i32", "inv_tau": "fp32"},
            constexprs,
        )
        backward = {**common, **sizes, "Sel": "*u8", "Grad": ptr, "inv_tau": "fp32"}
        dsub = autotuned_specs(
            _sap_dsub_kernel,
            f"pairwise_topk_bwd_dsub[N<={block_n}]",
            {**backward, "DT": "*fp32", "images_per_split": "i32"},
            constexprs,
        )
        dpatches = autotuned_specs(
            _sap_dpatches_kernel, f"pairwise_topk_bwd_dpatches[N<={block_n}]", {**backward, "DX": "*fp32"}, constexprs
        )
        specs += _FORWARD.select_specs(forward, dtype) + _BACKWARD.select_specs(dsub + dpatches, dtype)
    return specs
