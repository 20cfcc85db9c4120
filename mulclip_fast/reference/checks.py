"""Argument validation shared by the reference, the ops, the losses and the adapters.

Every public entry point checks its inputs up front and raises a ``ValueError`` that names the
argument and the expected form, so a bad call fails at the boundary instead of deep inside a kernel.
Public so that every layer may import it; like the rest of ``reference`` it imports nothing else of ours.
"""

from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Whether check_tokens scans its input for NaN/Inf (see set_finite_checks).
_finite_checks = True


def set_finite_checks(enabled: bool) -> bool:
    """Switch the NaN/Inf scan of every op's token inputs on or off; returns the previous setting.

    On by default (docs/method.md, "Edge cases and bad input": bad values are reported, not propagated).
    Each scan reads its input once and waits for the result, a host sync per input on CUDA; a training loop
    that already checks its loss for NaN can switch the scans off, as ``torch.distributions`` lets one switch
    off ``validate_args``. Shape, dtype, device and mask checks stay on.
    """
    global _finite_checks
    previous, _finite_checks = _finite_checks, bool(enabled)
    return previous


def check_tokens(name: str, x: torch.Tensor, ndim: int = 3) -> None:
    """``x`` is a floating tensor of rank ``ndim`` with finite values."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        form = {2: "[B, d]", 3: "[B, L, d]"}.get(ndim, f"rank {ndim}")
        raise ValueError(f"{name} must have shape {form}, got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.shape[-1] == 0:
        raise ValueError(f"{name} has an empty feature dimension: shape {tuple(x.shape)}")
    # NaN/Inf are reported, never propagated silently (docs/method.md, "Edge cases and bad input"), unless
    # switched off by set_finite_checks. Skipped while tracing, where data-dependent checks would break the graph.
    if _finite_checks and not torch.compiler.is_compiling() and not all_finite(x):
        raise ValueError(f"{name} contains NaN or Inf values")


def all_finite(x: torch.Tensor) -> bool:
    """Whether every value of ``x`` is finite, read with one host sync and no input-sized temporaries.

    The minimum and the maximum are finite exactly when no value is NaN or ±Inf (``torch.aminmax``
    propagates NaN). ``torch.isfinite(x).all()`` says the same but allocates ``abs(x)`` and boolean masks,
    1.7× the input: at the calibrated shapes more than a fused op's whole working memory.
    """
    if x.numel() == 0 or x.is_meta:  # no values to scan (meta tensors carry shapes only)
        return True
    low, high = torch.aminmax(x)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def check_same_width(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"{name_a} and {name_b} must share the feature width d, got {a.shape[-1]} and {b.shape[-1]}")
    if a.device != b.device:
        raise ValueError(f"{name_a} is on {a.device} but {name_b} is on {b.device}")
    if a.dtype != b.dtype:
        raise ValueError(f"{name_a} is {a.dtype} but {name_b} is {b.dtype}: pass one dtype")


def check_same_batch(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{name_a} and {name_b} must have the same batch size, got {a.shape[0]} and {b.shape[0]}")


def check_mask(name: str, mask: torch.Tensor | None, like: torch.Tensor, like_name: str) -> torch.Tensor:
    """Validate a boolean validity mask of shape ``like.shape[:-1]``; ``None`` means all valid."""
    expected = tuple(like.shape[:-1])
    if mask is None:
        return torch.ones(expected, dtype=torch.bool, device=like.device)
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{name} must be a bool tensor of shape {expected} or None")
    if mask.dtype != torch.bool:
        raise ValueError(f"{name} must have dtype torch.bool (True = valid token), got {mask.dtype}")
    if tuple(mask.shape) != expected:
        raise ValueError(f"{name} must have shape {expected} to match {like_name}, got {tuple(mask.shape)}")
    if mask.device != like.device:
        raise ValueError(f"{name} is on {mask.device} but {like_name} is on {like.device}")
    return mask


def check_positive(name: str, value: float) -> None:
    """A temperature or a logit scale: a number (or one-element tensor) in (0, ∞)."""
    _check_number_in(name, value, "a positive finite number", lambda v: 0 < v < math.inf)


def check_non_negative(name: str, value: float) -> None:
    """A weight or a ramp factor: a number (or one-element tensor) in [0, ∞)."""
    _check_number_in(name, value, "a finite number >= 0", lambda v: 0 <= v < math.inf)


def _check_number_in(name: str, value, expected: str, in_range) -> None:
    if isinstance(value, bool):  # True would pass as 1: a flag given where a number belongs
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be {expected} or a one-element tensor, got shape {tuple(value.shape)}")
        if torch.compiler.is_compiling():
            return  # reading the value would break the graph; eager calls check it
        value = float(value.detach())
    if not isinstance(value, numbers.Real):  # a NumPy scalar is one
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    # Comparisons, not math.isfinite: torch.compile traces a float that differs between calls (any float under
    # dynamic=True) as a symbolic float, which comparisons read (as guards) and math.isfinite cannot. NaN fails.
    if not in_range(value):
        if torch.compiler.is_compiling():  # nor can Dynamo format a symbolic float; its debug context shows it
            raise ValueError(f"{name} must be {expected}")
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def check_maxsim_options(bidirectional: bool, negative_slope: float | None) -> float | None:
    """Validate max-sim's options; returns ``negative_slope`` as a float (or None: no LeakyReLU)."""
    if not isinstance(bidirectional, bool):
        raise ValueError(f"bidirectional must be a bool, got {type(bidirectional).__name__}")
    if negative_slope is None:
        return None
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, (int, float)):
        raise ValueError(f"negative_slope must be None or a float >= 0, got {negative_slope!r}")
    if not (math.isfinite(negative_slope) and negative_slope >= 0):
        raise ValueError(f"negative_slope must be None or a finite float >= 0, got {negative_slope!r}")
    return float(negative_slope)


def check_topk(k: int, n_tokens: int, name: str = "k") -> None:
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"{name} must be an int count of tokens, got {type(k).__name__}")
    if not 1 <= k <= n_tokens:
        raise ValueError(f"{name} must satisfy 1 <= {name} <= N = {n_tokens} (number of patch tokens), got {k}")


def check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
