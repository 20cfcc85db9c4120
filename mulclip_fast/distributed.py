"""Data parallelism: rank helpers, the one differentiable all-gather, and how a loss sees the global batch.

Every batch-level loss term couples all pairs of the *global* batch. Following open_clip's local-loss /
gather-with-grad pattern, a rank gathers the *columns* (every rank's features) and scores only its own
*rows* against them. :class:`BatchSharding` is that view of the batch — which rows, which columns, where
the rank's rows sit among the columns — and the only place where the losses call a collective. One
process is world size 1 of the same view: rows are the columns, offset 0, no collective at all.
``mulclip_fast.loss_terms`` states what each rank's loss value is and why N ranks equal one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F

# How long the other ranks wait for rank 0's work of its own in the middle of a run (a validation, a
# checkpoint): much longer than a collective may take, since a large model's checkpoint on a slow disk can
# take minutes. A rank 0 that dies still ends the wait at once (its connections close).
MAIN_RANK_WORK_TIMEOUT_S = 3600.0


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    # A gloo group with MAIN_RANK_WORK_TIMEOUT_S, for wait_for_main_rank (None without a process group).
    waiting_group: object = field(default=None, compare=False, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_main_process() -> bool:
    """Whether this process is rank 0 (or runs alone), known before the process group forms: torchrun's
    ``RANK`` is the rank the group gives it."""
    return not launched_by_torchrun() or int(os.environ["RANK"]) == 0


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
    # gloo whatever the main backend: the wait is on the host, and NCCL's watchdog sees no collective in it.
    waiting_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=MAIN_RANK_WORK_TIMEOUT_S))
    return DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank, waiting_group)


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
    """The largest of every rank's ``value`` (a number, a flag, or a tuple of numbers, taken element by
    element in one collective), so that all ranks take one decision.

    Used where the ranks must decide alike or the next collective would hang: stopping (a time limit
    measured on each rank's clock, a signal that reached some ranks first, must end the loop at the same step
    everywhere), and whether any rank's rows of a batch lost an unreadable sample (``iterate_batches``).
    """
    if not context.enabled:
        return value
    values = value if isinstance(value, tuple) else (value,)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    agreed = tuple(type(v)(x) for v, x in zip(values, t.tolist(), strict=True))
    return agreed if isinstance(value, tuple) else agreed[0]


def wait_for_main_rank(context: DistributedContext) -> None:
    """Hold every rank until rank 0 has finished work of its own in the middle of training (no-op without a
    process group); every rank calls it at the same step.

    Without it the other ranks would go on to the next collective and wait for rank 0 there, under the
    group's timeout (300 s): a validation or checkpoint longer than that failed the job. Here they wait
    in a group whose timeout is MAIN_RANK_WORK_TIMEOUT_S."""
    if context.enabled and context.waiting_group is not None:
        dist.barrier(group=context.waiting_group)


def finish_collectives(context: DistributedContext) -> None:
    """Wait until every rank has passed its last collective (no-op without a process group).

    Called when the collectives are over and before any rank leaves the group or starts work of its own:
    a rank that tears its connections down while a message of the last collective is still in flight can
    abort (gloo: ``terminate called without an active exception``), and rank 0's own work afterwards (the
    final checkpoint, evaluation and plots) then runs outside the group's timeout."""
    if context.enabled and dist.is_initialized():
        dist.barrier()


def shutdown_distributed(context: DistributedContext) -> None:
    """Leave the process group (no-op without one), without waiting for the other ranks: call
    ``finish_collectives`` first.

    Training ends with work rank 0 does alone, after the last collective. A barrier here would keep the
    other ranks waiting for it under the group's timeout, and an evaluation longer than that failed them,
    whereupon torchrun stopped rank 0 in the middle of it. torchrun waits for every rank to exit, so a rank
    that leaves first ends nothing."""
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0; gradients flow back to each rank's own rows."""
    return _AllGatherWithGrad.apply(x)


def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (e.g. a bool mask) from every rank along dim 0, outside autograd."""
    if x.dtype == torch.bool:  # not every backend gathers bool tensors (NCCL does not)
        return all_gather_no_grad(x.to(torch.uint8)).bool()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_max(value: int, device: torch.device) -> int:
    t = torch.tensor([value], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of a (detached) tensor, e.g. a count."""
    x = x.detach().clone()
    dist.all_reduce(x)
    return x


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


@dataclass(frozen=True)
class BatchSharding:
    """How one rank's loss sees the global batch: its rows, the gathered columns, its offset among them.

    Args:
        rank, world_size: this process's place in the process group (0 and 1 for one process).
        local_loss: score only this rank's rows against the gathered columns (open_clip's ``local_loss``);
            False scores every gathered row on every rank, as open_clip does by default.
        gather_with_grad: gradients flow back through the gathered columns to the rank that owns them.
            Without it, only this rank's own features carry gradient (open_clip's default gather: the
            local slice of the gathered tensor is the local tensor itself unless ``local_loss``).

    Every rank must hold the same number of samples; token sets and subcaption slots of different
    lengths are padded to the longest over the ranks and masked.
    """

    rank: int = 0
    world_size: int = 1
    local_loss: bool = True
    gather_with_grad: bool = True

    def __post_init__(self):
        if isinstance(self.world_size, bool) or not isinstance(self.world_size, int) or self.world_size < 1:
            raise ValueError(f"world_size must be an int >= 1, got {self.world_size!r}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be an int in [0, world_size={self.world_size}), got {self.rank!r}")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def rows_are_gathered(self) -> bool:
        """Whether every rank scores every row of the global batch (so each row is scored world-size times)."""
        return self.enabled and not self.local_loss

    def check_process_group(self) -> None:
        """Fail clearly when the process group is missing or disagrees with ``rank`` / ``world_size``."""
        if not self.enabled:
            return
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(f"world_size={self.world_size} needs an initialised torch.distributed process group")
        if dist.get_world_size() != self.world_size or dist.get_rank() != self.rank:
            raise ValueError(
                f"rank={self.rank}, world_size={self.world_size} disagree with the process group "
                f"(rank {dist.get_rank()} of {dist.get_world_size()})"
            )

    def columns(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` of every rank concatenated along dim 0 (``x`` itself for one process)."""
        if not self.enabled:
            return x
        if self.gather_with_grad:
            return all_gather_with_grad(x)
        gathered = all_gather_no_grad(x)
        if self.local_loss:
            return gathered
        rows = x.shape[0]
        return torch.cat([gathered[: self.rank * rows], x, gathered[(self.rank + 1) * rows :]], dim=0)

    def rows_and_columns(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, columns) of ``x``; the rows are the columns themselves (same object) unless ``local_loss``."""
        columns = self.columns(x)
        return (columns, columns) if self.rows_are_gathered else (x, columns)

    def mask_rows_and_columns(self, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`rows_and_columns` for a bool mask, which carries no gradient."""
        columns = all_gather_no_grad(mask) if self.enabled else mask
        return (columns, columns) if self.rows_are_gathered else (mask, columns)

    def token_rows_and_columns(self, tokens: torch.Tensor, mask: torch.Tensor):
        """``(rows, row_mask, columns, column_mask)`` of a token set ``[n, L, d]`` with its ``[n, L]`` mask,
        padded to the longest L over the ranks."""
        tokens, mask = self.pad_to_longest(tokens, mask)
        rows, columns = self.rows_and_columns(tokens)
        row_mask, column_mask = self.mask_rows_and_columns(mask)
        return rows, row_mask, columns, column_mask

    def pad_to_longest(self, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad dim 1 of ``tokens [n, L, ...]`` and ``mask [n, L]`` to the longest L over the ranks."""
        if not self.enabled:
            return tokens, mask
        length = all_reduce_max(tokens.shape[1], tokens.device)
        return pad_to(tokens, length), pad_to(mask, length, value=False)

    def row_offset(self, local_rows: int) -> int:
        """Index among the columns of this rank's first row."""
        return self.rank * local_rows if self.enabled and self.local_loss else 0

    def global_sum(self, count: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of a count (no gradient)."""
        return all_reduce_sum(count) if self.enabled else count

    def rank_value(self, share: torch.Tensor) -> torch.Tensor:
        """What this rank returns for a term whose share of the global loss is ``share``.

        ``world_size · share`` when the rank scored only its own rows, so that the mean over ranks is the
        global loss; ``share`` itself when every rank scored every row (:attr:`rows_are_gathered`: ``share``
        is then the whole loss).
        """
        return share if self.rows_are_gathered else self.world_size * share


__all__ = [
    "BatchSharding",
    "DistributedContext",
    "agree",
    "all_gather_no_grad",
    "all_gather_with_grad",
    "all_reduce_max",
    "all_reduce_mean",
    "all_reduce_sum",
    "finish_collectives",
    "init_distributed",
    "launched_by_torchrun",
    "pad_to",
    "shutdown_distributed",
    "wait_for_main_rank",
]
