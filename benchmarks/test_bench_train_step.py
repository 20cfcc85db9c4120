"""A full training step with the towers: reference loss path vs fast path (DESIGN §10, issue 6).

One step is ``Trainer.step`` of ``python -m mulclip_fast.train``: towers forward on a collated batch of
the built-in synthetic dataset, ``MulCLIPLoss``, backward, AdamW update, logit-scale clamp. The fine-grained
terms are at full weight (``--fine-start 0 --fine-ramp 0``). Paths: ``reference`` (``--backend
reference``: the plain PyTorch spec of every term) and ``fast`` (``--backend auto``: the fused ops; the
chunked torch path on CPU, Triton on CUDA).

Objectives: the paper's (``--loss mulclip``, SAP matched), and the two all-pairs ones (``--loss finelip``
and ``--loss mulclip --sap-pairing all``).

Peak memory is the step's own: allocations made during the step (activations, gradients, temporaries),
above the parameters and the optimizer state that exist before it; gradients are released before the
measure so CPU and CUDA count the same thing.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.harness import DEVICE, FULL_SWEEP, measure_case
from mulclip_fast.data import Collator, open_dataset
from mulclip_fast.model import preset_config
from mulclip_fast.profiling import measure_peak_memory
from mulclip_fast.train import TrainConfig, Trainer, resolve_config

PATHS = {"reference": "reference", "fast": "auto"}
OBJECTIVES = {
    "mulclip": {"loss": "mulclip", "sap_pairing": "matched"},
    "finelip": {"loss": "finelip", "sap_pairing": "matched"},
    "mulclip-sap-all": {"loss": "mulclip", "sap_pairing": "all"},
}
# The ViT-B/16 preset keeps its widths, heads, patch grid (196 patches), d = 512 and 248-position text
# table; on CPU its depth is cut from 12 to 2 layers per tower so that a step takes seconds, not minutes.
VIT_B_CPU_DEPTH = 2
PRESET_BATCH = {"tiny": 32 if DEVICE.type == "cpu" else 128, "vit-b-16": 8 if DEVICE.type == "cpu" else 64}
# A fixed budget for the step's own peak memory (exact tracker on CPU, CUDA allocator on GPU): the
# largest batch that stays under it is found by doubling, then bisecting to within 1/8. Each probe is
# a full step, so the CPU budget is kept small enough for the search to take a minute or two.
MEMORY_BUDGET_BYTES = (2 if FULL_SWEEP else 0.25) * 2**30 if DEVICE.type == "cpu" else 8 * 2**30
MAX_BATCH_SEARCHED = 4096


def _model_overrides(preset: str) -> dict:
    if preset == "vit-b-16" and DEVICE.type == "cpu":
        return {"vision_layers": VIT_B_CPU_DEPTH, "transformer_layers": VIT_B_CPU_DEPTH}
    return {}


def _trainer(preset: str, objective: str, path: str) -> Trainer:
    """The trainer of ``python -m mulclip_fast.train`` for this case; skips a fast path that would silently
    run the reference (the trainer falls back when ``mulclip_fast.ops`` does not export an op)."""
    config = resolve_config(
        TrainConfig(
            preset=preset,
            model_overrides=_model_overrides(preset),
            **OBJECTIVES[objective],
            backend=PATHS[path],
            fine_start=0.0,
            fine_ramp=0.0,
            lr=1e-4,
            device=DEVICE.type,
        )
    )
    trainer = Trainer(config, total_steps=1000)
    if path == "fast" and trainer.backend == "reference":
        flags = f"--loss {config.loss} --sap-pairing {config.sap_pairing}"
        pytest.skip(f"mulclip_fast.ops does not export the fused ops that {flags} needs")
    return trainer


def _batch(trainer: Trainer, size: int):
    image_size = preset_config(trainer.config.preset, **trainer.config.model_overrides).image_resolution
    dataset = open_dataset("synthetic", "train", image_size, size=size, seed=0)
    collator = Collator(trainer.config.max_subcaptions, with_subcaptions=trainer.needs_subcaptions)
    return collator([dataset[i] for i in range(size)]).to(DEVICE)


def _step_fn(trainer: Trainer, batch):
    def step():
        # Gradients of the previous step are released first, so the measured peak holds this step's.
        trainer.optimizer.zero_grad(set_to_none=True)
        return trainer.step(batch, progress=0.5)

    return step


def _step_peak(trainer: Trainer, size: int) -> int:
    step = _step_fn(trainer, _batch(trainer, size))
    if not trainer.optimizer.state:
        step()  # the first step creates the optimizer state, which is not part of a step's own memory
    return measure_peak_memory(step, DEVICE)[0]


def _batch_shape(batch) -> dict:
    return {
        "long_tokens": batch.long_ids.shape[1],
        "subcaptions": batch.sub_ids.shape[1],
        "sub_tokens": batch.sub_ids.shape[2],
    }


def _preset_label(preset: str) -> str:
    overrides = _model_overrides(preset)
    return f"{preset} (depth {overrides['vision_layers']})" if overrides else preset


STEP_CASES = [
    pytest.param(preset, objective, path, id=f"{preset}-{objective}-{path}")
    for preset in PRESET_BATCH
    for objective in (OBJECTIVES if preset == "tiny" or FULL_SWEEP else ("mulclip",))
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
        extra={"backend_resolved": trainer.backend, "model_overrides": _model_overrides(preset)},
    )


def largest_batch_within(
    budget: float, peak_of, start: int = 4, limit: int = MAX_BATCH_SEARCHED
) -> tuple[int, int, bool]:
    """Largest batch ``b <= limit`` with ``peak_of(b) <= budget`` (peak assumed to grow with b), its peak,
    and whether the search stopped at ``limit`` rather than at the budget.

    Doubles from ``start`` until the budget is exceeded, then bisects until the bracket is within 1/8
    of the batch. Returns ``(0, 0, False)`` when even ``start`` does not fit.
    """
    fits, fit_peak, fails = 0, 0, None
    batch = start
    while batch <= limit:
        peak = peak_of(batch)
        if peak > budget:
            fails = batch
            break
        fits, fit_peak = batch, peak
        batch *= 2
    if fits == 0:
        return 0, 0, False
    if fails is None:
        return fits, fit_peak, True
    while fails - fits > max(1, fits // 8):
        middle = (fits + fails) // 2
        peak = peak_of(middle)
        if peak <= budget:
            fits, fit_peak = middle, peak
        else:
            fails = middle
    return fits, fit_peak, False


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_train_step_largest_batch(benchmark, machine, results, objective: str, path: str):
    """The tiny preset's step at the largest batch whose step peak fits MEMORY_BUDGET_BYTES."""
    torch.manual_seed(0)
    trainer = _trainer("tiny", objective, path)
    batch_size, peak, capped = largest_batch_within(MEMORY_BUDGET_BYTES, lambda size: _step_peak(trainer, size))
    budget_mib = int(MEMORY_BUDGET_BYTES) >> 20
    if batch_size == 0:
        pytest.fail(f"not even the smallest batch searched fits {budget_mib} MiB with the {path} path")
    batch = _batch(trainer, batch_size)
    shape = {"preset": "tiny", "objective": objective, "budget_MiB": budget_mib, "B": batch_size}
    # The search has already stepped this trainer many times; one timed round documents the step at
    # that batch (the equal-batch cases carry the careful timings).
    measure_case(
        benchmark,
        results,
        machine,
        group=f"train step tiny {objective} largest batch within {budget_mib} MiB",
        op=f"train_step_max_batch[{objective}]",
        backend=path,
        mode="train-step",
        shape={**shape, **_batch_shape(batch)},
        fn=_step_fn(trainer, batch),
        extra={
            "max_batch": batch_size,
            "max_batch_capped": capped,
            "max_batch_peak_bytes": peak,
            "memory_budget_bytes": int(MEMORY_BUDGET_BYTES),
            "backend_resolved": trainer.backend,
        },
        warmed_up=True,
        max_rounds=1,
    )
