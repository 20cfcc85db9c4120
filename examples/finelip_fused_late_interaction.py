"""Swap FineLIP's cross-modal late interaction for the fused ``pairwise_maxsim`` op.

FineLIP scores every caption ``b`` against every image ``c`` of the batch by token-level late interaction
on calibrated token sets (CLS / EOT included):

    S(b, c) = mean_w max_p LeakyReLU₀.₁⟨t_bw, v_cp⟩ + mean_p max_w LeakyReLU₀.₁⟨t_bw, v_cp⟩

Written the usual way (below, ``finelip_scores``), it materialises the ``[B, B, W, P]`` similarity tensor and
autograd keeps it for backward. The fused op returns the same ``[B, B]`` scores and gradients without
ever holding it: the swap is one line. This script checks both agree (scores and token gradients within
the fp32 tolerance of docs/kernels.md; it stops with the worst difference otherwise), then reports the best
time of a few runs and the peak memory (the CPU or CUDA allocator's count, ``mulclip_fast.profiling``).

    python examples/finelip_fused_late_interaction.py                     # CPU, a few seconds
    python examples/finelip_fused_late_interaction.py --batch 128 --words 248 --patches 196 --device cuda
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from mulclip_fast import ops
from mulclip_fast.op_parity import TOLERANCE
from mulclip_fast.profiling import measure_peak_memory
from mulclip_fast.reference import finelip_hinge_loss


def finelip_scores(text_tokens, image_tokens, text_mask, image_mask, negative_slope=0.1):
    """FineLIP's late interaction as it is usually written: the whole [B, B, W, P] tensor at once."""
    sim = torch.einsum("bwd,cpd->bcwp", text_tokens, image_tokens)
    sim = F.leaky_relu(sim, negative_slope)
    pair_mask = text_mask[:, None, :, None] & image_mask[None, :, None, :]  # [B, B, W, P]
    sim = sim.masked_fill(~pair_mask, float("-inf"))
    word_to_patch = sim.amax(dim=3).masked_fill(~text_mask[:, None, :], 0)  # best patch of each word
    patch_to_word = sim.amax(dim=2).masked_fill(~image_mask[None, :, :], 0)  # best word of each patch
    t2i = word_to_patch.sum(dim=2) / text_mask.sum(dim=1)[:, None]
    i2t = patch_to_word.sum(dim=2) / image_mask.sum(dim=1)[None, :]
    return t2i + i2t


def fused_scores(text_tokens, image_tokens, text_mask, image_mask, backend="auto"):
    """The swap: the same scores from the fused op (never materialises [B, B, W, P])."""
    return ops.pairwise_maxsim(
        text_tokens, image_tokens, text_mask, image_mask, bidirectional=True, negative_slope=0.1, backend=backend
    )


def make_batch(batch, words, patches, dim, device, seed):
    """L2-normalised calibrated tokens with CLS / EOT in front; captions of random length (words masked)."""
    g = torch.Generator().manual_seed(seed)
    text = F.normalize(torch.randn(batch, words, dim, generator=g), dim=-1)
    image = F.normalize(torch.randn(batch, patches, dim, generator=g), dim=-1)
    lengths = torch.randint(2, words + 1, (batch,), generator=g)
    text_mask = torch.arange(words)[None, :] < lengths[:, None]
    image_mask = torch.ones(batch, patches, dtype=torch.bool)
    return [t.to(device) for t in (text, image, text_mask, image_mask)]


def loss_and_grads(score_fn, text, image, text_mask, image_mask):
    """FineLIP's hinge loss on the scores, forward and backward; returns the scores and token gradients."""
    text, image = text.clone().requires_grad_(), image.clone().requires_grad_()
    scores = score_fn(text, image, text_mask, image_mask)
    finelip_hinge_loss(scores, margin=0.2).backward()
    return scores.detach(), (text.grad, image.grad)


def check_agreement(naive, fused) -> None:
    """Stop, naming what and by how much, when the fused op's scores or gradients differ from FineLIP's by
    more than fp32's atol 1e-5 / rtol 1e-4 (``(scores, (text grad, image grad))`` each)."""
    (want_scores, want_grads), (got_scores, got_grads) = naive, fused
    pairs = {
        "scores": (got_scores, want_scores),
        "text gradient": (got_grads[0], want_grads[0]),
        "image gradient": (got_grads[1], want_grads[1]),
    }
    for name, (got, want) in pairs.items():
        try:
            torch.testing.assert_close(got, want, **TOLERANCE[torch.float32])
        except AssertionError as error:
            raise SystemExit(
                f"the fused op's {name} differ from FineLIP's beyond the fp32 tolerance: {error}"
            ) from None


def peak_bytes(score_fn, batch, device) -> int:
    """Peak memory of one forward + backward beyond the inputs (the CUDA or CPU allocator's count)."""
    return measure_peak_memory(lambda: loss_and_grads(score_fn, *batch), device)[0]


def seconds(score_fn, batch, device, repeats: int) -> float:
    """Best wall time of ``repeats`` forward + backward passes, after one warm-up."""
    loss_and_grads(score_fn, *batch)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        loss_and_grads(score_fn, *batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return best


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--words", type=int, default=64, help="text tokens per caption (EOT included)")
    parser.add_argument("--patches", type=int, default=50, help="image tokens per image (CLS included)")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--backend", default="auto", choices=("auto", "torch", "triton", "reference"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions (best is reported)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("batch", "words", "patches", "dim", "repeats"):
        if getattr(args, name) < (2 if name in ("batch", "words") else 1):
            parser.error(f"--{name} is too small")
    device = torch.device(args.device)
    batch = make_batch(args.batch, args.words, args.patches, args.dim, device, args.seed)

    fused = lambda *a: fused_scores(*a, backend=args.backend)  # noqa: E731
    naive_scores, naive_grads = loss_and_grads(finelip_scores, *batch)
    fused_s_scores, fused_grads = loss_and_grads(fused, *batch)
    check_agreement((naive_scores, naive_grads), (fused_s_scores, fused_grads))
    naive_peak, fused_peak = peak_bytes(finelip_scores, batch, device), peak_bytes(fused, batch, device)
    naive_s, fused_s = seconds(finelip_scores, batch, device, args.repeats), seconds(fused, batch, device, args.repeats)

    summary = {
        "shape": f"B={args.batch} W={args.words} P={args.patches} d={args.dim}",
        "max_score_diff": float((naive_scores - fused_s_scores).abs().max()),
        "max_grad_diff": max(float((a - b).abs().max()) for a, b in zip(naive_grads, fused_grads, strict=True)),
        "naive_peak_bytes": naive_peak,
        "fused_peak_bytes": fused_peak,
        "naive_seconds": round(naive_s, 4),
        "fused_seconds": round(fused_s, 4),
        "device": str(device),
        "backend": args.backend,
    }
    print(f"{'':8} {'peak memory':>14} {'time':>10}")
    print(f"{'FineLIP':8} {naive_peak / 2**20:11.2f} MiB {naive_s * 1e3:8.1f} ms")
    print(f"{'fused':8} {fused_peak / 2**20:11.2f} MiB {fused_s * 1e3:8.1f} ms")
    print(f"max |score diff| {summary['max_score_diff']:.2e}, max |grad diff| {summary['max_grad_diff']:.2e}")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
