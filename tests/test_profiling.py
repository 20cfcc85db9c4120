"""Peak-memory measures: the dispatch tracker, the CPU allocator's events, and the FLOP models of the ops."""

from __future__ import annotations

import torch

from mulclip_fast import reference
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
    assert measure_peak_memory(lambda: x @ x, "cpu") == (64 * 64 * 4, "dispatch-tracker")
    peak, method = measure_peak_memory(lambda: x @ x, "cpu", compiled=True)
    assert method == "cpu-allocator-profiler" and peak >= 64 * 64 * 4


def test_matmul_throughput_counts_two_n_cubed():
    result = matmul_throughput("cpu", n=128, repeats=3)
    assert result["flops_per_s"] == 2 * 128**3 / result["seconds"] > 0
    assert result["best_flops_per_s"] == 2 * 128**3 / result["best_seconds"] >= result["flops_per_s"]


def test_reconstruction_cost_counts_both_products():
    cost = token_reconstruction_cost(batch=2, len_q=3, len_kv=5, d=7, itemsize=4)
    assert cost.flops_forward == 2 * (2 * 2 * 3 * 5 * 7)
    assert cost.flops_backward == 2 * cost.flops_forward
    assert cost.bytes_forward == 2 * (3 + 5) * 7 * 4 + 2 * 3 * 7 * 4
