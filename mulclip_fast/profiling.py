"""Exact peak-memory accounting on any device (DESIGN §5, point 3).

``PeakMemoryTracker`` is a ``TorchDispatchMode`` that sees every tensor an op creates, records the
byte size of its storage, and subtracts it again when the storage is freed. Its ``peak`` is the CPU
analogue of ``torch.cuda.max_memory_allocated`` measured from the moment the mode is entered: only
storages allocated inside the ``with`` block count, so inputs created before it do not. It is exact
and deterministic (no allocator rounding, no caching), which is what lets tests assert memory ratios.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class PeakMemoryTracker(TorchDispatchMode):
    """Track live and peak bytes of the tensor storages allocated while the mode is active.

    Usage::

        with PeakMemoryTracker() as mem:
            loss = fn(x)
            loss.backward()
        print(mem.peak, mem.live)

    Backward passes run on the calling thread on CPU, so autograd's saved tensors and gradients are
    counted too. Views share their base's storage and are counted once.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: dict[int, weakref.ref] = {}

    def _release(self, key: int, nbytes: int) -> None:
        self._seen.pop(key, None)
        self.live -= nbytes

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._seen and self._seen[key]() is storage:
            return
        nbytes = storage.nbytes()
        self._seen[key] = weakref.ref(storage, lambda _ref, key=key, nbytes=nbytes: self._release(key, nbytes))
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Views, in-place and ``out=`` ops return a storage that already exists: an argument's. It is
        # either tracked already or was allocated before the block (an input), which must not count.
        existing = {_storage_id(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.device.type != "meta":
                key = _storage_id(leaf)
                if key is not None and key not in existing:
                    self._track(leaf)
        return out


def _storage_id(tensor: torch.Tensor) -> int | None:
    """Identity of the C++ storage behind ``tensor`` (shared by all its views); None without one."""
    try:
        return tensor.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):  # sparse and other storage-less layouts
        return None


def peak_memory_of(fn, *args, **kwargs) -> tuple[int, object]:
    """Run ``fn(*args, **kwargs)`` under a :class:`PeakMemoryTracker`; return ``(peak_bytes, result)``."""
    with PeakMemoryTracker() as mem:
        result = fn(*args, **kwargs)
    return mem.peak, result
