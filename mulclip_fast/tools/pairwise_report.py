"""Peak memory and time of the all-pairs ops, fused ``torch`` backend vs the reference
(docs/performance.md, "All-pairs ops").

    python -m mulclip_fast.tools.pairwise_report [--batch 64] [--queries 248] [--keys 196] [--width 512]
                                                 [--subcaptions 8] [--k 49] [--repeats 5] [--no-time]

For ``pairwise_maxsim`` (FineLIP's form: bidirectional, LeakyReLU 0.1), ``pairwise_reconstruction_scores``
and ``pairwise_topk_aggregate_cosines``, float32, all tokens valid, prints per backend the peak bytes of
forward + backward above the inputs, the bytes of input gradients + output (the floor any
implementation needs), and the median wall time of ``--repeats`` forward + backward calls, run
alternately so that load from other processes hits both alike (the median, not the best: on a shared
machine a lucky run of one backend would otherwise decide the ratio).

Memory is the CPU allocator's peak (``profiling.allocator_peak_memory_of``), the plain run's: under a
``TorchDispatchMode`` tracker autograd takes its out-of-place backward formulas, and buffers a kernel
allocates inside itself are invisible to it (``mulclip_fast.profiling``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from ..ops import pairwise
from ..profiling import allocator_peak_memory_of

OPS = ("pairwise_maxsim", "pairwise_reconstruction_scores", "pairwise_topk_aggregate_cosines")


def _case(op: str, batch, queries, keys, width, subcaptions, k, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def tokens(*shape):
        return F.normalize(torch.randn(*shape, generator=generator), dim=-1).requires_grad_()

    key_tokens = tokens(batch, keys, width)
    if op == "pairwise_topk_aggregate_cosines":
        sub = tokens(batch, subcaptions, width)
        return (lambda backend: pairwise.pairwise_topk_aggregate_cosines(sub, key_tokens, k=k, backend=backend)), (
            sub,
            key_tokens,
        )
    query_tokens = tokens(batch, queries, width)
    if op == "pairwise_maxsim":
        return (
            lambda backend: pairwise.pairwise_maxsim(
                query_tokens, key_tokens, bidirectional=True, negative_slope=0.1, backend=backend
            )
        ), (query_tokens, key_tokens)
    return (lambda backend: pairwise.pairwise_reconstruction_scores(query_tokens, key_tokens, backend=backend)), (
        query_tokens,
        key_tokens,
    )


def _clear_grads(inputs):
    for x in inputs:
        x.grad = None


def _forward_backward(call, inputs, backend):
    out = call(backend)
    out.backward(torch.ones_like(out))
    return out


def measure(op, batch, queries, keys, width, subcaptions, k, repeats=5, timed=True):
    """``{backend: (peak bytes, floor bytes, median seconds or None)}`` for ``reference`` and ``torch``."""
    call, inputs = _case(op, batch, queries, keys, width, subcaptions, k)
    results = {}
    for backend in ("reference", "torch"):
        _clear_grads(inputs)  # outside the measurement: freeing old gradients would offset the peak
        peak, out = allocator_peak_memory_of(lambda backend=backend: _forward_backward(call, inputs, backend))
        floor = sum(x.numel() * x.element_size() for x in inputs) + out.numel() * out.element_size()
        results[backend] = [peak, floor, None]
    if timed:
        seconds = {backend: [] for backend in results}
        for _ in range(repeats):
            for backend in results:
                _clear_grads(inputs)
                start = time.perf_counter()
                _forward_backward(call, inputs, backend)
                seconds[backend].append(time.perf_counter() - start)
        for backend in results:
            results[backend][2] = statistics.median(seconds[backend])
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--queries", type=int, default=248)
    parser.add_argument("--keys", type=int, default=196)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--subcaptions", type=int, default=8)
    parser.add_argument("--k", type=int, default=49)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-time", action="store_true", help="memory only")
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    args = parser.parse_args(argv)
    shape = {key: getattr(args, key) for key in ("batch", "queries", "keys", "width", "subcaptions", "k")}
    print(f"shape {shape}, float32, forward + backward, {torch.get_num_threads()} threads")
    print(f"{'op':32} {'backend':10} {'peak MiB':>10} {'× floor':>8} {'median s':>8}")
    for op in args.ops:
        results = measure(op, **shape, repeats=args.repeats, timed=not args.no_time)
        for backend, (peak, floor, seconds) in results.items():
            shown = "-" if seconds is None else f"{seconds:.3f}"
            print(f"{op:32} {backend:10} {peak / 2**20:10.1f} {peak / floor:8.2f} {shown:>8}")
        ref, fused = results["reference"], results["torch"]
        speed = "" if fused[2] is None else f", time torch/reference {fused[2] / ref[2]:.2f}"
        print(f"{op:32} reference/torch peak {ref[0] / fused[0]:.1f}×{speed}", flush=True)


if __name__ == "__main__":
    main()
