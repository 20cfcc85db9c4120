"""The one top-k selection rule of the SAP kernels (``topk_aggregate``: matched pairs; ``pairwise_topk``: all
pairs), and its order-preserving keys.

The rule, shared with the torch paths (``mulclip_fast.ops``) and the reference: each row selects exactly
``min(k, valid)`` of its valid entries — the ``k`` largest scores, ties at the ``k``-th value broken
towards the **lowest index**; masked entries are never selected; a row with fewer than ``k`` valid
entries selects all of them. Scores compare as floats: ``-0.0`` and ``+0.0`` tie. (NaN never reaches a
kernel: the ops' entry points refuse NaN inputs.)
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._aot import settle_cache_keys
from .limits import TOPK_MAX_PATCHES

MAX_BLOCK_N = tl.constexpr(TOPK_MAX_PATCHES)
MAX_LOG2_BLOCK_N = tl.constexpr(TOPK_MAX_PATCHES.bit_length() - 1)
# Every power-of-two score row a launch can use (``score_row_block``): the compile check covers each.
BLOCK_NS = tuple(1 << i for i in range(4, TOPK_MAX_PATCHES.bit_length()))


def score_row_block(n_patches: int) -> int:
    """``BLOCK_N`` of a launch: the power of two ≥ N that holds a whole score row (≥ 16, ``tl.dot``'s
    minimum, which is also a multiple of 8 for the byte-packed selection)."""
    if n_patches > TOPK_MAX_PATCHES:
        raise ValueError(
            f"the Triton top-k kernels hold at most {TOPK_MAX_PATCHES} patches per image, got {n_patches}: "
            "use backend='torch' (backend='auto' does)"
        )
    return max(16, triton.next_power_of_2(n_patches))


@triton.jit
def order_keys(z):
    """uint32 keys ordered like the fp32 values ``z`` (no NaN): positive floats get the sign bit set,
    negative ones are bit-inverted. ``-0.0`` is folded into ``+0.0`` first so that, as in float
    comparisons, the two zeros tie."""
    bits = tl.where(z == 0.0, 0.0, z).to(tl.uint32, bitcast=True)
    return tl.where((bits >> 31) != 0, ~bits, bits | 0x80000000)


@triton.jit
def topk_selection(s, valid, cols, top_k, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """Boolean ``[BLOCK_R, BLOCK_N]``: the selection of each row of the fp32 scores ``s`` under the rule
    above, for the ``[BLOCK_N]`` column mask ``valid`` and column indices ``cols``.

    A bitwise radix select instead of a sort: the k-th largest key is built from the most significant
    bit down, keeping a bit when at least ``top_k`` keys are ≥ the candidate (32 compare-and-count
    passes over the tile, no sorted copy of it in registers). Invalid columns are ``-inf``, so the k-th
    largest key is ``-inf``'s when fewer than ``top_k`` are valid: then every valid column is above it.
    The tie cut is found the same way over column indices: the largest ``c`` with fewer than ``need``
    tied columns below it is the ``need``-th tied column.
    """
    key = order_keys(tl.where(valid[None, :], s, float("-inf")))
    kth = tl.zeros([BLOCK_R], tl.uint32)
    for i in tl.static_range(32):
        candidate = kth | (1 << (31 - i))
        count = tl.sum((key >= candidate[:, None]).to(tl.int32), axis=1)
        kth = tl.where(count >= top_k, candidate, kth)
    above = key > kth[:, None]
    tied = (key == kth[:, None]) & valid[None, :]
    need = top_k - tl.sum(above.to(tl.int32), axis=1)  # ≥ 1: fewer than top_k keys exceed the k-th
    tl.static_assert(BLOCK_N <= MAX_BLOCK_N)
    last = tl.zeros([BLOCK_R], tl.int32)
    for i in tl.static_range(MAX_LOG2_BLOCK_N):
        if (BLOCK_N >> (i + 1)) > 0:
            candidate = last | (BLOCK_N >> (i + 1))
            count = tl.sum((tied & (cols[None, :] < candidate[:, None])).to(tl.int32), axis=1)
            last = tl.where(count < need, candidate, last)
    return above | (tied & (cols[None, :] <= last[:, None]))


settle_cache_keys(globals())
