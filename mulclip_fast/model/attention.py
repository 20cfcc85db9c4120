"""Causal self-attention over a pack of variable-length sequences, by one of three backends.

The text tower's packed path (docs/performance.md, "Packed text") concatenates every text of a batch into
one token stream ``[T, heads, head_dim]`` described by ``cu_seqlens`` (flash-attn's convention: sequence
``i`` is rows ``cu_seqlens[i] … cu_seqlens[i+1]``). ``packed_causal_attention`` attends within each
sequence only, causally, with optional ALiBi biases, through:

- ``flash``: flash-attn's ``flash_attn_varlen_func`` (CUDA, fp16/bf16; ALiBi through its ``alibi_slopes``,
  so ``auto`` passes over a flash-attn from before that parameter for an ALiBi tower);
- ``xformers``: ``memory_efficient_attention`` with a ``BlockDiagonalCausalMask`` (CUDA). Its block-diagonal
  masks take no per-head ALiBi slopes, and an ALiBi bias tensor would be the dense ``[T, T]`` mask this path
  exists to avoid, so xformers serves the towers without ALiBi (the OpenAI presets) and ``auto`` never picks
  it for the ``tiny`` preset's ALiBi tower;
- ``torch``: everywhere else, CPU included. Sequences are sorted by length and cut into groups of similar
  length; each group is gathered into a padded ``[G, heads, L, head_dim]`` batch for
  ``F.scaled_dot_product_attention``. Padding sits after every real token and the attention is causal, so
  no real query sees it: exact, each group computing at most ``1 / SIMILAR_LENGTH_RATIO`` times its real
  tokens, and the largest mask is one group's ``[heads, L, L]``, never ``[T, T]``. Groups rather than
  one SDPA call per sequence, because a batch holds hundreds of texts and each call has a fixed cost.

flash-attn and xformers are imported lazily, on first use; neither installs on CPU-only machines. A package
that is installed but fails to import (built for another PyTorch or CUDA) counts as unusable: ``auto`` logs
why and takes the next backend, and asking for it is an error with the reason.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

TEXT_ATTENTION_BACKENDS = ("auto", "flash", "xformers", "torch")
# A group of the torch backend holds sequences at least this fraction of its longest one's length: its
# padded tokens are then at most 1/0.85 = 1.18x its real ones, and its attention work, quadratic in the
# length, at most 1/0.85² = 1.38x. With 0.75 (1.78x) a default batch's long captions formed one group of
# 18 at 173 tokens, more attention work than the padded path's length-sorted chunks of 8.
SIMILAR_LENGTH_RATIO = 0.85

_log = logging.getLogger(__name__)
_logged_choices: set[tuple[str, str]] = set()


class AttentionBackendUnavailable(RuntimeError):
    """The requested attention backend is not installed, or cannot run on these tensors."""


# Why an installed package is not usable, by package name: a broken install is reported as broken,
# not as missing, both when it is asked for and (logged once) when ``auto`` passes over it.
_import_failures: dict[str, str] = {}


def _import_optional(module: str, package: str):
    """``module`` of ``package``, or None when the package is not installed or fails to import.

    Every exception counts, not only ImportError: a package built for another PyTorch or CUDA can raise
    OSError, RuntimeError or anything else on import, and the text path must then take another backend
    (``auto``) or refuse with the reason (an explicit request) instead of crashing.
    """
    _import_failures.pop(package, None)
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name is not None and (module == error.name or module.startswith(error.name + ".")):
            return None  # not installed
        _import_failed(package, f"{type(error).__name__}: {error}")  # installed; a module it needs is not
    except Exception as error:
        _import_failed(package, f"{type(error).__name__}: {error}")
    return None


def _import_failed(package: str, reason: str) -> None:
    _import_failures[package] = reason
    _log.warning("%s is installed but not usable (%s); the packed text attention will not use it", package, reason)


@functools.cache
def _load_flash_attn():
    """flash-attn's ``flash_attn_varlen_func``, or None when flash-attn is not installed or not usable."""
    module = _import_optional("flash_attn", "flash-attn")
    if module is None:
        return None
    varlen = getattr(module, "flash_attn_varlen_func", None)
    if varlen is None:  # flash-attn 1.x names it flash_attn_unpadded_func, with another signature
        _import_failed("flash-attn", "it has no flash_attn_varlen_func (flash-attn 2 or later has)")
    return varlen


def _flash_attn_takes_alibi() -> bool:
    """Whether the installed flash-attn adds ALiBi biases: its varlen function takes ``alibi_slopes`` (versions
    from before ALiBi have no such parameter and raise TypeError if it is passed)."""
    varlen = _load_flash_attn()
    try:
        return varlen is not None and "alibi_slopes" in inspect.signature(varlen).parameters
    except (TypeError, ValueError):  # no signature to inspect (a compiled function): assume the current API
        return True


@functools.cache
def _load_xformers_fmha():
    """xformers' ``fmha`` module, or None when xformers is not installed or not usable."""
    return _import_optional("xformers.ops.fmha", "xformers")


def _unavailable(name: str, package: str, how_to_install: str) -> AttentionBackendUnavailable:
    failure = _import_failures.get(package)
    state = f"installed but not usable ({failure})" if failure else f"not installed ({how_to_install})"
    return AttentionBackendUnavailable(
        f"text_attention={name!r} needs {package}, which is {state}; use 'auto' to take the best usable backend"
    )


def check_text_attention(name: str) -> None:
    """Raise when ``name`` is no backend, or names one that is not installed or not usable
    (``--text-attention``)."""
    if name not in TEXT_ATTENTION_BACKENDS:
        raise ValueError(f"text_attention must be one of {TEXT_ATTENTION_BACKENDS}, got {name!r}")
    if name == "flash" and _load_flash_attn() is None:
        raise _unavailable(name, "flash-attn", "pip install flash-attn on a CUDA machine")
    if name == "xformers" and _load_xformers_fmha() is None:
        raise _unavailable(name, "xformers", "pip install xformers on a CUDA machine")


def alibi_slopes(heads: int) -> torch.Tensor:
    """ALiBi slopes ``m_h = 2^(-8h/heads)``, h = 1…heads (Press et al., 2022, §3), fp32 ``[heads]``."""
    return 2.0 ** (-8.0 * torch.arange(1, heads + 1, dtype=torch.float32) / heads)


def biased_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask=bias)`` for ``q, k, v [B, heads, L, head_dim]`` and an
    additive ``bias [heads, L, L]`` in which every query sees at least one key (a causal mask: itself).

    For such a 3-D mask PyTorch runs SDPA's math kernel on CPU; in fp32 outside autocast this computes the
    same steps (q and k each scaled by ``head_dim^-1/4``, their product, the bias added in place, softmax, the
    product with v) with a plain softmax where the kernel takes ``_safe_softmax``, which also scans every row
    for all ``-inf`` to give it zeros rather than NaN, a pass over the scores and a mask as large: ~3 % of a
    training step of the tiny preset. No row is all ``-inf`` here, so the values, gradients included, are the
    same bits (checked against SDPA; tests/test_packed_text.py). Anywhere else SDPA itself runs."""
    if (
        q.device.type != "cpu"
        or not q.dtype == k.dtype == v.dtype == bias.dtype == torch.float32
        or torch.is_autocast_enabled("cpu")
    ):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    scale = math.sqrt(1 / math.sqrt(q.shape[-1]))
    scores = torch.matmul(q * scale, k.transpose(-2, -1) * scale)
    scores.add_(bias)
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def causal_alibi_bias(slopes: torch.Tensor, length: int) -> torch.Tensor:
    """``[heads, length, length]``: ``-m_h·(i - j)`` for ``j ≤ i`` and ``-inf`` above the diagonal."""
    position = torch.arange(length, dtype=torch.float32, device=slopes.device)
    distance = position[:, None] - position[None, :]  # i - j
    bias = -slopes.float()[:, None, None] * distance
    return bias.masked_fill(distance < 0, float("-inf"))


class PackedSequences:
    """The layout of a pack: ``cu_seqlens`` on the tokens' device, the lengths on the host.

    The torch backend's grouping is computed once per pack, on first use, and reused by every layer.
    """

    def __init__(self, lengths: Sequence[int], device: torch.device | str):
        if not lengths or min(lengths) < 1:
            raise ValueError(f"a pack needs at least one sequence and every length >= 1, got {list(lengths)[:8]}")
        self.lengths = tuple(int(n) for n in lengths)
        self.max_length = max(self.lengths)
        self.total = sum(self.lengths)
        offsets = torch.tensor((0, *self.lengths)).cumsum(0)
        self.starts = offsets[:-1].tolist()
        self.cu_seqlens = offsets.to(device=device, dtype=torch.int32)
        self.device = torch.device(device)
        self._groups = None
        self._alibi: dict[tuple[int, torch.dtype], torch.Tensor] = {}  # causal ALiBi biases by (length, dtype)
        self._alibi_slopes: torch.Tensor | None = None  # the slopes they were built from

    def similar_length_groups(self) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """``([(rows [G, L], real [n]), …], inverse [T])`` of the torch backend.

        ``rows[g, p]`` is the pack row of position ``p`` of the group's ``g``-th sequence (its last token
        repeated past its end, harmless behind the causal mask); ``real`` lists the flat indices of
        ``rows`` whose positions exist. Concatenating every group's real positions and selecting
        ``inverse`` restores pack order. Indices, not boolean masks: ``index_select``'s backward is an
        ``index_add``, where advanced indexing's is an accumulating ``index_put``, several times slower
        on CPU.
        """
        if self._groups is None:
            order = sorted(range(len(self.lengths)), key=lambda i: -self.lengths[i])
            groups, gathered = [], []
            first = 0
            while first < len(order):
                longest = self.lengths[order[first]]
                last = first
                while last < len(order) and self.lengths[order[last]] >= SIMILAR_LENGTH_RATIO * longest:
                    last += 1
                members = order[first:last]
                position = torch.arange(longest)
                member_lengths = torch.tensor([self.lengths[i] for i in members])
                member_starts = torch.tensor([self.starts[i] for i in members])
                rows = member_starts[:, None] + torch.minimum(position[None], member_lengths[:, None] - 1)
                real = position[None] < member_lengths[:, None]
                groups.append((rows.to(self.device), real.flatten().nonzero().flatten().to(self.device)))
                gathered.append(rows[real])
                first = last
            inverse = torch.argsort(torch.cat(gathered)).to(self.device)
            self._groups = (groups, inverse)
        return self._groups

    def alibi_bias(self, slopes: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
        """``causal_alibi_bias(slopes, length)`` in ``dtype``, built once per pack and reused by every layer
        (the tower's layers share their slopes; other slopes rebuild them)."""
        if slopes is not self._alibi_slopes:
            self._alibi, self._alibi_slopes = {}, slopes
        key = (length, dtype)
        if key not in self._alibi:
            self._alibi[key] = causal_alibi_bias(slopes, length).to(dtype)
        return self._alibi[key]


def choose_text_attention(requested: str, q: torch.Tensor, with_alibi: bool) -> str:
    """The backend that runs: ``requested`` after checking it can, or the best one for ``auto``."""
    check_text_attention(requested)
    half_on_cuda = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    if requested == "auto":
        if half_on_cuda and _load_flash_attn() is not None and (not with_alibi or _flash_attn_takes_alibi()):
            choice = "flash"
        elif q.is_cuda and not with_alibi and _load_xformers_fmha() is not None:
            choice = "xformers"
        else:
            choice = "torch"
    else:
        choice = requested
        if choice == "flash" and not half_on_cuda:
            raise AttentionBackendUnavailable(
                f"text_attention='flash' needs CUDA fp16/bf16 tensors, got {q.device.type} {q.dtype} "
                "(train with --precision bf16 on a GPU, or use 'auto')"
            )
        if choice == "flash" and with_alibi and not _flash_attn_takes_alibi():
            raise AttentionBackendUnavailable(
                "text_attention='flash' cannot add this tower's ALiBi biases: the installed flash-attn takes no "
                "alibi_slopes (upgrade flash-attn), or use 'torch' or 'auto'"
            )
        if choice == "xformers" and with_alibi:
            raise AttentionBackendUnavailable(
                "text_attention='xformers' cannot add ALiBi biases (this tower has them: the tiny preset); "
                "use 'flash', 'torch' or 'auto', or --model text_alibi=0"
            )
    key = (requested, choice)
    if key not in _logged_choices:
        _logged_choices.add(key)
        _log.info("packed text attention: %s (requested %s, %s %s)", choice, requested, q.device.type, q.dtype)
    return choice


def packed_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sequences: PackedSequences,
    alibi_slopes: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Causal attention within each sequence of a pack: ``q, k, v [T, heads, head_dim]`` → ``[T, heads, head_dim]``.

    ``alibi_slopes [heads]`` adds ``-m_h·(i - j)`` to the logit of query ``i`` and key ``j`` (positions
    counted within the sequence). Scaled by ``head_dim^-1/2``; no dropout.
    """
    if q.dim() != 3 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must be [T, heads, head_dim] of one shape, got {q.shape}, {k.shape}, {v.shape}")
    if q.shape[0] != sequences.total:
        raise ValueError(f"q has {q.shape[0]} tokens, the pack's sequences hold {sequences.total}")
    choice = choose_text_attention(backend, q, alibi_slopes is not None)
    if choice == "flash":
        cu = sequences.cu_seqlens
        # alibi_slopes only when there are slopes: flash-attn versions from before ALiBi refuse the keyword
        alibi = {} if alibi_slopes is None else {"alibi_slopes": alibi_slopes.float()}
        return _load_flash_attn()(q, k, v, cu, cu, sequences.max_length, sequences.max_length, causal=True, **alibi)
    if choice == "xformers":
        fmha = _load_xformers_fmha()
        mask = fmha.attn_bias.BlockDiagonalCausalMask.from_seqlens(list(sequences.lengths))
        return fmha.memory_efficient_attention(q[None], k[None], v[None], attn_bias=mask)[0]
    groups, inverse = sequences.similar_length_groups()
    parts = []
    heads, head_dim = q.shape[1:]
    for rows, real in groups:
        count, length = rows.shape
        # [G·L, heads, head_dim] → [G, heads, L, head_dim]
        qg, kg, vg = (
            t.index_select(0, rows.flatten()).view(count, length, heads, head_dim).transpose(1, 2) for t in (q, k, v)
        )
        if alibi_slopes is None:
            out = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True)
        else:
            bias = sequences.alibi_bias(alibi_slopes, length, q.dtype)
            out = biased_attention(qg, kg, vg, bias)
        parts.append(out.transpose(1, 2).reshape(count * length, heads, head_dim).index_select(0, real))
    return torch.cat(parts).index_select(0, inverse)
