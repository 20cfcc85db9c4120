"""Root test configuration (docs/kernels.md, "Verification without a GPU").

Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when its module is imported. Without
CUDA we switch the interpreter on here, before any test module imports a kernel, so every Triton
kernel runs on the CPU through Triton's interpreter.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
