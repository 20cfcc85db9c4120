"""The GPU check's ``precompile`` handoff, observed: what a worker compiles, the sections load, compiling nothing.

``precompile`` workers make the op sections' calls first so that Triton writes every kernel variant × autotune
config to its on-disk cache; the main process's parity, config-sweep, determinism and timing calls are then
meant to find each kernel there instead of compiling it (about a second apiece). On a CPU the kernels
otherwise run only in Triton's interpreter, which compiles nothing; here ``tests/triton_standin.py`` stands in
for the CUDA driver (sm_90 target, launches that do nothing), so the real JIT path specialises, compiles and
caches on CPU tensors.

Two processes share one fresh ``TRITON_CACHE_DIR``, as a GPU run's worker and main process do: the worker
runs ``precompile.run_worker`` itself for one group of ``plan.precompile_groups`` (so this breaks if the
workers and the sections stop making the same calls), and the main process runs the GPU plan's own tasks for
that op and dtype. Misses are counted by Triton's compilation listener (a miss is the compile pipeline
running) and, independently, by the cache directory gaining entries. With the main process on a cache of its
own instead, every one of its loads below is a miss and the test fails.

The group is token_reconstruction in bf16: three autotuned kernels with two configs each for 16-bit inputs,
forward and backward, dense and strided layouts, small and paper shapes, and a reference cheap enough on the
CPU (the all-pairs ops' paper-shape references take minutes here).

The handoff also needs a kernel's cache key not to depend on the order a process first hashes the kernels in
(a worker starts with its own groups, the main process with the plan's first ops): checked across all kernels
without compiling. Triton 3.6, the lent H200's, makes it depend on that order for the top-k kernels (a worker
dealt only the pairwise top-k groups wrote ``_sap_forward_kernel`` under keys the main process did not look
up) unless every kernel module hashes its functions as it is imported (``kernels._aot.settle_cache_keys``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from mulclip_fast.gpu_check.plan import Setting, precompile_groups, precompile_shares

ROOT = Path(__file__).resolve().parent.parent
GPU = Setting(device=torch.device("cpu"), dry=False, compile_backend="inductor")  # the GPU plan's calls
OP, DTYPE = "token_reconstruction", torch.bfloat16
STANDIN = ["-m", "tests.triton_standin"]


def _run(args: list, cache: Path | None = None) -> dict:
    """``python ARGS`` with Triton's interpreter off (the root conftest turns it on for this process) and
    ``cache`` as Triton's cache; the JSON line it prints last."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    # Triton 3.10's default (3.9 and 3.6 fuse by default): every launch states its own (_launch.LAUNCH_OPTIONS)
    env["TRITON_DEFAULT_FP_FUSION"] = "0"
    if cache is not None:
        env["TRITON_CACHE_DIR"] = str(cache)
    command = [sys.executable, *map(str, args)]
    completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _entries(cache: Path) -> list[str]:
    return sorted(path.name for path in cache.iterdir())


@pytest.mark.slow  # 20-30 s: the worker compiles 16 kernels for sm_90
def test_the_main_process_loads_every_kernel_a_precompile_worker_compiled(tmp_path):
    groups = precompile_groups(GPU)
    [index] = [i for i, group in enumerate(groups) if group[0][0] == OP and group[0][2] == DTYPE]
    cache = tmp_path / "triton-cache"

    # with a worker per group, the worker dealt this group alone
    [dealt] = [worker for worker, share in enumerate(precompile_shares(GPU, len(groups))) if share == [index]]
    worker = _run(STANDIN + ["worker", dealt, len(groups)], cache)
    assert worker["calls"] == len(groups[index]) and worker["errors"] == []
    assert worker["compiled"] and not worker["loaded"]  # a cold cache: the listener sees misses
    # The tuner compiled one launch (kernel, argument types, specialisation) under more than one config: its
    # benchmark runs every config the launch allows, and each is a kernel the sections must find.
    configs = defaultdict(set)
    for label in worker["misses"]:
        kernel, config, specialisation = re.fullmatch(r"(\S+) (\[.*\] w\d+ s\d+) (\S+)", label).groups()
        configs[kernel, specialisation].add(config)
    assert any(len(tried) > 1 for tried in configs.values()), worker["misses"]
    cached = _entries(cache)

    main = _run(STANDIN + ["sections", index], cache)
    ran = {task["section"] for task in main["tasks"]}
    assert ran == {"parity", "autotune", "determinism", "timing"}, main["tasks"]
    # Every task got through forward and backward: one that raised half-way would leave kernels unchecked.
    # (The outputs are NaN, the stand-in launching nothing, so parity fails: that is not what is checked.)
    assert all(task["ended"].startswith("returned") for task in main["tasks"]), main["tasks"]
    misses = {f"{task['section']}: {task['task']}": task["misses"] for task in main["tasks"] if task["misses"]}
    assert not misses, f"compiled again in the main process: {json.dumps(misses, indent=1)}"
    assert set(main["loaded"]) == set(worker["compiled"])  # what the worker compiled is what the sections use
    assert _entries(cache) == cached  # nothing new written: nothing compiled
    # compiled as the compile check compiles them, whatever Triton's default
    assert set(worker["fp_fusion"]) == set(main["fp_fusion"]) == {True}


# Prints {kernel: Triton cache key} of every Triton function of the compile check's kernel modules, the
# modules imported and the functions hashed in the modules' order or in reverse (a process that calls the
# all-pairs ops first imports their kernel module first).
HASH_KERNELS = """
import importlib, json, sys
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction
from mulclip_fast.kernels.compile_check import KERNEL_MODULES

step = -1 if sys.argv[1] == "reversed" else 1
kernels = {}
for name in KERNEL_MODULES[::step]:
    for attr, value in vars(importlib.import_module(name)).items():
        fn = value.fn if isinstance(value, Autotuner) else value
        if isinstance(fn, JITFunction) and fn.__module__ == name:
            kernels[f"{name}.{attr}"] = fn
print(json.dumps({label: kernels[label].cache_key for label in list(kernels)[::step]}))
"""


def test_a_kernels_cache_key_does_not_depend_on_which_kernels_a_process_hashed_first():
    # A worker hashes the kernels of its own groups first, the main process those of the plan's first sections:
    # the handoff needs every kernel's key, and so its place in the disk cache, to be the same in both.
    forward, backward = (_run(["-c", HASH_KERNELS, order]) for order in ("forward", "reversed"))
    differing = sorted(label for label in forward if forward[label] != backward[label])
    assert forward and not differing, differing
