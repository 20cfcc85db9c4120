"""Triton kernels, installed as ``mulclip_fast.kernels`` (docs/kernels.md).

Kernel modules read ``TRITON_INTERPRET`` when they are imported: on machines without CUDA the test
suite's root ``conftest.py`` sets it first, so the same kernels run in Triton's interpreter.
"""

import os


def interpreter_enabled() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's interpreter (importable without Triton: the ops'
    backend choice consults it too)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def config_label(config) -> str:
    """An autotune config as the compile check and the GPU check name it, e.g. ``"BLOCK_M=64,BLOCK_N=64,w4,s2"``
    (importable without Triton, like :func:`interpreter_enabled`)."""
    blocks = ",".join(f"{k}={v}" for k, v in sorted(config.kwargs.items()))
    return f"{blocks},w{config.num_warps},s{config.num_stages}"
