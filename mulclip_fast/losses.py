"""The MulCLIP objective and its baselines, composed from the token-level ops (docs/method.md, "Total loss").

    L = w_long·L_batch(v_cls, t_long) + w_short·L_batch(v_cls, t_short)      global alignment
      + w_word·L_word                                                       word–patch reconstruction (WPR)
      + w_sub·L_sub                                                         subcaption-aggregated patches (SAP)
      + w_finelip·L_finelip                                                 FineLIP's late interaction (baseline)

Every term has a switch and a weight and is returned separately, so each ablation row of the paper is
one setting. Features are L2-normalised here, once, before any op sees them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import reference

TERMS = ("global_long", "global_short", "word", "sub", "finelip")
FINE_GRAINED_TERMS = ("word", "sub", "finelip")
OBJECTIVES = {
    "mulclip": ("global_long", "global_short", "word", "sub"),
    "global": ("global_long", "global_short"),
    "finelip": ("global_long", "global_short", "finelip"),
}
DEFAULT_WEIGHTS = {"global_long": 1.0, "global_short": 0.5, "word": 1.0, "sub": 1.0, "finelip": 1.0}
BACKENDS = ("auto", "triton", "torch", "reference")


@dataclass
class MulCLIPFeatures:
    """What the towers produce for one batch of B image–caption pairs (unnormalised is fine).

    Attributes:
        image_cls: ``[B, d]`` projected CLS embedding.
        image_tokens: ``[B, P, d]`` visual tokens for WPR, SAP and FineLIP (the calibrated ``V'``).
        text_eot: ``[B, d]`` EOT embedding of the long caption.
        text_tokens: ``[B, K, d]`` word tokens (the calibrated ``T'``).
        short_eot: ``[B, d]`` EOT embedding of the summary caption, or None.
        sub_eot: ``[B, M, d]`` EOT embeddings of the subcaptions, or None.
        sub_mask: ``[B, M]`` bool, True for real subcaptions.
        image_token_mask, text_token_mask: ``[B, P]`` / ``[B, K]`` bool, or None for all valid.
        sap_tokens, sap_token_mask: visual tokens for SAP when they differ from ``image_tokens``
            (e.g. the raw patches instead of the calibrated ones); None uses ``image_tokens``.
    """

    image_cls: torch.Tensor
    image_tokens: torch.Tensor
    text_eot: torch.Tensor
    text_tokens: torch.Tensor
    short_eot: torch.Tensor | None = None
    sub_eot: torch.Tensor | None = None
    sub_mask: torch.Tensor | None = None
    image_token_mask: torch.Tensor | None = None
    text_token_mask: torch.Tensor | None = None
    sap_tokens: torch.Tensor | None = None
    sap_token_mask: torch.Tensor | None = None


def _normalize(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else F.normalize(x, dim=-1)


class MulCLIPLoss(nn.Module):
    """MulCLIP's total loss and every term of it.

    Args:
        objective: ``"mulclip"`` (global + WPR + SAP), ``"global"`` (Long-CLIP-style global loss only)
            or ``"finelip"`` (global + FineLIP's late-interaction hinge loss). Sets the default terms.
        terms: explicit set of enabled terms (subset of ``TERMS``), overriding the objective's.
        weights: per-term weights, merged over ``DEFAULT_WEIGHTS`` (short caption 0.5, others 1).
        sap_pairing: ``"matched"`` (the paper's) or ``"all"`` (every subcaption against every image).
        sap_topk_ratio: ρ, the fraction of visual tokens kept as context patches, ``k = ⌈ρ·N⌉``.
        tau_attn, tau_contrast, tau_sap: τa, τr and τs (all 0.07 by default).
        finelip_margin, finelip_hardest_negative: FineLIP's hinge settings.
        backend: ``"reference"`` runs the naive spec; ``"auto" | "torch" | "triton"`` run the fused ops
            of ``mulclip_fast.ops``.

    ``forward(features, logit_scale, fine_grained_scale=1.0)`` returns a dict with each enabled term
    (unweighted) and ``"loss"``, the weighted total. ``fine_grained_scale`` multiplies the weights of
    the fine-grained terms, so a trainer can ramp them in.
    """

    def __init__(
        self,
        objective: str = "mulclip",
        terms: tuple[str, ...] | None = None,
        weights: dict[str, float] | None = None,
        sap_pairing: str = "matched",
        sap_topk_ratio: float = 0.25,
        tau_attn: float = 0.07,
        tau_contrast: float = 0.07,
        tau_sap: float = 0.07,
        finelip_margin: float = 0.2,
        finelip_hardest_negative: bool = False,
        backend: str = "reference",
    ):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {sorted(OBJECTIVES)}, got {objective!r}")
        enabled = OBJECTIVES[objective] if terms is None else tuple(terms)
        unknown = set(enabled) - set(TERMS) | set(weights or {}) - set(TERMS)
        if unknown:
            raise ValueError(f"unknown loss terms {sorted(unknown)}; known terms are {TERMS}")
        if sap_pairing not in ("matched", "all"):
            raise ValueError(f"sap_pairing must be 'matched' or 'all', got {sap_pairing!r}")
        if not 0 < sap_topk_ratio <= 1:
            raise ValueError(f"sap_topk_ratio must be in (0, 1], got {sap_topk_ratio}")
        for name, tau in (("tau_attn", tau_attn), ("tau_contrast", tau_contrast), ("tau_sap", tau_sap)):
            if not tau > 0:
                raise ValueError(f"{name} must be > 0, got {tau}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.objective = objective
        self.terms = tuple(t for t in TERMS if t in enabled)
        self.weights = {**DEFAULT_WEIGHTS, **(weights or {})}
        self.sap_pairing = sap_pairing
        self.sap_topk_ratio = sap_topk_ratio
        self.tau_attn, self.tau_contrast, self.tau_sap = tau_attn, tau_contrast, tau_sap
        self.finelip_margin = finelip_margin
        self.finelip_hardest_negative = finelip_hardest_negative
        self.backend = backend

    def _op(self, name: str):
        """The named token-level op of the chosen backend."""
        if self.backend == "reference":
            return getattr(reference, name)
        from . import ops

        op = getattr(ops, name)
        return lambda *args, **kwargs: op(*args, **kwargs, backend=self.backend)

    def forward(
        self, features: MulCLIPFeatures, logit_scale: torch.Tensor | float, fine_grained_scale: float = 1.0
    ) -> dict[str, torch.Tensor]:
        f = features
        v_cls, t_long = _normalize(f.image_cls), _normalize(f.text_eot)
        out: dict[str, torch.Tensor] = {}
        if "global_long" in self.terms:
            out["global_long"] = reference.clip_contrastive_loss(v_cls, t_long, logit_scale)
        if "global_short" in self.terms:
            if f.short_eot is None:
                raise ValueError("the global_short term needs features.short_eot [B, d]")
            out["global_short"] = reference.clip_contrastive_loss(v_cls, _normalize(f.short_eot), logit_scale)
        if "word" in self.terms:
            out["word"] = self._op("wpr_loss")(
                _normalize(f.image_tokens),
                _normalize(f.text_tokens),
                f.image_token_mask,
                f.text_token_mask,
                self.tau_attn,
                self.tau_contrast,
            )
        if "sub" in self.terms:
            out["sub"] = self._sap_loss(f, logit_scale)
        if "finelip" in self.terms:
            out["finelip"] = self._finelip_loss(f, v_cls, t_long)
        out["loss"] = self.weighted_total(out, fine_grained_scale)
        return out

    def weighted_total(self, terms: dict[str, torch.Tensor], fine_grained_scale: float = 1.0) -> torch.Tensor:
        """``Σ w_term · term``, the fine-grained terms' weights multiplied by ``fine_grained_scale``."""
        return sum(
            self.weights[name] * (fine_grained_scale if name in FINE_GRAINED_TERMS else 1.0) * value
            for name, value in terms.items()
        )

    def _sap_loss(self, f: MulCLIPFeatures, logit_scale) -> torch.Tensor:
        if f.sub_eot is None or f.sub_mask is None:
            raise ValueError("the sub term needs features.sub_eot [B, M, d] and features.sub_mask [B, M]")
        sub = _normalize(f.sub_eot)
        tokens = _normalize(f.image_tokens if f.sap_tokens is None else f.sap_tokens)
        token_mask = f.image_token_mask if f.sap_tokens is None else f.sap_token_mask
        k = max(1, math.ceil(self.sap_topk_ratio * tokens.shape[1]))
        acc = torch.float64 if sub.dtype == torch.float64 else torch.float32
        if self.sap_pairing == "matched":
            agg = self._op("topk_patch_aggregate")(sub, tokens, f.sub_mask, token_mask, k, self.tau_sap)
            cos = torch.einsum("bmd,cmd->mbc", sub.to(acc), agg.to(acc))
        else:
            cos = self._op("pairwise_topk_aggregate_logits")(sub, tokens, f.sub_mask, token_mask, k, self.tau_sap)
            cos = cos.to(acc).permute(2, 0, 1)  # [M, B(captions), B(images)]
        return reference.slotwise_contrastive_loss(logit_scale * cos, f.sub_mask)

    def _finelip_loss(self, f: MulCLIPFeatures, v_cls, t_long) -> torch.Tensor:
        # FineLIP's token sets include CLS / EOT next to the calibrated tokens.
        v_all = torch.cat([v_cls[:, None], _normalize(f.image_tokens)], dim=1)
        t_all = torch.cat([t_long[:, None], _normalize(f.text_tokens)], dim=1)
        v_mask = _prepend_valid(f.image_token_mask)
        t_mask = _prepend_valid(f.text_token_mask)
        scores = self._op("pairwise_maxsim")(t_all, v_all, t_mask, v_mask, bidirectional=True, negative_slope=0.1)
        return reference.finelip_hinge_loss(scores, self.finelip_margin, self.finelip_hardest_negative)


def _prepend_valid(mask: torch.Tensor | None) -> torch.Tensor | None:
    """Mark the CLS / EOT token put in front of a token set as valid."""
    if mask is None:
        return None
    return torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
