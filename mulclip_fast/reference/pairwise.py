"""Token pooling over all pairs of a batch, computed naively (docs/method.md, "Baselines", "SAP").

These materialise the full ``[Bq, Bk, Lq, Lk]`` similarity tensor (and, for top-k aggregation, the
``[Bq, Bk, M, k, d]`` gathered patches): they are the spec for the fused all-pairs ops, which never do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import check_mask, check_maxsim_options, check_positive, check_same_width, check_tokens
from .masking import accumulation_dtype, masked_mean, masked_softmax
from .tokens import _check_sap_inputs, topk_softmax_aggregate


def _check_pair_inputs(q, k, q_mask, k_mask):
    check_tokens("q", q)
    check_tokens("k", k)
    check_same_width("q", q, "k", k)
    return check_mask("q_mask", q_mask, q, "q"), check_mask("k_mask", k_mask, k, "k")


def _maxsim_one_way(sim, q_mask, k_mask):
    """``mean over valid i of max over valid j of sim[b, c, i, j]``; 0 where either side is empty."""
    if sim.shape[-1] == 0:  # no key tokens at all: every key set is empty (a zero sum keeps the graph)
        return sim.sum(dim=(2, 3))
    pair_mask = k_mask[None, :, None, :]  # [1, Bk, 1, Lk]
    best = sim.masked_fill(~pair_mask, float("-inf")).amax(dim=-1)  # [Bq, Bk, Lq]
    best = best.masked_fill(~k_mask.any(dim=1)[None, :, None], 0.0)
    return masked_mean(best, q_mask[:, None, :])


def pairwise_maxsim(
    q: torch.Tensor,
    k: torch.Tensor,
    q_mask: torch.Tensor | None = None,
    k_mask: torch.Tensor | None = None,
    bidirectional: bool = False,
    negative_slope: float | None = None,
) -> torch.Tensor:
    """Late-interaction max-sim between every query set and every key set (FILIP / FineLIP).

    ``S[b, c] = mean_{i valid} max_{j valid} f(⟨q[b,i], k[c,j]⟩)`` with ``f`` the identity, or
    ``LeakyReLU(negative_slope)`` (FineLIP uses 0.1). ``bidirectional`` adds the key→query term
    ``mean_{j valid} max_{i valid} f(⟨q[b,i], k[c,j]⟩)``.

    Args:
        q: ``[Bq, Lq, d]``; k: ``[Bk, Lk, d]``; masks ``[Bq, Lq]``, ``[Bk, Lk]`` bool or None.

    Returns:
        ``[Bq, Bk]`` in the dtype of ``q``.
    """
    q_mask, k_mask = _check_pair_inputs(q, k, q_mask, k_mask)
    negative_slope = check_maxsim_options(bidirectional, negative_slope)
    acc = accumulation_dtype(q)
    sim = torch.einsum("bid,cjd->bcij", q.to(acc), k.to(acc))  # [Bq, Bk, Lq, Lk]
    if negative_slope is not None:
        sim = F.leaky_relu(sim, negative_slope)
    scores = _maxsim_one_way(sim, q_mask, k_mask)
    if bidirectional:
        scores = scores + _maxsim_one_way(sim.permute(1, 0, 3, 2), k_mask, q_mask).T
    return scores.to(q.dtype)


def pairwise_reconstruction_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    q_mask: torch.Tensor | None = None,
    k_mask: torch.Tensor | None = None,
    tau: float = 0.07,
) -> torch.Tensor:
    """How well each key set reconstructs each query set.

    ``S[b, c] = mean_{i valid} ⟨q[b,i], Σ_j softmax_j(⟨q[b,i], k[c,j]⟩ / τ) · k[c,j]⟩`` over valid j
    (0 for an empty key set).

    Returns:
        ``[Bq, Bk]`` in the dtype of ``q``.
    """
    q_mask, k_mask = _check_pair_inputs(q, k, q_mask, k_mask)
    check_positive("tau", tau)
    acc = accumulation_dtype(q)
    sim = torch.einsum("bid,cjd->bcij", q.to(acc), k.to(acc))  # [Bq, Bk, Lq, Lk]
    p = masked_softmax(sim / tau, k_mask[None, :, None, :])
    per_token = (p * sim).sum(dim=-1)  # ⟨q_i, Σ_j p_ij k_j⟩ = Σ_j p_ij ⟨q_i, k_j⟩
    return masked_mean(per_token, q_mask[:, None, :]).to(q.dtype)


def pairwise_topk_aggregate_cosines(
    sub: torch.Tensor,
    patches: torch.Tensor,
    sub_mask: torch.Tensor | None = None,
    patch_mask: torch.Tensor | None = None,
    k: int = 1,
    tau: float = 0.07,
) -> torch.Tensor:
    """SAP over all pairs: each subcaption of each caption against each image.

    ``out[b, c, i] = ⟨sub[b,i], v̄(image c | sub[b,i])⟩`` where ``v̄`` is the normalised top-k
    softmax aggregate of :func:`topk_patch_aggregate` computed with image c's patches. With
    normalised inputs and k = 1 this is the cosine max-sim.

    Args:
        sub: ``[Bq, M, d]``; patches: ``[Bk, N, d]``; masks ``[Bq, M]``, ``[Bk, N]`` bool or None.

    Returns:
        ``[Bq, Bk, M]`` in the dtype of ``sub``; invalid subcaptions give 0.
    """
    sub_mask, patch_mask = _check_sap_inputs(sub, patches, sub_mask, patch_mask, k, tau, same_batch=False)
    acc = accumulation_dtype(sub)
    t, x = sub.to(acc), patches.to(acc)
    scores = torch.einsum("bmd,cnd->bcmn", t, x)  # [Bq, Bk, M, N]
    agg = topk_softmax_aggregate(scores, x[None, :, None], patch_mask[None, :, None, :], k, tau)
    cosines = torch.einsum("bmd,bcmd->bcm", t, agg)
    return (cosines * sub_mask[:, None, :]).to(sub.dtype)
