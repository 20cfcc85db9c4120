"""A training run's CLIP weights as an OpenAI-layout checkpoint (docs/training.md, "Fine-tuning a pretrained CLIP").

    python -m mulclip_fast.export --checkpoint runs/pretrain --out pretrained.pt
    python -m mulclip_fast.train --init openai:pretrained.pt ...

The file is a plain state dict with OpenAI's key names and one text positional table, as OpenAI's CLIP
holds, so ``--init`` reads it the way it reads a released checkpoint: a 77-position text table is stretched
to 248 (Long-CLIP's rule) and the first ``--freeze-positions`` stay frozen. (Long-CLIP's own loader also
requires a second table, ``positional_embedding_res``; for a 248-position export a copy of
``positional_embedding`` under that key gives it the same model.) The calibration modules (FineLIP's token
calibration) are left out: a released CLIP has none, so fine-tuning starts them fresh from its own seed,
from an export exactly as from OpenAI's weights.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from .model import CheckpointError
from .model.loading import CALIBRATION_PREFIXES
from .run_checkpoints import load_latest_training_checkpoint, load_training_checkpoint
from .train.checkpoint import atomic_torch_save


def clip_state_dict(training_state: dict) -> dict[str, torch.Tensor]:
    """The OpenAI-layout part of a training checkpoint's model: every tensor but the calibration modules'."""
    return {k: v for k, v in training_state["model"].items() if not k.startswith(CALIBRATION_PREFIXES)}


def export_clip_weights(checkpoint: str, out: str) -> dict:
    """Write the CLIP weights of ``checkpoint`` (a run directory or a training checkpoint file) to ``out``.

    Returns what was written: the source checkpoint, its preset, model overrides and step."""
    if os.path.isdir(checkpoint):
        source, state, unreadable = load_latest_training_checkpoint(checkpoint)
        for bad, reason in unreadable:
            print(f"warning: {bad} cannot be read ({reason}); exporting the older {source}", file=sys.stderr)
    else:
        source, state = checkpoint, load_training_checkpoint(checkpoint)
        if state is None:
            raise CheckpointError(f"{checkpoint} is not a training checkpoint of mulclip-fast")
    if os.path.isdir(out):
        raise ValueError(f"--out {out} is a directory; give a file name")
    atomic_torch_save(clip_state_dict(state), out)
    config = state["config"]
    return {
        "source": source,
        "step": state["step"],
        "preset": config["preset"],
        "model_overrides": config.get("model_overrides", {}),
        "out": out,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mulclip_fast.export",
        description="Write a training run's CLIP weights as an OpenAI-layout checkpoint for --init openai:PATH.",
    )
    parser.add_argument("--checkpoint", required=True, help="run directory (its newest checkpoint) or checkpoint file")
    parser.add_argument("--out", required=True, help="the .pt file to write")
    args = parser.parse_args(argv)
    try:
        written = export_clip_weights(args.checkpoint, args.out)
    except (CheckpointError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    overrides = "".join(f" --model {k}={v}" for k, v in written["model_overrides"].items() if k != "context_length")
    print(
        f"wrote {written['out']}: the CLIP weights of {written['source']} (step {written['step']}, preset "
        f"{written['preset']}); fine-tune with --preset {written['preset']}{overrides} --init openai:{written['out']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
