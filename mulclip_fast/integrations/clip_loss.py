"""A drop-in for open_clip's ``ClipLoss`` that adds MulCLIP's token-level terms when token features are passed.

    loss_fn = MulCLIPClipLoss(local_loss=args.local_loss, gather_with_grad=args.gather_with_grad,
                              rank=args.rank, world_size=args.world_size)
    losses = loss_fn(image_features, text_features, logit_scale, output_dict=True,
                     image_tokens=v_tokens, text_tokens=t_tokens, text_token_mask=t_mask,
                     short_text_features=t_short, sub_text_features=t_sub, sub_mask=sub_mask)
    total = sum(losses.values())            # what open_clip's train loop does with output_dict=True

With only the three positional arguments it is open_clip's ``ClipLoss`` (symmetric InfoNCE, optional
``logit_bias``). Each term of docs/method.md is added when its inputs are passed and the objective enables it:

    contrastive_loss        w_long  · L_batch(v_cls, t_eot)                      always
    short_contrastive_loss  w_short · L_batch(v_cls, t_short)                    short_text_features
    wpr_loss                w_wpr   · L_wpr (WPR, within each sample)            image_tokens + text_tokens
    sap_loss                w_sap   · L_sap (SAP, across the batch)              sub_text_features + image_tokens
    finelip_loss            w_fl    · FineLIP hinge on late interaction          objective "finelip" or
                                                                                 "mulclip-clim" + tokens

The values in the ``output_dict`` are already weighted, so they sum to the total as open_clip expects.

Distributed (open_clip's options, MulCLIP's exact semantics): with ``world_size > 1`` every batch-level
term sees the features of all ranks through the one all-gather of ``mulclip_fast.distributed``,
differentiable with ``gather_with_grad`` (otherwise only the local features keep their gradient).
``local_loss`` scores the local rows against the gathered columns instead of every row on every rank.
The terms are those of ``MulCLIPLoss``, computed by ``mulclip_fast.loss_terms``: each rank's value is its
exact share of the global loss (times the world size when it scores only its own rows), so the mean over
ranks is the single-process loss on the global batch, and with ``gather_with_grad`` DDP's averaged
gradients are its gradients — for any masks. Token sets whose length differs between ranks (captions
trimmed per batch) are padded to the longest and masked. Every rank must hold the same batch size.
"""

from __future__ import annotations

import torch
from torch import nn

from ..distributed import BatchSharding
from ..features import MulCLIPFeatures
from ..losses import MulCLIPLoss
from ..reference.checks import check_positive, check_same_batch, check_same_width, check_tokens

OUTPUT_KEYS = {
    "global_long": "contrastive_loss",
    "global_short": "short_contrastive_loss",
    "wpr": "wpr_loss",
    "sap": "sap_loss",
    "finelip": "finelip_loss",
}


class MulCLIPClipLoss(nn.Module):
    """open_clip ``ClipLoss`` calling convention, MulCLIP terms.

    Args:
        objective, terms, weights, sap_pairing, sap_topk_ratio, tau_attn, tau_contrast, tau_sap, wpr_form,
            finelip_margin, finelip_hardest_negative: as in ``mulclip_fast.losses.MulCLIPLoss``.
        backend: ``"auto"`` (default, unlike ``MulCLIPLoss``: this loss exists to bring the fused ops into
            other trainers) runs Triton on CUDA and the memory-lean torch path on CPU; ``"reference"``
            runs the naive spec.
        local_loss, gather_with_grad, rank, world_size: as in open_clip's ``ClipLoss``.
        cache_labels: accepted so that open_clip's arguments pass unchanged; it has no effect here (the
            labels are an ``arange`` built with the logits, not worth caching).
        use_horovod: accepted for the same reason (open_clip's ``create_loss`` passes it); only False: the
            features are gathered through ``torch.distributed``, so launch with ``torchrun``.
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
        wpr_form: str = "contrast",
        finelip_margin: float = 0.2,
        finelip_hardest_negative: bool = False,
        backend: str = "auto",
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        use_horovod: bool = False,
    ):
        super().__init__()
        if use_horovod:
            raise ValueError(
                f"use_horovod must be False, got {use_horovod!r}: MulCLIPClipLoss gathers features through "
                "torch.distributed (launch with torchrun)"
            )
        self.loss = MulCLIPLoss(
            objective=objective,
            terms=terms,
            weights=weights,
            sap_pairing=sap_pairing,
            sap_topk_ratio=sap_topk_ratio,
            tau_attn=tau_attn,
            tau_contrast=tau_contrast,
            tau_sap=tau_sap,
            wpr_form=wpr_form,
            finelip_margin=finelip_margin,
            finelip_hardest_negative=finelip_hardest_negative,
            backend=backend,
        )
        self.sharding = BatchSharding(
            rank, world_size, local_loss=bool(local_loss), gather_with_grad=bool(gather_with_grad)
        )

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor | float,
        logit_bias: torch.Tensor | float | None = None,
        output_dict: bool = False,
        *,
        image_tokens: torch.Tensor | None = None,
        text_tokens: torch.Tensor | None = None,
        image_token_mask: torch.Tensor | None = None,
        text_token_mask: torch.Tensor | None = None,
        short_text_features: torch.Tensor | None = None,
        sub_text_features: torch.Tensor | None = None,
        sub_mask: torch.Tensor | None = None,
        sap_tokens: torch.Tensor | None = None,
        sap_token_mask: torch.Tensor | None = None,
        fine_grained_scale: float = 1.0,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """The weighted total loss, or with ``output_dict`` its weighted terms (they sum to the total).

        Args:
            image_features: ``[B, d]`` image embeddings (CLS), normalised or not (they are normalised here).
            text_features: ``[B, d]`` long-caption EOT embeddings.
            logit_scale: the multiplier itself (``model.logit_scale.exp()``, as open_clip passes it).
            logit_bias: optional scalar added to the global logits (open_clip's ``ClipLoss`` option).
            image_tokens: ``[B, P, d]`` visual tokens (MulCLIP: the calibrated ``V'``); mask ``[B, P]``.
            text_tokens: ``[B, K, d]`` word tokens (the calibrated ``T'``); mask ``[B, K]`` (words only).
            short_text_features: ``[B, d]`` summary-caption EOT embeddings.
            sub_text_features: ``[B, M, d]`` subcaption EOT embeddings; ``sub_mask [B, M]`` (None: all valid).
            sap_tokens, sap_token_mask: visual tokens for SAP when they differ from ``image_tokens``.
            fine_grained_scale: multiplies the WPR / SAP / FineLIP weights (to ramp them in).

        An enabled term whose inputs are not passed is left out; none left is an error.
        """
        # Checked here under this signature's names; MulCLIPLoss checks the rest under the same names.
        check_tokens("image_features", image_features, ndim=2)
        check_tokens("text_features", text_features, ndim=2)
        check_same_width("image_features", image_features, "text_features", text_features)
        check_same_batch("image_features", image_features, "text_features", text_features)
        check_positive("logit_scale", logit_scale)
        if (image_token_mask is not None and image_tokens is None) or (
            text_token_mask is not None and text_tokens is None
        ):
            raise ValueError("a token mask was passed without its tokens (image_tokens / text_tokens)")
        if sub_mask is not None and sub_text_features is None:
            raise ValueError("sub_mask was passed without sub_text_features")
        if sub_text_features is not None:
            check_tokens("sub_text_features", sub_text_features)
            check_same_batch("image_features", image_features, "sub_text_features", sub_text_features)
        if short_text_features is not None:
            check_tokens("short_text_features", short_text_features, ndim=2)
            check_same_batch("image_features", image_features, "short_text_features", short_text_features)
        features = MulCLIPFeatures(
            image_cls=image_features,
            image_tokens=image_tokens,
            text_eot=text_features,
            text_tokens=text_tokens,
            short_eot=short_text_features,
            sub_eot=sub_text_features,
            sub_mask=sub_mask,
            image_token_mask=image_token_mask,
            text_token_mask=text_token_mask,
            sap_tokens=sap_tokens,
            sap_token_mask=sap_token_mask,
        )
        has_tokens = image_tokens is not None and text_tokens is not None
        has_inputs = {
            "global_long": True,
            "global_short": short_text_features is not None,
            "wpr": has_tokens,
            "sap": sub_text_features is not None and (sap_tokens is not None or image_tokens is not None),
            "finelip": has_tokens,
        }
        present = tuple(name for name in self.loss.terms if has_inputs[name])
        if not present:
            raise ValueError(f"none of the enabled terms {self.loss.terms} got its inputs")
        terms = self.loss.compute_terms(features, logit_scale, present, self.sharding, logit_bias)
        weighted = {
            OUTPUT_KEYS[name]: self.loss.term_weight(name, fine_grained_scale) * value for name, value in terms.items()
        }
        if output_dict:
            return weighted
        return sum(weighted.values())
