"""The suite cleans up after itself on disk.

The training tests each write a few ~80 MB checkpoints (the tiny model's 49,408-token embedding and its
Adam moments), about 5 GB over a run; pytest's default keeps every test's directory and the last three
runs, 16 GB, which once filled the shared disk CI runs on. The project's pytest settings remove a passing
test's directory at its teardown and keep a failing one's for debugging: checked here on an inner pytest
run under those settings.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

INNER_TESTS = """
from pathlib import Path

RECORD = Path({record!r})


def _write_and_record(tmp_path, name):
    (tmp_path / "checkpoint.pt").write_bytes(bytes(1024))
    (RECORD / name).write_text(str(tmp_path))


def test_passes(tmp_path):
    _write_and_record(tmp_path, "passed")


def test_fails(tmp_path):
    _write_and_record(tmp_path, "failed")
    assert False, "kept for debugging"
"""


def test_a_passing_tests_directory_is_removed_and_a_failing_ones_kept(tmp_path):
    record = tmp_path / "record"
    record.mkdir()
    inner = tmp_path / "inner"
    inner.mkdir()
    (inner / "test_inner.py").write_text(INNER_TESTS.format(record=str(record)))
    settings = ["-c", str(ROOT / "pyproject.toml"), "--rootdir", str(inner), "-p", "no:cacheprovider"]
    command = [sys.executable, "-m", "pytest", *settings, "--basetemp", str(tmp_path / "basetemp"), "-q"]
    run = subprocess.run([*command, "test_inner.py"], cwd=inner, capture_output=True, text=True, timeout=120)
    assert "1 failed, 1 passed" in run.stdout, run.stdout + run.stderr
    passed_dir = Path((record / "passed").read_text())
    failed_dir = Path((record / "failed").read_text())
    assert not passed_dir.exists(), f"a passing test's directory was kept: {passed_dir}"
    assert (failed_dir / "checkpoint.pt").exists(), f"a failing test's directory was removed: {failed_dir}"
