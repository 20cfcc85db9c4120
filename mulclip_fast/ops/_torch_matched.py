"""Plain PyTorch primitives of the matched-pair ops, forward and backward by hand (docs/method.md, "WPR", "SAP").

These are the bodies of the memory-lean ``torch`` backend. ``mulclip_fast.ops.matched`` calls them on
chunks of the batch, so the ``[c, Lq, Lk]`` similarities exist for one chunk at a time, and calls the
backward ones in the backward pass, which recompute the similarities from the inputs instead of saving
them. The Triton launchers in ``mulclip_fast.kernels`` implement the same functions with the same
signatures, so the WPR composition in ``matched.py`` is written once for both.

Every primitive takes tensors already in the accumulation dtype (float32, or float64) and boolean masks
(True = valid); ``scale`` is ``1 / tau``. Names follow flash attention: ``lse`` is the row log-sum-exp of
the scaled scores over the valid keys (0 for a row without valid key), ``delta`` the row sum of
``grad_out * out``.
"""

from __future__ import annotations

import torch

# F.normalize's epsilon: the reference normalises with F.normalize(x, dim=-1).
NORMALIZE_EPS = 1e-12


def masked_scores(q: torch.Tensor, k: torch.Tensor, k_mask: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale · q kᵀ`` with ``-inf`` at invalid keys: ``[B, Lq, Lk]``."""
    s = torch.bmm(q, k.transpose(1, 2)).mul_(scale)
    return s.masked_fill_(~k_mask[:, None, :], float("-inf"))


def row_lse(s: torch.Tensor) -> torch.Tensor:
    """Log-sum-exp over the last dim, 0 for rows that are all ``-inf`` (no valid key)."""
    lse = torch.logsumexp(s, dim=-1)
    return lse.masked_fill_(torch.isinf(lse), 0.0)


def probabilities(s: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """``exp(s - lse)``: the softmax rebuilt from saved row statistics; 0 at ``-inf`` scores."""
    return s.sub_(lse[..., None]).exp_()


def recon_forward(q, kv, q_mask, kv_mask, scale, out_dtype):
    """Token reconstruction ``out = softmax(scale · q kvᵀ) kv`` (valid keys), zero for invalid queries."""
    s = masked_scores(q, kv, kv_mask, scale)
    lse = row_lse(s)
    p = probabilities(s, lse)
    out = torch.bmm(p, kv).mul_(q_mask[..., None])
    return out.to(out_dtype), lse


def recon_backward(q, kv, q_mask, kv_mask, scale, grad_out, out, lse):
    """Gradients of :func:`recon_forward` w.r.t. ``q`` and ``kv`` (values are the keys).

    With ``P`` the probabilities and ``g = grad_out`` on valid queries::

        dP = g kvᵀ,  dS = P ∘ (dP − rowsum(P ∘ dP)),  dq = scale · dS kv,  dkv = Pᵀ g + scale · dSᵀ q
    """
    del out  # the row sums of P ∘ dP are computed from P, which this path recomputes anyway
    p = probabilities(masked_scores(q, kv, kv_mask, scale), lse)
    g = grad_out * q_mask[..., None]
    dp = torch.bmm(g, kv.transpose(1, 2))
    ds = dp.sub_((dp * p).sum(-1, keepdim=True)).mul_(p)
    dq = torch.bmm(ds, kv).mul_(scale)
    dkv = torch.bmm(p.transpose(1, 2), g).add_(torch.bmm(ds.transpose(1, 2), q), alpha=scale)
    return dq, dkv


def lse_forward(x, y, mask, scale):
    """Row statistics of the in-sample InfoNCE ``logits = scale · x yᵀ`` over valid columns.

    Returns ``(lse, diag)``, both ``[B, L]``: the row log-sum-exp and the diagonal ``scale·⟨x_j, y_j⟩``;
    the per-token loss is ``lse − diag`` on valid rows.
    """
    lse = row_lse(masked_scores(x, y, mask, scale))
    diag = (x * y).sum(-1).mul_(scale)
    return lse, diag


def lse_backward(x, y, mask, scale, lse, row_grad):
    """Gradients of ``Σ_j row_grad[j] · (lse_j − diag_j)`` w.r.t. ``x`` and ``y``.

    ``d logits[j, k] = row_grad[j] · (P[j, k] − δ_jk)``, so ``dx = scale·(W y − g∘y)`` and
    ``dy = scale·(Wᵀ x − g∘x)`` with ``W = row_grad ∘ P``.
    """
    w = probabilities(masked_scores(x, y, mask, scale), lse).mul_(row_grad[..., None])
    g = row_grad[..., None]
    dx = torch.bmm(w, y).sub_(g * y).mul_(scale)
    dy = torch.bmm(w.transpose(1, 2), x).sub_(g * x).mul_(scale)
    return dx, dy


def normalize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x / max(‖x‖, eps), ‖x‖)`` over the last dim, as ``F.normalize`` computes it."""
    norm = torch.linalg.vector_norm(x, dim=-1)
    return x / norm.clamp_min(NORMALIZE_EPS)[..., None], norm


def normalize_backward(normalized: torch.Tensor, norm: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Gradient of ``F.normalize`` w.r.t. its input: ``(g − x̂·⟨x̂, g⟩) / ‖x‖``, or ``g / eps`` below eps."""
    radial = (normalized * grad).sum(-1, keepdim=True) * (norm > NORMALIZE_EPS)[..., None]
    return (grad - normalized * radial) / norm.clamp_min(NORMALIZE_EPS)[..., None]


def topk_selection(s: torch.Tensor, valid: torch.Tensor, take: int) -> torch.Tensor:
    """Boolean selection of the top-``take`` valid scores along the last dim, by the rule every backend
    shares (the Triton kernels' ``topk_select``, the reference's stable sort): exactly ``take`` entries,
    ties at the ``take``-th value broken towards the lowest index (``-0.0`` and ``+0.0`` tie, as floats
    do), masked entries never; all valid entries when fewer than ``take`` are valid. ``valid``
    broadcasts to ``s``."""
    masked = s.masked_fill(~valid, float("-inf"))
    kth = masked.topk(take, dim=-1).values[..., -1:]  # -inf when fewer than ``take`` are valid
    above = masked > kth
    tied = (masked == kth) & valid
    still_needed = take - above.sum(dim=-1, keepdim=True)
    return above | (tied & (tied.cumsum(dim=-1) <= still_needed))


def _topk_weights(sub, patches, patch_mask, k, tau):
    """Dense ``[B, M, N]`` softmax weights of each subcaption's selected patches (zeros elsewhere, and
    for rows without a valid patch)."""
    scores = masked_scores(sub, patches, patch_mask, 1.0)  # [B, M, N], -inf at invalid patches
    selected = topk_selection(scores, patch_mask[:, None, :], k)
    logits = (scores / tau).masked_fill_(~selected, float("-inf"))
    weights = torch.softmax(logits, dim=-1)
    return weights.masked_fill_(~selected.any(dim=-1, keepdim=True), 0.0)  # softmax of all -inf is NaN


def topk_forward(sub, patches, sub_mask, patch_mask, k, tau):
    """SAP aggregate ``normalize(Σ_{j∈top-k} softmax(s_j/τ) x_j)`` per subcaption, zero for invalid ones.

    The weighted sum is a product with the dense ``[B, M, N]`` weight matrix, so the ``[B, M, k, d]``
    gathered patches are never formed.
    """
    weights = _topk_weights(sub, patches, patch_mask, k, tau)
    pooled = torch.bmm(weights, patches)
    out, _ = normalize_rows(pooled)
    return out.mul_(sub_mask[..., None])


def topk_backward(sub, patches, sub_mask, patch_mask, k, tau, grad_out):
    """Gradients of :func:`topk_forward`, recomputing the selection and weights from the inputs.

    ``du`` from the normalisation, ``dw = du xᵀ``, the softmax backward ``dz = w ∘ (dw − Σ w dw)`` (zero
    off the selection, where ``w`` is), then ``ds = dz / τ``::

        dsub = ds x,   dx = Wᵀ du + dsᵀ sub
    """
    weights = _topk_weights(sub, patches, patch_mask, k, tau)
    pooled = torch.bmm(weights, patches)
    normalized, norm = normalize_rows(pooled)
    d_pooled = normalize_backward(normalized, norm, grad_out * sub_mask[..., None])
    d_weights = torch.bmm(d_pooled, patches.transpose(1, 2))  # [B, M, N]
    d_scores = weights * (d_weights - (weights * d_weights).sum(-1, keepdim=True)) / tau
    d_sub = torch.bmm(d_scores, patches)
    d_patches = torch.bmm(weights.transpose(1, 2), d_pooled).add_(torch.bmm(d_scores.transpose(1, 2), sub))
    return d_sub, d_patches
