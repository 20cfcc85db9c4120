"""Shared machinery of the benchmark suites (DESIGN §10): device, sweep size, one measured case, results.

Every benchmark goes through :func:`measure_case`, which

1. warms the callable up (``torch.compile`` compiles here, kernels autotune here);
2. measures its peak memory above what exists before the call: the exact dispatch tracker on CPU
   (the CPU allocator's profiler events for compiled code, which bypasses the dispatcher), the CUDA
   allocator's ``max_memory_allocated`` on GPU;
3. times it with pytest-benchmark's ``pedantic`` (rounds sized to a per-case time budget), sampling NVML
   power, clocks and utilisation on a GPU while it runs;
4. stores everything (time statistics, peak bytes, FLOP and byte counts, achieved FLOP/s against this
   machine's own large ``torch.mm``) in ``benchmark.extra_info`` and in the session's results file.

``fraction_of_mm`` compares best with best: the op's FLOPs over its fastest round against the fastest of
the ``torch.mm`` products timed at session start. On a machine shared with other work, the fastest runs
are the least disturbed ones, so the fraction is not skewed by whatever load each happened to meet.
Ratios between backends use medians.

Environment:
    ``MULCLIP_BENCH_FULL=1``      the full sweep (paper-sized shapes, longer timing); default: the quick one.
    ``MULCLIP_BENCH_RESULTS=DIR`` where results JSON/CSV land (default ``benchmarks/results``).
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mulclip_fast.profiling import NvmlSampler, measure_peak_memory

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FULL_SWEEP = os.environ.get("MULCLIP_BENCH_FULL", "0") not in ("", "0")
RESULTS_DIR = Path(os.environ.get("MULCLIP_BENCH_RESULTS", Path(__file__).resolve().parent / "results"))
DTYPE = torch.float32

# Wall-clock budget for the timed rounds of one case. Rounds are at least MIN_ROUNDS, so a case slower
# than the budget still gets a median of several runs.
TIME_BUDGET_S = 2.0 if FULL_SWEEP else 0.5
MIN_ROUNDS, MAX_ROUNDS = 3, 200
# Calls faster than this are repeated inside one round so that timer overhead stays negligible.
MIN_ROUND_S = 2e-3

RESULT_FIELDS = (
    "group",
    "op",
    "backend",
    "mode",
    "shape",
    "device",
    "dtype",
    "median_s",
    "mean_s",
    "min_s",
    "stddev_s",
    "rounds",
    "iterations",
    "peak_bytes",
    "memory_method",
    "flops",
    "bytes",
    "flops_per_s",
    "best_flops_per_s",
    "bytes_per_s",
    "fraction_of_mm",
)


def tier_selected(tier: str) -> bool:
    """Which shapes run here: ``quick`` always; ``full`` with MULCLIP_BENCH_FULL=1 or on a GPU by default
    (its run is short); ``gpu`` only on a GPU with the full sweep (shapes this CPU's reference cannot hold)."""
    if tier == "quick":
        return True
    if tier == "full":
        return FULL_SWEEP or DEVICE.type == "cuda"
    if tier == "gpu":
        return FULL_SWEEP and DEVICE.type == "cuda"
    raise ValueError(f"unknown shape tier {tier!r}")


def shape_label(shape: dict) -> str:
    return " ".join(f"{key}={value}" for key, value in shape.items())


def normalized(*size: int, generator: torch.Generator) -> torch.Tensor:
    """L2-normalised random features, as every op expects from its callers (DESIGN §4)."""
    x = torch.randn(*size, generator=generator, dtype=torch.float32)
    return F.normalize(x, dim=-1).to(device=DEVICE, dtype=DTYPE)


def length_mask(batch: int, length: int, min_valid: int, generator: torch.Generator) -> torch.Tensor:
    """``[batch, length]`` bool with a random number of leading valid tokens in ``[min_valid, length]``:
    captions of different lengths padded to the longest, as a collated batch has them."""
    valid = torch.randint(min_valid, length + 1, (batch,), generator=generator)
    valid[0] = length  # the longest row sets the padded length
    return (torch.arange(length)[None, :] < valid[:, None]).to(DEVICE)


def synchronized(fn):
    """``fn`` followed by a device synchronisation, so wall-clock time covers the kernels it queued."""
    if DEVICE.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def _rounds_for(seconds_per_call: float) -> tuple[int, int]:
    iterations = max(1, math.ceil(MIN_ROUND_S / max(seconds_per_call, 1e-9)))
    per_round = seconds_per_call * iterations
    rounds = min(MAX_ROUNDS, max(MIN_ROUNDS, round(TIME_BUDGET_S / max(per_round, 1e-9))))
    return rounds, iterations


def measure_case(
    benchmark,
    results: list[dict],
    machine: dict,
    *,
    group: str,
    op: str,
    backend: str,
    mode: str,
    shape: dict,
    fn,
    compiled: bool = False,
    flops: int | None = None,
    nbytes: int | None = None,
    extra: dict | None = None,
    warmed_up: bool = False,
    max_rounds: int = MAX_ROUNDS,
) -> dict:
    """Warm up, measure peak memory, time ``fn`` with pytest-benchmark; record and return everything.

    ``fn`` takes no argument and runs the whole measured work once (forward, or forward and backward).
    ``flops`` and ``nbytes`` are the op's useful FLOPs and compulsory bytes for that work, or None when
    the work has no closed-form count (a training step). ``warmed_up`` skips the warm-up call when the
    caller has already run ``fn``'s work; ``max_rounds`` caps the timed rounds (slow, secondary cases).
    """
    fn = synchronized(fn)
    if not warmed_up:
        fn()  # warm-up: compilation, autotuning, lazy initialisation, optimizer state
    start = time.perf_counter()
    peak_bytes, memory_method = measure_peak_memory(fn, DEVICE, compiled=compiled)
    # The measured call doubles as the timing estimate: the tracker's overhead only makes it longer,
    # which errs towards fewer rounds, never towards a budget overrun.
    seconds_per_call = time.perf_counter() - start

    rounds, iterations = _rounds_for(seconds_per_call)
    rounds = min(rounds, max_rounds)
    with NvmlSampler() if DEVICE.type == "cuda" else _no_sampler() as sampler:
        benchmark.pedantic(fn, rounds=rounds, iterations=iterations, warmup_rounds=0)
    stats = benchmark.stats.stats if benchmark.stats is not None else None  # None under --benchmark-disable
    median = stats.median if stats is not None else None
    fastest = stats.min if stats is not None else None
    best_mm_flops_per_s = machine["matmul"]["best_flops_per_s"]
    record = {
        "group": group,
        "op": op,
        "backend": backend,
        "mode": mode,
        "shape": shape_label(shape),
        "device": DEVICE.type,
        "dtype": str(DTYPE).removeprefix("torch."),
        "median_s": median,
        "mean_s": stats.mean if stats is not None else None,
        "min_s": stats.min if stats is not None else None,
        "stddev_s": stats.stddev if stats is not None else None,
        "rounds": rounds,
        "iterations": iterations,
        "peak_bytes": peak_bytes,
        "memory_method": memory_method,
        "flops": flops,
        "bytes": nbytes,
        "flops_per_s": flops / median if flops and median else None,
        "bytes_per_s": nbytes / median if nbytes and median else None,
        "best_flops_per_s": flops / fastest if flops and fastest else None,
        "fraction_of_mm": flops / fastest / best_mm_flops_per_s if flops and fastest else None,
        "shape_dims": shape,
        **(extra or {}),
    }
    if sampler is not None:
        record["nvml"] = sampler.summary()
    benchmark.group = group
    benchmark.extra_info.update({key: value for key, value in record.items() if key != "group"})
    benchmark.extra_info["machine"] = {
        key: machine[key] for key in ("cpu_model", "torch_threads", "torch", "triton", "gpu_name") if key in machine
    }
    results.append(record)
    # Rewritten after every case, so a run cut short (a time limit on a lent GPU) keeps what it measured.
    write_results(results, machine)
    return record


class _no_sampler:
    """Stand-in for :class:`NvmlSampler` on CPU runs: no GPU counters to sample."""

    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return None


def write_results(results: list[dict], machine: dict, directory: Path = RESULTS_DIR) -> tuple[Path, Path] | None:
    """Write ``bench-<device>-<timestamp>.json`` (machine facts and every record) and a CSV beside it."""
    if not results:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    stamp = machine["timestamp_utc"].replace(":", "").replace("-", "").replace("+0000", "Z")
    stem = f"bench-{DEVICE.type}-{stamp}"
    json_path, csv_path = directory / f"{stem}.json", directory / f"{stem}.csv"
    payload = {"machine": machine, "full_sweep": FULL_SWEEP, "results": results}
    json_path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RESULT_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results)
    return json_path, csv_path
