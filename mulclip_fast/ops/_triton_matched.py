"""The matched-pair primitives on the Triton kernels: same functions and signatures as ``_torch_matched``.

Inputs are ``[B, L, d]`` tensors of one dtype (fp16, bf16 or fp32) on a CUDA device, or on the CPU under
``TRITON_INTERPRET=1``; masks are bool. The kernels' launchers (``mulclip_fast.kernels``) make every tensor
dense and launch on its device. Row statistics (lse, diag, coefficients) are float32. Elementwise glue that
is O(B·L·d) — delta, the diagonal terms of the InfoNCE gradient — stays in torch."""

from __future__ import annotations

import torch

from ..kernels import token_softmax, topk_aggregate
from ._torch_matched import normalize_backward, normalize_rows

__all__ = [
    "lse_backward",
    "lse_forward",
    "normalize_backward",
    "normalize_rows",
    "recon_backward",
    "recon_forward",
    "topk_backward",
    "topk_forward",
]


def recon_forward(q, kv, q_mask, kv_mask, scale, out_dtype):
    out = torch.empty(q.shape, dtype=out_dtype, device=q.device)
    lse, _ = token_softmax.token_softmax_forward(q, kv, q_mask, kv_mask, scale, out)
    return out, lse


def recon_backward(q, kv, q_mask, kv_mask, scale, grad_out, out, lse):
    grad_out = grad_out.to(q.dtype)
    if out.dtype != torch.float32:
        # delta = Σ_d dO·O is subtracted from dP = dO kᵀ in the score gradient, where the two nearly cancel;
        # O rounded to 16 bits would leave its rounding, times the scale 1/τ, as the result (bf16 gradients
        # off by 25% at τ = 0.07). The torch path takes the row sums from fp32 P; here O is rebuilt in fp32.
        out, _ = recon_forward(q, kv, q_mask, kv_mask, scale, torch.float32)
    delta = (grad_out.float() * out).sum(-1)  # out is zero on invalid queries, so delta is too
    return token_softmax.token_softmax_backward(q, kv, grad_out, lse, delta, q_mask, kv_mask, scale)


def lse_forward(x, y, mask, scale):
    return token_softmax.token_softmax_forward(x, y.to(x.dtype), mask, mask, scale, None)


def lse_backward(x, y, mask, scale, lse, row_grad):
    y = y.to(x.dtype)
    dx, dy = token_softmax.token_softmax_backward(x, y, None, lse, row_grad.float(), mask, mask, scale)
    g = row_grad[..., None] * scale
    return dx.sub_(g * y), dy.sub_(g * x)


def topk_forward(sub, patches, sub_mask, patch_mask, k, tau):
    return topk_aggregate.topk_aggregate_forward(sub, patches, sub_mask, patch_mask, k, tau)


def topk_backward(sub, patches, sub_mask, patch_mask, k, tau, grad_out):
    return topk_aggregate.topk_aggregate_backward(sub, patches, sub_mask, patch_mask, k, tau, grad_out)
