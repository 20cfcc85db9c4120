"""The C++ twin of the csrc/ extension against the torch path on this CPU: time and peak memory of
forward + backward of ``topk_patch_aggregate`` and ``pairwise_topk_aggregate_cosines`` (docs/kernels.md,
"The C++/CUDA extension"; results in docs/performance.md).

    python -m mulclip_fast.tools.extension_report [--patches 196 576 1024] [--pairs-batch 64] [--repeats 3]

At the paper's SAP shape (B = 64 captions, M = 8 subcaptions with one left empty, d = 512, float32): the
matched op for each patch count N, with k = N / 4 (the paper's 49 of 196); the all-pairs op at
Bq = Bk = ``--pairs-batch`` images of 196 patches, k = 49 (0 skips it). Time: the median of ``--repeats`` runs after one
warm-up, both backends in the same process, one after the other. Memory, two counts of the bytes
allocated above the inputs: ``PeakMemoryTracker`` (exact, but blind to buffers the C++ op allocates
inside itself: its backward's fp32 workspace) and the CPU allocator's own peak (``allocator_peak_memory_of``,
which sees those too). Neither sees the C++ twin's per-thread ``std::vector`` scratch: a row's N + d
floats, and in the all-pairs backward one image's N·d accumulator per thread. The extension is built first
if it is not yet.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ..ops import matched, pairwise
from ..profiling import PeakMemoryTracker, allocator_peak_memory_of
from .memory_report import PAPER_SHAPE, _inputs

BACKENDS = ("torch", "cpp")


OPS = {"matched": matched.topk_patch_aggregate, "all pairs": pairwise.pairwise_topk_aggregate_cosines}


def _forward_backward(op, sub, patches, sub_mask, k, backend):
    out = OPS[op](sub, patches, sub_mask, None, k, backend=backend)
    out.sum().backward()
    sub.grad = patches.grad = None


def _tracker_peak(*args) -> int:
    with PeakMemoryTracker() as memory:
        _forward_backward(*args)
    return memory.peak


def _seconds(repeats: int, *args) -> float:
    _forward_backward(*args)  # warm-up (and, for cpp, the first-use build)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _forward_backward(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patches", type=int, nargs="+", default=[196, 576, 1024])
    parser.add_argument("--pairs-batch", type=int, default=PAPER_SHAPE["batch"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {args.repeats}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    shape = {name: PAPER_SHAPE[name] for name in ("batch", "subcaptions", "width")}
    print(f"SAP fwd+bwd, float32, {shape}, {torch.get_num_threads()} threads")
    print(
        f"{'op':>9} {'B':>3} {'N':>5} {'k':>4} {'torch s':>8} {'cpp s':>8} {'cpp/torch':>9}"
        f" {'tracker MiB torch':>18} {'cpp':>7} {'allocator MiB torch':>20} {'cpp':>7}"
    )
    cases = [("matched", shape["batch"], n, max(1, n // 4)) for n in args.patches]
    if args.pairs_batch > 0:
        cases.append(("all pairs", args.pairs_batch, PAPER_SHAPE["patches"], PAPER_SHAPE["k"]))
    for op, batch, n, k in cases:
        patches, _, _, sub, sub_mask = _inputs(batch, 1, n, shape["subcaptions"], shape["width"], torch.float32, 0)
        call = {backend: (op, sub, patches, sub_mask, k, backend) for backend in BACKENDS}
        seconds = {backend: _seconds(args.repeats, *call[backend]) for backend in BACKENDS}
        tracked = {backend: _tracker_peak(*call[backend]) / 2**20 for backend in BACKENDS}
        allocated = {
            backend: allocator_peak_memory_of(_forward_backward, *call[backend])[0] / 2**20 for backend in BACKENDS
        }
        print(
            f"{op:>9} {batch:>3} {n:>5} {k:>4} {seconds['torch']:>8.3f} {seconds['cpp']:>8.3f}"
            f" {seconds['cpp'] / seconds['torch']:>9.2f} {tracked['torch']:>18.1f} {tracked['cpp']:>7.1f}"
            f" {allocated['torch']:>20.1f} {allocated['cpp']:>7.1f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
