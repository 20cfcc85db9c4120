"""Data parallelism for MulCLIP: rank helpers, differentiable all-gather, and the per-rank loss share.

Every batch-level term of MulCLIP (global InfoNCE, SAP, FineLIP) couples all pairs of the *global*
batch. Following open_clip's local-loss / gather-with-grad pattern, each rank scores only its own
rows (its captions against every gathered image) and its own columns (its images against every
gathered caption), never the whole ``N × N`` problem. The global loss is a sum of per-row and
per-column terms divided by global counts, so it splits exactly into per-rank shares:

    L = Σ_r share_r,     share_r = (Σ_{rows of r} row_loss + Σ_{columns of r} col_loss) / global count

``DistributedMulCLIPLoss`` returns ``world · share_r`` for each term. Its mean over ranks is the
global loss, and because the all-gather's backward sums the gradients that every rank sends to a
gathered copy, ``DistributedDataParallel``'s gradient *average* over ranks is exactly the gradient of
the global loss: a 2-process step equals a 1-process step on the same global batch.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields, replace
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .losses import MulCLIPFeatures, MulCLIPLoss, _prepend_valid


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device: str, timeout_s: float = 300.0) -> DistributedContext:
    """Join the process group that ``torchrun`` describes in the environment (no-op otherwise).

    gloo on CPU, NCCL on CUDA; each CUDA rank takes the GPU of its ``LOCAL_RANK``. A rank that fails
    or stops answering ends the collective after ``timeout_s`` instead of hanging the job.
    """
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return DistributedContext()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank)


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums, over ranks, the gradients of this rank's rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        if dist.get_backend() == dist.Backend.NCCL:
            out = torch.empty_like(grad[: ctx.rows])
            dist.reduce_scatter_tensor(out, grad)
            return out
        # gloo has no reduce-scatter: an all-reduce moves world-size times the bytes, same result.
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def agree(value, context: DistributedContext):
    """The largest of every rank's ``value`` (a number or a flag), so that all ranks take one decision.

    Used for stopping: a time limit measured on each rank's clock, or a signal that reached some ranks
    first, must end the loop at the same step everywhere, or the next collective would hang.
    """
    if not context.enabled:
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return type(value)(t.item()) if not isinstance(value, bool) else bool(t.item())


def shutdown_distributed(context: DistributedContext) -> None:
    """Wait for every rank, then leave the process group (no-op without one)."""
    if context.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0; gradients flow back to each rank's own rows."""
    return _AllGatherWithGrad.apply(x)


def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (e.g. a bool mask) from every rank along dim 0, outside autograd."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_max(value: int, device: torch.device) -> int:
    t = torch.tensor([value], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean over ranks of a (detached) tensor, for logging."""
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / dist.get_world_size()


def pad_to(x: torch.Tensor | None, length: int, dim: int = 1, value=0) -> torch.Tensor | None:
    """Pad dim ``dim`` of ``x`` to ``length`` (ranks must gather equal shapes)."""
    if x is None or x.shape[dim] == length:
        return x
    pad = [0, 0] * (x.dim() - dim - 1) + [0, length - x.shape[dim]]
    return F.pad(x, pad, value=value)


def _masked_row_ce(logits: torch.Tensor, targets: torch.Tensor, col_mask: torch.Tensor) -> torch.Tensor:
    """Per row: −log softmax(logits[row] over the valid columns)[target[row]]; ``[..., n, N] → [..., n]``."""
    filled = logits.masked_fill(~col_mask, torch.finfo(logits.dtype).min)
    positives = logits.gather(-1, targets.expand(*logits.shape[:-1]).unsqueeze(-1)).squeeze(-1)
    return torch.logsumexp(filled, dim=-1) - positives


def infonce_share(a_local, b_local, a_all, b_all, offset: int, logit_scale) -> torch.Tensor:
    """This rank's share of the symmetric InfoNCE ``L_batch(a, b)`` over the gathered batch of N."""
    n, total = a_local.shape[0], a_all.shape[0]
    targets = torch.arange(offset, offset + n, device=a_local.device)
    every = torch.ones(total, dtype=torch.bool, device=a_local.device)
    rows = _masked_row_ce(logit_scale * a_local @ b_all.T, targets, every)  # a_i against every b
    cols = _masked_row_ce(logit_scale * b_local @ a_all.T, targets, every)  # b_j against every a
    return 0.5 * (rows.sum() + cols.sum()) / total


def slotwise_share(row_logits, col_logits, mask_local, mask_all, offset: int) -> torch.Tensor:
    """This rank's share of :func:`mulclip_fast.reference.slotwise_contrastive_loss`.

    ``row_logits[m, b, c]``: local caption b against every image c; ``col_logits[m, c, b]``: local
    image c against every caption b. Masks ``[n, M]`` (local) and ``[N, M]`` (all ranks).
    """
    n = mask_local.shape[0]
    valid_all, valid_local = mask_all.T, mask_local.T  # [M, N], [M, n]
    targets = torch.arange(offset, offset + n, device=row_logits.device)
    t2i = _masked_row_ce(row_logits, targets, valid_all[:, None, :])
    i2t = _masked_row_ce(col_logits, targets, valid_all[:, None, :])
    count = valid_all.sum(dim=1)
    per_slot = 0.5 * ((t2i * valid_local).sum(1) + (i2t * valid_local).sum(1)) / count.clamp(min=1)
    used = count >= 2
    return (per_slot * used).sum() / used.sum().clamp(min=1)


def finelip_share(row_scores, col_scores, offset: int, margin: float) -> torch.Tensor:
    """This rank's share of :func:`mulclip_fast.reference.finelip_hinge_loss` (sum over negatives).

    ``row_scores[b, c]``: local caption b against every image c; ``col_scores[b, c]``: every caption
    b against local image c.
    """
    n, total = row_scores.shape
    local = torch.arange(n, device=row_scores.device)
    row_pos = row_scores[local, offset + local]
    col_pos = col_scores[offset + local, local]
    row_negative = torch.ones_like(row_scores, dtype=torch.bool)
    row_negative[local, offset + local] = False
    col_negative = row_negative.T
    cost_t2i = (margin + row_scores - row_pos[:, None]).clamp(min=0) * row_negative
    cost_i2t = (margin + col_scores - col_pos[None, :]).clamp(min=0) * col_negative
    return (cost_t2i.sum() + cost_i2t.sum()) / total


class DistributedMulCLIPLoss:
    """Run a :class:`MulCLIPLoss` on this rank's slice of the global batch.

    ``forward`` takes the *local* features and returns, per term and for ``"loss"``, ``world · share``
    of the global value (see the module docstring): back-propagate ``out["loss"]`` under DDP, and log
    :func:`all_reduce_mean` of the values. With one process it returns what ``loss`` returns.
    """

    def __init__(self, loss: MulCLIPLoss, context: DistributedContext):
        if context.enabled and loss.finelip_hardest_negative and "finelip" in loss.terms:
            raise ValueError("finelip_hardest_negative is not supported with data parallelism: use the sum")
        self.loss = loss
        self.context = context

    def __call__(self, features: MulCLIPFeatures, logit_scale, fine_grained_scale: float = 1.0):
        if not self.context.enabled:
            return self.loss(features, logit_scale, fine_grained_scale)
        return self._forward(features, logit_scale, fine_grained_scale)

    def _forward(self, f: MulCLIPFeatures, logit_scale, fine_grained_scale):
        loss, world = self.loss, self.context.world_size
        n = f.image_cls.shape[0]
        offset = self.context.rank * n
        f = self._normalized(f)
        v_all, t_all = all_gather_with_grad(f.image_cls), all_gather_with_grad(f.text_eot)
        if v_all.shape[0] != n * world:
            raise ValueError("every rank must hold the same local batch size")
        out: dict[str, torch.Tensor] = {}
        if "global_long" in loss.terms:
            out["global_long"] = infonce_share(f.image_cls, f.text_eot, v_all, t_all, offset, logit_scale)
        if "global_short" in loss.terms:
            if f.short_eot is None:
                raise ValueError("the global_short term needs features.short_eot [B, d]")
            s_all = all_gather_with_grad(f.short_eot)
            out["global_short"] = infonce_share(f.image_cls, f.short_eot, v_all, s_all, offset, logit_scale)
        if "word" in loss.terms:
            out["word"] = self._word_share(f)
        if "sub" in loss.terms:
            out["sub"] = self._sap_share(f, offset, logit_scale)
        if "finelip" in loss.terms:
            out["finelip"] = self._finelip_share(f, v_all, t_all, offset)
        out = {name: world * value for name, value in out.items()}
        out["loss"] = loss.weighted_total(out, fine_grained_scale)
        return out

    @staticmethod
    def _normalized(f: MulCLIPFeatures) -> MulCLIPFeatures:
        tensors = {
            fld.name: F.normalize(getattr(f, fld.name), dim=-1)
            for fld in fields(f)
            if getattr(f, fld.name) is not None and getattr(f, fld.name).is_floating_point()
        }
        return replace(f, **tensors)

    def _word_share(self, f: MulCLIPFeatures) -> torch.Tensor:
        loss = self.loss
        per_sample = loss._op("wpr_loss")(
            f.image_tokens,
            f.text_tokens,
            f.image_token_mask,
            f.text_token_mask,
            loss.tau_attn,
            loss.tau_contrast,
            reduction="none",
        )
        has_both = torch.ones(per_sample.shape[0], dtype=torch.bool, device=per_sample.device)
        if f.image_token_mask is not None:
            has_both &= f.image_token_mask.any(dim=1)
        if f.text_token_mask is not None:
            has_both &= f.text_token_mask.any(dim=1)
        count = has_both.sum()
        dist.all_reduce(count)
        return per_sample.sum() / count.clamp(min=1)

    def _sap_share(self, f: MulCLIPFeatures, offset: int, logit_scale) -> torch.Tensor:
        loss = self.loss
        if f.sub_eot is None or f.sub_mask is None:
            raise ValueError("the sub term needs features.sub_eot [B, M, d] and features.sub_mask [B, M]")
        slots = all_reduce_max(f.sub_eot.shape[1], f.sub_eot.device)
        sub, sub_mask = pad_to(f.sub_eot, slots), pad_to(f.sub_mask, slots, value=False)
        tokens = f.image_tokens if f.sap_tokens is None else f.sap_tokens
        token_mask = f.image_token_mask if f.sap_tokens is None else f.sap_token_mask
        k = max(1, math.ceil(loss.sap_topk_ratio * tokens.shape[1]))
        sub_all, mask_all = all_gather_with_grad(sub), all_gather_no_grad(sub_mask)
        acc = torch.float64 if sub.dtype == torch.float64 else torch.float32
        if loss.sap_pairing == "matched":
            agg = loss._op("topk_patch_aggregate")(sub, tokens, sub_mask, token_mask, k, loss.tau_sap).to(acc)
            agg_all = all_gather_with_grad(agg)
            rows = torch.einsum("bmd,cmd->mbc", sub.to(acc), agg_all)
            cols = torch.einsum("bmd,cmd->mcb", sub_all.to(acc), agg)
        else:
            tokens_all = all_gather_with_grad(tokens)
            mask_tokens_all = None if token_mask is None else all_gather_no_grad(token_mask)
            pairwise = loss._op("pairwise_topk_aggregate_logits")
            rows = pairwise(sub, tokens_all, sub_mask, mask_tokens_all, k, loss.tau_sap).to(acc).permute(2, 0, 1)
            cols = pairwise(sub_all, tokens, mask_all, token_mask, k, loss.tau_sap).to(acc).permute(2, 1, 0)
        return slotwise_share(logit_scale * rows, logit_scale * cols, sub_mask, mask_all, offset)

    def _finelip_share(self, f: MulCLIPFeatures, v_all, t_all, offset: int) -> torch.Tensor:
        loss = self.loss
        v_tokens = torch.cat([f.image_cls[:, None], f.image_tokens], dim=1)
        t_tokens = torch.cat([f.text_eot[:, None], f.text_tokens], dim=1)
        v_mask = _with_leading_valid(f.image_token_mask, v_tokens)
        t_mask = _with_leading_valid(f.text_token_mask, t_tokens)
        v_tokens_all, t_tokens_all = all_gather_with_grad(v_tokens), all_gather_with_grad(t_tokens)
        v_mask_all, t_mask_all = all_gather_no_grad(v_mask), all_gather_no_grad(t_mask)
        maxsim = loss._op("pairwise_maxsim")
        rows = maxsim(t_tokens, v_tokens_all, t_mask, v_mask_all, bidirectional=True, negative_slope=0.1)
        cols = maxsim(t_tokens_all, v_tokens, t_mask_all, v_mask, bidirectional=True, negative_slope=0.1)
        acc = torch.float64 if rows.dtype == torch.float64 else torch.float32
        return finelip_share(rows.to(acc), cols.to(acc), offset, loss.finelip_margin)


def _with_leading_valid(mask: torch.Tensor | None, tokens: torch.Tensor) -> torch.Tensor:
    """Validity of ``[CLS/EOT, tokens…]``: ranks gather explicit masks, so None becomes all-True."""
    if mask is None:
        return torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
    return _prepend_valid(mask)


__all__ = [
    "DistributedContext",
    "DistributedMulCLIPLoss",
    "all_gather_with_grad",
    "all_reduce_mean",
    "agree",
    "shutdown_distributed",
    "init_distributed",
    "launched_by_torchrun",
]
