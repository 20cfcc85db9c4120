"""Batch-level losses: CLIP's symmetric InfoNCE and FineLIP's hinge loss (docs/method.md)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .checks import check_positive, check_same_batch, check_same_width, check_tokens
from .masking import accumulation_dtype, masked_mean


def clip_contrastive_loss(
    a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor | float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Symmetric InfoNCE ``L_batch(a, b)`` over the rows of a batch.

    ``S = s · a bᵀ`` and ``loss = ½ [CE(S, diag) + CE(Sᵀ, diag)]``, with ``s = logit_scale`` the
    multiplier itself (already exponentiated, as open_clip's ``ClipLoss``).

    Args:
        a, b: ``[B, d]`` L2-normalised features; row ``i`` of ``a`` is paired with row ``i`` of ``b``.
        logit_scale: positive scalar (tensor or float).
        mask: optional ``[B]`` bool, ``True`` for rows that take part; the loss is computed on the
            valid rows alone. No valid row gives ``0`` (kept in the graph).

    Returns:
        Scalar loss in float32 (float64 for float64 inputs).
    """
    check_tokens("a", a, ndim=2)
    check_tokens("b", b, ndim=2)
    check_same_width("a", a, "b", b)
    check_same_batch("a", a, "b", b)
    check_positive("logit_scale", logit_scale)
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (a.shape[0],):
            raise ValueError(f"mask must be a bool tensor of shape ({a.shape[0]},) or None")
        a, b = a[mask], b[mask]
    acc = accumulation_dtype(a)
    if a.shape[0] == 0:
        return (a.sum() + b.sum()).to(acc) * 0.0
    logits = logit_scale * (a.to(acc) @ b.to(acc).T)
    labels = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def slotwise_contrastive_loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over subcaption slots of a masked symmetric InfoNCE.

    ``logits[m, b, c]`` scores caption ``b``'s subcaption ``m`` against image ``c`` (positives on the
    diagonal). For each slot ``m``, only the samples with ``mask[b, m]`` take part, as rows and as
    columns; the slot's loss is ``½[mean_b CE_row + mean_c CE_col]``. Slots with fewer than 2 valid
    samples carry no contrast and are left out of the mean; with none left the loss is 0.
    """
    valid = mask.T  # [M, B]
    pair = valid[:, :, None] & valid[:, None, :]
    filled = logits.masked_fill(~pair, torch.finfo(logits.dtype).min)
    positives = logits.diagonal(dim1=1, dim2=2)  # [M, B]
    t2i = torch.logsumexp(filled, dim=2) - positives
    i2t = torch.logsumexp(filled, dim=1) - positives
    per_slot = 0.5 * (masked_mean(t2i, valid) + masked_mean(i2t, valid))
    used = valid.sum(dim=1) >= 2
    return (per_slot * used).sum() / used.sum().clamp(min=1)


def finelip_hinge_loss(scores: torch.Tensor, margin: float = 0.2, hardest_negative: bool = False) -> torch.Tensor:
    """FineLIP's (VSE++'s) bidirectional hinge loss on a square score matrix.

    With ``S[b, c]`` the score of caption ``b`` against image ``c`` and ``S[b, b]`` the positives::

        cost_t2i[b, c] = max(0, margin + S[b, c] - S[b, b])     c ≠ b
        cost_i2t[b, c] = max(0, margin + S[b, c] - S[c, c])     b ≠ c
        loss = (Σ cost_t2i + Σ cost_i2t) / B                    summed over negatives, mean over anchors

    With ``hardest_negative`` only the largest cost per anchor counts (VSE++'s max violation).

    Args:
        scores: ``[B, B]`` similarity matrix, rows = captions, columns = images.
        margin: hinge margin (FineLIP: 0.2).

    Returns:
        Scalar loss in float32 (float64 for float64 inputs).
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"scores must be a square [B, B] tensor, got {getattr(scores, 'shape', scores)!r}")
    if not (math.isfinite(margin) and margin >= 0):  # NaN fails the comparison: a NaN loss otherwise
        raise ValueError(f"margin must be a finite number >= 0, got {margin!r}")
    acc = accumulation_dtype(scores)
    s = scores.to(acc)
    if s.shape[0] == 0:  # an empty batch: 0 as every loss term gives (docs/method.md), not 0 / 0
        return s.sum()
    positives = s.diagonal()
    off_diagonal = ~torch.eye(s.shape[0], dtype=torch.bool, device=s.device)
    cost_t2i = (margin + s - positives[:, None]).clamp(min=0) * off_diagonal
    cost_i2t = (margin + s - positives[None, :]).clamp(min=0) * off_diagonal
    if hardest_negative:
        return (cost_t2i.amax(dim=1).sum() + cost_i2t.amax(dim=0).sum()) / s.shape[0]
    return (cost_t2i.sum() + cost_i2t.sum()) / s.shape[0]
