"""Training through the fused ops follows the reference (docs/kernels.md, "Verification without a GPU"; issue 4).

The verification plan asks that a 30-step fp32 run with the fast path and one with the reference give the same loss
curve within 1e-4 relative. Two *free-running* fp32 trainings cannot meet that from scratch, whatever
the implementation: the reference against itself with one CPU thread instead of two (a different
summation order, differences of 1e-7 at step 0) drifts past 1e-4 relative by step 12 and to 1e-2 by
step 29, because Adam amplifies rounding differences in this chaotic regime. So the check is split:

* **Teacher-forced, 30 steps:** along the reference's own trajectory (default `tiny` model, fine-grained
  terms on from step 0), every step's loss terms *and parameter gradients* through the fused ops equal
  the reference's to 1e-4 relative. This is the parity the curve criterion is meant to establish, free
  of the chaos.
* **Free-running:** the CLI with ``--backend torch`` and ``--backend reference`` logs the same curve to
  1e-4 relative over the first steps, before rounding can grow (the reference agrees with itself there).
"""

from __future__ import annotations

import json

import pytest
import torch

from mulclip_fast.data import Collator, iterate_batches, open_dataset
from mulclip_fast.losses import MulCLIPLoss
from mulclip_fast.model import preset_config
from mulclip_fast.train import TrainConfig, Trainer, main, resolve_config

SMALL = {"vision_layers": 1, "transformer_layers": 1}


def _teacher_forced(steps: int, **overrides) -> None:
    config = resolve_config(
        TrainConfig(
            steps=steps,
            fine_start=0.0,
            fine_ramp=0.0,
            eval_pairs=0,
            val_every=1000,
            seed=3,
            backend="reference",
            **{"batch_size": 8, **overrides},
        )
    )
    trainer = Trainer(config)
    fast = MulCLIPLoss(
        objective=config.loss,
        terms=trainer.terms,
        weights=config.weights,
        sap_pairing=config.sap_pairing,
        sap_topk_ratio=config.sap_topk_ratio,
        backend="torch",
    )
    image_size = preset_config(config.preset, **config.model_overrides).image_resolution
    dataset = open_dataset("synthetic", "train", image_size, config.train_size, config.seed, twin_fraction=0.5)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    collator = Collator(config.max_subcaptions)
    batches = iterate_batches(dataset, collator, config.batch_size, config.seed, shuffle=False)
    for step, _, batch in batches:
        if step == steps:
            break
        features, scale, _ = trainer.compute_features(batch, fine_scale=1.0)
        want = trainer.loss_fn(features, scale)
        want_grads = torch.autograd.grad(want["loss"], params, retain_graph=True, allow_unused=True)
        got = fast(features, scale)
        got_grads = torch.autograd.grad(got["loss"], params, allow_unused=True)
        assert got.keys() == want.keys()
        for term in want:
            assert got[term].item() == pytest.approx(want[term].item(), rel=1e-4), f"step {step}, {term}"
        # Gradients relative to the whole gradient's size: single entries that are zero in exact
        # arithmetic (e.g. the calibration MLP's last bias, which a softmax over tokens ignores) carry
        # rounding noise of 1e-9 and no relative meaning of their own.
        want_flat = torch.cat([g.flatten() for g in want_grads if g is not None])
        got_flat = torch.cat([g.flatten() for g in got_grads if g is not None])
        assert (got_flat - want_flat).norm() <= 1e-4 * want_flat.norm(), f"step {step}: parameter gradients"
        trainer.step(batch, step / steps)


@pytest.mark.slow
def test_thirty_teacher_forced_steps_of_the_default_model_match_the_reference():
    _teacher_forced(30)


@pytest.mark.slow
@pytest.mark.parametrize("objective", [{"loss": "finelip"}, {"sap_pairing": "all"}])
def test_all_pairs_objectives_match_the_reference_in_training(objective):
    _teacher_forced(6, model_overrides=SMALL, **objective)


def _loss_curve(out, argv) -> list[dict]:
    assert main([*argv, "--out", str(out)]) == 0
    with open(out / "metrics.jsonl") as handle:
        return [json.loads(line) for line in handle if line.strip()]


@pytest.mark.slow
def test_free_running_cli_curves_agree_before_rounding_grows(tmp_path):
    argv = ["--steps", "6", "--log-every", "1", "--fine-start", "0", "--fine-ramp", "0", "--eval-pairs", "0"]
    argv += ["--val-every", "1000", "--seed", "3", "--batch-size", "8"]
    argv += ["--model", "vision_layers=1", "--model", "transformer_layers=1"]
    fast = _loss_curve(tmp_path / "fast", [*argv, "--backend", "torch"])
    reference = _loss_curve(tmp_path / "reference", [*argv, "--backend", "reference"])
    assert len(fast) == len(reference) == 6
    for got, want in zip(fast, reference, strict=True):
        for term in ("loss", "global_long", "global_short", "wpr", "sap"):
            assert got[term] == pytest.approx(want[term], rel=1e-4), f"step {want['step']}, {term}"
