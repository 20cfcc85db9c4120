"""Child processes of the GPU check, each ended with everything it started.

The precompile workers (``precompile.py``) and the extension's background build (``background_build.py``) start
compilers of their own (Triton's ptxas; ninja and nvcc). So each is started as the leader of a new session, and
so of a process group of its own, and ended with that whole group: its compilers end with it instead of running
on. :class:`ChildGroup` is that start and that end; as a context manager it ends the group when its ``with``
block is left, however it is left (a time limit's ``TimeUp`` included).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess


class ChildGroup:
    """``command`` started as the leader of a new session, its stdin ``/dev/null``.

    ``stdout`` and ``stderr`` are what :class:`subprocess.Popen` takes (a file, ``subprocess.STDOUT``); ``env`` its
    environment (this process's by default); ``niceness`` is added to its scheduling niceness, which the compilers
    it starts inherit. ``grace_s`` says how :meth:`end` ends it: SIGTERM to the group, then SIGKILL if the leader
    still runs ``grace_s`` later (for a child that must clean up on the way out); with no grace, SIGKILL at once.
    """

    def __init__(self, command, *, stdout, stderr, env=None, niceness: int = 0, grace_s: float = 0.0):
        self.grace_s = grace_s
        self.process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, env=env, start_new_session=True
        )
        if niceness:
            # Set once started, which is early enough: the child imports Python for a second or more before it
            # starts a compiler.
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, self.process.pid, niceness)

    def end(self) -> bool:
        """Ends the group if its leader still runs, and waits for the leader; whether it was still running."""
        if self.process.poll() is not None:
            return False
        with contextlib.suppress(ProcessLookupError):  # it ended between the poll and a signal
            if self.grace_s > 0:
                os.killpg(self.process.pid, signal.SIGTERM)
                try:
                    self.process.wait(self.grace_s)
                except subprocess.TimeoutExpired:
                    os.killpg(self.process.pid, signal.SIGKILL)
            else:
                os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        return True

    def __enter__(self) -> ChildGroup:
        return self

    def __exit__(self, *exc) -> None:
        self.end()
