"""``python -m mulclip_fast.gpu_check``: the dry run's report, exit codes, crash and time-limit handling.

The dry run (``--dry-run``) runs the GPU plan at tiny shapes on the CPU through Triton's interpreter; it is
run once, as a subprocess, into a temporary directory, and its JSON and markdown reports are checked. The
runner's own behaviour (a crash stops the run and names the op, shape and dtype; the time limit leaves tasks
out; the watchdog interrupts a task that overruns) is checked in-process on small fake plans.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mulclip_fast import gpu_check
from mulclip_fast.gpu_check import background_build, runner
from mulclip_fast.gpu_check import plan as plan_module
from mulclip_fast.gpu_check.configs import all_configs, autotuned_kernels, config_label
from mulclip_fast.gpu_check.plan import DTYPES, Task
from mulclip_fast.op_parity import OPS

REPO = Path(__file__).resolve().parents[1]
TOP_LEVEL_KEYS = {
    "schema",
    "command",
    "mode",
    "status",
    "exit_code",
    "started_utc",
    "elapsed_s",
    "time_limit_s",
    "machine",
    "peaks",
    "tolerances",
    "plan",
    "sections",
    "skipped",
    "failures",
    "errors",
    "crash",
}


def _reports(directory: Path) -> tuple[dict, str]:
    [json_path] = directory.glob("gpu-check-*.json")
    [md_path] = directory.glob("gpu-check-*.md")
    assert json_path.stem == md_path.stem
    return json.loads(json_path.read_text()), md_path.read_text()


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    started = time.monotonic()
    completed = subprocess.run(
        # a generous limit: this test checks what the plan covers, not how fast this machine is
        [sys.executable, "-m", "mulclip_fast.gpu_check", "--dry-run", "--out", str(out), "--time-limit", "1200"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    data, markdown = _reports(out)
    return completed, data, markdown, time.monotonic() - started


def test_dry_run_passes_and_writes_its_reports(dry_run):
    completed, data, _, _ = dry_run
    assert completed.returncode == gpu_check.EXIT_OK, completed.stdout[-4000:] + completed.stderr[-4000:]
    assert set(data) >= TOP_LEVEL_KEYS
    assert data["schema"] == gpu_check.SCHEMA
    assert data["mode"] == "dry-run" and data["status"] == "passed" and data["exit_code"] == 0
    assert data["failures"] == [] and data["crash"] is None and data["skipped"] == []
    assert data["machine"]["device"] in ("cpu", "cuda")
    assert data["tolerances"]["float32"] == {"atol": 1e-5, "rtol": 1e-4}
    assert data["tolerances"]["bfloat16"]["rtol"] == 2e-2 and data["tolerances"]["float16"]["rtol"] == 2e-2
    # the plan printed and recorded its estimate, and every planned task ran
    assert "tasks, estimated" in completed.stdout
    assert data["plan"]["tasks"] == sum(len(records) for records in data["sections"].values())
    assert all(entry["ran"] == entry["tasks"] for entry in data["plan"]["sections"].values())


def test_dry_run_makes_the_op_sections_calls_in_worker_processes_first(dry_run):
    _, data, markdown, _ = dry_run
    [record] = data["sections"]["precompile"]
    assert list(data["sections"])[0] == "precompile"
    assert record["ok"] and record["problems"] == [] and record["workers"] == 2
    assert record["calls"] == sum(len(group) for group in plan_module.precompile_groups(_dry_setting()))
    assert "## Precompile" in markdown


def _dry_setting() -> plan_module.Setting:
    return plan_module.Setting(device=torch.device("cpu"), dry=True, compile_backend="aot_eager")


def test_dry_run_checks_parity_of_every_op_dtype_and_layout(dry_run):
    _, data, _, _ = dry_run
    records = data["sections"]["parity"]
    seen = set()
    for record in records:
        op, _, dtype, layout = record["task"].split()
        seen.add((op, dtype, layout))
        assert record["ok"] and record["problems"] == []
        assert set(record["max_abs_error"]) == {"value", *(f"grad {n}" for n in OPS[op].arg_names[:2])}
        assert all(math.isfinite(error) for error in record["max_abs_error"].values())
    dtypes = {str(d).removeprefix("torch.") for d in DTYPES}
    assert seen == {(op, d, layout) for op in OPS for d in dtypes for layout in ("dense", "strided")}


def test_dry_run_pins_every_autotune_config(dry_run):
    _, data, markdown, _ = dry_run
    coverage = next(r for r in data["sections"]["autotune"] if r["task"] == "coverage")
    assert coverage["ok"] and coverage["unreached"] == []
    kernels = autotuned_kernels()
    expected = {(label, config_label(c)) for label, kernel in kernels.items() for c in all_configs(kernel)}
    assert {(row["kernel"], row["config"]) for row in coverage["configs"]} == expected
    pinned = [c for r in data["sections"]["autotune"] for c in r.get("configs_checked", [])]
    assert pinned and all(c["ok"] and c["ran_pinned"] and c["launches"] >= 1 for c in pinned)
    multi = {
        (label, config_label(c)) for label, k in kernels.items() if len(all_configs(k)) > 1 for c in all_configs(k)
    }
    assert {(c["kernel"], c["config"]) for c in pinned} == multi
    assert "## Autotune configs, each pinned" in markdown


def test_dry_run_covers_determinism_timing_training_steps_scale_and_the_extension(dry_run):
    _, data, markdown, _ = dry_run
    sections = data["sections"]
    assert {r["task"].split()[0] for r in sections["determinism"]} == set(OPS)
    assert all(r["bitwise_equal"] for r in sections["determinism"])
    timed = {(r["op"], r["backend"]) for r in sections["timing"] + sections["compiled"]}
    assert timed == {(op, b) for op in OPS for b in ("triton", "torch", "reference", "compiled-reference")}
    for record in sections["timing"] + sections["compiled"]:
        assert record["median_ms"] > 0 and record["peak_bytes"] > 0 and record["flops"] > 0 and record["bytes"] > 0
        assert record["nvml"]["available"] in (True, False)
    steps = sections["train_step"]
    assert {(r["preset"], r["objective"]) for r in steps} >= {("tiny", "finelip"), ("vit-b-16", "mulclip")}
    for record in steps:
        assert record["ok"] and record["grad_relative_error"] <= 1e-4
        assert set(record["timing"]) == {"reference", "fast"}
        assert record["loss_terms"]["loss"]["fast"] == pytest.approx(
            record["loss_terms"]["loss"]["reference"], rel=1e-4
        )
    for op in OPS:
        assert op in markdown
    assert {r["op"] for r in sections["scale"]} == {op for op in OPS if op.startswith("pairwise")}
    assert all(r["ok"] and "skipped" not in r and len(r["rows_checked"]) == 3 for r in sections["scale"])
    # the CPU twin of the extension, built from csrc/ (skipped with its reason where no compiler is found); a dry
    # run on a CUDA machine runs the tiny shapes on the GPU, through the extension's CUDA kernels
    on_cuda = data["machine"]["device"] == "cuda"
    extension = sections["extension"]
    assert {r["task"].split()[0] for r in extension} == {"topk_patch_aggregate", "pairwise_topk_aggregate_cosines"}
    for record in extension:
        assert record["ok"], record
        backend = "cuda_ext" if on_cuda else "cpp"
        assert "skipped" in record or (record["backend"] == backend and record["time_vs_torch"] > 0), record
        assert record["build_wait_s"] >= 0  # the build began in the background at the start of the run
    build = data["extension_build"]
    assert build["status"] == ("failed" if any("skipped" in r for r in extension) else "built"), build
    # packed text attention: the torch backend against itself in fp32 here; flash-attn and xformers need CUDA
    # (on a CUDA machine they run where installed, else they are recorded skips)
    text = sections["text_attention"]
    assert {(r["backend"], r["preset"], r["dtype"]) for r in text} == {
        (b, p, d) for b in ("torch", "flash", "xformers") for p in ("tiny", "vit-b-16") for d in ("bfloat16", "float16")
    }
    for record in text:
        assert record["ok"], record
        if record["backend"] == "torch":
            assert "skipped" not in record and record["forward_backward_ms"]["torch"] > 0
        elif on_cuda:
            assert "skipped" in record or record["forward_backward_ms"][record["backend"]] > 0, record
        else:
            assert "needs a CUDA device" in record["skipped"], record
    headings = ("## Parity", "## Determinism", "## Training step", "## Time and memory", "## Packed text", "## Largest")
    for heading in (*headings, "## C++"):
        assert heading in markdown


# ----------------------------------------------------------------------------------------------------
# text_attention (in-process, that section only)
# ----------------------------------------------------------------------------------------------------


@pytest.fixture
def keep_threads():
    """The dry run sets one torch thread for the process; give the next tests back their count."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_text_pack_is_a_mulclip_batch_with_the_longest_texts():
    lengths = plan_module.text_pack_lengths(64)
    long, short, subs = lengths[:64], lengths[64:128], lengths[128:]
    assert max(long) == 248 and min(long) >= 64 and max(short) == 77 and min(short) >= 8
    assert 64 <= len(subs) <= 8 * 64 and all(5 <= n <= 40 for n in subs)
    assert plan_module.text_pack_lengths(64) == lengths  # the same pack every run


def test_text_attention_fits_its_share_of_the_default_time_limit():
    """On a GPU the section's estimate (flash-attn on both towers, xformers on the tower without ALiBi) must
    fit the share of the default limit the plan gives it, so that a default run reaches every backend."""
    setting = plan_module.Setting(device=torch.device("cuda"), dry=False, compile_backend="inductor")
    tasks = plan_module.text_attention_tasks(setting)
    share = plan_module.section_deadlines(plan_module.SECTIONS, runner.DEFAULT_TIME_LIMIT_S)
    order = list(plan_module.SECTIONS)
    before = order[order.index("text_attention") - 1]
    assert 0 < sum(t.estimate_s for t in tasks) <= share["text_attention"] - share[before]
    # xformers takes no ALiBi slopes: those cases are recorded skips, planned at no cost
    assert [t.estimate_s for t in tasks if t.name.startswith("xformers tiny")] == [0.0, 0.0]


def test_text_attention_dry_run_checks_the_torch_backend_and_records_why_the_others_skip(tmp_path, keep_threads):
    from mulclip_fast.model import attention

    code = runner.main(["--dry-run", "--out", str(tmp_path), "--sections", "text_attention"])
    data, markdown = _reports(tmp_path)
    assert code == gpu_check.EXIT_OK, data["failures"]
    records = data["sections"]["text_attention"]
    ran = [r for r in records if "skipped" not in r]
    # flash-attn and xformers run where there is CUDA and they are installed (each is optional)
    installed = {"flash": attention._load_flash_attn(), "xformers": attention._load_xformers_fmha()}
    runnable = {name for name, module in installed.items() if module is not None and torch.cuda.is_available()}
    assert {r["backend"] for r in ran} == {"torch", *runnable}
    for record in ran:
        assert record["longest"] == 248 and record["tokens"] > 2 * (248 + 77)
        for output in ("value", "grad q", "grad k", "grad v"):
            error = record["errors"][record["backend"]][output]
            assert 0 < error["max_rel_error"] <= record["rtol_of_max"] and error["max_abs_error"] > 0
    assert all(r["skipped"] for r in records if r not in ran)
    assert "## Packed text attention" in markdown


def test_text_attention_fails_a_backend_whose_half_precision_results_are_off(tmp_path, monkeypatch, keep_threads):
    """A backend 1 % off in 16 bits (2.6 bf16 unit roundoffs, 20 fp16 ones) fails in fp16, whose bound is 8
    of its unit roundoffs, and passes in bf16: the check measures, and the bound is per dtype."""
    from mulclip_fast.model import attention

    exact = attention.packed_causal_attention

    def one_percent_off(q, k, v, *args, **kwargs):
        out = exact(q, k, v, *args, **kwargs)
        return out if q.dtype == torch.float32 else out * 1.01

    monkeypatch.setattr(attention, "packed_causal_attention", one_percent_off)
    code = runner.main(["--dry-run", "--out", str(tmp_path), "--sections", "text_attention"])
    data, _ = _reports(tmp_path)
    assert code == gpu_check.EXIT_FAILED
    failed = {r["task"] for r in data["sections"]["text_attention"] if not r["ok"]}
    assert failed == {"torch tiny float16 B=2", "torch vit-b-16 float16 B=2"}
    assert any("torch value: max error" in f for f in data["failures"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_without_cuda_it_says_so_and_exits_with_its_own_code(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "mulclip_fast.gpu_check", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == gpu_check.EXIT_NO_CUDA == 3
    assert "no CUDA device" in completed.stdout and "--dry-run" in completed.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_the_prepared_device_command_runs_gpu_check_into_out_and_keeps_a_log(tmp_path):
    """``.ci/gpu-check`` (the offline GPU machine's command): here the package is already installed, so it
    installs nothing, runs gpu_check with its report directory in $OUT and passes the exit code on."""
    out = tmp_path / "out"
    completed = subprocess.run(
        ["bash", str(REPO / ".ci" / "gpu-check"), "--time-limit", "30"],
        cwd=tmp_path,
        env={**os.environ, "OUT": str(out), "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == gpu_check.EXIT_NO_CUDA, completed.stderr
    log = (out / "gpu-check.log").read_text()
    assert log == completed.stdout and log.startswith("gpu_check: no CUDA device"), log  # no install output
    assert sorted(p.name for p in out.iterdir()) == ["gpu-check.log"]


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_the_prepared_device_command_answers_help_without_installing_or_writing(tmp_path, flag):
    """``.ci/gpu-check --help`` ran its offline ``pip install -e .`` into whatever python3 was first on the PATH
    and wrote benchmarks/results/gpu-check.log before gpu_check could print its help."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python").write_text(f"#!/bin/sh\necho called >> {tmp_path / 'python-called'}\n")
    (fake / "python").chmod(0o755)
    out = tmp_path / "out"
    completed = subprocess.run(
        ["bash", str(REPO / ".ci" / "gpu-check"), flag],
        cwd=tmp_path,
        env={**os.environ, "OUT": str(out), "PYTHON": str(fake / "python")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 0, completed.stderr
    assert "fetch-wheels" in completed.stdout and "python -m mulclip_fast.gpu_check --help" in completed.stdout
    assert not out.exists() and not (tmp_path / "python-called").exists()


@pytest.mark.parametrize(
    ("given", "passed", "outer"),
    [((), ["--time-limit", "480"], "540"), (("--time-limit", "30"), ["--time-limit", "30"], "90")],
)
def test_the_prepared_device_command_fills_the_lent_machines_ten_minute_command(tmp_path, given, passed, outer):
    """The lent machine runs one command of at most 10 minutes, and the project calls ``.ci/gpu-check`` with no
    options: it gives gpu_check 480 s (not gpu_check's own 320), whose outer timeout (540 s) plus the offline
    install stays inside the 600 s; a --time-limit given is passed on as it is."""
    fake = tmp_path / "bin"
    fake.mkdir()
    for name, body in (("python", 'echo "python $*"'), ("timeout", 'echo "timeout $*"; shift 3; "$@"')):
        (fake / name).write_text(f"#!/bin/sh\n{body}\n")
        (fake / name).chmod(0o755)
    out = tmp_path / "out"
    completed = subprocess.run(
        ["bash", str(REPO / ".ci" / "gpu-check"), "--dry-run", *given],
        cwd=tmp_path,
        env={**os.environ, "OUT": str(out), "PYTHON": str(fake / "python"), "PATH": f"{fake}:{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 0, completed.stderr
    timeout_line, python_line = completed.stdout.splitlines()[-2:]
    assert timeout_line.split()[:4] == ["timeout", "-s", "KILL", outer]
    args = python_line.split()
    assert args[:5] == ["python", "-m", "mulclip_fast.gpu_check", "--out", str(out)]
    assert args[5:] == ["--dry-run", *passed]


# ----------------------------------------------------------------------------------------------------
# The runner on fake plans (in-process)
# ----------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_plan(monkeypatch):
    """Replace the plan by the tasks a test gives, and the background build of the extension by a process that
    does nothing; keep the process's torch thread count."""
    threads = torch.get_num_threads()
    tasks: list[Task] = []
    monkeypatch.setattr(plan_module, "build_plan", lambda setting, sections: list(tasks))
    monkeypatch.setattr(background_build, "COMMAND", (sys.executable, "-c", ""))
    yield tasks
    torch.set_num_threads(threads)


def _ok(name="fine", estimate=0.01):
    return Task("parity", name, estimate, lambda: {"ok": True, "problems": []})


def test_a_crash_stops_the_run_names_op_shape_dtype_and_still_writes(fake_plan, tmp_path, monkeypatch):
    # an illegal memory access poisons the CUDA context: the device can run nothing after it
    monkeypatch.setattr(runner, "device_unusable", lambda device: "RuntimeError: CUDA error: illegal memory access")

    def crash():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    ran = []
    fake_plan += [
        _ok("first"),
        Task("parity", "boom", 0.01, crash, {"op": "wpr_loss", "shape": "a=[64,196,512]", "dtype": "bfloat16"}),
        Task("parity", "after", 0.01, lambda: ran.append(1) or {"ok": True}),
    ]
    code = runner.main(["--dry-run", "--out", str(tmp_path)])
    data, markdown = _reports(tmp_path)
    assert code == data["exit_code"] == gpu_check.EXIT_CRASHED == 5
    assert data["status"] == "crashed" and not ran
    crash = data["crash"]
    assert (crash["op"], crash["shape"], crash["dtype"], crash["task"]) == (
        "wpr_loss",
        "a=[64,196,512]",
        "bfloat16",
        "boom",
    )
    assert "illegal memory access" in crash["error"] and "Traceback" in crash["traceback"]
    assert [r["task"] for r in data["sections"]["parity"]] == ["first"]
    [after] = data["skipped"]  # the task the crash kept from running is listed, with why
    assert after["task"] == "after" and "not started" in after["reason"] and "crash" in after["reason"]
    assert "## Crash" in markdown and "wpr_loss" in markdown


def test_a_task_that_raises_on_a_usable_device_is_an_error_and_the_run_goes_on(fake_plan, tmp_path):
    """A harness bug in one CUDA-only branch, a config Triton cannot compile, an out-of-memory: the device still
    works, so the one GPU run must not lose every section after it."""

    def harness_bug():
        raise KeyError("median_ms")

    context = {"op": "pairwise_maxsim", "shape": "a=[64,248,512]", "dtype": "bfloat16"}
    fake_plan += [_ok("first"), Task("timing", "raises", 0.01, harness_bug, context), _ok("after")]
    code = runner.main(["--dry-run", "--out", str(tmp_path)])
    data, markdown = _reports(tmp_path)
    assert code == data["exit_code"] == gpu_check.EXIT_FAILED and data["status"] == "failed"
    assert data["crash"] is None and data["skipped"] == []
    assert [r["task"] for r in data["sections"]["parity"]] == ["first", "after"]
    [error] = data["errors"]
    assert (error["section"], error["task"]) == ("timing", "raises")
    assert {key: error[key] for key in context} == context
    assert "KeyError" in error["error"] and "harness_bug" in error["traceback"]
    assert data["failures"] == ["timing: raises: raised KeyError: 'median_ms'"]
    assert "## Error in timing / raises" in markdown and "harness_bug" in markdown


def test_a_raising_tasks_tensors_are_released_before_the_device_is_probed(fake_plan, tmp_path, monkeypatch):
    """After an out-of-memory the failed task's tensors, held by its frames through the traceback, would fill
    the GPU while the probe asks for one element: they go first, and the report keeps the traceback."""
    released, probed = [], []

    class Tensors:
        def __del__(self):
            released.append(True)

    def out_of_memory():
        held = Tensors()  # noqa: F841 (what the frame holds)
        raise RuntimeError("CUDA out of memory. Tried to allocate 96.00 GiB")

    monkeypatch.setattr(runner, "device_unusable", lambda device: probed.append(bool(released)))
    fake_plan += [Task("scale", "too big", 0.01, out_of_memory)]
    code = runner.main(["--dry-run", "--out", str(tmp_path)])
    data, _ = _reports(tmp_path)
    assert code == gpu_check.EXIT_FAILED and probed == [True]
    assert "out_of_memory" in data["errors"][0]["traceback"]


def test_the_device_is_unusable_after_a_sticky_cuda_error_and_usable_otherwise(monkeypatch):
    cuda = torch.device("cuda")
    assert runner.device_unusable(torch.device("cpu")) is None

    def sticky(device=None):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch.cuda, "synchronize", sticky)
    assert "illegal memory access" in runner.device_unusable(cuda)
    # a healthy device: it synchronises and runs a tiny computation
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    real_ones = torch.ones
    monkeypatch.setattr(torch, "ones", lambda *shape, device=None, **kwargs: real_ones(*shape, **kwargs))
    assert runner.device_unusable(cuda) is None


def test_a_failed_check_is_reported_and_the_run_goes_on(fake_plan, tmp_path):
    fake_plan += [Task("parity", "bad", 0.01, lambda: {"ok": False, "problems": ["value: too far"]}), _ok("next")]
    code = runner.main(["--dry-run", "--out", str(tmp_path)])
    data, markdown = _reports(tmp_path)
    assert code == gpu_check.EXIT_FAILED == 1 and data["status"] == "failed"
    assert data["failures"] == ["parity: bad: value: too far"]
    assert [r["task"] for r in data["sections"]["parity"]] == ["bad", "next"]
    assert "value: too far" in markdown


def test_the_time_limit_leaves_out_tasks_that_would_overrun(fake_plan, tmp_path):
    fake_plan += [_ok("quick"), _ok("too long", estimate=1e6), _ok("quick again")]
    code = runner.main(["--dry-run", "--out", str(tmp_path), "--time-limit", "100"])
    data, _ = _reports(tmp_path)
    assert code == gpu_check.EXIT_INCOMPLETE == 4 and data["status"] == "incomplete"
    assert [r["task"] for r in data["sections"]["parity"]] == ["quick", "quick again"]
    assert [s["task"] for s in data["skipped"]] == ["too long"]


def test_a_section_that_would_overrun_its_share_leaves_its_tasks_out_and_the_next_section_runs(fake_plan, tmp_path):
    fake_plan += [
        _ok("first"),
        # parity's share of a 100 s limit over the sections parity and determinism is 100 · 0.2 / 0.25 = 80 s
        _ok("past the share", estimate=90.0),
        Task("determinism", "next section", 0.01, lambda: {"ok": True}),
    ]
    code = runner.main(
        ["--dry-run", "--out", str(tmp_path), "--time-limit", "100", "--sections", "parity", "determinism"]
    )
    data, _ = _reports(tmp_path)
    assert code == gpu_check.EXIT_INCOMPLETE
    assert [r["task"] for r in data["sections"]["parity"]] == ["first"]
    assert [r["task"] for r in data["sections"]["determinism"]] == ["next section"]
    [skipped] = data["skipped"]
    assert skipped["task"] == "past the share" and "share" in skipped["reason"]
    assert data["plan"]["section_deadlines_s"] == {"parity": pytest.approx(80.0), "determinism": 100.0}


def test_the_watchdog_interrupts_a_task_that_overruns_and_the_report_is_written(fake_plan, tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "GRACE_S", 0.5)

    def hang():
        time.sleep(30)
        return {"ok": True}

    fake_plan += [
        _ok("quick"),
        Task("timing", "hangs", 0.01, hang, {"op": "pairwise_maxsim"}),
        Task("compiled", "never started", 0.01, lambda: {"ok": True}),
    ]
    # (a task the watchdog did not interrupt would end after its 30 s sleep and be recorded as passed)
    code = runner.main(["--dry-run", "--out", str(tmp_path), "--time-limit", "5"])
    data, markdown = _reports(tmp_path)
    assert code == gpu_check.EXIT_INCOMPLETE
    interrupted, never = data["skipped"]
    assert interrupted["task"] == "hangs" and "interrupted" in interrupted["reason"]
    # the tasks after it are listed too: the report names everything a second call must run
    assert (never["section"], never["task"]) == ("compiled", "never started") and "not started" in never["reason"]
    assert "- compiled: never started (not started" in markdown


# ----------------------------------------------------------------------------------------------------
# The extension's background build
# ----------------------------------------------------------------------------------------------------


def test_the_extension_tasks_wait_for_the_background_build(tmp_path, keep_threads):
    """The build starts before the plan's first task; the first extension task waits for it (its process imports
    torch for a second or more before it loads or compiles), the second finds it done."""
    from mulclip_fast.ops import extension

    code = runner.main(["--dry-run", "--out", str(tmp_path), "--sections", "extension"])
    data, markdown = _reports(tmp_path)
    build = data["extension_build"]
    assert code == gpu_check.EXIT_OK and build["status"] == "built" and build["exit_code"] == 0, build
    assert f"build directory: {extension.build_directory()}" in build["output_tail"]
    first, second = data["sections"]["extension"]
    # (the build's seconds are rounded to 0.01 s, and it may end a moment before the task's wait began)
    assert "skipped" not in first and 0 < first["build_wait_s"] <= build["seconds"] + 0.01, (first, build)
    assert second["build_wait_s"] < 0.1
    assert "Background build from the start of the run" in markdown and "waited for the build" in markdown


# A stand-in for the build: starts a "compiler" (its child, in its process group), writes both pids, then hangs.
HANGING_BUILD = """
import os, subprocess, sys, time
compiler = subprocess.Popen(["sleep", "60"])
with open(sys.argv[1] + ".tmp", "w") as pids:
    pids.write(f"{os.getpid()} {compiler.pid}")
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(60)
"""


def still_running(pid: int) -> bool:
    """Whether ``pid`` still runs; a zombie (dead, waiting for whoever reaps it) has ended."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _await_file(path: Path, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)


@pytest.mark.parametrize("ending", ["the plan's end", "the watchdog", "SIGTERM"])
def test_the_background_build_and_its_compilers_end_with_the_run(fake_plan, tmp_path, monkeypatch, ending):
    pids = tmp_path / "pids"
    monkeypatch.setattr(background_build, "COMMAND", (sys.executable, "-c", HANGING_BUILD, str(pids)))
    monkeypatch.setattr(runner, "GRACE_S", 0.5)

    def started_then(then):
        def run():
            _await_file(pids)
            then()
            return {"ok": True}

        return run

    if ending == "the watchdog":  # interrupts the extension task waiting for a build that never ends
        monkeypatch.setattr(plan_module, "build_plan", lambda setting, sections: plan_module.extension_tasks(setting))
    elif ending == "SIGTERM":
        fake_plan.append(Task("parity", "terminated", 0.01, started_then(lambda: os.kill(os.getpid(), signal.SIGTERM))))
    else:
        fake_plan.append(Task("parity", "quick", 0.01, started_then(lambda: None)))
    code = runner.main(["--dry-run", "--out", str(tmp_path / "out"), "--time-limit", "3"])
    data, _ = _reports(tmp_path / "out")
    assert code == (gpu_check.EXIT_OK if ending == "the plan's end" else gpu_check.EXIT_INCOMPLETE)
    if ending == "the watchdog":
        assert "during extension / topk_patch_aggregate" in data["skipped"][0]["reason"]
    assert data["extension_build"]["status"] == "stopped"
    build, compiler = map(int, pids.read_text().split())
    deadline = time.monotonic() + 5  # the compiler, orphaned, ends once its SIGTERM is delivered
    while still_running(compiler) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not still_running(build) and not still_running(compiler)


@pytest.mark.parametrize("given", [None, "8.0"])
def test_the_background_build_sees_no_gpu_and_compiles_for_this_runs(monkeypatch, given):
    """A second CUDA context would take memory from the sections measured (or, in exclusive-process mode, the
    GPU from this run); so the build sees no GPU and is told the architectures, the list this process's own
    load then uses too (a list the user set stays)."""
    from mulclip_fast.ops import extension

    # start_extension_build sets TORCH_CUDA_ARCH_LIST in this process: in a copy, so that it ends with the test
    monkeypatch.setattr(os, "environ", os.environ.copy())
    show = "import os; print(repr(os.environ['CUDA_VISIBLE_DEVICES']), os.environ['TORCH_CUDA_ARCH_LIST'])"
    monkeypatch.setattr(background_build, "COMMAND", (sys.executable, "-c", show))
    monkeypatch.setattr(extension, "cuda_buildable", lambda: True)
    monkeypatch.setattr(extension, "cuda_arch_list_for_visible_gpus", lambda: "9.0+PTX")
    if given is None:
        monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    else:
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", given)
    build = background_build.start_extension_build(cuda=True)
    build.wait()
    expected = given or "9.0+PTX"
    assert build.record()["output_tail"] == f"'' {expected}\n" and build.record()["status"] == "built"
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == expected


def test_peaks_follow_from_the_sm_count_the_clocks_and_the_architecture(monkeypatch):
    """An H100 SXM (132 SMs at 1980 MHz, 5120-bit HBM3 at 2619 MHz): 67 TFLOP/s fp32, 1070 TFLOP/s bf16 dense at
    that clock, 3.35 TB/s."""
    from types import SimpleNamespace

    from mulclip_fast.gpu_check import peaks

    props = SimpleNamespace(name="NVIDIA H100 80GB HBM3", major=9, minor=0, multi_processor_count=132)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    nvml = {"available": True, "sm_clock_max_mhz": 1980, "memory_clock_max_mhz": 2619, "memory_bus_width_bits": 5120}
    monkeypatch.setattr(peaks, "nvml_telemetry", lambda index: dict(nvml))
    got = peaks.device_peaks(0)
    assert got["flops_per_s"]["fp32"] == pytest.approx(66.9e12, rel=1e-3)
    assert got["flops_per_s"]["half"] == pytest.approx(1070.5e12, rel=1e-3)
    assert got["bytes_per_s"] == pytest.approx(3.352e12, rel=1e-3)
    assert peaks.peak_kind(torch.float32) == "fp32" and peaks.peak_kind(torch.bfloat16) == "half"
    # without NVML the peaks are unknown and the report says why
    monkeypatch.setattr(peaks, "nvml_telemetry", lambda index: {"available": False, "reason": "NVML could not start"})
    unknown = peaks.device_peaks(0)
    assert unknown["flops_per_s"] is None and unknown["bytes_per_s"] is None and unknown["reason"]
    # NVML up, but a counter the GPU (or a VM's driver) does not expose reads None: the report says which
    monkeypatch.setattr(peaks, "nvml_telemetry", lambda index: {**nvml, "sm_clock_max_mhz": None})
    no_clock = peaks.device_peaks(0)
    assert no_clock["flops_per_s"] is None and "sm_clock_max_mhz" in no_clock["reason"]
    assert no_clock["bytes_per_s"] == pytest.approx(3.352e12, rel=1e-3)
    monkeypatch.setattr(peaks, "nvml_telemetry", lambda index: {**nvml, "memory_bus_width_bits": None})
    no_bus = peaks.device_peaks(0)
    assert no_bus["bytes_per_s"] is None and "memory_bus_width_bits" in no_bus["reason"] and no_bus["flops_per_s"]
    # the report's line says what each fraction is of, and what is unknown
    from mulclip_fast.gpu_check.runner import peaks_line

    assert peaks_line(got) == (
        "**Peaks** (NVIDIA H100 80GB HBM3, 132 SMs, max SM clock 1980 MHz): fp32 66.9 TFLOP/s, tf32 535.3 TFLOP/s, "
        "half 1070.5 TFLOP/s, memory 3.35 TB/s"
    )
    assert peaks_line(no_clock).startswith("**Peaks** (NVIDIA H100 80GB HBM3, 132 SMs, max SM clock unknown): memory")
    assert peaks_line(unknown).endswith("max SM clock unknown): none known (NVML could not start)")


def test_untimed_launches_run_the_first_allowed_config_without_benchmarking():
    """At the scale section's shapes one launch takes seconds, and the tuner would run each allowed config 8
    times or more on a key it has not seen; the check needs one run of any config (the offsets that pass 2^31
    are the same whichever tile computes them)."""
    import triton

    from mulclip_fast.gpu_check import configs as tuning

    small, large, fp32 = (triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((32, 4), (64, 8), (16, 4)))
    tuner = _Triton36Tuner(
        [small, large, fp32], lambda configs, nargs, **kw: configs[:2] if nargs["n"] < 100 else [fp32]
    )
    with tuning.untimed({"k": tuner}):
        tuner.run("x", 4096, grid=(1,))
        tuner.run("x", 5, grid=(1,))
    assert tuner.launched == [fp32, small] and tuner.benchmarked == []
    assert tuner.configs == [small, large, fp32] and "run" not in vars(tuner)
    tuner.run("x", 5, grid=(1,))  # outside the block the tuner tunes again
    assert tuner.benchmarked == [small, large]


def test_the_scale_section_launches_untimed(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def untimed(kernels):
        entered.append(sorted(kernels))
        yield

    monkeypatch.setattr(plan_module.tuning, "untimed", untimed)
    setting = plan_module.Setting(device=torch.device("cpu"), dry=True, compile_backend="aot_eager")
    record = plan_module._scale_task(setting, "pairwise_reconstruction_scores").run()
    assert record["ok"] and entered == [sorted(autotuned_kernels())]


# ----------------------------------------------------------------------------------------------------
# Paths only a CUDA machine takes, checked without one (the plan is built, nothing touches a GPU)


class _Triton36Tuner:
    """What pinning meets in Triton 3.6's ``Autotuner.run`` (the lent H200's Triton): on a key it has not tuned
    it benchmarks every config the prune leaves, a single one included (later Triton launches a lone pruned
    config without timing it); with one config in its list it launches that one, untimed."""

    arg_names = ["x", "n"]

    def __init__(self, configs, prune):
        self.configs, self.all_configs, self.early_config_prune = list(configs), list(configs), prune
        self.cache, self.benchmarked, self.launched = {}, [], []

    def run(self, *args, **kwargs):
        self.nargs = dict(zip(self.arg_names, args, strict=False))
        if len(self.configs) > 1:
            key = (self.nargs["n"],)
            if key not in self.cache:
                pruned = self.early_config_prune(self.configs, self.nargs, **kwargs)
                self.benchmarked += pruned  # each config: compiled, then run 8 or more times under do_bench
                self.cache[key] = pruned[0]
            config = self.cache[key]
        else:
            config = self.configs[0]
        self.best_config = config
        self.launched.append(config)


def test_a_pinned_config_is_launched_without_benchmarking_on_triton_3_6():
    """On a Triton that benchmarks a lone pruned config (3.6), pinning by pruning alone would time every pinned
    launch (do_bench: hundreds of runs, a few tenths of a second each), several minutes over the sweep."""
    import triton

    from mulclip_fast.gpu_check import configs as tuning

    small, large, fp32 = (triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((32, 4), (64, 8), (16, 4)))
    # the kernel's own prune: the half configs for n < 100, the fp32 one otherwise
    tuner = _Triton36Tuner(
        [small, large, fp32], lambda configs, nargs, **kw: configs[:2] if nargs["n"] < 100 else [fp32]
    )
    with tuning.LaunchRecorder({"k": tuner}) as recorder, tuning.pinned(tuner, large) as state:
        tuner.run("x", 5, grid=(1,))
        tuner.run("x", 7, grid=(1,))
        tuner.run("x", 500, grid=(1,))  # a launch the pinned config does not serve: the prune's own first choice
    assert tuner.launched == [large, large, fp32] and tuner.benchmarked == []
    assert (state.served, state.not_served) == (2, 1)
    assert [cfg for _, cfg in recorder.launches] == [tuning.config_label(c) for c in (large, large, fp32)]
    # restored: the full list, the kernel's own prune, and the class's run (the recorder's wrapper is gone too)
    assert tuner.configs == [small, large, fp32] and "run" not in vars(tuner)
    assert tuner.early_config_prune(tuner.configs, {"n": 5}) == [small, large]
    with pytest.raises(tuning.NotServed), tuning.pinned(tuner, fp32):
        tuner.run("x", 5, grid=(1,))  # the first launch is one fp32 does not serve: the call is abandoned
    assert len(tuner.launched) == 3 and tuner.configs == [small, large, fp32]


# ----------------------------------------------------------------------------------------------------


def test_parity_checks_the_small_shape_in_every_dtype_before_the_paper_shape():
    """A first GPU run compiles every kernel afresh, so its parity share runs out long before the section's own
    estimate says: what it leaves out must be a second shape, never the tensor-core (bf16, fp16) code paths,
    which the interpreter cannot check and fp32's IEEE dots do not take."""
    setting = plan_module.Setting(device=torch.device("cuda"), dry=False, compile_backend="inductor")
    tasks = plan_module.parity_tasks(setting)
    shapes = [task.name.split()[1] for task in tasks]
    first_paper = shapes.index("paper")
    assert set(shapes[first_paper:]) == {"paper"}
    assert {task.context["dtype"] for task in tasks[:first_paper]} == {"float32", "bfloat16", "float16"}


@pytest.mark.parametrize(("device", "dry"), [("cpu", True), ("cuda", True), ("cuda", False)])
def test_the_extension_section_asks_for_the_backend_of_its_tensors_device(device, dry):
    """``--dry-run`` on a CUDA machine runs its tiny shapes on the GPU: the extension's backend must be the one
    that takes CUDA tensors (``cpp`` refuses them, and the refusal would be a crash that ends the run)."""
    from mulclip_fast.ops._dispatch import resolve_backend

    setting = plan_module.Setting(device=torch.device(device), dry=dry, compile_backend="aot_eager")
    tasks = plan_module.extension_tasks(setting)
    assert tasks
    for task in tasks:
        assert resolve_backend(task.context["backend"], setting.device) == task.context["backend"]


def test_the_scale_section_hands_cached_blocks_back_before_it_reads_free_memory(monkeypatch):
    """cudaMemGetInfo counts the caching allocator's blocks as used: read after earlier sections (two ViT-B/16
    trainers, the paper-shape timings) without ``empty_cache``, an H200 that fits the 4096-batch case is skipped."""
    import gc

    calls = []
    monkeypatch.setattr(gc, "collect", lambda: calls.append("collect"))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))

    def mem_get_info(device=None):
        calls.append("mem_get_info")
        return 2**30, 2**37  # 1 GiB free: the case does not fit, so the task returns before any CUDA tensor

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    setting = plan_module.Setting(device=torch.device("cuda"), dry=False, compile_backend="inductor")
    record = plan_module._scale_task(setting, "pairwise_maxsim").run()
    assert record["ok"] and "GiB free" in record["skipped"]
    assert calls == ["collect", "empty_cache", "mem_get_info"]


@pytest.mark.parametrize("code", [runner.EXIT_CRASHED, runner.EXIT_OK])
def test_a_crashed_run_leaves_without_the_interpreters_teardown(monkeypatch, code):
    # After a sticky CUDA error the teardown can abort with 134, replacing the report's exit status; a crashed
    # run therefore leaves by os._exit once its report is written. (The abort itself needs a GPU to show.)
    monkeypatch.setattr(runner, "main", lambda: code)
    left = []

    def fake_exit(status):
        left.append(status)
        raise SystemExit(status)

    monkeypatch.setattr(os, "_exit", fake_exit)
    with pytest.raises(SystemExit) as ended:
        runpy.run_module("mulclip_fast.gpu_check", run_name="__main__")
    assert ended.value.code == code and left == ([code] if code == runner.EXIT_CRASHED else [])


def test_the_command_line_imports_no_triton_before_the_interpreter_is_decided():
    # runner.main parses its arguments (which imports the plan, for its section names) before it sets
    # TRITON_INTERPRET on a machine without CUDA; Triton imported before that would run no kernel there.
    code = "import sys; from mulclip_fast.gpu_check import runner; runner._parser(); print('triton' in sys.modules)"
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    completed = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert completed.stdout.strip() == "False", completed.stderr[-2000:]
