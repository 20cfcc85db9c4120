"""All-pairs fused ops (issue 5): max-sim, reconstruction scores and top-k SAP logits.

Each op is checked against its reference twin (``mulclip_fast.reference.pairwise``), values and
gradients, through both kernel backends: ``torch`` (chunked, recomputing) and ``triton`` (run by
Triton's interpreter on CPU, see the root conftest). Shapes are small but cross tile boundaries of the
interpreter's (first) config — 69 query rows, 70 keys and d = 72 span two row, key and d blocks; 18
subcaption rows span two row blocks and 21 patches pad to a 32-wide tile — and every mask case: padding,
an empty key set, an empty query set, an invalid subcaption, fewer valid patches than k.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mulclip_fast import reference as R
from mulclip_fast.ops import _dispatch, _torch_pairwise, costs
from mulclip_fast.ops import pairwise as P
from mulclip_fast.profiling import allocator_peak_memory_of

# (rtol, atol relative to the largest reference magnitude): docs/kernels.md tolerances
TOLERANCE = {
    torch.float64: (1e-7, 1e-9),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (2e-2, 2e-2),
}
LOW_PRECISION = (torch.float16, torch.bfloat16)


def _close(actual, expected, dtype, what):
    rtol, atol = TOLERANCE[dtype]
    expected = expected.double()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol * max(scale, 1e-3), msg=what)


def _tokens(generator, *shape, dtype=torch.float32):
    return F.normalize(torch.randn(*shape, generator=generator, dtype=torch.float64), dim=-1).to(dtype)


def _masks(generator, n_sets, length, empty_set=None):
    mask = torch.rand(n_sets, length, generator=generator) > 0.3
    mask[:, 0] = True
    if empty_set is not None:
        mask[empty_set] = False
    return mask


def _pair_case(dtype, n_q=3, n_k=5, len_q=23, len_k=70, dim=72, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = _tokens(g, n_q, len_q, dim, dtype=dtype)
    k = _tokens(g, n_k, len_k, dim, dtype=dtype)
    return q, k, _masks(g, n_q, len_q, empty_set=n_q - 1), _masks(g, n_k, len_k, empty_set=1)


def _topk_case(dtype, n_q=3, n_sub=6, n_k=5, n_patch=21, dim=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    sub = _tokens(g, n_q, n_sub, dim, dtype=dtype)
    patches = _tokens(g, n_k, n_patch, dim, dtype=dtype)
    sub_mask = _masks(g, n_q, n_sub)
    sub_mask[0, -1] = False
    patch_mask = _masks(g, n_k, n_patch, empty_set=2)
    patch_mask[3, 4:] = False  # image 3 has 4 valid patches: fewer than k pools all of them
    return sub, patches, sub_mask, patch_mask


OPS = {
    "maxsim": (P.pairwise_maxsim, R.pairwise_maxsim, _pair_case, {}),
    "maxsim_bidirectional_leaky": (
        P.pairwise_maxsim,
        R.pairwise_maxsim,
        _pair_case,
        {"bidirectional": True, "negative_slope": 0.1},
    ),
    "maxsim_relu": (P.pairwise_maxsim, R.pairwise_maxsim, _pair_case, {"negative_slope": 0.0}),
    "reconstruction": (P.pairwise_reconstruction_scores, R.pairwise_reconstruction_scores, _pair_case, {"tau": 0.07}),
    "topk_k1": (
        P.pairwise_topk_aggregate_cosines,
        R.pairwise_topk_aggregate_cosines,
        _topk_case,
        {"k": 1, "tau": 0.07},
    ),
    "topk_k5": (P.pairwise_topk_aggregate_cosines, R.pairwise_topk_aggregate_cosines, _topk_case, {"k": 5, "tau": 0.1}),
    "topk_kN": (
        P.pairwise_topk_aggregate_cosines,
        R.pairwise_topk_aggregate_cosines,
        _topk_case,
        {"k": 21, "tau": 0.07},
    ),
}


def _check_parity(op_name, backend, dtype, case_kwargs=None):
    fused, reference, make_case, kwargs = OPS[op_name]
    x, y, x_mask, y_mask = make_case(dtype, **(case_kwargs or {}))
    x.requires_grad_(True)
    y.requires_grad_(True)
    expected = reference(x, y, x_mask, y_mask, **kwargs)
    actual = fused(x, y, x_mask, y_mask, **kwargs, backend=backend)
    assert actual.dtype == expected.dtype == dtype and actual.shape == expected.shape
    _close(actual, expected, dtype, f"{op_name} values")
    upstream = torch.randn(expected.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(dtype)
    expected_grads = torch.autograd.grad(expected, (x, y), upstream)
    actual_grads = torch.autograd.grad(actual, (x, y), upstream)
    for name, a, e in zip(("first input", "second input"), actual_grads, expected_grads, strict=True):
        assert a.dtype == dtype
        _close(a, e, dtype, f"{op_name} gradient of the {name}")


# ----------------------------------------------------------------------------------------------------
# Parity with the reference
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op_name", sorted(OPS))
def test_torch_backend_matches_reference(op_name, dtype):
    _check_parity(op_name, "torch", dtype)


@pytest.mark.parametrize("op_name", sorted(OPS))
def test_triton_backend_matches_reference_fp32(op_name):
    _check_parity(op_name, "triton", torch.float32)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("op_name", ["maxsim_bidirectional_leaky", "reconstruction", "topk_k5"])
def test_triton_backend_matches_reference_low_precision(op_name, dtype):
    _check_parity(op_name, "triton", dtype)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("op_name", ["maxsim_bidirectional_leaky", "reconstruction", "topk_k5"])
def test_gathered_batch(op_name, backend):
    """Distributed training scores Bq local queries against Bk = 4·Bq gathered keys."""
    case = {"n_q": 2, "n_k": 8}
    _check_parity(op_name, backend, torch.float32, case)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_topk_with_k1_is_cosine_maxsim(backend):
    """With normalised inputs and k = 1 the aggregate is the best patch itself: the logit is max_n ⟨t, x_n⟩."""
    sub, patches, sub_mask, patch_mask = _topk_case(torch.float32)
    logits = P.pairwise_topk_aggregate_cosines(sub, patches, sub_mask, patch_mask, k=1, tau=0.07, backend=backend)
    for m in range(sub.shape[1]):
        maxsim = P.pairwise_maxsim(sub[:, m : m + 1], patches, sub_mask[:, m : m + 1], patch_mask, backend=backend)
        torch.testing.assert_close(logits[:, :, m], maxsim, rtol=1e-5, atol=1e-6)
    assert (logits[0, :, -1] == 0).all(), "an invalid subcaption scores 0"
    assert (logits[:, 2] == 0).all(), "an image without valid patches scores 0"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_sets_score_zero(backend):
    q, k, q_mask, k_mask = _pair_case(torch.float32)
    maxsim = P.pairwise_maxsim(q, k, q_mask, k_mask, bidirectional=True, backend=backend)
    recon = P.pairwise_reconstruction_scores(q, k, q_mask, k_mask, backend=backend)
    for scores in (maxsim, recon):
        assert (scores[-1] == 0).all()  # query set without valid token
        assert (scores[:, 1] == 0).all()  # key set without valid token
        assert (scores[:-1, [0, 2, 3, 4]] != 0).all()


def test_triton_topk_at_the_widest_patch_tile():
    """200 patches fill the widest tile (256): the radix select walks every index bit of the tie search and
    the patch reductions run as 16 batched slices. k = 50 is SAP's ⌈N/4⌉."""
    _check_parity("topk_k5", "triton", torch.float32, {"n_q": 2, "n_sub": 3, "n_k": 4, "n_patch": 200, "dim": 24})
    sub, patches, sub_mask, patch_mask = _topk_case(torch.float32, n_q=2, n_sub=3, n_k=4, n_patch=200, dim=24)
    expected = R.pairwise_topk_aggregate_cosines(sub, patches, sub_mask, patch_mask, k=50, tau=0.07)
    actual = P.pairwise_topk_aggregate_cosines(sub, patches, sub_mask, patch_mask, k=50, tau=0.07, backend="triton")
    _close(actual, expected, torch.float32, "topk k=50 over 200 patches")


def test_topk_beyond_the_widest_tile_runs_the_torch_path(monkeypatch):
    """More patches than the Triton kernels take: ``auto`` (as on a GPU, where it resolves to Triton)
    runs the torch path; an explicit ``triton`` is refused with a clear error."""
    sub, patches, sub_mask, patch_mask = _topk_case(
        torch.float32, n_q=2, n_sub=2, n_k=4, n_patch=P.TRITON_TOPK_MAX_PATCHES + 1, dim=16
    )
    with pytest.raises(ValueError, match="at most 256 patches"):
        P.pairwise_topk_aggregate_cosines(sub, patches, sub_mask, patch_mask, k=3, backend="triton")
    monkeypatch.setattr(_dispatch, "resolve_backend", lambda backend, device: "triton")
    expected = R.pairwise_topk_aggregate_cosines(sub, patches, sub_mask, patch_mask, k=3, tau=0.07)
    actual = P.pairwise_topk_aggregate_cosines(sub, patches, sub_mask, patch_mask, k=3, tau=0.07, backend="auto")
    _close(actual, expected, torch.float32, "topk beyond the widest tile")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_reconstruction_gradients_stay_finite_under_large_upstream_gradients(backend):
    """Masked keys carry the dtype's lowest logit; an upstream gradient above 1 per valid query token must
    not turn ``g · z`` into ±inf (and ``inf · p`` with ``p = 0`` into NaN)."""
    q, k, q_mask, k_mask = _pair_case(torch.float32, n_q=2, n_k=3, len_q=5, len_k=6, dim=16)
    q.requires_grad_(True)
    k.requires_grad_(True)
    upstream = torch.full((2, 3), 40.0)
    expected = torch.autograd.grad(R.pairwise_reconstruction_scores(q, k, q_mask, k_mask), (q, k), upstream)
    actual = torch.autograd.grad(
        P.pairwise_reconstruction_scores(q, k, q_mask, k_mask, backend=backend), (q, k), upstream
    )
    for a, e in zip(actual, expected, strict=True):
        assert torch.isfinite(a).all()
        _close(a, e, torch.float32, "reconstruction gradient")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_topk_launches_keep_the_config_the_compile_check_compiles(dtype):
    """On a GPU the autotuner prunes the SAP kernels' configs by dtype and patch tile (the interpreter runs
    only the first); for every tile a launch can use, the one config left is the one in compile_specs."""
    from mulclip_fast.kernels import pairwise_topk

    named_args = {"T": torch.empty(0, dtype=dtype)}
    compiled = {(spec.constexprs["BLOCK_N"], spec.num_warps) for spec in pairwise_topk.compile_specs(dtype)}
    for kernel in (
        pairwise_topk._sap_forward_kernel,
        pairwise_topk._sap_dsub_kernel,
        pairwise_topk._sap_dpatches_kernel,
    ):
        for block_n in pairwise_topk.BLOCK_NS:
            kept = kernel.early_config_prune(kernel.all_configs, named_args, BLOCK_N=block_n)
            assert len(kept) == 1 and (block_n, kept[0].num_warps) in compiled


def test_ties_at_the_kth_score_keep_the_lowest_patch_indices():
    """Duplicated patches (flat image background) tie exactly; both backends keep the lowest indices."""
    g = torch.Generator().manual_seed(3)
    sub = _tokens(g, 2, 3, 32)
    patches = _tokens(g, 2, 20, 32)
    patches[:, 10:] = patches[:, :1]  # ten copies of patch 0
    from mulclip_fast.kernels import pairwise_topk

    selections = []
    for impl in (_torch_pairwise, pairwise_topk):
        mask = torch.ones(2, 20, dtype=torch.bool)
        _, selected, _ = impl.topk_aggregate_cosines_forward(
            sub, patches, torch.ones(2, 3, dtype=torch.bool), mask, 4, 0.07
        )
        selections.append(_torch_pairwise.unpack_bits(selected, 20))
    assert torch.equal(selections[0], selections[1])
    assert (selections[0].sum(-1) == 4).all()


# ----------------------------------------------------------------------------------------------------
# Autograd and graph contracts
# ----------------------------------------------------------------------------------------------------


def _tiny(seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = _tokens(g, 2, 3, 5, dtype=torch.float64), _tokens(g, 3, 4, 5, dtype=torch.float64)
    q_mask = torch.tensor([[True, True, False], [True, True, True]])
    k_mask = torch.tensor([[True, False, True, True], [True, True, True, True], [False, True, True, False]])
    return q.requires_grad_(), k.requires_grad_(), q_mask, k_mask


def test_gradcheck_float64():
    q, k, q_mask, k_mask = _tiny()

    def maxsim(a, b):
        return P.pairwise_maxsim(a, b, q_mask, k_mask, bidirectional=True, negative_slope=0.1, backend="torch")

    def recon(a, b):
        return P.pairwise_reconstruction_scores(a, b, q_mask, k_mask, tau=0.3, backend="torch")

    def topk(a, b):
        return P.pairwise_topk_aggregate_cosines(a, b, q_mask, k_mask, k=2, tau=0.3, backend="torch")

    for fn in (maxsim, recon, topk):
        assert torch.autograd.gradcheck(fn, (q, k), eps=1e-6, atol=1e-6)


def _op_cases(backend):
    q, k, q_mask, k_mask = (t.detach().float() if t.is_floating_point() else t for t in _tiny())
    q = F.pad(q, (0, 11)).requires_grad_()  # d = 16: the smallest tl.dot tile
    k = F.pad(k, (0, 11)).requires_grad_()
    return [
        (P._maxsim_op, (q, k, q_mask, k_mask, True, 0.1, backend)),
        (P._maxsim_op, (q, k, q_mask, k_mask, False, None, backend)),
        (P._reconstruction_op, (q, k, q_mask, k_mask, 0.5, backend)),
        (P._topk_op, (q, k, q_mask, k_mask, 2, 0.5, backend)),
    ]


def _backward_case(op, args):
    """The backward custom op of ``op`` and its arguments, from one forward call's statistics."""
    with torch.no_grad():
        out, *stats = op(*args)
    grad = torch.randn_like(out)
    x, y, x_mask, y_mask = (t.detach() for t in args[:4])
    if op is P._maxsim_op:
        return P._maxsim_backward_op, (grad, x, y, x_mask, y_mask, *stats, *args[4:])
    if op is P._reconstruction_op:
        return P._reconstruction_backward_op, (grad, x, y, x_mask, y_mask, *stats, args[4], args[5])
    return P._topk_backward_op, (grad, x, y, x_mask, y_mask, *stats, args[5], args[6])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(backend):
    for op, args in _op_cases(backend):
        torch.library.opcheck(op, args)
        torch.library.opcheck(*_backward_case(op, args))


def test_torch_compile_fullgraph():
    q, k, q_mask, k_mask = _pair_case(torch.float32, n_q=2, n_k=3, len_q=5, len_k=6, dim=16)
    sub = q[:, :3].detach()

    def loss(a, b, s):
        scores = P.pairwise_maxsim(a, b, q_mask, k_mask, bidirectional=True, negative_slope=0.1, backend="torch")
        recon = P.pairwise_reconstruction_scores(a, b, q_mask, k_mask, backend="torch")
        sap = P.pairwise_topk_aggregate_cosines(s, b, None, k_mask, k=2, backend="torch")
        return scores.sum() + recon.sum() + sap.sum()

    args = [t.clone().requires_grad_() for t in (q, k, sub)]
    expected = loss(*args)
    expected_grads = torch.autograd.grad(expected, args)
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    actual = compiled(*args)
    torch.testing.assert_close(actual, expected)
    for a, e in zip(torch.autograd.grad(actual, args), expected_grads, strict=True):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize(
    "name", ["pairwise_maxsim", "pairwise_reconstruction_scores", "pairwise_topk_aggregate_cosines"]
)
def test_double_backward_is_refused_with_the_op_named(name):
    """Differentiating a gradient again raises an error naming the op and the backend that can (PyTorch's
    own named the internal backward op and asked the caller to register a formula)."""
    q, k, q_mask, k_mask = (t.requires_grad_() if t.is_floating_point() else t for t in _tiny())
    out = getattr(P, name)(q, k, q_mask, k_mask, backend="torch")
    grads = torch.autograd.grad(out.sum(), (q, k), create_graph=True)
    with pytest.raises(RuntimeError, match=f"{name} has no double backward.*backend='reference'"):
        torch.autograd.grad(sum(g.sum() for g in grads), (q, k))


@pytest.mark.parametrize("op_name", ["reconstruction", "topk"])
def test_torch_compile_with_dynamic_shapes_and_temperatures(op_name):
    """Under ``torch.compile(dynamic=True)`` (or a temperature that changes between compiled calls) ``tau``
    is a symbolic float: the op takes it, where its validation once crashed reading it (``math.isfinite``)."""
    q, k, q_mask, k_mask = _pair_case(torch.float32, n_q=2, n_k=3, len_q=5, len_k=6, dim=16)

    def fn(a, b, tau):
        if op_name == "reconstruction":
            return P.pairwise_reconstruction_scores(a, b, q_mask, k_mask, tau=tau, backend="torch")
        return P.pairwise_topk_aggregate_cosines(a, b, q_mask, k_mask, k=2, tau=tau, backend="torch")

    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
    args = [t.clone().requires_grad_() for t in (q, k)]
    for tau in (0.2, 0.3):
        got, want = compiled(*args, tau), fn(*args, tau)
        torch.testing.assert_close(got, want)
        for g, w in zip(torch.autograd.grad(got.sum(), args), torch.autograd.grad(want.sum(), args), strict=True):
            torch.testing.assert_close(g, w)


# ----------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------


def _bad_calls():
    q, k, q_mask, k_mask = _pair_case(torch.float32, n_q=2, n_k=2, len_q=3, len_k=4, dim=8)
    nan = q.clone()
    nan[0, 0, 0] = float("nan")
    return [
        ("q must have shape", lambda: P.pairwise_maxsim(q[0], k)),
        ("share the feature width", lambda: P.pairwise_maxsim(q, k[..., :4])),
        ("q_mask must have dtype torch.bool", lambda: P.pairwise_maxsim(q, k, q_mask.int())),
        ("k_mask must have shape", lambda: P.pairwise_maxsim(q, k, q_mask, k_mask[:, :2])),
        ("NaN or Inf", lambda: P.pairwise_reconstruction_scores(nan, k)),
        ("negative_slope", lambda: P.pairwise_maxsim(q, k, negative_slope=-0.1)),
        ("bidirectional must be a bool", lambda: P.pairwise_maxsim(q, k, bidirectional=1)),
        ("tau must be a positive", lambda: P.pairwise_reconstruction_scores(q, k, tau=0.0)),
        ("k must satisfy", lambda: P.pairwise_topk_aggregate_cosines(q, k, k=5)),
        ("k must satisfy", lambda: P.pairwise_topk_aggregate_cosines(q, k, k=0)),
        ("k must be an int", lambda: P.pairwise_topk_aggregate_cosines(q, k, k=2.0)),
        ("sub is torch.float32 but patches is torch.float16", lambda: P.pairwise_topk_aggregate_cosines(q, k.half())),
        ("backend must be one of", lambda: P.pairwise_maxsim(q, k, backend="cuda")),
        ("supports float16, bfloat16 and float32", lambda: P.pairwise_maxsim(q.double(), k.double(), backend="triton")),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_input_raises_value_error(case):
    message, call = _bad_calls()[case]
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_temperature_that_requires_grad_is_refused_not_silently_detached(backend):
    """As the matched ops: the reference learns a tensor temperature, the fused ops would drop its gradient."""
    q, k, q_mask, k_mask = _pair_case(torch.float32, n_q=2, n_k=2, len_q=3, len_k=4, dim=16)
    tau = torch.tensor(0.2, requires_grad=True)
    R.pairwise_reconstruction_scores(q, k, q_mask, k_mask, tau=tau).sum().backward()
    assert tau.grad is not None  # the spec learns it
    with pytest.raises(ValueError, match="tau .*requires grad"):
        P.pairwise_reconstruction_scores(q, k, q_mask, k_mask, tau=tau, backend=backend)
    with pytest.raises(ValueError, match="tau .*requires grad"):
        P.pairwise_topk_aggregate_cosines(q, k, q_mask, k_mask, k=2, tau=tau, backend=backend)


# ----------------------------------------------------------------------------------------------------
# Memory: nothing quadratic survives
# ----------------------------------------------------------------------------------------------------

PAPER = {"n": 64, "len_q": 248, "len_k": 196, "dim": 512, "n_sub": 8, "k": 49}


def _memory_case(op_name, n, len_q, len_k, dim, n_sub, k):
    """``(call, inputs)`` of one op at the given shape, float32, all tokens valid."""
    g = torch.Generator().manual_seed(0)
    keys = _tokens(g, n, len_k, dim).requires_grad_()
    if op_name == "topk":
        sub = _tokens(g, n, n_sub, dim).requires_grad_()

        def call(backend):
            return P.pairwise_topk_aggregate_cosines(sub, keys, k=k, tau=0.07, backend=backend)

        return call, (sub, keys)
    q = _tokens(g, n, len_q, dim).requires_grad_()

    def call(backend):
        if op_name == "maxsim":  # FineLIP's form: both directions, LeakyReLU
            return P.pairwise_maxsim(q, keys, bidirectional=True, negative_slope=0.1, backend=backend)
        return P.pairwise_reconstruction_scores(q, keys, backend=backend)

    return call, (q, keys)


def _peak_forward_backward(call, inputs, backend):
    """CPU-allocator peak of forward + backward above the inputs, and the bytes of input gradients + output.

    The allocator's own count (not the dispatch tracker, which sees a custom op's outputs but not the
    temporaries inside it) is what makes the fused ops' chunk temporaries visible.
    """
    for x in inputs:
        x.grad = None

    def run():
        out = call(backend)
        out.backward(torch.ones_like(out))
        return out

    peak, out = allocator_peak_memory_of(run)
    floor = sum(x.numel() * x.element_size() for x in inputs) + out.numel() * out.element_size()
    return peak, floor


def _quadratic_floor(op_name, n, len_q, len_k, dim, n_sub, k):
    """Bytes of one float32 tensor the reference cannot avoid: SAP's [Bq, Bk, M, k, d] gathered patches
    (the others' [Bq, Bk, Lq, Lk] similarities). A lower bound on the reference's peak."""
    if op_name == "topk":
        return n * n * n_sub * k * dim * 4
    return n * n * len_q * len_k * 4


def _statistics_bytes(op_name, n, len_q, len_k, dim, n_sub, k):
    """Bytes the forward keeps for backward besides the inputs (arg-max/LSE statistics, packed top-k sets)."""
    if op_name == "topk":
        return n * n_sub * n * ((len_k + 7) // 8 + 4)
    if op_name == "maxsim":  # bidirectional: fp32 value + int32 index per token, both directions
        return n * n * (len_q + len_k) * 8
    return n * n * len_q * 8  # r + lse


@pytest.mark.parametrize("op_name", ["maxsim", "reconstruction", "topk"])
def test_peak_memory_at_scaled_shape(op_name):
    """B = 16 at the paper's token counts and width. The fused peak is the input gradients + output, the
    saved statistics and a few chunk buffers of bounded size (``_torch_pairwise.chunk_budget``): nothing
    that grows with Bq·Bk·Lq·Lk. The reference, measured, is already ≥ 5× higher; the gap grows linearly
    with B (≥ 20× at B = 64: ``test_peak_memory_at_paper_shape`` and docs/performance.md)."""
    shape = {**PAPER, "n": 16}
    call, inputs = _memory_case(op_name, **shape)
    fused, floor = _peak_forward_backward(call, inputs, "torch")
    reference, _ = _peak_forward_backward(call, inputs, "reference")
    chunk_buffers = 5 * _torch_pairwise.MIN_CHUNK_ELEMENTS * 4  # at B = 16 the budget is the minimum
    assert fused <= floor + _statistics_bytes(op_name, **shape) + chunk_buffers, f"{op_name}: fused peak {fused} B"
    assert reference >= 5 * fused, f"{op_name}: reference {reference} B vs fused {fused} B"


@pytest.mark.slow
@pytest.mark.parametrize("op_name", ["maxsim", "reconstruction", "topk"])
def test_peak_memory_at_paper_shape(op_name):
    """Bq = Bk = 64, 248 query tokens, 196 keys, d = 512 (M = 8, k = 49): fused ≤ 1.5× (input gradients +
    output) and ≥ 20× below the reference. The reference is measured for max-sim and reconstruction (about
    4 GB each); for SAP (about 16 GB measured once, docs/performance.md) its unavoidable [Bq, Bk, M, k, d] gather, a
    lower bound on its peak, stands in."""
    call, inputs = _memory_case(op_name, **PAPER)
    fused, floor = _peak_forward_backward(call, inputs, "torch")
    assert fused <= 1.5 * floor, f"{op_name}: fused peak {fused} B > 1.5 × {floor} B"
    if op_name == "topk":
        reference = _quadratic_floor(op_name, **PAPER)
    else:
        reference, _ = _peak_forward_backward(call, inputs, "reference")
    assert reference >= 20 * fused, f"{op_name}: reference {reference} B vs fused {fused} B"


def test_cost_model_counts_the_similarity_gemms():
    gemm = 2 * 64 * 64 * 248 * 196 * 512
    cost = costs.pairwise_maxsim_cost(64, 248, 64, 196, 512, bidirectional=True)
    assert cost.flops_forward == gemm  # both directions take their maxima of the same similarities
    assert cost.flops_backward == 2 * gemm
    recon = costs.pairwise_reconstruction_cost(64, 248, 64, 196, 512)
    assert 2 * gemm < recon.flops_backward < 2.1 * gemm  # dq and dk, not the recomputed similarities
    sap = costs.pairwise_topk_aggregate_cost(64, 8, 64, 196, 49, 512)
    assert sap.flops == 2 * 64 * 8 * 64 * (196 + 49 + 1 + 4 * 49 + 2) * 512
    assert sap.bytes_forward > (64 * 8 + 64 * 196) * 512 * 4
    assert math.isclose(cost.flops, cost.flops_forward + cost.flops_backward)
