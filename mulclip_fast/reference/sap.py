"""Subcaption-aggregated patch alignment, MulCLIP's SAP loss (docs/method.md, "SAP")."""

from __future__ import annotations

import torch

from .checks import check_positive
from .contrastive import slotwise_contrastive_loss
from .masking import accumulation_dtype
from .pairwise import pairwise_topk_aggregate_cosines
from .tokens import _check_sap_inputs, topk_patch_aggregate


def sap_loss(
    sub: torch.Tensor,
    patches: torch.Tensor,
    sub_mask: torch.Tensor | None,
    patch_mask: torch.Tensor | None,
    k: int,
    tau: float,
    logit_scale: torch.Tensor | float,
    pairing: str = "matched",
) -> torch.Tensor:
    """Subcaption-aggregated patch alignment ``L_sap`` (docs/method.md, "SAP").

    ``matched`` (the paper's): ``v̄[b,i]`` is built from image b with b's own subcaption i, and
    ``L_sap = mean over slots i with ≥ 2 valid samples of L_batch(v̄[:, i], sub[:, i])``.
    ``all``: every subcaption of caption b is aggregated against every image c,
    ``logit[b, c, i] = s · ⟨sub[b,i], v̄(image c | sub[b,i])⟩``, with the same slot-wise contrast.

    Returns:
        Scalar loss in float32 (float64 for float64 inputs).
    """
    if pairing not in ("matched", "all"):
        raise ValueError(f"pairing must be 'matched' or 'all', got {pairing!r}")
    sub_mask, patch_mask = _check_sap_inputs(sub, patches, sub_mask, patch_mask, k, tau, same_batch=True)
    check_positive("logit_scale", logit_scale)
    acc = accumulation_dtype(sub)
    if pairing == "matched":
        agg = topk_patch_aggregate(sub, patches, sub_mask, patch_mask, k, tau).to(acc)
        cos = torch.einsum("bmd,cmd->mbc", sub.to(acc), agg)
    else:
        cos = pairwise_topk_aggregate_cosines(sub, patches, sub_mask, patch_mask, k, tau).to(acc)
        cos = cos.permute(2, 0, 1)  # [M, B(captions), B(images)]
    return slotwise_contrastive_loss(logit_scale * cos, sub_mask)
