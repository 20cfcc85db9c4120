"""Ahead-of-time compile check of every Triton kernel for real GPUs, without a GPU (docs/kernels.md).

    python -m mulclip_fast.kernels.compile_check [--arch 80 90] [--dtype fp32 fp16 bf16] [--jobs N]

compiles every kernel × autotune config × target × dtype with
``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32))``, prints a
table (kernel, config, target, dtype, shared memory, registers, spills) and exits non-zero on any compile
error, shared memory above the target's per-block limit, or register spills (``STACK``/``LOCAL`` bytes
reported by ``cuobjdump -res-usage`` on the cubin, from the tools bundled in the Triton wheel).

What is compiled is what launches at the paper's shapes: Triton's runtime specialises each launch on its
arguments, marking pointers whose address and integers whose value are multiples of 16 as such
(``tt.divisibility``), which changes vectorisation and so registers. Every pointer the launchers pass is a
fresh or contiguous allocation (16-byte aligned), and the widths (``D``/``dim`` = 512, 768, 1024) are
multiples of 16, so the check compiles with exactly those hints (:func:`runtime_hints`). Launches whose
width is not a multiple of 16, or that pass a view at an unaligned offset, or a size equal to 1 (which
the runtime turns into a constant), run other variants that this check does not compile. The compile
options are the launches' own (``_launch.LAUNCH_OPTIONS``: FMA fusion stated, not Triton's default).

It also compiles every ``csrc/*.cu`` of the optional CUDA extension with the machine's ``nvcc`` (``-cubin
-arch=sm_<arch>``, all template instances its launchers dispatch to: one per dtype) and reads registers,
stack, spills and static shared memory per kernel from ``ptxas -v``; a missing ``nvcc`` is said in the
output and fails nothing (the extension is optional). The extension's dynamic shared memory (the forward's
``N + d`` fp32 values) is bounded by its launcher to 48 KB, below both targets' limits. A ``--module``
selection checks those Triton modules only.

Protocol for kernel modules (see ``_aot.py``): list the module in :data:`KERNEL_MODULES`; it defines
``compile_specs(dtype) -> list[CompileSpec]``. Run it without ``TRITON_INTERPRET`` (the interpreter
replaces kernels by Python functions that cannot be compiled).
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from . import interpreter_enabled

# Every module holding Triton kernels; each defines ``compile_specs(dtype)``.
KERNEL_MODULES = [
    "mulclip_fast.kernels.token_softmax",
    "mulclip_fast.kernels.topk_aggregate",
    "mulclip_fast.kernels.pairwise_maxsim",
    "mulclip_fast.kernels.pairwise_reconstruction",
    "mulclip_fast.kernels.pairwise_topk",
]

# Maximum shared memory per block (opt-in), bytes: A100 163 KB, H100 227 KB.
SHARED_LIMIT = {80: 166912, 90: 232448}
DTYPES = ("fp32", "fp16", "bf16")
ARCHS = (80, 90)


@dataclass
class Result:
    kernel: str
    config: str
    arch: int
    dtype: str
    shared: int | None = None
    registers: int | None = None
    spill_bytes: int | None = None
    error: str | None = None

    def problems(self) -> list[str]:
        if self.error:
            return [f"compile error: {self.error}"]
        found = []
        if self.shared > SHARED_LIMIT[self.arch]:
            found.append(f"shared memory {self.shared} B > {SHARED_LIMIT[self.arch]} B")
        if self.spill_bytes:
            found.append(f"{self.spill_bytes} B of register spills (stack/local)")
        return found


def _torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


# Integer arguments that are multiples of 16 at every shape the kernels are launched with in practice.
ALIGNED_INTS = ("D", "dim")


def runtime_hints(spec) -> dict:
    """``ASTSource`` attrs with the runtime's ``tt.divisibility`` 16 on every pointer and aligned width."""
    return {
        (index,): [["tt.divisibility", 16]]
        for index, name in enumerate(spec.fn.arg_names)
        if spec.signature[name].startswith("*") or (name in ALIGNED_INTS and spec.signature[name] == "i32")
    }


def _specs(module_name: str, dtype: str):
    return importlib.import_module(module_name).compile_specs(_torch_dtype(dtype))


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """``(registers, spill bytes)`` of the single kernel in ``cubin``, from ``cuobjdump -res-usage``."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        report = subprocess.run([tool, "-res-usage", handle.name], capture_output=True, text=True, check=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", report)
    if match is None:
        raise RuntimeError(f"cannot read cuobjdump's resource usage:\n{report}")
    registers, stack, local = (int(g) for g in match.groups())
    return registers, stack + local


def compile_one(module_name: str, dtype: str, index: int, arch: int) -> Result:
    """Compile spec ``index`` of ``module_name`` for ``dtype`` and ``sm_<arch>``; never raises."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ._launch import LAUNCH_OPTIONS

    spec = _specs(module_name, dtype)[index]
    result = Result(spec.name, spec.config, arch, dtype)
    try:
        source = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs, attrs=runtime_hints(spec))
        compiled = triton.compile(
            source,
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": spec.num_warps, "num_stages": spec.num_stages, **LAUNCH_OPTIONS},
        )
        result.shared = compiled.metadata.shared
        result.registers, result.spill_bytes = _resource_usage(compiled.asm["cubin"])
    except Exception as error:  # a compile error is a result to report, not a crash of the check
        result.error = f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error) else ''}"
    return result


COLUMNS = (("kernel", 40), ("config", 34), ("target", 6), ("dtype", 5), ("shared B", 8), ("regs", 4), ("spill B", 7))


def _row(r: Result) -> str:
    """One fixed-width table line (printed as soon as its compile finishes)."""
    problems = r.problems()
    cells = (
        r.kernel,
        r.config,
        f"sm_{r.arch}",
        r.dtype,
        "-" if r.shared is None else str(r.shared),
        "-" if r.registers is None else str(r.registers),
        "-" if r.spill_bytes is None else str(r.spill_bytes),
    )
    line = "  ".join(cell.ljust(width) for cell, (_, width) in zip(cells, COLUMNS, strict=True))
    return f"{line}  {'ok' if not problems else 'FAIL: ' + '; '.join(problems)}"


def header() -> str:
    line = "  ".join(name.ljust(width) for name, width in COLUMNS) + "  status"
    return line + "\n" + "-" * len(line)


def run_check(modules=None, archs=ARCHS, dtypes=DTYPES, jobs: int | None = None):
    """Compile everything; yields each :class:`Result` in table order as soon as it is known."""
    modules = list(modules or KERNEL_MODULES)
    tasks = [
        (module, dtype, index, arch)
        for module in modules
        for dtype in dtypes
        for index in range(len(_specs(module, dtype)))
        for arch in archs
    ]
    jobs = jobs or os.cpu_count() or 1
    if jobs == 1:
        yield from (compile_one(*task) for task in tasks)
        return
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        yield from pool.map(compile_one, *zip(*tasks, strict=True))


# The CUDA extension's sources (docs/kernels.md, "The C++/CUDA extension"); kernels/ sits beside csrc/.
CSRC_DIR = Path(__file__).resolve().parents[1] / "csrc"
# Template arguments of the extension's kernels, as c++filt prints them, and the dtypes they serve.
CUDA_ELEMENT_TYPES = {"float": "fp32", "__half": "fp16", "__nv_bfloat16": "bf16"}
_PTXAS_KERNEL = re.compile(
    r"Function properties for (\S+)\s+(\d+) bytes stack frame, (\d+) bytes spill stores, \d+ bytes spill loads\s+"
    r"ptxas info\s*: Used (\d+) registers([^\n]*)"
)


def _demangle(names: list[str]) -> list[str]:
    """C++ names of the mangled ``names`` (unchanged where ``c++filt`` is missing)."""
    try:
        done = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return names
    return done.stdout.splitlines()


def compile_cuda_source(source: Path, arch: int) -> list[Result]:
    """One :class:`Result` per kernel instance of ``source`` compiled with nvcc for ``sm_<arch>`` (one result
    carrying the error when the compile fails); never raises."""
    with tempfile.TemporaryDirectory() as scratch:
        command = ["nvcc", "-std=c++17", "-O3", "-cubin", f"-arch=sm_{arch}", "-Xptxas", "-v"]
        done = subprocess.run(
            [*command, "-o", os.path.join(scratch, "out.cubin"), str(source)], capture_output=True, text=True
        )
    if done.returncode != 0:
        message = (done.stderr.strip().splitlines() or ["nvcc failed"])[-1]
        return [Result(source.name, "nvcc", arch, "-", error=message)]
    found = _PTXAS_KERNEL.findall(done.stderr)
    results = []
    for (_, stack, spill_stores, registers, rest), name in zip(found, _demangle([f[0] for f in found]), strict=True):
        instance = re.search(r"(\w+)(?:<(\w+)>)?\(", name)  # the kernel and its element type, if a template
        kernel, element = (instance.group(1), instance.group(2) or "-") if instance else (name, "-")
        shared = re.search(r"(\d+) bytes smem", rest)
        results.append(
            Result(
                kernel,
                f"csrc/{source.name}",
                arch,
                CUDA_ELEMENT_TYPES.get(element, element),
                shared=int(shared.group(1)) if shared else 0,
                registers=int(registers),
                spill_bytes=int(stack) + int(spill_stores),
            )
        )
    return sorted(results, key=lambda r: (r.kernel, r.dtype))


def check_cuda_sources(sources=None, archs=ARCHS, dtypes=DTYPES):
    """Yields the :class:`Result` of every kernel instance of ``sources`` (default: ``csrc/*.cu``) per target
    whose dtype is in ``dtypes`` (kernels that are no per-dtype instance always); yields nothing when nvcc is
    missing."""
    if shutil.which("nvcc") is None:
        return
    for source in sources or sorted(CSRC_DIR.glob("*.cu")):
        for arch in archs:
            yield from (r for r in compile_cuda_source(source, arch) if r.dtype in dtypes or r.dtype == "-")


def _kernel_module(name: str) -> str:
    """``--module``: a module of :data:`KERNEL_MODULES` by its full name or its last part (``token_softmax``),
    or any importable module that follows the protocol (a new kernel module before it is listed, a test's)."""
    full = name if name in KERNEL_MODULES else f"mulclip_fast.kernels.{name}"
    if full in KERNEL_MODULES:
        return full
    try:
        follows_protocol = hasattr(importlib.import_module(name), "compile_specs")
    except ImportError:
        follows_protocol = False
    if not follows_protocol:
        short = ", ".join(module.rsplit(".", 1)[1] for module in KERNEL_MODULES)
        raise argparse.ArgumentTypeError(
            f"unknown kernel module {name!r}; choose from {short}, or name a module that defines compile_specs(dtype)"
        )
    return name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=sorted(SHARED_LIMIT))
    parser.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument(
        "--module",
        nargs="+",
        type=_kernel_module,
        default=None,
        help="kernel modules, e.g. token_softmax (default: all: "
        + ", ".join(module.rsplit(".", 1)[1] for module in KERNEL_MODULES)
        + ")",
    )
    parser.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: CPU count)")
    args = parser.parse_args(argv)
    if interpreter_enabled():
        print("compile_check: unset TRITON_INTERPRET (the interpreter's kernels cannot be compiled)", file=sys.stderr)
        return 2
    print(header(), flush=True)
    results = []
    for result in run_check(args.module, args.arch, args.dtype, args.jobs):
        results.append(result)
        print(_row(result), flush=True)
    if args.module is None:
        if shutil.which("nvcc") is None:
            print("nvcc not found: the CUDA extension (csrc/*.cu) is not compiled (it is optional)", flush=True)
        for result in check_cuda_sources(archs=args.arch, dtypes=args.dtype):
            results.append(result)
            print(_row(result), flush=True)
    failed = [r for r in results if r.problems()]
    print(f"\n{len(results)} compiles, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
