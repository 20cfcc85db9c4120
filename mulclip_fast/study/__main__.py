"""Command line of the study: ``python -m mulclip_fast.study [--quick] [--out DIR] [--rows KEY,...]``."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from ..data import DataError
from ..model import CheckpointError
from ..train import ConfigError
from .plan import ALL_ROWS, FULL, QUICK, ROW_KEYS, ROWS
from .report import QUESTION_METRICS, verdict
from .runner import StudyError, run_study


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mulclip_fast.study",
        description="Pretrain a tiny CLIP on short captions, fine-tune every ablation row on long captions for "
        "several seeds, and tabulate mean ± std (docs/study.md). Resumes when run again with the same --out.",
    )
    parser.add_argument("--out", default="runs/study", help="study directory (default: runs/study)")
    parser.add_argument("--quick", action="store_true", help="toy sizes: the whole pipeline in under a minute")
    parser.add_argument(
        "--rows",
        default=",".join(row.key for row in ROWS),
        help=f"rows to run, comma-separated (default: the ablation's; all: {', '.join(ROW_KEYS)})",
    )
    full, quick = (",".join(map(str, settings.seeds)) for settings in (FULL, QUICK))
    parser.add_argument(
        "--seeds", default=None, help=f"fine-tuning seeds, comma-separated (default: {full}; {quick} with --quick)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = QUICK if args.quick else FULL
    try:
        keys = [k.strip() for k in args.rows.split(",") if k.strip()]
        unknown = [k for k in keys if k not in ROW_KEYS]
        if unknown or not keys:
            raise StudyError(f"--rows: unknown row(s) {unknown}; choose from {', '.join(ROW_KEYS)}")
        if args.seeds is not None:
            try:
                seeds = tuple(int(s) for s in args.seeds.split(","))
            except ValueError:
                raise StudyError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
            if len(set(seeds)) != len(seeds) or not seeds:
                raise StudyError(f"--seeds must be distinct, got {args.seeds!r}")
            settings = dataclasses.replace(settings, seeds=seeds)
        rows = tuple(row for row in ALL_ROWS if row.key in keys)
        results = run_study(args.out, settings, rows)
    except (StudyError, ConfigError, CheckpointError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"interrupted: {exc}; run the same command again to resume", file=sys.stderr)
        return 130
    with open(f"{args.out}/results.md") as handle:
        print(handle.read())
    comparison = results.get("mulclip_vs_global", {})
    for key in QUESTION_METRICS:
        if key in comparison:
            print(f"{key}: {verdict(comparison[key])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
