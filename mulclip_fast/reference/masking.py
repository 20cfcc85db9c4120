"""Masked reductions (True = valid) and the accumulation dtype, shared by the reference, the ops and the losses.

Public so that every layer may import them; like the rest of ``reference`` it imports nothing else of ours.
"""

from __future__ import annotations

import torch


def accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64; every other float type accumulates in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax over the ``True`` entries of ``mask`` (broadcast against ``logits``).

    Masked entries get probability 0; a row with no valid entry gives all zeros (not NaN), and
    no NaN reaches the gradient either.
    """
    filled = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
    return torch.softmax(filled, dim=dim) * mask


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Mean of ``x`` over the ``True`` entries of ``mask`` along ``dim``; 0 where none is valid."""
    count = mask.sum(dim=dim)
    return (x * mask).sum(dim=dim) / count.clamp(min=1)
