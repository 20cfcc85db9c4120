"""A run directory belongs to one run (docs/training.md, "Run directory").

``claim_run_directory`` is the first thing a run does, before any expensive work: it checks that ``--out``
can be a run directory, takes its lock (a second run into it is refused while the first holds it), applies
the policy for a directory an earlier run used (refused unless ``--resume`` continues that run or
``--overwrite`` deletes it, so two runs' files never mix) and removes the temporaries a killed save left.
"""

from __future__ import annotations

import fcntl
import os
import shutil

from ..run_checkpoints import checkpoint_dir
from .config import ConfigError

LOCK_FILE = "run.lock"
# Every file a run writes into its directory (besides checkpoints/): what --overwrite deletes, and what
# marks a directory as used by an earlier run. Files of the user's own in the same folder are left alone.
RUN_FILES = (
    "config.json",
    "metrics.jsonl",
    "val.jsonl",
    "eval.json",
    "summary.json",
    "loss.png",
    "retrieval.png",
    "skipped.json",
    "bad_records.json",
)
# atomic_torch_save / atomic_write_text write ``NAME.tmp.PID`` and rename it; a kill in between leaves it.
TEMPORARY_MARKER = ".tmp."


class RunDirectoryLock:
    """An exclusive ``flock`` on ``OUT/run.lock``, held while the run writes the directory.

    The kernel drops it when the process ends, however it ends (a crash or kill -9 included), so a
    stale lock never blocks a later run.
    """

    def __init__(self, out: str, created: bool = False):
        self.out, self.created = out, created
        self.path = os.path.join(out, LOCK_FILE)
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ConfigError(f"--out {out} is not writable: {exc.strerror}") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            raise ConfigError(
                f"--out {out} is in use by another run (process {holder} holds {self.path}); "
                "wait for it to end or choose another --out"
            ) from None
        # The holder's pid, for the message a refused run prints.
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def release_unused(self) -> None:
        """Release the lock of a run that failed before writing anything (a bad ``--init`` file, an unreadable
        dataset): ``out`` is left as the run found it, without the lock file, and removed if the claim made it."""
        if self._fd is None:
            return
        if os.listdir(self.out) == [LOCK_FILE]:
            os.remove(self.path)  # while still holding the lock, so no other run has taken it
            self.release()
            if self.created:
                os.rmdir(self.out)
        else:
            self.release()


def _check_out(out: str) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out {out} is a file, not a directory")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create --out {out}: {exc.strerror}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out} is not writable")


def earlier_run_files(out: str) -> list[str]:
    """The files of an earlier run in ``out`` (its run files and checkpoints), by name."""
    found = [name for name in RUN_FILES if os.path.exists(os.path.join(out, name))]
    folder = checkpoint_dir(out)
    if os.path.isdir(folder) and os.listdir(folder):
        found.append(os.path.basename(folder) + "/")
    return found


def _delete_earlier_run(out: str) -> None:
    for name in RUN_FILES:
        path = os.path.join(out, name)
        if os.path.exists(path):
            os.remove(path)
    shutil.rmtree(checkpoint_dir(out), ignore_errors=True)


def _remove_stale_temporaries(out: str) -> list[str]:
    """Delete the half-written files saves killed mid-way left; safe only while holding the lock."""
    removed = []
    for folder in (out, checkpoint_dir(out)):
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            if TEMPORARY_MARKER in name and (name.startswith("step_") or name.split(TEMPORARY_MARKER)[0] in RUN_FILES):
                os.remove(os.path.join(folder, name))
                removed.append(os.path.join(folder, name))
    return removed


def claim_run_directory(out: str, resume: bool, overwrite: bool) -> RunDirectoryLock:
    """Make ``out`` this run's directory; returns the lock to release when the run ends.

    Raises ``ConfigError`` when ``out`` is a file or unwritable, another run holds it, or it holds an
    earlier run and neither ``resume`` nor ``overwrite`` says what to do with it.
    """
    if resume and overwrite:
        raise ConfigError("--resume continues the run in --out and --overwrite deletes it: give one of them")
    created = not os.path.exists(out)
    _check_out(out)
    lock = RunDirectoryLock(out, created)
    try:
        earlier = earlier_run_files(out)
        if earlier and not resume and not overwrite:
            raise ConfigError(
                f"--out {out} holds an earlier run ({', '.join(earlier)}): continue it with --resume, "
                "start over with --overwrite (deletes its checkpoints and logs), or choose another --out"
            )
        if overwrite:
            _delete_earlier_run(out)
        for path in _remove_stale_temporaries(out):
            print(f"removed {path}, left by a save that was interrupted", flush=True)
    except BaseException:
        lock.release()
        raise
    return lock
