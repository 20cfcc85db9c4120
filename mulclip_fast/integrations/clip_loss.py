"""A drop-in for open_clip's ``ClipLoss`` that adds MulCLIP's token-level terms when token features are passed.

    loss_fn = MulCLIPClipLoss(local_loss=args.local_loss, gather_with_grad=args.gather_with_grad,
                              rank=args.rank, world_size=args.world_size)
    losses = loss_fn(image_features, text_features, logit_scale, output_dict=True,
                     image_tokens=v_tokens, text_tokens=t_tokens, text_token_mask=t_mask,
                     short_text_features=t_short, sub_text_features=t_sub, sub_mask=sub_mask)
    total = sum(losses.values())            # what open_clip's train loop does with output_dict=True

With only the three positional arguments it is open_clip's ``ClipLoss`` (symmetric InfoNCE, optional
``logit_bias``). Each term of DESIGN §3 is added when its inputs are passed and the objective enables it:

    contrastive_loss        w_long  · L_batch(v_cls, t_eot)                      always
    short_contrastive_loss  w_short · L_batch(v_cls, t_short)                    short_text_features
    word_loss               w_word  · L_word (WPR, within each sample)           image_tokens + text_tokens
    sub_loss                w_sub   · L_sub (SAP, across the batch)              sub_text_features + image_tokens
    finelip_loss            w_fl    · FineLIP hinge on late interaction          objective="finelip" + tokens

The values in the ``output_dict`` are already weighted, so they sum to the total as open_clip expects.

Distributed (open_clip's semantics): with ``world_size > 1`` every batch-level term sees the features of
all ranks through a ``torch.distributed`` all-gather — differentiable with ``gather_with_grad``, otherwise
only the local slice keeps its gradient. ``local_loss`` scores the local rows against the gathered
columns (labels offset by ``rank · B``) instead of the full ``[B·W, B·W]`` matrix, and each rank
averages over its own rows, as open_clip does. Token sets whose length differs between ranks (captions
trimmed per batch) are padded to the longest and masked. WPR compares tokens within a sample only, so
it is computed on the local batch and never gathered: after DDP's gradient averaging this equals the
global mean, without duplicated work. Every rank must hold the same batch size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import all_gather_no_grad, all_gather_with_grad, all_reduce_max
from ..losses import FINE_GRAINED_TERMS, MulCLIPLoss
from ..reference import checks as _checks
from ..reference.masking import masked_mean

OUTPUT_KEYS = {
    "global_long": "contrastive_loss",
    "global_short": "short_contrastive_loss",
    "word": "word_loss",
    "sub": "sub_loss",
    "finelip": "finelip_loss",
}


class MulCLIPClipLoss(nn.Module):
    """open_clip ``ClipLoss`` calling convention, MulCLIP terms.

    Args:
        objective, terms, weights, sap_pairing, sap_topk_ratio, tau_attn, tau_contrast, tau_sap,
            finelip_margin, finelip_hardest_negative: as in ``mulclip_fast.losses.MulCLIPLoss``.
        backend: ``"auto"`` (default, unlike ``MulCLIPLoss``: this loss exists to bring the fused ops into
            other trainers) runs Triton on CUDA and the memory-lean torch path on CPU; ``"reference"``
            runs the naive spec.
        local_loss, gather_with_grad, cache_labels, rank, world_size: as in open_clip's ``ClipLoss``.
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
        backend: str = "auto",
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ):
        super().__init__()
        # MulCLIPLoss validates and resolves the objective's settings; its attributes are the spec we follow.
        self.spec = MulCLIPLoss(
            objective=objective,
            terms=terms,
            weights=weights,
            sap_pairing=sap_pairing,
            sap_topk_ratio=sap_topk_ratio,
            tau_attn=tau_attn,
            tau_contrast=tau_contrast,
            tau_sap=tau_sap,
            finelip_margin=finelip_margin,
            finelip_hardest_negative=finelip_hardest_negative,
            backend=backend,
        )
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
        self.local_loss = bool(local_loss)
        self.gather_with_grad = bool(gather_with_grad)
        self.cache_labels = bool(cache_labels)
        self.rank = rank
        self.world_size = world_size
        self.prev_num_logits = 0
        self.labels: dict[torch.device, torch.Tensor] = {}

    # -- the fused ops -------------------------------------------------------------------------------

    def _op(self, name: str):
        backend = self.spec.backend
        if backend == "reference":
            from .. import reference

            return getattr(reference, name)
        from .. import ops

        op = getattr(ops, name)
        return lambda *args, **kwargs: op(*args, **kwargs, backend=backend)

    # -- distributed ---------------------------------------------------------------------------------

    @property
    def _distributed(self) -> bool:
        return self.world_size > 1

    def _check_process_group(self) -> None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(f"world_size={self.world_size} needs an initialised torch.distributed process group")
        if dist.get_world_size() != self.world_size or dist.get_rank() != self.rank:
            raise ValueError(
                f"rank={self.rank}, world_size={self.world_size} disagree with the process group "
                f"(rank {dist.get_rank()} of {dist.get_world_size()})"
            )

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate ``x`` of every rank along dim 0 (equal shapes on every rank), open_clip's way.

        The differentiable gather is ``mulclip_fast.distributed.all_gather_with_grad``, not
        ``torch.distributed.nn.all_gather``: the latter is deprecated and, on gloo (torch 2.13), scrambles
        the gradient when the incoming gradient is not contiguous (e.g. after an einsum).
        """
        if self.gather_with_grad:
            return all_gather_with_grad(x)
        gathered = all_gather_no_grad(x.detach())
        if self.local_loss:
            return gathered
        # The local slice keeps its gradient, the others are constants (open_clip's gather_features).
        rows = x.shape[0]
        return torch.cat([gathered[: self.rank * rows], x, gathered[(self.rank + 1) * rows :]], dim=0)

    def _gather_mask(self, mask: torch.Tensor) -> torch.Tensor:
        # Not every backend gathers bool tensors.
        return all_gather_no_grad(mask.to(torch.uint8)).bool()

    def _max_length(self, length: int, device: torch.device) -> int:
        return all_reduce_max(length, device)

    def _rows_and_columns(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, columns) of the batch-level scores: local/local, local/gathered or gathered/gathered."""
        if not self._distributed:
            return x, x
        gathered = self._gather(x)
        return (x, gathered) if self.local_loss else (gathered, gathered)

    def _token_rows_and_columns(self, x: torch.Tensor, mask: torch.Tensor):
        """As ``_rows_and_columns`` for a token set ``[B, L, d]`` with mask ``[B, L]``, padded to the longest L."""
        if not self._distributed:
            return x, mask, x, mask
        length = self._max_length(x.shape[1], x.device)
        x = F.pad(x, (0, 0, 0, length - x.shape[1]))
        mask = F.pad(mask, (0, length - mask.shape[1]), value=False)
        x_all, mask_all = self._gather(x), self._gather_mask(mask)
        if self.local_loss:
            return x, mask, x_all, mask_all
        return x_all, mask_all, x_all, mask_all

    def _row_offset(self, n_rows: int) -> int:
        """Index of the first local row among the gathered columns (0 unless ``local_loss``)."""
        return n_rows * self.rank if self._distributed and self.local_loss else 0

    def get_ground_truth(self, device: torch.device, num_logits: int) -> torch.Tensor:
        """Positive column of each row (open_clip's name and caching)."""
        if self.prev_num_logits != num_logits or device not in self.labels:
            labels = torch.arange(num_logits, device=device, dtype=torch.long) + self._row_offset(num_logits)
            if self.cache_labels:
                self.labels[device] = labels
                self.prev_num_logits = num_logits
            return labels
        return self.labels[device]

    # -- the terms -----------------------------------------------------------------------------------

    def _contrastive(self, image, text, logit_scale, logit_bias) -> torch.Tensor:
        """Symmetric InfoNCE ``½[CE(s·v tᵀ + bias) + CE(s·t vᵀ + bias)]``, rows against gathered columns."""
        image_rows, image_cols = self._rows_and_columns(image)
        text_rows, text_cols = self._rows_and_columns(text)
        acc = torch.float64 if image.dtype == torch.float64 else torch.float32
        logits_per_image = logit_scale * (image_rows.to(acc) @ text_cols.to(acc).T)
        logits_per_text = logit_scale * (text_rows.to(acc) @ image_cols.to(acc).T)
        if logit_bias is not None:
            logits_per_image = logits_per_image + logit_bias
            logits_per_text = logits_per_text + logit_bias
        labels = self.get_ground_truth(image.device, logits_per_image.shape[0])
        return 0.5 * (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels))

    def _slot_contrastive(self, t2i, i2t, row_mask, col_mask) -> torch.Tensor:
        """Masked per-slot symmetric InfoNCE (reference ``slotwise_contrastive_loss``) on a row block.

        ``t2i[m, b, c]`` scores subcaption m of row caption b against column image c; ``i2t[m, c, b]`` row
        image c against column caption b. Masks: ``row_mask [Br, M]``, ``col_mask [Bc, M]``. Slots with
        fewer than 2 valid samples over the whole (gathered) batch are left out of the mean.
        """
        offset = self._row_offset(t2i.shape[1])
        rows = torch.arange(t2i.shape[1], device=t2i.device)
        valid_rows, valid_cols = row_mask.T, col_mask.T  # [M, Br], [M, Bc]

        def nll(logits):
            filled = logits.masked_fill(~valid_cols[:, None, :], torch.finfo(logits.dtype).min)
            return torch.logsumexp(filled, dim=2) - logits[:, rows, rows + offset]  # [M, Br]

        per_slot = 0.5 * (masked_mean(nll(t2i), valid_rows) + masked_mean(nll(i2t), valid_rows))
        used = valid_cols.sum(dim=1) >= 2
        return (per_slot * used).sum() / used.sum().clamp(min=1)

    def _sap(self, sub, sub_mask, tokens, token_mask, logit_scale) -> torch.Tensor:
        k = max(1, math.ceil(self.spec.sap_topk_ratio * tokens.shape[1]))
        tau = self.spec.tau_sap
        acc = torch.float64 if sub.dtype == torch.float64 else torch.float32
        if self.spec.sap_pairing == "matched":
            # v̄[b, i] uses image b's own tokens: computed locally, then gathered like any batch feature.
            agg = self._op("topk_patch_aggregate")(sub, tokens, sub_mask, token_mask, k, tau)
            sub_rows, mask_rows, sub_cols, mask_cols = self._token_rows_and_columns(sub, sub_mask)
            agg_rows, _, agg_cols, _ = self._token_rows_and_columns(agg, sub_mask)
            t2i = torch.einsum("bmd,cmd->mbc", sub_rows.to(acc), agg_cols.to(acc))
            i2t = torch.einsum("cmd,bmd->mcb", agg_rows.to(acc), sub_cols.to(acc))
        else:
            sub_rows, mask_rows, sub_cols, mask_cols = self._token_rows_and_columns(sub, sub_mask)
            tok_rows, tmask_rows, tok_cols, tmask_cols = self._token_rows_and_columns(tokens, token_mask)
            k = max(1, math.ceil(self.spec.sap_topk_ratio * tok_cols.shape[1]))
            pairwise = self._op("pairwise_topk_aggregate_logits")
            cos_t2i = pairwise(sub_rows, tok_cols, mask_rows, tmask_cols, k, tau)  # [Br, Bc, M]
            t2i = cos_t2i.to(acc).permute(2, 0, 1)
            if sub_rows is sub_cols:
                i2t = t2i.transpose(1, 2)
            else:
                cos_i2t = pairwise(sub_cols, tok_rows, mask_cols, tmask_rows, k, tau)  # [Bc, Br, M]
                i2t = cos_i2t.to(acc).permute(2, 1, 0)
        return self._slot_contrastive(logit_scale * t2i, logit_scale * i2t, mask_rows, mask_cols)

    def _finelip(self, image, text, image_tokens, text_tokens, image_mask, text_mask) -> torch.Tensor:
        """FineLIP's hinge loss (reference ``finelip_hinge_loss``) on late-interaction scores of a row block."""
        ones = torch.ones_like(image_mask[:, :1])
        v_rows, vm_rows, v_cols, vm_cols = self._token_rows_and_columns(
            torch.cat([image[:, None], image_tokens], dim=1), torch.cat([ones, image_mask], dim=1)
        )
        t_rows, tm_rows, t_cols, tm_cols = self._token_rows_and_columns(
            torch.cat([text[:, None], text_tokens], dim=1), torch.cat([ones, text_mask], dim=1)
        )
        maxsim = self._op("pairwise_maxsim")
        acc = torch.float64 if image.dtype == torch.float64 else torch.float32
        s_t2i = maxsim(t_rows, v_cols, tm_rows, vm_cols, bidirectional=True, negative_slope=0.1).to(acc)
        s_i2t = s_t2i.T if t_rows is t_cols else maxsim(t_cols, v_rows, tm_cols, vm_rows, True, 0.1).to(acc).T
        # s_t2i[b, c]: row caption b vs column image c; s_i2t[c, b]: row image c vs column caption b.
        n_rows = s_t2i.shape[0]
        rows = torch.arange(n_rows, device=s_t2i.device)
        offset = self._row_offset(n_rows)
        negative = torch.ones_like(s_t2i, dtype=torch.bool)
        negative[rows, rows + offset] = False
        margin = self.spec.finelip_margin
        cost_t2i = (margin + s_t2i - s_t2i[rows, rows + offset][:, None]).clamp(min=0) * negative
        cost_i2t = (margin + s_i2t - s_i2t[rows, rows + offset][:, None]).clamp(min=0) * negative
        if self.spec.finelip_hardest_negative:
            return (cost_t2i.amax(dim=1).sum() + cost_i2t.amax(dim=1).sum()) / n_rows
        return (cost_t2i.sum() + cost_i2t.sum()) / n_rows

    # -- forward -------------------------------------------------------------------------------------

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
        """
        spec = self.spec
        _checks.check_tokens("image_features", image_features, ndim=2)
        _checks.check_tokens("text_features", text_features, ndim=2)
        _checks.check_same_width("image_features", image_features, "text_features", text_features)
        _checks.check_same_batch("image_features", image_features, "text_features", text_features)
        _checks.check_positive("logit_scale", logit_scale)
        if (image_token_mask is not None and image_tokens is None) or (
            text_token_mask is not None and text_tokens is None
        ):
            raise ValueError("a token mask was passed without its tokens (image_tokens / text_tokens)")
        if sub_mask is not None and sub_text_features is None:
            raise ValueError("sub_mask was passed without sub_text_features")
        if self._distributed:
            self._check_process_group()
        batch = image_features.shape[0]
        for name, tokens in (
            ("image_tokens", image_tokens),
            ("text_tokens", text_tokens),
            ("sub_text_features", sub_text_features),
            ("sap_tokens", sap_tokens),
        ):
            if tokens is not None:
                _checks.check_tokens(name, tokens)
                _checks.check_same_width("image_features", image_features, name, tokens)
                if tokens.shape[0] != batch:
                    raise ValueError(f"{name} must have the batch size {batch}, got {tokens.shape[0]}")
        if short_text_features is not None:
            _checks.check_tokens("short_text_features", short_text_features, ndim=2)
            _checks.check_same_batch("image_features", image_features, "short_text_features", short_text_features)

        image, text = F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1)
        terms: dict[str, torch.Tensor] = {}
        if "global_long" in spec.terms:
            terms["global_long"] = self._contrastive(image, text, logit_scale, logit_bias)
        if "global_short" in spec.terms and short_text_features is not None:
            short = F.normalize(short_text_features, dim=-1)
            terms["global_short"] = self._contrastive(image, short, logit_scale, logit_bias)
        v_tokens = None if image_tokens is None else F.normalize(image_tokens, dim=-1)
        t_tokens = None if text_tokens is None else F.normalize(text_tokens, dim=-1)
        v_mask = (
            None
            if v_tokens is None
            else _checks.check_mask("image_token_mask", image_token_mask, v_tokens, "image_tokens")
        )
        t_mask = (
            None
            if t_tokens is None
            else _checks.check_mask("text_token_mask", text_token_mask, t_tokens, "text_tokens")
        )
        if "word" in spec.terms and v_tokens is not None and t_tokens is not None:
            terms["word"] = self._op("wpr_loss")(v_tokens, t_tokens, v_mask, t_mask, spec.tau_attn, spec.tau_contrast)
        if "sub" in spec.terms and sub_text_features is not None and (sap_tokens is not None or v_tokens is not None):
            sub = F.normalize(sub_text_features, dim=-1)
            s_mask = _checks.check_mask("sub_mask", sub_mask, sub, "sub_text_features")
            if sap_tokens is None:
                x, x_mask = v_tokens, v_mask
            else:
                x = F.normalize(sap_tokens, dim=-1)
                x_mask = _checks.check_mask("sap_token_mask", sap_token_mask, x, "sap_tokens")
            terms["sub"] = self._sap(sub, s_mask, x, x_mask, logit_scale)
        if "finelip" in spec.terms and v_tokens is not None and t_tokens is not None:
            terms["finelip"] = self._finelip(image, text, v_tokens, t_tokens, v_mask, t_mask)
        if not terms:
            raise ValueError(f"none of the enabled terms {spec.terms} got its inputs")
        weighted = {
            OUTPUT_KEYS[name]: spec.weights[name] * (fine_grained_scale if name in FINE_GRAINED_TERMS else 1.0) * value
            for name, value in terms.items()
        }
        if output_dict:
            return weighted
        return sum(weighted.values())
