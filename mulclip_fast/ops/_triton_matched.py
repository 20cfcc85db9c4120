"""Triton launchers of the matched-pair primitives: same functions and signatures as ``_torch_matched``.

Inputs are contiguous ``[B, L, d]`` tensors of one dtype (fp16, bf16 or fp32) on a CUDA device, or on the
CPU under ``TRITON_INTERPRET=1``; masks are bool. Row statistics (lse, diag, coefficients) are float32.
Elementwise glue that is O(B·L·d) — delta, the diagonal terms of the InfoNCE gradient — stays in torch.
Under the interpreter (which computes bf16 on raw bits) the kernels' ``UPCAST`` casts loaded tiles to fp32.
"""

from __future__ import annotations

import torch
import triton

from ..kernels import token_softmax, topk_aggregate
from ..kernels._aot import dot_precision
from ._dispatch import interpreter_enabled
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


def _dot_precision(x: torch.Tensor) -> str:
    return dot_precision(x.dtype)


def _row_grid(rows: int, batch: int, width: int, chunked: bool):
    return lambda meta: (
        triton.cdiv(rows, meta["BLOCK_M"]),
        batch,
        triton.cdiv(width, meta["BLOCK_D"]) if chunked else 1,
    )


def _col_grid(cols: int, batch: int, width: int):
    return lambda meta: (triton.cdiv(cols, meta["BLOCK_N"]), batch, triton.cdiv(width, meta["BLOCK_D"]))


def _forward(q, k, q_mask, k_mask, scale, out, with_output):
    batch, lq, width = q.shape
    lse = torch.empty(batch, lq, dtype=torch.float32, device=q.device)
    diag = lse if with_output else torch.empty_like(lse)
    token_softmax._token_softmax_fwd[_row_grid(lq, batch, width, with_output)](
        q, k, out, lse, diag, q_mask, k_mask, lq, k.shape[1], width, scale,
        WITH_OUTPUT=with_output, UPCAST=interpreter_enabled(), DOT_PRECISION=_dot_precision(q),
    )  # fmt: skip
    return lse, diag


def _backward(q, k, grad_out, lse, coef, q_mask, k_mask, scale, with_grad):
    batch, lq, width = q.shape
    lk = k.shape[1]
    dq, dk = (
        torch.empty(q.shape, dtype=torch.float32, device=q.device),
        torch.empty(k.shape, dtype=torch.float32, device=q.device),
    )
    grad_out = q if grad_out is None else grad_out  # unused pointer in InfoNCE mode
    flags = {"WITH_GRAD": with_grad, "UPCAST": interpreter_enabled(), "DOT_PRECISION": _dot_precision(q)}
    args = (q, k, grad_out, lse, coef, q_mask, k_mask)
    token_softmax._token_softmax_bwd_rows[_row_grid(lq, batch, width, True)](*args, dq, lq, lk, width, scale, **flags)
    token_softmax._token_softmax_bwd_cols[_col_grid(lk, batch, width)](*args, dk, lq, lk, width, scale, **flags)
    return dq, dk


def recon_forward(q, kv, q_mask, kv_mask, scale, out_dtype):
    out = torch.empty(q.shape, dtype=out_dtype, device=q.device)
    lse, _ = _forward(q, kv, q_mask, kv_mask, scale, out, with_output=True)
    return out, lse


def recon_backward(q, kv, q_mask, kv_mask, scale, grad_out, out, lse):
    grad_out = grad_out.to(q.dtype).contiguous()
    delta = (grad_out.float() * out.float()).sum(-1)  # out is zero on invalid queries, so delta is too
    return _backward(q, kv, grad_out, lse, delta, q_mask, kv_mask, scale, with_grad=True)


def lse_forward(x, y, mask, scale):
    return _forward(x, y.to(x.dtype).contiguous(), mask, mask, scale, x, with_output=False)


def lse_backward(x, y, mask, scale, lse, row_grad):
    y = y.to(x.dtype).contiguous()
    dx, dy = _backward(x, y, None, lse, row_grad.float().contiguous(), mask, mask, scale, with_grad=False)
    g = row_grad[..., None] * scale
    return dx.sub_(g * y), dy.sub_(g * x)


def topk_forward(sub, patches, sub_mask, patch_mask, k, tau):
    return topk_aggregate.topk_aggregate_forward(
        sub, patches, sub_mask, patch_mask, k, tau, upcast=interpreter_enabled(), dot_precision=_dot_precision(sub)
    )


def topk_backward(sub, patches, sub_mask, patch_mask, k, tau, grad_out):
    return topk_aggregate.topk_aggregate_backward(
        sub, patches, sub_mask, patch_mask, k, tau, grad_out,
        upcast=interpreter_enabled(), dot_precision=_dot_precision(sub),
    )  # fmt: skip
