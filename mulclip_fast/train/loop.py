"""``python -m mulclip_fast.train``: train MulCLIP, its ablations and baselines (DESIGN §8).

With no arguments it trains the ``tiny`` preset from scratch on the built-in synthetic long-caption
dataset, on the CPU, in a few minutes, and evaluates it on held-out synthetic pairs. With flags it
fine-tunes an OpenAI / Long-CLIP checkpoint on DOCCI or ShareGPT4V files.

Structure (so data parallelism, mixed precision, accumulation and compilation slot in later):
``TrainConfig`` holds every setting; ``train(config)`` runs a whole job; ``Trainer.step`` is one
optimisation step on one batch; the loop around it handles logging, checkpoints and signals. A
checkpoint holds the model, the optimizer, the step, the elapsed time and the RNG states; the data order
is a pure function of (seed, step), so ``--resume`` continues bit-for-bit.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..data import Batch, Collator, DataError, iterate_batches, open_dataset, parse_data_spec
from ..distributed import (
    DistributedContext,
    DistributedMulCLIPLoss,
    agree,
    all_reduce_mean,
    init_distributed,
    shutdown_distributed,
)
from ..eval import evaluate, format_table
from ..losses import FINE_GRAINED_TERMS, OBJECTIVES, MulCLIPFeatures, MulCLIPLoss
from ..model import CLIP, PRESETS, CheckpointError, load_clip_weights, preset_config
from ..run_checkpoints import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    checkpoint_dir,
    find_latest_checkpoint,
    load_training_checkpoint,
)


class ConfigError(ValueError):
    """An invalid combination of settings; the message names the flag."""


@dataclass
class TrainConfig:
    """Every setting of a training run; written to ``config.json`` fully resolved."""

    preset: str = "tiny"
    model_overrides: dict = field(default_factory=dict)
    data: str = "synthetic"
    image_root: str | None = None
    init: str | None = None
    freeze_positions: int = 20
    loss: str = "mulclip"
    wpr: bool = True
    sap: bool = True
    weights: dict = field(default_factory=dict)
    sap_pairing: str = "matched"
    sap_topk_ratio: float = 0.25
    sap_raw_patches: bool = False
    max_subcaptions: int = 8
    fine_start: float = 0.8
    fine_ramp: float = 0.05
    steps: int | None = None
    epochs: int | None = None
    time_limit: float = 0.0
    batch_size: int = 32
    lr: float | None = None
    weight_decay: float = 0.1
    warmup: float = 0.05
    seed: int = 0
    train_size: int = 1_000_000
    twin_fraction: float = 0.5
    out: str = "runs/default"
    device: str = "cpu"
    backend: str = "auto"
    num_workers: int = 0
    log_every: int = 1
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    val_every: int = 0
    val_pairs: int = 256
    eval_pairs: int = 1000
    threads: int = 0
    precision: str = "fp32"
    grad_checkpointing: bool = False
    accum_steps: int = 1
    compile: str | None = None  # a torch.compile backend for the towers' transformers ("inductor"), or None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------- defaults
# The no-argument run: tiny model from scratch on synthetic data, sized to finish within ~4 minutes of
# training on a 2-core CPU (DESIGN §8). Tuned values; see README "Default run".
DEFAULT_STEPS_SCRATCH = 440
DEFAULT_LR_SCRATCH = 5e-4
DEFAULT_LR_FINETUNE = 1e-6
DEFAULT_TIME_LIMIT_SYNTHETIC = 240.0


# ---------------------------------------------------------------------------------------------- helpers
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX); elsewhere bf16 autocast is slower."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's own capability checks
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def _atomic_torch_save(obj, path: str) -> None:
    """Write to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def _rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    # ru_maxrss is in KiB on Linux: the process's peak resident memory.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def resolve_backend(requested: str, terms: tuple[str, ...], sap_pairing: str) -> str:
    """The loss backend to use. ``auto`` falls back to ``reference`` while ``mulclip_fast.ops`` does not
    provide the ops the enabled terms need; an explicit fused backend without them is an error."""
    needed = []
    if "word" in terms:
        needed.append("wpr_loss")
    if "sub" in terms:
        needed.append("topk_patch_aggregate" if sap_pairing == "matched" else "pairwise_topk_aggregate_logits")
    if "finelip" in terms:
        needed.append("pairwise_maxsim")
    if requested == "reference" or not needed:
        return requested
    try:
        from .. import ops
    except ImportError:
        ops = None
    missing = [name for name in needed if not hasattr(ops, name)]
    if not missing:
        return requested
    if requested == "auto":
        return "reference"
    raise ConfigError(f"--backend {requested} needs mulclip_fast.ops.{', '.join(missing)}, which is not available")


# ---------------------------------------------------------------------------------------------- trainer
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


class Trainer:
    """Model, loss and optimizer of one run, and ``step`` — one optimisation step on one batch."""

    def __init__(self, config: TrainConfig, total_steps: int, context: DistributedContext | None = None):
        self.config = config
        self.total_steps = total_steps
        # Data parallelism: every rank takes its slice of each global batch and DistributedDataParallel
        # averages the gradients, so a step equals the one-process step on the global batch.
        self.context = context or DistributedContext()
        self.device = torch.device(config.device)
        _seed_everything(config.seed)
        self.model = CLIP(preset_config(config.preset, **config.model_overrides))
        self.init_report = None
        if config.init:
            _, path = config.init.split(":", 1)
            self.init_report = load_clip_weights(self.model, path, freeze_positions=config.freeze_positions)
        self.model.to(self.device)
        self.model.set_grad_checkpointing(config.grad_checkpointing)
        if config.compile:
            # In place (nn.Module.compile), so parameter names and checkpoints stay as they are.
            for tower in (self.model.visual.transformer, self.model.transformer):
                tower.compile(backend=config.compile)
        terms = [t for t in OBJECTIVES[config.loss] if (t != "word" or config.wpr) and (t != "sub" or config.sap)]
        self.terms = tuple(terms)
        self.backend = resolve_backend(config.backend, self.terms, config.sap_pairing)
        self.loss_fn = MulCLIPLoss(
            objective=config.loss,
            terms=self.terms,
            weights=config.weights,
            sap_pairing=config.sap_pairing,
            sap_topk_ratio=config.sap_topk_ratio,
            backend=self.backend,
        )
        self.needs_tokens = any(t in FINE_GRAINED_TERMS for t in self.terms)
        self.needs_subcaptions = "sub" in self.terms
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
        self.optimizer = torch.optim.AdamW(
            self._param_groups(), lr=self.base_lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=config.weight_decay
        )

    @property
    def base_lr(self) -> float:
        return self.config.lr

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

    def learning_rate(self, progress: float) -> float:
        """Linear warm-up over the first ``warmup`` fraction of training, then cosine decay to 0."""
        warmup = self.config.warmup
        if progress < warmup:
            return self.base_lr * (progress / warmup)
        return self.base_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / max(1e-8, 1 - warmup))))

    def fine_grained_scale(self, progress: float) -> float:
        """0 before ``fine_start``, then a linear ramp to 1 over ``fine_ramp`` (fractions of training).

        Training from scratch, the token-level terms at full weight from step 0 keep the towers from
        learning the global alignment they rely on (DESIGN §8); fine-tuning can start them at once
        (``--fine-start 0 --fine-ramp 0``)."""
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
        )
        logit_scale = outputs.pop("logit_scale")
        return MulCLIPFeatures(**outputs), logit_scale, active

    def step(self, batch: Batch, progress: float) -> dict[str, float]:
        """One optimisation step; returns the logged values (each loss term unweighted, total, lr)."""
        lr = self.learning_rate(progress)
        fine_scale = self.fine_grained_scale(progress)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        # Gradient accumulation: micro-batches of batch / accum_steps, each a contrastive batch of its own
        # (negatives come from the global micro-batch, as in open_clip without feature caching); the
        # gradient is the mean of the micro-batch losses' gradients. Splitting into micro-batches before
        # ranks makes N ranks compute exactly what one process does with the same --accum-steps.
        accum = self.config.accum_steps
        terms_sum: dict[str, torch.Tensor] = {}
        for micro in range(accum):
            part = batch.shard(micro, accum) if accum > 1 else batch
            if self.context.enabled:
                part = part.shard(self.context.rank, self.context.world_size)
            part = part.to(self.device)
            # Under DDP, gradients are averaged over ranks once, in the last micro-batch's backward.
            last = micro == accum - 1
            sync = contextlib.nullcontext() if last or not self.context.enabled else self.forward_module.no_sync()
            with sync:
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.precision == "bf16"):
                    features, logit_scale, active = self.compute_features(part, fine_scale)
                    loss_fn = DistributedMulCLIPLoss(self.loss_fn if active else self._global_only, self.context)
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

    @property
    def _global_only(self) -> MulCLIPLoss:
        if not hasattr(self, "_global_loss"):
            self._global_loss = MulCLIPLoss(
                objective="global",
                terms=tuple(t for t in self.terms if t not in FINE_GRAINED_TERMS),
                weights=self.config.weights,
            )
        return self._global_loss

    def state_dict(self, step: int, elapsed: float) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": step,
            "elapsed": elapsed,
            "rng": _rng_state(),
        }

    def load_state_dict(self, state: dict) -> tuple[int, float]:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"])
        return int(state["step"]), float(state["elapsed"])


# ---------------------------------------------------------------------------------------------- run
class _StopRequest:
    """SIGINT / SIGTERM set a flag; the loop saves a checkpoint after the current step and exits."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


class RunLog:
    """``metrics.jsonl`` / ``val.jsonl`` writer plus a tqdm bar on a terminal or plain log lines."""

    def __init__(self, out: str, total_steps: int, start_step: int, resumed: bool, enabled: bool = True):
        self.enabled = enabled  # False on the ranks other than 0 of a distributed run: they write nothing
        self.bar = None
        if not enabled:
            return
        self.metrics_path = os.path.join(out, "metrics.jsonl")
        self.val_path = os.path.join(out, "val.jsonl")
        if resumed:  # drop what was logged after the checkpoint we resume from: it will be redone
            for path in (self.metrics_path, self.val_path):
                _truncate_jsonl(path, start_step)
        else:
            for path in (self.metrics_path, self.val_path):
                if os.path.exists(path):
                    os.remove(path)
        self.total_steps = total_steps
        self.tty = sys.stderr.isatty()
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self.print_every = max(1, total_steps // 20)

    def metrics(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        step = record["step"]
        if self.bar is not None:
            self.bar.update(step + 1 - self.bar.n)
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.1e}")
        elif (step + 1) % self.print_every == 0 or step == 0:
            terms = " ".join(f"{k}={record[k]:.3f}" for k in ("loss", *TERM_NAMES) if k in record)
            print(
                f"step {step + 1}/{self.total_steps} {terms} lr={record['lr']:.2e} "
                f"{record['samples_per_s']:.0f} samples/s",
                flush=True,
            )

    def val(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.val_path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        self.write(f"val step {record['step']}: t2i R@5 {record['t2i_r5']:.3f} i2t R@5 {record['i2t_r5']:.3f}")

    def write(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


TERM_NAMES = ("global_long", "global_short", "word", "sub", "finelip")


def _truncate_jsonl(path: str, keep_before_step: int) -> None:
    if not os.path.exists(path):
        return
    with open(path) as handle:
        kept = [line for line in handle if line.strip() and json.loads(line)["step"] < keep_before_step]
    _atomic_write_text(path, "".join(kept))


def _save_checkpoint(trainer: Trainer, out: str, step: int, elapsed: float) -> str:
    folder = checkpoint_dir(out)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"step_{step:08d}.pt")
    _atomic_torch_save(trainer.state_dict(step, elapsed), path)
    names = sorted(f for f in os.listdir(folder) if f.startswith("step_") and f.endswith(".pt"))
    for old in names[: max(0, len(names) - trainer.config.keep_checkpoints)]:
        os.remove(os.path.join(folder, old))
    return path


def _count_steps(config: TrainConfig, train_len: int) -> int:
    per_epoch = train_len // config.batch_size
    if per_epoch < 1:
        raise DataError(f"--batch-size {config.batch_size} is larger than the training set ({train_len} samples)")
    return config.epochs * per_epoch if config.epochs else config.steps


def resolve_config(config: TrainConfig) -> TrainConfig:
    """Fill the defaults that depend on other settings and validate everything; raises ConfigError."""
    c = dataclasses.replace(config, weights=dict(config.weights), model_overrides=dict(config.model_overrides))
    if c.preset not in PRESETS:
        raise ConfigError(f"unknown --preset {c.preset!r}; choose one of {sorted(PRESETS)}")
    if c.loss not in OBJECTIVES:
        raise ConfigError(f"unknown --loss {c.loss!r}; choose one of {sorted(OBJECTIVES)}")
    parse_data_spec(c.data)  # raises DataError with the reason
    if c.init is not None:
        kind, _, path = c.init.partition(":")
        if kind not in ("openai", "longclip") or not path:
            raise ConfigError(f"--init must be openai:PATH or longclip:PATH, got {c.init!r}")
        if not os.path.isfile(path):
            raise CheckpointError(f"--init checkpoint not found: {path}")
    if c.precision not in ("fp32", "bf16"):
        raise ConfigError(f"--precision must be fp32 or bf16, got {c.precision!r}")
    if c.compile is not None and c.compile not in torch._dynamo.list_backends(exclude_tags=()):
        raise ConfigError(
            f"--compile backend {c.compile!r} unknown; torch.compile knows {torch._dynamo.list_backends()}"
        )
    if c.accum_steps < 1 or c.batch_size % c.accum_steps:
        raise ConfigError(f"--accum-steps must be >= 1 and divide --batch-size {c.batch_size}, got {c.accum_steps}")
    if c.steps is not None and c.epochs is not None:
        raise ConfigError("give --steps or --epochs, not both")
    if c.steps is None and c.epochs is None:
        c.steps = DEFAULT_STEPS_SCRATCH
    for name in ("steps", "epochs"):
        value = getattr(c, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name} must be >= 1, got {value}")
    if c.lr is None:
        c.lr = DEFAULT_LR_FINETUNE if c.init else DEFAULT_LR_SCRATCH
    checks = {
        "batch-size": c.batch_size >= 2,
        "lr": c.lr > 0,
        "weight-decay": c.weight_decay >= 0,
        "warmup": 0 <= c.warmup < 1,
        "fine-start": 0 <= c.fine_start <= 1,
        "fine-ramp": 0 <= c.fine_ramp <= 1,
        "time-limit": c.time_limit >= 0,
        "max-subcaptions": c.max_subcaptions >= 1,
        "sap-topk-ratio": 0 < c.sap_topk_ratio <= 1,
        "freeze-positions": 0 <= c.freeze_positions <= 248,
        "keep-checkpoints": c.keep_checkpoints >= 1,
        "log-every": c.log_every >= 1,
        "eval-pairs": c.eval_pairs >= 0,
        "val-pairs": c.val_pairs >= 1,
        "num-workers": c.num_workers >= 0,
        "train-size": c.train_size >= c.batch_size,
        "twin-fraction": 0 <= c.twin_fraction <= 1,
    }
    bad = [name for name, ok in checks.items() if not ok]
    if bad:
        raise ConfigError(f"invalid value for --{bad[0]} ({getattr(c, bad[0].replace('-', '_'))})")
    if c.sap_pairing not in ("matched", "all"):
        raise ConfigError(f"--sap-pairing must be matched or all, got {c.sap_pairing!r}")
    unknown = set(c.weights) - set(TERM_NAMES)
    if unknown:
        raise ConfigError(f"unknown loss term weight(s) {sorted(unknown)}")
    try:
        preset_config(c.preset, **c.model_overrides)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad --model override: {exc}") from None
    if c.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {c.device} requested but CUDA is not available")
    return c


def train(config: TrainConfig, resume: bool = False, stop_at_step: int | None = None) -> dict:
    """Run (or resume) a training job; returns the summary (also the final evaluation, if run).

    ``stop_at_step`` ends the run after that many steps as if interrupted (checkpoint written): tests
    use it to check that resuming is exact.
    """
    out = config.out
    state = None
    if resume:
        latest = find_latest_checkpoint(out)
        if latest is None:
            raise CheckpointError(f"--resume: no checkpoint in {checkpoint_dir(out)}")
        state = load_training_checkpoint(latest)
        if state is None:
            raise CheckpointError(f"--resume: {latest} is not a training checkpoint")
        # The stored config defines the run; only where it runs may change.
        config = dataclasses.replace(TrainConfig(**state["config"]), device=config.device, out=out)
    config = resolve_config(config)
    if config.threads:
        torch.set_num_threads(config.threads)
    # Under torchrun every rank runs this function; rank 0 alone writes the run directory.
    context = init_distributed(config.device)
    if context.enabled:
        if config.batch_size % context.world_size:
            raise ConfigError(f"--batch-size {config.batch_size} must be a multiple of the {context.world_size} ranks")
        if config.device.startswith("cuda"):
            config = dataclasses.replace(config, device=f"cuda:{context.local_rank}")
    main_rank = context.is_main
    os.makedirs(out, exist_ok=True)

    image_size = preset_config(config.preset, **config.model_overrides).image_resolution
    synthetic = config.data == "synthetic"
    train_set = open_dataset(
        config.data,
        "train",
        image_size,
        config.train_size,
        config.seed,
        config.image_root,
        config.eval_pairs,
        twin_fraction=config.twin_fraction,
    )
    total_steps = _count_steps(config, len(train_set))
    trainer = Trainer(config, total_steps, context)
    start_step, elapsed_before = 0, 0.0
    if state is not None:
        start_step, elapsed_before = trainer.load_state_dict(state)
    if main_rank:
        _atomic_write_text(
            os.path.join(out, "config.json"),
            json.dumps(
                {
                    **config.to_dict(),
                    "total_steps": total_steps,
                    "backend_resolved": trainer.backend,
                    "world_size": context.world_size,
                },
                indent=2,
            ),
        )
    val_set = None
    val_every = config.val_every or max(1, total_steps // 5)
    if config.data == "synthetic":
        val_set = open_dataset("synthetic", "val", image_size, config.val_pairs, config.seed)

    log = RunLog(out, total_steps, start_step, resumed=state is not None, enabled=main_rank)
    log.write(
        f"training {config.preset} ({trainer.model.num_parameters() / 1e6:.2f}M non-embedding parameters) "
        f"with --loss {config.loss} terms {', '.join(trainer.terms)} on {config.data}, backend {trainer.backend}, "
        f"{total_steps} steps of {config.batch_size} on {config.device} -> {out}"
        + ("" if state is None else f" (resumed at step {start_step})")
    )
    # Records the loader could not use (bad lines, missing fields): listed, never silently dropped.
    bad_records = getattr(train_set, "bad_records", [])
    if bad_records:
        log.write(f"{len(bad_records)} bad records skipped (see bad_records.json), e.g. {bad_records[0]}")
        if main_rank:
            _atomic_write_text(os.path.join(out, "bad_records.json"), json.dumps(bad_records, indent=2))
    collator = Collator(config.max_subcaptions, with_subcaptions=trainer.needs_subcaptions)
    skipped: dict[str, str] = {}
    step, interrupted, time_limited = start_step, None, False
    loop_start = time.perf_counter()
    try:
        with _StopRequest() as stop:
            batches = iterate_batches(
                train_set,
                collator,
                config.batch_size,
                config.seed,
                start_step,
                config.num_workers,
                shuffle=not synthetic,  # generated samples are independent draws; twins must stay adjacent
            )
            while step < total_steps:
                elapsed = elapsed_before + time.perf_counter() - loop_start
                progress = step / total_steps
                if config.time_limit:
                    elapsed = agree(elapsed, context)  # every rank must stop at the same step
                    if elapsed >= config.time_limit:
                        time_limited = True
                        log.write(f"time limit of {config.time_limit:.0f} s reached at step {step}")
                        break
                    # Under a time limit the schedule follows whichever runs out first, steps or time.
                    progress = max(progress, elapsed / config.time_limit)
                t0 = time.perf_counter()
                _, epoch, batch = next(batches)
                for path, reason in batch.skipped:
                    if path not in skipped:
                        skipped[path] = reason
                        log.write(f"skipped unreadable image {path}: {reason}")
                if len(batch) < max(2, context.world_size * config.accum_steps):
                    step += 1  # too few readable samples to contrast or split; the position is still consumed
                    continue
                logged = trainer.step(batch, progress)
                step_time = time.perf_counter() - t0
                if step % config.log_every == 0 or step == total_steps - 1:
                    log.metrics(
                        {
                            "step": step,
                            "epoch": epoch,
                            **logged,
                            "samples_per_s": len(batch) / step_time,
                            "step_time_s": step_time,
                            "memory_mb": _peak_memory_mb(trainer.device),
                            "elapsed_s": elapsed_before + time.perf_counter() - loop_start,
                        }
                    )
                step += 1
                if main_rank and val_set is not None and (step % val_every == 0) and step < total_steps:
                    log.val({"step": step, **evaluate(trainer.model, val_set, device=trainer.device)})
                if main_rank and config.checkpoint_every and step % config.checkpoint_every == 0:
                    _save_checkpoint(trainer, out, step, elapsed_before + time.perf_counter() - loop_start)
                if agree(stop.signal is not None, context) or step == stop_at_step:
                    interrupted = stop.signal or "stop_at_step"
                    break
    finally:
        log.close()
    train_seconds = elapsed_before + time.perf_counter() - loop_start
    if not main_rank:
        shutdown_distributed(context)
        return {"steps": step, "total_steps": total_steps, "interrupted": interrupted, "rank": context.rank}
    path = _save_checkpoint(trainer, out, step, train_seconds)
    summary = {
        "steps": step,
        "total_steps": total_steps,
        "train_seconds": train_seconds,
        "checkpoint": path,
        "skipped_images": len(skipped),
        "bad_records": len(bad_records),
        "interrupted": interrupted,
        "time_limited": time_limited,
    }
    if skipped:
        _atomic_write_text(os.path.join(out, "skipped.json"), json.dumps(skipped, indent=2))
    if interrupted is not None:
        reason = "a signal" if isinstance(interrupted, int) else "--stop-at-step"
        print(f"stopped by {reason} at step {step}; checkpoint {path}; continue with --resume --out {out}", flush=True)
        shutdown_distributed(context)
        return summary
    if config.eval_pairs:
        test_set = open_dataset(
            config.data, "test", image_size, config.eval_pairs, config.seed, config.image_root, config.eval_pairs
        )
        if len(test_set) > config.eval_pairs:
            test_set = torch.utils.data.Subset(test_set, range(config.eval_pairs))
        result = evaluate(trainer.model, test_set, device=trainer.device)
        _atomic_write_text(os.path.join(out, "eval.json"), json.dumps(result, indent=2))
        summary["eval"] = result
        with open(os.path.join(out, "val.jsonl"), "a") as handle:
            handle.write(json.dumps({"step": step, "split": "test", **result}) + "\n")
    _write_plots(out)
    summary["wall_seconds"] = time.perf_counter() - loop_start + elapsed_before
    _atomic_write_text(os.path.join(out, "summary.json"), json.dumps(summary, indent=2))
    print(_summary_table(config, summary, trainer), flush=True)
    shutdown_distributed(context)
    return summary


def _read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _write_plots(out: str) -> None:
    """``loss.png`` (every loss term over the steps) and ``retrieval.png`` (validation recall and binding)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = _read_jsonl(os.path.join(out, "metrics.jsonl"))
    if metrics:
        fig, ax = plt.subplots(figsize=(7, 4))
        steps = [m["step"] for m in metrics]
        for name in ("loss", *TERM_NAMES):
            if name in metrics[-1]:
                values = [m.get(name, float("nan")) for m in metrics]
                ax.plot(steps, values, label=name, linewidth=1.0 if name != "loss" else 1.8)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (unweighted terms)")
        ax.set_title("training losses")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out, "loss.png"), dpi=100)
        plt.close(fig)
    vals = _read_jsonl(os.path.join(out, "val.jsonl"))
    if vals:
        fig, ax = plt.subplots(figsize=(7, 4))
        for key in ("t2i_r1", "t2i_r5", "i2t_r1", "i2t_r5", "binding_acc"):
            points = [(v["step"], v[key]) for v in vals if v.get(key) is not None and v.get("split") != "test"]
            line = ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=key)[0] if points else None
            final = [v for v in vals if v.get("split") == "test" and v.get(key) is not None]
            if final:
                color = line.get_color() if line else None
                ax.scatter([final[-1]["step"]], [final[-1][key]], marker="*", s=120, color=color)
        ax.set_ylim(0, 1)
        ax.set_xlabel("step")
        ax.set_title("retrieval (lines: validation, stars: final test)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out, "retrieval.png"), dpi=100)
        plt.close(fig)


def _summary_table(config: TrainConfig, summary: dict, trainer: Trainer) -> str:
    metrics = _read_jsonl(os.path.join(config.out, "metrics.jsonl"))
    tail = metrics[-10:]
    rows = [
        ("objective", f"{config.loss} ({', '.join(trainer.terms)})"),
        ("steps", f"{summary['steps']} / {summary['total_steps']}"),
        ("training time", f"{summary['train_seconds']:.1f} s"),
    ]
    if tail:
        rows.append(("samples / s", f"{sum(m['samples_per_s'] for m in tail) / len(tail):.1f} (last 10 steps)"))
        for name in ("loss", *TERM_NAMES):
            values = [m[name] for m in tail if name in m]
            if values:
                rows.append((f"final {name}", f"{sum(values) / len(values):.4f}"))
        rows.append(("peak memory", f"{tail[-1]['memory_mb']:.0f} MB"))
    if summary.get("skipped_images"):
        rows.append(("skipped images", f"{summary['skipped_images']} (see skipped.json)"))
    if summary.get("bad_records"):
        rows.append(("bad records", f"{summary['bad_records']} (see bad_records.json)"))
    width = max(len(r[0]) for r in rows)
    lines = ["", "summary", "-" * 40] + [f"{k:<{width}}  {v}" for k, v in rows]
    if "eval" in summary:
        lines += ["-" * 40, format_table(summary["eval"])]
    lines.append(f"run directory: {config.out}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mulclip_fast.train",
        description="Train MulCLIP (or an ablation / baseline). No arguments: a tiny model on synthetic data, CPU.",
    )
    d = TrainConfig()
    g = p.add_argument_group("model and data")
    g.add_argument("--preset", choices=sorted(PRESETS), default=d.preset)
    g.add_argument("--model", action="append", default=[], metavar="FIELD=INT", help="override a preset field")
    g.add_argument(
        "--data",
        default=d.data,
        help="synthetic | docci:PATH | sharegpt4v:PATH | dci:PATH | urban1k:PATH (dci, urban1k: evaluation only)",
    )
    g.add_argument("--image-root", default=None, help="folder the dataset's image paths are relative to")
    g.add_argument("--init", default=None, help="openai:PATH | longclip:PATH (local checkpoint file)")
    g.add_argument(
        "--freeze-positions", type=int, default=d.freeze_positions, help="leading text positions kept frozen"
    )
    g.add_argument("--train-size", type=int, default=d.train_size, help="synthetic training samples per epoch")
    g.add_argument(
        "--twin-fraction",
        type=float,
        default=d.twin_fraction,
        help="synthetic training pairs followed by their colour-swapped twin in the same batch",
    )
    g.add_argument("--max-subcaptions", type=int, default=d.max_subcaptions)
    g = p.add_argument_group("objective")
    g.add_argument("--loss", choices=sorted(OBJECTIVES), default=d.loss)
    g.add_argument("--no-wpr", action="store_true", help="leave out word-patch reconstruction")
    g.add_argument("--no-sap", action="store_true", help="leave out subcaption-aggregated patches")
    for term in TERM_NAMES:
        g.add_argument(f"--w-{term.replace('_', '-')}", type=float, default=None, help=f"weight of the {term} term")
    g.add_argument("--sap-pairing", choices=("matched", "all"), default=d.sap_pairing)
    g.add_argument("--sap-topk-ratio", type=float, default=d.sap_topk_ratio)
    g.add_argument("--sap-raw-patches", action="store_true", help="SAP on raw patches, not calibrated ones")
    g.add_argument("--fine-start", type=float, default=d.fine_start, help="fraction of training before WPR/SAP")
    g.add_argument("--fine-ramp", type=float, default=d.fine_ramp, help="fraction over which they ramp to 1")
    g.add_argument("--backend", choices=("auto", "torch", "triton", "reference"), default=d.backend)
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=None, help=f"optimisation steps (default {DEFAULT_STEPS_SCRATCH})")
    g.add_argument("--epochs", type=int, default=None)
    g.add_argument("--time-limit", type=float, default=None, help="seconds of training at most (0: none)")
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default 5e-4 scratch, 1e-6 --init)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--warmup", type=float, default=d.warmup, help="warm-up fraction of training")
    g.add_argument("--seed", type=int, default=d.seed)
    g = p.add_argument_group("run")
    g.add_argument("--out", default=d.out, help="run directory")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    g.add_argument("--device", default=d.device)
    g.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default=None,
        help="bf16: autocast the step (default fp32; the no-argument run uses bf16 on CPUs with native bf16)",
    )
    g.add_argument(
        "--grad-checkpointing", action="store_true", help="recompute the towers' blocks in backward (less memory)"
    )
    g.add_argument(
        "--accum-steps", type=int, default=d.accum_steps, help="micro-batches per step; contrast within each"
    )
    g.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        default=None,
        metavar="BACKEND",
        help="torch.compile the towers' transformers (backend inductor unless named)",
    )
    g.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads (0: torch's default)")
    g.add_argument("--num-workers", type=int, default=d.num_workers, help="data loader processes")
    g.add_argument("--log-every", type=int, default=d.log_every)
    g.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="steps (0: only at the end)")
    g.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints)
    g.add_argument("--val-every", type=int, default=d.val_every, help="steps between validations (0: 5 per run)")
    g.add_argument("--val-pairs", type=int, default=d.val_pairs)
    g.add_argument("--eval-pairs", type=int, default=d.eval_pairs, help="held-out pairs of the final evaluation")
    g.add_argument("--stop-at-step", type=int, default=None, help=argparse.SUPPRESS)
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    overrides = {}
    for item in args.model:
        key, sep, value = item.partition("=")
        if not sep or not value.lstrip("-").isdigit():
            raise ConfigError(f"--model expects FIELD=INT, got {item!r}")
        overrides[key] = int(value)
    weights = {t: getattr(args, f"w_{t}") for t in TERM_NAMES if getattr(args, f"w_{t}") is not None}
    # The no-argument run (synthetic data, no length given, from scratch) promises to finish in a few
    # minutes even on a busy machine, and autocasts to bf16 where the CPU computes it natively: 1.2× the
    # steps in the same time, which the from-scratch learning curve turns into much better retrieval
    # and binding (README "Default run").
    default_run = args.data == "synthetic" and args.steps is None and args.epochs is None and not args.init
    time_limit = args.time_limit
    if time_limit is None:
        time_limit = DEFAULT_TIME_LIMIT_SYNTHETIC if default_run else 0.0
    precision = args.precision
    if precision is None:
        precision = "bf16" if default_run and args.device == "cpu" and cpu_has_native_bf16() else "fp32"
    return TrainConfig(
        preset=args.preset,
        model_overrides=overrides,
        data=args.data,
        image_root=args.image_root,
        init=args.init,
        freeze_positions=args.freeze_positions,
        loss=args.loss,
        wpr=not args.no_wpr,
        sap=not args.no_sap,
        weights=weights,
        sap_pairing=args.sap_pairing,
        sap_topk_ratio=args.sap_topk_ratio,
        sap_raw_patches=args.sap_raw_patches,
        max_subcaptions=args.max_subcaptions,
        fine_start=args.fine_start,
        fine_ramp=args.fine_ramp,
        steps=args.steps,
        epochs=args.epochs,
        time_limit=time_limit,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup=args.warmup,
        seed=args.seed,
        train_size=args.train_size,
        twin_fraction=args.twin_fraction,
        out=args.out,
        device=args.device,
        backend=args.backend,
        num_workers=args.num_workers,
        log_every=args.log_every,
        checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints,
        val_every=args.val_every,
        val_pairs=args.val_pairs,
        eval_pairs=args.eval_pairs,
        threads=args.threads,
        precision=precision,
        grad_checkpointing=args.grad_checkpointing,
        accum_steps=args.accum_steps,
        compile=args.compile,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
        summary = train(config, resume=args.resume, stop_at_step=args.stop_at_step)
    except (ConfigError, DataError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted twice: stopped without a final checkpoint", file=sys.stderr)
        return 130
    interrupted = summary["interrupted"]
    if isinstance(interrupted, int):
        return 128 + interrupted
    return 0

