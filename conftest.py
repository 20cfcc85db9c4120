"""Root test configuration (docs/kernels.md, "Verification without a GPU").

Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when its module is imported. Without
CUDA we switch the interpreter on here, before any test module imports a kernel, so every Triton
kernel runs on the CPU through Triton's interpreter.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors run fastest on one thread; on a loaded 2-core machine more threads spin against each other.

    Use it for a whole module with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
