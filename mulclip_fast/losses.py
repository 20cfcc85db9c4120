"""The MulCLIP objective and its baselines, composed from the token-level ops (docs/method.md, "Total loss").

    L = w_long·L_batch(v_cls, t_long) + w_short·L_batch(v_cls, t_short)      global alignment
      + w_wpr·L_wpr                                                         word–patch reconstruction (WPR)
      + w_sap·L_sap                                                         subcaption-aggregated patches (SAP)
      + w_finelip·L_finelip                                                 FineLIP's late interaction (baseline)

Every term has a switch and a weight and is returned separately, so each ablation row of the paper is
one setting. Features are L2-normalised here, once, before any op sees them. The terms themselves are
written once, in ``mulclip_fast.loss_terms``, on a rank's rows against the gathered columns: one process,
``torchrun`` training (``DistributedMulCLIPLoss``) and the open_clip / Hugging Face adapter all run them.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from . import loss_terms
from .distributed import BatchSharding, DistributedContext
from .features import MulCLIPFeatures
from .reference.checks import (
    check_mask,
    check_non_negative,
    check_positive,
    check_same_batch,
    check_same_width,
    check_tokens,
)

TERMS = ("global_long", "global_short", "wpr", "sap", "finelip")
FINE_GRAINED_TERMS = ("wpr", "sap", "finelip")
OBJECTIVES = {
    "mulclip": ("global_long", "global_short", "wpr", "sap"),
    "global": ("global_long", "global_short"),
    "finelip": ("global_long", "global_short", "finelip"),
    # The paper's ablation row "CLIM instead of WPR": FineLIP's cross-modal late interaction in WPR's place.
    "mulclip-clim": ("global_long", "global_short", "finelip", "sap"),
}
DEFAULT_WEIGHTS = {"global_long": 1.0, "global_short": 0.5, "wpr": 1.0, "sap": 1.0, "finelip": 1.0}
# The terms' names before each took its method's name; scripts, checkpoints and metrics.jsonl files may hold them.
RENAMED_TERMS = {"word": "wpr", "sub": "sap"}
BACKENDS = ("auto", "triton", "torch", "reference")
ONE_PROCESS = BatchSharding()


class MulCLIPLoss(nn.Module):
    """MulCLIP's total loss and every term of it.

    Args:
        objective: ``"mulclip"`` (global + WPR + SAP), ``"global"`` (Long-CLIP-style global loss only)
            ``"finelip"`` (global + FineLIP's late-interaction hinge loss, CLIM) or ``"mulclip-clim"``
            (global + CLIM + SAP, the paper's ablation of WPR). Sets the default terms.
        terms: explicit set of enabled terms (subset of ``TERMS``), overriding the objective's.
        weights: per-term weights, merged over ``DEFAULT_WEIGHTS`` (short caption 0.5, others 1).
            ``terms`` and ``weights`` still accept the old names ``"word"`` and ``"sub"`` (``RENAMED_TERMS``)
            with a ``DeprecationWarning``.
        sap_pairing: ``"matched"`` (the paper's) or ``"all"`` (every subcaption against every image).
        sap_topk_ratio: ρ, the fraction of visual tokens kept as context patches, ``k = ⌈ρ·N⌉``.
        tau_attn, tau_contrast, tau_sap: τa, τr and τs (all 0.07 by default).
        wpr_form: ``"contrast"`` (the within-sample InfoNCE of docs/method.md, "WPR") or ``"cosine"`` (each
            token aligned with its own reconstruction, no contrast; ``tau_contrast`` unused).
        finelip_margin, finelip_hardest_negative: FineLIP's hinge settings.
        backend: ``"reference"`` runs the naive spec; ``"auto" | "torch" | "triton"`` run the fused ops
            of ``mulclip_fast.ops``.

    ``forward(features, logit_scale, fine_grained_scale=1.0, sharding=ONE_PROCESS)`` returns a dict with
    each enabled term (unweighted) and ``"loss"``, the weighted total. ``fine_grained_scale`` multiplies
    the weights of the fine-grained terms, so a trainer can ramp them in. ``sharding``
    (``mulclip_fast.distributed.BatchSharding``) runs the loss on one rank's slice of a global batch.
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
        backend: str = "reference",
    ):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {sorted(OBJECTIVES)}, got {objective!r}")
        if isinstance(terms, str):  # its letters would be reported as unknown terms
            raise ValueError(f"terms must be a tuple of term names from {TERMS}, got the string {terms!r}")
        if weights is not None and not isinstance(weights, Mapping):
            raise ValueError(f"weights must be a dict of term name to weight, got {type(weights).__name__}")
        enabled = OBJECTIVES[objective] if terms is None else current_term_names(terms)
        weights = current_term_names(weights or {})
        _check_term_names((*enabled, *weights))
        if not enabled:  # the total would be sum([]), the int 0: no tensor, no backward
            raise ValueError(f"terms must name at least one loss term of {TERMS}, got {tuple(enabled)}")
        if sap_pairing not in ("matched", "all"):
            raise ValueError(f"sap_pairing must be 'matched' or 'all', got {sap_pairing!r}")
        if not (_is_finite_number(sap_topk_ratio) and 0 < sap_topk_ratio <= 1):
            raise ValueError(f"sap_topk_ratio must be in (0, 1], got {sap_topk_ratio!r}")
        for name, tau in (("tau_attn", tau_attn), ("tau_contrast", tau_contrast), ("tau_sap", tau_sap)):
            check_positive(name, tau)
        # the spec refuses a negative margin (reference.finelip_hinge_loss); NaN would make the loss NaN
        if not (_is_finite_number(finelip_margin) and finelip_margin >= 0):
            raise ValueError(f"finelip_margin must be a finite number >= 0, got {finelip_margin!r}")
        if not isinstance(finelip_hardest_negative, bool):  # a config file's "false" would be truthy
            raise ValueError(f"finelip_hardest_negative must be a bool, got {finelip_hardest_negative!r}")
        for name, weight in weights.items():  # a negative weight would turn its term into a reward
            check_non_negative(f"weights[{name!r}]", weight)
        if wpr_form not in loss_terms.WPR_FORMS:
            raise ValueError(f"wpr_form must be one of {loss_terms.WPR_FORMS}, got {wpr_form!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.objective = objective
        self.terms = tuple(t for t in TERMS if t in enabled)
        self.weights = {**DEFAULT_WEIGHTS, **weights}
        self.sap_pairing = sap_pairing
        self.sap_topk_ratio = sap_topk_ratio
        self.tau_attn, self.tau_contrast, self.tau_sap = tau_attn, tau_contrast, tau_sap
        self.wpr_form = wpr_form
        self.finelip_margin = finelip_margin
        self.finelip_hardest_negative = finelip_hardest_negative
        self.backend = backend

    def forward(
        self,
        features: MulCLIPFeatures,
        logit_scale: torch.Tensor | float,
        fine_grained_scale: float = 1.0,
        sharding: BatchSharding = ONE_PROCESS,
    ) -> dict[str, torch.Tensor]:
        out = self.compute_terms(features, logit_scale, self.terms, sharding)
        out["loss"] = self.weighted_total(out, fine_grained_scale)
        return out

    def term_weight(self, name: str, fine_grained_scale: float = 1.0) -> float:
        """``w_term``, times ``fine_grained_scale`` for the fine-grained terms."""
        # A negative factor would silently turn the fine-grained terms into rewards.
        check_non_negative("fine_grained_scale", fine_grained_scale)
        return self.weights[name] * (fine_grained_scale if name in FINE_GRAINED_TERMS else 1.0)

    def weighted_total(self, terms: dict[str, torch.Tensor], fine_grained_scale: float = 1.0) -> torch.Tensor:
        """``Σ w_term · term``, the fine-grained terms' weights multiplied by ``fine_grained_scale``."""
        return sum(self.term_weight(name, fine_grained_scale) * value for name, value in terms.items())

    def compute_terms(
        self,
        features: MulCLIPFeatures,
        logit_scale: torch.Tensor | float,
        terms: tuple[str, ...],
        sharding: BatchSharding = ONE_PROCESS,
        logit_bias: torch.Tensor | float | None = None,
    ) -> dict[str, torch.Tensor]:
        """Each of ``terms`` (unweighted) on this rank's slice of the batch (see ``mulclip_fast.loss_terms``).

        ``logit_bias`` is added to the global InfoNCE logits (open_clip's ``ClipLoss`` option).
        """
        _check_term_names(terms)
        # A trainer's autocast region (--precision bf16) would cast the terms' fp32 matmuls back to bf16:
        # logits of up to s = 100 rounded to steps of 0.5, and bf16 losses. The terms accumulate in fp32
        # whatever their inputs' float dtype (docs/method.md, "Op conventions": Dtypes).
        device_type = features.image_cls.device.type if isinstance(features.image_cls, torch.Tensor) else "cpu"
        # a device without autocast (e.g. "meta", for shape and memory estimates) has nothing to switch off
        no_autocast = (
            torch.autocast(device_type, enabled=False)
            if torch.amp.is_autocast_available(device_type)
            else contextlib.nullcontext()
        )
        with no_autocast:
            return self._compute_terms(features, logit_scale, terms, sharding, logit_bias)

    def _compute_terms(self, features, logit_scale, terms, sharding, logit_bias) -> dict[str, torch.Tensor]:
        f = _checked_and_normalized(features, terms)
        check_positive("logit_scale", logit_scale)
        sharding.check_process_group()
        out: dict[str, torch.Tensor] = {}
        texts = {"global_long": f.text_eot, "global_short": f.short_eot}
        texts = {name: text for name, text in texts.items() if name in terms}
        if texts:
            out.update(loss_terms.contrastive_terms(f.image_cls, texts, logit_scale, sharding, logit_bias))
        if "wpr" in terms:
            out["wpr"] = loss_terms.wpr_term(
                f.image_tokens,
                f.text_tokens,
                f.image_token_mask,
                f.text_token_mask,
                self.tau_attn,
                self.tau_contrast,
                self.backend,
                sharding,
                self.wpr_form,
            )
        if "sap" in terms:
            tokens, token_mask = (
                (f.image_tokens, f.image_token_mask) if f.sap_tokens is None else (f.sap_tokens, f.sap_token_mask)
            )
            out["sap"] = loss_terms.sap_term(
                f.sub_eot,
                f.sub_mask,
                tokens,
                token_mask,
                logit_scale,
                self.sap_pairing,
                self.sap_topk_ratio,
                self.tau_sap,
                self.backend,
                sharding,
            )
        if "finelip" in terms:
            out["finelip"] = loss_terms.finelip_term(
                f.image_cls,
                f.text_eot,
                f.image_tokens,
                f.text_tokens,
                f.image_token_mask,
                f.text_token_mask,
                self.finelip_margin,
                self.finelip_hardest_negative,
                self.backend,
                sharding,
            )
        return {name: out[name] for name in TERMS if name in out}


def current_term_names(names, warn: bool = True):
    """``names`` (term names, or a dict keyed by them) with the old names (``RENAMED_TERMS``) replaced by
    the current ones: a tuple, or a dict of the same values.

    ``warn``: a ``DeprecationWarning`` for the caller's caller, who passed the old names; files written
    before the rename (checkpoints, metrics logs) are read without one.
    """
    old = [name for name in names if name in RENAMED_TERMS]
    if old and warn:
        renames = ", ".join(f"{name!r} is now {RENAMED_TERMS[name]!r}" for name in old)
        warnings.warn(f"renamed loss terms: {renames}", DeprecationWarning, stacklevel=3)
    current = tuple(RENAMED_TERMS.get(name, name) for name in names)
    if len(set(current)) < len(current):
        raise ValueError(f"loss terms {list(names)} name a term twice, under its old and its current name")
    return dict(zip(current, names.values(), strict=True)) if isinstance(names, Mapping) else current


def _is_finite_number(value) -> bool:
    """A finite real number (an int, a float, a NumPy scalar), not a bool or a string read from a config file."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_term_names(names) -> None:
    unknown = set(names) - set(TERMS)
    if unknown:
        raise ValueError(f"unknown loss terms {sorted(unknown)}; known terms are {TERMS}")


# The features each term needs, and their shapes. SAP lists image_cls, which it does not read: every term's
# features are checked against image_cls for batch and width. SAP also reads sap_tokens, or image_tokens without them.
TERM_INPUTS = {
    "global_long": ("image_cls", "text_eot"),
    "global_short": ("image_cls", "short_eot"),
    "wpr": ("image_tokens", "text_tokens"),
    "sap": ("image_cls", "sub_eot"),
    "finelip": ("image_cls", "text_eot", "image_tokens", "text_tokens"),
}
FEATURE_SHAPES = {"image_cls": "[B, d]", "text_eot": "[B, d]", "short_eot": "[B, d]", "sub_eot": "[B, M, d]"}
FEATURE_SHAPES |= {"image_tokens": "[B, P, d]", "text_tokens": "[B, K, d]", "sap_tokens": "[B, N, d]"}
MASK_OF = {"image_tokens": "image_token_mask", "text_tokens": "text_token_mask", "sub_eot": "sub_mask"}
MASK_OF |= {"sap_tokens": "sap_token_mask"}


def _checked_and_normalized(f: MulCLIPFeatures, terms: tuple[str, ...]) -> MulCLIPFeatures:
    """The features that ``terms`` read, validated, L2-normalised once, with explicit masks (None: all valid)."""
    read = {field for name in terms for field in TERM_INPUTS[name]}
    if "sap" in terms:
        read.add("image_tokens" if f.sap_tokens is None else "sap_tokens")
        if f.sap_tokens is None and f.sap_token_mask is not None:  # SAP would read image_tokens and drop it
            raise ValueError("features.sap_token_mask was given without features.sap_tokens")
    for name in terms:
        missing = [x for x in TERM_INPUTS[name] if getattr(f, x) is None]
        if name == "sap" and f.sap_tokens is None and f.image_tokens is None:
            missing.append("image_tokens")
        if missing:
            needed = " and ".join(f"features.{x} {FEATURE_SHAPES[x]}" for x in missing)
            raise ValueError(f"the {name} term needs {needed}")
    check_tokens("image_cls", f.image_cls, ndim=2)
    checked = {}
    for field in sorted(read):
        x = getattr(f, field)
        check_tokens(field, x, ndim=FEATURE_SHAPES[field].count(",") + 1)
        check_same_width("image_cls", f.image_cls, field, x)
        check_same_batch("image_cls", f.image_cls, field, x)
        checked[field] = F.normalize(x, dim=-1)
        if field in MASK_OF:
            checked[MASK_OF[field]] = check_mask(MASK_OF[field], getattr(f, MASK_OF[field]), x, field)
    unread = {"image_cls": None, "image_tokens": None, "text_eot": None, "text_tokens": None}
    return MulCLIPFeatures(**{**unread, **checked})


class DistributedMulCLIPLoss:
    """Run a :class:`MulCLIPLoss` on this rank's slice of the global batch (the ``torchrun`` training path).

    Each rank scores its own rows against the gathered columns and returns, per term and for ``"loss"``,
    ``world · share`` of the global value (see ``mulclip_fast.loss_terms``): back-propagate ``out["loss"]``
    under DDP, and log :func:`mulclip_fast.distributed.all_reduce_mean` of the values. With one process it
    returns what ``loss`` returns.
    """

    def __init__(self, loss: MulCLIPLoss, context: DistributedContext):
        self.loss = loss
        self.sharding = BatchSharding(context.rank, context.world_size)

    def __call__(self, features: MulCLIPFeatures, logit_scale, fine_grained_scale: float = 1.0):
        return self.loss(features, logit_scale, fine_grained_scale, sharding=self.sharding)


__all__ = [
    "BACKENDS",
    "DEFAULT_WEIGHTS",
    "FINE_GRAINED_TERMS",
    "OBJECTIVES",
    "RENAMED_TERMS",
    "TERMS",
    "DistributedMulCLIPLoss",
    "MulCLIPFeatures",
    "MulCLIPLoss",
    "current_term_names",
]
