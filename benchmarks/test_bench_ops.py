"""Every public op, forward and forward+backward, per backend, over a sweep of shapes (docs/performance.md).

Backends compared with the reference (``mulclip_fast.reference``, the plain PyTorch spec):

- ``torch``: the memory-lean chunked PyTorch path of ``mulclip_fast.ops`` (what ``auto`` runs on CPU);
- ``compile``: ``torch.compile`` of the reference (a compiled baseline; one compilation per shape);
- ``triton``: the fused Triton kernels (CUDA only: on a CPU they run only in Triton's interpreter, which
  checks numerics and says nothing about speed, so these cases are skipped there with that reason);
- ``sdpa`` (``token_reconstruction`` only): ``F.scaled_dot_product_attention`` computes the same
  ``softmax(q kvᵀ/τ) kv``; on CUDA it is pinned to the memory-efficient kernel.

Shapes follow the paper (B up to 128 local and 4× gathered keys, 248 word tokens, 196 or 576 patches,
d = 512 or 768), in tiers: ``quick`` runs by default; ``full`` with ``MULCLIP_BENCH_FULL=1`` (and by
default on a GPU); ``gpu`` only on a GPU with the full sweep. Every shape appears in two variants:
MulCLIP's calibrated token sets (N' = ⌊0.2·196⌋ = 39 tokens) and the raw token sets.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F

from benchmarks.harness import DEVICE, DTYPE, FULL_SWEEP, length_mask, measure_case, normalized, tier_selected
from mulclip_fast import ops, reference
from mulclip_fast.ops import costs

TAU = 0.07
ITEMSIZE = torch.finfo(DTYPE).bits // 8


@dataclass(frozen=True)
class OpSpec:
    """One public op: its reference twin, its fused version, how to build inputs and count its work."""

    name: str
    reference: Callable
    fused: Callable
    # shape -> (differentiable inputs, keyword arguments: masks and scalars)
    make_inputs: Callable[[dict, torch.Generator], tuple[tuple[torch.Tensor, ...], dict]]
    output_shape: Callable[[dict], tuple[int, ...]]
    cost: Callable[[dict], object]  # -> an OpCost (flops_/bytes_ forward/backward)
    shapes: list[tuple[str, dict]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- inputs
def _reconstruction_inputs(s, g):
    # Patches rebuilt from the words of their caption (Ṽ of WPR): queries all valid, keys padded.
    q = normalized(s["B"], s["Lq"], s["d"], generator=g)
    kv = normalized(s["B"], s["Lk"], s["d"], generator=g)
    return (q, kv), {"q_mask": None, "kv_mask": length_mask(s["B"], s["Lk"], s["Lk"] // 2, g), "tau": TAU}


def _wpr_inputs(s, g):
    v = normalized(s["B"], s["P"], s["d"], generator=g)
    t = normalized(s["B"], s["K"], s["d"], generator=g)
    kwargs = {"v_mask": None, "t_mask": length_mask(s["B"], s["K"], s["K"] // 2, g)}
    return (v, t), {**kwargs, "tau_attn": TAU, "tau_contrast": TAU}


def _topk_inputs(s, g):
    sub = normalized(s["B"], s["M"], s["d"], generator=g)
    patches = normalized(s["B"], s["N"], s["d"], generator=g)
    sub_mask = length_mask(s["B"], s["M"], 1, g)  # 1..M subcaptions per caption
    return (sub, patches), {"sub_mask": sub_mask, "patch_mask": None, "k": s["k"], "tau": TAU}


def _pairwise_token_inputs(s, g):
    # FineLIP's setting: caption tokens (padded, EOT first) against image tokens (CLS first).
    q = normalized(s["Bq"], s["Lq"], s["d"], generator=g)
    k = normalized(s["Bk"], s["Lk"], s["d"], generator=g)
    return (q, k), {"q_mask": length_mask(s["Bq"], s["Lq"], s["Lq"] // 2, g), "k_mask": None}


def _maxsim_inputs(s, g):
    tensors, kwargs = _pairwise_token_inputs(s, g)
    return tensors, {**kwargs, "bidirectional": True, "negative_slope": 0.1}


def _pairwise_reconstruction_inputs(s, g):
    tensors, kwargs = _pairwise_token_inputs(s, g)
    return tensors, {**kwargs, "tau": TAU}


def _pairwise_topk_inputs(s, g):
    sub = normalized(s["Bq"], s["M"], s["d"], generator=g)
    patches = normalized(s["Bk"], s["N"], s["d"], generator=g)
    sub_mask = length_mask(s["Bq"], s["M"], 1, g)
    return (sub, patches), {"sub_mask": sub_mask, "patch_mask": None, "k": s["k"], "tau": TAU}


def _sap_k(n: int) -> int:
    return math.ceil(0.25 * n)  # k = ⌈ρ·N⌉ with the paper's ρ = 0.25


# ---------------------------------------------------------------------------------------------- ops
OPS = [
    OpSpec(
        "token_reconstruction",
        reference.token_reconstruction,
        ops.token_reconstruction,
        _reconstruction_inputs,
        lambda s: (s["B"], s["Lq"], s["d"]),
        lambda s: costs.token_reconstruction_cost(s["B"], s["Lq"], s["Lk"], s["d"], ITEMSIZE),
        [
            ("quick", {"B": 64, "Lq": 39, "Lk": 39, "d": 512}),
            ("quick", {"B": 16, "Lq": 196, "Lk": 248, "d": 512}),
            ("full", {"B": 64, "Lq": 196, "Lk": 248, "d": 512}),
            ("gpu", {"B": 128, "Lq": 576, "Lk": 248, "d": 768}),
        ],
    ),
    OpSpec(
        "wpr_loss",
        reference.wpr_loss,
        ops.wpr_loss,
        _wpr_inputs,
        lambda s: (),
        lambda s: costs.wpr_loss_cost(s["B"], s["P"], s["K"], s["d"], ITEMSIZE),
        [
            ("quick", {"B": 64, "P": 39, "K": 39, "d": 512}),
            ("quick", {"B": 16, "P": 196, "K": 248, "d": 512}),
            ("full", {"B": 64, "P": 196, "K": 248, "d": 512}),
            ("gpu", {"B": 128, "P": 576, "K": 248, "d": 768}),
        ],
    ),
    OpSpec(
        "topk_patch_aggregate",
        reference.topk_patch_aggregate,
        ops.topk_patch_aggregate,
        _topk_inputs,
        lambda s: (s["B"], s["M"], s["d"]),
        lambda s: costs.topk_patch_aggregate_cost(s["B"], s["M"], s["N"], s["k"], s["d"], ITEMSIZE),
        [
            ("quick", {"B": 64, "M": 8, "N": 39, "k": _sap_k(39), "d": 512}),
            ("quick", {"B": 16, "M": 8, "N": 196, "k": _sap_k(196), "d": 512}),
            ("full", {"B": 64, "M": 8, "N": 196, "k": _sap_k(196), "d": 512}),
            ("gpu", {"B": 128, "M": 8, "N": 576, "k": _sap_k(576), "d": 768}),
        ],
    ),
    OpSpec(
        "pairwise_maxsim",
        reference.pairwise_maxsim,
        ops.pairwise_maxsim,
        _maxsim_inputs,
        lambda s: (s["Bq"], s["Bk"]),
        lambda s: costs.pairwise_maxsim_cost(s["Bq"], s["Lq"], s["Bk"], s["Lk"], s["d"], True, ITEMSIZE),
        [
            ("quick", {"Bq": 32, "Bk": 32, "Lq": 40, "Lk": 40, "d": 512}),
            ("quick", {"Bq": 16, "Bk": 16, "Lq": 249, "Lk": 197, "d": 512}),
            ("full", {"Bq": 32, "Bk": 128, "Lq": 249, "Lk": 197, "d": 512}),
            ("gpu", {"Bq": 64, "Bk": 256, "Lq": 249, "Lk": 197, "d": 512}),
        ],
    ),
    OpSpec(
        "pairwise_reconstruction_scores",
        reference.pairwise_reconstruction_scores,
        ops.pairwise_reconstruction_scores,
        _pairwise_reconstruction_inputs,
        lambda s: (s["Bq"], s["Bk"]),
        lambda s: costs.pairwise_reconstruction_cost(s["Bq"], s["Lq"], s["Bk"], s["Lk"], s["d"], ITEMSIZE),
        [
            ("quick", {"Bq": 32, "Bk": 32, "Lq": 39, "Lk": 39, "d": 512}),
            ("quick", {"Bq": 16, "Bk": 16, "Lq": 248, "Lk": 196, "d": 512}),
            ("full", {"Bq": 32, "Bk": 128, "Lq": 248, "Lk": 196, "d": 512}),
            ("gpu", {"Bq": 64, "Bk": 256, "Lq": 248, "Lk": 196, "d": 512}),
        ],
    ),
    OpSpec(
        "pairwise_topk_aggregate_cosines",
        reference.pairwise_topk_aggregate_cosines,
        ops.pairwise_topk_aggregate_cosines,
        _pairwise_topk_inputs,
        lambda s: (s["Bq"], s["Bk"], s["M"]),
        lambda s: costs.pairwise_topk_aggregate_cost(s["Bq"], s["M"], s["Bk"], s["N"], s["k"], s["d"], ITEMSIZE),
        [
            ("quick", {"Bq": 32, "Bk": 32, "M": 8, "N": 39, "k": _sap_k(39), "d": 512}),
            ("quick", {"Bq": 16, "Bk": 16, "M": 8, "N": 196, "k": _sap_k(196), "d": 512}),
            ("full", {"Bq": 16, "Bk": 64, "M": 8, "N": 196, "k": _sap_k(196), "d": 512}),
            ("gpu", {"Bq": 32, "Bk": 128, "M": 8, "N": 196, "k": _sap_k(196), "d": 512}),
        ],
    ),
]


# ---------------------------------------------------------------------------------------------- backends
def _sdpa_reconstruction(q, kv, q_mask=None, kv_mask=None, tau=TAU):
    """``softmax(q kvᵀ / τ) kv`` through SDPA: the same math as ``token_reconstruction``."""
    # One head: [B, 1, L, d], the layout SDPA's fused kernels take; the mask broadcasts over queries.
    attn_mask = None if kv_mask is None else kv_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q[:, None], kv[:, None], kv[:, None], attn_mask=attn_mask, scale=1.0 / tau)
    out = out[:, 0]
    return out if q_mask is None else out * q_mask[..., None]


def _sdpa_context():
    """On CUDA, pin SDPA to the memory-efficient kernel (the one that takes an arbitrary mask and fp32)."""
    from contextlib import nullcontext

    if DEVICE.type != "cuda":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION])


def _implementation(spec: OpSpec, backend: str) -> Callable:
    if backend == "reference":
        return spec.reference
    if backend in ("torch", "triton"):
        return lambda *args, **kwargs: spec.fused(*args, **kwargs, backend=backend)
    if backend == "compile":
        return torch.compile(spec.reference, dynamic=False)
    if backend == "sdpa":
        return _sdpa_reconstruction
    raise ValueError(f"unknown benchmark backend {backend!r}")


BACKENDS = ("reference", "torch", "triton", "compile", "sdpa")
MODES = ("forward", "forward+backward")


def _cases():
    for spec in OPS:
        shapes = [shape for tier, shape in spec.shapes if tier_selected(tier)]
        for shape in shapes:
            for backend in BACKENDS:
                if backend == "sdpa" and spec.name != "token_reconstruction":
                    continue
                # Each shape compiles anew (10-30 s per graph and grad mode): by default the compiled
                # baseline runs at the largest shape of each op only; the full sweep compiles every one.
                if backend == "compile" and not FULL_SWEEP and shape is not shapes[-1]:
                    continue
                for mode in MODES:
                    label = "-".join(f"{k}{v}" for k, v in shape.items())
                    yield pytest.param(spec, shape, backend, mode, id=f"{spec.name}-{backend}-{mode}-{label}")


@pytest.mark.parametrize(("spec", "shape", "backend", "mode"), list(_cases()))
def test_op(benchmark, machine, results, spec: OpSpec, shape: dict, backend: str, mode: str):
    if backend == "triton" and DEVICE.type != "cuda":
        pytest.skip("Triton kernels need CUDA; on CPU they run only in Triton's interpreter, which is for numerics")
    generator = torch.Generator().manual_seed(0)
    tensors, kwargs = spec.make_inputs(shape, generator)
    impl = _implementation(spec, backend)
    cost = spec.cost(shape)
    if mode == "forward":

        def run():
            with torch.no_grad(), _sdpa_context():
                return impl(*tensors, **kwargs)

        flops, nbytes = cost.flops_forward, cost.bytes_forward
    else:
        tensors = tuple(t.requires_grad_() for t in tensors)
        out_shape = spec.output_shape(shape)
        # The upstream gradient exists before the op runs in training: allocate it outside the measure.
        grad_out = None if out_shape == () else torch.randn(out_shape, generator=generator).to(DEVICE, DTYPE)

        def run():
            with _sdpa_context():
                out = impl(*tensors, **kwargs)
                return torch.autograd.grad(out, tensors, grad_out)

        flops = cost.flops_forward + cost.flops_backward
        nbytes = cost.bytes_forward + cost.bytes_backward
    try:
        measure_case(
            benchmark,
            results,
            machine,
            group=f"{spec.name} {mode} " + " ".join(f"{k}={v}" for k, v in shape.items()),
            op=spec.name,
            backend=backend,
            mode=mode,
            shape=shape,
            fn=run,
            flops=flops,
            nbytes=nbytes,
        )
    except RuntimeError as error:
        if backend == "sdpa" and "No available kernel" in str(error):
            pytest.skip(f"SDPA's memory-efficient kernel does not take this shape: {error}")
        raise
