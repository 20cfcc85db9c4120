"""Child processes of the GPU check, each ended with everything it started.

The precompile workers (``precompile.py``) and the extension's background build (``background_build.py``) start
compilers of their own (Triton's ptxas; ninja and nvcc). So each is started as the leader of a new session, and
so of a process group of its own, and ended with that whole group: its compilers end with it instead of running
on. :class:`ChildGroup` is that start and that end; as a context manager it ends the group when its ``with``
block is left, however it is left (a time limit's ``TimeUp`` included).

No ``with`` or ``finally`` runs when the GPU check itself is SIGKILLed (``.ci/gpu-check``'s outer ``timeout -s
KILL``), and a child in a session of its own would compile on. So a child that calls :func:`end_with_parent`
first thing ends its group itself, the way :meth:`ChildGroup.end` would, once its parent is gone. It watches
only when a ``ChildGroup`` started it (the parent's pid is in its environment): the same command run from a
shell leaves its parent alone.

Why a thread that asks for the parent's pid rather than ``prctl(PR_SET_PDEATHSIG)``: set through Popen's
``preexec_fn``, that runs Python between fork and exec, which is unsafe in a process with threads, and the GPU
check has them (the build's reaper); it fires when the *thread* that started the child ends, not the process;
it signals the child alone, not the compilers in its group; and set by the child itself, it misses a parent
that died before. The watch below compares ``os.getppid()`` with the pid the parent wrote, so a parent that
died before it started is noticed too, and it ends the whole group. Its cost: it notices within
``PARENT_POLL_S`` (longer while the child's main thread holds the GIL in a C call, such as one kernel compile).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time

# In the environment of every ChildGroup: "<the parent's pid> <grace_s>", for end_with_parent.
PARENT_VARIABLE = "MULCLIP_FAST_END_WITH_PARENT"
# How often a watching child asks whether its parent is still the one that started it.
PARENT_POLL_S = 0.5


class ChildGroup:
    """``command`` started as the leader of a new session, its stdin ``/dev/null``.

    ``stdout`` and ``stderr`` are what :class:`subprocess.Popen` takes (a file, ``subprocess.STDOUT``); ``env`` its
    environment (this process's by default), to which :data:`PARENT_VARIABLE` is added; ``niceness`` is added to
    its scheduling niceness, which the compilers it starts inherit. ``grace_s`` says how :meth:`end` ends it:
    SIGTERM to the group, then SIGKILL if the leader still runs ``grace_s`` later (for a child that must clean up
    on the way out); with no grace, SIGKILL at once.
    """

    def __init__(self, command, *, stdout, stderr, env=None, niceness: int = 0, grace_s: float = 0.0):
        self.grace_s = grace_s
        env = {**(os.environ if env is None else env), PARENT_VARIABLE: f"{os.getpid()} {grace_s}"}
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


def end_with_parent() -> None:
    """In a child a :class:`ChildGroup` started: ends this process's group, as :meth:`ChildGroup.end` would, when
    the parent dies without ending it. Anywhere else, nothing."""
    # Removed from the environment: a process this child starts is not watched for it.
    watch = os.environ.pop(PARENT_VARIABLE, None)
    if watch is None:
        return
    parent, grace_s = watch.split()
    args = (int(parent), float(grace_s))
    threading.Thread(target=_end_group_without_parent, args=args, name="parent watch", daemon=True).start()


def _end_group_without_parent(parent: int, grace_s: float) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    group = os.getpgrp()  # this process's: it leads a session of its own
    if grace_s > 0:
        os.killpg(group, signal.SIGTERM)
        time.sleep(grace_s)  # still running after it: this process (the leader) did not end
    os.killpg(group, signal.SIGKILL)
