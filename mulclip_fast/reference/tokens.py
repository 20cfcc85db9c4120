"""Token pooling within matched image–caption pairs: WPR and SAP (docs/method.md, "WPR", "SAP").

Everything here is computed in float32 (float64 for float64 inputs) and materialises every
intermediate: this is the readable spec the fused ops are checked against, not a fast path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import (
    check_mask,
    check_positive,
    check_reduction,
    check_same_batch,
    check_same_width,
    check_tokens,
    check_topk,
)
from .masking import accumulation_dtype, masked_mean, masked_softmax


def _reconstruct(q, kv, q_mask, kv_mask, tau):
    """``softmax_row(q kvᵀ / τ) · kv`` over valid keys, zero for invalid queries; accumulation dtype."""
    p = masked_softmax(q @ kv.transpose(1, 2) / tau, kv_mask[:, None, :])  # [B, Lq, Lk]
    return (p @ kv) * q_mask[..., None]


def token_reconstruction(
    q: torch.Tensor,
    kv: torch.Tensor,
    q_mask: torch.Tensor | None = None,
    kv_mask: torch.Tensor | None = None,
    tau: float = 0.07,
) -> torch.Tensor:
    """Rebuild each query token from the key tokens of the same sample.

    ``out[b, i] = Σ_j softmax_j(⟨q[b,i], kv[b,j]⟩ / τ) · kv[b, j]`` over valid ``j``.

    Args:
        q: ``[B, Lq, d]`` query tokens; kv: ``[B, Lk, d]`` key/value tokens.
        q_mask: ``[B, Lq]`` bool or None; invalid query rows give zeros.
        kv_mask: ``[B, Lk]`` bool or None; a sample with no valid key gives zeros.
        tau: attention temperature (> 0).

    Returns:
        ``[B, Lq, d]`` in the dtype of ``q`` (not normalised).
    """
    check_tokens("q", q)
    check_tokens("kv", kv)
    check_same_width("q", q, "kv", kv)
    check_same_batch("q", q, "kv", kv)
    q_mask = check_mask("q_mask", q_mask, q, "q")
    kv_mask = check_mask("kv_mask", kv_mask, kv, "kv")
    check_positive("tau", tau)
    acc = accumulation_dtype(q)
    return _reconstruct(q.to(acc), kv.to(acc), q_mask, kv_mask, tau).to(q.dtype)


def _in_sample_infonce(x, x_rec, mask, tau):
    """``L_recon(X, X̃) = mean_j −log softmax_k(⟨x_j, x̃_k⟩ / τ)[j]`` over valid ``j, k``; ``[B]``."""
    logits = x @ x_rec.transpose(1, 2) / tau  # [B, L, L]
    filled = logits.masked_fill(~mask[:, None, :], torch.finfo(logits.dtype).min)
    nll = torch.logsumexp(filled, dim=-1) - logits.diagonal(dim1=1, dim2=2)  # [B, L]
    return masked_mean(nll, mask)


def wpr_loss(
    v_tokens: torch.Tensor,
    t_tokens: torch.Tensor,
    v_mask: torch.Tensor | None = None,
    t_mask: torch.Tensor | None = None,
    tau_attn: float = 0.07,
    tau_contrast: float = 0.07,
    reduction: str = "mean",
) -> torch.Tensor:
    """Word–patch reconstruction loss (MulCLIP's "token reconstruction alignment").

    Per sample, with ``V = v_tokens[b]`` and ``T = t_tokens[b]`` (L2-normalised calibrated tokens)::

        Ṽ = normalize(softmax_row(V Tᵀ / τa) · T)      each patch rebuilt from the words
        T̃ = normalize(softmax_row(T Vᵀ / τa) · V)      each word rebuilt from the patches
        loss[b] = L_recon(V, Ṽ) + L_recon(T, T̃)
        L_recon(X, X̃) = mean_j −log softmax_k(⟨x_j, x̃_k⟩ / τr)[j]

    Args:
        v_tokens: ``[B, P, d]``; t_tokens: ``[B, K, d]``; masks ``[B, P]``, ``[B, K]`` bool or None.
        tau_attn, tau_contrast: τa and τr (> 0).
        reduction: ``"mean"`` averages over the samples that have valid tokens on both sides;
            ``"none"`` returns ``[B]`` (0 for a sample without valid tokens on a side).

    Returns:
        Scalar (or ``[B]``) in float32 (float64 for float64 inputs).
    """
    check_positive("tau_contrast", tau_contrast)
    v, t, v_rec, t_rec, v_mask, t_mask = _checked_reconstructions(
        v_tokens, t_tokens, v_mask, t_mask, tau_attn, reduction
    )
    per_sample = _in_sample_infonce(v, v_rec, v_mask, tau_contrast) + _in_sample_infonce(t, t_rec, t_mask, tau_contrast)
    return _reduce_samples(per_sample, v_mask, t_mask, reduction)


def wpr_cosine_loss(
    v_tokens: torch.Tensor,
    t_tokens: torch.Tensor,
    v_mask: torch.Tensor | None = None,
    t_mask: torch.Tensor | None = None,
    tau_attn: float = 0.07,
    reduction: str = "mean",
) -> torch.Tensor:
    """Word–patch reconstruction, the cosine reading (``--wpr-form cosine``): each calibrated token aligned
    with its own reconstruction from the other modality, without the within-sample contrast.

    Per sample, with ``Ṽ``, ``T̃`` the reconstructions of :func:`wpr_loss`::

        loss[b] = mean_j (1 − ⟨v_j, ṽ_j⟩) + mean_k (1 − ⟨t_k, t̃_k⟩)

    Same arguments, masks and reduction as :func:`wpr_loss` (no contrast temperature); each mean runs over
    the valid tokens, and the loss lies in ``[0, 4]``.
    """
    v, t, v_rec, t_rec, v_mask, t_mask = _checked_reconstructions(
        v_tokens, t_tokens, v_mask, t_mask, tau_attn, reduction
    )
    per_sample = masked_mean(1 - (v * v_rec).sum(-1), v_mask) + masked_mean(1 - (t * t_rec).sum(-1), t_mask)
    return _reduce_samples(per_sample, v_mask, t_mask, reduction)


def _checked_reconstructions(v_tokens, t_tokens, v_mask, t_mask, tau_attn, reduction):
    """WPR's inputs checked, in the accumulation dtype, with ``Ṽ``, ``T̃`` (normalised) and explicit masks."""
    check_tokens("v_tokens", v_tokens)
    check_tokens("t_tokens", t_tokens)
    check_same_width("v_tokens", v_tokens, "t_tokens", t_tokens)
    check_same_batch("v_tokens", v_tokens, "t_tokens", t_tokens)
    v_mask = check_mask("v_mask", v_mask, v_tokens, "v_tokens")
    t_mask = check_mask("t_mask", t_mask, t_tokens, "t_tokens")
    check_positive("tau_attn", tau_attn)
    check_reduction(reduction)
    acc = accumulation_dtype(v_tokens)
    v, t = v_tokens.to(acc), t_tokens.to(acc)
    v_rec = F.normalize(_reconstruct(v, t, v_mask, t_mask, tau_attn), dim=-1)
    t_rec = F.normalize(_reconstruct(t, v, t_mask, v_mask, tau_attn), dim=-1)
    return v, t, v_rec, t_rec, v_mask, t_mask


def _reduce_samples(per_sample, v_mask, t_mask, reduction):
    """0 for a sample without valid tokens on a side; ``"mean"`` over the samples that have both."""
    has_both = v_mask.any(dim=1) & t_mask.any(dim=1)
    per_sample = per_sample * has_both
    if reduction == "none":
        return per_sample
    return per_sample.sum() / has_both.sum().clamp(min=1)


def _check_sap_inputs(sub, patches, sub_mask, patch_mask, k, tau, same_batch):
    check_tokens("sub", sub)
    check_tokens("patches", patches)
    check_same_width("sub", sub, "patches", patches)
    if same_batch:
        check_same_batch("sub", sub, "patches", patches)
    sub_mask = check_mask("sub_mask", sub_mask, sub, "sub")
    patch_mask = check_mask("patch_mask", patch_mask, patches, "patches")
    check_topk(k, patches.shape[1])
    check_positive("tau", tau)
    return sub_mask, patch_mask


def topk_softmax_aggregate(scores, keys, key_mask, k, tau):
    """Top-k over the valid keys, softmax of their scores / τ, weighted sum of their key vectors.

    Args:
        scores: ``[..., N]`` similarities of each query with the N keys.
        keys: ``[..., N, d]`` key vectors, broadcastable to ``scores``' leading dims.
        key_mask: ``[..., N]`` bool, broadcastable likewise.

    Returns:
        ``[..., d]`` normalised aggregate. Ties at the k-th score keep the lowest key indices; fewer than
        ``k`` valid keys: all valid ones are used.
    """
    key_mask = key_mask.expand(scores.shape)
    # the k largest valid scores; a stable sort breaks ties towards the lowest index (and -0.0 ties +0.0)
    values, index = scores.masked_fill(~key_mask, float("-inf")).sort(dim=-1, descending=True, stable=True)
    values, index = values[..., :k], index[..., :k]  # [..., k]
    weights = masked_softmax(values / tau, key_mask.gather(-1, index))
    lead = scores.shape[:-1]
    gathered = keys.expand(*lead, *keys.shape[-2:]).gather(
        -2, index[..., None].expand(*index.shape, keys.shape[-1])
    )  # [..., k, d]
    return F.normalize((weights[..., None] * gathered).sum(dim=-2), dim=-1)


def topk_patch_aggregate(
    sub: torch.Tensor,
    patches: torch.Tensor,
    sub_mask: torch.Tensor | None = None,
    patch_mask: torch.Tensor | None = None,
    k: int = 1,
    tau: float = 0.07,
) -> torch.Tensor:
    """SAP's context-patch aggregate for each subcaption, within its own image (matched pairing).

    For subcaption ``i`` of sample ``b`` and the visual tokens ``x_bj``::

        s_j    = ⟨sub[b,i], x_bj⟩                   over valid patches j
        S      = top-k_j(s_j)
        w_j    = softmax_{j∈S}(s_j / τ)
        out[b,i] = normalize(Σ_{j∈S} w_j x_bj)

    Args:
        sub: ``[B, M, d]`` subcaption embeddings; patches: ``[B, N, d]`` visual tokens.
        sub_mask: ``[B, M]`` bool or None; invalid subcaptions give zero rows.
        patch_mask: ``[B, N]`` bool or None. A sample with fewer than k valid patches uses all of them.
        k: number of context patches, ``1 <= k <= N``.
        tau: softmax temperature τs (> 0).

    Returns:
        ``[B, M, d]`` in the dtype of ``sub``.
    """
    sub_mask, patch_mask = _check_sap_inputs(sub, patches, sub_mask, patch_mask, k, tau, same_batch=True)
    acc = accumulation_dtype(sub)
    t, x = sub.to(acc), patches.to(acc)
    scores = t @ x.transpose(1, 2)  # [B, M, N]
    out = topk_softmax_aggregate(scores, x[:, None], patch_mask[:, None, :], k, tau)
    return (out * sub_mask[..., None]).to(sub.dtype)
