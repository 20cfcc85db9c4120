"""MulCLIP's loss terms, each written once, on a rank's rows against the gathered columns.

This is the one implementation behind ``MulCLIPLoss`` (one process), ``DistributedMulCLIPLoss``
(``torchrun`` training) and the open_clip / Hugging Face adapter ``MulCLIPClipLoss``. It follows
open_clip's local-loss / gather-with-grad pattern: a rank gathers the *columns* (every rank's features,
:class:`mulclip_fast.distributed.BatchSharding`) and scores its *rows* against them. One process is world
size 1 of the same code: the rows are the columns and the offset is 0.

Semantics (the same everywhere):

- Every term is a sum of per-row losses divided by a *global* count — the global batch size N for the
  InfoNCE and FineLIP terms, the number of valid samples of each subcaption slot for SAP, the number of
  samples with both token sets for WPR. A rank's *share* is the sum over the rows it scores divided by
  that global count, so the shares of the ranks add up to the global loss exactly, whatever the masks:

      L = Σ_r share_r,     share_r = Σ_{rows i of rank r} loss_i / global count

- A rank that scores only its own rows returns ``world_size · share_r`` for each term: the mean over ranks
  is the global loss. ``DistributedDataParallel`` averages gradients over ranks and the all-gather's
  backward sums, over ranks, the gradients sent to each rank's features, so the averaged gradient is the
  gradient of the global loss: N processes give the loss and gradients of one process on the global batch.
  Without ``local_loss`` every rank scores every row (open_clip's default) and returns the global loss
  itself; the same argument holds. Without ``gather_with_grad`` as well (open_clip's default gather) each
  rank back-propagates that loss through its own features only, so the averaged gradient is ``∇L / W``:
  open_clip's scaling, the same for every term, WPR included (its per-sample values are gathered then).
- The hardest-negative FineLIP hinge is exact under data parallelism too (each anchor's hardest negative is
  taken over all gathered columns), so it is supported everywhere.

The equations are those of docs/method.md, as the reference package (``mulclip_fast.reference``) transcribes
them; the tests compare this module against it, and each function repeats its equation and cites its section.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import ops
from .distributed import BatchSharding
from .reference.masking import accumulation_dtype, masked_mean

# How WPR compares each calibrated token with its reconstruction from the other modality (docs/method.md,
# "WPR"): the within-sample contrast (the default), or the cosine of each token with its own reconstruction.
WPR_FORMS = ("contrast", "cosine")


def row_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, column_mask: torch.Tensor | None = None):
    """Per row: ``−log softmax(logits[..., i, :] over the valid columns)[targets[i]]``; ``[..., n, N] → [..., n]``."""
    filled = logits if column_mask is None else logits.masked_fill(~column_mask, torch.finfo(logits.dtype).min)
    positives = logits.gather(-1, targets.expand(*logits.shape[:-1]).unsqueeze(-1)).squeeze(-1)
    return torch.logsumexp(filled, dim=-1) - positives


def contrastive_share(
    a_rows: torch.Tensor,
    b_rows: torch.Tensor,
    a_columns: torch.Tensor,
    b_columns: torch.Tensor,
    offset: int,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """The rows' share of CLIP's symmetric InfoNCE ``L_batch(a, b)`` over the N columns (docs/method.md,
    "Global alignment").

    ``L_batch = ½ [CE(S, diag) + CE(Sᵀ, diag)]`` with ``S = s · a bᵀ (+ bias)``, so for rows ``i``
    (column ``offset + i`` is each row's positive)::

        share = ½ [Σ_i CE(s·a_i B_colᵀ + bias, offset+i) + Σ_i CE(s·b_i A_colᵀ + bias, offset+i)] / N

    With no columns (an empty batch) the share is 0, as ``reference.clip_contrastive_loss`` gives, not 0 / 0.
    """
    acc = accumulation_dtype(a_rows)
    targets = torch.arange(offset, offset + a_rows.shape[0], device=a_rows.device)
    a_to_b = logit_scale * (a_rows.to(acc) @ b_columns.to(acc).T)
    b_to_a = logit_scale * (b_rows.to(acc) @ a_columns.to(acc).T)
    if logit_bias is not None:
        a_to_b, b_to_a = a_to_b + logit_bias, b_to_a + logit_bias
    row_losses = row_cross_entropy(a_to_b, targets) + row_cross_entropy(b_to_a, targets)
    return 0.5 * row_losses.sum() / max(a_columns.shape[0], 1)


def slotwise_contrastive_share(
    t2i_logits: torch.Tensor,
    i2t_logits: torch.Tensor,
    row_mask: torch.Tensor,
    column_mask: torch.Tensor,
    offset: int,
) -> torch.Tensor:
    """The rows' share of the slot-wise masked InfoNCE of SAP (docs/method.md, "SAP"; reference
    ``slotwise_contrastive_loss``).

    ``t2i_logits[m, b, c]`` scores row caption b's subcaption m against column image c;
    ``i2t_logits[m, c, b]`` row image c against column caption b's subcaption m. Masks: ``row_mask [n, M]``,
    ``column_mask [N, M]``. Per slot m only the valid samples take part, as rows and as columns::

        L_m   = ½ [Σ_{valid b} CE_b(t2i) + Σ_{valid c} CE_c(i2t)] / count_m      count_m = valid samples of slot m
        L_sap = mean of L_m over the slots with count_m ≥ 2                      (0 when there is none)
    """
    valid_rows, valid_columns = row_mask.T, column_mask.T  # [M, n], [M, N]
    targets = torch.arange(offset, offset + row_mask.shape[0], device=t2i_logits.device)
    t2i = row_cross_entropy(t2i_logits, targets, valid_columns[:, None, :])  # [M, n]
    i2t = row_cross_entropy(i2t_logits, targets, valid_columns[:, None, :])
    count = valid_columns.sum(dim=1)
    per_slot = 0.5 * ((t2i * valid_rows).sum(dim=1) + (i2t * valid_rows).sum(dim=1)) / count.clamp(min=1)
    used = count >= 2
    return (per_slot * used).sum() / used.sum().clamp(min=1)


def hinge_costs(scores: torch.Tensor, offset: int, margin: float, hardest_negative: bool) -> torch.Tensor:
    """``Σ_i Σ_{c ≠ offset+i} max(0, margin + S[i, c] − S[i, offset+i])`` over the anchor rows ``i``
    (with ``hardest_negative``, only the largest cost of each anchor: VSE++'s max violation)."""
    if scores.numel() == 0:  # no anchors (an empty batch): amax has nothing to reduce
        return scores.sum()
    anchors = torch.arange(scores.shape[0], device=scores.device)
    positives = scores[anchors, offset + anchors]
    negative = torch.ones_like(scores, dtype=torch.bool)
    negative[anchors, offset + anchors] = False
    cost = (margin + scores - positives[:, None]).clamp(min=0) * negative
    return (cost.amax(dim=1) if hardest_negative else cost.sum(dim=1)).sum()


def finelip_hinge_share(
    t2i_scores: torch.Tensor, i2t_scores: torch.Tensor, offset: int, margin: float, hardest_negative: bool
) -> torch.Tensor:
    """The rows' share of FineLIP's bidirectional hinge loss (docs/method.md, "Baselines"; reference
    ``finelip_hinge_loss``).

    ``t2i_scores[b, c]``: row caption b against column image c; ``i2t_scores[c, b]``: row image c against
    column caption b. Each row is an anchor of its direction; ``loss = (Σ cost_t2i + Σ cost_i2t) / N``.
    """
    costs = hinge_costs(t2i_scores, offset, margin, hardest_negative)
    costs = costs + hinge_costs(i2t_scores, offset, margin, hardest_negative)
    return costs / max(t2i_scores.shape[1], 1)  # an empty batch: 0, as reference.finelip_hinge_loss gives


def contrastive_terms(
    image: torch.Tensor,
    texts: dict[str, torch.Tensor],
    logit_scale: torch.Tensor | float,
    sharding: BatchSharding,
    logit_bias: torch.Tensor | float | None = None,
) -> dict[str, torch.Tensor]:
    """``L_batch(image, text)`` for each named text embedding ``[n, d]``, the images gathered once."""
    image_rows, image_columns = sharding.rows_and_columns(image)
    offset = sharding.row_offset(image.shape[0])
    out = {}
    for name, text in texts.items():
        text_rows, text_columns = sharding.rows_and_columns(text)
        share = contrastive_share(image_rows, text_rows, image_columns, text_columns, offset, logit_scale, logit_bias)
        out[name] = sharding.rank_value(share)
    return out


def wpr_term(
    image_tokens: torch.Tensor,
    text_tokens: torch.Tensor,
    image_mask: torch.Tensor,
    text_mask: torch.Tensor,
    tau_attn: float,
    tau_contrast: float,
    backend: str,
    sharding: BatchSharding,
    form: str = "contrast",
) -> torch.Tensor:
    """Word–patch reconstruction ``L_wpr`` (docs/method.md, "WPR"): within each sample, so computed on this
    rank's samples (and gathered, as one value per sample, when every rank scores every row).

    ``L_wpr = Σ_b [L_recon(V'_b, Ṽ_b) + L_recon(T'_b, T̃_b)] / #{samples with both token sets}``
    (``mulclip_fast.ops.wpr_loss`` gives each sample's bracket, 0 for a sample missing a token set).
    ``form="cosine"`` puts ``mean_j (1 − ⟨x_j, x̃_j⟩)`` in place of each ``L_recon`` (reference
    ``wpr_cosine_loss``), on the fused reconstructions of ``mulclip_fast.ops.token_reconstruction``.
    """
    if form == "contrast":
        per_sample = ops.wpr_loss(
            image_tokens, text_tokens, image_mask, text_mask, tau_attn, tau_contrast, reduction="none", backend=backend
        )
    elif form == "cosine":
        per_sample = _wpr_cosine_per_sample(image_tokens, text_tokens, image_mask, text_mask, tau_attn, backend)
    else:
        raise ValueError(f"WPR form must be one of {WPR_FORMS}, got {form!r}")
    has_both = image_mask.any(dim=1) & text_mask.any(dim=1)
    if sharding.rows_are_gathered:
        # Every rank scores every row, as the batch-level terms do: without gather_with_grad a rank then
        # back-propagates the whole loss through its own samples only, ∂L/∂x_r, so that DDP's average is
        # ∇L / W for WPR as for the others. Scoring only its own samples (W · share) it would be ∇L_wpr,
        # W times the weight of WPR against the global terms of one process.
        per_sample = sharding.columns(per_sample)
    share = per_sample.sum() / sharding.global_sum(has_both.sum()).clamp(min=1)
    return sharding.rank_value(share)


def _wpr_cosine_per_sample(v, t, v_mask, t_mask, tau_attn, backend):
    """``[B]``: ``mean_j (1 − ⟨v_j, ṽ_j⟩) + mean_k (1 − ⟨t_k, t̃_k⟩)``, 0 for a sample missing a token set."""
    acc = accumulation_dtype(v)
    sides = ((v, t, v_mask, t_mask), (t, v, t_mask, v_mask))
    per_sample = 0
    for x, other, x_mask, other_mask in sides:
        rebuilt = ops.token_reconstruction(x, other, x_mask, other_mask, tau_attn, backend=backend)
        cosine = (x.to(acc) * F.normalize(rebuilt.to(acc), dim=-1)).sum(-1)
        per_sample = per_sample + masked_mean(1 - cosine, x_mask)
    return per_sample * (v_mask.any(dim=1) & t_mask.any(dim=1))


def sap_term(
    sub: torch.Tensor,
    sub_mask: torch.Tensor,
    tokens: torch.Tensor,
    token_mask: torch.Tensor,
    logit_scale: torch.Tensor | float,
    pairing: str,
    topk_ratio: float,
    tau: float,
    backend: str,
    sharding: BatchSharding,
) -> torch.Tensor:
    """Subcaption-aggregated patch alignment ``L_sap`` (docs/method.md, "SAP"; reference ``sap_loss``).

    ``v̄[b, i] = normalize(Σ_{j ∈ top-k} softmax_j(⟨sub[b,i], x_bj⟩ / τs) x_bj)`` with ``k = ⌈ρ·N⌉``, N the
    token positions (padded to the longest over the ranks).
    ``matched``: ``logit[i, b, c] = s·⟨sub[b,i], v̄[c,i]⟩``, each image aggregated with its own caption's subcaption.
    ``all``: ``logit[i, b, c] = s·⟨sub[b,i], v̄(c | sub[b,i])⟩``, image c aggregated with caption b's subcaption.
    Then the slot-wise InfoNCE of :func:`slotwise_contrastive_share`.
    """
    sub, sub_mask = sharding.pad_to_longest(sub, sub_mask)  # ranks may hold different numbers of slots
    sub_rows, sub_columns = sharding.rows_and_columns(sub)
    mask_rows, mask_columns = sharding.mask_rows_and_columns(sub_mask)
    acc = accumulation_dtype(sub)
    if pairing == "matched":
        tokens, token_mask = sharding.pad_to_longest(tokens, token_mask)
        k = max(1, math.ceil(topk_ratio * tokens.shape[1]))
        aggregate = ops.topk_patch_aggregate(sub, tokens, sub_mask, token_mask, k, tau, backend=backend).to(acc)
        aggregate_rows, aggregate_columns = sharding.rows_and_columns(aggregate)
        t2i = torch.einsum("bmd,cmd->mbc", sub_rows.to(acc), aggregate_columns)
        i2t = torch.einsum("cmd,bmd->mcb", aggregate_rows, sub_columns.to(acc))
    else:
        token_rows, token_mask_rows, token_columns, token_mask_columns = sharding.token_rows_and_columns(
            tokens, token_mask
        )
        k = max(1, math.ceil(topk_ratio * token_columns.shape[1]))

        def cosines(sub_set, sub_set_mask, token_set, token_set_mask):  # [captions, images, M]
            out = ops.pairwise_topk_aggregate_cosines(
                sub_set, token_set, sub_set_mask, token_set_mask, k, tau, backend=backend
            )
            return out.to(acc)

        t2i = cosines(sub_rows, mask_rows, token_columns, token_mask_columns).permute(2, 0, 1)
        if sub_rows is sub_columns:  # rows are the columns: the image → text logits are the transpose
            i2t = t2i.transpose(1, 2)
        else:
            i2t = cosines(sub_columns, mask_columns, token_rows, token_mask_rows).permute(2, 1, 0)
    offset = sharding.row_offset(sub.shape[0])
    share = slotwise_contrastive_share(logit_scale * t2i, logit_scale * i2t, mask_rows, mask_columns, offset)
    return sharding.rank_value(share)


def finelip_term(
    image: torch.Tensor,
    text: torch.Tensor,
    image_tokens: torch.Tensor,
    text_tokens: torch.Tensor,
    image_mask: torch.Tensor,
    text_mask: torch.Tensor,
    margin: float,
    hardest_negative: bool,
    backend: str,
    sharding: BatchSharding,
) -> torch.Tensor:
    """FineLIP's hinge loss on late-interaction scores over token sets that include CLS / EOT (docs/method.md,
    "Baselines").

    ``S(b, c) = mean_w max_p LeakyReLU₀.₁⟨t_bw, v_cp⟩ + mean_p max_w LeakyReLU₀.₁⟨t_bw, v_cp⟩``
    (``mulclip_fast.ops.pairwise_maxsim``, bidirectional), then :func:`finelip_hinge_share`.
    """
    image_set, image_set_mask = _with_leading_token(image, image_tokens, image_mask)
    text_set, text_set_mask = _with_leading_token(text, text_tokens, text_mask)
    image_rows, image_mask_rows, image_columns, image_mask_columns = sharding.token_rows_and_columns(
        image_set, image_set_mask
    )
    text_rows, text_mask_rows, text_columns, text_mask_columns = sharding.token_rows_and_columns(
        text_set, text_set_mask
    )
    acc = accumulation_dtype(image)

    def scores(captions, caption_mask, images, images_mask):  # [captions, images]
        out = ops.pairwise_maxsim(
            captions, images, caption_mask, images_mask, bidirectional=True, negative_slope=0.1, backend=backend
        )
        return out.to(acc)

    t2i = scores(text_rows, text_mask_rows, image_columns, image_mask_columns)
    if text_rows is text_columns:  # rows are the columns: the image → text scores are the transpose
        i2t = t2i.T
    else:
        i2t = scores(text_columns, text_mask_columns, image_rows, image_mask_rows).T
    offset = sharding.row_offset(image.shape[0])
    share = finelip_hinge_share(t2i, i2t, offset, margin, hardest_negative)
    return sharding.rank_value(share)


def _with_leading_token(pooled: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor):
    """``[pooled, tokens…]`` (CLS or EOT in front, as FineLIP's token sets) and its mask, the front valid."""
    token_set = torch.cat([pooled[:, None], tokens], dim=1)
    # new_ones, not ones_like(mask[:, :1]): a set without tokens (mask [n, 0]) still has its valid front token
    return token_set, torch.cat([mask.new_ones(mask.shape[0], 1), mask], dim=1)
