"""Session fixtures of the benchmark suites: machine facts, the matmul yardstick, the results file."""

from __future__ import annotations

import pytest

from benchmarks.harness import DEVICE, DTYPE, FULL_SWEEP, RESULTS_DIR, raise_recompile_limits, write_results
from mulclip_fast.profiling import machine_facts, matmul_throughput

_RESULTS_KEY = pytest.StashKey[list]()
_MACHINE_KEY = pytest.StashKey[dict]()


def _machine(config: pytest.Config) -> dict:
    if _MACHINE_KEY not in config.stash:
        facts = machine_facts(DEVICE)
        # This machine's own large-GEMM throughput: the yardstick for every "fraction of mm" figure.
        facts["matmul"] = matmul_throughput(DEVICE, DTYPE)
        facts["full_sweep"] = FULL_SWEEP
        config.stash[_MACHINE_KEY] = facts
    return config.stash[_MACHINE_KEY]


@pytest.fixture(scope="session")
def machine(request) -> dict:
    return _machine(request.config)


@pytest.fixture(scope="session")
def results(request) -> list[dict]:
    return request.config.stash.setdefault(_RESULTS_KEY, [])


def pytest_configure(config: pytest.Config) -> None:
    raise_recompile_limits()


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    """Put our machine facts (CPU model, versions, GPU and NVML) into pytest-benchmark's own JSON too."""
    machine_info["mulclip_fast"] = _machine(config)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    records = session.config.stash.get(_RESULTS_KEY, [])
    written = write_results(records, _machine(session.config)) if records else None  # also after each case
    if written is not None:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"benchmark results: {written[0]} and {written[1]} (in {RESULTS_DIR})")
