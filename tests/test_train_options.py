"""Memory and precision options of a training step: bf16 autocast, activation checkpointing, accumulation."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from mulclip_fast.data import Collator, iterate_batches, open_dataset
from mulclip_fast.profiling import measure_peak_memory
from mulclip_fast.train import ConfigError, TrainConfig, Trainer, resolve_config


def _trainer(**overrides) -> Trainer:
    config = resolve_config(
        TrainConfig(
            model_overrides={"vision_layers": 2, "transformer_layers": 2},
            batch_size=8,
            steps=4,
            fine_start=0.0,
            fine_ramp=0.0,
            eval_pairs=0,
            seed=7,
            **{"backend": "torch", **overrides},
        )
    )
    return Trainer(config)


def _batch():
    dataset = open_dataset("synthetic", "train", 64, 64, 7, twin_fraction=0.5)
    return next(iterate_batches(dataset, Collator(8), batch_size=8, seed=7))[2]


def _step_with_peak(trainer: Trainer, batch) -> tuple[dict, int]:
    """Logged values of one step, and the exact peak memory (the CPU allocator's count) of a second step on
    the same batch: the first allocates the optimizer's state, which would otherwise be the peak, and its
    gradients are released before the second, so that their free does not come off its peak."""
    logged = trainer.step(batch, progress=0.5)
    trainer.optimizer.zero_grad(set_to_none=True)
    return logged, measure_peak_memory(lambda: trainer.step(batch, progress=0.5), "cpu")[0]


def test_gradient_checkpointing_keeps_the_step_and_lowers_its_peak_memory():
    batch = _batch()
    # Padded text: at this small shape the packed path's tower activations fall below the loss's own peak,
    # so checkpointing could not lower the step's peak there (docs/training.md, "Memory and precision").
    plain = _trainer(packed_text=False)
    checkpointed = _trainer(grad_checkpointing=True, packed_text=False)
    logged_plain, peak_plain = _step_with_peak(plain, batch)
    logged_ckpt, peak_ckpt = _step_with_peak(checkpointed, batch)
    assert logged_ckpt["loss"] == pytest.approx(logged_plain["loss"], rel=1e-6)
    for (name, a), b in zip(plain.model.named_parameters(), checkpointed.model.parameters(), strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0, msg=name)
    assert peak_ckpt < 0.85 * peak_plain, (peak_ckpt, peak_plain)


def test_accumulation_averages_the_micro_batches():
    batch = _batch()
    reference = _trainer()  # the same initial model, used to score each half on its own
    parts = [batch.shard(micro, 2) for micro in range(2)]
    losses = []
    for part in parts:
        features, logit_scale, _ = reference.compute_features(part, 1.0)
        losses.append(reference.loss_fn(features, logit_scale)["loss"] / 2)
    sum(losses).backward()
    expected_grads = [p.grad.clone() for p in reference.model.parameters() if p.grad is not None]

    accumulated = _trainer(accum_steps=2)
    grads_at_update = []
    optimizer_step = accumulated.optimizer.step

    def record_then_step():
        grads_at_update.extend(p.grad.clone() for p in accumulated.model.parameters() if p.grad is not None)
        optimizer_step()

    accumulated.optimizer.step = record_then_step
    logged = accumulated.step(batch, progress=0.5)
    assert logged["loss"] == pytest.approx(sum(losses).item(), rel=1e-5)
    assert logged["loss"] != pytest.approx(_trainer().step(batch, progress=0.5)["loss"], rel=1e-3)  # fewer negatives
    for got, want in zip(grads_at_update, expected_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_bf16_autocast_step_is_close_to_fp32():
    batch = _batch()
    fp32 = _trainer().step(batch, progress=0.5)
    bf16 = _trainer(precision="bf16").step(batch, progress=0.5)
    for term in ("loss", "global_long", "wpr", "sap"):
        assert bf16[term] == pytest.approx(fp32[term], rel=5e-2), term


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_bf16_autocast_leaves_the_loss_in_fp32(backend):
    """Autocast covers the towers only: the loss of a bf16 step is the fp32 loss of the step's bf16 features.
    Under autocast every matmul of the loss ran in bf16, so the contrastive logits (up to 100) kept about
    three significant digits and the terms came out bf16-rounded, whatever the loss's fp32 accumulation."""
    batch = _batch()
    trainer = _trainer(precision="bf16", backend=backend)
    seen = []
    compute_features = trainer.compute_features

    def record(part, fine_scale):
        seen.append(compute_features(part, fine_scale))
        return seen[-1]

    trainer.compute_features = record
    logged = trainer.step(batch, progress=0.5)
    ((features, logit_scale, _),) = seen
    assert features.image_cls.dtype == torch.bfloat16  # the towers did run in bf16
    with torch.no_grad():
        expected = trainer.loss_fn(features, logit_scale, fine_grained_scale=1.0)
    for term in ("loss", "global_long", "global_short", "wpr", "sap"):
        assert logged[term] == pytest.approx(expected[term].item(), rel=1e-6), term


def test_temperatures_reach_the_loss():
    """``--tau-attn/--tau-contrast`` change WPR and ``--tau-sap`` changes SAP, and only them: the first step's
    values against the same step at the default temperatures (same seed, same batch)."""
    batch = _batch()
    default = _trainer().step(batch, progress=0.5)
    wpr_only = _trainer(tau_attn=0.2, tau_contrast=0.2).step(batch, progress=0.5)
    sap_only = _trainer(tau_sap=0.2).step(batch, progress=0.5)
    assert wpr_only["wpr"] != pytest.approx(default["wpr"]) and wpr_only["sap"] == pytest.approx(default["sap"])
    assert sap_only["sap"] != pytest.approx(default["sap"]) and sap_only["wpr"] == pytest.approx(default["wpr"])
    assert wpr_only["global_long"] == default["global_long"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"precision": "fp16"}, "--precision"),
        ({"accum_steps": 3}, "--accum-steps"),
        ({"accum_steps": 0}, "--accum"),
        ({"compile": "tensorrt-x"}, "--compile backend"),
        ({"tau_attn": 0.0}, "--tau-attn"),
        ({"tau_contrast": -1.0}, "--tau-contrast"),
        ({"tau_sap": 0.0}, "--tau-sap"),
    ],
)
def test_bad_option_values_are_rejected(overrides, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config(TrainConfig(batch_size=8, **overrides))


def test_compiled_towers_give_the_eager_step():
    """``--compile`` wraps the towers' transformers with torch.compile (in place: same parameter names).
    The ``aot_eager`` backend checks tracing and autograd without Inductor's minutes of C++ compilation."""
    batch = _batch()
    eager, compiled = _trainer(), _trainer(compile="aot_eager")
    assert [n for n, _ in compiled.model.named_parameters()] == [n for n, _ in eager.model.named_parameters()]
    logged_eager = eager.step(batch, progress=0.5)
    logged_compiled = compiled.step(batch, progress=0.5)
    assert logged_compiled["loss"] == pytest.approx(logged_eager["loss"], rel=1e-5)
    for a, b in zip(eager.model.parameters(), compiled.model.parameters(), strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)


_FREED_RSS_SCRIPT = """
import sys
import torch
from mulclip_fast.train.allocator import keep_freed_memory

def rss_mib():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096 / 2**20

done = keep_freed_memory() if sys.argv[1] == "keep" else False
block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
before = rss_mib()
del block
print(done, round(before - rss_mib()))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.parametrize("mode", ["keep", "default", "user_settings"])
def test_the_cpu_allocator_keeps_freed_memory_unless_the_user_set_glibcs_malloc(mode):
    # The train CLI calls keep_freed_memory on CPU: a freed 64 MiB block stays in the heap for the next step
    # instead of being unmapped (and faulted in anew, page by page, at the next step); glibc settings given in
    # the environment are the user's choice and are left alone.
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "MALLOC_TRIM_THRESHOLD_")}
    if mode == "user_settings":
        env["MALLOC_TRIM_THRESHOLD_"] = "131072"
    argv = [sys.executable, "-c", _FREED_RSS_SCRIPT, "default" if mode == "default" else "keep"]
    done, returned_mib = subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout.split()
    if mode == "keep":
        assert done == "True" and int(returned_mib) < 8
    else:
        assert done == "False" and int(returned_mib) >= 56
