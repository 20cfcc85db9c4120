"""The reference MulCLIP implementation: plain, readable PyTorch for every term of docs/method.md.

This package is the spec. Every fast path (``mulclip_fast.ops``) and the loss library
(``mulclip_fast.loss_terms``) is tested against it for values and gradients; it imports nothing else of
ours, so it can serve as the baseline in tests and benchmarks, and its argument checks (``checks``) and
masked reductions (``masking``) are public for every other layer to share.
Conventions (docs/method.md, "Op conventions"): boolean masks mark valid tokens with True; inputs are
L2-normalised by the caller; ``logit_scale`` is the multiplier itself; temperatures divide.
"""

from .contrastive import clip_contrastive_loss, finelip_hinge_loss, slotwise_contrastive_loss
from .pairwise import pairwise_maxsim, pairwise_reconstruction_scores, pairwise_topk_aggregate_cosines
from .positional import stretch_positional_embedding
from .sap import sap_loss
from .tokens import token_reconstruction, topk_patch_aggregate, wpr_cosine_loss, wpr_loss

__all__ = [
    "clip_contrastive_loss",
    "finelip_hinge_loss",
    "pairwise_maxsim",
    "pairwise_reconstruction_scores",
    "pairwise_topk_aggregate_cosines",
    "sap_loss",
    "slotwise_contrastive_loss",
    "stretch_positional_embedding",
    "token_reconstruction",
    "topk_patch_aggregate",
    "wpr_cosine_loss",
    "wpr_loss",
]
