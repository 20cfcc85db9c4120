"""Compiles the Triton kernels of the GPU check's op sections in parallel worker processes, before they run.

A first GPU run compiles every kernel variant × autotune config it launches afresh, one after another in the
main process, at the first launch of each: about a second apiece (the plan's calls compile 163 kernels, 209 s
in one process on a 2-core machine like CI's), minutes of a run that has about eight. Worker processes make
the same op calls first, all at once: forward and backward on the ``triton`` backend, real launches, so the
autotuner times, and therefore compiles, every config it may choose. Triton writes each compiled kernel to its
on-disk cache (``TRITON_CACHE_DIR``), keyed by the kernel's source, its specialisation to the arguments
(dtypes, 16-byte alignment, integers equal to 1 or divisible by 16) and its options; the main process makes
the same calls, with the same shapes and layouts, and its launches load their kernels from that cache instead
of compiling them. Nothing else passes between the processes: a worker that fails, or is stopped at its
timeout, costs only the compile time it would have saved (a call that raised in it is reported, and the op
sections then meet the same error themselves). The handoff is observed on a CPU, through a stand-in CUDA
driver, by tests/test_gpu_check_cache_handoff.py.

    python -m mulclip_fast.gpu_check.precompile --worker I --workers N [--dry-run]

runs worker ``I``'s share of the calls (the groups of ``plan.precompile_groups`` that ``plan.precompile_shares``
deals it by their estimated compile time) and prints one JSON line: its calls, seconds and errors (or
``no_device``, why the GPU refused it a context: a GPU in exclusive-process mode serves the main process alone,
and the sections then compile for themselves).
``--dry-run`` makes the calls at the dry run's shapes on the CPU, through Triton's interpreter (which compiles
nothing: the dry run rehearses the machinery).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

from .child_group import ChildGroup, end_with_parent

MODULE = "mulclip_fast.gpu_check.precompile"
# The end of a failed worker's stderr kept in the report.
STDERR_TAIL_CHARS = 2000


def compile_in_workers(dry: bool, workers: int, timeout_s: float) -> dict:
    """Run ``workers`` worker processes and wait for them, at most ``timeout_s``; the task record.

    Every worker is a :class:`ChildGroup`, killed with its process group if it is still running when this
    returns or raises (the time limit's ``TimeUp`` included): none outlives the call.
    """
    started = time.monotonic()
    with contextlib.ExitStack() as cleanup:  # unwound last in, first out: a worker ends before its files close
        running = []
        for index in range(workers):
            command = [sys.executable, "-m", MODULE, "--worker", str(index), "--workers", str(workers)]
            stdout = cleanup.enter_context(tempfile.TemporaryFile())
            stderr = cleanup.enter_context(tempfile.TemporaryFile())
            worker = ChildGroup(command + (["--dry-run"] if dry else []), stdout=stdout, stderr=stderr)
            running.append((cleanup.enter_context(worker), stdout, stderr))
        deadline = started + timeout_s
        for worker, _, _ in running:
            try:
                worker.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass  # stopped below; the sections compile what it had not
        stopped = {index for index, (worker, _, _) in enumerate(running) if worker.end()}
        reports, problems, without_device = [], [], {}
        for index, (worker, stdout, stderr) in enumerate(running):
            report = _worker_report(stdout)
            if report is not None:
                reports.append(report)
                problems += [f"worker {index}: {e['call']}: {e['error']}" for e in report["errors"]]
                if "no_device" in report:
                    without_device[index] = report["no_device"]
            if index not in stopped and (worker.process.returncode != 0 or report is None):
                tail = _read(stderr)[-STDERR_TAIL_CHARS:]
                problems.append(f"worker {index}: exit code {worker.process.returncode}; stderr ends: {tail}")
    # A worker stopped at the timeout, or refused a GPU context, is not a failure: it only saved less compile
    # time (a hang it was in would stop the section that meets it, where the watchdog names the op).
    return {
        "ok": not problems,
        "workers": workers,
        "calls": sum(r["calls"] for r in reports),
        "wall_s": round(time.monotonic() - started, 2),
        "worker_seconds": [r["seconds"] for r in reports],
        "stopped_after_timeout": sorted(stopped),
        "without_device": without_device,
        "timeout_s": timeout_s,
        "problems": problems,
    }


def _read(handle) -> str:
    handle.seek(0)
    return handle.read().decode(errors="replace")


def _worker_report(stdout) -> dict | None:
    """The JSON line a worker prints last, or None when it printed none (it crashed or was stopped)."""
    lines = _read(stdout).strip().splitlines()
    try:
        return json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        return None


def run_worker(worker: int, workers: int, dry: bool) -> dict:
    """Make worker ``worker``'s share of the op calls; its report (calls made, seconds, errors)."""
    import torch

    cuda = torch.cuda.is_available()  # the device rule of the GPU check itself (runner.main)
    if not cuda:
        if not dry:
            raise SystemExit("precompile: no CUDA device (use --dry-run to rehearse on the CPU)")
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before a kernel module is imported
        torch.set_num_threads(1)

    from ..op_parity import evaluate, make_case
    from .plan import Setting, precompile_groups, precompile_shares

    setting = Setting(device=torch.device("cuda" if cuda else "cpu"), dry=dry, compile_backend="inductor")
    started = time.monotonic()
    if cuda:
        try:
            torch.zeros(1, device=setting.device)  # a context of its own, which a GPU may refuse a second process
        except Exception as error:  # e.g. a GPU in exclusive-process mode: this worker can only step aside
            reason = traceback.format_exception_only(type(error), error)[-1].strip()
            return {"worker": worker, "calls": 0, "seconds": 0.0, "errors": [], "no_device": reason}
    calls, errors = 0, []
    groups = precompile_groups(setting)
    for index in precompile_shares(setting, workers)[worker]:
        for op, sizes, dtype, layout in groups[index]:
            try:
                # the seed is the parity task's; the kernels' specialisation depends on shapes and layouts alone
                evaluate(make_case(op, sizes, dtype=dtype, device=setting.device, seed=3, **layout), "triton")
            except Exception as error:  # reported; the op sections meet it again and say where
                last = traceback.format_exception_only(type(error), error)[-1].strip()
                errors.append({"call": f"{op} {sizes.label()} {str(dtype).removeprefix('torch.')}", "error": last})
            calls += 1
    if cuda:
        torch.cuda.synchronize()
    return {"worker": worker, "calls": calls, "seconds": round(time.monotonic() - started, 2), "errors": errors}


def main(argv: list[str] | None = None) -> int:
    end_with_parent()  # a worker compile_in_workers started ends with it, even if the GPU check is SIGKILLed
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", type=int, required=True, help="this worker's index, 0 ≤ I < N")
    parser.add_argument("--workers", type=int, required=True, help="the number of workers N")
    parser.add_argument("--dry-run", action="store_true", help="the dry run's shapes, on the CPU's interpreter")
    args = parser.parse_args(argv)
    if not 0 <= args.worker < args.workers:
        parser.error(f"--worker must be in [0, --workers), got {args.worker} of {args.workers}")
    print(json.dumps(run_worker(args.worker, args.workers, args.dry_run)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
