"""Packed against padded text: tokens the text tower computes, time and exact peak memory of a training step
(docs/performance.md, "Packed text").

    python -m mulclip_fast.tools.packed_text_report [--batches 20 --steps 5 --vit-b-batch 8 --vit-b-depth 2]

1. Tokens per batch of the default training data (``python -m mulclip_fast.train``'s synthetic batches of
   32, up to 8 subcaptions): the rows times the width of every tensor the text tower runs on, counted at
   the tower itself, for the padded path (``--no-packed-text``) and the packed one (real tokens only), in
   the two phases of the default run: global terms only (long captions and summaries) and every term
   (subcaptions too).
2. One ``Trainer.step`` of each path on the same batch, the paths interleaved: median wall time and
   process CPU time (all threads; with ``--threads 1`` the time least moved by other processes' load) of
   ``--steps`` steps and the step's exact peak memory (``measure_peak_memory``: allocations made during the step, the
   parameters and optimizer state excluded), at the tiny preset (both phases) and at the ViT-B/16 shape
   with ``--vit-b-depth`` layers per tower (every term; ``--vit-b-batch 0`` skips it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from ..data import Collator, iterate_batches, open_dataset
from ..model import preset_config
from ..profiling import measure_peak_memory
from ..train import TrainConfig, Trainer, resolve_config

DEFAULT_BATCH = TrainConfig().batch_size
# Progress values at which the default schedule (fine-grained terms from 0.8, full weight from 0.85) runs
# the global terms only, and every term.
PHASES = {"global terms": 0.5, "every term": 0.9}
PATHS = {"padded": False, "packed": True}


def _trainer(preset: str, packed_text: bool, model_overrides: dict) -> Trainer:
    config = resolve_config(
        TrainConfig(preset=preset, model_overrides=model_overrides, packed_text=packed_text, eval_pairs=0)
    )
    torch.manual_seed(0)
    return Trainer(config)


def _batches(preset: str, model_overrides: dict, batch_size: int, count: int) -> list:
    """The first ``count`` training batches of the default run (same dataset, collator and order)."""
    config = resolve_config(TrainConfig(preset=preset, model_overrides=model_overrides, batch_size=batch_size))
    image_size = preset_config(preset, **model_overrides).image_resolution
    dataset = open_dataset(
        "synthetic",
        "train",
        image_size,
        config.train_size,
        config.seed,
        holdout=config.eval_pairs,
        twin_fraction=config.twin_fraction,
    )
    collator = Collator(config.max_subcaptions, with_subcaptions=True)
    # Unshuffled, as the trainer reads synthetic data (generated samples are independent draws).
    batches = iterate_batches(dataset, collator, batch_size, config.seed, shuffle=False)
    return [next(batches)[2] for _ in range(count)]


def count_text_tokens(trainer: Trainer, batch, progress: float) -> int:
    """Tokens the text tower runs on for one step's features: ``[B, L]`` inputs count ``B·L``, a pack its rows."""
    counted = []
    hook = trainer.model.transformer.register_forward_pre_hook(lambda _, args: counted.append(args[0].shape[:-1]))
    try:
        with torch.no_grad():
            trainer.compute_features(batch, trainer.fine_grained_scale(progress))
    finally:
        hook.remove()
    return sum(int(torch.Size(shape).numel()) for shape in counted)


def token_table(batches: list, trainers: dict[str, Trainer]) -> list[str]:
    lines = [
        "| phase | padded tokens / batch | packed (real) tokens / batch | packed / padded |",
        "| --- | ---: | ---: | ---: |",
    ]
    for phase, progress in PHASES.items():
        mean = {
            path: statistics.mean(count_text_tokens(trainer, batch, progress) for batch in batches)
            for path, trainer in trainers.items()
        }
        lines.append(
            f"| {phase} | {mean['padded']:.0f} | {mean['packed']:.0f} | {mean['packed'] / mean['padded']:.3f} |"
        )
    return lines


def step_rows(label: str, trainers: dict[str, Trainer], batch, phases: dict[str, float], steps: int) -> list[str]:
    rows = []
    for phase, progress in phases.items():
        times: dict[str, list[float]] = {path: [] for path in trainers}
        cpu_times: dict[str, list[float]] = {path: [] for path in trainers}
        peaks = {}
        for path, trainer in trainers.items():
            trainer.step(batch, progress)  # creates the optimizer state, which is not the step's own memory
            trainer.optimizer.zero_grad(set_to_none=True)
            peaks[path] = measure_peak_memory(lambda t=trainer, p=progress: t.step(batch, p), "cpu")[0]
        for _ in range(steps):  # interleaved, so that the machine's load falls on both paths alike
            for path, trainer in trainers.items():
                trainer.optimizer.zero_grad(set_to_none=True)
                start, cpu_start = time.perf_counter(), time.process_time()
                trainer.step(batch, progress)
                times[path].append(time.perf_counter() - start)
                cpu_times[path].append(time.process_time() - cpu_start)
        median = {path: statistics.median(values) for path, values in times.items()}
        cpu = {path: statistics.median(values) for path, values in cpu_times.items()}
        rows.append(
            f"| {label} | {phase} | {median['padded'] * 1e3:.0f} ms | {median['packed'] * 1e3:.0f} ms | "
            f"{median['packed'] / median['padded']:.2f} | "
            f"{cpu['padded'] * 1e3:.0f} ms | {cpu['packed'] * 1e3:.0f} ms | "
            f"{cpu['packed'] / cpu['padded']:.2f} | {peaks['padded'] / 2**20:.1f} MiB | "
            f"{peaks['packed'] / 2**20:.1f} MiB | {peaks['packed'] / peaks['padded']:.2f} |"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mulclip_fast.tools.packed_text_report", description=__doc__)
    parser.add_argument("--batches", type=int, default=20, help="default-run batches whose tokens are counted")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per path and case (median)")
    parser.add_argument("--vit-b-batch", type=int, default=8, help="batch of the ViT-B/16-shaped step (0: skip)")
    parser.add_argument("--vit-b-depth", type=int, default=2, help="layers per tower of the ViT-B/16-shaped step")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.batches < 1 or args.steps < 1 or args.vit_b_batch < 0 or args.vit_b_depth < 1:
        parser.error("--batches, --steps and --vit-b-depth must be >= 1, --vit-b-batch >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()}")

    tiny = {path: _trainer("tiny", packed, {}) for path, packed in PATHS.items()}
    batches = _batches("tiny", {}, DEFAULT_BATCH, args.batches)
    print(
        f"\nText-tower tokens per batch of {DEFAULT_BATCH}, mean of the default run's first {args.batches} batches:\n"
    )
    print("\n".join(token_table(batches, tiny)))

    print(f"\nOne training step, fp32, median of {args.steps} interleaved steps; peak = the step's own, exact:\n")
    print(
        "| shape | phase | padded | packed | ratio | padded CPU | packed CPU | ratio "
        "| padded peak | packed peak | ratio |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in step_rows(f"tiny, B = {DEFAULT_BATCH}", tiny, batches[0], PHASES, args.steps):
        print(row, flush=True)
    if args.vit_b_batch:
        depth = {"vision_layers": args.vit_b_depth, "transformer_layers": args.vit_b_depth}
        vit_b = {path: _trainer("vit-b-16", packed, depth) for path, packed in PATHS.items()}
        batch = _batches("vit-b-16", depth, args.vit_b_batch, 1)[0]
        label = f"ViT-B/16 shape, {args.vit_b_depth} layers per tower, B = {args.vit_b_batch}"
        for row in step_rows(label, vit_b, batch, {"every term": PHASES["every term"]}, args.steps):
            print(row, flush=True)
    print(f"\nload average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
