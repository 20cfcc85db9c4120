"""What the interpreter and the compile check cannot see by themselves: what the launchers hand the kernels.

- **Layout.** Kernels index their tensors as dense row-major arrays. An expanded (stride-0) mask, as the
  model builds the word mask, or a sliced token tensor must give the same values and gradients as the
  dense call (before the launchers made them dense, the matched kernels read the expanded mask's storage
  as if it had one row per sample, and returned other values).
- **Grid.** CUDA caps grid axes 1 and 2 at 65535 programs: no launch may put the batch (or the gathered
  key-set count) there. Every launch's grid is recorded at two batch sizes; axes 1 and 2 must not move.
- **Device.** Triton launches on the current CUDA device: every kernel launch must run inside the guard
  that makes the tensors' device current.
- **Options.** Every launch states the compile options the compile check compiles with
  (``_launch.LAUNCH_OPTIONS``), rather than leaving them to Triton's defaults, which change between versions.
- **One top-k rule.** Matched and all-pairs SAP, on every backend and in the reference, select the same
  patches when scores tie at the k-th value, ``-0.0`` against ``+0.0`` included (ties keep the lowest
  patch indices).
"""

from __future__ import annotations

import contextlib
import importlib

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from mulclip_fast.kernels.topk_select import topk_selection

from mulclip_fast import ops
from mulclip_fast import reference as R
from mulclip_fast.ops._dispatch import interpreter_enabled

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or interpreter_enabled()), reason="the Triton backend needs CUDA or the interpreter"
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNEL_MODULES = ["token_softmax", "topk_aggregate", "pairwise_maxsim", "pairwise_reconstruction", "pairwise_topk"]


def _tokens(generator, *shape):
    x = F.normalize(torch.randn(*shape, generator=generator, dtype=torch.float64), dim=-1)
    return x.float().to(DEVICE)


def _calls(batch: int, generator: torch.Generator):
    """Every public op on ``batch`` samples, with masks that are expanded views (stride 0 over the batch)
    and token tensors that are slices of wider ones: ``(name, fn, dense_args, strided_args)``."""
    width, words, patches, subs = 24, 7, 20, 3
    text = _tokens(generator, batch, words, width + 8)[..., :width]  # sliced: row stride 32, not 24
    image = _tokens(generator, 2 * batch, patches, width)[::2]  # every other sample of a larger batch
    sub = _tokens(generator, batch, subs, width).transpose(0, 1).contiguous().transpose(0, 1)  # permuted strides
    word_row = torch.arange(words, device=DEVICE) < 5
    patch_row = torch.arange(patches, device=DEVICE) % 3 != 1
    sub_row = torch.tensor([True, True, False], device=DEVICE)
    word_mask, patch_mask, sub_mask = (row.expand(batch, -1) for row in (word_row, patch_row, sub_row))
    assert word_mask.stride(0) == 0 and not text.is_contiguous() and not image.is_contiguous()

    def dense(*args):
        return [a.contiguous().clone() if isinstance(a, torch.Tensor) else a for a in args]

    cases = {
        "wpr_loss": (ops.wpr_loss, (image, text, patch_mask, word_mask), {"tau_attn": 0.1, "tau_contrast": 0.2}),
        "token_reconstruction": (ops.token_reconstruction, (text, image, word_mask, patch_mask), {"tau": 0.1}),
        "topk_patch_aggregate": (ops.topk_patch_aggregate, (sub, image, sub_mask, patch_mask), {"k": 4, "tau": 0.1}),
        "pairwise_maxsim": (
            ops.pairwise_maxsim,
            (text, image, word_mask, patch_mask),
            {"bidirectional": True, "negative_slope": 0.1},
        ),
        "pairwise_reconstruction_scores": (
            ops.pairwise_reconstruction_scores,
            (text, image, word_mask, patch_mask),
            {"tau": 0.1},
        ),
        "pairwise_topk_aggregate_cosines": (
            ops.pairwise_topk_aggregate_cosines,
            (sub, image, sub_mask, patch_mask),
            {"k": 4, "tau": 0.1},
        ),
    }
    return [(name, fn, dense(*args), list(args), kwargs) for name, (fn, args, kwargs) in cases.items()]


def _value_and_grads(fn, args, kwargs):
    leaves = [a.detach().clone().requires_grad_() if a.is_floating_point() else a for a in args]
    out = fn(*leaves, **kwargs, backend="triton")
    upstream = torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)
    grads = torch.autograd.grad((out * upstream).sum(), [a for a in leaves if a.requires_grad])
    return out.detach(), grads


@pytest.mark.parametrize("case", range(6), ids=lambda i: _calls(2, torch.Generator().manual_seed(0))[i][0])
def test_strided_and_expanded_inputs_match_the_dense_call(case):
    name, fn, dense_args, strided_args, kwargs = _calls(3, torch.Generator().manual_seed(1))[case]
    want, want_grads = _value_and_grads(fn, dense_args, kwargs)
    got, got_grads = _value_and_grads(fn, strided_args, kwargs)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5, msg=lambda m: f"{name} values: {m}")
    for got_grad, want_grad in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got_grad, want_grad, atol=1e-6, rtol=1e-5, msg=lambda m: f"{name} grads: {m}")
    reference = getattr(R, name)(*dense_args, **kwargs)
    torch.testing.assert_close(got, reference.to(got.dtype), atol=1e-5, rtol=1e-4)


def _record_launches(monkeypatch):
    """Record every kernel launch (``device``: the device guard active when the kernel ran) and every
    grid the launchers build (``grids``)."""
    from mulclip_fast.kernels import _launch

    launches, grids, guard = [], [], {"device": None}

    @contextlib.contextmanager
    def recording_guard(tensor):
        previous, guard["device"] = guard["device"], tensor.device
        try:
            yield
        finally:
            guard["device"] = previous

    def recording_grid(grid):
        grids.append(tuple(grid))
        return _launch.checked_grid(grid)

    if interpreter_enabled():
        from triton.runtime.interpreter import InterpretedFunction as Kernel
    else:
        Kernel = triton.runtime.jit.JITFunction
    run = Kernel.run

    def recording_run(self, *args, **kwargs):
        options = {name: kwargs[name] for name in _launch.LAUNCH_OPTIONS if name in kwargs}
        launches.append({"kernel": self.__name__, "device": guard["device"], "options": options})
        return run(self, *args, **kwargs)

    monkeypatch.setattr(Kernel, "run", recording_run)
    for module_name in KERNEL_MODULES:
        module = importlib.import_module(f"mulclip_fast.kernels.{module_name}")
        monkeypatch.setattr(module, "on_device_of", recording_guard)
        monkeypatch.setattr(module, "checked_grid", recording_grid)
    return launches, grids


def _run_every_op(batch: int):
    for _, fn, args, _, kwargs in _calls(batch, torch.Generator().manual_seed(2)):
        _value_and_grads(fn, args, kwargs)


def test_every_launch_keeps_the_batch_off_grid_axes_1_and_2_and_runs_on_the_tensors_device(monkeypatch):
    launches, grids = _record_launches(monkeypatch)
    _run_every_op(batch=2)
    small = list(grids)
    grids.clear()
    _run_every_op(batch=5)
    large = list(grids)
    assert len(small) == len(large) >= 6 * 2, "every op builds its grids forward and backward"
    for before, after in zip(small, large, strict=True):
        assert before[1:] == after[1:], f"a grid axis above 0 grows with the batch: {before} -> {after}"
    assert any(before[0] != after[0] for before, after in zip(small, large, strict=True))
    assert len(launches) >= 6 * 2 * 2
    for launch in launches:
        assert launch["device"] is not None, f"{launch['kernel']} launched outside the device guard"
        assert launch["device"].type == torch.device(DEVICE).type


def test_every_launch_states_the_compile_options_the_compile_check_compiles_with(monkeypatch):
    """Left to Triton, FMA fusion follows its default, which Triton 3.10 turns off: the kernels that run would
    no longer be the ones compiled, checked and measured. Every launch passes ``LAUNCH_OPTIONS``."""
    from mulclip_fast.kernels._launch import LAUNCH_OPTIONS

    launches, _ = _record_launches(monkeypatch)
    _run_every_op(batch=2)
    kernels = {launch["kernel"] for launch in launches}
    assert len(kernels) == 15, " ".join(sorted(kernels))  # the three kernels of each of the five modules
    unstated = sorted({launch["kernel"] for launch in launches if launch["options"] != LAUNCH_OPTIONS})
    assert not unstated, f"launched without {LAUNCH_OPTIONS}: {unstated}"


def test_checked_grid_refuses_what_cuda_cannot_launch():
    from mulclip_fast.kernels._launch import MAX_GRID, checked_grid

    assert checked_grid((MAX_GRID[0], 65535, 65535)) == (MAX_GRID[0], 65535, 65535)
    for grid in ((1, 65536), (1, 1, 65536), (2**31, 1)):
        with pytest.raises(ValueError, match="above CUDA's limit"):
            checked_grid(grid)


def test_the_device_guard_selects_the_tensors_cuda_device():
    from mulclip_fast.kernels._launch import on_device_of

    class OnSecondGPU:
        device = torch.device("cuda", 1)

    guard = on_device_of(OnSecondGPU())
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1  # entering it would need CUDA
    assert isinstance(on_device_of(torch.zeros(1)), contextlib.nullcontext)


# ---------------------------------------------------------------------------------------------------
# One top-k selection rule
# ---------------------------------------------------------------------------------------------------


def _tied_scene():
    """One subcaption ``e0`` against patches whose scores tie: zeros and 0.5s, so that k = 4 cuts into a
    run of zeros. Expected selection: the two 0.5s, then the two lowest-index zeros. (A matrix product
    accumulates from +0.0, so these zeros are all +0.0; ``-0.0`` is tested on the selection itself below.)"""
    width = 16
    e = torch.eye(width, dtype=torch.float32)
    rows = [e[1], -e[2], 0.5 * e[0] + e[3], e[4], -e[5], 0.5 * e[0] + e[6], e[7], -e[8]]
    patches = torch.stack(rows)[None].to(DEVICE)  # scores: +0, -0, .5, +0, -0, .5, +0, -0
    sub = e[0][None, None].to(DEVICE)
    return sub, patches, [0, 1, 2, 5]


# the C++/CUDA extension runs its CPU twin on CPU tensors and its kernels on CUDA tensors
EXTENSION_BACKEND = "cpp" if DEVICE == "cpu" else "cuda_ext"


@pytest.mark.parametrize("backend", ["reference", "torch", "triton", EXTENSION_BACKEND])
def test_ties_at_the_kth_score_keep_the_lowest_indices_on_every_backend_and_pairing(backend):
    sub, patches, chosen = _tied_scene()
    scores = sub[0] @ patches[0].T
    assert {float(s) for s in scores[0]} == {0.0, 0.5}
    tau = 0.25
    weights = torch.softmax(scores[0, chosen] / tau, dim=0)
    expected = F.normalize(weights @ patches[0, chosen], dim=-1)
    matched = ops.topk_patch_aggregate(sub, patches, k=4, tau=tau, backend=backend)
    torch.testing.assert_close(matched[0, 0], expected, atol=1e-6, rtol=1e-5)
    all_pairs = ops.pairwise_topk_aggregate_cosines(sub, patches, k=4, tau=tau, backend=backend)
    torch.testing.assert_close(all_pairs[0, 0, 0], sub[0, 0] @ expected, atol=1e-6, rtol=1e-5)


SIGNED_ZERO_SCORES = [0.0, -0.0, 0.5, 0.0, -0.0, 0.5, -0.0, 0.0]


@triton.jit
def _select_kernel(S, Valid, Out, N, k, BLOCK_N: tl.constexpr):
    """The kernels' ``topk_selection`` on one row of explicit scores (the other 15 rows of the tile are
    padding)."""
    rows = tl.arange(0, 16)
    cols = tl.arange(0, BLOCK_N)
    tile = (rows[:, None] < 1) & (cols[None, :] < N)
    s = tl.load(S + rows[:, None] * N + cols[None, :], mask=tile, other=0.0)
    valid = (tl.load(Valid + cols, mask=cols < N, other=0) != 0) & (cols < N)
    selected = topk_selection(s, valid, cols, k, 16, BLOCK_N)
    tl.store(Out + rows[:, None] * N + cols[None, :], selected.to(tl.int8), mask=tile)


def _triton_selection(scores: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
    out = torch.zeros(1, scores.numel(), dtype=torch.int8, device=DEVICE)
    _select_kernel[(1,)](scores.to(DEVICE)[None], valid.to(DEVICE), out, scores.numel(), k, BLOCK_N=16)
    return out[0].bool().cpu()


def _reference_selection(scores: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
    """The reference's rule: the first k of a stable descending sort of the valid scores."""
    index = scores.masked_fill(~valid, float("-inf")).sort(descending=True, stable=True).indices[:k]
    return torch.zeros_like(valid).index_fill_(0, index, True) & valid


@pytest.mark.parametrize("masked", [None, 0, 2], ids=lambda m: f"masked={m}")
def test_one_selection_rule_with_signed_zero_ties(masked):
    from mulclip_fast.ops._torch_matched import topk_selection as torch_topk_selection

    scores = torch.tensor(SIGNED_ZERO_SCORES)
    assert torch.signbit(scores).sum() == 3, "-0.0 and +0.0 both present"
    valid = torch.ones(scores.numel(), dtype=torch.bool)
    if masked is not None:
        valid[masked] = False
    for k in (1, 3, 4, 6, 8):
        want = _reference_selection(scores, valid, k)
        assert int(want.sum()) == min(k, int(valid.sum()))
        # ties (the zeros, whatever their sign) are cut towards the lowest index
        zeros_kept = [i for i in range(scores.numel()) if want[i] and scores[i] == 0]
        zeros_all = [i for i in range(scores.numel()) if valid[i] and scores[i] == 0]
        assert zeros_kept == zeros_all[: len(zeros_kept)]
        torch.testing.assert_close(torch_topk_selection(scores, valid, k), want, msg=f"torch rule, k={k}")
        torch.testing.assert_close(_triton_selection(scores, valid, k), want, msg=f"kernel rule, k={k}")
