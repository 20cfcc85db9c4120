"""Names from before the rename still work, with a deprecation message: the op pairwise_topk_aggregate_logits
(now pairwise_topk_aggregate_cosines, for what it returns) and benchmark results recorded under it."""

from __future__ import annotations

import json

import pytest
import torch

from mulclip_fast import bench_report, ops


def test_old_op_name_returns_the_cosines_with_a_warning():
    g = torch.Generator().manual_seed(0)
    sub, patches = torch.randn(2, 3, 8, generator=g), torch.randn(4, 5, 8, generator=g)
    expected = ops.pairwise_topk_aggregate_cosines(sub, patches, k=2, backend="torch")
    with pytest.warns(DeprecationWarning, match="call pairwise_topk_aggregate_cosines"):
        got = ops.pairwise_topk_aggregate_logits(sub, patches, k=2, backend="torch")
    torch.testing.assert_close(got, expected)


def test_benchmark_results_of_the_old_op_name_are_reported_under_the_current_one(tmp_path):
    record = {"op": "pairwise_topk_aggregate_logits", "backend": "torch", "mode": "forward", "shape": "Bq=2"}
    path = tmp_path / "bench-cpu-20260101T000000Z.json"
    path.write_text(json.dumps({"machine": {"device": "cpu"}, "results": [record]}))
    (loaded,) = bench_report.load_results(path)["results"]
    assert loaded["op"] == "pairwise_topk_aggregate_cosines"
