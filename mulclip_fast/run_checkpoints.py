"""Checkpoints in a run directory: where training writes them, how to find the newest, how to read one.

Training writes and resumes them (``mulclip_fast.train``) and evaluation reads them (``mulclip_fast.eval``);
training also evaluates, so the format lives here, below both, and neither has to import the other's
internals. A checkpoint is a dict holding ``format``, ``version``, the run's ``config`` (a ``TrainConfig``
as a dict), the ``model`` and ``optimizer`` state, the ``step``, the ``elapsed`` training seconds and the
``rng`` states; training adds the images it skipped (``skipped_images``) and the last step's duration
(``step_seconds``, the pace ``--time-limit`` goes by).
"""

from __future__ import annotations

import datetime
import functools
import io
import os

import torch

from .losses import current_term_names
from .model import CheckpointError, checkpoint_read_error

CHECKPOINT_FORMAT = "mulclip-fast-train"
# Version 2: the tiny preset's text tower gained ALiBi biases. Version-1 checkpoints are read as what they
# are, tiny towers without them (``_upgrade_checkpoint``), so old runs still evaluate and resume exactly.
# Checkpoints written before the loss terms "word" and "sub" became "wpr" and "sap" keep version 2: the
# upgrade renames their weights whatever the version.
CHECKPOINT_VERSION = 2


def checkpoint_dir(out: str) -> str:
    """The folder of a run directory that holds its checkpoints."""
    return os.path.join(out, "checkpoints")


def checkpoint_path(out: str, step: int) -> str:
    """Where the checkpoint taken after ``step`` steps goes: zero-padded, so names sort by step."""
    return os.path.join(checkpoint_dir(out), f"step_{step:08d}.pt")


def list_checkpoints(folder: str) -> list[str]:
    """The ``step_*.pt`` files of ``folder``, oldest first."""
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.startswith("step_") and f.endswith(".pt"))


def load_latest_training_checkpoint(out: str) -> tuple[str, dict, list[tuple[str, str]]]:
    """The newest checkpoint of a run directory that can be read: its path, its state, and the newer ones
    that could not be read (path, reason), which the caller must report. Raises ``CheckpointError`` when
    there is none at all, or none readable."""
    folder = checkpoint_dir(out) if os.path.isdir(checkpoint_dir(out)) else out
    paths = list_checkpoints(folder) if os.path.isdir(folder) else []
    if not paths:
        raise CheckpointError(f"no checkpoint in {folder}")
    unreadable = []
    for path in reversed(paths):
        try:
            state = load_training_checkpoint(path)
        except CheckpointError as exc:
            unreadable.append((path, str(exc)))
            continue
        if state is None:
            unreadable.append((path, "not a training checkpoint"))
            continue
        return path, state, unreadable
    raise CheckpointError(f"no readable checkpoint in {folder}: " + "; ".join(reason for _, reason in unreadable))


def load_training_checkpoint(path: str) -> dict | None:
    """A training checkpoint written by this trainer, or None when ``path`` holds something else."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        # weights_only: a checkpoint is tensors and plain values (train/checkpoint.py), and eval or export
        # of a file from elsewhere must not run the code a pickle can carry.
        with torch.serialization.safe_globals(_numpy_array_globals()):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # zip, pickle and torch errors alike mean "not a readable checkpoint"
        if "TorchScript" in str(exc) or "constants.pkl" in str(exc):
            return None
        raise checkpoint_read_error(path, exc) from None
    if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
        if state.get("version") not in (1, CHECKPOINT_VERSION):
            raise CheckpointError(
                f"{path} has checkpoint version {state.get('version')}, expected 1 or {CHECKPOINT_VERSION}"
            )
        return _upgrade_checkpoint(state)
    return None


def _numpy_array_globals() -> list:
    """What weights_only must allow for a checkpoint written before 2026-11-30, whose RNG state holds numpy's
    own tuple (an ndarray of keys): numpy's array reconstruction and nothing else, so that ``export`` (the way
    out that ``--init``'s error names), ``eval`` and ``--resume`` still read it; they build arrays and run
    nothing of the file's choosing."""
    import numpy as np

    reconstruct = np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct
    # A pickle names the function by the module of the numpy that wrote it: numpy.core before 2.0. Naming it
    # needs an allowlist that takes (object, path) pairs; without one, files the running numpy's major wrote
    # still load.
    allowed = [np.ndarray, np.dtype, reconstruct, type(np.dtype(np.uint32)), type(np.dtype(np.int64))]
    if not _allowlist_takes_paths():
        return allowed
    return allowed + [(reconstruct, f"numpy.{core}.multiarray._reconstruct") for core in ("core", "_core")]


@functools.cache
def _allowlist_takes_paths() -> bool:
    """Whether this PyTorch's ``weights_only`` allowlist takes ``(object, "module.name")`` pairs, which came
    after 2.5.0 (pytorch/pytorch#142153, opened 2024-12-05; docs/notes/2026-12-01-version-floor.md). Tried
    once, on an in-memory file whose one global is outside PyTorch's own allowlist, so that an allowlist
    without pairs fails here instead of on a checkpoint."""
    buffer = io.BytesIO()
    torch.save(datetime.timedelta(0), buffer)
    buffer.seek(0)
    try:
        with torch.serialization.safe_globals([(datetime.timedelta, "datetime.timedelta")]):
            return torch.load(buffer, weights_only=True) == datetime.timedelta(0)
    except Exception:
        return False


def _upgrade_checkpoint(state: dict) -> dict:
    """A state as this code reads it: a version-1 state's towers had no ALiBi biases, so its model overrides
    say so; weights of loss terms renamed since (``losses.RENAMED_TERMS``) go under the current names."""
    config = dict(state["config"])
    if state["version"] == 1:
        config["model_overrides"] = {"text_alibi": 0, **config.get("model_overrides", {})}
    config["weights"] = current_term_names(config.get("weights", {}), warn=False)
    return {**state, "config": config, "version": CHECKPOINT_VERSION}
