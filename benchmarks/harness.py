"""Shared machinery of the benchmark suites (docs/performance.md): device, sweep size, one measured case, results.

Every benchmark goes through :func:`measure_case`, which

1. warms the callable up (``torch.compile`` compiles here, kernels autotune here);
2. measures its peak memory above what exists before the call: the CPU allocator's profiler events
   on CPU (exact requested sizes; a dispatch mode would change what autograd allocates, see
   ``mulclip_fast.profiling``), the CUDA allocator's ``max_memory_allocated`` on GPU;
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
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


def raise_recompile_limits(config=None, per_function: int = 256, accumulated: int = 4096) -> None:
    """Raise Dynamo's recompile limits (``torch._dynamo.config`` unless ``config`` is given): one compiled
    graph per (op, shape, grad mode) is more than the default 8 recompiles of one function, past which Dynamo
    silently falls back to eager and the benchmark would time the wrong thing.

    Newer PyTorch calls them ``recompile_limit`` and ``accumulated_recompile_limit`` (the old names stay as
    aliases there); 2.6.0 and older know only ``cache_size_limit`` and ``accumulated_cache_size_limit``, and
    Dynamo's config refuses a name it does not know (docs/notes/2026-12-01-version-floor.md).
    """
    if config is None:
        config = torch._dynamo.config
    new = hasattr(config, "recompile_limit")
    setattr(config, "recompile_limit" if new else "cache_size_limit", per_function)
    setattr(config, "accumulated_recompile_limit" if new else "accumulated_cache_size_limit", accumulated)


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
    """L2-normalised random features, as every op expects from its callers (docs/method.md, "Op conventions")."""
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
    flops: int | None = None,
    nbytes: int | None = None,
    extra: dict | None = None,
    warmed_up: bool = False,
    max_rounds: int = MAX_ROUNDS,
    known_peak: tuple[int, str] | None = None,
) -> dict:
    """Warm up, measure peak memory, time ``fn`` with pytest-benchmark; record and return everything.

    ``fn`` takes no argument and runs the whole measured work once (forward, or forward and backward).
    ``flops`` and ``nbytes`` are the op's useful FLOPs and compulsory bytes for that work, or None when
    the work has no closed-form count (a training step). ``warmed_up`` skips the warm-up call when the
    caller has already run ``fn``'s work; ``max_rounds`` caps the timed rounds (slow, secondary cases).
    ``known_peak`` is ``(bytes, method)`` from :func:`measure_peak_memory` of this very ``fn`` made by the
    caller (a batch-size search measures every candidate); the measure is then not repeated.
    """
    fn = synchronized(fn)
    if not warmed_up:
        fn()  # warm-up: compilation, autotuning, lazy initialisation, optimizer state
    if known_peak is None:
        start = time.perf_counter()
        peak_bytes, memory_method = measure_peak_memory(fn, DEVICE)
        # The measured call doubles as the timing estimate: the profiler's overhead only makes it longer,
        # which errs towards fewer rounds, never towards a budget overrun.
        seconds_per_call = time.perf_counter() - start
    else:
        peak_bytes, memory_method = known_peak
        seconds_per_call = math.inf  # no estimate: as few rounds as allowed

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


@dataclass
class BatchSearch:
    """What :func:`largest_batch_within` found.

    ``batch``: the largest batch measured within the budget (0 when not even the first one fits), ``peak``
    its peak bytes; ``over``: the smallest batch measured over the budget (None if none was); ``capped``:
    the search stopped at its limit, not at the budget; ``probes``: every batch measured and its peak
    bytes, in the order measured.
    """

    batch: int
    peak: int
    over: int | None
    capped: bool
    probes: dict[int, int] = field(default_factory=dict)


def largest_batch_within(
    budget: float,
    peak_of: Callable[[int], int],
    start: int = 4,
    limit: int = 4096,
    max_growth: int = 4,
) -> BatchSearch:
    """The largest batch ``b <= limit`` with ``peak_of(b) <= budget``, to within 1/8 of ``b``.

    The peak is assumed to grow with the batch. The search ends when it has measured a batch within the
    budget and one over it that are at most ``max(1, b // 8)`` apart (or when ``limit`` fits). Every
    answer is a measurement; a model only chooses the next batch to measure, so that the search needs few
    large (slow) steps: a step's peak is a fixed part, plus activations that grow linearly with the
    batch, plus, for an all-pairs loss computed naively, tensors that grow with its square. The next
    batch is where the line or parabola through the (up to) three measurements closest to the budget
    reaches it, at least 1/8 above the largest batch that fits and at most ``max_growth`` times it, and
    below the smallest batch that does not.
    """
    probes: dict[int, int] = {}

    def measure(batch: int) -> int:
        probes[batch] = int(peak_of(batch))
        return probes[batch]

    if measure(start) > budget:
        return BatchSearch(0, 0, start, False, probes)
    fits, over = start, None
    sides: list[bool] = []  # whether each probe since the budget was first exceeded fitted
    while over is None or over - fits > max(1, fits // 8):
        if fits >= limit:
            return BatchSearch(fits, probes[fits], None, True, probes)
        step = max(1, fits // 8)
        predicted = _batch_reaching(probes, budget)
        if over is None:
            guess = predicted if predicted is not None else 2 * fits
            candidate = min(limit, fits * max_growth, max(fits + step, guess))
        elif predicted is None or sides[-2:] in ([True, True], [False, False]):
            # No model, or the model missed twice on the same side: bisect, so the bracket always shrinks.
            candidate = max(fits + step, (fits + over) // 2)
        else:
            candidate = min(over - 1, max(fits + step, predicted))
        fitted = measure(candidate) <= budget
        if fitted:
            fits = candidate
        else:
            over = candidate
        if over is not None:
            sides.append(fitted)
    return BatchSearch(fits, probes[fits], over, False, probes)


def _batch_reaching(probes: dict[int, int], budget: float) -> int | None:
    """Largest batch at which the line (two measurements) or parabola (three) through the measurements
    closest to ``budget`` stays within it; None when they do not predict growth."""
    closest = sorted(probes, key=lambda batch: abs(probes[batch] - budget))[:3]
    if len(closest) < 2:
        return None
    xs = np.array(closest, dtype=float)
    ys = np.array([probes[batch] for batch in closest], dtype=float)
    if len(closest) == 3:
        c, a, f = np.polyfit(xs, ys, 2)
        discriminant = a * a - 4 * c * (f - budget)
        if c > 0 and discriminant >= 0:
            # The larger root of c·b² + a·b + f = budget.
            return int(math.floor((-a + math.sqrt(discriminant)) / (2 * c)))
        xs, ys = xs[:2], ys[:2]
    a, f = np.polyfit(xs, ys, 1)
    if a <= 0:
        return None
    return int(math.floor((budget - f) / a))


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
