"""FLOPs and compulsory memory traffic of one call of each op, for benchmarks to state the fraction of peak.

They describe the ops, so they live beside them; ``mulclip_fast.profiling`` measures, it does not model.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OpCost:
    """Useful FLOPs (a multiply-add counts 2) and compulsory memory traffic of one call of an op.

    FLOPs count the products of the op's definition, whatever an implementation recomputes, so every
    backend of an op is measured against the same work. Bytes count reading each input and writing each
    output once (forward), and reading the inputs and the output gradient and writing the input
    gradients once (backward): the floor a kernel's traffic is compared with.
    """

    flops_forward: int
    flops_backward: int
    bytes_forward: int
    bytes_backward: int

    @property
    def flops(self) -> int:
        return self.flops_forward + self.flops_backward


def _io_cost(flops_forward: int, flops_backward: int, input_bytes: int, output_bytes: int) -> OpCost:
    return OpCost(
        flops_forward=flops_forward,
        flops_backward=flops_backward,
        bytes_forward=input_bytes + output_bytes,
        bytes_backward=2 * input_bytes + output_bytes,  # inputs and output grad in, input grads out
    )


def token_reconstruction_cost(batch: int, len_q: int, len_kv: int, d: int, itemsize: int = 4) -> OpCost:
    """Forward: ``S = q kvᵀ`` and ``P kv`` (``2 × 2·B·Lq·Lk·d``). Backward: ``dP = dO kvᵀ``, ``dkv += Pᵀ dO``,
    ``dq = dS kv``, ``dkv += dSᵀ q`` (``4 × 2·B·Lq·Lk·d``)."""
    gemm = 2 * batch * len_q * len_kv * d
    io = batch * (len_q + len_kv) * d * itemsize
    return _io_cost(2 * gemm, 4 * gemm, io, batch * len_q * d * itemsize)


def wpr_loss_cost(batch: int, n_patches: int, n_words: int, d: int, itemsize: int = 4) -> OpCost:
    """Two reconstructions (patches from words, words from patches: ``2 × 2 × 2·B·P·K·d``) and two
    in-sample InfoNCE logit matrices (``2·B·P²·d + 2·B·K²·d``) forward; backward twice the forward."""
    forward = 2 * 2 * (2 * batch * n_patches * n_words * d) + 2 * batch * (n_patches**2 + n_words**2) * d
    return _io_cost(forward, 2 * forward, batch * (n_patches + n_words) * d * itemsize, 4)


def topk_patch_aggregate_cost(batch: int, n_sub: int, n_patches: int, k: int, d: int, itemsize: int = 4) -> OpCost:
    """Forward: scores against every patch (``2·B·M·N·d``) and the weighted sum of the top k
    (``2·B·M·k·d``). Backward: through the k selected patches only, into the subcaption and into the
    patches, from both the scores and the sum (``4 × 2·B·M·k·d``)."""
    forward = 2 * batch * n_sub * (n_patches + k) * d
    io = batch * (n_sub + n_patches) * d * itemsize
    return _io_cost(forward, 8 * batch * n_sub * k * d, io, batch * n_sub * d * itemsize)


# The all-pairs ops: bytes here also count the saved statistics that the Triton path reads back in backward;
# FLOPs, as everywhere, count each product of the definition once (the fused paths recompute some).


def pairwise_maxsim_cost(
    n_q: int, len_q: int, n_k: int, len_k: int, d: int, bidirectional: bool = False, itemsize: int = 4
) -> OpCost:
    """Forward is one similarity GEMM ``2·Bq·Bk·Lq·Lk·d``, whose maxima are taken along the keys (and,
    ``bidirectional``, along the queries too: the same similarities, which the Triton path computes once
    per direction). Backward: ``dq = W k`` and ``dk = Wᵀ q`` with ``W`` the one-hot weights of the maxima
    of both directions (``2 × 2·Bq·Bk·Lq·Lk·d``)."""
    pairs = n_q * n_k
    gemm = 2 * pairs * len_q * len_k * d
    inputs = (n_q * len_q + n_k * len_k) * d * itemsize
    stats = pairs * (len_q + (len_k if bidirectional else 0)) * 8  # fp32 max + int32 index
    return OpCost(
        flops_forward=gemm,
        flops_backward=2 * gemm,
        bytes_forward=inputs + stats + pairs * itemsize,
        bytes_backward=2 * inputs + stats + pairs * itemsize,
    )


def pairwise_reconstruction_cost(n_q: int, len_q: int, n_k: int, len_k: int, d: int, itemsize: int = 4) -> OpCost:
    """Forward: one similarity GEMM (``2·Bq·Bk·Lq·Lk·d``) plus a few flops per similarity for the online
    softmax. Backward: ``dq = dS k`` and ``dk = dSᵀ q`` (``2 × 2·Bq·Bk·Lq·Lk·d``; the similarities that
    the fused kernels recompute are not counted)."""
    pairs = n_q * n_k
    gemm = 2 * pairs * len_q * len_k * d
    elementwise = 6 * pairs * len_q * len_k
    inputs = (n_q * len_q + n_k * len_k) * d * itemsize
    stats = pairs * len_q * 8  # fp32 r + lse
    return OpCost(
        flops_forward=gemm + elementwise,
        flops_backward=2 * gemm + 2 * elementwise,
        bytes_forward=inputs + stats + pairs * itemsize,
        bytes_backward=2 * inputs + stats + pairs * itemsize,
    )


def pairwise_topk_aggregate_cost(
    n_q: int, n_sub: int, n_k: int, n_patch: int, k: int, d: int, itemsize: int = 4
) -> OpCost:
    """As :func:`topk_patch_aggregate_cost` for every (caption, image) pair, plus the cosine of each
    subcaption with its aggregate. Forward: scores ``s = t Xᵀ`` against all N patches (``2·Bq·Bk·M·N·d``),
    the weighted sum of the top k (``2·Bq·Bk·M·k·d``) and the cosines (``2·Bq·Bk·M·d``); the top-k
    selection is not counted. Backward: through the k selected patches only, from both the scores and the
    sum (``4 × 2·Bq·Bk·M·k·d``), and through the cosines (``2 × 2·Bq·Bk·M·d``). The similarities and
    aggregates that the fused kernels recompute are not counted."""
    rows_pairs = n_q * n_sub * n_k
    inputs = (n_q * n_sub + n_k * n_patch) * d * itemsize
    stats = rows_pairs * ((n_patch + 7) // 8 + 4)  # packed selection + fp32 lse
    return OpCost(
        flops_forward=2 * rows_pairs * (n_patch + k + 1) * d,
        flops_backward=2 * rows_pairs * (4 * k + 2) * d,
        bytes_forward=inputs + stats + rows_pairs * itemsize,
        bytes_backward=2 * inputs + stats + rows_pairs * itemsize,
    )
