"""Triton kernels, installed as ``mulclip_fast.kernels`` (docs/kernels.md).

Kernel modules read ``TRITON_INTERPRET`` when they are imported: on machines without CUDA the test
suite's root ``conftest.py`` sets it first, so the same kernels run in Triton's interpreter.
"""
