"""The scripts in ``examples/`` run end to end on a CPU with short settings, as subprocesses (as a user runs them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(script: str, *args: str, timeout: int = 300) -> dict:
    """Run an example; return the JSON summary it prints last."""
    # Tiny shapes: one thread is fastest, and on a loaded 2-core machine more threads spin against each
    # other (the fine-tuning example took 58 s with 2 threads and 1 s with 1 under a load of 10).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, timeout=timeout, env=env
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


def test_finelip_example_fused_op_matches_and_uses_less_memory():
    summary = run_example("finelip_fused_late_interaction.py", "--batch", "12", "--words", "24", "--patches", "17")
    assert summary["max_score_diff"] < 1e-5 and summary["max_grad_diff"] < 1e-5, summary  # DESIGN §5, fp32
    # The naive version holds the [B, B, W, P] similarities (and their LeakyReLU, mask and argmax) for
    # backward: at least that tensor's 12·12·24·17·4 bytes more than the fused op.
    assert summary["naive_peak_bytes"] - summary["fused_peak_bytes"] > 12 * 12 * 24 * 17 * 4, summary


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("finetune_hf_clip.py", ["--batch-size", "1"], "--batch-size must be >= 2"),
        ("finelip_fused_late_interaction.py", ["--batch", "1"], "--batch is too small"),
    ],
)
def test_examples_reject_bad_arguments(script, args, message):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2 and message in result.stderr, result.stderr
