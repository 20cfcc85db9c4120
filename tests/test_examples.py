"""The scripts in ``examples/`` run end to end on a CPU with short settings, as subprocesses (as a user runs them)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(script: str, *args: str, timeout: int = 300) -> dict:
    """Run an example; return the JSON summary it prints last."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_finetune_hf_clip_example_reduces_the_mulclip_loss():
    pytest.importorskip("transformers", reason="transformers is in the dev extra; install '.[dev]'")
    summary = run_example(
        "finetune_hf_clip.py",
        *("--steps", "6", "--batch-size", "4", "--batches-per-pass", "1", "--width", "32", "--lr", "2e-3"),
        "--backend",
        "auto",
    )
    assert summary["steps"] == 6
    # One batch, seen six times: the MulCLIP loss of the last step is below the first.
    assert summary["last_pass_loss"] < summary["first_pass_loss"], summary


def test_examples_reject_bad_arguments():
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "finetune_hf_clip.py"), "--batch-size", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "--batch-size must be >= 2" in result.stderr
