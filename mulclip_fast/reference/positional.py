"""Long-CLIP's positional stretching (docs/method.md, "Positional stretching")."""

from __future__ import annotations

import torch

from .masking import accumulation_dtype


def stretch_positional_embedding(table77: torch.Tensor, target: int = 248, keep: int = 20) -> torch.Tensor:
    """Stretch a learned positional table from ``n`` positions to ``target`` (Long-CLIP's rule).

    With ``r = (target - keep) / (n - keep)`` (4 for 77 -> 248 with keep = 20):

    * ``new[p] = old[p]`` for ``p < keep`` (well-trained early positions are kept as they are);
    * ``new[keep + r·i + j] = (1 - j/r)·old[keep + i] + (j/r)·old[keep + i + 1]``
      for ``i in 0 .. n-keep-2`` and ``j in 0 .. r-1`` (linear interpolation);
    * ``new[target - r + j] = old[n-1] + j·(old[n-1] - old[n-2])/r`` (extrapolation past the end).

    Args:
        table77: ``[n, d]`` positional table (77 rows for OpenAI CLIP).
        target: number of positions wanted; ``target - keep`` must be a multiple of ``n - keep``.
        keep: leading positions copied unchanged.

    Returns:
        ``[target, d]`` table in the dtype of ``table77``.
    """
    if not isinstance(table77, torch.Tensor) or table77.dim() != 2:
        raise ValueError(f"table77 must be a [n, d] tensor, got {getattr(table77, 'shape', table77)!r}")
    n = table77.shape[0]
    if not 0 <= keep <= n - 2:
        raise ValueError(f"keep must satisfy 0 <= keep <= n - 2 = {n - 2}, got {keep}")
    if target < n or (target - keep) % (n - keep) != 0:
        raise ValueError(
            f"target must be >= n = {n} with (target - keep) a multiple of (n - keep) = {n - keep}, got {target}"
        )
    r = (target - keep) // (n - keep)
    # Half-precision tables are interpolated in float32; float64 stays float64.
    old = table77.to(accumulation_dtype(table77))
    frac = torch.arange(r, dtype=old.dtype, device=old.device) / r  # j / r
    left, right = old[keep : n - 1], old[keep + 1 : n]  # [n-keep-1, d]
    interpolated = (1 - frac)[None, :, None] * left[:, None] + frac[None, :, None] * right[:, None]
    tail = old[n - 1] + frac[:, None] * (old[n - 1] - old[n - 2])
    new = torch.cat([old[:keep], interpolated.reshape(-1, old.shape[1]), tail])
    return new.to(table77.dtype)
