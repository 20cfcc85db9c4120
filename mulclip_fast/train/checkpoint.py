"""Writing a run's files without half-written states, keeping the newest checkpoints, and RNG states.

The checkpoint format itself (what a checkpoint holds, where it lives, how an old one is read) is in
``mulclip_fast.run_checkpoints``, which evaluation reads too.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from ..model import CheckpointError
from ..run_checkpoints import checkpoint_dir, checkpoint_path, list_checkpoints


def _write_atomically(path: str, write) -> None:
    """``write(tmp)`` to a temporary file in the same folder, then rename: a crash never leaves half a file.

    A write that fails (disk full, no permission) removes its partial temporary and raises
    ``CheckpointError`` saying why; a file already at ``path`` is left as it was.
    """
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch's zip writer reports a failed write as a RuntimeError
        if os.path.exists(tmp):
            os.remove(tmp)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise CheckpointError(f"cannot write {path}: {reason} (the partial file was removed)") from None


def atomic_torch_save(obj, path: str) -> None:
    """``torch.save`` that leaves either the old file or the whole new one (see ``_write_atomically``)."""
    _write_atomically(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(path: str, text: str) -> None:
    """The same for text files (config, summaries, logs rewritten on resume)."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as handle:
            handle.write(text)

    _write_atomically(path, write)


def save_checkpoint(state: dict, out: str, keep: int) -> str:
    """Write ``state`` (a ``Trainer.state_dict``) as the run's checkpoint of its step, then delete all but
    the ``keep`` newest; returns the path written."""
    os.makedirs(checkpoint_dir(out), exist_ok=True)
    path = checkpoint_path(out, state["step"])
    atomic_torch_save(state, path)
    paths = list_checkpoints(checkpoint_dir(out))
    for old in paths[: max(0, len(paths) - keep)]:
        os.remove(old)
    return path


def capture_rng_state() -> dict:
    """Every random generator a step draws from, so that a resumed run draws the same numbers.

    Only tensors and plain Python values: a checkpoint must load with ``torch.load(weights_only=True)``,
    which is how ``--init`` reads weights (numpy's state tuple holds an ndarray, so its key table is
    stored as a tensor)."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached_gaussian)],
        "python": random.getstate(),
    }


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, cached_gaussian = state["numpy"]  # older checkpoints: numpy's own tuple
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else keys
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached_gaussian))
    random.setstate(state["python"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
