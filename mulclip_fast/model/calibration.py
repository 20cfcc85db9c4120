"""FineLIP's local token calibration: a trainable module of the model, fed to WPR, SAP and FineLIP."""

from __future__ import annotations

import torch
from torch import nn

from ..reference.checks import check_mask, check_tokens
from ..reference.masking import masked_softmax


class LocalTokenCalibration(nn.Module):
    """Aggregate ``N`` (masked) tokens into ``N'`` calibrated tokens.

    ``Z = MLP(X)`` with ``MLP = LayerNorm(d) → Linear(d, ⌊0.2 d⌋) → GELU → Linear(⌊0.2 d⌋, N')``,
    ``A = softmax_N(α · Zᵀ)`` over the valid tokens, ``X' = A · X``. ``α`` is a learnable scalar (init 1).

    Input ``x [B, N, d]`` and optional ``mask [B, N]`` (True = valid); output ``[B, N', d]``. A sample
    with no valid token gives zeros.
    """

    def __init__(self, d: int, n_out: int, hidden_ratio: float = 0.2):
        super().__init__()
        if d < 1 or n_out < 1:
            raise ValueError(f"d and n_out must be positive, got d={d}, n_out={n_out}")
        hidden = max(1, int(hidden_ratio * d))
        self.n_out = n_out
        self.mlp = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, n_out))
        self.alpha = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        check_tokens("x", x)
        mask = check_mask("mask", mask, x, "x")
        z = self.mlp(x)  # [B, N, N']
        attn = masked_softmax(self.alpha * z.transpose(1, 2), mask[:, None, :], dim=-1)  # [B, N', N]
        return attn @ x
