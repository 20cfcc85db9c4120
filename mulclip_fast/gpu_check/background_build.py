"""The C++/CUDA extension, built in a background process while a GPU check runs its GPU sections.

nvcc is expected to take a minute or two on ``csrc/`` (not yet measured on a GPU machine), several times the
``extension`` section's share of the time limit, while the machine's CPU cores sit mostly idle under the GPU
sections. So the runner starts ``python -m mulclip_fast.ops.extension`` before the plan's first task, the
extension tasks wait for it, and their own ``extension.require`` then loads the build it cached. The process
gets no GPU (a second CUDA context would take device memory from the sections being measured, and a GPU in
exclusive-process mode would refuse this run's own) and a lower CPU priority; it runs in a process group of its
own (a :class:`~.child_group.ChildGroup`), which :meth:`BackgroundBuild.stop` ends with every compiler in it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time

from .child_group import ChildGroup

# The extension's own build command (``python -m mulclip_fast.ops.extension``, its ``main``), which here also ends,
# with the compilers it started, if the GPU check dies without stopping it (child_group.end_with_parent). Run
# from a shell by a user, that command leaves its parent alone. (A module of this package run with -m would be
# imported twice: the package imports this one.)
COMMAND = (
    sys.executable,
    "-c",
    "from mulclip_fast.gpu_check.child_group import end_with_parent; end_with_parent(); "
    "from mulclip_fast.ops.extension import main; raise SystemExit(main([]))",
)
OUTPUT_TAIL_BYTES = 4000  # of the build's output, in the report: a compiler's error and the build's verdict
# Scheduling niceness of the build: the sections' own work (Triton compiles, launches) comes first.
NICENESS = 10
# After SIGTERM, how long the build gets to unwind (torch removes its build lock on the way out) before SIGKILL.
STOP_GRACE_S = 5.0


class BackgroundBuild:
    """One run of ``command`` in a new session (its own process group), its output in an anonymous file."""

    def __init__(self, command=COMMAND, env: dict[str, str] | None = None):
        self.started = time.monotonic()
        self.ended: float | None = None
        self.exit_code: int | None = None
        self.stopped = False
        self.error: str | None = None
        self._output = tempfile.TemporaryFile()
        self._finished = threading.Event()
        try:
            self._child = ChildGroup(
                command, stdout=self._output, stderr=subprocess.STDOUT, env=env, niceness=NICENESS, grace_s=STOP_GRACE_S
            )
        except OSError as error:  # the run goes on; the extension tasks build in-process as without it
            self.error = f"{type(error).__name__}: {error}"
            self._finished.set()
            return
        # A thread reaps it the moment it ends, so that the report's seconds are the build's own.
        threading.Thread(target=self._reap, name="extension build reaper", daemon=True).start()

    def _reap(self) -> None:
        self.exit_code = self._child.process.wait()
        self.ended = time.monotonic()
        self._finished.set()

    def wait(self) -> float:
        """Blocks until the build has ended (a signal still interrupts it: the watchdog's ``TimeUp``); the
        seconds it waited."""
        begin = time.monotonic()
        self._finished.wait()
        return time.monotonic() - begin

    def stop(self) -> None:
        """Ends the build, if it still runs, with everything it started (ninja, the compilers)."""
        if self._finished.is_set():
            return
        self.stopped = True
        self._child.end()
        self._finished.wait()

    def _output_tail(self) -> str:
        # pread: the file offset is shared with the build, which may still be writing at it
        fd = self._output.fileno()
        size = os.fstat(fd).st_size
        start = max(0, size - OUTPUT_TAIL_BYTES)
        return os.pread(fd, size - start, start).decode(errors="replace")

    def record(self) -> dict:
        """The report's ``extension_build``: status (``running``, ``built``, ``failed``, ``stopped`` at the end
        of the run, or ``not started``), exit code, seconds so far and the tail of its output."""
        if self.error is not None:
            return {"status": "not started", "exit_code": None, "seconds": 0.0, "output_tail": self.error}
        if not self._finished.is_set():
            status = "running"
        elif self.exit_code == 0:
            status = "built"
        else:
            status = "stopped" if self.stopped else "failed"
        end = self.ended if self.ended is not None else time.monotonic()
        return {
            "status": status,
            "exit_code": self.exit_code,
            "seconds": round(end - self.started, 2),
            "output_tail": self._output_tail(),
        }


def start_extension_build(cuda: bool) -> BackgroundBuild:
    """Starts ``python -m mulclip_fast.ops.extension`` with no GPU visible to it. ``cuda``: this run is on a GPU,
    whose architectures the build then compiles for (named in ``TORCH_CUDA_ARCH_LIST``, since it cannot see them)."""
    from ..ops import extension

    if cuda and extension.cuda_buildable():
        # Set here too: this process's own load then compiles with the same flags and finds the build up to date.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", extension.cuda_arch_list_for_visible_gpus())
    return BackgroundBuild(COMMAND, env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"})
