"""The all-pairs bodies on the Triton kernels: same functions and signatures as ``_torch_pairwise``.

The kernels (``mulclip_fast.kernels.pairwise_*``) compute one direction of max-sim at a time and take the
per-row weights of a backward ready-made; the weights (the loss gradient spread over each query's valid
tokens, FineLIP's LeakyReLU slope) are the same maths as the torch path's, so they come from there.
"""

from __future__ import annotations

import torch

from ..kernels import pairwise_maxsim, pairwise_reconstruction, pairwise_topk
from ._torch_pairwise import maxsim_row_weights, reconstruction_row_weights

topk_aggregate_cosines_forward = pairwise_topk.topk_aggregate_cosines_forward
topk_aggregate_cosines_backward = pairwise_topk.topk_aggregate_cosines_backward
reconstruction_forward = pairwise_reconstruction.reconstruction_forward


def maxsim_forward(q, k, q_mask, k_mask, bidirectional: bool, negative_slope: float | None):
    """``(val_qk, idx_qk, val_kq, idx_kq)``: the key → query direction runs the same kernel with the roles
    of ``q`` and ``k`` swapped; without ``bidirectional`` it is empty."""
    val_qk, idx_qk = pairwise_maxsim.one_way_forward(q, k, k_mask, negative_slope)
    if bidirectional:
        val_kq, idx_kq = pairwise_maxsim.one_way_forward(k, q, q_mask, negative_slope)  # [Bq, Bk, Lk]
    else:
        val_kq = q.new_zeros((q.shape[0], k.shape[0], 0), dtype=torch.float32)
        idx_kq = q.new_zeros((q.shape[0], k.shape[0], 0), dtype=torch.int32)
    return val_qk, idx_qk, val_kq, idx_kq


def maxsim_backward(grad, q, k, q_mask, k_mask, val_qk, idx_qk, val_kq, idx_kq, bidirectional, negative_slope):
    """fp32 ``(dq, dk)``: both directions' contributions summed before the caller's final cast."""
    w_qk, w_kq = maxsim_row_weights(grad, q_mask, k_mask, val_qk, val_kq, bidirectional, negative_slope)
    dq, dk = pairwise_maxsim.one_way_backward(q, k, w_qk, idx_qk)
    if bidirectional:
        dk_kq, dq_kq = pairwise_maxsim.one_way_backward(k, q, w_kq, idx_kq)
        dq = dq + dq_kq
        dk = dk + dk_kq
    return dq, dk


def reconstruction_backward(grad, q, k, q_mask, k_mask, tau: float, r, lse):
    """fp32 ``(dq, dk)``; the kernels take the per-row weights ``∂L/∂r``."""
    g = reconstruction_row_weights(grad, q_mask, torch.float32)
    return pairwise_reconstruction.reconstruction_backward(g, q, k, k_mask, tau, r, lse)
