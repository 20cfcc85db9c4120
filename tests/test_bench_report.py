"""The benchmark report on a hand-made results file, and machine facts / NVML when NVML is absent."""

from __future__ import annotations

import json
import sys
import time
import types

import pytest
import torch

from benchmarks import test_bench_train_step as _train_step_benchmark
from benchmarks.harness import largest_batch_within, raise_recompile_limits
from mulclip_fast import bench_report
from mulclip_fast.profiling import NvmlSampler, _nvml_handle, machine_facts, nvml_telemetry

MACHINE = {
    "timestamp_utc": "2026-01-01T00:00:00+00:00",
    "device": "cpu",
    "cpu_model": "Test CPU",
    "cpu_affinity": 2,
    "torch_threads": 2,
    "torch": "2.13.0",
    "triton": "3.9.0",
    "matmul": {
        "n": 2048,
        "dtype": "float32",
        "seconds": 0.2,
        "flops_per_s": 5e10,
        "best_seconds": 0.1,
        "best_flops_per_s": 1e11,
    },
    "nvml": {"available": False, "reason": "NVML could not start: test"},
}


def _op(backend, mode, median_s, peak_bytes, flops=None):
    return {
        "op": "wpr_loss",
        "backend": backend,
        "mode": mode,
        "shape": "B=4 P=8 K=8 d=16",
        "median_s": median_s,
        "peak_bytes": peak_bytes,
        "fraction_of_mm": None if flops is None else flops / median_s / 1e11,
    }


def _step(op, backend, median_s, peak_bytes, **extra):
    return {"op": op, "backend": backend, "mode": "train-step", "shape": "tiny mulclip B=32", **extra} | {
        "median_s": median_s,
        "peak_bytes": peak_bytes,
    }


RESULTS = [
    _op("reference", "forward+backward", 0.040, 100 * 2**20, flops=2e9),
    _op("torch", "forward+backward", 0.020, 10 * 2**20, flops=2e9),
    _op("compile", "forward+backward", 0.080, 50 * 2**20, flops=2e9),
    _step("train_step[mulclip]", "reference", 2.0, 400 * 2**20),
    _step("train_step[mulclip]", "fast", 1.0, 300 * 2**20),
    # As older results files have them: the preset in shape_dims only, no peaks or probes.
    {
        **_step("train_step_max_batch[finelip]", "reference", 1.0, 1, max_batch=24),
        "shape_dims": {"preset": "tiny"},
        "memory_budget_bytes": 512 * 2**20,
    },
    {
        **_step("train_step_max_batch[finelip]", "fast", 1.0, 1, max_batch=96),
        "shape_dims": {"preset": "tiny"},
        "memory_budget_bytes": 512 * 2**20,
        "max_batch_capped": False,
    },
    # The same objective at a second preset and budget: its own row, with the batches both searches probed.
    *(
        {
            **_step("train_step_max_batch[finelip]", backend, 1.0, 1, max_batch=batch),
            "shape_dims": {"preset": "vit-b-16 (depth 1)"},
            "preset": "vit-b-16 (depth 1)",
            "memory_budget_bytes": 2 * 2**30,
            "max_batch_peak_bytes": peak,
            "max_batch_over": over,
            "max_batch_probes": probes,
        }
        for backend, batch, peak, over, probes in (
            ("reference", 14, 1900 * 2**20, 15, [[4, 400 * 2**20], [8, 700 * 2**20], [16, 2300 * 2**20]]),
            ("fast", 74, 2000 * 2**20, 83, [[4, 400 * 2**20], [8, 490 * 2**20], [32, 1050 * 2**20]]),
        )
    ),
]


@pytest.fixture
def results_dir(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    older = {"machine": {**MACHINE, "cpu_model": "Older CPU"}, "results": RESULTS[:1]}
    (folder / "bench-cpu-20250101T000000Z.json").write_text(json.dumps(older))
    (folder / "bench-cpu-20260101T000000Z.json").write_text(json.dumps({"machine": MACHINE, "results": RESULTS}))
    return folder


def test_ratio_rows_compare_each_backend_with_the_reference():
    rows = {r["backend"]: r for r in bench_report.op_rows(RESULTS)}
    assert set(rows) == {"torch", "compile"}
    assert rows["torch"]["time_ratio"] == pytest.approx(0.5)
    assert rows["torch"]["memory_ratio"] == pytest.approx(0.1)
    assert rows["compile"]["time_ratio"] == pytest.approx(2.0)
    assert rows["torch"]["fraction_of_mm"] == pytest.approx(1.0)  # 2e9 FLOP in 20 ms = 1e11 FLOP/s
    (step,) = bench_report.train_rows(RESULTS)
    assert step["time_ratio"] == pytest.approx(0.5) and step["memory_ratio"] == pytest.approx(0.75)
    largest, vit = bench_report.max_batch_rows(RESULTS)
    assert (largest["objective"], largest["preset"], largest["ref_batch"], largest["batch"]) == (
        "finelip",
        "tiny",
        24,
        96,
    )
    assert largest["batch_ratio"] == pytest.approx(4.0)
    assert (vit["preset"], vit["budget_bytes"], vit["ref_over"], vit["over"]) == ("vit-b-16 (depth 1)", 2**31, 15, 83)
    assert vit["batch_ratio"] == pytest.approx(74 / 14)
    probes = bench_report.probe_rows(RESULTS)
    assert [(r["B"], r["ref_peak_bytes"] >> 20, r["peak_bytes"] >> 20) for r in probes] == [
        (4, 400, 400),
        (8, 700, 490),
    ]
    assert probes[1]["memory_ratio"] == pytest.approx(0.7)


def test_cli_reads_the_newest_file_prints_tables_and_draws_plots(results_dir, tmp_path, capsys):
    plots = tmp_path / "plots"
    assert bench_report.main([str(results_dir), "--plots", str(plots)]) == 0
    out = capsys.readouterr().out
    assert "Test CPU" in out and "Older CPU" not in out  # newest file per device only
    assert "NVML: absent (NVML could not start: test)" in out
    torch_line = next(line for line in out.splitlines() if line.startswith("wpr_loss") and " torch " in line)
    assert "0.50" in torch_line and "0.100" in torch_line  # time and memory ratios
    assert "100.0" in torch_line  # % of the measured mm throughput
    assert any(line.startswith("finelip") and "4.00" in line for line in out.splitlines())
    written = sorted(p.name for p in plots.glob("*.png"))
    assert written == [
        "bench-cpu-20260101T000000Z-ops-forward_backward.png",
        "bench-cpu-20260101T000000Z-train-step.png",
    ]
    assert all((plots / name).stat().st_size > 1000 for name in written)


def test_each_table_says_what_its_figures_are(results_dir, capsys):
    """Times are medians, memory is the exact peak, and % of mm is the fastest round against the fastest
    torch.mm (not the median the time columns show): the lines above the tables say so."""
    assert bench_report.main([str(results_dir), "--no-plots"]) == 0
    out = capsys.readouterr().out
    ops_line = next(line for line in out.splitlines() if line.startswith("Ops ("))
    assert "median time" in ops_line and "exact peak memory" in ops_line
    assert "% of mm: the op's FLOP/s in its fastest round over the fastest torch.mm's" in ops_line
    step_line = next(line for line in out.splitlines() if line.startswith("Training step at equal batch"))
    assert "median time" in step_line and "exact peak memory" in step_line


def test_markdown_tables(results_dir, capsys):
    assert bench_report.main([str(results_dir), "--markdown", "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "| op | mode | shape | backend |" in out
    assert "| tiny mulclip B=32 | 2000 | 1000 | 0.50 | 400.0 | 300.0 | 0.750 |" in out


def test_markdown_largest_batch_tables(results_dir, capsys):
    assert bench_report.main([str(results_dir), "--markdown", "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "| finelip | vit-b-16 (depth 1) | 2048 | 14 | 74 | 5.29 | 1900.0 | 2000.0 | 15 / 83 |" in out
    assert "| finelip | tiny | 512 | 24 | 96 | 4.00 | — | — | — / — |" in out
    assert "| finelip | vit-b-16 (depth 1) | 8 | 700.0 | 490.0 | 0.700 |" in out


def test_a_search_stopped_at_its_limit_is_marked_as_a_bound(capsys):
    """A search that reached its batch limit found a lower bound, not the largest batch: the batch and the
    ratio it enters say so, on either path (the reference's was printed as if it were the answer)."""

    def searched(backend, batch, capped):
        return {
            **_step("train_step_max_batch[finelip]", backend, 1.0, 1, max_batch=batch),
            "preset": "tiny",
            "memory_budget_bytes": 2**31,
            "max_batch_capped": capped,
        }

    for (ref_capped, fast_capped), cells in {
        (False, True): "| 1024 | >=4096 | >=4.00 |",
        (True, False): "| >=4096 | 1024 | <=0.25 |",
        (True, True): "| >=4096 | >=4096 | — |",
    }.items():
        ref_batch, fast_batch = (4096 if ref_capped else 1024), (4096 if fast_capped else 1024)
        results = [searched("reference", ref_batch, ref_capped), searched("fast", fast_batch, fast_capped)]
        assert cells in bench_report.render({"machine": MACHINE, "results": results}, markdown=True)


def _largest(budget, peak_of, **kwargs):
    calls = []

    def counted(batch):
        calls.append(batch)
        return peak_of(batch)

    return largest_batch_within(budget, counted, **kwargs), calls


@pytest.mark.parametrize(
    ("peak_of", "budget"),
    [
        (lambda b: 300 + 23 * b, 2048),  # a fast step: linear in the batch
        (lambda b: 396 if b <= 4 else 303 + 23 * b + 7 * b * b, 2048),  # naive all-pairs: quadratic
        (lambda b: 60 + 17 * b, 256),
        (lambda b: int(2 ** (b / 10)), 10**6),  # faster than any parabola
        (lambda b: 0 if b < 37 else 10, 5),  # a step: no model predicts it
        (lambda b: int(1000 * b**0.5), 30_000),  # slower than a line
    ],
)
def test_largest_batch_search_brackets_the_budget_within_an_eighth(peak_of, budget):
    found, calls = _largest(budget, peak_of)
    assert found.batch > 0 and not found.capped
    assert peak_of(found.batch) <= budget < peak_of(found.over)
    assert 0 < found.over - found.batch <= max(1, found.batch // 8)
    assert found.peak == peak_of(found.batch) and list(found.probes) == calls and len(set(calls)) == len(calls)
    assert len(calls) <= 20


def test_largest_batch_search_needs_few_large_steps():
    # A step whose peak is linear in the batch: two small probes predict the answer, and the search
    # measures at most one batch above it (the one that closes the bracket).
    found, calls = _largest(2048, lambda b: 300 + 23 * b)
    assert found.batch == 76 and found.over == 85
    assert sorted(calls)[-3:] == [32, 76, 85]
    # Never more than max_growth times the largest batch that fitted, even if a model predicts more.
    _, calls = _largest(10**9, lambda b: b, limit=64, max_growth=4)
    assert calls == [4, 8, 32, 64]  # doubling until two measurements make a model


def test_a_training_step_measures_the_same_peak_every_time():
    """A step's peak is counted from where the previous step left memory. If the previous step's gradients
    are still held, an allocator that sees them freed (CUDA's; the CPU allocator's events once they were
    allocated while it was watching, as in consecutive probes of a batch search) subtracts them from this
    step's peak: the second measure of the same step came out lower by the gradients' bytes."""
    trainer = _train_step_benchmark._trainer("tiny", "mulclip", "fast")
    first = _train_step_benchmark._step_peak(trainer, 2)
    assert all(p.grad is None for p in trainer.model.parameters())  # the step released its gradients
    assert _train_step_benchmark._step_peak(trainer, 2) == first


def test_largest_batch_search_edges():
    found, calls = _largest(100, lambda b: 1000)
    assert (found.batch, found.peak, found.over, found.capped, calls) == (0, 0, 4, False, [4])
    found, _ = _largest(10**12, lambda b: b, limit=4096)
    assert (found.batch, found.over, found.capped) == (4096, None, True)


def test_bad_inputs_are_reported_with_the_path(tmp_path, capsys):
    assert bench_report.main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert bench_report.main([str(tmp_path)]) == 2
    assert "no bench-<device>-<time>.json" in capsys.readouterr().err
    bad = tmp_path / "bench-cpu-x.json"
    bad.write_text(json.dumps({"results": []}))
    assert bench_report.main([str(bad)]) == 2
    assert str(bad) in capsys.readouterr().err


def test_nvml_absent_is_reported_not_raised(monkeypatch):
    pynvml = pytest.importorskip("pynvml")

    def fail():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", fail)
    telemetry = nvml_telemetry()
    assert telemetry["available"] is False and "NVML could not start" in telemetry["reason"]
    with NvmlSampler() as sampler:
        pass
    assert sampler.summary()["available"] is False
    facts = machine_facts("cpu")
    assert facts["nvml"]["available"] is False
    assert facts["torch"] == torch.__version__ and facts["cpu_count"] >= 1 and facts["cpu_model"]


def test_nvml_package_missing_is_reported(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    assert nvml_telemetry() == {"available": False, "reason": "nvidia-ml-py (pynvml) is not installed"}
    with NvmlSampler() as sampler:
        pass
    assert sampler.summary() == {"available": False, "reason": "nvidia-ml-py (pynvml) is not installed"}


class _FakeNVMLError(Exception):
    pass


def _fake_pynvml(power_mw: int = 250_000, unsupported=()):
    """A stand-in for nvidia-ml-py on a machine with one GPU, so the telemetry path runs without one."""

    def counter(name, value):
        def read(*_args):
            if name in unsupported:
                raise _FakeNVMLError(f"{name} not supported")
            return value

        return read

    return types.SimpleNamespace(
        NVMLError=_FakeNVMLError,
        NVML_CLOCK_SM=0,
        NVML_CLOCK_MEM=1,
        NVML_TEMPERATURE_GPU=0,
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetHandleByIndex=lambda index: f"gpu{index}",
        nvmlDeviceGetName=counter("name", b"Fake H100"),
        nvmlSystemGetDriverVersion=counter("driver", "580.1"),
        nvmlDeviceGetMemoryInfo=counter("memory", types.SimpleNamespace(used=2**30, total=80 * 2**30)),
        nvmlDeviceGetUtilizationRates=counter("utilization", types.SimpleNamespace(gpu=97, memory=40)),
        nvmlDeviceGetPowerUsage=counter("power", power_mw),
        nvmlDeviceGetEnforcedPowerLimit=counter("power_limit", 700_000),
        nvmlDeviceGetClockInfo=counter("clock", 1980),
        nvmlDeviceGetMaxClockInfo=counter("max_clock", 1980),
        nvmlDeviceGetTemperature=counter("temperature", 50),
    )


def test_nvml_telemetry_reads_every_counter_and_tolerates_unsupported_ones(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(unsupported=("power",)))
    telemetry = nvml_telemetry()
    assert telemetry["available"] is True and telemetry["name"] == "Fake H100"
    assert telemetry["memory_total_bytes"] == 80 * 2**30 and telemetry["gpu_utilization_pct"] == 97
    assert telemetry["power_w"] is None and telemetry["power_limit_w"] == pytest.approx(700.0)
    assert telemetry["sm_clock_mhz"] == 1980 and telemetry["driver_version"] == "580.1"


def test_nvml_calls_a_binding_no_longer_has_are_missing_counters_not_errors(monkeypatch):
    """nvidia-ml-py 13 marks nvmlDeviceGetMemoryInfo and nvmlDeviceGetTemperature "removed in CUDA 14": a binding
    without them must leave those counters None, not end the GPU check before its first task."""
    fake = _fake_pynvml()
    del fake.nvmlDeviceGetMemoryInfo, fake.nvmlDeviceGetTemperature
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    telemetry = nvml_telemetry()
    assert telemetry["memory_total_bytes"] is None and telemetry["temperature_c"] is None
    assert telemetry["power_w"] == pytest.approx(250.0) and telemetry["memory_bus_width_bits"] is None
    with NvmlSampler(interval_s=0.001) as sampler:
        for _ in range(5000):  # two rounds of the sampling thread: the first did not end it
            if len(sampler.samples) >= 2:
                break
            time.sleep(0.001)
    summary = sampler.summary()
    assert summary["samples"] >= 2 and summary["power_w_mean"] == pytest.approx(250.0)
    assert summary["memory_used_bytes_mean"] is None


def test_nvml_sampler_summarises_samples(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml())
    with NvmlSampler(interval_s=0.001) as sampler:
        time.sleep(0.02)
    summary = sampler.summary()
    assert summary["available"] is True and summary["samples"] >= 1
    assert summary["power_w_mean"] == pytest.approx(250.0) and summary["gpu_utilization_pct_max"] == 97


@pytest.mark.parametrize("served", [True, False])
def test_nvml_sampler_reads_the_instantaneous_power_where_nvml_serves_it(monkeypatch, served):
    """On Ampere and newer GPUs nvmlDeviceGetPowerUsage is the mean of the last second, so over a do_bench of
    about 0.1 s it reports mostly what ran before (100 W here) while the GPU draws 400 W. The sampler reads the
    instantaneous field (decoded from the binding's own structure) instead; where the driver does not serve
    it, the one-second mean, and the summary says which it read."""
    pynvml = pytest.importorskip("pynvml")
    fake = _fake_pynvml(power_mw=100_000)

    def field_values(handle, field_ids):
        assert field_ids == [pynvml.NVML_FI_DEV_POWER_INSTANT]
        field = pynvml.c_nvmlFieldValue_t(fieldId=field_ids[0], valueType=pynvml.NVML_VALUE_TYPE_UNSIGNED_INT)
        field.nvmlReturn = pynvml.NVML_SUCCESS if served else pynvml.NVML_ERROR_NOT_SUPPORTED
        field.value.uiVal = 400_000
        return (pynvml.c_nvmlFieldValue_t * 1)(field)

    fake.NVML_SUCCESS = pynvml.NVML_SUCCESS
    fake.NVML_FI_DEV_POWER_INSTANT = pynvml.NVML_FI_DEV_POWER_INSTANT
    fake.nvmlDeviceGetFieldValues = field_values
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    with NvmlSampler(interval_s=0.001) as sampler:
        for _ in range(5000):  # the sampling thread's first round
            if sampler.samples:
                break
            time.sleep(0.001)
    summary = sampler.summary()
    assert summary["power_w_mean"] == pytest.approx(400.0 if served else 100.0)
    assert summary["power_reading"] == ("instantaneous" if served else "mean of the last second")


def test_nvml_reads_the_gpu_cuda_means_by_its_uuid(monkeypatch):
    # Two GPUs, CUDA's order the reverse of NVML's (fastest first, or CUDA_VISIBLE_DEVICES by UUID): CUDA device
    # 0 is NVML's GPU 1. By index the telemetry read the other GPU.
    pynvml = pytest.importorskip("pynvml")
    nvml_uuids = ["GPU-aaaa", "GPU-bbbb"]

    class FakeNvml:
        NVMLError = pynvml.NVMLError

        @staticmethod
        def nvmlDeviceGetHandleByUUID(uuid):
            if uuid not in nvml_uuids:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
            return nvml_uuids.index(uuid)

        @staticmethod
        def nvmlDeviceGetHandleByIndex(index):
            return index

    cuda_uuids = ["bbbb", "aaaa"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(uuid=cuda_uuids[i]))
    assert [_nvml_handle(FakeNvml, i) for i in range(2)] == [1, 0]
    # A UUID NVML does not know (a MIG instance, say): the visible-devices list, then the index.
    cuda_uuids = ["cccc", "dddd"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
    assert [_nvml_handle(FakeNvml, i) for i in range(2)] == [1, 0]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert [_nvml_handle(FakeNvml, i) for i in range(2)] == [0, 1]


def test_recompile_limits_are_raised_under_the_names_this_pytorch_knows():
    """The benchmarks raise Dynamo's recompile limits under the current names where they exist and under the
    old ones on PyTorch 2.6 and older, whose config refuses the new names (a namespace stands in for it)."""
    old = types.SimpleNamespace(cache_size_limit=8, accumulated_cache_size_limit=256)
    raise_recompile_limits(old)
    assert vars(old) == {"cache_size_limit": 256, "accumulated_cache_size_limit": 4096}

    config = torch._dynamo.config
    names = ("recompile_limit", "accumulated_recompile_limit")
    if not hasattr(config, names[0]):
        names = ("cache_size_limit", "accumulated_cache_size_limit")
    saved = [getattr(config, name) for name in names]
    try:
        raise_recompile_limits()
        assert [getattr(config, name) for name in names] == [256, 4096]
    finally:
        for name, value in zip(names, saved, strict=True):
            setattr(config, name, value)
