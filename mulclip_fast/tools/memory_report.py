"""Exact peak memory of the matched-pair ops, fused vs reference (docs/kernels.md; results in docs/performance.md).

    python -m mulclip_fast.tools.memory_report [--batch 64 --words 248 --patches 196 --subcaptions 8 --k 49 --width 512]

Prints, for ``wpr_loss`` and ``topk_patch_aggregate``, the peak bytes of forward + backward above the
inputs (the CPU allocator's count, ``profiling.allocator_peak_memory_of``: every buffer allocated inside
the measurement, gradients included) for the reference and the memory-lean ``torch`` backend, and their
ratio. Not ``PeakMemoryTracker``: under a dispatch mode autograd takes its out-of-place backward formulas,
which would count the reference's gather gradient twice. Defaults are the paper's shape:
B = 64, 248 word tokens, 196 patches, M = 8 subcaptions, k = 49, d = 512, float32.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..ops import matched
from ..profiling import allocator_peak_memory_of

PAPER_SHAPE = {"batch": 64, "words": 248, "patches": 196, "subcaptions": 8, "k": 49, "width": 512}


@dataclass
class MemoryFigure:
    op: str
    reference_bytes: int
    fused_bytes: int

    @property
    def ratio(self) -> float:
        return self.fused_bytes / self.reference_bytes


def _inputs(batch, words, patches, subcaptions, width, dtype, seed):
    generator = torch.Generator().manual_seed(seed)

    def tokens(*shape):
        return F.normalize(torch.randn(*shape, generator=generator), dim=-1).to(dtype).requires_grad_()

    v, t, sub = tokens(batch, patches, width), tokens(batch, words, width), tokens(batch, subcaptions, width)
    # realistic padding: word masks of varying caption length, one subcaption slot left empty per sample
    lengths = torch.randint(words // 2, words + 1, (batch,), generator=generator)
    t_mask = torch.arange(words)[None, :] < lengths[:, None]
    sub_mask = torch.ones(batch, subcaptions, dtype=torch.bool)
    sub_mask[:, -1] = False
    return v, t, t_mask, sub, sub_mask


def _peak(fn, *args) -> int:
    """Peak bytes of ``fn(*args)`` and the backward of its (summed) result."""

    def forward_backward():
        out = fn(*args)
        (out if out.dim() == 0 else out.sum()).backward()

    return allocator_peak_memory_of(forward_backward)[0]


def measure(batch, words, patches, subcaptions, k, width, dtype=torch.float32, seed=0) -> list[MemoryFigure]:
    """Peak memory of forward + backward of both ops, reference vs the ``torch`` backend."""
    v, t, t_mask, sub, sub_mask = _inputs(batch, words, patches, subcaptions, width, dtype, seed)
    figures = []
    for name, call in (
        ("wpr_loss", lambda backend: matched.wpr_loss(v, t, None, t_mask, backend=backend)),
        (
            "topk_patch_aggregate",
            lambda backend: matched.topk_patch_aggregate(sub, v, sub_mask, None, k, backend=backend),
        ),
    ):
        peaks = []
        for backend in ("reference", "torch"):
            for leaf in (v, t, sub):  # each measure allocates its gradients afresh
                leaf.grad = None
            peaks.append(_peak(call, backend))
        figures.append(MemoryFigure(name, *peaks))
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in PAPER_SHAPE.items():
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args(argv)
    shape = vars(args)
    print("shape: " + ", ".join(f"{name}={value}" for name, value in shape.items()) + ", float32")
    print(f"{'op':<22} {'reference MiB':>14} {'torch fused MiB':>16} {'fused/reference':>16}")
    for figure in measure(**shape):
        print(
            f"{figure.op:<22} {figure.reference_bytes / 2**20:>14.1f} {figure.fused_bytes / 2**20:>16.1f}"
            f" {figure.ratio:>16.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
