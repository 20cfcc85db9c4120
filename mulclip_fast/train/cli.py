"""The command line of ``python -m mulclip_fast.train``."""

from __future__ import annotations

import argparse
import sys

from ..data import DataError
from ..losses import OBJECTIVES, TERMS
from ..model import PRESETS, CheckpointError
from .config import (
    DEFAULT_STEPS_SCRATCH,
    DEFAULT_TIME_LIMIT_SYNTHETIC,
    ConfigError,
    TrainConfig,
    cpu_has_native_bf16,
)
from .loop import train


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
    for term in TERMS:
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
    weights = {t: getattr(args, f"w_{t}") for t in TERMS if getattr(args, f"w_{t}") is not None}
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
