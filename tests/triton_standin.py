"""A stand-in for Triton's CUDA driver: the real JIT path on CPU tensors, without a GPU.

On a CPU the kernels otherwise run only in Triton's interpreter, which compiles nothing, so what the GPU
check's ``precompile`` section exists for — worker processes compile every kernel variant × autotune config
into Triton's on-disk cache and the main process then loads them instead of compiling them — can only be
seen with a driver that says it is a CUDA device. :func:`install` makes Triton's active driver report an
sm_90 target (an H100/H200: what Triton compiles for here, as ``kernels/compile_check`` does), device 0 and
stream 0, and turns every launch into a no-op; with ``TRITON_INTERPRET`` unset, a kernel call then really
specialises on its arguments, really compiles (or finds the kernel in ``TRITON_CACHE_DIR``) and runs
nothing. The autotuner's benchmarker calls the kernel once (which compiles it) and reports the same time
for every config, so the tuner still compiles every config a launch allows and keeps the first.

The kernels' outputs are then whatever memory ``torch.empty`` handed out; see :func:`_fill_empty`.

Run as a script (cwd: the repository root, ``TRITON_INTERPRET`` unset, ``TRITON_CACHE_DIR`` as wanted) it
makes GPU-plan calls and prints one JSON line with every compile it asked Triton for (:class:`CompileLog`):

``worker INDEX COUNT``  ``precompile.run_worker(INDEX, COUNT)`` itself: the groups of ``plan.precompile_groups``
                        that ``plan.precompile_shares`` deals worker INDEX of COUNT, as a precompile worker
                        makes those calls;
``sections GROUP...``   the GPU plan's own tasks that call each group's op on ``triton`` in its dtype —
                        parity, config sweep, determinism, timing (its other backends launch no Triton
                        kernel) — as the main process makes them after the workers.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from dataclasses import dataclass, field
from unittest import mock

import torch

# The limits the CUDA driver reports for an H100/H200 (sm_90) that CompiledKernel checks a kernel against
# before its first launch: opt-in shared memory per block, threads per block. A config over them is
# compiled (and cached) all the same, then refused, as on the GPU.
SM90_PROPERTIES = {"max_shared_mem": 232448}
MAX_THREADS_PER_BLOCK = 1024


class _Utils:
    """The part of ``CudaUtils`` that ``CompiledKernel._init_handles`` and ``__del__`` use (Triton 3.6–3.9)."""

    def get_device_properties(self, device):
        return SM90_PROPERTIES

    def load_binary(self, name, kernel, shared, device):
        # (module, function, registers, spills, max threads): the module must not be None, or every launch
        # would load it again
        return object(), object(), 0, 0, MAX_THREADS_PER_BLOCK

    def unload_module(self, module):
        pass


class _Launcher:
    """``launcher_cls(src, metadata)``: a launch that does nothing."""

    def __init__(self, src, metadata):
        pass

    def __call__(self, *args):
        pass


def _benchmark(fn, quantiles, **_):
    """The autotuner's ``do_bench``: one call (the compile), the same timings (median, 20 %, 80 %) for every
    config."""
    fn()
    return [1.0] * len(quantiles)


class StandInDriver:
    """What ``JITFunction.run``, ``CompiledKernel`` and the autotuner ask the active driver for."""

    utils = _Utils()
    launcher_cls = _Launcher

    def __init__(self):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", 90, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_benchmarker(self):
        return _benchmark


@dataclass
class CompileLog:
    """Every ``triton.compiler.compile`` of this process, from Triton's compilation listener: a hit loaded the
    kernel from the on-disk cache, a miss ran the compile pipeline (and wrote the kernel to the cache). Each is
    named by its cache key's hash; a miss also by :func:`kernel_label`. (A kernel the process has launched
    before is found in the JIT function's in-memory cache and never reaches ``compile``.) ``fp_fusion``: each
    one's ``enable_fp_fusion`` option, as compiled."""

    loaded: list[str] = field(default_factory=list)
    compiled: list[str] = field(default_factory=list)
    misses: list[str] = field(default_factory=list)
    fp_fusion: list[bool] = field(default_factory=list)

    def __call__(self, *, src, metadata, cache_hit, **_):
        self.fp_fusion.append(metadata["enable_fp_fusion"])
        if cache_hit:
            self.loaded.append(metadata["hash"])
        else:
            self.compiled.append(metadata["hash"])
            self.misses.append(kernel_label(src, metadata))


def kernel_label(src, metadata) -> str:
    """The kernel, its argument types, constexprs and launch config, and the integer arguments it was
    specialised to as multiples of 16: what tells one compiled variant from another."""
    names = list(src.signature)
    types = ",".join(kind for kind in src.signature.values() if kind != "constexpr")
    constants = ",".join(f"{names[path[0]]}={value}" for path, value in sorted(src.constants.items()))
    multiples = ",".join(
        names[path[0]]
        for path, attributes in sorted(src.attrs.items())
        if attributes and not src.signature[names[path[0]]].startswith("*")
    )
    return f"{src.name}({types}) [{constants}] w{metadata['num_warps']} s{metadata['num_stages']} 16|{{{multiples}}}"


def _fill_empty() -> None:
    """Make ``torch.empty`` deterministic: floats NaN, integers their largest value.

    A no-op launch leaves the kernels' outputs as allocated. Every GPU-plan call gets through forward and
    backward on such outputs today, filled or not; filled, whether a later torch op on them raises (an index
    gather on a kernel's indices would) cannot depend on what the allocator handed one process and not another.
    """
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True


def install() -> CompileLog:
    """Make Triton compile for sm_90 and launch nothing; let the ops take CPU tensors on ``triton``.

    Call before any kernel module is imported, with ``TRITON_INTERPRET`` unset (so ``_aot.autotune`` keeps
    every config and the kernels' ``UPCAST`` stays False, as on a GPU).
    """
    from mulclip_fast.kernels import interpreter_enabled
    from triton import knobs
    from triton.runtime.driver import driver

    if interpreter_enabled() or knobs.runtime.interpret:
        raise RuntimeError("the stand-in driver needs TRITON_INTERPRET unset: the interpreter compiles nothing")
    driver.set_active(StandInDriver())
    # The ops refuse backend="triton" on CPU tensors outside the interpreter: the one check patched.
    import mulclip_fast.ops._dispatch as dispatch

    dispatch.interpreter_enabled = lambda: True
    _fill_empty()
    log = CompileLog()
    knobs.compilation.listener = log
    return log


def run_as_worker(index: int, count: int) -> dict:
    """``precompile.run_worker(index, count)`` on the GPU plan, pretending (to it alone) that CUDA is there: it
    takes the GPU plan's groups only then; the Setting it builds gets the CPU device instead of "cuda"."""
    from mulclip_fast.gpu_check import plan, precompile

    real_setting = plan.Setting

    def cpu_setting(device, **kwargs):
        return real_setting(device=torch.device("cpu"), **kwargs)

    with (
        mock.patch("torch.cuda.is_available", return_value=True),
        mock.patch("torch.cuda.synchronize"),
        mock.patch.object(plan, "Setting", cpu_setting),
    ):
        return precompile.run_worker(index, count, dry=False)


def gpu_setting():
    """The GPU plan's setting on the CPU device: the GPU run's groups, shapes and tasks."""
    from mulclip_fast.gpu_check.plan import Setting

    return Setting(device=torch.device("cpu"), dry=False, compile_backend="inductor")


def section_tasks(setting, op: str, dtype: torch.dtype) -> list:
    """The GPU plan's tasks that call ``op`` on ``triton`` in ``dtype`` after the precompile section."""
    from mulclip_fast.gpu_check import plan

    name = str(dtype).removeprefix("torch.")
    tasks = [
        *plan.parity_tasks(setting),
        *plan.autotune_tasks(setting, plan.ConfigSweep(thorough=True)),
        *plan.determinism_tasks(setting),
        *plan.timing_tasks(setting),
    ]
    return [
        task
        for task in tasks
        if task.context.get("op") == op
        and task.context.get("dtype") == name
        and task.context.get("backend", "triton") == "triton"
    ]


def run_as_sections(groups: list[int], log: CompileLog) -> dict:
    """Run the section tasks of each group's op and dtype; per task, its compile misses and how it ended."""
    from mulclip_fast.gpu_check.plan import precompile_groups

    setting = gpu_setting()
    every = precompile_groups(setting)
    records = []
    for group in groups:
        op, _, dtype, _ = every[group][0]
        for task in section_tasks(setting, op, dtype):
            before, started = len(log.misses), time.monotonic()
            try:
                record = task.run()
                ended = "returned" if record.get("ok") else "returned, not ok"
            except Exception as error:  # reported: a task that raises leaves the rest of its kernels untried
                ended = traceback.format_exception_only(type(error), error)[-1].strip()
            records.append(
                {
                    "section": task.section,
                    "task": task.name,
                    "ended": ended,
                    "misses": log.misses[before:],
                    "seconds": round(time.monotonic() - started, 2),
                }
            )
    return {"tasks": records}


def main(argv: list[str]) -> int:
    """``worker INDEX COUNT`` (run_worker's share INDEX of COUNT) or ``sections GROUP...``."""
    role, numbers = argv[0], [int(n) for n in argv[1:]]
    log = install()
    torch.set_num_threads(1)
    started = time.monotonic()
    report = run_as_worker(*numbers) if role == "worker" else run_as_sections(numbers, log)
    report.update(vars(log), seconds=round(time.monotonic() - started, 2))
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
