"""What the towers hand the loss: the feature type shared by the model, the adapters and the losses.

It lives apart from both so that the model does not depend on the loss that consumes its output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MulCLIPFeatures:
    """What the towers produce for one batch of B image–caption pairs (unnormalised is fine).

    Attributes:
        image_cls: ``[B, d]`` projected CLS embedding.
        image_tokens: ``[B, P, d]`` visual tokens for WPR, SAP and FineLIP: the calibrated ``V'`` for MulCLIP,
            the raw patches ``v_loc`` without calibration (``--no-calibration``; an adapter's output before
            ``integrations.calibrate``).
        text_eot: ``[B, d]`` EOT embedding of the long caption.
        text_tokens: ``[B, K, d]`` word tokens: the calibrated ``T'``, or the raw ``t_loc`` likewise.
        short_eot: ``[B, d]`` EOT embedding of the summary caption, or None.
        sub_eot: ``[B, M, d]`` EOT embeddings of the subcaptions, or None.
        sub_mask: ``[B, M]`` bool, True for real subcaptions.
        image_token_mask, text_token_mask: ``[B, P]`` / ``[B, K]`` bool, or None for all valid.
        sap_tokens, sap_token_mask: visual tokens for SAP when they differ from ``image_tokens``
            (e.g. the raw patches instead of the calibrated ones); None uses ``image_tokens``.
    """

    image_cls: torch.Tensor
    image_tokens: torch.Tensor | None
    text_eot: torch.Tensor
    text_tokens: torch.Tensor | None
    short_eot: torch.Tensor | None = None
    sub_eot: torch.Tensor | None = None
    sub_mask: torch.Tensor | None = None
    image_token_mask: torch.Tensor | None = None
    text_token_mask: torch.Tensor | None = None
    sap_tokens: torch.Tensor | None = None
    sap_token_mask: torch.Tensor | None = None
