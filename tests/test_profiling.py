"""Peak-memory measures: the dispatch tracker, the CPU allocator's events, and the FLOP models of the ops."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mulclip_fast import reference
from mulclip_fast.ops import costs
from mulclip_fast.ops.costs import token_reconstruction_cost
from mulclip_fast.profiling import (
    allocator_peak_memory_of,
    matmul_throughput,
    measure_peak_memory,
    peak_memory_of,
)


def test_views_and_in_place_ops_of_inputs_allocate_nothing():
    x = torch.randn(100, 100)
    assert peak_memory_of(lambda: x.t())[0] == 0
    assert peak_memory_of(lambda: x[:10].expand(3, 10, 100))[0] == 0
    assert peak_memory_of(lambda: x.add_(1))[0] == 0
    assert peak_memory_of(lambda: x.t().contiguous())[0] == 100 * 100 * 4


def test_storage_that_an_op_grows_counts():
    """``out=`` into an empty tensor and ``resize_`` allocate inside the op, into a storage that already
    exists: the tracker counts the new buffer, as the CPU allocator does, and releases it with the storage."""
    a, b = torch.randn(100, 100), torch.randn(100, 100)

    def mm_into_empty():
        out = torch.empty(0)
        torch.mm(a, b, out=out)
        return out

    def resized():
        x = torch.empty(10)
        return x.resize_(1000)

    grown_input = torch.empty(0)
    assert peak_memory_of(mm_into_empty)[0] == allocator_peak_memory_of(mm_into_empty)[0] == 100 * 100 * 4
    assert peak_memory_of(resized)[0] == allocator_peak_memory_of(resized)[0] == (10 + 1000) * 4  # new beside old
    assert peak_memory_of(lambda: grown_input.resize_(50))[0] == 50 * 4

    def freed_after_growth():
        resized()
        return a * 2  # the resized storage is gone: the peak is the larger of the two, not their sum

    assert peak_memory_of(freed_after_growth)[0] == 100 * 100 * 4


def test_temporaries_count_at_their_peak_only():
    x = torch.randn(1000)

    def two_temporaries_then_one():
        a = x * 2  # 4000 bytes live
        b = a + 1  # 8000 bytes live: the peak
        del a
        return b * 3  # a freed: 8000 live again

    assert peak_memory_of(two_temporaries_then_one)[0] == 8000


def test_tracker_and_allocator_agree_on_eager_reference_code():
    q = torch.randn(4, 20, 32, requires_grad=True)
    kv = torch.randn(4, 24, 32, requires_grad=True)

    def forward_backward():
        out = reference.token_reconstruction(q, kv)
        return torch.autograd.grad(out, (q, kv), torch.ones_like(out))

    tracked = peak_memory_of(forward_backward)[0]
    allocated = allocator_peak_memory_of(forward_backward)[0]
    assert tracked > 0
    assert abs(tracked - allocated) <= 0.01 * tracked


def test_measure_peak_memory_names_its_method():
    x = torch.randn(64, 64)
    assert measure_peak_memory(lambda: x @ x, "cpu") == (64 * 64 * 4, "cpu-allocator-profiler")


# Measures twice in a fresh process (the profiler's backend reads its log level once) and prints the level.
MEASURE_TWICE = """
import os, torch
from mulclip_fast.profiling import allocator_peak_memory_of
for _ in range(2):
    assert allocator_peak_memory_of(lambda: torch.ones(100) * 2)[0] > 0
print(os.environ["KINETO_LOG_LEVEL"])
"""


@pytest.mark.parametrize("user_level", [None, "5"])
def test_a_memory_measurement_writes_nothing_to_stderr_unless_the_user_asked_for_kinetos_log(user_level):
    """torch 2.13's Kineto writes "USDT: ... profiler_start/stop" to stderr at every profile: noise in every
    report (memory_report printed eight such lines). A log level the user set is left alone."""
    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}
    if user_level is not None:
        env["KINETO_LOG_LEVEL"] = user_level
    done = subprocess.run([sys.executable, "-c", MEASURE_TWICE], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (user_level or "6")
    if user_level is None:
        assert done.stderr == ""


def test_cuda_peak_memory_is_read_on_the_device_measured(monkeypatch):
    """The CUDA allocator keeps its statistics per device: work measured on cuda:1 while cuda:0 is current must
    read cuda:1's counters. Two fake devices stand in for them: device 0 holds 100 bytes, device 1 holds 1000
    and ``fn`` puts 500 more there for a while."""
    allocated, peak = {0: 100, 1: 1000}, {0: 100, 1: 1000}

    def index(device=None) -> int:  # as torch resolves a device argument: none, or no index, is the current, 0
        return 0 if device is None else torch.device(device).index or 0

    def reset_peak_memory_stats(device=None):
        peak[index(device)] = allocated[index(device)]

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: allocated[index(device)])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: peak[index(device)])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset_peak_memory_stats)

    def fn():
        allocated[1] += 500
        peak[1] = max(peak[1], allocated[1])
        allocated[1] -= 500

    assert measure_peak_memory(fn, "cuda:1") == (500, "cuda-max-memory-allocated")
    assert measure_peak_memory(fn, "cuda") == (0, "cuda-max-memory-allocated")  # the current device, 0


def test_measure_peak_memory_counts_the_backward_that_runs_without_a_dispatch_mode():
    """Under any dispatch mode autograd picks its out-of-place formulas (``areAnyTensorSubclassLike``): the
    gradient of a gather from an expanded tensor is then a zeros buffer of the expanded shape plus an
    out-of-place ``scatter_add`` copy of it, where a plain run scatters into the zeros in place. The
    benchmarks' measure must count the plain run (one expanded buffer), as ``PeakMemoryTracker`` cannot."""
    x = torch.randn(4, 1, 6, 8, requires_grad=True)
    index = torch.zeros(4, 3, 2, 8, dtype=torch.long)

    def forward_backward():
        return torch.autograd.grad(x.expand(4, 3, 6, 8).gather(-2, index).sum(), x)

    expanded, grad_x, scalars = 4 * 3 * 6 * 8 * 4, 4 * 6 * 8 * 4, 2 * 4  # the loss and its gradient
    assert measure_peak_memory(forward_backward, "cpu")[0] == expanded + grad_x + scalars
    assert peak_memory_of(forward_backward)[0] == 2 * expanded + scalars  # the tracker's own program


def test_matmul_throughput_counts_two_n_cubed():
    result = matmul_throughput("cpu", n=128, repeats=3)
    assert result["flops_per_s"] == 2 * 128**3 / result["seconds"] > 0
    assert result["best_flops_per_s"] == 2 * 128**3 / result["best_seconds"] >= result["flops_per_s"]


def test_reconstruction_cost_counts_both_products():
    cost = token_reconstruction_cost(batch=2, len_q=3, len_kv=5, d=7, itemsize=4)
    assert cost.flops_forward == 2 * (2 * 2 * 3 * 5 * 7)
    assert cost.flops_backward == 2 * cost.flops_forward
    assert cost.bytes_forward == 2 * (3 + 5) * 7 * 4 + 2 * 3 * 7 * 4


def _reference_gemm_flops(fn, *inputs) -> tuple[int, int]:
    """Matrix-product FLOPs (2·m·n·k each) of ``fn(*inputs)`` forward, and of its backward."""
    inputs = [x.clone().requires_grad_() for x in inputs]
    with FlopCounterMode(display=False) as forward:
        out = fn(*inputs)
    with FlopCounterMode(display=False) as backward:
        out.sum().backward()
    return forward.get_total_flops(), backward.get_total_flops()


# (cost, reference call, the reference's FLOPs that the counter does not see, backward compared): the
# top-k ops' weighted sum of k patches is an elementwise product and sum in the reference, and their
# backward counts only the k selected patches where the reference's autograd runs dense products.
_Q, _K, _LQ, _LK, _D, _TOPK = 3, 4, 24, 32, 128, 4
COST_CASES = {
    "token_reconstruction": (
        costs.token_reconstruction_cost(_Q, _LQ, _LK, _D),
        lambda q, k: reference.token_reconstruction(q, k[:_Q]),
        0,
        True,
    ),
    "wpr_loss": (costs.wpr_loss_cost(_Q, _LQ, _LK, _D), lambda q, k: reference.wpr_loss(q, k[:_Q]), 0, True),
    "topk_patch_aggregate": (
        costs.topk_patch_aggregate_cost(_Q, _LQ, _LK, _TOPK, _D),
        lambda q, k: reference.topk_patch_aggregate(q, k[:_Q], k=_TOPK),
        2 * _Q * _LQ * _TOPK * _D,
        False,
    ),
    "pairwise_maxsim": (
        costs.pairwise_maxsim_cost(_Q, _LQ, _K, _LK, _D),
        lambda q, k: reference.pairwise_maxsim(q, k),
        0,
        True,
    ),
    "pairwise_maxsim bidirectional": (
        costs.pairwise_maxsim_cost(_Q, _LQ, _K, _LK, _D, bidirectional=True),
        lambda q, k: reference.pairwise_maxsim(q, k, bidirectional=True),
        0,
        True,
    ),
    "pairwise_reconstruction_scores": (
        costs.pairwise_reconstruction_cost(_Q, _LQ, _K, _LK, _D),
        lambda q, k: reference.pairwise_reconstruction_scores(q, k),
        0,
        True,
    ),
    "pairwise_topk_aggregate_cosines": (
        costs.pairwise_topk_aggregate_cost(_Q, _LQ, _K, _LK, _TOPK, _D),
        lambda q, k: reference.pairwise_topk_aggregate_cosines(q, k, k=_TOPK),
        2 * _Q * _K * _LQ * _TOPK * _D,
        False,
    ),
}


@pytest.mark.parametrize("name", list(COST_CASES))
def test_cost_models_count_the_reference_products(name):
    """FLOPs count the products of the op's definition, not what an implementation recomputes (``OpCost``):
    every backend's % of peak is measured against the same work. The reference materialises each product
    once, so its matrix products, counted by torch's FLOP counter, are the measure (up to the softmax's
    few flops per similarity, under 5 % here)."""
    cost, call, uncounted, compare_backward = COST_CASES[name]
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(_Q, _LQ, _D, generator=generator)
    k = torch.randn(_K, _LK, _D, generator=generator)
    forward, backward = _reference_gemm_flops(call, q, k)
    assert cost.flops_forward == pytest.approx(forward + uncounted, rel=0.05)
    if compare_backward:
        assert cost.flops_backward == pytest.approx(backward, rel=0.05)
