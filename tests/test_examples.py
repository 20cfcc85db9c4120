"""The scripts in ``examples/`` run end to end on a CPU with short settings, as subprocesses (as a user runs them)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
    assert summary["max_score_diff"] < 1e-5 and summary["max_grad_diff"] < 1e-5, summary  # docs/kernels.md, fp32
    # The naive version holds the [B, B, W, P] similarities (and their LeakyReLU, mask and argmax) for
    # backward: at least that tensor's 12·12·24·17·4 bytes more than the fused op.
    assert summary["naive_peak_bytes"] - summary["fused_peak_bytes"] > 12 * 12 * 24 * 17 * 4, summary


def test_finelip_example_stops_when_the_fused_op_disagrees():
    # The script said it checks that both agree, but only printed the differences.
    spec = importlib.util.spec_from_file_location("finelip_example", EXAMPLES / "finelip_fused_late_interaction.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    scores, grads = torch.rand(3, 3), (torch.rand(3, 4, 8), torch.rand(3, 5, 8))
    example.check_agreement((scores, grads), (scores + 1e-6, grads))  # within atol 1e-5
    with pytest.raises(SystemExit, match="image gradient differ"):
        example.check_agreement((scores, grads), (scores, (grads[0], grads[1] + 1e-3)))


@pytest.mark.slow
def test_binding_diagnostic_oracle_trains_one_tower_against_binding_aware_codes():
    summary = run_example(
        "binding_diagnostic.py", "--pairs", "8", "oracle", "--tower", "text", "--steps", "4", "--batch-size", "4"
    )
    assert summary["tower"] == "text" and summary["steps"] == 4 and summary["pairs"] == 8, summary
    assert summary["text_alibi"] == 1, summary  # the tiny preset's text tower, unless --text-alibi 0
    # The codes are binding-aware: swapping two objects' colours changes every scene's code.
    assert summary["probe_codes_differ"] == 1.0, summary
    assert 0 <= summary["binding_acc"] <= 1 and 0 <= summary["r5_against_codes"] <= 1, summary


@pytest.fixture
def fresh_tiny_checkpoint(tmp_path):
    """An untrained tiny model saved in the OpenAI layout (load it with ``--preset tiny``)."""
    import torch

    from mulclip_fast.model.clip import CLIP, preset_config

    torch.manual_seed(0)
    checkpoint = tmp_path / "tiny.pt"
    torch.save(CLIP(preset_config("tiny")).state_dict(), checkpoint)
    return str(checkpoint)


def test_binding_diagnostic_twin_cosines(fresh_tiny_checkpoint):
    summary = run_example(
        "binding_diagnostic.py", "--pairs", "6", "twins", "--checkpoint", fresh_tiny_checkpoint, "--preset", "tiny"
    )
    # A caption and its colour-swapped probe share every word, so even an untrained text tower puts them
    # closer together than two unrelated captions.
    assert summary["cos_caption_probe"] > summary["cos_caption_unrelated"], summary
    assert summary["cos_image_twin_image"] > summary["cos_image_unrelated"], summary
    assert 0 <= summary["binding_acc"] <= 1, summary


def test_binding_diagnostic_attention_sees_the_alibi_recency_heads(fresh_tiny_checkpoint):
    summary = run_example(
        "binding_diagnostic.py", "--pairs", "4", "attention", "--checkpoint", fresh_tiny_checkpoint, "--preset", "tiny"
    )
    previous = summary["previous_word_attention"]
    assert summary["text_alibi"] and summary["shape_words"] > 0 and len(previous) == 4 and len(previous[0]) == 4
    # Untrained, attention follows the biases: the slope-1/4 head puts ~(1 - e^(-1/4))·e^(-1/4) ≈ 0.17 on the
    # previous word, the slope-1/256 head about what an even spread over the prefix gives.
    assert previous[0][0] > 4 * summary["even_spread"], summary
    assert previous[0][3] < 2 * summary["even_spread"], summary


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("finetune_hf_clip.py", ["--batch-size", "1"], "--batch-size must be >= 2"),
        ("finelip_fused_late_interaction.py", ["--batch", "1"], "--batch is too small"),
        ("binding_diagnostic.py", ["oracle", "--tower", "image", "--steps", "0"], "--steps must be >= 1"),
    ],
)
def test_examples_reject_bad_arguments(script, args, message):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2 and message in result.stderr, result.stderr
