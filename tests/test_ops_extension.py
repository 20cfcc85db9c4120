"""The C++/CUDA extension of csrc/ (docs/kernels.md, "The C++/CUDA extension") against the reference.

Its CPU twin (``backend="cpp"``) runs the per-row code the CUDA kernels run, so these tests check the
extension's selection, softmax, aggregate and backward on machines without a GPU: values and input
gradients for N in {7, 196, 576, 1024} (beyond the Triton kernels' 256), k from 1 to N, masks with fully
masked samples and subcaptions, ties and -0.0/+0.0, strided layouts, and the backend's contracts. The
first test of the session builds the extension (18–46 s on two shared cores; cached under build/).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mulclip_fast import ops
from mulclip_fast import reference as R
from mulclip_fast.ops import _dispatch, extension
from mulclip_fast.ops._torch_matched import topk_selection

TOLERANCE = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-4},
    torch.float16: {"atol": 2e-3, "rtol": 2e-2},
    torch.bfloat16: {"atol": 1e-2, "rtol": 2e-2},
}
DTYPES = list(TOLERANCE)


def _tokens(generator, *shape, dtype=torch.float32):
    x = F.normalize(torch.randn(*shape, generator=generator, dtype=torch.float64), dim=-1)
    return x.to(dtype).requires_grad_()


def _masks(generator, batch, m, n):
    """Random validity; sample 1 has no valid patch, sample 2 no valid subcaption, sample 0 all valid."""
    sub_mask = torch.rand(batch, m, generator=generator) < 0.8
    patch_mask = torch.rand(batch, n, generator=generator) < 0.7
    sub_mask[0], patch_mask[0] = True, True
    patch_mask[1] = False
    sub_mask[2] = False
    return sub_mask, patch_mask


OPS = ["topk_patch_aggregate", "pairwise_topk_aggregate_cosines"]


def _assert_matches_reference(sub, patches, sub_mask, patch_mask, k, tau, dtype, op="topk_patch_aggregate"):
    """Values and input gradients of the C++ twin of ``op`` vs the reference on the same (rounded) inputs."""
    got = getattr(ops, op)(sub, patches, sub_mask, patch_mask, k=k, tau=tau, backend="cpp")
    want = getattr(R, op)(sub, patches, sub_mask, patch_mask, k, tau)
    assert got.dtype == want.dtype == sub.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, **TOLERANCE[dtype], msg=lambda m: f"values, k={k}: {m}")
    upstream = torch.randn(got.shape, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
    got_grads = torch.autograd.grad((got.double() * upstream).sum(), (sub, patches))
    want_grads = torch.autograd.grad((want.double() * upstream).sum(), (sub, patches))
    for name, g, w in zip(("d_sub", "d_patches"), got_grads, want_grads, strict=True):
        assert g.dtype == w.dtype and torch.isfinite(g).all()
        # gradients of half inputs are rounded once more: scale atol by their magnitude; and the score
        # gradients divide a cancelling difference (s - out·q in the all-pairs backward) by tau, so the
        # rounding of any implementation grows as 1/tau below the paper's 0.07
        scale = max(1.0, w.abs().max().item()) if dtype != torch.float32 else 1.0
        scale *= max(1.0, 0.07 / tau)
        tolerance = {"atol": TOLERANCE[dtype]["atol"] * scale, "rtol": TOLERANCE[dtype]["rtol"]}
        torch.testing.assert_close(g, w, **tolerance, msg=lambda m, name=name: f"{name}: {m}")


def _ks(n: int) -> list[int]:
    """Every k for a small N; the edges, a middle and N - 1 for large ones."""
    return list(range(1, n + 1)) if n <= 7 else [1, 2, n // 3, n - 1, n]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("n", [7, 196, 576, 1024])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpp_matches_reference_for_every_patch_count(op, n, dtype):
    g = torch.Generator().manual_seed(n)
    batch, m, d = 4, 5, 32
    sub, patches = _tokens(g, batch, m, d, dtype=dtype), _tokens(g, batch, n, d, dtype=dtype)
    sub_mask, patch_mask = _masks(g, batch, m, n)
    for k in _ks(n):
        _assert_matches_reference(sub, patches, sub_mask, patch_mask, k, 0.07, dtype, op)


def test_cpp_all_pairs_fully_masked_rows_and_images_give_zero_logits():
    g = torch.Generator().manual_seed(13)
    sub, patches = _tokens(g, 3, 4, 16), _tokens(g, 3, 9, 16)
    sub_mask, patch_mask = _masks(g, 3, 4, 9)
    logits = ops.pairwise_topk_aggregate_cosines(sub, patches, sub_mask, patch_mask, k=3, backend="cpp")
    assert (logits[:, 1] == 0).all() and (logits[2] == 0).all() and (logits[0, 0] != 0).all()
    d_sub, d_patches = torch.autograd.grad(logits.sum(), (sub, patches))
    assert (d_sub[2] == 0).all() and (d_patches[1] == 0).all() and (d_patches[0] != 0).any()


def test_cpp_fully_masked_rows_give_zeros_and_no_gradient():
    g = torch.Generator().manual_seed(3)
    sub, patches = _tokens(g, 3, 4, 16), _tokens(g, 3, 9, 16)
    sub_mask, patch_mask = _masks(g, 3, 4, 9)
    out = ops.topk_patch_aggregate(sub, patches, sub_mask, patch_mask, k=3, backend="cpp")
    assert (out[1] == 0).all() and (out[2] == 0).all()
    d_sub, d_patches = torch.autograd.grad(out.sum(), (sub, patches))
    assert (d_sub[1] == 0).all() and (d_sub[2] == 0).all() and (d_patches[1] == 0).all()
    assert (d_patches[0] != 0).any()


def test_cpp_duplicate_patches_tie_and_exactly_k_are_pooled():
    """Duplicates tie at the k-th score: k = 1 pools one copy, k = 2 both (equal weights), never a third
    patch; against the reference's stable-sort rule, and the output unit-norm."""
    g = torch.Generator().manual_seed(5)
    sub = _tokens(g, 1, 1, 16)
    twin = sub.detach()[0, 0]
    others = _tokens(g, 6, 16).detach() * 0.1
    patches = torch.cat([others[:2], twin[None], others[2:4], twin[None], others[4:]])[None].requires_grad_()
    for k in (1, 2, 3, 8):
        _assert_matches_reference(sub, patches, None, None, k, 0.05, torch.float32)
    both = ops.topk_patch_aggregate(sub, patches, k=2, tau=0.05, backend="cpp")
    torch.testing.assert_close(both[0, 0], F.normalize(twin, dim=-1), atol=1e-6, rtol=1e-5)


SIGNED_ZERO_SCORES = [0.0, -0.0, 0.5, 0.0, -0.0, 0.5, -0.0, 0.0]


@pytest.mark.parametrize("masked", [None, 0, 2], ids=lambda m: f"masked={m}")
def test_cpp_selection_rule_with_signed_zero_ties(masked):
    """The extension's selection on explicit scores (a dot product here never yields -0.0) is the rule of
    every backend: -0.0 ties +0.0, ties cut towards the lowest index, masked entries never chosen."""
    extension.require("cpp")
    scores = torch.tensor(SIGNED_ZERO_SCORES)
    assert torch.signbit(scores).sum() == 3, "-0.0 and +0.0 both present"
    valid = torch.ones(scores.numel(), dtype=torch.bool)
    if masked is not None:
        valid[masked] = False
    for k in range(1, scores.numel() + 1):
        got = torch.ops.mulclip_fast_ext.topk_select(scores[None], valid[None], k)[0]
        want = topk_selection(scores, valid, k)
        assert int(got.sum()) == min(k, int(valid.sum()))
        torch.testing.assert_close(got, want, msg=f"k={k}")


def test_cpp_selection_rule_on_random_ties_and_masks():
    """Many rows of scores drawn from few values (ties everywhere, both zeros), random masks, every k."""
    extension.require("cpp")
    g = torch.Generator().manual_seed(9)
    n = 40
    scores = torch.tensor([-1.0, -0.0, 0.0, 0.25, 3.0])[torch.randint(0, 5, (64, n), generator=g)]
    valid = torch.rand(64, n, generator=g) < 0.6
    valid[0] = False
    for k in range(1, n + 1):
        got = torch.ops.mulclip_fast_ext.topk_select(scores, valid, k)
        torch.testing.assert_close(got, topk_selection(scores, valid, k), msg=f"k={k}")


@settings(max_examples=30, deadline=None, derandomize=True)  # the same examples on every run: no flaky CI
@given(
    op=st.sampled_from(OPS),
    batch=st.integers(1, 3),
    m=st.integers(1, 5),
    n=st.integers(1, 70),
    d=st.integers(1, 24),
    k_fraction=st.floats(0.0, 1.0),
    tau=st.sampled_from([0.01, 0.07, 1.0]),
    transposed=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_cpp_matches_reference_across_shapes_and_layouts(op, batch, m, n, d, k_fraction, tau, transposed, seed):
    """Property: any shape, k, temperature and memory layout (a transposed view is not contiguous); the
    all-pairs op with a different number of images than captions."""
    g = torch.Generator().manual_seed(seed)
    k = max(1, min(n, round(k_fraction * n)))
    images = batch + 1 if op == "pairwise_topk_aggregate_cosines" else batch
    if transposed:
        patches = _tokens(g, images, d, n).detach().transpose(1, 2).requires_grad_()
    else:
        patches = _tokens(g, images, n, d)
    sub = _tokens(g, batch, m, d)
    sub_mask = torch.rand(batch, m, generator=g) < 0.8
    patch_mask = torch.rand(images, n, generator=g) < 0.7
    _assert_matches_reference(sub, patches, sub_mask, patch_mask, k, tau, torch.float32, op)


@pytest.mark.parametrize("op", OPS)
def test_cpp_backward_is_deterministic(op):
    g = torch.Generator().manual_seed(2)
    sub, patches = _tokens(g, 2, 6, 64), _tokens(g, 2, 300, 64)

    def grads():
        out = getattr(ops, op)(sub, patches, k=20, backend="cpp")
        return torch.autograd.grad((out * out.detach().flip(-1)).sum(), (sub, patches))

    first, second = grads(), grads()
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "op_name", ["topk_patch_aggregate", "topk_patch_aggregate_backward", "pairwise_topk_aggregate_cosines"]
)
def test_opcheck_cpp(op_name):
    g = torch.Generator().manual_seed(4)
    sub, patches = _tokens(g, 3, 3, 8).detach(), _tokens(g, 3, 11, 8).detach()
    sub_mask, patch_mask = _masks(g, 3, 3, 11)
    extension.require("cpp")
    if op_name == "topk_patch_aggregate_backward":
        args = (torch.randn(sub.shape, generator=g), sub, patches, sub_mask, patch_mask, 4, 0.1, "cpp")
    else:
        args = (sub.requires_grad_(), patches.requires_grad_(), sub_mask, patch_mask, 4, 0.1, "cpp")
    torch.library.opcheck(getattr(torch.ops.mulclip_fast, op_name).default, args)


def test_cpp_compiles_with_fullgraph():
    g = torch.Generator().manual_seed(6)
    sub, patches = _tokens(g, 2, 3, 8), _tokens(g, 2, 300, 8)

    def loss(a, b):
        return ops.topk_patch_aggregate(a, b, k=5, backend="cpp").square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(sub, patches), loss(sub, patches))


def test_extension_backends_refuse_what_they_cannot_run(monkeypatch):
    g = torch.Generator().manual_seed(8)
    sub, patches = _tokens(g, 1, 2, 8), _tokens(g, 1, 5, 8)
    with pytest.raises(ValueError, match="float16, bfloat16 and float32"):
        ops.topk_patch_aggregate(sub.double(), patches.double(), k=2, backend="cpp")
    with pytest.raises(ValueError, match="implements topk_patch_aggregate and pairwise_topk_aggregate_cosines only"):
        ops.token_reconstruction(sub, patches, backend="cpp")
    with pytest.raises(ValueError, match="implements topk_patch_aggregate and pairwise_topk_aggregate_cosines only"):
        ops.pairwise_maxsim(sub, patches, backend="cpp")
    with pytest.raises(ValueError, match="runs on cuda tensors"):
        ops.topk_patch_aggregate(sub, patches, k=2, backend="cuda_ext")
    monkeypatch.setattr(_dispatch, "resolve_backend", lambda backend, device: backend)  # as if on a GPU
    monkeypatch.setattr(extension.torch.version, "cuda", None)
    with pytest.raises(ValueError, match="cuda_ext' is not built here: PyTorch has no CUDA.*nvcc"):
        ops.topk_patch_aggregate(sub, patches, k=2, backend="cuda_ext")


def test_a_failed_build_says_how_to_build(monkeypatch):
    monkeypatch.setattr(extension, "_built", ())
    monkeypatch.setattr(extension, "_load", lambda: "RuntimeError: Ninja is required to load C++ extensions")
    with pytest.raises(ValueError, match="could not build csrc/: RuntimeError: Ninja.*C\\+\\+ compiler"):
        extension.require("cpp")


def test_a_cuda_build_without_a_visible_gpu_says_to_name_the_architectures(monkeypatch):
    """A Docker build with a CUDA PyTorch and nvcc but no GPU: torch would pick the architectures off the visible
    GPUs and fail with an IndexError; the build says to set TORCH_CUDA_ARCH_LIST instead."""
    monkeypatch.setattr(extension, "cuda_buildable", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    for unset in (None, "", "native"):
        if unset is None:
            monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
        else:
            monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", unset)
        failure = extension._load.__wrapped__()  # past the per-process cache, which holds this process's build
        assert failure is not None and "set TORCH_CUDA_ARCH_LIST" in failure and "9.0" in failure


def test_the_arch_list_for_the_visible_gpus_is_the_one_torch_derives(monkeypatch):
    """Set for a build that must not see the GPU (and in the process that later loads it), the list must give
    torch's own flags, or that load would compile again: an A100 and a GPU newer than this PyTorch (capped)."""
    from torch.utils.cpp_extension import _get_cuda_arch_flags

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: [(12, 0), (8, 0)][index])
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_80", "sm_86", "sm_90a", "compute_90"])
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    derived = _get_cuda_arch_flags()
    arch_list = extension.cuda_arch_list_for_visible_gpus()
    assert arch_list == "8.0;9.0+PTX"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", arch_list)
    assert _get_cuda_arch_flags() == derived


def test_the_build_command_builds_and_says_what_where_and_how_long():
    """``python -m mulclip_fast.ops.extension`` (as a Docker image or gpu_check runs it): into the checkout's
    cache, which the first test of the session has usually filled (a cold build takes 18–46 s)."""
    completed = subprocess.run(
        [sys.executable, "-m", "mulclip_fast.ops.extension"], capture_output=True, text=True, timeout=600
    )
    assert completed.returncode == 0, completed.stderr
    assert re.search(r"^built cpp( and cuda_ext)? in \d+\.\d s", completed.stdout, re.MULTILINE), completed.stdout
    assert f"build directory: {extension.build_directory()}" in completed.stdout
    assert (extension.build_directory() / f"{extension.LIBRARY}.so").is_file()
    if not extension.cuda_buildable():  # and why the CUDA kernels were not built
        assert "backend='cuda_ext' is not built here" in completed.stdout


def test_the_build_command_says_why_it_failed_and_exits_1(monkeypatch, capsys):
    failure = "RuntimeError: Ninja is required to load C++ extensions"
    monkeypatch.setattr(extension, "_built", ())
    monkeypatch.setattr(extension, "cuda_buildable", lambda: False)
    monkeypatch.setattr(extension, "_load", lambda: failure)
    with pytest.raises(ValueError) as raised:
        extension.require("cpp")
    assert extension.main([]) == 1
    out, err = capsys.readouterr()
    assert err == f"{raised.value}\n" and failure in err and out == ""


def test_the_build_command_terminated_leaves_through_python(monkeypatch):
    """torch holds a lock file in the build directory while it builds; a build killed there leaves it, and every
    later build of the checkout waits for it forever. gpu_check terminates its background build when a run
    ends: SIGTERM must unwind the build's ``finally`` blocks."""
    released = []

    def building():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
        finally:
            released.append(True)

    monkeypatch.setattr(extension, "_built", ())
    monkeypatch.setattr(extension, "_load", building)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exited:
        extension.main([])
    assert exited.value.code == 128 + signal.SIGTERM and released == [True]
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("built", [True, False])
def test_auto_sends_patch_sets_beyond_triton_to_the_cuda_extension_when_built(monkeypatch, built):
    """On a GPU (``resolve_backend`` says triton), N above the Triton kernel's row: ``cuda_ext`` when it is
    built, else the torch path; within the row, Triton; ops without an extension kernel, the torch path."""
    from mulclip_fast.kernels.limits import TOPK_MAX_PATCHES

    monkeypatch.setattr(_dispatch, "resolve_backend", lambda backend, device: "triton")
    monkeypatch.setattr(extension, "cuda_available", lambda: built)
    x = torch.zeros(1)
    big = TOPK_MAX_PATCHES + 1
    assert _dispatch.kernel_backend("auto", x, big, TOPK_MAX_PATCHES, has_extension=True) == (
        "cuda_ext" if built else "torch"
    )
    assert _dispatch.kernel_backend("auto", x, TOPK_MAX_PATCHES, TOPK_MAX_PATCHES, has_extension=True) == "triton"
    assert _dispatch.kernel_backend("auto", x, big, TOPK_MAX_PATCHES) == "torch"


def test_auto_says_why_it_keeps_the_torch_path_when_the_cuda_extension_fails_to_build(monkeypatch, caplog):
    """A GPU machine with nvcc whose build of csrc/ fails (an nvcc that does not match PyTorch's CUDA, say):
    ``auto`` takes the torch path for patch sets beyond Triton, and logs the build's failure once instead of
    hiding it."""
    from mulclip_fast.kernels.limits import TOPK_MAX_PATCHES

    failure = "RuntimeError: Error building extension 'mulclip_fast_ext'"
    extension._report_failed_cuda_build.cache_clear()
    monkeypatch.setattr(_dispatch, "resolve_backend", lambda backend, device: "triton")
    monkeypatch.setattr(extension, "_built", ())
    monkeypatch.setattr(extension, "cuda_buildable", lambda: True)
    monkeypatch.setattr(extension, "_load", lambda: failure)
    args = (torch.zeros(1), TOPK_MAX_PATCHES + 1, TOPK_MAX_PATCHES)
    with caplog.at_level(logging.WARNING, logger=extension.__name__):
        for _ in range(2):
            assert _dispatch.kernel_backend("auto", *args, has_extension=True) == "torch"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and failure in warnings[0] and "torch path" in warnings[0]


def test_extension_report_measures_both_ops(capsys):
    from mulclip_fast.tools import extension_report

    assert extension_report.main(["--patches", "9", "--pairs-batch", "2", "--repeats", "1"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    measured = [row for row in rows if row[:1] == ["matched"] or row[:2] == ["all", "pairs"]]
    assert len(measured) == 2 and all(float(row[-1]) > 0 for row in measured)
    with pytest.raises(ValueError, match="--repeats"):
        extension_report.main(["--repeats", "0"])


@pytest.mark.parametrize("op", OPS)
def test_cpp_peak_memory_is_no_more_than_the_torch_paths(op):
    """The CPU allocator's peak (which sees the buffers the C++ op allocates inside itself) of forward +
    backward at the paper's SAP width and patch count, B = 8: the twin holds its outputs, gradients and,
    for the matched op, a [B, M, N] workspace, never more than the chunked torch path."""
    from mulclip_fast.profiling import allocator_peak_memory_of

    g = torch.Generator().manual_seed(12)
    sub, patches = _tokens(g, 8, 8, 512), _tokens(g, 8, 196, 512)
    sub_mask = torch.ones(8, 8, dtype=torch.bool)
    sub_mask[:, -1] = False

    def forward_backward(backend):
        getattr(ops, op)(sub, patches, sub_mask, None, k=49, backend=backend).sum().backward()
        sub.grad = patches.grad = None

    extension.require("cpp")
    cpp, _ = allocator_peak_memory_of(forward_backward, "cpp")
    torch_path, _ = allocator_peak_memory_of(forward_backward, "torch")
    assert 0 < cpp <= torch_path


@pytest.mark.parametrize("lanes", [2, 3, 8])
def test_team_code_gives_the_same_results_with_several_lanes(lanes):
    """The CUDA kernels run the shared code with a block of threads per row; the CPU twin runs it with
    ``lanes`` threads per row (strided loops, barriers, reductions in rank order), so a missing barrier or
    a lane-dependent result shows here. Selections must be identical (duplicated patches tie), values and
    gradients equal up to the reductions' order."""
    extension.require("cpp")
    ext = torch.ops.mulclip_fast_ext
    g = torch.Generator().manual_seed(lanes)
    sub, patches = _tokens(g, 3, 4, 20).detach(), _tokens(g, 3, 70, 20).detach()
    patches[:, 40:50] = patches[:, 10:20]  # ties at many scores
    sub_mask, patch_mask = _masks(g, 3, 4, 70)
    grad = torch.randn(sub.shape, generator=g)
    close = {"atol": 1e-6, "rtol": 1e-5}
    for k in (1, 13, 70):
        args = (sub, patches, sub_mask, patch_mask, k, 0.07)
        torch.testing.assert_close(ext.topk_aggregate_forward(*args, lanes), ext.topk_aggregate_forward(*args), **close)
        got, want = ext.topk_aggregate_backward(grad, *args, lanes), ext.topk_aggregate_backward(grad, *args)
        torch.testing.assert_close(got, want, **close)
        logits, selected, lse = ext.pairwise_topk_forward(*args, lanes)
        want_logits, want_selected, want_lse = ext.pairwise_topk_forward(*args)
        assert torch.equal(selected, want_selected)
        torch.testing.assert_close((logits, lse), (want_logits, want_lse), **close)
        upstream = torch.randn(logits.shape, generator=g)
        backward = (upstream, sub, patches, sub_mask, patch_mask, selected, lse, 0.07)
        got, want = ext.pairwise_topk_backward(*backward, lanes), ext.pairwise_topk_backward(*backward)
        torch.testing.assert_close(got, want, **close)
