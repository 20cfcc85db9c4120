"""The C++/CUDA extension of ``csrc/``, built on first use and cached (docs/kernels.md, "The C++/CUDA extension").

``backend="cpp"`` runs its CPU twin on CPU tensors and ``backend="cuda_ext"`` its CUDA kernels on CUDA
tensors; both implement ``topk_patch_aggregate`` and ``pairwise_topk_aggregate_cosines``. The first call
compiles ``csrc/`` with ``torch.utils.cpp_extension.load`` (a C++ compiler and ninja; 18–46 s measured on two
shared cores for the CPU part) into ``build/torch_extensions/`` of the source checkout, and later processes load
the cached library. The CUDA sources join the build only where PyTorch has CUDA and nvcc is found
(``CUDA_HOME``). Installing the package never builds anything; ``python -m mulclip_fast.ops.extension`` builds
it ahead of time (a Docker image, a GPU check) and says what it built, where and in how long.

The launchers here have the signatures of the torch and Triton primitives (``topk_forward``,
``topk_backward``, ``topk_aggregate_cosines_forward``, ``topk_aggregate_cosines_backward``), so
``mulclip_fast.ops.matched`` and ``mulclip_fast.ops.pairwise`` call whichever backend the same way.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import re
import signal
import sys
import time
from pathlib import Path

import torch

SOURCE_DIR = Path(__file__).resolve().parents[2] / "csrc"
CPU_SOURCES = ("topk_aggregate_cpu.cpp",)
CUDA_SOURCES = ("topk_aggregate_cuda_ops.cpp", "topk_aggregate.cu")
LIBRARY = "mulclip_fast_ext"
_log = logging.getLogger(__name__)
# The backends the loaded library serves ("cpp", and "cuda_ext" when built with CUDA): ``require`` returns
# on this plain global read, which torch.compile traces without stepping into the build machinery.
_built: tuple[str, ...] = ()


def build_directory() -> Path:
    """Where the library is built and cached: one folder per Python and PyTorch version (and CUDA or not)."""
    flavour = f"cu{torch.version.cuda}" if torch.version.cuda else "cpu"
    tag = f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__.split('+')[0]}_{flavour}"
    return SOURCE_DIR.parent / "build" / "torch_extensions" / tag


def cuda_buildable() -> bool:
    """Whether the CUDA part can be built here: a PyTorch with CUDA and an nvcc (``CUDA_HOME``)."""
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and CUDA_HOME is not None


def cuda_arch_list_for_visible_gpus() -> str:
    """The ``TORCH_CUDA_ARCH_LIST`` that ``torch.utils.cpp_extension`` derives from the visible GPUs when it is
    unset: each GPU's capability, capped at the newest this PyTorch was built for, PTX for the last. A build in a
    process that must not touch the GPU needs it set; set in this process too, its own build gets the same flags
    and finds that build up to date."""
    # torch's own reading of its arch list ("sm_90a" is 90)
    built_for = [
        int("".join(re.findall(r"\d+", arch.split("_")[1]))) for arch in torch.cuda.get_arch_list() if "sm_" in arch
    ]
    newest = max((sm // 10, sm % 10) for sm in built_for)
    capabilities = (min(newest, torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count()))
    archs = {f"{major}.{minor}" for major, minor in capabilities}
    return ";".join(sorted(archs)) + "+PTX"


@functools.cache
def _load() -> str | None:
    """Builds (or loads from the cache) and registers the ops once per process; the failure, or ``None``."""
    global _built
    if not SOURCE_DIR.is_dir():
        return f"the sources {SOURCE_DIR} are missing (install from a source checkout: pip install -e .)"
    from torch.utils.cpp_extension import load

    with_cuda = cuda_buildable()
    if (
        with_cuda
        and os.environ.get("TORCH_CUDA_ARCH_LIST", "native") in ("", "native")
        and not torch.cuda.device_count()
    ):
        # torch would read the architectures off the visible GPUs, and without one it fails with an IndexError
        return (
            "no GPU is visible to choose the CUDA architectures from (a Docker build, say): set TORCH_CUDA_ARCH_LIST "
            "to those of the GPUs it will run on, e.g. 9.0 for an H100 or H200"
        )
    sources = CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())
    try:
        build_directory().mkdir(parents=True, exist_ok=True)
        load(
            name=LIBRARY,
            sources=[str(SOURCE_DIR / name) for name in sources],
            build_directory=str(build_directory()),
            # at::parallel_for's OpenMP loop is inline in ATen's headers: without -fopenmp it runs serially
            extra_cflags=["-O3", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            extra_cuda_cflags=["-O3"],
            with_cuda=with_cuda,
            is_python_module=False,
        )
    except (OSError, RuntimeError, ImportError) as error:  # read-only checkout, no compiler or ninja, failed compile
        return f"{type(error).__name__}: {error}"
    _built = ("cpp", "cuda_ext") if with_cuda else ("cpp",)
    return None


HOW_TO_BUILD = {
    "cpp": "it builds on first use with torch.utils.cpp_extension and needs a C++ compiler (g++) and ninja "
    "(pip install ninja)",
    "cuda_ext": "it builds on first use with torch.utils.cpp_extension and needs a PyTorch built with CUDA, "
    "nvcc (set CUDA_HOME to the CUDA toolkit) and ninja (pip install ninja)",
}


def require(backend: str) -> None:
    """Loads the extension for ``backend`` (``cpp`` or ``cuda_ext``), or raises one ``ValueError`` saying why
    it is not available and how to build it."""
    if backend in _built:
        return
    if backend == "cuda_ext" and not cuda_buildable():
        reason = "PyTorch has no CUDA" if torch.version.cuda is None else "nvcc was not found (CUDA_HOME unset)"
        raise ValueError(f"backend='cuda_ext' is not built here: {reason}; {HOW_TO_BUILD['cuda_ext']}")
    failure = _load()
    if failure is not None:
        raise ValueError(f"backend={backend!r} could not build csrc/: {failure}; {HOW_TO_BUILD[backend]}")


def cuda_available() -> bool:
    """Whether the CUDA kernels are built (building them now if they can be): what ``auto`` asks before it
    sends a patch set the Triton kernels refuse to the extension."""
    if "cuda_ext" in _built:
        return True
    if not cuda_buildable():
        return False
    failure = _load()
    if failure is not None:
        _report_failed_cuda_build(failure)
    return failure is None


@functools.cache
def _report_failed_cuda_build(failure: str) -> None:
    """Logs, once per failure, why ``auto`` keeps the torch path where nvcc is found: without it a failed
    build (minutes of compiling in every process) would pass unnoticed."""
    _log.warning(
        "the CUDA extension of csrc/ could not be built (%s); backend='auto' takes the torch path for patch sets "
        "beyond the Triton kernels. %s",
        failure,
        HOW_TO_BUILD["cuda_ext"],
    )


def topk_forward(sub, patches, sub_mask, patch_mask, k, tau):
    """The SAP aggregate ``[B, M, d]`` in the dtype of ``sub`` (see ``_torch_matched.topk_forward``)."""
    return torch.ops.mulclip_fast_ext.topk_aggregate_forward(sub, patches, sub_mask, patch_mask, k, tau)


def topk_backward(sub, patches, sub_mask, patch_mask, k, tau, grad_out):
    """``(d_sub, d_patches)`` in the input dtype, recomputing the selection (see ``_torch_matched.topk_backward``)."""
    return torch.ops.mulclip_fast_ext.topk_aggregate_backward(grad_out, sub, patches, sub_mask, patch_mask, k, tau)


def topk_aggregate_cosines_forward(sub, patches, sub_mask, patch_mask, k, tau):
    """All-pairs SAP ``(cosines [Bq, Bk, M], packed selection, lse)``, as
    ``_torch_pairwise.topk_aggregate_cosines_forward``."""
    return torch.ops.mulclip_fast_ext.pairwise_topk_forward(sub, patches, sub_mask, patch_mask, k, tau)


def topk_aggregate_cosines_backward(grad, sub, patches, sub_mask, patch_mask, tau, selected, lse):
    """``(d_sub, d_patches)`` from the saved selection and lse, as
    ``_torch_pairwise.topk_aggregate_cosines_backward``."""
    backward = torch.ops.mulclip_fast_ext.pairwise_topk_backward
    return backward(grad, sub, patches, sub_mask, patch_mask, selected, lse, tau)


def _exit_on_sigterm(signum, frame):
    # torch.utils.cpp_extension holds a lock file in the build directory while it builds, and a process killed
    # there leaves it behind: every later build of the checkout would wait for it forever. Leaving through
    # SystemExit runs the ``finally`` that removes it (and kills ninja on the way out).
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """``python -m mulclip_fast.ops.extension``: builds (or loads from the cache) what this machine can build,
    says which backends, where and how long it took; on failure, says why (``require``'s text) and exits 1."""
    argparse.ArgumentParser(
        prog="python -m mulclip_fast.ops.extension",
        description="Build the C++/CUDA extension of csrc/ ahead of its first use (into the checkout's "
        "build/torch_extensions/): its CPU twin, and its CUDA kernels where PyTorch has CUDA and nvcc is found.",
    ).parse_args(argv)
    backend = "cuda_ext" if cuda_buildable() else "cpp"
    started = time.monotonic()
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        require(backend)
    except ValueError as error:
        print(error, file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"built {' and '.join(_built)} in {time.monotonic() - started:.1f} s (a cache up to date takes no time)")
    print(f"build directory: {build_directory()}")
    if backend == "cpp":
        try:
            require("cuda_ext")
        except ValueError as why:  # what a GPU user needs to know about this build
            print(why)
    return 0


if __name__ == "__main__":
    sys.exit(main())
