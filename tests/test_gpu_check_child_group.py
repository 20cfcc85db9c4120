"""The GPU check's children end with their process group when the GPU check is SIGKILLed (``child_group.py``).

``.ci/gpu-check`` ends a gpu_check that its watchdog could not stop with ``timeout -s KILL``, and then no
``finally`` of gpu_check runs: each child started through ``ChildGroup`` must notice on its own that its parent
is gone and end its process group, compilers included. Each test starts a parent process (a stand-in for
gpu_check) that starts such a child with a grandchild in its group (a ``sleep``, the stand-in for a compiler),
SIGKILLs the parent, and waits, with a generous deadline, for child and grandchild to be gone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mulclip_fast.gpu_check import background_build
from tests.test_gpu_check import still_running

# Long enough to be gone on any machine if the watch works; a watch that never fires fails the test.
DEADLINE_S = 60.0

# The stand-in for a child's compiler: a grandchild in the child's process group. Writes the child's pid and
# its own to ``pids_file`` (atomically: the test reads the file once it exists).
START_GRANDCHILD = """
def start_grandchild(pids_file):
    import os, subprocess
    grandchild = subprocess.Popen(["sleep", "300"])
    with open(pids_file + ".tmp", "w") as pids:
        pids.write(f"{os.getpid()} {grandchild.pid}")
    os.replace(pids_file + ".tmp", pids_file)
"""


def _pids_once_written(path: Path, parent: subprocess.Popen, output: Path) -> list[int]:
    deadline = time.monotonic() + DEADLINE_S
    while not path.exists():
        assert parent.poll() is None, f"the parent ended first: {output.read_text()}"
        assert time.monotonic() < deadline, "the child never started its grandchild"
        time.sleep(0.05)
    return [int(pid) for pid in path.read_text().split()]


def _kill_parent_and_await_its_children(parent_script: str, pids_file: Path, *args: str) -> None:
    """Run ``python -c parent_script pids_file *args``, SIGKILL it once its child has written the pids, and
    assert that the child and the grandchild end."""
    output = pids_file.with_name("parent-output")
    with output.open("w") as sink:
        parent = subprocess.Popen(
            [sys.executable, "-c", parent_script, str(pids_file), *args], stdout=sink, stderr=subprocess.STDOUT
        )
    survivors = []
    try:
        pids = _pids_once_written(pids_file, parent, output)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + DEADLINE_S
        while any(map(still_running, pids)) and time.monotonic() < deadline:
            time.sleep(0.05)
        survivors = [pid for pid in pids if still_running(pid)]
        assert not survivors, f"still running after the parent was killed: {survivors} of (child, grandchild) {pids}"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        for pid in survivors:  # a failed test leaves nothing behind
            os.kill(pid, signal.SIGKILL)


# A gpu_check stand-in that starts one ChildGroup (``python -c CHILD pids_file``) and hangs. argv: pids file,
# the child's grace, the child's code.
PARENT = """
import subprocess, sys, time
from mulclip_fast.gpu_check.child_group import ChildGroup

pids_file, grace_s, child = sys.argv[1:]
ChildGroup([sys.executable, "-c", child, pids_file], stdout=None, stderr=None, grace_s=float(grace_s))
time.sleep(300)
"""


@pytest.mark.parametrize("grace_s", [0.0, 0.5], ids=["SIGKILL", "SIGTERM, then SIGKILL after a grace"])
def test_a_child_and_its_group_end_when_the_parent_is_killed(tmp_path, grace_s):
    # With a grace, the child and its grandchild ignore SIGTERM (the grandchild inherits that): only the SIGKILL
    # that follows the grace ends them.
    child = (
        "from mulclip_fast.gpu_check.child_group import end_with_parent\n"
        "end_with_parent()\n"
        f"{'import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN)' if grace_s else ''}\n"
        f"{START_GRANDCHILD}\n"
        "import sys, time\n"
        "start_grandchild(sys.argv[1])\n"
        "time.sleep(300)\n"
    )
    _kill_parent_and_await_its_children(PARENT, tmp_path / "pids", str(grace_s), child)


def test_a_precompile_worker_ends_with_its_compilers_when_gpu_check_is_killed(tmp_path):
    # The worker is the real one (precompile.main), started by the real compile_in_workers; a module run before
    # it starts its grandchild.
    (tmp_path / "worker_with_grandchild.py").write_text(
        f"{START_GRANDCHILD}\n"
        f"start_grandchild({str(tmp_path / 'pids')!r})\n"
        "import sys\n"
        "from mulclip_fast.gpu_check import precompile\n"
        "sys.exit(precompile.main())\n"
    )
    parent = (
        "import os, sys\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        f"os.environ['PYTHONPATH'] = os.pathsep.join([{str(tmp_path)!r}, os.environ.get('PYTHONPATH', '')])\n"
        "from mulclip_fast.gpu_check import precompile\n"
        "precompile.MODULE = 'worker_with_grandchild'\n"
        "precompile.compile_in_workers(dry=True, workers=1, timeout_s=300)\n"
    )
    _kill_parent_and_await_its_children(parent, tmp_path / "pids")


def test_the_extension_build_unwinds_and_ends_its_compilers_when_gpu_check_is_killed(tmp_path):
    # The build's real command, with the extension's build replaced by one that starts a grandchild and hangs.
    # Its `finally` stands for torch's, which removes the build lock: it runs only if the build was asked to end
    # with SIGTERM before its SIGKILL.
    [python, flag, build_code] = background_build.COMMAND
    unwound = tmp_path / "unwound"
    child = (
        f"{START_GRANDCHILD}\n"
        "import sys, time\n"
        "from mulclip_fast.ops import extension\n"
        "def hanging_build(backend):\n"
        "    start_grandchild(sys.argv[1])\n"
        "    try:\n"
        "        time.sleep(300)\n"
        "    finally:\n"
        f"        open({str(unwound)!r}, 'w').close()\n"
        "extension.require = hanging_build\n"
        f"exec({build_code!r})\n"
    )
    parent = (
        "import sys, time\n"
        "from mulclip_fast.gpu_check import background_build\n"
        f"background_build.BackgroundBuild(({python!r}, {flag!r}, {child!r}, sys.argv[1]))\n"
        "time.sleep(300)\n"
    )
    _kill_parent_and_await_its_children(parent, tmp_path / "pids")
    assert unwound.exists()
