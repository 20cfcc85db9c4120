"""``python -m mulclip_fast.bench_report``: ratio tables and plots from benchmark results (docs/performance.md).

Reads the JSON files that ``pytest benchmarks --benchmark-only`` writes (``bench-<device>-<time>.json``
in ``benchmarks/results`` or ``$MULCLIP_BENCH_RESULTS``) and prints, per results file:

- per op, shape and mode: each fast backend's median time and exact peak memory next to the
  reference's, as ratios fast / reference (below 1 is better), and the achieved FLOP/s as a percentage
  of this machine's own large ``torch.mm`` throughput (on a GPU: the measured peak it is compared with),
  fastest round against fastest product, so that load from other work skews neither;
- per training step: reference vs fast path at equal batch;
- the largest batch each path fits in the memory budget, and the step's peak at the batches both
  paths' searches measured.

It also draws PNG plots of the ratios. ``--markdown`` prints the tables as Markdown (README-ready).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

DEFAULT_RESULTS = Path(os.environ.get("MULCLIP_BENCH_RESULTS", "benchmarks/results"))
REFERENCE = "reference"
TRAIN_FAST = "fast"
MiB = 2**20
# Ops renamed since results files were written: their records are reported under the current name.
RENAMED_OPS = {"pairwise_topk_aggregate_logits": "pairwise_topk_aggregate_cosines"}


class ReportError(ValueError):
    """Unusable report input; the message names the path."""


# ---------------------------------------------------------------------------------------------- loading
def find_results(paths: list[Path]) -> list[Path]:
    """The results files named, or for a folder the newest ``bench-<device>-*.json`` per device."""
    files: list[Path] = []
    for path in paths:
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            newest: dict[str, Path] = {}
            for candidate in sorted(path.glob("bench-*-*.json")):  # timestamps sort chronologically
                newest[candidate.name.split("-")[1]] = candidate
            if not newest:
                raise ReportError(f"no bench-<device>-<time>.json results in {path}")
            files.extend(newest[device] for device in sorted(newest))
        else:
            raise ReportError(f"results path does not exist: {path}")
    return files


def load_results(path: Path) -> dict:
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ReportError(f"cannot read results file {path}: {error}") from None
    if not isinstance(payload, dict) or "machine" not in payload or "results" not in payload:
        raise ReportError(f"{path} is not a benchmark results file (needs 'machine' and 'results')")
    for record in payload["results"]:
        if record.get("op") in RENAMED_OPS:
            record["op"] = RENAMED_OPS[record["op"]]
    return payload


# ---------------------------------------------------------------------------------------------- tables
def _ratio(value, base) -> float | None:
    return value / base if value is not None and base else None


def _fmt(value, spec: str, missing: str = "—") -> str:
    return missing if value is None else format(value, spec)


def op_rows(results: list[dict]) -> list[dict]:
    """One row per (op, mode, shape, non-reference backend) with its ratios to the reference."""
    by_case: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for record in results:
        if record["mode"] in ("forward", "forward+backward"):
            by_case[(record["op"], record["mode"], record["shape"])][record["backend"]] = record
    rows = []
    for (op, mode, shape), backends in by_case.items():
        ref = backends.get(REFERENCE)
        for backend, record in backends.items():
            if backend == REFERENCE:
                continue
            rows.append(
                {
                    "op": op,
                    "mode": mode,
                    "shape": shape,
                    "backend": backend,
                    "median_s": record["median_s"],
                    "ref_median_s": ref and ref["median_s"],
                    "time_ratio": _ratio(record["median_s"], ref and ref["median_s"]),
                    "peak_bytes": record["peak_bytes"],
                    "ref_peak_bytes": ref and ref["peak_bytes"],
                    "memory_ratio": _ratio(record["peak_bytes"], ref and ref["peak_bytes"]),
                    "fraction_of_mm": record.get("fraction_of_mm"),
                    "ref_fraction_of_mm": ref and ref.get("fraction_of_mm"),
                }
            )
    return rows


def train_rows(results: list[dict]) -> list[dict]:
    """Equal-batch training steps: fast vs reference per (preset, objective, batch)."""
    by_case: dict[str, dict[str, dict]] = defaultdict(dict)
    for record in results:
        if record["mode"] == "train-step" and "max_batch" not in record:
            by_case[record["shape"]][record["backend"]] = record
    rows = []
    for shape, paths in by_case.items():
        ref, fast = paths.get(REFERENCE), paths.get(TRAIN_FAST)
        if ref is None or fast is None:
            continue
        rows.append(
            {
                "case": shape,
                "op": fast["op"],
                "ref_median_s": ref["median_s"],
                "median_s": fast["median_s"],
                "time_ratio": _ratio(fast["median_s"], ref["median_s"]),
                "ref_peak_bytes": ref["peak_bytes"],
                "peak_bytes": fast["peak_bytes"],
                "memory_ratio": _ratio(fast["peak_bytes"], ref["peak_bytes"]),
            }
        )
    return rows


def _max_batch_case(record: dict) -> tuple[str, str, int]:
    """(op, preset, budget) of a largest-batch record; results files before the preset was recorded name
    it in ``shape_dims`` only."""
    preset = record.get("preset") or record.get("shape_dims", {}).get("preset", "")
    return record["op"], preset, record["memory_budget_bytes"]


def max_batch_rows(results: list[dict]) -> list[dict]:
    """Largest batch within the memory budget, per objective, preset and budget, reference vs fast path."""
    by_case: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for record in results:
        if "max_batch" in record:
            by_case[_max_batch_case(record)][record["backend"]] = record
    rows = []
    for (op, preset, budget), paths in by_case.items():
        ref, fast = paths.get(REFERENCE), paths.get(TRAIN_FAST)
        if ref is None or fast is None:
            continue
        rows.append(
            {
                "objective": op.removeprefix("train_step_max_batch[").removesuffix("]"),
                "preset": preset,
                "budget_bytes": budget,
                "ref_batch": ref["max_batch"],
                "batch": fast["max_batch"],
                "ref_capped": ref.get("max_batch_capped", False),
                "capped": fast.get("max_batch_capped", False),
                "batch_ratio": _ratio(fast["max_batch"], ref["max_batch"]),
                "ref_peak_bytes": ref.get("max_batch_peak_bytes"),
                "peak_bytes": fast.get("max_batch_peak_bytes"),
                "ref_over": ref.get("max_batch_over"),
                "over": fast.get("max_batch_over"),
            }
        )
    return rows


def probe_rows(results: list[dict]) -> list[dict]:
    """The step's peak at each batch that both paths' largest-batch searches measured: how each path's
    peak grows with the batch (linearly with the towers, quadratically with a naive all-pairs loss)."""
    by_case: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for record in results:
        if "max_batch_probes" in record:
            by_case[_max_batch_case(record)][record["backend"]] = record
    rows = []
    for (op, preset, _), paths in by_case.items():
        ref, fast = paths.get(REFERENCE), paths.get(TRAIN_FAST)
        if ref is None or fast is None:
            continue
        ref_peaks, fast_peaks = dict(map(tuple, ref["max_batch_probes"])), dict(map(tuple, fast["max_batch_probes"]))
        for batch in sorted(set(ref_peaks) & set(fast_peaks)):
            rows.append(
                {
                    "objective": op.removeprefix("train_step_max_batch[").removesuffix("]"),
                    "preset": preset,
                    "B": batch,
                    "ref_peak_bytes": ref_peaks[batch],
                    "peak_bytes": fast_peaks[batch],
                    "memory_ratio": _ratio(fast_peaks[batch], ref_peaks[batch]),
                }
            )
    return rows


def table(headers: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def machine_line(machine: dict) -> str:
    """One line naming the machine the numbers were measured on."""
    mm = machine.get("matmul", {})
    parts = [f"{machine.get('device', '?')} run {machine.get('timestamp_utc', '?')}"]
    if machine.get("gpu_name"):
        parts.append(f"GPU {machine['gpu_name']} (capability {machine.get('gpu_capability')})")
    parts.append(
        f"CPU {machine.get('cpu_model', '?')}, {machine.get('cpu_affinity', '?')} cores usable, "
        f"{machine.get('torch_threads', '?')} torch threads"
    )
    parts.append(f"torch {machine.get('torch')}, triton {machine.get('triton')}")
    if mm:
        parts.append(
            f"torch.mm {mm.get('dtype')} n={mm.get('n')}: {mm['flops_per_s'] / 1e9:.1f} GFLOP/s median, "
            f"{mm['best_flops_per_s'] / 1e9:.1f} best"
        )
    nvml = machine.get("nvml", {})
    parts.append("NVML: " + ("available" if nvml.get("available") else f"absent ({nvml.get('reason', '?')})"))
    return "; ".join(parts)


def _batch_ratio_cell(row: dict) -> str:
    """fast / reference batch; a search that stopped at its limit found a lower bound of its batch, so the
    ratio is a bound too (none when both stopped there)."""
    if row["ref_capped"] and row["capped"]:
        return "—"
    bound = ">=" if row["capped"] else "<=" if row["ref_capped"] else ""
    return bound + _fmt(row["batch_ratio"], ".2f")


def render(payload: dict, markdown: bool = False) -> str:
    machine, results = payload["machine"], payload["results"]
    gpu = machine.get("device") == "cuda"
    mm_label = "% of peak (mm)" if gpu else "% of mm"
    out = [("**Machine**: " if markdown else "Machine: ") + machine_line(machine), ""]

    rows = op_rows(results)
    if rows:
        headers = ["op", "mode", "shape", "backend", "ref ms", "ms", "time ×ref", "ref MiB", "MiB", "memory ×ref"]
        headers += [f"ref {mm_label}", mm_label]
        body = [
            [
                r["op"],
                r["mode"],
                r["shape"],
                r["backend"],
                _fmt(r["ref_median_s"] and r["ref_median_s"] * 1e3, ".1f"),
                _fmt(r["median_s"] and r["median_s"] * 1e3, ".1f"),
                _fmt(r["time_ratio"], ".2f"),
                _fmt(r["ref_peak_bytes"] and r["ref_peak_bytes"] / MiB, ".1f"),
                _fmt(r["peak_bytes"] / MiB, ".2f"),
                _fmt(r["memory_ratio"], ".3f"),
                _fmt(r["ref_fraction_of_mm"] and 100 * r["ref_fraction_of_mm"], ".1f"),
                _fmt(r["fraction_of_mm"] and 100 * r["fraction_of_mm"], ".1f"),
            ]
            for r in rows
        ]
        out += [
            "Ops (median time, exact peak memory above the inputs; ×ref = fast / reference, from those; "
            f"{mm_label}: the op's FLOP/s in its fastest round over the fastest torch.mm's on this machine):",
            "",
        ]
        out += [table(headers, body, markdown), ""]

    rows = train_rows(results)
    if rows:
        headers = ["training step", "ref ms", "fast ms", "time ×ref", "ref MiB", "fast MiB", "memory ×ref"]
        body = [
            [
                r["case"],
                _fmt(r["ref_median_s"] and r["ref_median_s"] * 1e3, ".0f"),
                _fmt(r["median_s"] and r["median_s"] * 1e3, ".0f"),
                _fmt(r["time_ratio"], ".2f"),
                _fmt(r["ref_peak_bytes"] / MiB, ".1f"),
                _fmt(r["peak_bytes"] / MiB, ".1f"),
                _fmt(r["memory_ratio"], ".3f"),
            ]
            for r in rows
        ]
        out += ["Training step at equal batch (reference vs fast path; median time, exact peak memory of the step):"]
        out += ["", table(headers, body, markdown), ""]

    rows = max_batch_rows(results)
    if rows:
        headers = ["objective", "preset", "budget MiB", "reference batch", "fast batch", "fast / reference"]
        headers += ["reference MiB at its batch", "fast MiB at its batch", "over budget at (ref / fast)"]
        body = [
            [
                r["objective"],
                r["preset"],
                str(r["budget_bytes"] >> 20),
                (">=" if r["ref_capped"] else "") + str(r["ref_batch"]),
                (">=" if r["capped"] else "") + str(r["batch"]),
                _batch_ratio_cell(r),
                _fmt(r["ref_peak_bytes"] and r["ref_peak_bytes"] / MiB, ".1f"),
                _fmt(r["peak_bytes"] and r["peak_bytes"] / MiB, ".1f"),
                f"{_fmt(r['ref_over'], 'd')} / {_fmt(r['over'], 'd')}",
            ]
            for r in rows
        ]
        out += ["Largest training batch within the memory budget (step's own peak):", ""]
        out += [table(headers, body, markdown), ""]

    rows = probe_rows(results)
    if rows:
        headers = ["objective", "preset", "B", "reference MiB", "fast MiB", "memory ×ref"]
        body = [
            [
                r["objective"],
                r["preset"],
                str(r["B"]),
                _fmt(r["ref_peak_bytes"] / MiB, ".1f"),
                _fmt(r["peak_bytes"] / MiB, ".1f"),
                _fmt(r["memory_ratio"], ".3f"),
            ]
            for r in rows
        ]
        out += ["Step peak at the batches both largest-batch searches measured:", ""]
        out += [table(headers, body, markdown), ""]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------- plots
def draw_plots(payload: dict, directory: Path, stem: str) -> list[Path]:
    """Bar charts of the fast/reference time and memory ratios (log scale), per mode and per op."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    rows = op_rows(payload["results"])
    for mode in ("forward", "forward+backward"):
        selected = [r for r in rows if r["mode"] == mode and r["time_ratio"] is not None]
        if not selected:
            continue
        labels = [f"{r['op']} [{r['backend']}]\n{r['shape']}" for r in selected]
        fig, axes = plt.subplots(1, 2, figsize=(14, 0.45 * len(selected) + 1.5), sharey=True)
        for ax, key, title in ((axes[0], "time_ratio", "time"), (axes[1], "memory_ratio", "peak memory")):
            values = [r[key] or float("nan") for r in selected]
            ax.barh(range(len(selected)), values, color=["tab:green" if v < 1 else "tab:red" for v in values])
            ax.axvline(1.0, color="black", linewidth=0.8)
            ax.set_xscale("log")
            ax.set_title(f"{title}: fast / reference ({mode})")
        axes[0].set_yticks(range(len(selected)), labels, fontsize=6)
        axes[0].invert_yaxis()
        fig.tight_layout()
        path = directory / f"{stem}-ops-{mode.replace('+', '_')}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")  # no label cut at the edge
        plt.close(fig)
        written.append(path)
    rows = train_rows(payload["results"])
    if rows:
        fig, axes = plt.subplots(1, 2, figsize=(12, 0.5 * len(rows) + 1.5), sharey=True)
        for ax, (ref_key, key, scale, unit) in zip(
            axes,
            (("ref_median_s", "median_s", 1e3, "ms"), ("ref_peak_bytes", "peak_bytes", 1 / MiB, "MiB")),
            strict=True,
        ):
            ys = range(len(rows))
            ax.barh([y - 0.2 for y in ys], [(r[ref_key] or 0) * scale for r in rows], height=0.4, label="reference")
            ax.barh([y + 0.2 for y in ys], [(r[key] or 0) * scale for r in rows], height=0.4, label="fast")
            ax.set_title(f"training step ({unit})")
        axes[0].legend(loc="best")  # one legend, where it covers the fewest bars
        # the case names are long: their batch and token counts on a second line
        axes[0].set_yticks(range(len(rows)), [r["case"].replace(" B=", "\nB=", 1) for r in rows], fontsize=7)
        axes[0].invert_yaxis()
        fig.tight_layout()
        path = directory / f"{stem}-train-step.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")  # no label cut at the edge
        plt.close(fig)
        written.append(path)
    return written


# ---------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mulclip_fast.bench_report", description=__doc__.split("\n")[0])
    parser.add_argument(
        "paths",
        nargs="*",
        type=Path,
        help=f"results JSON files or folders (newest file per device); default {DEFAULT_RESULTS}",
    )
    parser.add_argument("--plots", type=Path, default=None, help="folder for PNG plots (default: <results>/plots)")
    parser.add_argument("--no-plots", action="store_true", help="print the tables only")
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    args = parser.parse_args(argv)
    try:
        files = find_results(args.paths or [DEFAULT_RESULTS])
        for path in files:
            payload = load_results(path)
            print(f"{'## ' if args.markdown else ''}{path}\n")
            print(render(payload, markdown=args.markdown))
            if not args.no_plots:
                plots = draw_plots(payload, args.plots or path.parent / "plots", path.stem)
                for plot in plots:
                    print(f"plot: {plot}")
                print()
    except ReportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
