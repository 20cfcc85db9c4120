"""Fused matched-pair ops vs the reference (docs/kernels.md): values, gradients, contracts, memory, bad input.

The Triton cases run in Triton's interpreter on machines without CUDA (the root conftest sets
TRITON_INTERPRET=1), so shapes there stay small and blocks few. Tolerances (docs/kernels.md): fp32 atol 1e-5 /
rtol 1e-4, fp16/bf16 rtol 2e-2, against the reference computed from the same rounded inputs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mulclip_fast import ops
from mulclip_fast import reference as R
from mulclip_fast.ops import _dispatch, matched
from mulclip_fast.ops._dispatch import interpreter_enabled, kernel_backend
from mulclip_fast.tools.memory_report import PAPER_SHAPE, measure

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BACKENDS = ["torch", "triton"]
TOLERANCE = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-4},
    torch.float16: {"atol": 2e-3, "rtol": 2e-2},
    torch.bfloat16: {"atol": 1e-2, "rtol": 2e-2},
    torch.float64: {"atol": 1e-10, "rtol": 1e-8},
}


def _skip_without_triton(backend: str) -> None:
    if backend == "triton" and not (torch.cuda.is_available() or interpreter_enabled()):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _tokens(generator, *shape, dtype=torch.float32):
    x = F.normalize(torch.randn(*shape, generator=generator, dtype=torch.float64), dim=-1)
    return x.to(dtype).to(_device()).requires_grad_()


def _mask(generator, batch, length, keep=0.7):
    """Random validity with the edge cases: sample 0 fully valid, sample 1 fully masked."""
    mask = torch.rand(batch, length, generator=generator) < keep
    mask[0] = True
    if batch > 2:
        mask[1] = False
    mask[:, 0] |= torch.arange(batch) != 1  # every other sample keeps a valid token
    return mask.to(_device())


def _check_against_reference(name, args, kwargs, backend, dtype, upstream_seed=7):
    """Values and gradients of ``ops.<name>`` vs ``reference.<name>`` on the same (rounded) inputs."""
    fused = getattr(ops, name)(*args, **kwargs, backend=backend)
    expected = getattr(R, name)(*args, **kwargs)
    assert fused.dtype == expected.dtype and fused.shape == expected.shape
    torch.testing.assert_close(fused, expected, **TOLERANCE[dtype])
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    generator = torch.Generator().manual_seed(upstream_seed)
    upstream = torch.randn(fused.shape, generator=generator, dtype=torch.float64).to(fused.device)
    got = torch.autograd.grad((fused.double() * upstream).sum(), leaves)
    want = torch.autograd.grad((expected.double() * upstream).sum(), leaves)
    for g, w in zip(got, want, strict=True):
        assert torch.isfinite(g).all()
        assert g.dtype == w.dtype
        # gradients of half inputs are rounded once more: scale atol by their magnitude
        scale = max(1.0, w.abs().max().item()) if dtype != torch.float32 else 1.0
        torch.testing.assert_close(g, w, atol=TOLERANCE[dtype]["atol"] * scale, rtol=TOLERANCE[dtype]["rtol"])


# ---------------------------------------------------------------------------------------------------
# Parity with the reference
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_token_reconstruction_matches_reference(backend, dtype):
    _skip_without_triton(backend)
    g = torch.Generator().manual_seed(0)
    q, kv = _tokens(g, 3, 11, 40, dtype=dtype), _tokens(g, 3, 13, 40, dtype=dtype)
    q_mask, kv_mask = _mask(g, 3, 11), _mask(g, 3, 13)
    _check_against_reference("token_reconstruction", (q, kv, q_mask, kv_mask, 0.1), {}, backend, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_reconstruction_multiple_blocks_and_width_chunks(backend):
    """More rows/keys than one 64-block and a width that is not a multiple of the 64-wide d chunk."""
    _skip_without_triton(backend)
    g = torch.Generator().manual_seed(1)
    q, kv = _tokens(g, 2, 70, 72), _tokens(g, 2, 67, 72)
    _check_against_reference(
        "token_reconstruction", (q, kv, _mask(g, 2, 70), _mask(g, 2, 67), 0.07), {}, backend, torch.float32
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_wpr_loss_matches_reference(backend, dtype):
    _skip_without_triton(backend)
    g = torch.Generator().manual_seed(2)
    v, t = _tokens(g, 4, 9, 24, dtype=dtype), _tokens(g, 4, 13, 24, dtype=dtype)
    v_mask, t_mask = _mask(g, 4, 9), _mask(g, 4, 13)
    v_mask[3] = False  # a sample with valid words but no valid patch is left out of the mean
    args = (v, t, v_mask, t_mask, 0.07, 0.1)
    _check_against_reference("wpr_loss", args, {"reduction": "none"}, backend, dtype)
    if backend == "torch":  # the mean is the same torch glue over the per-sample op for both backends
        _check_against_reference("wpr_loss", args, {}, backend, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_topk_patch_aggregate_matches_reference(backend, dtype):
    _skip_without_triton(backend)
    g = torch.Generator().manual_seed(3)
    sub, patches = _tokens(g, 3, 5, 40, dtype=dtype), _tokens(g, 3, 23, 40, dtype=dtype)
    sub_mask, patch_mask = _mask(g, 3, 5), _mask(g, 3, 23, keep=0.3)  # some samples have < k valid patches
    _check_against_reference(
        "topk_patch_aggregate", (sub, patches, sub_mask, patch_mask), {"k": 6, "tau": 0.07}, backend, dtype
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 19], ids=["k=1", "k=N"])
def test_topk_patch_aggregate_extreme_k(backend, k):
    """k = 1 (a single patch) and k = N (softmax over every valid patch); M above one 16-row block."""
    _skip_without_triton(backend)
    g = torch.Generator().manual_seed(4)
    sub, patches = _tokens(g, 2, 17, 33), _tokens(g, 2, 19, 33)
    sub_mask, patch_mask = _mask(g, 2, 17), _mask(g, 2, 19)
    _check_against_reference(
        "topk_patch_aggregate", (sub, patches, sub_mask, patch_mask), {"k": k, "tau": 0.1}, backend, torch.float32
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_ties_choose_exactly_k_patches(backend):
    """Duplicate patches tie at the k-th score: exactly k of them are pooled (weights stay a softmax over k)."""
    _skip_without_triton(backend)
    g = torch.Generator().manual_seed(5)
    base = F.normalize(torch.randn(1, 4, 16, generator=g), dim=-1)
    patches = base.repeat(1, 2, 1).to(_device())  # every patch appears twice
    sub = base[:, :1].to(_device())  # its best match is patch 0 and its copy 4
    out = ops.topk_patch_aggregate(sub, patches, k=1, tau=0.05, backend=backend)
    torch.testing.assert_close(out[0, 0], patches[0, 0], atol=1e-6, rtol=1e-5)
    both = ops.topk_patch_aggregate(sub, patches, k=2, tau=0.05, backend=backend)
    torch.testing.assert_close(both[0, 0], patches[0, 0], atol=1e-6, rtol=1e-5)


def _near_tied_patches(seed: int, dtype: torch.dtype, n: int = 16, width: int = 64):
    """Patches in pairs whose scores tie in exact arithmetic (the pair's vectors are the same values in
    another order, and ``sub`` is symmetric under that order), so only rounding orders them; each patch also
    has a private tag coordinate that ``sub`` ignores, so the aggregate shows which patches it pooled."""
    g = torch.Generator().manual_seed(seed)
    swap = torch.randperm(width, generator=g).view(-1, 2)
    order = torch.arange(width)
    order[swap[:, 0]], order[swap[:, 1]] = swap[:, 1], swap[:, 0]
    sub_dense = torch.randn(width, generator=g)
    firsts = torch.randn(n // 2, width, generator=g) * torch.linspace(2, 0.5, n // 2)[:, None]
    patches = torch.cat([torch.cat([firsts, firsts[:, order]]), torch.eye(n)], dim=1)[None]
    sub = torch.cat([(sub_dense + sub_dense[order]) / 2, torch.zeros(n)])[None, None]
    grad = torch.randn(sub.shape, generator=g)
    return (t.to(_device(), dtype) for t in (sub, patches, grad))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_topk_backward_differentiates_the_patches_the_forward_pooled(dtype):
    """The backward re-selects the top k from recomputed scores. Computed with another chunk width than the
    forward's, a near-tie at the k-th score fell the other way in 12 (fp16) and 9 (bf16) of 40 such inputs
    (interpreter), and the gradient belonged to another patch set than the output. Both now score alike."""
    _skip_without_triton("triton")
    n, k = 16, 7
    for seed in range(10):
        sub, patches, grad = _near_tied_patches(seed, dtype, n)
        patches.requires_grad_()
        out = ops.topk_patch_aggregate(sub, patches, k=k, tau=50.0, backend="triton")
        out.backward(grad)
        pooled = (out[0, 0, -n:] != 0).nonzero().flatten().tolist()
        differentiated = (patches.grad[0].abs().sum(dim=1) != 0).nonzero().flatten().tolist()
        assert len(pooled) == k and differentiated == pooled, f"seed {seed}: {pooled} vs {differentiated}"


EMPTY_SHAPES = {"empty batch": ((0, 3, 16), (0, 4, 16)), "empty query sets": ((2, 0, 16), (2, 4, 16))}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", EMPTY_SHAPES)
@pytest.mark.parametrize("name", ["token_reconstruction", "wpr_loss", "topk_patch_aggregate"])
def test_empty_batches_and_token_sets_give_the_reference_result(name, shape, backend):
    """A batch of no samples (a trainer's empty last batch, a rank's empty shard) or samples without query
    tokens: the reference's empty or zero result, forward and backward, on every backend."""
    _skip_without_triton(backend)
    g = torch.Generator().manual_seed(9)
    a_shape, b_shape = EMPTY_SHAPES[shape]
    args = (_tokens(g, *a_shape), _tokens(g, *b_shape))
    kwargs = {"k": 1} if name == "topk_patch_aggregate" else {}
    _check_against_reference(name, args, kwargs, backend, torch.float32)


def test_backends_auto_and_reference():
    g = torch.Generator().manual_seed(6)
    q, kv = _tokens(g, 2, 5, 8), _tokens(g, 2, 6, 8)
    auto = ops.token_reconstruction(q, kv, tau=0.1)
    torch.testing.assert_close(
        auto, ops.token_reconstruction(q, kv, tau=0.1, backend="reference"), atol=1e-6, rtol=1e-5
    )
    assert kernel_backend("auto", q) == ("triton" if q.is_cuda else "torch")
    assert kernel_backend("auto", q.double()) == "torch"  # no fp64 kernels: torch path


# ---------------------------------------------------------------------------------------------------
# Autograd and graph contracts
# ---------------------------------------------------------------------------------------------------


def _tiny_cases(dtype=torch.float64):
    g = torch.Generator().manual_seed(8)
    v, t, sub = _tokens(g, 3, 4, 6, dtype=dtype), _tokens(g, 3, 5, 6, dtype=dtype), _tokens(g, 3, 3, 6, dtype=dtype)
    v_mask, t_mask, sub_mask = _mask(g, 3, 4), _mask(g, 3, 5), _mask(g, 3, 3)
    return {
        "token_reconstruction": ((v, t, v_mask, t_mask, 0.2), {}),
        "wpr_loss": ((v, t, v_mask, t_mask, 0.2, 0.3), {}),
        "topk_patch_aggregate": ((sub, v, sub_mask, v_mask), {"k": 2, "tau": 0.2}),
    }


@pytest.mark.parametrize("name", ["token_reconstruction", "wpr_loss", "topk_patch_aggregate"])
def test_gradcheck_float64_torch_path(name):
    args, kwargs = _tiny_cases()[name]
    leaves = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]

    def fn(*inputs):
        full = list(args)
        for i, x in zip(leaves, inputs, strict=True):
            full[i] = x
        return getattr(ops, name)(*full, **kwargs, backend="torch")

    assert torch.autograd.gradcheck(fn, [args[i] for i in leaves])


@pytest.mark.parametrize("name", ["token_reconstruction", "wpr_loss", "topk_patch_aggregate"])
def test_double_backward_is_refused_with_the_op_named(name):
    """First-order gradients with ``create_graph=True`` work; differentiating them again raises an error that
    names the op and the backend that can (PyTorch's own asked the caller to register a formula)."""
    args, kwargs = _tiny_cases()[name]
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    out = getattr(ops, name)(*args, **kwargs, backend="torch")
    grads = torch.autograd.grad(out.sum(), leaves, create_graph=True)
    with pytest.raises(RuntimeError, match=f"{name} has no double backward.*backend='reference'"):
        torch.autograd.grad(sum(g.sum() for g in grads), leaves)


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("name", ["token_reconstruction", "wpr_loss", "topk_patch_aggregate"])
def test_torch_compile_with_dynamic_shapes_and_temperatures(name, backend):
    """``torch.compile(dynamic=True)`` traces a float temperature as a symbolic float (Dynamo does not
    specialise floats; nor, after its second value, without ``dynamic``): the op must take it, not crash in
    the validation that reads it (it did, in ``math.isfinite``)."""
    torch.compiler.reset()  # every case compiles the same code object, ``fn``: its recompiles would add up
    tensors = _tiny_cases()[name][0][:4]
    taus = {"wpr_loss": ("tau_attn", "tau_contrast")}.get(name, ("tau",))
    k = {"k": 2} if name == "topk_patch_aggregate" else {}

    def fn(*inputs, **temperatures):
        return getattr(ops, name)(*inputs, **k, **temperatures, backend=backend)

    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
    for tau in (0.2, 0.3):
        temperatures = dict.fromkeys(taus, tau)
        got, want = compiled(*tensors, **temperatures), fn(*tensors, **temperatures)
        torch.testing.assert_close(got, want)
        leaves = [x for x in tensors if x.requires_grad]
        for g, w in zip(torch.autograd.grad(got.sum(), leaves), torch.autograd.grad(want.sum(), leaves), strict=True):
            torch.testing.assert_close(g, w)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op_name", ["token_reconstruction", "wpr_loss", "topk_patch_aggregate"])
def test_opcheck(backend, op_name):
    """Schema, fake tensor, autograd registration and AOT dispatch of each forward custom op."""
    _skip_without_triton(backend)
    (v, t, v_mask, t_mask, *_), _ = _tiny_cases(torch.float32)["wpr_loss"]
    (sub, _, sub_mask, _), _ = _tiny_cases(torch.float32)["topk_patch_aggregate"]
    op_args = {
        "token_reconstruction": (v, t, v_mask, t_mask, 0.2, backend),
        "wpr_loss": (v, t, v_mask, t_mask, 0.2, 0.3, backend),
        "topk_patch_aggregate": (sub, v, sub_mask, v_mask, 2, 0.2, backend),
    }[op_name]
    torch.library.opcheck(getattr(torch.ops.mulclip_fast, op_name).default, op_args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op_name", ["token_reconstruction", "wpr_loss", "topk_patch_aggregate"])
def test_opcheck_backward_ops(backend, op_name):
    """The backward custom ops (what the registered autograd formulas call) pass opcheck too."""
    _skip_without_triton(backend)
    (v, t, v_mask, t_mask, *_), _ = _tiny_cases(torch.float32)["wpr_loss"]
    (sub, _, sub_mask, _), _ = _tiny_cases(torch.float32)["topk_patch_aggregate"]
    v, t, sub = v.detach(), t.detach(), sub.detach()
    if op_name == "token_reconstruction":
        out, lse = torch.ops.mulclip_fast.token_reconstruction(v, t, v_mask, t_mask, 0.2, backend)
        op_args = (torch.randn_like(out), v, t, v_mask, t_mask, out, lse, 0.2, backend)
    elif op_name == "wpr_loss":
        op_args = (torch.randn(v.shape[0], device=v.device), v, t, v_mask, t_mask, 0.2, 0.3, backend)
    else:
        op_args = (torch.randn_like(sub), sub, v, sub_mask, v_mask, 2, 0.2, backend)
    torch.library.opcheck(getattr(torch.ops.mulclip_fast, f"{op_name}_backward").default, op_args)


def test_autograd_saves_no_quadratic_tensor():
    """Between forward and backward autograd keeps only inputs-sized tensors: never [B, P, K] or [B, M, k, d]."""
    g = torch.Generator().manual_seed(9)
    v, t, sub = _tokens(g, 2, 30, 8), _tokens(g, 2, 40, 8), _tokens(g, 2, 3, 8)
    calls = {
        "wpr_loss": lambda: ops.wpr_loss(v, t, backend="torch"),
        "token_reconstruction": lambda: ops.token_reconstruction(v, t, backend="torch"),
        "topk_patch_aggregate": lambda: ops.topk_patch_aggregate(sub, v, k=5, backend="torch"),
    }
    for name, call in calls.items():
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda x, saved=saved: saved.append(x.numel()) or x, lambda x: x):
            call()
        assert saved, name
        assert max(saved) <= 2 * 40 * 8, (name, max(saved))  # the largest input; [2, 30, 40] would be 2400


# ---------------------------------------------------------------------------------------------------
# Memory (docs/kernels.md, "Verification without a GPU")
# ---------------------------------------------------------------------------------------------------


def _assert_memory_ratios(shape):
    # topk_patch_aggregate's bound is a fifth, not the tenth once asked for: the patches' gradient alone,
    # which every implementation allocates, is 0.099 of the reference's peak (the tenth held only against
    # a dispatch-mode count, which doubled the reference's gather gradient).
    figures = {f.op: f for f in measure(**shape)}
    assert figures["wpr_loss"].fused_bytes <= figures["wpr_loss"].reference_bytes / 2
    assert figures["topk_patch_aggregate"].fused_bytes <= figures["topk_patch_aggregate"].reference_bytes / 5


@pytest.mark.slow
def test_peak_memory_at_paper_shape():
    """Issue 4's shape: B=64, 248 words, 196 patches, M=8, k=49, d=512, forward + backward above the inputs,
    temporaries inside the custom ops included, the CPU allocator's count (measured: wpr_loss 338.2 → 68.0
    MiB, topk_patch_aggregate 247.1 → 38.6 MiB)."""
    _assert_memory_ratios(PAPER_SHAPE)


def test_peak_memory_per_sample_shape_at_a_quarter_batch(monkeypatch):
    """The same per-sample shape at B=16 with a quarter of the chunk budget: the fused path then splits
    the batch as it splits B=64, so the ratios are the paper shape's at a quarter of the time."""
    monkeypatch.setattr(matched, "CHUNK_BYTES", matched.CHUNK_BYTES // 4)
    _assert_memory_ratios({**PAPER_SHAPE, "batch": 16})


# ---------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------


def _good():
    g = torch.Generator().manual_seed(10)
    return _tokens(g, 2, 4, 8), _tokens(g, 2, 5, 8), _tokens(g, 2, 3, 8)


# Every call is made with an explicit backend ``b``: validation happens before any kernel or chunk runs.
BAD_CALLS = {
    "rank": lambda v, t, s, b: ops.token_reconstruction(v[0], t, backend=b),
    "width": lambda v, t, s, b: ops.token_reconstruction(v, t[..., :4], backend=b),
    "batch": lambda v, t, s, b: ops.wpr_loss(v, t[:1], backend=b),
    "int dtype": lambda v, t, s, b: ops.wpr_loss(v.detach().long(), t.detach().long(), backend=b),
    "mixed dtypes": lambda v, t, s, b: ops.topk_patch_aggregate(s.half(), v, k=2, backend=b),
    "device": lambda v, t, s, b: ops.token_reconstruction(v, t.detach().to("meta"), backend=b),
    "mask dtype": lambda v, t, s, b: ops.token_reconstruction(v, t, torch.ones(2, 4, dtype=torch.int64), backend=b),
    "mask shape": lambda v, t, s, b: ops.wpr_loss(v, t, t_mask=torch.ones(2, 4, dtype=torch.bool), backend=b),
    "mask device": lambda v, t, s, b: ops.wpr_loss(
        v, t, t_mask=torch.ones(2, 5, dtype=torch.bool, device="meta"), backend=b
    ),
    "sub mask shape": lambda v, t, s, b: ops.topk_patch_aggregate(
        s, v, torch.ones(3, dtype=torch.bool), k=2, backend=b
    ),
    "k zero": lambda v, t, s, b: ops.topk_patch_aggregate(s, v, k=0, backend=b),
    "k above N": lambda v, t, s, b: ops.topk_patch_aggregate(s, v, k=5, backend=b),
    "k float": lambda v, t, s, b: ops.topk_patch_aggregate(s, v, k=2.0, backend=b),
    "tau zero": lambda v, t, s, b: ops.token_reconstruction(v, t, tau=0.0, backend=b),
    "tau negative": lambda v, t, s, b: ops.topk_patch_aggregate(s, v, k=2, tau=-1.0, backend=b),
    "tau nan": lambda v, t, s, b: ops.wpr_loss(v, t, tau_contrast=float("nan"), backend=b),
    "nan input": lambda v, t, s, b: ops.wpr_loss(v.detach() * float("nan"), t, backend=b),
    "reduction": lambda v, t, s, b: ops.wpr_loss(v, t, reduction="sum", backend=b),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_bad_input_raises_value_error(case, backend):
    _skip_without_triton(backend)
    with pytest.raises(ValueError):
        BAD_CALLS[case](*_good(), backend)


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_a_temperature_that_requires_grad_is_refused_not_silently_detached(backend):
    """The reference differentiates through a tensor temperature; the fused ops hold temperatures as constants,
    so a learnable one is refused, naming it, instead of its gradient being silently lost."""
    _skip_without_triton(backend)
    v, t, s = _good()
    tau = torch.tensor(0.1, requires_grad=True)
    R.wpr_loss(v, t, tau_attn=tau).backward()
    assert tau.grad is not None  # the spec learns it
    with pytest.raises(ValueError, match="tau_attn .*requires grad"):
        ops.wpr_loss(v, t, tau_attn=tau, backend=backend)
    with pytest.raises(ValueError, match="tau_contrast .*requires grad"):
        ops.wpr_loss(v, t, tau_contrast=tau, backend=backend)
    with pytest.raises(ValueError, match="tau .*requires grad"):
        ops.token_reconstruction(v, t, tau=tau, backend=backend)
    with pytest.raises(ValueError, match="tau .*requires grad"):
        ops.topk_patch_aggregate(s, v, k=2, tau=tau, backend=backend)
    # a tensor without gradient is a constant, as a float is
    constant = ops.wpr_loss(v, t, tau_attn=tau.detach(), backend=backend)
    torch.testing.assert_close(constant, ops.wpr_loss(v, t, tau_attn=0.1, backend=backend))


def test_bad_backend_raises_value_error():
    v, t, s = _good()
    with pytest.raises(ValueError, match="backend"):
        ops.token_reconstruction(v, t, backend="cuda")
    with pytest.raises(ValueError, match="float16, bfloat16 and float32"):
        ops.topk_patch_aggregate(s.double(), v.double(), k=2, backend="triton")


def test_topk_beyond_the_kernel_row_falls_back_to_torch(monkeypatch):
    """More patches than the Triton score row holds: ``auto`` (as on a GPU, where it resolves to Triton)
    takes the torch path, ``triton`` refuses."""
    _skip_without_triton("triton")
    from mulclip_fast.kernels.limits import TOPK_MAX_PATCHES as MAX_PATCHES

    g = torch.Generator().manual_seed(11)
    sub, patches = _tokens(g, 1, 2, 16), _tokens(g, 1, MAX_PATCHES + 1, 16)
    with pytest.raises(ValueError, match=f"at most {MAX_PATCHES} patches"):
        ops.topk_patch_aggregate(sub, patches, k=3, backend="triton")
    monkeypatch.setattr(_dispatch, "resolve_backend", lambda backend, device: "triton")
    expected = R.topk_patch_aggregate(sub, patches, k=3)
    torch.testing.assert_close(ops.topk_patch_aggregate(sub, patches, k=3), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mulclip_loss_through_fused_ops_matches_reference(backend):
    """``MulCLIPLoss(backend=...)`` routes WPR and SAP to the fused ops: same terms and gradients."""
    _skip_without_triton(backend)
    from mulclip_fast.losses import MulCLIPFeatures, MulCLIPLoss

    g = torch.Generator().manual_seed(12)
    batch, patches, words, subcaptions, width = 4, 6, 7, 3, 16

    def leaf(*shape):
        return torch.randn(*shape, generator=g).to(_device()).requires_grad_()

    features = MulCLIPFeatures(
        image_cls=leaf(batch, width),
        image_tokens=leaf(batch, patches, width),
        text_eot=leaf(batch, width),
        text_tokens=leaf(batch, words, width),
        short_eot=leaf(batch, width),
        sub_eot=leaf(batch, subcaptions, width),
        sub_mask=_mask(g, batch, subcaptions),
        text_token_mask=_mask(g, batch, words),
    )
    leaves = [features.image_tokens, features.text_tokens, features.sub_eot]
    fused = MulCLIPLoss(backend=backend)(features, 14.0)
    expected = MulCLIPLoss(backend="reference")(features, 14.0)
    for name in ("wpr", "sap", "loss"):
        torch.testing.assert_close(fused[name], expected[name], atol=1e-5, rtol=1e-4)
    got = torch.autograd.grad(fused["loss"], leaves)
    want = torch.autograd.grad(expected["loss"], leaves)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("seed", range(8))
def test_triton_reconstruction_gradients_in_bf16_at_the_paper_temperature(seed):
    """The score gradient subtracts ``delta = Σ dO·O`` from ``dP``, where the two nearly cancel: built from
    the bf16-rounded output, the Triton backward missed the bf16 tolerance in 4 of these 8 seeds at τ = 0.07
    (gradients off by up to 25%); it now rebuilds O in fp32 for delta, as the torch path uses fp32 P."""
    _skip_without_triton("triton")
    from mulclip_fast.op_parity import Sizes, check_case, make_case

    case = make_case(
        "token_reconstruction", Sizes(2, 7, 2, 5, 24), dtype=torch.bfloat16, seed=seed, a_mask_kind="prefix"
    )
    comparison = check_case(case, "triton")
    assert case.options["tau"] == 0.07 and not comparison.problems, comparison


def test_a_numpy_temperature_is_taken_as_its_float():
    # A temperature read from a NumPy config or array was refused ("got np.float32(0.2)").
    (v, t, v_mask, t_mask, *_), _ = _tiny_cases(torch.float32)["wpr_loss"]
    for backend in ("torch", "reference"):
        want = ops.token_reconstruction(v, t, v_mask, t_mask, tau=float(np.float32(0.2)), backend=backend)
        torch.testing.assert_close(
            ops.token_reconstruction(v, t, v_mask, t_mask, tau=np.float32(0.2), backend=backend), want
        )
