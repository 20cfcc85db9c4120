"""Peak memory, machine facts and NVML telemetry for tests and benchmarks (docs/kernels.md, docs/performance.md).

``PeakMemoryTracker`` is a ``TorchDispatchMode`` that sees every tensor an op creates, records the
byte size of its storage, and subtracts it again when the storage is freed. Its ``peak`` is the CPU
analogue of ``torch.cuda.max_memory_allocated`` measured from the moment the mode is entered: only
storages allocated inside the ``with`` block count, so inputs created before it do not. It is
deterministic (no allocator rounding, no caching), which is what lets tests assert memory ratios.

But it measures the program as it runs under a dispatch mode, which is not quite the program that runs
without one: while any dispatch mode is active, autograd's backward formulas take their out-of-place
variants (the gradient of a gather from an expanded tensor is then two buffers of the expanded shape
instead of one, as in the reference top-k aggregates), and the buffers a C++ kernel allocates inside
itself (without the dispatcher), and everything Inductor's compiled code allocates, are invisible to it.
:func:`allocator_peak_memory_of` reads the CPU allocator's own allocation events instead: every buffer of
the plain run, at its requested size. :func:`measure_peak_memory`, what the benchmarks report, uses it on
CPU and the CUDA allocator's statistics on CUDA.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import os
import platform
import socket
import statistics
import threading
import time
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
    counted too. Views share their base's storage and are counted once. Autograd takes its out-of-place
    formulas while the mode is active, so a backward can count more than it allocates without the mode
    (the module's docstring says when; :func:`measure_peak_memory` measures the plain run).
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: dict[int, weakref.ref] = {}
        self._bytes: dict[int, int] = {}  # bytes counted for each tracked storage

    def _release(self, key: int) -> None:
        self._seen.pop(key, None)
        self.live -= self._bytes.pop(key, 0)

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._seen and self._seen[key]() is storage:
            return
        self._seen[key] = weakref.ref(storage, lambda _ref, key=key: self._release(key))
        self._bytes[key] = storage.nbytes()
        self._add(self._bytes[key])

    def _add(self, nbytes: int) -> None:
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def _grow(self, tensor: torch.Tensor, before: int) -> None:
        """An op grew ``tensor``'s existing storage from ``before`` bytes (``out=`` into an empty tensor,
        ``resize_``): it allocated the new buffer while the old one was still held, then freed the old."""
        storage = tensor.untyped_storage()
        if storage.nbytes() <= before:
            return
        key = id(storage)
        if key in self._seen and self._seen[key]() is storage:
            self._add(storage.nbytes())
            self.live -= self._bytes[key]
            self._bytes[key] = storage.nbytes()
        else:  # allocated before the block: only the new buffer counts
            self._track(tensor)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        arguments = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        sizes = {_storage_id(t): _storage_nbytes(t) for t in arguments}
        python_impl = _custom_op_implementation(func)
        if python_impl is not None:
            # A mode is switched off while it handles an op, so the temporaries that a Python custom op
            # (ours: chunked scores, recomputed tiles) allocates inside would go unseen. Run its
            # implementation with the mode switched back on instead.
            with self:
                out = python_impl(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        # Views, in-place and ``out=`` ops return a storage that already exists: an argument's. It is
        # either tracked already or was allocated before the block (an input), which must not count,
        # unless the op grew it (``out=`` into an empty tensor, ``resize_``): its new buffer is new memory.
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.device.type != "meta":
                key = _storage_id(leaf)
                if key is None:
                    continue
                if key in sizes:
                    self._grow(leaf, sizes[key])
                else:
                    self._track(leaf)
        return out


def _custom_op_implementation(func):
    """The Python implementation behind a ``torch.library.custom_op`` (None for other ops).

    Read from torch's registry of custom-op definitions; ``tests/test_profiling.py`` checks that the
    tracker still agrees with the CPU allocator on a custom op, so a change in that registry is caught.
    """
    from torch._library.custom_ops import OPDEFS

    opdef = OPDEFS.get(func._schema.name) if hasattr(func, "_schema") else None
    return None if opdef is None else opdef._init_fn


def _storage_id(tensor: torch.Tensor) -> int | None:
    """Identity of the C++ storage behind ``tensor`` (shared by all its views); None without one."""
    try:
        return tensor.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):  # sparse and other storage-less layouts
        return None


def _storage_nbytes(tensor: torch.Tensor) -> int | None:
    try:
        return tensor.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):
        return None


def peak_memory_of(fn, *args, **kwargs) -> tuple[int, object]:
    """Run ``fn(*args, **kwargs)`` under a :class:`PeakMemoryTracker`; return ``(peak_bytes, result)``."""
    with PeakMemoryTracker() as mem:
        result = fn(*args, **kwargs)
    return mem.peak, result


# Kineto's log levels run from 0 (verbose) to 5 (its trace markers); 6 logs nothing.
KINETO_SILENT = 6


def allocator_peak_memory_of(fn, *args, **kwargs) -> tuple[int, object]:
    """Peak bytes held by allocations of the CPU allocator made while ``fn(*args, **kwargs)`` runs.

    Read from ``torch.profiler``'s allocation events (exact requested sizes with a running total), so it
    also sees Inductor-compiled code that :class:`PeakMemoryTracker` cannot. Returns ``(peak, result)``.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    # Kineto, the profiler's backend, writes two "USDT:" trace-marker lines to stderr at every start and stop
    # (torch 2.13), noise in every report that measures memory; above its highest level it writes nothing. Read
    # once, when the first profile starts; a level the user set is kept.
    os.environ.setdefault("KINETO_LOG_LEVEL", str(KINETO_SILENT))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn(*args, **kwargs)
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.typed[0] == _EventType.Allocation and node.typed[1].device.type == "cpu":
            fields = node.typed[1]
            events.append((node.start_time_ns, fields.alloc_size, fields.total_allocated))
    if not events:
        return 0, result
    events.sort()
    start, first_size, first_total = events[0]
    before = first_total - first_size  # bytes already held when the block began
    return max(total for _, _, total in events) - before, result


def cuda_peak_memory_of(fn, *args, device: torch.device | str | None = None, **kwargs) -> tuple[int, object]:
    """``torch.cuda.max_memory_allocated`` of ``device`` (default: the current one) above what was allocated
    there before ``fn`` ran.

    The allocator keeps its statistics per device: ``fn``'s work on ``cuda:1`` while ``cuda:0`` is current
    would read as the other device's (near zero) peak unless the device is named."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn(*args, **kwargs)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before, result


def measure_peak_memory(fn, device: torch.device | str) -> tuple[int, str]:
    """Peak bytes allocated by ``fn()`` above what already exists, and the method that measured them.

    CUDA: the allocator's statistics. CPU: the CPU allocator's profiler events, for eager and compiled
    code alike (the dispatch tracker would measure autograd's out-of-place formulas and miss the buffers
    that kernels allocate inside themselves; see the module's docstring).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return cuda_peak_memory_of(fn, device=device)[0], "cuda-max-memory-allocated"
    return allocator_peak_memory_of(fn)[0], "cpu-allocator-profiler"


# ----------------------------------------------------------------------------------------------------
# Machine facts and NVML telemetry
# ----------------------------------------------------------------------------------------------------


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU's marketing name from ``/proc/cpuinfo`` (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def nvml_telemetry(cuda_index: int = 0) -> dict:
    """A snapshot of one GPU's NVML counters; ``{"available": False, "reason": …}`` without NVML.

    Memory in bytes, power in watts, clocks in MHz, utilisation in percent. A counter the GPU does not
    expose is None. NVML missing (no nvidia-ml-py, no driver) is a fact to report, never an error.
    """
    try:
        import pynvml
    except ImportError:
        return {"available": False, "reason": "nvidia-ml-py (pynvml) is not installed"}
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as error:
        return {"available": False, "reason": f"NVML could not start: {error}"}
    try:
        try:
            handle = _nvml_handle(pynvml, cuda_index)
        except pynvml.NVMLError as error:
            return {"available": False, "reason": f"NVML has no handle for CUDA device {cuda_index}: {error}"}

        def read(getter: str, *args, scale=1.0):
            value = _nvml_read(pynvml, handle, getter, *args)
            return value * scale if value is not None and scale != 1.0 else value

        memory = read("nvmlDeviceGetMemoryInfo")
        utilization = read("nvmlDeviceGetUtilizationRates")
        name = read("nvmlDeviceGetName")
        return {
            "available": True,
            "name": name.decode() if isinstance(name, bytes) else name,
            "driver_version": _nvml_text(pynvml.nvmlSystemGetDriverVersion),
            "memory_used_bytes": None if memory is None else memory.used,
            "memory_total_bytes": None if memory is None else memory.total,
            "power_w": read("nvmlDeviceGetPowerUsage", scale=1e-3),
            "power_limit_w": read("nvmlDeviceGetEnforcedPowerLimit", scale=1e-3),
            "sm_clock_mhz": read("nvmlDeviceGetClockInfo", pynvml.NVML_CLOCK_SM),
            "sm_clock_max_mhz": read("nvmlDeviceGetMaxClockInfo", pynvml.NVML_CLOCK_SM),
            "memory_clock_mhz": read("nvmlDeviceGetClockInfo", pynvml.NVML_CLOCK_MEM),
            "memory_clock_max_mhz": read("nvmlDeviceGetMaxClockInfo", pynvml.NVML_CLOCK_MEM),
            "memory_bus_width_bits": read("nvmlDeviceGetMemoryBusWidth"),
            "gpu_utilization_pct": None if utilization is None else utilization.gpu,
            "memory_utilization_pct": None if utilization is None else utilization.memory,
            "temperature_c": read("nvmlDeviceGetTemperature", pynvml.NVML_TEMPERATURE_GPU),
        }
    finally:
        pynvml.nvmlShutdown()


def _nvml_read(pynvml, handle, getter: str, *args):
    """``pynvml.<getter>(handle, *args)``, or None for a counter the GPU does not serve or a call this binding
    lacks: named, not looked up by the caller, since bindings drop calls (older ones lack the bus width;
    nvidia-ml-py 13 marks the memory and temperature calls "removed in CUDA 14")."""
    if not hasattr(pynvml, getter):
        return None
    try:
        return getattr(pynvml, getter)(handle, *args)
    except pynvml.NVMLError:
        return None


def _nvml_text(getter) -> str | None:
    import pynvml

    try:
        value = getter()
    except pynvml.NVMLError:
        return None
    return value.decode() if isinstance(value, bytes) else value


def _nvml_handle(pynvml, cuda_index: int):
    """The NVML handle of CUDA device ``cuda_index``.

    Found by the device's UUID: NVML numbers every GPU in PCI order, while CUDA numbers only the visible ones,
    fastest first unless ``CUDA_DEVICE_ORDER=PCI_BUS_ID``, and ``CUDA_VISIBLE_DEVICES`` may name them by UUID;
    on a machine with several GPUs an index would read another GPU's counters. Without CUDA (or a UUID NVML
    knows), the visible-devices list when it holds indices, else the index itself."""
    if torch.cuda.is_available() and cuda_index < torch.cuda.device_count():
        uuid = str(getattr(torch.cuda.get_device_properties(cuda_index), "uuid", ""))
        if uuid:
            try:
                return pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
            except pynvml.NVMLError:
                pass
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
    if cuda_index < len(visible) and visible[cuda_index].strip().isdigit():
        return pynvml.nvmlDeviceGetHandleByIndex(int(visible[cuda_index]))
    return pynvml.nvmlDeviceGetHandleByIndex(cuda_index)


# NVML_VALUE_TYPE_* (0…6) -> the member of the nvmlValue_t union that holds a field value of that type
_NVML_VALUE_MEMBERS = ("dVal", "uiVal", "ulVal", "ullVal", "sllVal", "siVal", "usVal")


class NvmlSampler:
    """Sample NVML power, SM clock and utilisation on a background thread while a block runs.

    A single snapshot after a benchmark says little about the run; ``summary()`` gives the mean and max
    of each counter over the samples. Without NVML it records nothing and ``summary()`` says why.

    Power is the instantaneous draw (field ``NVML_FI_DEV_POWER_INSTANT``) where the driver serves it:
    ``nvmlDeviceGetPowerUsage`` returns the mean of the last second on Ampere (but GA100) and newer GPUs, so
    over a block shorter than that (a ``do_bench`` of about 0.1 s) it would mostly report whatever ran
    before. Without the field the sampler falls back to it, and ``summary()["power_reading"]`` says which.
    Utilisation is NVML's own average over its sample period (1/6 s to 1 s, by product) either way.
    """

    FIELDS = ("power_w", "sm_clock_mhz", "gpu_utilization_pct", "memory_utilization_pct", "memory_used_bytes")

    def __init__(self, cuda_index: int = 0, interval_s: float = 0.02):
        self.cuda_index = cuda_index
        self.interval_s = interval_s
        self.samples: list[dict] = []
        self.reason: str | None = None
        self.power_reading: str | None = None  # "instantaneous" or "mean of the last second", once started
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> NvmlSampler:
        try:
            import pynvml
        except ImportError:
            self.reason = "nvidia-ml-py (pynvml) is not installed"
            return self
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as error:
            self.reason = f"NVML could not start: {error}"
            return self
        try:
            self._handle = _nvml_handle(pynvml, self.cuda_index)
        except pynvml.NVMLError as error:
            pynvml.nvmlShutdown()
            self.reason = f"NVML has no handle for CUDA device {self.cuda_index}: {error}"
            return self
        self._pynvml = pynvml
        self._read_power, self.power_reading = self._average_power_w, "mean of the last second"
        # nvidia-ml-py before the field lacks these names; a driver before it answers the read with an error
        if hasattr(pynvml, "NVML_FI_DEV_POWER_INSTANT") and hasattr(pynvml, "nvmlDeviceGetFieldValues"):
            with contextlib.suppress(pynvml.NVMLError):
                self._instant_power_w()
                self._read_power, self.power_reading = self._instant_power_w, "instantaneous"
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _instant_power_w(self) -> float:
        """The GPU's power draw now, in watts; ``NVMLError`` where NVML does not serve the field."""
        pynvml = self._pynvml
        (field,) = pynvml.nvmlDeviceGetFieldValues(self._handle, [pynvml.NVML_FI_DEV_POWER_INSTANT])
        if field.nvmlReturn != pynvml.NVML_SUCCESS:  # the call succeeds, the field itself may not
            raise pynvml.NVMLError(field.nvmlReturn)
        return getattr(field.value, _NVML_VALUE_MEMBERS[field.valueType]) * 1e-3  # milliwatts

    def _average_power_w(self) -> float:
        return self._pynvml.nvmlDeviceGetPowerUsage(self._handle) * 1e-3  # milliwatts

    def _run(self) -> None:
        pynvml, handle = self._pynvml, self._handle
        while not self._stop.is_set():
            sample = {}
            with contextlib.suppress(pynvml.NVMLError):
                sample["power_w"] = self._read_power()
            clock = _nvml_read(pynvml, handle, "nvmlDeviceGetClockInfo", pynvml.NVML_CLOCK_SM)
            rates = _nvml_read(pynvml, handle, "nvmlDeviceGetUtilizationRates")
            memory = _nvml_read(pynvml, handle, "nvmlDeviceGetMemoryInfo")
            if clock is not None:
                sample["sm_clock_mhz"] = clock
            if rates is not None:
                sample["gpu_utilization_pct"], sample["memory_utilization_pct"] = rates.gpu, rates.memory
            if memory is not None:
                sample["memory_used_bytes"] = memory.used
            self.samples.append(sample)
            self._stop.wait(self.interval_s)

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._pynvml.nvmlShutdown()

    def summary(self) -> dict:
        if self.reason is not None:
            return {"available": False, "reason": self.reason}
        out: dict = {"available": True, "samples": len(self.samples), "power_reading": self.power_reading}
        for field in self.FIELDS:
            values = [s[field] for s in self.samples if field in s]
            out[f"{field}_mean"] = statistics.fmean(values) if values else None
            out[f"{field}_max"] = max(values) if values else None
        return out


def machine_facts(device: torch.device | str = "cpu") -> dict:
    """What a benchmark result needs to be read on: CPU, threads, versions, GPU and NVML, timestamp."""
    device = torch.device(device)
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        affinity = os.cpu_count()
    facts = {
        "timestamp_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": _package_version("triton"),
        "cuda_runtime": torch.version.cuda,
        "device": device.type,
    }
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        facts.update(
            gpu_name=props.name,
            gpu_capability=f"{props.major}.{props.minor}",
            gpu_memory_bytes=props.total_memory,
            gpu_multiprocessors=props.multi_processor_count,
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
        )
        facts["nvml"] = nvml_telemetry(index)
    else:
        # Reported on CPU runs too: "NVML could not start" is itself a fact about the machine.
        facts["nvml"] = nvml_telemetry(0)
    return facts


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_throughput(
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, n: int | None = None, repeats: int = 10
) -> dict:
    """This machine's own large square ``torch.mm`` throughput, the yardstick for achieved FLOP/s.

    ``repeats`` timed products of two ``n × n`` matrices (``2·n³`` FLOPs each) after a warm-up; the median
    (``flops_per_s``) and the fastest (``best_flops_per_s``: on a shared machine, the least disturbed run).
    The default ``n`` (2048 on CPU, 8192 on GPU) is large enough for the BLAS to reach its plateau.
    """
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    _synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        _synchronize(device)
        times.append(time.perf_counter() - start)
    seconds, best = statistics.median(times), min(times)
    return {
        "n": n,
        "dtype": str(dtype).removeprefix("torch."),
        "seconds": seconds,
        "flops_per_s": 2 * n**3 / seconds,
        "best_seconds": best,
        "best_flops_per_s": 2 * n**3 / best,
    }
