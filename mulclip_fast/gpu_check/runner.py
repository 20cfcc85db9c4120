"""Runs the plan within a time limit, stops at the first crash, and writes the JSON and markdown reports."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

from .background_build import BackgroundBuild, start_extension_build

EXIT_OK = 0
EXIT_FAILED = 1  # a check failed (parity, determinism, config, training step), or a task raised and the run went on
EXIT_NO_CUDA = 3  # no CUDA device and no --dry-run
EXIT_INCOMPLETE = 4  # the time limit stopped the plan early; everything that ran passed
EXIT_CRASHED = 5  # an exception left the device unusable and stopped the run; the report names the op, shape, dtype

SCHEMA = "mulclip-fast/gpu-check/1"
DEFAULT_TIME_LIMIT_S = 320.0
# After the time limit, a task still running gets this long before the watchdog interrupts it.
GRACE_S = 20.0


class TimeUp(BaseException):
    """Raised by the watchdog (SIGALRM) or on SIGTERM/SIGINT: stop now and write the report."""


def _parser() -> argparse.ArgumentParser:
    from .plan import SECTIONS

    parser = argparse.ArgumentParser(
        prog="python -m mulclip_fast.gpu_check",
        description="Validate and time every fused op and a training step on a CUDA GPU; write a JSON and a "
        "markdown report.",
    )
    parser.add_argument("--out", default="benchmarks/results", help="report directory (default: %(default)s)")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="the same plan at tiny shapes; on a machine without CUDA on the CPU, through Triton's interpreter",
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        default=DEFAULT_TIME_LIMIT_S,
        help=f"seconds after which no new task starts; a task still running {GRACE_S:.0f} s later is interrupted "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="sections to run (default: all)"
    )
    parser.add_argument(
        "--compile-backend",
        default=None,
        help="torch.compile backend for the compiled reference (default: inductor; aot_eager in a dry run)",
    )
    return parser


class Report:
    """The report being built; written (atomically) after every task, so a killed run leaves what it had."""

    def __init__(self, out_dir: Path, argv: list[str], mode: str, time_limit: float, started: float):
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        self.json_path = out_dir / f"gpu-check-{stamp}.json"
        self.md_path = out_dir / f"gpu-check-{stamp}.md"
        self.started = started
        self.extension_build: BackgroundBuild | None = None  # its record is rewritten with the report
        self.data: dict = {
            "schema": SCHEMA,
            "command": ["python", "-m", "mulclip_fast.gpu_check", *argv],
            "mode": mode,
            "status": "running",
            "exit_code": None,
            "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "elapsed_s": 0.0,
            "time_limit_s": time_limit,
            "machine": {},
            "peaks": None,
            "tolerances": {},
            "plan": {},
            "sections": {},
            "skipped": [],
            "failures": [],
            "errors": [],
            "crash": None,
            "extension_build": None,
        }

    def add(self, section: str, name: str, record: dict, seconds: float) -> None:
        self.data["sections"].setdefault(section, []).append({"task": name, "seconds": round(seconds, 3), **record})
        if not record.get("ok", False):
            problems = record.get("problems") or ["failed"]
            self.data["failures"] += [f"{section}: {name}: {problem}" for problem in problems]

    def add_error(self, error: dict) -> None:
        """A task that raised while the device stayed usable (its :func:`_exception_record`): recorded, and a
        failure."""
        self.data["errors"].append(error)
        self.data["failures"].append(f"{error['section']}: {error['task']}: raised {error['error']}")

    def write(self) -> None:
        self.data["elapsed_s"] = round(time.monotonic() - self.started, 2)
        if self.extension_build is not None:
            self.data["extension_build"] = self.extension_build.record()
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        for path, text in (
            (self.json_path, json.dumps(self.data, indent=2, default=str)),
            (self.md_path, render(self.data)),
        ):
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, path)


def _exception_record(section: str, task: str, context: dict, error: BaseException) -> dict:
    return {
        "section": section,
        "task": task,
        **context,
        "error": f"{type(error).__name__}: {error}",
        "traceback": "".join(traceback.format_exception(type(error), error, error.__traceback__)),
    }


def device_unusable(device) -> str | None:
    """Why ``device`` can run no more work after a task raised, or None when it still can.

    A CUDA error such as an illegal memory access or a failed device-side assert is sticky: it poisons the
    context, and every later CUDA call raises it again, so nothing after it could be measured. Any other
    exception (a harness bug, a config Triton cannot compile, an out-of-memory) leaves the device as it was.
    """
    if device.type != "cuda":
        return None
    import torch

    try:
        torch.cuda.synchronize(device)
        torch.ones(1, device=device).add_(1).item()
    except Exception as error:  # the sticky error again, or whatever else keeps the device from working
        return f"{type(error).__name__}: {error}"
    return None


def _bytes(value) -> str:
    if value is None:
        return "—"
    return f"{value / 2**20:.1f} MiB" if value >= 2**20 else f"{value / 2**10:.1f} KiB"


def _fmt(value, spec: str = ".3g") -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def peaks_line(peaks: dict) -> str:
    """The report's line of ``peaks.device_peaks``: what each fraction of peak is a fraction of."""
    clock = f"{peaks['sm_clock_max_mhz']} MHz" if peaks.get("sm_clock_max_mhz") else "unknown"
    rates = [f"{kind} {value / 1e12:.1f} TFLOP/s" for kind, value in (peaks.get("flops_per_s") or {}).items()]
    if peaks.get("bytes_per_s"):
        rates.append(f"memory {peaks['bytes_per_s'] / 1e12:.2f} TB/s")
    return (
        f"**Peaks** ({peaks.get('name')}, {peaks.get('multiprocessors')} SMs, max SM clock {clock}): "
        + (", ".join(rates) or "none known")
        + (f" ({peaks['reason']})" if peaks.get("reason") else "")
    )


def render(data: dict) -> str:
    """The markdown report."""
    from ..bench_report import machine_line, table

    lines = [
        f"# GPU check ({'dry run' if data['mode'] == 'dry-run' else 'GPU run'}): {data['status']}",
        "",
        f"`{' '.join(data['command'])}` — started {data['started_utc']}, {data['elapsed_s']} s "
        f"(limit {data['time_limit_s']} s), exit code {data['exit_code']}.",
        "",
    ]
    if data["machine"]:
        lines += ["**Machine**: " + machine_line(data["machine"]), ""]
    if data.get("peaks"):
        lines += [peaks_line(data["peaks"]), ""]
    lines += [
        "**Tolerances**: "
        + "; ".join(f"{k} atol {v['atol']:g} rtol {v['rtol']:g}" for k, v in data["tolerances"].items()),
        "",
    ]
    if data["crash"]:
        crash = data["crash"]
        lines += [
            "## Crash",
            "",
            f"In {crash['section']} / {crash['task']}: op {crash.get('op')}, shape {crash.get('shape')}, "
            f"dtype {crash.get('dtype')}.",
            "",
            "```",
            crash["error"],
            "```",
            "",
        ]
    if data["failures"]:
        lines += ["## Failures", ""] + [f"- {f}" for f in data["failures"]] + [""]
    for error in data.get("errors", []):
        lines += [
            f"## Error in {error['section']} / {error['task']}",
            "",
            f"Op {error.get('op')}, shape {error.get('shape')}, dtype {error.get('dtype')}; the run went on.",
            "",
            "```",
            error["traceback"].rstrip(),
            "```",
            "",
        ]
    plan = data.get("plan") or {}
    if plan:
        rows = [
            [s, str(v["tasks"]), f"{v['estimated_s']:.0f}", str(v.get("ran", 0))] for s, v in plan["sections"].items()
        ]
        lines += ["## Plan", "", table(["section", "tasks", "estimated s", "ran"], rows, markdown=True), ""]
    sections = data["sections"]
    for r in sections.get("precompile", []):
        lines += [
            "## Precompile",
            "",
            f"{r['calls']} op calls in {r['workers']} worker processes, {r['wall_s']} s "
            f"(workers' own seconds: {', '.join(map(str, r['worker_seconds'])) or '—'})"
            + (
                f"; workers {r['stopped_after_timeout']} were stopped after {r['timeout_s']:g} s"
                if r["stopped_after_timeout"]
                else ""
            )
            + (
                f"; workers {sorted(map(int, r['without_device']))} got no GPU context "
                f"({next(iter(r['without_device'].values()))})"
                if r.get("without_device")
                else ""
            )
            + ("." if r["ok"] else "; see the failures."),
            "",
        ]
    if "parity" in sections:
        rows = [
            [
                r["task"],
                "yes" if r["ok"] else "NO",
                ", ".join(f"{k} {_fmt(v)}" for k, v in r.get("max_abs_error", {}).items()),
            ]
            for r in sections["parity"]
        ]
        lines += [
            "## Parity (triton vs reference)",
            "",
            table(["case", "ok", "max abs error"], rows, markdown=True),
            "",
        ]
    if "autotune" in sections:
        rows = []
        for r in sections["autotune"]:
            for c in r.get("configs_checked", []):
                rows.append([c["kernel"], c["config"], c["dtype"], c["op"], "yes" if c["ok"] else "NO"])
        lines += [
            "## Autotune configs, each pinned",
            "",
            table(["kernel", "config", "dtype", "op", "ok"], rows, markdown=True),
            "",
        ]
        coverage = next((r for r in sections["autotune"] if r["task"] == "coverage"), None)
        if coverage:
            single = [f"{c['kernel']} [{c['config']}]" for c in coverage["configs"] if c["only_config"]]
            lines += [f"Single-config kernels (checked by every parity case): {', '.join(single) or 'none'}.", ""]
            if coverage["unreached"]:
                lines += [f"Never reached: {', '.join(coverage['unreached'])}.", ""]
    if "determinism" in sections:
        rows = [
            [r["task"], "yes" if r["ok"] else "NO " + ", ".join(r.get("differing", []))]
            for r in sections["determinism"]
        ]
        lines += [
            "## Determinism (two backward passes)",
            "",
            table(["case", "bitwise equal"], rows, markdown=True),
            "",
        ]
    if "train_step" in sections:
        rows = [
            [
                r["task"],
                "yes" if r["ok"] else "NO",
                _fmt(r.get("grad_relative_error")),
                *(
                    cell
                    for timing in (r.get("timing", {}).get(path) or {} for path in ("reference", "fast"))
                    for cell in (_fmt(timing.get("step_s"), ".4g"), _bytes(timing.get("peak_bytes")))
                ),
            ]
            for r in sections["train_step"]
        ]
        headers = ["step", "ok", "grad rel. error", "ref s", "ref peak", "fast s", "fast peak"]
        lines += ["## Training step, fast path vs reference", "", table(headers, rows, markdown=True), ""]
    timed = sections.get("timing", []) + sections.get("compiled", [])
    if timed:
        reference = {(r["op"], r["dtype"]): r for r in timed if r["backend"] == "reference"}
        rows = []
        for r in timed:
            base = reference.get((r["op"], r["dtype"]))
            rows.append(
                [
                    r["op"],
                    r["dtype"],
                    r["backend"],
                    _fmt(r["median_ms"], ".4g"),
                    _fmt(base["median_ms"] / r["median_ms"] if base else None, ".2f"),
                    _bytes(r["peak_bytes"]),
                    _fmt(r["peak_bytes"] / base["peak_bytes"] if base and base["peak_bytes"] else None, ".3f"),
                    _fmt(None if r["fraction_of_peak_flops"] is None else 100 * r["fraction_of_peak_flops"], ".2f"),
                    _fmt(
                        None if r["fraction_of_peak_bandwidth"] is None else 100 * r["fraction_of_peak_bandwidth"],
                        ".2f",
                    ),
                ]
            )
        headers = [
            "op",
            "dtype",
            "backend",
            "fwd+bwd ms",
            "speed-up vs ref",
            "peak memory",
            "memory / ref",
            "% peak FLOP/s",
            "% peak B/s",
        ]
        lines += [
            "## Time and memory, forward + backward at the paper shape",
            "",
            table(headers, rows, markdown=True),
            "",
        ]
    if "text_attention" in sections:
        rows = []
        for r in sections["text_attention"]:
            errors = r.get("errors") or {}
            times = r.get("forward_backward_ms") or {}
            rows.append(
                [
                    r["task"],
                    r.get("skipped") or ("yes" if r["ok"] else "NO"),
                    *(
                        ", ".join(f"{k} {_fmt(v['max_rel_error'])}" for k, v in (errors.get(name) or {}).items()) or "—"
                        for name in (r["backend"], "torch")
                    ),
                    _fmt(r.get("rtol_of_max")),
                    *(_fmt(times.get(name), ".4g") for name in (r["backend"], "torch")),
                    _fmt(r.get("time_vs_torch"), ".2f"),
                ]
            )
        headers = [
            "case",
            "ok",
            "max error ÷ largest fp32 value",
            "torch, same dtype",
            "bound",
            "fwd+bwd ms",
            "torch ms",
            "time / torch",
        ]
        lines += [
            "## Packed text attention, each backend vs the torch backend",
            "",
            table(headers, rows, markdown=True),
            "",
        ]
    if "scale" in sections:
        rows = [
            [r["task"], r.get("skipped") or ("yes" if r["ok"] else "NO"), str(r.get("rows_checked", "—"))]
            for r in sections["scale"]
        ]
        lines += [
            "## Largest gathered batch (rows vs the reference)",
            "",
            table(["case", "ok", "query sets checked"], rows, markdown=True),
            "",
        ]
    build = data.get("extension_build")
    if "extension" in sections or build:
        lines += ["## C++/CUDA extension, patch sets beyond Triton's", ""]
    if build:
        lines += [
            f"Background build from the start of the run (`python -m mulclip_fast.ops.extension`): "
            f"{build['status']}, {build['seconds']} s.",
            "",
        ]
        if build["status"] in ("failed", "not started"):
            lines += ["```", build["output_tail"].rstrip(), "```", ""]
    if "extension" in sections:
        rows = [
            [
                r["task"],
                r.get("skipped") or ("yes" if r["ok"] else "NO"),
                _fmt(r.get("build_wait_s"), ".3g"),
                *(_fmt((r.get("forward_backward_ms") or {}).get(key), ".4g") for key in (r.get("backend"), "torch")),
                _fmt(r.get("time_vs_torch"), ".2f"),
            ]
            for r in sections["extension"]
        ]
        headers = ["case", "ok", "waited for the build s", "extension ms", "torch ms", "time / torch"]
        lines += [table(headers, rows, markdown=True), ""]
    if data["skipped"]:
        lines += ["## Not run", ""] + [f"- {s['section']}: {s['task']} ({s['reason']})" for s in data["skipped"]] + [""]
    return "\n".join(lines)


def _print(message: str) -> None:
    print(message, flush=True)


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        _print(
            "gpu_check: no CUDA device is available (torch.cuda.is_available() is False), so there is nothing to "
            f"check on a GPU; exiting with code {EXIT_NO_CUDA}. Run with --dry-run to rehearse the plan on the "
            "CPU through Triton's interpreter."
        )
        return EXIT_NO_CUDA
    if not cuda:
        # Triton reads this when a kernel module is imported: before anything below imports one.
        os.environ.setdefault("TRITON_INTERPRET", "1")
        # The dry run's tensors are tiny: one thread runs them several times faster than a thread pool.
        torch.set_num_threads(1)

    from .. import op_parity
    from ..profiling import machine_facts
    from .peaks import device_peaks
    from .plan import Setting, build_plan, section_deadlines

    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        # The reference must be exact fp32: no TF32 in its matmuls (nor in the towers' convolutions).
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    mode = "dry-run" if args.dry_run else "gpu"
    report = Report(Path(args.out), argv, mode, args.time_limit, started)
    report.data["tolerances"] = {str(k).removeprefix("torch."): v for k, v in op_parity.TOLERANCE.items()}
    missing = op_parity.missing_ops()
    if missing:
        report.data["failures"].append(f"public ops without a parity description (op_parity.OPS): {missing}")
    setting = Setting(
        device=device,
        dry=args.dry_run,
        compile_backend=args.compile_backend or ("aot_eager" if args.dry_run else "inductor"),
    )

    def stop(signum, frame):
        raise TimeUp(f"signal {signal.Signals(signum).name}")

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGALRM, signal.SIGTERM, signal.SIGINT)}
    signal.setitimer(signal.ITIMER_REAL, max(1.0, args.time_limit + GRACE_S - (time.monotonic() - started)))
    current, plan, ended = None, [], None
    try:
        if "extension" in args.sections:
            # nvcc's minutes overlap the GPU sections, on CPU cores they leave idle (background_build.py)
            setting.extension_build = report.extension_build = start_extension_build(cuda)
        report.data["machine"] = machine_facts(device)
        if cuda:
            setting.peaks = report.data["peaks"] = device_peaks(device.index or 0)
        plan = build_plan(setting, tuple(args.sections))
        summary = {}
        for task in plan:
            entry = summary.setdefault(task.section, {"tasks": 0, "estimated_s": 0.0, "ran": 0})
            entry["tasks"] += 1
            entry["estimated_s"] += task.estimate_s
        total = sum(t.estimate_s for t in plan)
        report.data["plan"] = {"tasks": len(plan), "estimated_s": round(total, 1), "sections": summary}
        _print(
            f"gpu_check ({mode} on {device}): {len(plan)} tasks, estimated {total:.0f} s, limit {args.time_limit:.0f} s"
        )
        for section, entry in summary.items():
            _print(f"  {section:<12} {entry['tasks']:>4} tasks  ~{entry['estimated_s']:.0f} s")
        if setting.extension_build is not None:
            _print("  the C++/CUDA extension builds meanwhile in the background (python -m mulclip_fast.ops.extension)")
        deadlines = section_deadlines(args.sections, args.time_limit)
        report.data["plan"]["section_deadlines_s"] = {k: round(v, 1) for k, v in deadlines.items()}
        if total > args.time_limit:
            _print(
                "  the estimate exceeds the limit: each section runs within its share of the limit (time a section "
                "leaves unused passes on) and leaves out its last tasks when it would overrun"
            )
        report.write()
        for task in plan:
            elapsed = time.monotonic() - started
            if not task.always and elapsed + task.estimate_s > min(args.time_limit, deadlines[task.section]):
                limit = "time limit" if elapsed + task.estimate_s > args.time_limit else "section's share of the limit"
                report.data["skipped"].append(
                    {"section": task.section, "task": task.name, "reason": f"{limit} ({elapsed:.0f} s elapsed)"}
                )
                continue
            current = task
            begin = time.monotonic()
            try:
                record = task.run()
            except Exception as error:
                failure = _exception_record(task.section, task.name, task.context, error)
                # The task's tensors, held by its frames, go before the probe: after an out-of-memory it needs room.
                traceback.clear_frames(error.__traceback__)
                if device_unusable(device) is not None:
                    raise  # a crash: nothing after it can run
                current = None
                report.add_error(failure)
                summary[task.section]["ran"] += 1
                _print(f"[{time.monotonic() - started:6.1f} s] {task.section:<12} {task.name}: RAISED {error!r}")
                report.write()
                continue
            seconds = time.monotonic() - begin
            current = None
            report.add(task.section, task.name, record, seconds)
            summary[task.section]["ran"] += 1
            verdict = "ok" if record.get("ok") else "FAILED"
            _print(f"[{time.monotonic() - started:6.1f} s] {task.section:<12} {task.name}: {verdict}")
            report.write()
    except TimeUp as stopped:
        ended = f"interrupted by {stopped}"
        where = f" during {current.section} / {current.name}" if current else ""
        report.data["skipped"].append(
            {
                "section": current.section if current else "-",
                "task": current.name if current else "-",
                "reason": f"interrupted by {stopped}{where}",
            }
        )
    except Exception as error:  # a crash (outside a task, or one that left the device unusable): record it, stop
        context = current.context if current else {}
        report.data["crash"] = _exception_record(
            current.section if current else "setup", current.name if current else "setup", context, error
        )
        crash = report.data["crash"]
        ended = f"the run stopped at the crash in {crash['section']} / {crash['task']}"
        _print(f"gpu_check: crashed in {crash['section']} / {crash['task']} {context}: {error}")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        # whatever ended the run (the plan's end, the time limit, a signal, a crash): no compiler outlives it
        if setting.extension_build is not None:
            setting.extension_build.stop()
    if ended:
        # The tasks the loop never reached: listed, so that the report names everything a second call must run.
        accounted = {(s["section"], s["task"]) for s in report.data["skipped"]}
        accounted |= {(section, r["task"]) for section, records in report.data["sections"].items() for r in records}
        accounted |= {(e["section"], e["task"]) for e in report.data["errors"]}
        if report.data["crash"]:
            accounted.add((report.data["crash"]["section"], report.data["crash"]["task"]))
        report.data["skipped"] += [
            {"section": task.section, "task": task.name, "reason": f"not started: {ended}"}
            for task in plan
            if (task.section, task.name) not in accounted
        ]
    if report.data["crash"]:
        status, code = "crashed", EXIT_CRASHED
    elif report.data["failures"]:
        status, code = "failed", EXIT_FAILED
    elif report.data["skipped"]:
        status, code = "incomplete", EXIT_INCOMPLETE
    else:
        status, code = "passed", EXIT_OK
    report.data["status"], report.data["exit_code"] = status, code
    with contextlib.suppress(Exception):
        from ..profiling import nvml_telemetry

        report.data["nvml_after"] = nvml_telemetry(device.index or 0 if cuda else 0)
    report.write()
    failures = len(report.data["failures"])
    _print(f"gpu_check: {status} (exit {code}); {failures} failures; report {report.json_path} and {report.md_path}")
    return code
