"""The all-pairs ops on the shapes at the edge: an empty batch on either side, empty token sets, and
meta tensors (shape inference). Each gives what the reference gives, forward and backward."""

from __future__ import annotations

import pytest
import torch

from mulclip_fast.ops import pairwise_maxsim, pairwise_reconstruction_scores, pairwise_topk_aggregate_cosines
from mulclip_fast.ops._dispatch import interpreter_enabled, triton_available

# Empty inputs take the torch path under every backend; "triton" is checked where the interpreter runs it.
KERNEL_BACKENDS = ("torch", "auto") + (("triton",) if triton_available() and interpreter_enabled() else ())
SHAPES = {
    "empty query batch": ((0, 3, 4), (2, 5, 4)),
    "empty key batch": ((2, 3, 4), (0, 5, 4)),
    "empty query sets": ((2, 0, 4), (3, 5, 4)),
    "empty key sets": ((2, 3, 4), (3, 0, 4)),
}
OPS = {
    "maxsim": lambda q, k, backend: pairwise_maxsim(q, k, backend=backend),
    "bidirectional maxsim": lambda q, k, backend: pairwise_maxsim(q, k, bidirectional=True, backend=backend),
    "reconstruction": lambda q, k, backend: pairwise_reconstruction_scores(q, k, backend=backend),
    "sap": lambda q, k, backend: pairwise_topk_aggregate_cosines(q, k, k=1, backend=backend),
}


def _run(op, q_shape, k_shape, backend):
    torch.manual_seed(0)
    q = torch.randn(q_shape, requires_grad=True)
    k = torch.randn(k_shape, requires_grad=True)
    out = OPS[op](q, k, backend)
    out.sum().backward()
    return out.detach(), q.grad, k.grad


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("op", OPS)
def test_empty_batches_and_token_sets_give_the_reference_result(op, shape):
    q_shape, k_shape = SHAPES[shape]
    if op == "sap" and k_shape[1] == 0:  # SAP pools 1 <= k <= N patches: N = 0 is refused, naming k
        for backend in ("reference", *KERNEL_BACKENDS):
            with pytest.raises(ValueError, match="k must satisfy"):
                _run(op, q_shape, k_shape, backend)
        return
    expected = _run(op, q_shape, k_shape, "reference")
    for backend in KERNEL_BACKENDS:
        got = _run(op, q_shape, k_shape, backend)
        for a, b in zip(got, expected, strict=True):
            assert a.shape == b.shape and torch.equal(a, b), (backend, a, b)


@pytest.mark.parametrize("op", OPS)
def test_meta_tensors_give_the_output_shape(op):
    q = torch.empty((2, 3, 4), device="meta")
    k = torch.empty((5, 6, 4), device="meta")
    expected = (2, 5, 3) if op == "sap" else (2, 5)
    for backend in ("auto", "torch", "reference"):
        out = OPS[op](q, k, backend)
        assert out.is_meta and tuple(out.shape) == expected, backend
