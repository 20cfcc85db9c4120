"""A full training step with the towers: reference loss path vs fast path (docs/performance.md; issue 6).

One step is ``Trainer.step`` of ``python -m mulclip_fast.train``: towers forward on a collated batch of
the built-in synthetic dataset, ``MulCLIPLoss``, backward, AdamW update, logit-scale clamp. The fine-grained
terms are at full weight (``--fine-start 0 --fine-ramp 0``). Paths: ``reference`` (``--backend
reference``: the plain PyTorch spec of every term) and ``fast`` (``--backend auto``: the fused ops; the
chunked torch path on CPU, Triton on CUDA).

Objectives: the paper's (``--loss mulclip``, SAP matched), and the two all-pairs ones (``--loss finelip``
and ``--loss mulclip --sap-pairing all``; ``mulclip-sap-all-raw`` adds ``--sap-raw-patches``).

The largest batch each path fits in a fixed budget is searched for the paper's objective on the tiny
preset, and for the all-pairs objectives at a ViT-B/16 shape (``ALL_PAIRS_PRESET``): there the naive
all-pairs SAP over the 196 raw patches holds ``[B, B, M, N, d]`` tensors that outgrow the towers.

Peak memory is the step's own: allocations made during the step (activations, gradients, temporaries),
above the parameters and the optimizer state that exist before it; each step releases its gradients at
its end, so that every measure starts from the same memory on CPU and CUDA.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.harness import DEVICE, FULL_SWEEP, largest_batch_within, measure_case
from mulclip_fast.data import Collator, open_dataset
from mulclip_fast.model import preset_config
from mulclip_fast.profiling import measure_peak_memory
from mulclip_fast.train import TrainConfig, Trainer, resolve_config

PATHS = {"reference": "reference", "fast": "auto"}
OBJECTIVES = {
    "mulclip": {"loss": "mulclip", "sap_pairing": "matched"},
    "finelip": {"loss": "finelip", "sap_pairing": "matched"},
    "mulclip-sap-all": {"loss": "mulclip", "sap_pairing": "all"},
    # SAP over the image's 196 raw projected patches (k = 49) instead of its 39 calibrated tokens.
    "mulclip-sap-all-raw": {"loss": "mulclip", "sap_pairing": "all", "sap_raw_patches": True},
    # The same with the towers' blocks recomputed in backward (--grad-checkpointing), as large-batch CLIP
    # training runs: the towers' share per sample shrinks, the loss's is what it was.
    "mulclip-sap-all-raw-ckpt": {
        "loss": "mulclip",
        "sap_pairing": "all",
        "sap_raw_patches": True,
        "grad_checkpointing": True,
    },
}
EQUAL_BATCH_OBJECTIVES = ("mulclip", "finelip", "mulclip-sap-all")
# The ViT-B/16 preset keeps its widths, heads, patch grid (196 patches), d = 512 and 248-position text
# table; on CPU its depth is cut from 12 to 2 layers per tower so that a step takes seconds, not minutes.
VIT_B_CPU_DEPTH = 2
PRESET_BATCH = {"tiny": 32 if DEVICE.type == "cpu" else 128, "vit-b-16": 8 if DEVICE.type == "cpu" else 64}
# Fixed budgets for the step's own peak memory (CPU or CUDA allocator, exact bytes): the largest
# batch that stays under one is searched to within 1/8 (benchmarks.harness.largest_batch_within). Each
# probe is a full step, so the CPU budgets keep each search to about a minute.
# The paper's matched objective, tiny preset: its step's peak is the towers' activations.
MEMORY_BUDGET_BYTES = (2 if FULL_SWEEP else 0.25) * 2**30 if DEVICE.type == "cpu" else 8 * 2**30
# The all-pairs objectives at the ViT-B/16 shape (widths, 196 patches, d = 512, M = 8 subcaptions) with one
# layer per tower on every device: a step then holds 25-30 MiB of tower activations per sample, while the
# naive all-pairs SAP over raw patches needs about 6 MiB per *pair* (its [B, B, M, N, d] gradient buffer
# alone is 3 MiB per pair). In 2 GiB the quadratic term is over twice the towers' share at the reference's
# largest batch (19), and the fast path's search stops near B = 67 (106 with checkpointed towers): one to
# two minutes of CPU steps per path. FineLIP's [B, B, 40, 40] tensors (~27 KiB per pair) stay small next to the towers.
ALL_PAIRS_PRESET = "vit-b-16"
ALL_PAIRS_DEPTH = 1
ALL_PAIRS_OBJECTIVES = ("finelip", "mulclip-sap-all-raw", "mulclip-sap-all-raw-ckpt")
ALL_PAIRS_BUDGET_BYTES = 2 * 2**30
MAX_BATCH_SEARCHED = 4096


def _model_overrides(preset: str) -> dict:
    if preset == "vit-b-16" and DEVICE.type == "cpu":
        return {"vision_layers": VIT_B_CPU_DEPTH, "transformer_layers": VIT_B_CPU_DEPTH}
    return {}


def _trainer(preset: str, objective: str, path: str, model_overrides: dict | None = None) -> Trainer:
    """The trainer of ``python -m mulclip_fast.train`` for this case."""
    config = resolve_config(
        TrainConfig(
            preset=preset,
            model_overrides=_model_overrides(preset) if model_overrides is None else model_overrides,
            **OBJECTIVES[objective],
            backend=PATHS[path],
            fine_start=0.0,
            fine_ramp=0.0,
            lr=1e-4,
            device=DEVICE.type,
        )
    )
    return Trainer(config)


def _batch(trainer: Trainer, size: int):
    image_size = preset_config(trainer.config.preset, **trainer.config.model_overrides).image_resolution
    dataset = open_dataset("synthetic", "train", image_size, size=size, seed=0)
    collator = Collator(trainer.config.max_subcaptions, with_subcaptions=trainer.needs_subcaptions)
    return collator([dataset[i] for i in range(size)]).to(DEVICE)


def _step_fn(trainer: Trainer, batch):
    def step():
        logged = trainer.step(batch, progress=0.5)
        # Release this step's gradients, so that every call starts from the parameters and the optimizer
        # state alone. Held into the next call, they would be freed inside its measure, and an allocator
        # that sees that free (CUDA's; the CPU allocator's once it watched them being allocated, as in
        # consecutive probes of a batch search) would take their bytes off the next step's peak.
        trainer.optimizer.zero_grad(set_to_none=True)
        return logged

    return step


def _step_peak(trainer: Trainer, size: int) -> tuple[int, str]:
    step = _step_fn(trainer, _batch(trainer, size))
    if not trainer.optimizer.state:
        step()  # the first step creates the optimizer state, which is not part of a step's own memory
    return measure_peak_memory(step, DEVICE)


def _batch_shape(batch) -> dict:
    return {
        "long_tokens": batch.long_ids.shape[1],
        "subcaptions": batch.sub_ids.shape[1],
        "sub_tokens": batch.sub_ids.shape[2],
    }


def _preset_label(preset: str, overrides: dict | None = None) -> str:
    overrides = _model_overrides(preset) if overrides is None else overrides
    return f"{preset} (depth {overrides['vision_layers']})" if overrides else preset


STEP_CASES = [
    pytest.param(preset, objective, path, id=f"{preset}-{objective}-{path}")
    for preset in PRESET_BATCH
    for objective in (EQUAL_BATCH_OBJECTIVES if preset == "tiny" or FULL_SWEEP else ("mulclip",))
    for path in PATHS
]


@pytest.mark.parametrize(("preset", "objective", "path"), STEP_CASES)
def test_train_step(benchmark, machine, results, preset: str, objective: str, path: str):
    """One training step at the preset's equal batch, reference vs fast path."""
    torch.manual_seed(0)
    trainer = _trainer(preset, objective, path)
    batch = _batch(trainer, PRESET_BATCH[preset])
    shape = {"preset": _preset_label(preset), "objective": objective, "B": len(batch), **_batch_shape(batch)}
    measure_case(
        benchmark,
        results,
        machine,
        group=f"train step {shape['preset']} {objective} B={len(batch)}",
        op=f"train_step[{objective}]",
        backend=path,
        mode="train-step",
        shape=shape,
        fn=_step_fn(trainer, batch),
        extra={"model_overrides": _model_overrides(preset)},
    )


# (preset, model overrides, objective, budget) of each largest-batch search.
LARGEST_BATCH_CASES = [
    pytest.param("tiny", {}, "mulclip", MEMORY_BUDGET_BYTES, id="tiny-mulclip"),
    *(
        pytest.param(
            ALL_PAIRS_PRESET,
            {"vision_layers": ALL_PAIRS_DEPTH, "transformer_layers": ALL_PAIRS_DEPTH},
            objective,
            ALL_PAIRS_BUDGET_BYTES,
            id=f"{ALL_PAIRS_PRESET}-depth{ALL_PAIRS_DEPTH}-{objective}",
        )
        for objective in ALL_PAIRS_OBJECTIVES
    ),
]


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize(("preset", "overrides", "objective", "budget"), LARGEST_BATCH_CASES)
def test_train_step_largest_batch(
    benchmark, machine, results, preset: str, overrides: dict, objective: str, budget: float, path: str
):
    """The step at the largest batch whose step peak fits ``budget``; records every batch measured."""
    torch.manual_seed(0)
    trainer = _trainer(preset, objective, path, model_overrides=overrides)
    measured: dict[int, tuple[int, str]] = {}

    def peak_of(size: int) -> int:
        measured[size] = _step_peak(trainer, size)
        return measured[size][0]

    search = largest_batch_within(budget, peak_of, limit=MAX_BATCH_SEARCHED)
    budget_mib = int(budget) >> 20
    if search.batch == 0:
        pytest.fail(f"not even the smallest batch searched fits {budget_mib} MiB with the {path} path")
    batch = _batch(trainer, search.batch)
    label = _preset_label(preset, overrides)
    shape = {"preset": label, "objective": objective, "budget_MiB": budget_mib, "B": search.batch}
    # The search has already stepped this trainer at this very batch (its peak is reused); one timed round
    # documents the step there (the equal-batch cases carry the careful timings).
    measure_case(
        benchmark,
        results,
        machine,
        group=f"train step {label} {objective} largest batch within {budget_mib} MiB",
        op=f"train_step_max_batch[{objective}]",
        backend=path,
        mode="train-step",
        shape={**shape, **_batch_shape(batch)},
        fn=_step_fn(trainer, batch),
        extra={
            "max_batch": search.batch,
            "max_batch_capped": search.capped,
            "max_batch_peak_bytes": search.peak,
            "max_batch_over": search.over,
            "max_batch_probes": [[size, peak] for size, peak in search.probes.items()],
            "memory_budget_bytes": int(budget),
            "preset": label,
            "model_overrides": overrides,
        },
        warmed_up=True,
        max_rounds=1,
        known_peak=measured[search.batch],
    )
