"""The GPU check's ``precompile`` section: worker processes that make the op sections' calls first.

On a CPU the workers run through Triton's interpreter, which compiles nothing, so what is checked here is
the machinery a GPU run relies on: the calls are the parity and config-sweep calls, each once, and each
builds its case; the groups are dealt to the workers by their estimates, longest first; a worker makes its
share and reports it; a worker's failure or overrun reaches the task record; and no worker outlives the task,
at its timeout or on the run's time limit (an exception). That the sections then find what the workers
compiled is shown, through a stand-in CUDA driver, in test_gpu_check_cache_handoff.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from mulclip_fast.gpu_check import precompile
from mulclip_fast.gpu_check.plan import (
    STRIDED,
    WIDE_TOPK,
    Setting,
    autotune_shapes,
    longest_first,
    parity_cases,
    precompile_estimate_s,
    precompile_groups,
    precompile_shares,
)
from mulclip_fast.op_parity import OPS, make_case

DRY = Setting(device=torch.device("cpu"), dry=True, compile_backend="aot_eager")
GPU = Setting(device=torch.device("cpu"), dry=False, compile_backend="inductor")  # the GPU plan's shapes


def _key(call) -> tuple:
    op, sizes, dtype, layout = call
    return op, sizes.label(), dtype, tuple(sorted(layout.items()))


@pytest.mark.parametrize("setting", [DRY, GPU], ids=["dry", "gpu"])
def test_the_groups_hold_every_parity_and_config_sweep_call_once(setting):
    calls = [_key(call) for group in precompile_groups(setting) for call in group]
    assert len(calls) == len(set(calls))
    parity = {
        (op, setting.shapes[op][shape].label(), dtype, strided) for op, shape, dtype, strided in parity_cases(setting)
    }
    assert {(op, label, dtype, dict(layout) == STRIDED) for op, label, dtype, layout in calls} >= parity
    assert len(parity) == len(parity_cases(setting))
    # the sweep's second SAP shape, in every dtype it sweeps; its first (small) shape is parity's own
    wide = WIDE_TOPK[setting.mode].label()
    swept = {(op, label, dtype) for op, label, dtype, _ in calls if label == wide}
    expected = {
        (op, wide, dtype) for dtype in setting.dtypes("autotune") for op in OPS if len(autotune_shapes(setting, op)) > 1
    }
    assert swept == expected and expected
    # a group is one op in one dtype
    for group in precompile_groups(setting):
        assert len({(op, dtype) for op, _, dtype, _ in group}) == 1


@pytest.mark.parametrize("setting", [DRY, GPU], ids=["dry", "gpu"])
def test_every_call_of_the_plan_builds_its_case(setting):
    # make_case refuses sizes its op cannot take (a matched op with two batch sizes): such a call would raise
    # in every run, in the workers and in the sections. The dtype does not change what is accepted.
    shapes = {
        (op, sizes, tuple(sorted(layout.items()))) for g in precompile_groups(setting) for op, sizes, _, layout in g
    }
    for op, sizes, layout in shapes:
        case = make_case(op, sizes, dtype=torch.float32, seed=3, **dict(layout))
        assert case.a.shape[0] == sizes.batch_a and case.b.shape[0] == sizes.batch_b


def test_a_worker_makes_its_share_of_the_calls_and_reports_them():
    completed = subprocess.run(
        [sys.executable, "-m", precompile.MODULE, "--worker", "1", "--workers", "4", "--dry-run"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    groups = precompile_groups(DRY)
    expected = sum(len(groups[index]) for index in precompile_shares(DRY, 4)[1])
    assert report["worker"] == 1 and report["calls"] == expected and report["errors"] == []


def test_longest_first_gives_the_biggest_estimate_to_the_least_loaded_worker():
    # 7 → worker 0; 5 → 1; 4 → 1 (5 < 7); 3 → 0 (7 < 9); 1 → 1 (9 < 10). Dealt in turn, worker 0 would get
    # 3 + 4 + 1 = 8 and worker 1 7 + 5 = 12.
    assert longest_first([3.0, 7.0, 4.0, 5.0, 1.0], 2) == [[1, 0], [3, 2, 4]]
    # ties: the lower index first, to the lower worker
    assert longest_first([2.0, 2.0, 2.0], 2) == [[0, 2], [1]]


@pytest.mark.parametrize("workers", [2, 5, 14, 18, 20])
def test_the_plan_deals_every_group_once_each_to_a_least_loaded_worker(workers):
    estimates = [precompile_estimate_s(group) for group in precompile_groups(GPU)]
    shares = precompile_shares(GPU, workers)
    assert len(shares) == workers
    assert sorted(index for share in shares for index in share) == list(range(len(estimates)))
    # Replayed biggest first (ties: the lower index), each group went to a worker with the least load so far.
    owner = {index: worker for worker, share in enumerate(shares) for index in share}
    loads = [0.0] * workers
    for index in sorted(range(len(estimates)), key=lambda i: (-estimates[i], i)):
        assert loads[owner[index]] == min(loads), (index, loads)
        loads[owner[index]] += estimates[index]


def test_every_worker_process_computes_the_same_deal():
    # each worker computes the deal from (I, N) alone: it must not depend on the process (its hash seed, say)
    show = (
        "import json, torch; from mulclip_fast.gpu_check.plan import Setting, precompile_shares; "
        "print(json.dumps(precompile_shares(Setting(torch.device('cpu'), dry=False, compile_backend='inductor'), 14)))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    completed = subprocess.run([sys.executable, "-c", show], capture_output=True, text=True, timeout=120, env=env)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert json.loads(completed.stdout) == precompile_shares(GPU, 14)


def test_a_worker_index_outside_the_workers_is_refused():
    with pytest.raises(SystemExit):
        precompile.main(["--worker", "2", "--workers", "2", "--dry-run"])


def _recording_popen(monkeypatch) -> list:
    started = []
    real = subprocess.Popen

    def popen(*args, **kwargs):
        process = real(*args, **kwargs)
        started.append(process)
        return process

    monkeypatch.setattr(precompile.subprocess, "Popen", popen)
    return started


def _assert_gone(processes) -> None:
    assert processes
    for process in processes:
        assert process.poll() is not None
        with pytest.raises(ProcessLookupError):
            os.killpg(process.pid, 0)  # its whole process group is gone


def test_workers_past_the_timeout_are_stopped_and_recorded(monkeypatch):
    started = _recording_popen(monkeypatch)
    record = precompile.compile_in_workers(dry=True, workers=2, timeout_s=0.5)
    # not a failure: a stopped worker only saved less compile time
    assert record["ok"] and record["problems"] == []
    assert record["stopped_after_timeout"] == [0, 1] and record["calls"] == 0
    _assert_gone(started)


def test_a_time_limit_interrupting_the_wait_kills_the_workers(monkeypatch):
    started = _recording_popen(monkeypatch)

    class TimeUp(BaseException):  # the runner's watchdog raises its own BaseException from SIGALRM
        pass

    def alarm(signum, frame):
        raise TimeUp

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, 1.0)
    try:
        with pytest.raises(TimeUp):
            precompile.compile_in_workers(dry=True, workers=2, timeout_s=300)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    _assert_gone(started)


def test_a_failed_worker_is_reported_with_its_stderr(monkeypatch):
    monkeypatch.setattr(precompile, "MODULE", "mulclip_fast.no_such_module")
    record = precompile.compile_in_workers(dry=True, workers=1, timeout_s=60)
    assert not record["ok"] and record["calls"] == 0
    [problem] = record["problems"]
    assert problem.startswith("worker 0: exit code 1; stderr ends:") and "No module named" in problem


def test_the_worker_module_runs_as_a_script_without_cuda():
    # without --dry-run and without CUDA it refuses, with the reason, instead of running the plan on the CPU
    completed = subprocess.run(
        [sys.executable, "-m", precompile.MODULE, "--worker", "0", "--workers", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert completed.returncode != 0 and "no CUDA device" in completed.stderr


def test_a_worker_the_gpu_refuses_a_context_steps_aside(monkeypatch):
    # A GPU in exclusive-process mode serves the main process alone: a worker's first allocation fails. (Here
    # the CPU build's refusal of any CUDA tensor stands in for that error.)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    report = precompile.run_worker(0, 1, dry=False)
    assert report["calls"] == 0 and report["errors"] == [] and report["no_device"]


def test_a_worker_without_a_gpu_context_is_recorded_not_failed(monkeypatch, tmp_path):
    # the worker's own report, as a worker the GPU refused prints it
    stub = {"worker": 0, "calls": 0, "seconds": 0.0, "errors": [], "no_device": "RuntimeError: device busy"}
    (tmp_path / "refused_worker.py").write_text(f"print({json.dumps(stub)!r})\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setattr(precompile, "MODULE", "refused_worker")
    record = precompile.compile_in_workers(dry=True, workers=1, timeout_s=60)
    assert record["ok"] and record["problems"] == []
    assert record["without_device"] == {0: "RuntimeError: device busy"}
