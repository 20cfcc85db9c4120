"""Fused token pooling over all pairs of a batch: late-interaction max-sim, reconstruction scores and
top-k SAP cosines (docs/method.md, "Baselines"; docs/kernels.md, "All-pairs ops").

Public ops (same signatures as their ``mulclip_fast.reference`` twins, plus ``backend``):

- :func:`pairwise_maxsim` — FILIP / FineLIP late interaction, ``[Bq, Bk]``;
- :func:`pairwise_reconstruction_scores` — how well each key set rebuilds each query set, ``[Bq, Bk]``;
- :func:`pairwise_topk_aggregate_cosines` — SAP with every subcaption against every image, ``[Bq, Bk, M]``.

None of them materialises the quadratic tensor (``[Bq, Bk, Lq, Lk]`` similarities, ``[Bq, Bk, M, d]``
aggregates): the forward keeps per-(query set, key set, token) statistics only — arg-maxes for max-sim,
``(r, lse)`` for reconstruction, a bit-packed top-k selection and ``lse`` for SAP — and the backward
recomputes similarities tile by tile (Triton) or chunk by chunk (torch).

Each op is a ``torch.library.custom_op`` (namespace ``mulclip_fast``) with a fake implementation and an
autograd formula whose backward is a second custom op, so ``torch.compile(fullgraph=True)`` traces through
it and ``torch.library.opcheck`` holds; outputs and gradients are dense row-major whatever the inputs' layout,
fakes included (``new_empty``: ``empty_like`` would keep a permuted input's strides, which the ops, reading
contiguous copies, do not return). Backends (docs/kernels.md, "Backends"): ``triton`` launches the kernels in
``mulclip_fast.kernels.pairwise_*`` (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``), ``torch`` runs the
chunked bodies of ``_torch_pairwise``, ``reference`` calls ``mulclip_fast.reference``, ``auto`` picks
``triton`` for CUDA tensors of a kernel dtype (fp16/bf16/fp32) and ``torch`` otherwise. Both kernel
backends are deterministic (no float atomics).

Their FLOP and byte counts per call are in ``mulclip_fast.ops.costs``.
"""

from __future__ import annotations

import warnings
from types import ModuleType

import torch

from .. import reference
from ..kernels.limits import TOPK_MAX_PATCHES
from ..reference.checks import check_mask, check_maxsim_options, check_same_width, check_tokens, check_topk
from ..reference.masking import accumulation_dtype
from . import _torch_pairwise
from ._dispatch import (
    EXTENSION_DEVICES,
    check_backend_name,
    constant_temperature,
    kernel_backend,
    refuse_double_backward,
)

# Patches per image the Triton SAP kernels take (they hold [16, N] score tiles in registers).
TRITON_TOPK_MAX_PATCHES = TOPK_MAX_PATCHES


# ----------------------------------------------------------------------------------------------------
# Validation and backend choice
# ----------------------------------------------------------------------------------------------------


def _check_sets(q_name, q, k_name, k, q_mask_name, q_mask, k_mask_name, k_mask):
    """Validate two token-set batches (any batch sizes) and their masks; returns the masks (None → all valid)."""
    check_tokens(q_name, q)
    check_tokens(k_name, k)
    check_same_width(q_name, q, k_name, k)
    return check_mask(q_mask_name, q_mask, q, q_name), check_mask(k_mask_name, k_mask, k, k_name)


def _implementation(backend: str) -> ModuleType:
    """The module with the forward/backward bodies of the ops for ``backend``.

    Kernel modules are imported lazily: importing ``mulclip_fast.ops`` must not need Triton, and Triton
    reads ``TRITON_INTERPRET`` when a kernel module is first imported.
    """
    if backend in EXTENSION_DEVICES:
        from . import extension

        return extension
    if backend == "triton":
        from . import _triton_pairwise

        return _triton_pairwise
    return _torch_pairwise


def _backend_for(backend: str, x: torch.Tensor, *inputs: torch.Tensor, **limits) -> str:
    """The concrete backend for an op on ``inputs`` (``x`` first): the torch path when one of them is
    empty (no sets or no tokens), whose result is then the empty or zero one the reference gives; the
    kernels are launched on non-empty grids only."""
    concrete = kernel_backend(backend, x, **limits)  # validates the backend for these tensors first
    return "torch" if any(t.numel() == 0 for t in (x, *inputs)) else concrete


def _contiguous(*tensors):
    return [t.contiguous() for t in tensors]


# ----------------------------------------------------------------------------------------------------
# pairwise_maxsim
# ----------------------------------------------------------------------------------------------------


@torch.library.custom_op("mulclip_fast::pairwise_maxsim", mutates_args=())
def _maxsim_op(
    q: torch.Tensor,
    k: torch.Tensor,
    q_mask: torch.Tensor,
    k_mask: torch.Tensor,
    bidirectional: bool,
    negative_slope: float | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = _implementation(backend)
    q, k, q_mask, k_mask = _contiguous(q, k, q_mask, k_mask)
    val_qk, idx_qk, val_kq, idx_kq = impl.maxsim_forward(q, k, q_mask, k_mask, bidirectional, negative_slope)
    scores = _torch_pairwise.maxsim_scores(val_qk, val_kq, q_mask, k_mask, bidirectional, q.dtype)
    return scores, val_qk, idx_qk, val_kq, idx_kq


@_maxsim_op.register_fake
def _(q, k, q_mask, k_mask, bidirectional, negative_slope, backend):
    acc = accumulation_dtype(q)
    (n_q, len_q, _), (n_k, len_k, _) = q.shape, k.shape
    kq_len = len_k if bidirectional else 0
    return (
        q.new_empty((n_q, n_k)),
        q.new_empty((n_k, n_q, len_q), dtype=acc),
        q.new_empty((n_k, n_q, len_q), dtype=torch.int32),
        q.new_empty((n_q, n_k, kq_len), dtype=acc),
        q.new_empty((n_q, n_k, kq_len), dtype=torch.int32),
    )


@torch.library.custom_op("mulclip_fast::pairwise_maxsim_backward", mutates_args=())
def _maxsim_backward_op(
    grad: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    q_mask: torch.Tensor,
    k_mask: torch.Tensor,
    val_qk: torch.Tensor,
    idx_qk: torch.Tensor,
    val_kq: torch.Tensor,
    idx_kq: torch.Tensor,
    bidirectional: bool,
    negative_slope: float | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    impl = _implementation(backend)
    grad, q, k, q_mask, k_mask = _contiguous(grad, q, k, q_mask, k_mask)
    dq, dk = impl.maxsim_backward(
        grad, q, k, q_mask, k_mask, val_qk, idx_qk, val_kq, idx_kq, bidirectional, negative_slope
    )
    return dq.to(q.dtype), dk.to(k.dtype)


@_maxsim_backward_op.register_fake
def _(grad, q, k, q_mask, k_mask, val_qk, idx_qk, val_kq, idx_kq, bidirectional, negative_slope, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _maxsim_setup(ctx, inputs, output):
    q, k, q_mask, k_mask, bidirectional, negative_slope, backend = inputs
    _, val_qk, idx_qk, val_kq, idx_kq = output
    ctx.mark_non_differentiable(val_qk, idx_qk, val_kq, idx_kq)
    # no zero-filled gradients for the statistics: they would be as large as the statistics themselves
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, q_mask, k_mask, val_qk, idx_qk, val_kq, idx_kq)
    ctx.options = (bidirectional, negative_slope, backend)


def _maxsim_backward(ctx, grad, *_stat_grads):
    q, k, q_mask, k_mask, val_qk, idx_qk, val_kq, idx_kq = ctx.saved_tensors
    if grad is None:
        return None, None, None, None, None, None, None
    dq, dk = _maxsim_backward_op(grad, q, k, q_mask, k_mask, val_qk, idx_qk, val_kq, idx_kq, *ctx.options)
    return dq, dk, None, None, None, None, None


_maxsim_op.register_autograd(_maxsim_backward, setup_context=_maxsim_setup)
refuse_double_backward(_maxsim_backward_op, "pairwise_maxsim")


def pairwise_maxsim(
    q: torch.Tensor,
    k: torch.Tensor,
    q_mask: torch.Tensor | None = None,
    k_mask: torch.Tensor | None = None,
    bidirectional: bool = False,
    negative_slope: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Late-interaction max-sim between every query set and every key set, fused.

    ``S[b, c] = mean_{i valid} max_{j valid} f(⟨q[b,i], k[c,j]⟩)`` with ``f`` the identity or
    ``LeakyReLU(negative_slope)``; ``bidirectional`` adds ``mean_{j valid} max_{i valid} f(...)``. An empty
    key (query) set contributes 0. See :func:`mulclip_fast.reference.pairwise_maxsim`.

    Args:
        q: ``[Bq, Lq, d]``; k: ``[Bk, Lk, d]``; masks ``[Bq, Lq]``, ``[Bk, Lk]`` bool (True = valid) or None.
        backend: ``"auto" | "triton" | "torch" | "reference"``.

    Returns:
        ``[Bq, Bk]`` in the dtype of ``q``. Forward keeps ``O(Bq·Bk·(Lq+Lk))`` maxima and arg-maxes only.
    """
    check_backend_name(backend)
    if backend == "reference":
        return reference.pairwise_maxsim(q, k, q_mask, k_mask, bidirectional, negative_slope)
    q_mask, k_mask = _check_sets("q", q, "k", k, "q_mask", q_mask, "k_mask", k_mask)
    negative_slope = check_maxsim_options(bidirectional, negative_slope)
    scores, *_ = _maxsim_op(q, k, q_mask, k_mask, bidirectional, negative_slope, _backend_for(backend, q, k))
    return scores


# ----------------------------------------------------------------------------------------------------
# pairwise_reconstruction_scores
# ----------------------------------------------------------------------------------------------------


@torch.library.custom_op("mulclip_fast::pairwise_reconstruction_scores", mutates_args=())
def _reconstruction_op(
    q: torch.Tensor, k: torch.Tensor, q_mask: torch.Tensor, k_mask: torch.Tensor, tau: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = _implementation(backend)
    q, k, q_mask, k_mask = _contiguous(q, k, q_mask, k_mask)
    r, lse = impl.reconstruction_forward(q, k, q_mask, k_mask, tau)
    return _torch_pairwise.reconstruction_scores(r, q_mask, q.dtype), r, lse


@_reconstruction_op.register_fake
def _(q, k, q_mask, k_mask, tau, backend):
    stat_shape = (k.shape[0], q.shape[0], q.shape[1])
    acc = accumulation_dtype(q)
    return q.new_empty((q.shape[0], k.shape[0])), q.new_empty(stat_shape, dtype=acc), q.new_empty(stat_shape, dtype=acc)


@torch.library.custom_op("mulclip_fast::pairwise_reconstruction_scores_backward", mutates_args=())
def _reconstruction_backward_op(
    grad: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    q_mask: torch.Tensor,
    k_mask: torch.Tensor,
    r: torch.Tensor,
    lse: torch.Tensor,
    tau: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    impl = _implementation(backend)
    grad, q, k, q_mask, k_mask = _contiguous(grad, q, k, q_mask, k_mask)
    dq, dk = impl.reconstruction_backward(grad, q, k, q_mask, k_mask, tau, r, lse)
    return dq.to(q.dtype), dk.to(k.dtype)


@_reconstruction_backward_op.register_fake
def _(grad, q, k, q_mask, k_mask, r, lse, tau, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _reconstruction_setup(ctx, inputs, output):
    q, k, q_mask, k_mask, tau, backend = inputs
    _, r, lse = output
    ctx.mark_non_differentiable(r, lse)
    # no zero-filled gradients for the statistics: they would be as large as the statistics themselves
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, q_mask, k_mask, r, lse)
    ctx.options = (tau, backend)


def _reconstruction_backward(ctx, grad, *_stat_grads):
    q, k, q_mask, k_mask, r, lse = ctx.saved_tensors
    if grad is None:
        return None, None, None, None, None, None
    dq, dk = _reconstruction_backward_op(grad, q, k, q_mask, k_mask, r, lse, *ctx.options)
    return dq, dk, None, None, None, None


_reconstruction_op.register_autograd(_reconstruction_backward, setup_context=_reconstruction_setup)
refuse_double_backward(_reconstruction_backward_op, "pairwise_reconstruction_scores")


def pairwise_reconstruction_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    q_mask: torch.Tensor | None = None,
    k_mask: torch.Tensor | None = None,
    tau: float = 0.07,
    backend: str = "auto",
) -> torch.Tensor:
    """How well each key set reconstructs each query set, fused.

    ``S[b, c] = mean_{i valid} ⟨q[b,i], Σ_j softmax_j(⟨q[b,i], k[c,j]⟩ / τ) · k[c,j]⟩`` over valid ``j``
    (0 for an empty key set). See :func:`mulclip_fast.reference.pairwise_reconstruction_scores`.

    Returns:
        ``[Bq, Bk]`` in the dtype of ``q``. Forward keeps ``O(Bq·Bk·Lq)`` row statistics only.
    """
    check_backend_name(backend)
    if backend == "reference":
        return reference.pairwise_reconstruction_scores(q, k, q_mask, k_mask, tau)
    q_mask, k_mask = _check_sets("q", q, "k", k, "q_mask", q_mask, "k_mask", k_mask)
    tau = constant_temperature("tau", tau)
    scores, _, _ = _reconstruction_op(q, k, q_mask, k_mask, tau, _backend_for(backend, q, k))
    return scores


# ----------------------------------------------------------------------------------------------------
# pairwise_topk_aggregate_cosines
# ----------------------------------------------------------------------------------------------------


@torch.library.custom_op("mulclip_fast::pairwise_topk_aggregate_cosines", mutates_args=())
def _topk_op(
    sub: torch.Tensor,
    patches: torch.Tensor,
    sub_mask: torch.Tensor,
    patch_mask: torch.Tensor,
    k: int,
    tau: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = _implementation(backend)
    sub, patches, sub_mask, patch_mask = _contiguous(sub, patches, sub_mask, patch_mask)
    return impl.topk_aggregate_cosines_forward(sub, patches, sub_mask, patch_mask, k, tau)


@_topk_op.register_fake
def _(sub, patches, sub_mask, patch_mask, k, tau, backend):
    (n_q, n_sub, _), (n_k, n_patch, _) = sub.shape, patches.shape
    return (
        sub.new_empty((n_q, n_k, n_sub)),
        sub.new_empty((n_k, n_q * n_sub, (n_patch + 7) // 8), dtype=torch.uint8),
        sub.new_empty((n_k, n_q * n_sub), dtype=accumulation_dtype(sub)),
    )


@torch.library.custom_op("mulclip_fast::pairwise_topk_aggregate_cosines_backward", mutates_args=())
def _topk_backward_op(
    grad: torch.Tensor,
    sub: torch.Tensor,
    patches: torch.Tensor,
    sub_mask: torch.Tensor,
    patch_mask: torch.Tensor,
    selected: torch.Tensor,
    lse: torch.Tensor,
    tau: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    impl = _implementation(backend)
    grad, sub, patches, sub_mask, patch_mask = _contiguous(grad, sub, patches, sub_mask, patch_mask)
    d_sub, d_patches = impl.topk_aggregate_cosines_backward(
        grad, sub, patches, sub_mask, patch_mask, tau, selected, lse
    )
    return d_sub.to(sub.dtype), d_patches.to(patches.dtype)


@_topk_backward_op.register_fake
def _(grad, sub, patches, sub_mask, patch_mask, selected, lse, tau, backend):
    return sub.new_empty(sub.shape), patches.new_empty(patches.shape)


def _topk_setup(ctx, inputs, output):
    sub, patches, sub_mask, patch_mask, k, tau, backend = inputs
    _, selected, lse = output
    ctx.mark_non_differentiable(selected, lse)
    # no zero-filled gradients for the statistics: they would be as large as the statistics themselves
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(sub, patches, sub_mask, patch_mask, selected, lse)
    ctx.options = (tau, backend)


def _topk_backward(ctx, grad, *_stat_grads):
    sub, patches, sub_mask, patch_mask, selected, lse = ctx.saved_tensors
    if grad is None:
        return None, None, None, None, None, None, None
    d_sub, d_patches = _topk_backward_op(grad, sub, patches, sub_mask, patch_mask, selected, lse, *ctx.options)
    return d_sub, d_patches, None, None, None, None, None


_topk_op.register_autograd(_topk_backward, setup_context=_topk_setup)
refuse_double_backward(_topk_backward_op, "pairwise_topk_aggregate_cosines")


def pairwise_topk_aggregate_cosines(
    sub: torch.Tensor,
    patches: torch.Tensor,
    sub_mask: torch.Tensor | None = None,
    patch_mask: torch.Tensor | None = None,
    k: int = 1,
    tau: float = 0.07,
    backend: str = "auto",
) -> torch.Tensor:
    """SAP over all pairs, fused: each subcaption of each caption against each image.

    ``out[b, c, i] = ⟨sub[b,i], normalize(Σ_{n ∈ top-k} softmax(s / τ)_n · patches[c,n])⟩`` with
    ``s_n = ⟨sub[b,i], patches[c,n]⟩`` over valid patches; fewer than ``k`` valid patches pool all of
    them, an empty patch set or an invalid subcaption gives 0. Ties at the k-th score keep the lowest
    patch indices. See :func:`mulclip_fast.reference.pairwise_topk_aggregate_cosines`.

    Args:
        sub: ``[Bq, M, d]``; patches: ``[Bk, N, d]``; masks ``[Bq, M]``, ``[Bk, N]`` bool or None.
        k: context patches per subcaption, ``1 <= k <= N``; tau: softmax temperature (> 0).
        backend: ``"auto" | "triton" | "torch" | "reference" | "cpp" | "cuda_ext"``; the Triton kernels
            take at most :data:`TRITON_TOPK_MAX_PATCHES` patches per image (``auto`` uses the CUDA
            extension above that where it is built, else the torch path).

    Returns:
        ``[Bq, Bk, M]`` in the dtype of ``sub``. Forward keeps a bit-packed top-k set
        (``Bq·Bk·M·⌈N/8⌉`` bytes) and one log-sum-exp per (subcaption, image).
    """
    check_backend_name(backend)
    if backend == "reference":
        return reference.pairwise_topk_aggregate_cosines(sub, patches, sub_mask, patch_mask, k, tau)
    sub_mask, patch_mask = _check_sets("sub", sub, "patches", patches, "sub_mask", sub_mask, "patch_mask", patch_mask)
    check_topk(k, patches.shape[1])
    tau = constant_temperature("tau", tau)
    concrete = _backend_for(
        backend, sub, patches, n_patches=patches.shape[1], max_patches=TRITON_TOPK_MAX_PATCHES, has_extension=True
    )
    logits, _, _ = _topk_op(sub, patches, sub_mask, patch_mask, k, tau, concrete)
    return logits


def pairwise_topk_aggregate_logits(*args, **kwargs) -> torch.Tensor:
    """Deprecated name of :func:`pairwise_topk_aggregate_cosines`, kept for existing callers: the op returns
    cosines, which SAP multiplies by the logit scale itself."""
    warnings.warn(
        "pairwise_topk_aggregate_logits is deprecated: it returns cosines, not logits; "
        "call pairwise_topk_aggregate_cosines",
        DeprecationWarning,
        stacklevel=2,
    )
    return pairwise_topk_aggregate_cosines(*args, **kwargs)
