"""``Trainer``: the model, loss and optimizer of a run, and one optimisation step on one batch.

Around the step: AdamW parameter groups, the learning-rate schedule (linear warm-up, cosine decay) and
the fine-grained schedule that keeps WPR/SAP off until the towers have a global alignment to refine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch

from ..data import Batch, Collator
from ..distributed import DistributedContext, all_reduce_mean
from ..losses import FINE_GRAINED_TERMS, OBJECTIVES, DistributedMulCLIPLoss, MulCLIPFeatures, MulCLIPLoss
from ..model import CLIP, load_clip_weights, preset_config
from ..run_checkpoints import CHECKPOINT_FORMAT, CHECKPOINT_VERSION
from .checkpoint import capture_rng_state, restore_rng_state, seed_everything
from .config import TrainConfig

FUSED_ADAMW_DEVICES = ("cpu", "cuda")  # where torch.optim.AdamW(fused=True) runs


class FeatureForward(torch.nn.Module):
    """The towers' training pass as one ``forward``, so that DistributedDataParallel can wrap it.

    DDP only synchronises gradients of work done inside its module's ``forward``. Training calls
    ``CLIP.features`` and the loss also uses the temperature, so this forward returns both: the
    features' fields as a dict (DDP finds the tensors in it) plus ``logit_scale = exp(t)``.
    """

    def __init__(self, model: CLIP):
        super().__init__()
        self.model = model

    def forward(self, **inputs) -> dict[str, torch.Tensor | None]:
        features = self.model.features(**inputs)
        outputs = {f.name: getattr(features, f.name) for f in dataclasses.fields(features)}
        outputs["logit_scale"] = self.model.logit_scale.exp()
        return outputs


def configured_loss(config: TrainConfig, terms: tuple[str, ...]) -> MulCLIPLoss:
    """``MulCLIPLoss`` computing ``terms`` with the run's weights, SAP settings, temperatures, WPR form and
    backend: the one place the objective flags of ``TrainConfig`` reach the loss."""
    return MulCLIPLoss(
        objective=config.loss,
        terms=terms,
        weights=config.weights,
        sap_pairing=config.sap_pairing,
        sap_topk_ratio=config.sap_topk_ratio,
        tau_attn=config.tau_attn,
        tau_contrast=config.tau_contrast,
        tau_sap=config.tau_sap,
        wpr_form=config.wpr_form,
        backend=config.backend,
    )


class Trainer:
    """Model, loss and optimizer of one run, and ``step`` — one optimisation step on one batch."""

    def __init__(self, config: TrainConfig, context: DistributedContext | None = None, load_init: bool = True):
        """``load_init=False``: a resumed run, whose checkpoint replaces the weights ``--init`` would load
        (the file need not exist any more); its leading text positions stay frozen all the same."""
        self.config = config
        # Data parallelism: every rank takes its slice of each global batch and DistributedDataParallel
        # averages the gradients, so a step equals the one-process step on the global batch.
        self.context = context or DistributedContext()
        self.device = torch.device(config.device)
        seed_everything(config.seed)
        self.model = CLIP(preset_config(config.preset, **config.model_overrides))
        self.init_report = None  # what loading --init did, for the run log
        if config.init and load_init:
            _, path = config.init.split(":", 1)
            self.init_report = load_clip_weights(self.model, path, freeze_positions=config.freeze_positions)
        elif config.init:
            self.model.freeze_leading_positions(config.freeze_positions)
        self.model.to(self.device)
        self.model.set_grad_checkpointing(config.grad_checkpointing)
        self.model.set_text_attention(config.text_attention)
        if config.compile:
            # In place (nn.Module.compile), so parameter names and checkpoints stay as they are.
            for tower in (self.model.visual.transformer, self.model.transformer):
                tower.compile(backend=config.compile)
        terms = [t for t in OBJECTIVES[config.loss] if (t != "wpr" or config.wpr) and (t != "sap" or config.sap)]
        if config.captions == "short":  # the summary is the caption: one contrastive term, as CLIP's
            terms = ["global_long"]
        self.terms = tuple(terms)
        self.loss_fn = configured_loss(config, self.terms)
        # Before the fine-grained ramp starts, steps compute the global terms only (see compute_features).
        self.global_loss_fn = configured_loss(config, tuple(t for t in self.terms if t not in FINE_GRAINED_TERMS))
        self.needs_tokens = any(t in FINE_GRAINED_TERMS for t in self.terms)
        self.needs_subcaptions = "sap" in self.terms
        self.forward_module = FeatureForward(self.model)
        if self.context.enabled:
            # DDP broadcasts rank 0's parameters, then averages gradients in buckets while backward still
            # runs. Some parameters take no part in some steps (the calibration modules before the
            # fine-grained ramp, or always without WPR/SAP), hence find_unused_parameters.
            self.forward_module = torch.nn.parallel.DistributedDataParallel(
                self.forward_module,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True,
            )
        # The fused AdamW updates every parameter in one kernel: on the tiny model's 8M parameters (6.3M of
        # them the token table) it saves about 0.05 s of a 0.5 s CPU step over the per-tensor loop.
        self.optimizer = torch.optim.AdamW(
            self._param_groups(),
            lr=config.lr,
            betas=(0.9, 0.98),
            eps=1e-6,
            weight_decay=config.weight_decay,
            fused=self.device.type in FUSED_ADAMW_DEVICES,
        )

    def _param_groups(self) -> list[dict]:
        # No weight decay on gains, biases, embeddings and the temperature (CLIP / open_clip practice).
        # The positional table must be in this group: decoupled decay would move its frozen rows.
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            plain = param.ndim < 2 or "embedding" in name or "ln_" in name or name.endswith("logit_scale")
            (no_decay if plain else decay).append(param)
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

    def collator(self) -> Collator:
        """Batches as this trainer's model and terms take them: its text positions, subcaptions only
        for a loss that scores them, and no binding probes (no term reads them)."""
        return Collator(
            self.config.max_subcaptions,
            with_subcaptions=self.needs_subcaptions,
            long_context=self.model.config.context_length,
            with_probes=False,
        )

    def learning_rate(self, progress: float, step_fraction: float = 0.0) -> float:
        """Linear warm-up over the first ``warmup`` fraction of training, then cosine decay to 0.

        ``progress`` is the fraction of training done before this step, ``step_fraction`` the fraction
        one step is. The warm-up is taken at the step's end, as open_clip's ``(step + 1) / warmup_steps``:
        the first of n warm-up steps trains at 1/n of the rate, not at 0 (a one-step run trains)."""
        warmup = self.config.warmup
        if progress < warmup:
            return self.config.lr * min(1.0, (progress + step_fraction) / warmup)
        return self.config.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / max(1e-8, 1 - warmup))))

    def fine_grained_scale(self, progress: float) -> float:
        """0 before ``fine_start``, then a linear ramp to 1 over ``fine_ramp`` (fractions of training).

        Training from scratch, the token-level terms at full weight from step 0 keep the towers from
        learning the global alignment they rely on (docs/notes/2026-11-27-binding.md); fine-tuning can start
        them at once (``--fine-start 0 --fine-ramp 0``)."""
        start, ramp = self.config.fine_start, self.config.fine_ramp
        if progress < start:
            return 0.0
        return 1.0 if ramp <= 0 else min(1.0, (progress - start) / ramp)

    def compute_features(self, batch: Batch, fine_scale: float) -> tuple[MulCLIPFeatures, torch.Tensor, bool]:
        """The towers' outputs for the enabled terms, the logit scale ``exp(t)``, and whether the
        fine-grained terms are active. Token-level features are skipped while their weight is zero
        (before the ramp starts), which makes those steps as cheap as the global loss."""
        active = fine_scale > 0
        outputs = self.forward_module(
            images=batch.images,
            long_ids=batch.long_ids,
            short_ids=batch.short_ids if "global_short" in self.terms else None,
            sub_ids=batch.sub_ids if (self.needs_subcaptions and active) else None,
            sub_mask=batch.sub_mask if (self.needs_subcaptions and active) else None,
            need_tokens=self.needs_tokens and active,
            sap_raw_patches=self.config.sap_raw_patches,
            calibrate=self.config.calibration,
            packed_text=self.config.packed_text,
        )
        logit_scale = outputs.pop("logit_scale")
        return MulCLIPFeatures(**outputs), logit_scale, active

    def step(self, batch: Batch, progress: float, step_fraction: float = 0.0) -> dict[str, float]:
        """One optimisation step at ``progress`` (the fraction of training done before it; a step is
        ``step_fraction`` of training); returns the logged values (each loss term unweighted, total, lr).

        Under data parallelism ``batch`` is this rank's rows of the global batch (``rank_rows``, as
        ``iterate_batches`` reads them), alone it is the whole batch."""
        lr = self.learning_rate(progress, step_fraction)
        fine_scale = self.fine_grained_scale(progress)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        # Gradient accumulation: micro-batches of batch / accum_steps, each a contrastive batch of its own
        # (negatives come from the global micro-batch, as in open_clip without feature caching); the
        # gradient is the mean of the micro-batch losses' gradients. A rank's rows are its part of each
        # global micro-batch in turn (``rank_rows``), so N ranks compute exactly what one process does with
        # the same --accum-steps.
        accum = self.config.accum_steps
        terms_sum: dict[str, torch.Tensor] = {}
        for micro in range(accum):
            part = (batch.shard(micro, accum) if accum > 1 else batch).to(self.device)
            # Under DDP, gradients are averaged over ranks once, in the last micro-batch's backward.
            last = micro == accum - 1
            sync = contextlib.nullcontext() if last or not self.context.enabled else self.forward_module.no_sync()
            with sync:
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.precision == "bf16"):
                    features, logit_scale, active = self.compute_features(part, fine_scale)
                # Autocast covers the towers only; the loss accumulates in fp32 (MulCLIPLoss also switches
                # autocast off itself, for trainers that call it inside their autocast region).
                loss_fn = DistributedMulCLIPLoss(self.loss_fn if active else self.global_loss_fn, self.context)
                terms = loss_fn(features, logit_scale, fine_grained_scale=fine_scale)
                (terms["loss"] / accum).backward()
            for name, value in terms.items():
                terms_sum[name] = terms_sum.get(name, 0.0) + value.detach().float() / accum
        terms = terms_sum
        if self.context.enabled:
            terms = {name: all_reduce_mean(value) for name, value in terms.items()}
        self.optimizer.step()
        with torch.no_grad():  # CLIP clamps the logit scale at 100
            self.model.logit_scale.clamp_(0, math.log(100))
        logged = {name: float(value.detach()) for name, value in terms.items()}
        if not math.isfinite(logged["loss"]):
            raise FloatingPointError(f"the loss became {logged['loss']}; lower --lr or check the data")
        logged.update(lr=lr, fine_scale=fine_scale, logit_scale=float(self.model.logit_scale.detach().exp()))
        return logged

    def state_dict(self, step: int, elapsed: float) -> dict:
        """The checkpoint after ``step`` steps and ``elapsed`` seconds of training (see ``run_checkpoints``)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": step,
            "elapsed": elapsed,
            "rng": capture_rng_state(),
        }

    def load_state_dict(self, state: dict) -> tuple[int, float]:
        """Continue from a checkpoint; returns its step and elapsed seconds."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        restore_rng_state(state["rng"])
        return int(state["step"]), float(state["elapsed"])
