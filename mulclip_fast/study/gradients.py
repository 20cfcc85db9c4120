"""What each loss term asks of the parameters the terms share: the cosine between the global term's gradient
and each fine-grained term's, and their norms, on the towers and projections (not the calibration modules,
which only the fine-grained terms train, nor the temperature).

A fine-grained term whose gradient points against the global one (cosine < 0) and is larger than it pulls
the shared parameters away from the global alignment it sits beside; one at cosine ≈ 0 and small barely
interferes. Measured at the fine-tuning start (the pretrained towers, freshly initialised calibration), on
a few training batches, each term at the weight the run gives it.
"""

from __future__ import annotations

import torch

from ..data import iterate_batches
from ..model.loading import CALIBRATION_PREFIXES
from ..train import TrainConfig, Trainer, resolve_config
from ..train.loop import open_training_set
from ..train.trainer import configured_loss

# The global terms, as one gradient: the alignment the fine-grained terms must not undo.
GLOBAL = ("global_long", "global_short")
MEASURED_TERMS = ("wpr", "sap", "finelip")


def shared_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The trainable parameters every term reaches: all but the calibration modules and the temperature."""
    return [
        (name, p)
        for name, p in model.named_parameters()
        if p.requires_grad and not name.startswith(CALIBRATION_PREFIXES) and name != "logit_scale"
    ]


def _flat_gradient(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat(
        [(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params, strict=True)]
    )


def gradient_alignment(config: TrainConfig, batches: int = 4) -> dict:
    """Cosine and norm ratio of each fine-grained term's gradient against the global terms', averaged over
    ``batches`` training batches of ``config`` (an ``--init`` fine-tuning config; its loss must compute token
    features, e.g. ``mulclip``). Returns ``{term: {"cosine": c, "norm_ratio": r}, "global_norm": g, "batches": n}``."""
    config = resolve_config(config)
    trainer = Trainer(config)
    if not trainer.needs_tokens or not trainer.needs_subcaptions:
        raise ValueError("gradient_alignment needs a config whose loss computes tokens and subcaptions (mulclip)")
    loss_fn = configured_loss(config, (*GLOBAL, *MEASURED_TERMS))
    # The run's own data, as the trainer opens it (binding twins and captions included).
    dataset, collator = open_training_set(config), trainer.collator()
    # The run's first batches, in the trainer's order (generated samples are not shuffled).
    stream = iterate_batches(dataset, collator, config.batch_size, config.seed, shuffle=config.data != "synthetic")
    params = [p for _, p in shared_parameters(trainer.model)]
    sums: dict[str, dict[str, float]] = {t: {"cosine": 0.0, "norm_ratio": 0.0} for t in MEASURED_TERMS}
    global_norm = 0.0
    for _ in range(batches):
        batch = next(stream)[2].to(trainer.device)
        features, logit_scale, _ = trainer.compute_features(batch, fine_scale=1.0)
        terms = loss_fn(features, logit_scale)
        g_global = _flat_gradient(sum(loss_fn.weights[t] * terms[t] for t in GLOBAL), params)
        global_norm += float(g_global.norm()) / batches
        for name in MEASURED_TERMS:
            g = _flat_gradient(loss_fn.weights[name] * terms[name], params)
            sums[name]["cosine"] += float(torch.nn.functional.cosine_similarity(g, g_global, dim=0)) / batches
            sums[name]["norm_ratio"] += float(g.norm() / g_global.norm()) / batches
    return {**sums, "global_norm": global_norm, "batches": batches}
