"""Fused token pooling within matched image–caption pairs: WPR reconstruction and SAP aggregation.

Public ops (same signatures as their ``mulclip_fast.reference`` twins, plus ``backend``):

- :func:`token_reconstruction` — ``softmax(q kvᵀ / τ) kv`` within each sample, ``[B, Lq, d]``;
- :func:`wpr_loss` — the whole word–patch reconstruction loss (both reconstructions, their
  normalisation and both in-sample InfoNCE terms);
- :func:`topk_patch_aggregate` — SAP's top-k softmax aggregate of patches per subcaption, ``[B, M, d]``.

Each op is a ``torch.library.custom_op`` (namespace ``mulclip_fast``) with a fake implementation and a
registered autograd formula whose backward is a second custom op, so ``torch.compile(fullgraph=True)``
traces through it and ``torch.library.opcheck`` holds. Every output and gradient is dense row-major
(``new_empty``, not ``empty_like``), whatever the inputs' layout: the kernels write dense tensors, and a fake
must declare the strides the op returns, which ``torch.compile`` asserts (tokens stored ``[L, B, d]``, as CLIP's
``permute(1, 0, 2)`` leaves them, would keep theirs under ``empty_like``). Forward saves only the inputs (and,
for the reconstruction, its output and row log-sum-exp); backward recomputes the similarities. Nothing of size
``[B, Lq, Lk]`` (WPR) or ``[B, M, k, d]`` (SAP) outlives one batch chunk (torch) or one tile (Triton).

Backends (docs/kernels.md, "Backends"): ``triton`` launches the kernels of ``mulclip_fast.kernels`` (CUDA, or CPU
tensors under ``TRITON_INTERPRET=1``); ``torch`` runs the primitives of ``_torch_matched`` on chunks of the batch;
``reference`` calls ``mulclip_fast.reference``; ``auto`` picks ``triton`` for CUDA tensors of a kernel
dtype (fp16/bf16/fp32) and ``torch`` otherwise. ``topk_patch_aggregate`` also runs on the extension of
``csrc/`` (``extension``): ``cpp`` on CPU tensors, ``cuda_ext`` on CUDA tensors, which ``auto`` picks for
patch sets beyond the Triton kernel's where it is built.
"""

from __future__ import annotations

from types import ModuleType

import torch

from .. import reference
from ..kernels.limits import TOPK_MAX_PATCHES
from ..reference.checks import (
    check_mask,
    check_reduction,
    check_same_batch,
    check_same_width,
    check_tokens,
    check_topk,
)
from ..reference.masking import accumulation_dtype
from . import _torch_matched
from ._dispatch import (
    EXTENSION_DEVICES,
    FUSED_BACKENDS,
    check_backend_name,
    constant_temperature,
    kernel_backend,
    refuse_double_backward,
)

# Bytes of temporaries one chunk of the torch backend may hold (the [c, Lq, Lk] scores and their
# companions). The batch is split so that a chunk stays under this; 24 MiB keeps chunks of a few samples
# at paper shapes, far below the reference's whole-batch tensors, with
# per-chunk overhead negligible: SAP's fused peak at the paper shape is then 1.46x its floor (the input
# gradients and the output, 26.5 MiB; docs/performance.md).
CHUNK_BYTES = 24 * 2**20
# Patches per score row the Triton top-k aggregate holds in registers; more go to the torch path under
# backend='auto' and are refused under 'triton'.
TRITON_AGGREGATE_MAX_PATCHES = TOPK_MAX_PATCHES


# ----------------------------------------------------------------------------------------------------
# Validation and backend choice
# ----------------------------------------------------------------------------------------------------


def _check_pair(q_name, q, kv_name, kv, q_mask_name, q_mask, kv_mask_name, kv_mask):
    if isinstance(q, torch.Tensor) and isinstance(kv, torch.Tensor) and q.device != kv.device:
        # before check_tokens, whose NaN scan cannot read a tensor on another (e.g. meta) device
        raise ValueError(f"{q_name} is on {q.device} but {kv_name} is on {kv.device}")
    check_tokens(q_name, q)
    check_tokens(kv_name, kv)
    check_same_width(q_name, q, kv_name, kv)
    check_same_batch(q_name, q, kv_name, kv)
    return check_mask(q_mask_name, q_mask, q, q_name), check_mask(kv_mask_name, kv_mask, kv, kv_name)


# ----------------------------------------------------------------------------------------------------
# Primitive sets and batch chunking
# ----------------------------------------------------------------------------------------------------


def _primitives(backend: str) -> ModuleType:
    """The module implementing recon/lse/topk forward and backward for ``backend`` (the extension's
    implements topk only).

    The Triton launchers are imported lazily: importing ``mulclip_fast.ops`` must not need Triton, and
    kernel modules read ``TRITON_INTERPRET`` when they are first imported.
    """
    if backend in EXTENSION_DEVICES:
        from . import extension

        return extension
    if backend == "triton":
        from . import _triton_matched

        return _triton_matched
    return _torch_matched


def _chunks(batch: int, bytes_per_sample: int, backend: str) -> list[slice]:
    """Batch slices for ``backend``: the whole batch for the fused kernels (tiles or rows bound the
    memory), else chunks whose temporaries fit :data:`CHUNK_BYTES`. An empty batch is one empty chunk."""
    # max(batch, 1): a zero step would make range() raise on an empty batch under the fused backends
    size = max(batch, 1) if backend in FUSED_BACKENDS else max(1, CHUNK_BYTES // max(1, bytes_per_sample))
    return [slice(start, min(start + size, batch)) for start in range(0, max(batch, 1), size)]


def _acc(*tensors: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
    return [t.to(dtype).contiguous() for t in tensors]


# ----------------------------------------------------------------------------------------------------
# token_reconstruction
# ----------------------------------------------------------------------------------------------------


def _recon_bytes_per_sample(lq: int, lk: int, d: int, elem: int) -> int:
    # scores, probabilities and their gradients [Lq, Lk] plus inputs/outputs in the accumulation dtype
    return elem * (4 * lq * lk + 4 * (lq + lk) * d)


@torch.library.custom_op("mulclip_fast::token_reconstruction", mutates_args=())
def _token_reconstruction_op(
    q: torch.Tensor, kv: torch.Tensor, q_mask: torch.Tensor, kv_mask: torch.Tensor, tau: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    acc = accumulation_dtype(q)
    prims = _primitives(backend)
    if backend == "triton":
        return prims.recon_forward(q, kv, q_mask, kv_mask, 1.0 / tau, q.dtype)  # the launcher makes them dense
    out = q.new_empty(q.shape)
    lse = q.new_empty(q.shape[:2], dtype=acc)
    per_sample = _recon_bytes_per_sample(q.shape[1], kv.shape[1], q.shape[2], acc.itemsize)
    for part in _chunks(q.shape[0], per_sample, backend):
        qc, kvc = _acc(q[part], kv[part], dtype=acc)
        out[part], lse[part] = prims.recon_forward(qc, kvc, q_mask[part], kv_mask[part], 1.0 / tau, q.dtype)
    return out, lse


@_token_reconstruction_op.register_fake
def _(q, kv, q_mask, kv_mask, tau, backend):
    return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=accumulation_dtype(q))


@torch.library.custom_op("mulclip_fast::token_reconstruction_backward", mutates_args=())
def _token_reconstruction_backward_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    kv: torch.Tensor,
    q_mask: torch.Tensor,
    kv_mask: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    tau: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    acc = accumulation_dtype(q)
    prims = _primitives(backend)
    if backend == "triton":
        dq, dkv = prims.recon_backward(q, kv, q_mask, kv_mask, 1.0 / tau, grad_out, out, lse)
        return dq.to(q.dtype), dkv.to(kv.dtype)
    dq, dkv = q.new_empty(q.shape), kv.new_empty(kv.shape)
    per_sample = _recon_bytes_per_sample(q.shape[1], kv.shape[1], q.shape[2], acc.itemsize)
    for part in _chunks(q.shape[0], per_sample, backend):
        qc, kvc, gc, oc = _acc(q[part], kv[part], grad_out[part], out[part], dtype=acc)
        dq[part], dkv[part] = prims.recon_backward(qc, kvc, q_mask[part], kv_mask[part], 1.0 / tau, gc, oc, lse[part])
    return dq, dkv


@_token_reconstruction_backward_op.register_fake
def _(grad_out, q, kv, q_mask, kv_mask, out, lse, tau, backend):
    return q.new_empty(q.shape), kv.new_empty(kv.shape)


def _token_reconstruction_setup(ctx, inputs, output):
    q, kv, q_mask, kv_mask, tau, backend = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, kv, q_mask, kv_mask, out, lse)
    ctx.tau, ctx.backend = tau, backend


def _token_reconstruction_backward(ctx, grad_out, _grad_lse):
    q, kv, q_mask, kv_mask, out, lse = ctx.saved_tensors
    dq, dkv = _token_reconstruction_backward_op(grad_out, q, kv, q_mask, kv_mask, out, lse, ctx.tau, ctx.backend)
    return dq, dkv, None, None, None, None


_token_reconstruction_op.register_autograd(_token_reconstruction_backward, setup_context=_token_reconstruction_setup)
refuse_double_backward(_token_reconstruction_backward_op, "token_reconstruction")


def token_reconstruction(
    q: torch.Tensor,
    kv: torch.Tensor,
    q_mask: torch.Tensor | None = None,
    kv_mask: torch.Tensor | None = None,
    tau: float = 0.07,
    backend: str = "auto",
) -> torch.Tensor:
    """Rebuild each query token from the key tokens of the same sample (fused).

    ``out[b, i] = Σ_j softmax_j(⟨q[b,i], kv[b,j]⟩ / τ) · kv[b, j]`` over valid ``j``; see
    :func:`mulclip_fast.reference.token_reconstruction`. Invalid query rows and samples without a
    valid key give zeros. Returns ``[B, Lq, d]`` in the dtype of ``q``.
    """
    check_backend_name(backend)
    if backend == "reference":
        return reference.token_reconstruction(q, kv, q_mask, kv_mask, tau)
    q_mask, kv_mask = _check_pair("q", q, "kv", kv, "q_mask", q_mask, "kv_mask", kv_mask)
    tau = constant_temperature("tau", tau)
    out, _ = _token_reconstruction_op(q, kv, q_mask, kv_mask, tau, kernel_backend(backend, q))
    return out


# ----------------------------------------------------------------------------------------------------
# wpr_loss
# ----------------------------------------------------------------------------------------------------


def _wpr_bytes_per_sample(p: int, k: int, d: int, elem: int) -> int:
    # per direction: attention scores/probabilities/gradients [P, K], InfoNCE logits [L, L], and about a
    # dozen [L, d] reconstructions, normalised copies and gradients
    return elem * (4 * p * k + 2 * (p * p + k * k) + 12 * (p + k) * d)


def _wpr_sides(v, t, v_mask, t_mask):
    """The two reconstruction directions: (tokens, their mask, the other side, its mask, their names)."""
    return ((v, v_mask, t, t_mask, ("v", "t")), (t, t_mask, v, v_mask, ("t", "v")))


def _wpr_forward(prims, v, t, v_mask, t_mask, tau_attn, tau_contrast):
    """Per-sample WPR loss ``[B]`` for one chunk (inputs in the accumulation dtype)."""
    per_sample = v.new_zeros(v.shape[0])
    for x, x_mask, y, y_mask, _ in _wpr_sides(v, t, v_mask, t_mask):
        rebuilt, _ = prims.recon_forward(x, y, x_mask, y_mask, 1.0 / tau_attn, x.dtype)
        rebuilt, _ = _torch_matched.normalize_rows(rebuilt)
        lse, diag = prims.lse_forward(x, rebuilt, x_mask, 1.0 / tau_contrast)
        count = x_mask.sum(1).clamp(min=1)
        per_sample += ((lse - diag) * x_mask).sum(1) / count
    return per_sample * (v_mask.any(1) & t_mask.any(1))


def _wpr_backward(prims, grad, v, t, v_mask, t_mask, tau_attn, tau_contrast):
    """``(dv, dt)`` for one chunk, recomputing reconstructions and row statistics from the inputs.

    Chain per direction: InfoNCE rows (``lse_backward``) → ``F.normalize`` → reconstruction softmax
    (``recon_backward``), the tokens receiving gradient both as queries/anchors and as keys/values.
    """
    grads = {"v": torch.zeros_like(v), "t": torch.zeros_like(t)}
    grad = grad * (v_mask.any(1) & t_mask.any(1))
    for x, x_mask, y, y_mask, (x_name, y_name) in _wpr_sides(v, t, v_mask, t_mask):
        rebuilt, attn_lse = prims.recon_forward(x, y, x_mask, y_mask, 1.0 / tau_attn, x.dtype)
        normalized, norm = _torch_matched.normalize_rows(rebuilt)
        lse, _ = prims.lse_forward(x, normalized, x_mask, 1.0 / tau_contrast)
        row_grad = (grad / x_mask.sum(1).clamp(min=1))[:, None] * x_mask
        dx, d_normalized = prims.lse_backward(x, normalized, x_mask, 1.0 / tau_contrast, lse, row_grad)
        d_rebuilt = _torch_matched.normalize_backward(normalized, norm, d_normalized)
        dx_query, dy = prims.recon_backward(x, y, x_mask, y_mask, 1.0 / tau_attn, d_rebuilt, rebuilt, attn_lse)
        grads[x_name] += dx + dx_query
        grads[y_name] += dy
    return grads["v"], grads["t"]


@torch.library.custom_op("mulclip_fast::wpr_loss", mutates_args=())
def _wpr_loss_op(
    v: torch.Tensor,
    t: torch.Tensor,
    v_mask: torch.Tensor,
    t_mask: torch.Tensor,
    tau_attn: float,
    tau_contrast: float,
    backend: str,
) -> torch.Tensor:
    acc = accumulation_dtype(v)
    prims = _primitives(backend)
    per_sample = v.new_empty(v.shape[0], dtype=acc)
    bytes_per_sample = _wpr_bytes_per_sample(v.shape[1], t.shape[1], v.shape[2], acc.itemsize)
    for part in _chunks(v.shape[0], bytes_per_sample, backend):
        vc, tc = _acc(v[part], t[part], dtype=acc)
        per_sample[part] = _wpr_forward(prims, vc, tc, v_mask[part], t_mask[part], tau_attn, tau_contrast)
    return per_sample


@_wpr_loss_op.register_fake
def _(v, t, v_mask, t_mask, tau_attn, tau_contrast, backend):
    return v.new_empty(v.shape[0], dtype=accumulation_dtype(v))


@torch.library.custom_op("mulclip_fast::wpr_loss_backward", mutates_args=())
def _wpr_loss_backward_op(
    grad: torch.Tensor,
    v: torch.Tensor,
    t: torch.Tensor,
    v_mask: torch.Tensor,
    t_mask: torch.Tensor,
    tau_attn: float,
    tau_contrast: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    acc = accumulation_dtype(v)
    prims = _primitives(backend)
    dv, dt = v.new_empty(v.shape), t.new_empty(t.shape)
    bytes_per_sample = _wpr_bytes_per_sample(v.shape[1], t.shape[1], v.shape[2], acc.itemsize)
    for part in _chunks(v.shape[0], bytes_per_sample, backend):
        vc, tc, gc = _acc(v[part], t[part], grad[part], dtype=acc)
        dv[part], dt[part] = _wpr_backward(prims, gc, vc, tc, v_mask[part], t_mask[part], tau_attn, tau_contrast)
    return dv, dt


@_wpr_loss_backward_op.register_fake
def _(grad, v, t, v_mask, t_mask, tau_attn, tau_contrast, backend):
    return v.new_empty(v.shape), t.new_empty(t.shape)


def _wpr_setup(ctx, inputs, output):
    v, t, v_mask, t_mask, tau_attn, tau_contrast, backend = inputs
    ctx.save_for_backward(v, t, v_mask, t_mask)
    ctx.taus, ctx.backend = (tau_attn, tau_contrast), backend


def _wpr_backward_formula(ctx, grad):
    v, t, v_mask, t_mask = ctx.saved_tensors
    dv, dt = _wpr_loss_backward_op(grad, v, t, v_mask, t_mask, *ctx.taus, ctx.backend)
    return dv, dt, None, None, None, None, None


_wpr_loss_op.register_autograd(_wpr_backward_formula, setup_context=_wpr_setup)
refuse_double_backward(_wpr_loss_backward_op, "wpr_loss")


def wpr_loss(
    v_tokens: torch.Tensor,
    t_tokens: torch.Tensor,
    v_mask: torch.Tensor | None = None,
    t_mask: torch.Tensor | None = None,
    tau_attn: float = 0.07,
    tau_contrast: float = 0.07,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """Word–patch reconstruction loss, fused; see :func:`mulclip_fast.reference.wpr_loss`.

    ``reduction="mean"`` averages over the samples with valid tokens on both sides; ``"none"`` returns
    ``[B]`` (0 for a sample without valid tokens on a side). Float32 (float64 for float64 inputs).
    """
    check_backend_name(backend)
    if backend == "reference":
        return reference.wpr_loss(v_tokens, t_tokens, v_mask, t_mask, tau_attn, tau_contrast, reduction)
    v_mask, t_mask = _check_pair("v_tokens", v_tokens, "t_tokens", t_tokens, "v_mask", v_mask, "t_mask", t_mask)
    tau_attn, tau_contrast = (
        constant_temperature("tau_attn", tau_attn),
        constant_temperature("tau_contrast", tau_contrast),
    )
    check_reduction(reduction)
    per_sample = _wpr_loss_op(
        v_tokens, t_tokens, v_mask, t_mask, tau_attn, tau_contrast, kernel_backend(backend, v_tokens)
    )
    if reduction == "none":
        return per_sample
    return per_sample.sum() / (v_mask.any(1) & t_mask.any(1)).sum().clamp(min=1)


# ----------------------------------------------------------------------------------------------------
# topk_patch_aggregate
# ----------------------------------------------------------------------------------------------------


def _topk_bytes_per_sample(m: int, n: int, d: int, elem: int) -> int:
    # scores, dense weights and their gradients [M, N], plus the inputs and outputs of one sample
    return elem * (6 * m * n + 4 * (m + n) * d)


@torch.library.custom_op("mulclip_fast::topk_patch_aggregate", mutates_args=())
def _topk_patch_aggregate_op(
    sub: torch.Tensor,
    patches: torch.Tensor,
    sub_mask: torch.Tensor,
    patch_mask: torch.Tensor,
    k: int,
    tau: float,
    backend: str,
) -> torch.Tensor:
    acc = accumulation_dtype(sub)
    prims = _primitives(backend)
    if backend in FUSED_BACKENDS:
        return prims.topk_forward(sub, patches, sub_mask, patch_mask, k, tau)  # the launchers make them dense
    out = sub.new_empty(sub.shape)
    per_sample = _topk_bytes_per_sample(sub.shape[1], patches.shape[1], sub.shape[2], acc.itemsize)
    for part in _chunks(sub.shape[0], per_sample, backend):
        sc, pc = _acc(sub[part], patches[part], dtype=acc)
        out[part] = prims.topk_forward(sc, pc, sub_mask[part], patch_mask[part], k, tau)
    return out


@_topk_patch_aggregate_op.register_fake
def _(sub, patches, sub_mask, patch_mask, k, tau, backend):
    return sub.new_empty(sub.shape)


@torch.library.custom_op("mulclip_fast::topk_patch_aggregate_backward", mutates_args=())
def _topk_patch_aggregate_backward_op(
    grad_out: torch.Tensor,
    sub: torch.Tensor,
    patches: torch.Tensor,
    sub_mask: torch.Tensor,
    patch_mask: torch.Tensor,
    k: int,
    tau: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    acc = accumulation_dtype(sub)
    prims = _primitives(backend)
    if backend in FUSED_BACKENDS:
        d_sub, d_patches = prims.topk_backward(sub, patches, sub_mask, patch_mask, k, tau, grad_out)
        return d_sub.to(sub.dtype), d_patches.to(patches.dtype)
    d_sub, d_patches = sub.new_empty(sub.shape), patches.new_empty(patches.shape)
    per_sample = _topk_bytes_per_sample(sub.shape[1], patches.shape[1], sub.shape[2], acc.itemsize)
    for part in _chunks(sub.shape[0], per_sample, backend):
        sc, pc, gc = _acc(sub[part], patches[part], grad_out[part], dtype=acc)
        d_sub[part], d_patches[part] = prims.topk_backward(sc, pc, sub_mask[part], patch_mask[part], k, tau, gc)
    return d_sub, d_patches


@_topk_patch_aggregate_backward_op.register_fake
def _(grad_out, sub, patches, sub_mask, patch_mask, k, tau, backend):
    return sub.new_empty(sub.shape), patches.new_empty(patches.shape)


def _topk_setup(ctx, inputs, output):
    sub, patches, sub_mask, patch_mask, k, tau, backend = inputs
    ctx.save_for_backward(sub, patches, sub_mask, patch_mask)
    ctx.k, ctx.tau, ctx.backend = k, tau, backend


def _topk_backward_formula(ctx, grad_out):
    sub, patches, sub_mask, patch_mask = ctx.saved_tensors
    d_sub, d_patches = _topk_patch_aggregate_backward_op(
        grad_out, sub, patches, sub_mask, patch_mask, ctx.k, ctx.tau, ctx.backend
    )
    return d_sub, d_patches, None, None, None, None, None


_topk_patch_aggregate_op.register_autograd(_topk_backward_formula, setup_context=_topk_setup)
refuse_double_backward(_topk_patch_aggregate_backward_op, "topk_patch_aggregate")


def topk_patch_aggregate(
    sub: torch.Tensor,
    patches: torch.Tensor,
    sub_mask: torch.Tensor | None = None,
    patch_mask: torch.Tensor | None = None,
    k: int = 1,
    tau: float = 0.07,
    backend: str = "auto",
) -> torch.Tensor:
    """SAP's top-k context-patch aggregate per subcaption, fused; see
    :func:`mulclip_fast.reference.topk_patch_aggregate`.

    ``out[b,i] = normalize(Σ_{j∈top-k} softmax_j(⟨sub[b,i], x_bj⟩/τ) x_bj)`` over valid patches; fewer
    than ``k`` valid patches pools all of them; invalid subcaptions give zero rows. ``[B, M, d]`` in the
    dtype of ``sub``.
    """
    check_backend_name(backend)
    if backend == "reference":
        return reference.topk_patch_aggregate(sub, patches, sub_mask, patch_mask, k, tau)
    sub_mask, patch_mask = _check_pair("sub", sub, "patches", patches, "sub_mask", sub_mask, "patch_mask", patch_mask)
    check_topk(k, patches.shape[1])
    tau = constant_temperature("tau", tau)
    concrete = kernel_backend(backend, sub, patches.shape[1], TRITON_AGGREGATE_MAX_PATCHES, has_extension=True)
    return _topk_patch_aggregate_op(sub, patches, sub_mask, patch_mask, k, tau, concrete)


__all__ = ["CHUNK_BYTES", "token_reconstruction", "topk_patch_aggregate", "wpr_loss"]
