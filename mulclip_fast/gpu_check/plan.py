"""What the GPU check runs: shapes, and one task per unit of work, in order of priority.

Sections, most important first (a time limit cuts the tail):

``precompile``   the Triton kernels the op sections launch, compiled in parallel worker processes into
                 Triton's on-disk cache before those sections run (``precompile.py``);
``parity``       every op on the ``triton`` backend vs the reference, values and input gradients, in fp32,
                 bf16 and fp16, at a small and the paper shape, dense and strided inputs;
``autotune``     every autotune config of every kernel an op launches, pinned one at a time and checked;
``determinism``  two forward + backward passes give bitwise equal values and gradients;
``train_step``   one training step of the ``tiny`` preset (three objectives) and of ``vit-b-16``, fused path
                 vs reference: loss terms and parameter gradients, then step time and peak memory;
``timing``       forward + backward time and peak memory at the paper shape: triton, torch, reference;
``text_attention`` the packed text tower's attention backends (flash-attn, xformers) against its torch
                 backend on a MulCLIP batch's pack, values and gradients in bf16 and fp16, and their time;
``scale``        the all-pairs ops at FineLIP's gathered batch (B = 4096, 197 tokens, d = 512, bf16), where
                 offset products pass 2^31: value rows and their query gradients against the reference on
                 those rows (a row of the scores, and its query's gradient, depend on that query alone);
``extension``    the C++/CUDA extension on the patch sets the Triton kernels refuse (576 and 1024 patches)
                 against the reference, and its time against the torch backend (the dry run: its CPU twin),
                 once the build the runner started in the background with the run has ended;
``compiled``     ``torch.compile`` of the reference against the eager one, then timed as in ``timing``
                 (compiling is the slow part).

A task returns a record (a dict with ``ok``); an exception is an error of that task, or a crash that stops the
run when it left the device unusable (``runner.device_unusable``).
"""

from __future__ import annotations

import gc
import heapq
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .. import op_parity
from ..op_parity import OPS, Sizes, check_case, dense_inputs, evaluate, make_case
from ..profiling import NvmlSampler, measure_peak_memory
from . import configs as tuning
from .background_build import BackgroundBuild
from .peaks import peak_kind

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SECTIONS = (
    "precompile",
    "parity",
    "autotune",
    "determinism",
    "train_step",
    "timing",
    "text_attention",
    "scale",
    "extension",
    "compiled",
)
# Each section's share of the time limit. A section may run until the sum of its share and those before it is
# spent (so time a section leaves unused passes on); one that would overrun leaves its remaining tasks out
# and the next section starts, so a slow section cannot starve the rest.
SHARES = {
    "precompile": 0.1,
    "parity": 0.2,
    "autotune": 0.2,
    "determinism": 0.05,
    "train_step": 0.15,
    "timing": 0.15,
    "text_attention": 0.05,
    "scale": 0.1,
    "extension": 0.05,
    "compiled": 0.1,
}


def section_deadlines(sections, time_limit: float) -> dict[str, float]:
    """Seconds from the start by which each of ``sections`` (in plan order) must have started its last task:
    the cumulative shares of the selected sections, rescaled to sum to ``time_limit``."""
    chosen = [s for s in SECTIONS if s in sections]
    total = sum(SHARES[s] for s in chosen)
    deadlines, spent = {}, 0.0
    for section in chosen:
        spent += SHARES[section] / total * time_limit
        deadlines[section] = spent
    return deadlines


# Per op: the small shape (non-power-of-two lengths and width, several blocks) and the paper's
# (B = 64, 248 words, 196 patches, M = 8 subcaptions, k = 49, d = 512). For the matched ops a = the patches
# (wpr), the words (reconstruction) or the subcaptions (SAP); for the all-pairs ops a = the caption side.
GPU_SHAPES = {
    "wpr_loss": {"small": Sizes(4, 23, 4, 37, 72), "paper": Sizes(64, 196, 64, 248, 512)},
    "token_reconstruction": {"small": Sizes(4, 37, 4, 23, 72), "paper": Sizes(64, 248, 64, 196, 512)},
    "topk_patch_aggregate": {"small": Sizes(4, 5, 4, 37, 72, k=10), "paper": Sizes(64, 8, 64, 196, 512, k=49)},
    "pairwise_maxsim": {"small": Sizes(5, 23, 4, 37, 72), "paper": Sizes(64, 248, 64, 196, 512)},
    "pairwise_reconstruction_scores": {"small": Sizes(5, 23, 4, 37, 72), "paper": Sizes(64, 248, 64, 196, 512)},
    "pairwise_topk_aggregate_cosines": {
        "small": Sizes(5, 5, 4, 37, 72, k=10),
        "paper": Sizes(64, 8, 64, 196, 512, k=49),
    },
}
# The dry run's stand-ins, sized for Triton's interpreter (its "paper" shape has d > 32: several d chunks).
DRY_SHAPES = {
    "wpr_loss": {"small": Sizes(2, 5, 2, 7, 24), "paper": Sizes(2, 6, 2, 9, 40)},
    "token_reconstruction": {"small": Sizes(2, 7, 2, 5, 24), "paper": Sizes(2, 9, 2, 6, 40)},
    "topk_patch_aggregate": {"small": Sizes(2, 3, 2, 9, 24, k=3), "paper": Sizes(2, 4, 2, 10, 40, k=3)},
    "pairwise_maxsim": {"small": Sizes(2, 5, 3, 7, 24), "paper": Sizes(2, 6, 2, 9, 40)},
    "pairwise_reconstruction_scores": {"small": Sizes(2, 5, 3, 7, 24), "paper": Sizes(2, 6, 2, 9, 40)},
    "pairwise_topk_aggregate_cosines": {"small": Sizes(2, 3, 3, 9, 24, k=3), "paper": Sizes(2, 4, 2, 10, 40, k=3)},
}
# Extra shapes for the config sweep: the SAP kernels pick their warps from the patch tile (up to 128 patches
# one config, 256 another), so a second shape with more than 128 patches reaches the other configs.
# Matched SAP pairs samples, so both sides have the same batch.
WIDE_TOPK = {"gpu": Sizes(3, 5, 3, 150, 72, k=38), "dry": Sizes(1, 2, 1, 137, 16, k=35)}
TOPK_OPS = ("topk_patch_aggregate", "pairwise_topk_aggregate_cosines")

# The strided variant of a case: features sliced out of a wider tensor, a batch that is every other sample
# of a larger one, a mask expanded from one row (stride 0) and a transposed one.
STRIDED = {
    "a_layout": "sliced-width",
    "b_layout": "batch-strided",
    "a_mask_layout": "expanded-row",
    "b_mask_layout": "transposed",
}

# Training steps: (preset, objective, batch on the GPU, batch in the dry run, model overrides in the dry run).
TRAIN_OBJECTIVES = {
    "mulclip": {"loss": "mulclip", "sap_pairing": "matched"},
    "finelip": {"loss": "finelip", "sap_pairing": "matched"},
    "mulclip-sap-all": {"loss": "mulclip", "sap_pairing": "all"},
}
# The dry run keeps each preset's image and patch grid and text context but cuts depth and widths, so that a
# step through Triton's interpreter takes seconds.
_DRY_TOWERS = {"embed_dim": 32, "vision_layers": 1, "transformer_layers": 1}
_DRY_VIT = {**_DRY_TOWERS, "vision_width": 64, "vision_heads": 2, "transformer_width": 64, "transformer_heads": 2}
# (preset, objective, GPU batch, dry-run batch or None to leave the case out of a dry run, dry-run overrides)
# ViT-B/16 first: the paper's model is the case a short GPU run must not leave out.
TRAIN_CASES = (
    ("vit-b-16", "mulclip", 64, 2, _DRY_VIT),
    ("tiny", "mulclip", 128, None, _DRY_TOWERS),
    ("tiny", "finelip", 128, 2, _DRY_TOWERS),
    ("tiny", "mulclip-sap-all", 128, 2, _DRY_TOWERS),
)
TRAIN_RTOL = 1e-4


@dataclass
class Task:
    section: str
    name: str
    estimate_s: float
    run: Callable[[], dict]
    context: dict = field(default_factory=dict)  # op, shape, dtype: named in an error or crash report
    always: bool = False  # a summary of what ran before it: runs whatever the time


@dataclass
class Setting:
    """What differs between a GPU run and a dry run."""

    device: torch.device
    dry: bool
    compile_backend: str
    peaks: dict | None = None
    extension_build: BackgroundBuild | None = None  # started by the runner when the extension section runs

    @property
    def shapes(self) -> dict:
        return DRY_SHAPES if self.dry else GPU_SHAPES

    @property
    def mode(self) -> str:
        return "dry" if self.dry else "gpu"

    @property
    def parity_shapes(self) -> tuple[str, ...]:
        return ("small",) if self.dry else ("small", "paper")

    def dtypes(self, section: str) -> tuple[torch.dtype, ...]:
        """Every dtype for parity (and, on a GPU, for the config sweep); fp32 and bf16 for the determinism
        and timing sections. A dry run sweeps configs in fp32 and bf16 (fp16 launches bf16's configs) and
        determinism and timing in fp32 only."""
        if section == "parity" or (section == "autotune" and not self.dry):
            return DTYPES
        if section == "autotune" or not self.dry:
            return (torch.float32, torch.bfloat16)
        return (torch.float32,)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _context(op: str, sizes: Sizes, dtype: torch.dtype, **extra) -> dict:
    return {"op": op, "shape": sizes.label(), "dtype": _dtype_name(dtype), **extra}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------------
# precompile: the op sections' Triton kernels, compiled in worker processes before those sections run
# ----------------------------------------------------------------------------------------------------

# How long the workers may take before they are stopped and the sections compile what is left themselves.
PRECOMPILE_TIMEOUT_S = {"gpu": 90.0, "dry": 300.0}


def precompile_groups(setting: Setting) -> list[list[tuple[str, Sizes, torch.dtype, dict]]]:
    """The op calls (``op, sizes, dtype, make_case layout``) of the parity and config-sweep sections, grouped
    by op and dtype: the calls of a group launch mostly the same kernel variants, so the worker that runs a
    whole group compiles each of them once. (Determinism and timing repeat parity's paper-shape calls.)"""
    groups: dict[tuple[str, torch.dtype], list] = {}
    for op, shape, dtype, strided in parity_cases(setting):
        call = (op, setting.shapes[op][shape], dtype, parity_layout(shape, strided))
        groups.setdefault((op, dtype), []).append(call)
    for dtype in setting.dtypes("autotune"):
        for op in OPS:
            for sizes in autotune_shapes(setting, op)[1:]:  # the small shape is parity's
                groups.setdefault((op, dtype), []).append((op, sizes, dtype, {"a_mask_kind": "prefix"}))
    return list(groups.values())


# A precompile worker's seconds per call of each op: each group of the GPU plan run alone by a worker on a cold
# Triton cache, compiling for sm_90 through tests/triton_standin.py (`python -m tests.triton_standin worker I 18`,
# TRITON_CACHE_DIR fresh, Triton 3.9 on 2 shared CPU cores), its seconds over its calls, averaged over the three
# dtypes. Not the number of kernel variants × configs a group compiles: the top-k kernels compile 3-4 times
# slower than the others (the matched top-k group in bf16 took 18 s for 10 kernels, the token-softmax group in
# bf16 8 s for 16), so that count would rank the longest groups among the shortest. The dry run deals with the
# same numbers (its workers interpret rather than compile: it rehearses the deal).
PRECOMPILE_SECONDS_PER_CALL = {
    "wpr_loss": 1.8,
    "token_reconstruction": 1.8,
    "topk_patch_aggregate": 3.4,
    "pairwise_maxsim": 1.2,
    "pairwise_reconstruction_scores": 1.3,
    "pairwise_topk_aggregate_cosines": 2.6,
}


def precompile_estimate_s(group: list) -> float:
    """A worker's seconds for one of :func:`precompile_groups` (a group is one op's calls)."""
    op = group[0][0]
    return len(group) * PRECOMPILE_SECONDS_PER_CALL[op]


def longest_first(estimates: list[float], workers: int) -> list[list[int]]:
    """The indices of ``estimates`` each of ``workers`` gets, longest processing time first: the biggest estimate
    (ties: the lower index) to the worker with the least estimated work so far (ties: the lower worker)."""
    shares: list[list[int]] = [[] for _ in range(workers)]
    loads = [(0.0, worker) for worker in range(workers)]  # a heap: the least-loaded worker first
    for index in sorted(range(len(estimates)), key=lambda i: (-estimates[i], i)):
        load, worker = heapq.heappop(loads)
        shares[worker].append(index)
        heapq.heappush(loads, (load + estimates[index], worker))
    return shares


def precompile_shares(setting: Setting, workers: int) -> list[list[int]]:
    """The indices of the :func:`precompile_groups` each of ``workers`` runs, dealt by their estimates: every
    worker process computes the same deal and takes its own share."""
    return longest_first([precompile_estimate_s(group) for group in precompile_groups(setting)], workers)


def precompile_worker_count(setting: Setting) -> int:
    """One worker per CPU but two (the main process, the extension's build), at most one per group; two in a
    dry run, which rehearses the machinery on a CI machine's two cores."""
    if setting.dry:
        return 2
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(len(precompile_groups(setting)), cpus - 2))


def precompile_tasks(setting: Setting) -> list[Task]:
    def run() -> dict:
        from .precompile import compile_in_workers

        workers = precompile_worker_count(setting)
        return compile_in_workers(setting.dry, workers, PRECOMPILE_TIMEOUT_S[setting.mode])

    estimate = {"gpu": 45.0, "dry": 25.0}[setting.mode]
    context = {"op": "every op on triton", "shape": "parity and config-sweep shapes", "dtype": "all"}
    return [Task("precompile", "Triton kernels of the op sections", estimate, run, context)]


# ----------------------------------------------------------------------------------------------------
# parity
# ----------------------------------------------------------------------------------------------------


def parity_cases(setting: Setting) -> list[tuple[str, str, torch.dtype, bool]]:
    """``(op, shape, dtype, strided)`` of every parity task, in the order they run."""
    # The small shape in every dtype first: what a short run leaves out must be the second shape, not the
    # tensor-core (bf16, fp16) code.
    cases = []
    for shape in setting.parity_shapes:
        for dtype in setting.dtypes("parity"):
            for op in OPS:
                cases.append((op, shape, dtype, False))
                if shape == "small" or dtype != torch.float16:
                    cases.append((op, shape, dtype, True))
    return cases


def parity_layout(shape: str, strided: bool) -> dict:
    """``make_case``'s layout and mask arguments of a parity case."""
    if strided:
        return STRIDED
    return {"a_mask_kind": "one-empty" if shape == "small" else "prefix", "b_mask_kind": "prefix"}


def _parity_task(setting: Setting, op: str, shape: str, dtype: torch.dtype, strided: bool) -> Task:
    sizes = setting.shapes[op][shape]

    def run() -> dict:
        case = make_case(op, sizes, dtype=dtype, device=setting.device, seed=3, **parity_layout(shape, strided))
        result = check_case(case, "triton")
        return {
            "ok": result.ok,
            "case": result.case,
            "tolerance": result.tolerance,
            "max_abs_error": result.max_abs_error,
            "problems": result.problems,
        }

    estimate = {"gpu": 1.5 if shape == "paper" else 0.8, "dry": 0.6}[setting.mode]
    name = f"{op} {shape} {_dtype_name(dtype)} {'strided' if strided else 'dense'}"
    return Task("parity", name, estimate, run, _context(op, sizes, dtype, layout="strided" if strided else "dense"))


def parity_tasks(setting: Setting) -> list[Task]:
    return [_parity_task(setting, *case) for case in parity_cases(setting)]


# ----------------------------------------------------------------------------------------------------
# autotune configs
# ----------------------------------------------------------------------------------------------------


class ConfigSweep:
    """Pins every config of every tuned kernel an op launches and checks the op.

    ``thorough`` (the GPU run): every (kernel, config) once per dtype and per op that launches the kernel
    (ops launch the same kernel with different constexpr variants). Otherwise (the dry run) each
    (kernel, config) once, through the first op that launches it."""

    def __init__(self, thorough: bool = True):
        self.thorough = thorough
        self.dtypes: tuple[torch.dtype, ...] = DTYPES  # the dtypes the plan sweeps (set by autotune_tasks)
        self.kernels: dict[str, object] | None = None
        self.checked: dict[tuple[str, str, str, str], dict] = {}  # (kernel, config, dtype, op) -> record
        # (kernel, config, dtype, op, sizes) whose launches the config does not serve: not pinned again
        self.not_served: set[tuple[str, str, str, str, str]] = set()
        self.launched_by: dict[str, set[str]] = {}  # kernel -> ops that launch it

    def _kernels(self) -> dict[str, object]:
        if self.kernels is None:
            self.kernels = tuning.autotuned_kernels()
        return self.kernels

    def check(self, setting: Setting, op: str, sizes: Sizes, dtype: torch.dtype) -> dict:
        kernels = self._kernels()
        # dense inputs: a failure here is the config's, not a layout's (parity covers the layouts)
        case = make_case(op, sizes, dtype=dtype, device=setting.device, seed=5, a_mask_kind="prefix")
        expected = evaluate(case, None, dense_inputs(case))
        with tuning.LaunchRecorder(kernels) as recorder:
            first = check_case(case, "triton", expected=expected)
        launched = recorder.launched()
        records, problems = [], [f"tuned choice: {p}" for p in first.problems]
        for label in launched:
            self.launched_by.setdefault(label, set()).add(op)
            kernel = kernels[label]
            configs = tuning.all_configs(kernel)
            if len(configs) < 2:
                continue
            for config in configs:
                key = (label, tuning.config_label(config), _dtype_name(dtype), op)
                if key in self.checked or (not self.thorough and any(k[:2] == key[:2] for k in self.checked)):
                    continue
                if (*key, sizes.label()) in self.not_served or (
                    not self.thorough and any(k[:3] == key[:3] and k[4] == sizes.label() for k in self.not_served)
                ):
                    continue
                try:
                    with (
                        tuning.LaunchRecorder({label: kernel}) as pinned_launches,
                        tuning.pinned(kernel, config) as state,
                    ):
                        result = check_case(case, "triton", expected=expected)
                except tuning.NotServed:
                    # not a launch this config serves (another dtype class or patch tile)
                    self.not_served.add((*key, sizes.label()))
                    continue
                ran = {cfg for _, cfg in pinned_launches.launches}
                record = {
                    "kernel": label,
                    "config": key[1],
                    "dtype": key[2],
                    "op": op,
                    "shape": sizes.label(),
                    "launches": state.served,
                    "ran_pinned": key[1] in ran,
                    "ok": result.ok,
                    "max_abs_error": result.max_abs_error,
                    "problems": result.problems,
                }
                if not record["ran_pinned"]:
                    record["ok"] = False
                    record["problems"] = [*result.problems, f"the tuner ran {sorted(ran)}, not the pinned config"]
                self.checked[key] = record
                records.append(record)
                problems += [f"{label} [{key[1]}]: {p}" for p in record["problems"]]
        return {"ok": not problems, "kernels_launched": launched, "configs_checked": records, "problems": problems}

    def coverage(self, dtypes_run: set[str]) -> dict:
        """Every config of every tuned kernel, with the dtypes it was checked in; the ones never reached."""
        rows, unreached = [], []
        for label, kernel in sorted(self._kernels().items()):
            configs = tuning.all_configs(kernel)
            for config in configs:
                name = tuning.config_label(config)
                dtypes = sorted({d for (k, c, d, _) in self.checked if k == label and c == name})
                only = len(configs) == 1
                rows.append({"kernel": label, "config": name, "checked_in": dtypes, "only_config": only})
                if not dtypes and not only:
                    unreached.append(f"{label} [{name}]")
        problems = (
            [f"never launched by this plan: {item}" for item in unreached]
            if dtypes_run == set(map(_dtype_name, self.dtypes))
            else []
        )
        return {
            "ok": not problems,
            "configs": rows,
            "unreached": unreached,
            "launched_by": {k: sorted(v) for k, v in self.launched_by.items()},
            "problems": problems,
        }


def autotune_shapes(setting: Setting, op: str) -> list[Sizes]:
    """The shapes the config sweep checks ``op`` at: the small one and, for SAP, one past 128 patches."""
    return [setting.shapes[op]["small"], *([WIDE_TOPK[setting.mode]] if op in TOPK_OPS else [])]


def autotune_tasks(setting: Setting, sweep: ConfigSweep) -> list[Task]:
    tasks, dtypes_run = [], set()
    sweep.dtypes = setting.dtypes("autotune")
    # A dry run checks each config once, through the first op that launches it: the reconstruction runs the
    # token-softmax kernels at a fifth of the cost of the WPR loss.
    ops = sorted(OPS, key=lambda op: op != "token_reconstruction") if setting.dry else list(OPS)
    for dtype in sweep.dtypes:
        for op in ops:
            for sizes in autotune_shapes(setting, op):

                def run(op=op, sizes=sizes, dtype=dtype) -> dict:
                    dtypes_run.add(_dtype_name(dtype))
                    return sweep.check(setting, op, sizes, dtype)

                estimate = {"gpu": 6.0, "dry": 2.5}[setting.mode]
                name = f"{op} {_dtype_name(dtype)} {sizes.label()}"
                tasks.append(Task("autotune", name, estimate, run, _context(op, sizes, dtype)))
    tasks.append(Task("autotune", "coverage", 0.0, lambda: sweep.coverage(dtypes_run), always=True))
    return tasks


# ----------------------------------------------------------------------------------------------------
# determinism
# ----------------------------------------------------------------------------------------------------


def determinism_tasks(setting: Setting) -> list[Task]:
    tasks = []
    for dtype in setting.dtypes("determinism"):
        for op in OPS:
            sizes = setting.shapes[op]["paper"]

            def run(op=op, sizes=sizes, dtype=dtype) -> dict:
                case = make_case(op, sizes, dtype=dtype, device=setting.device, seed=9, a_mask_kind="prefix")
                first, second = evaluate(case, "triton"), evaluate(case, "triton")
                names = ("value", "grad a", "grad b")
                differing = [n for n, x, y in zip(names, first, second, strict=True) if not torch.equal(x, y)]
                return {
                    "ok": not differing,
                    "case": case.label(),
                    "bitwise_equal": not differing,
                    "differing": differing,
                }

            name = f"{op} paper {_dtype_name(dtype)}"
            tasks.append(
                Task("determinism", name, {"gpu": 2.0, "dry": 1.2}[setting.mode], run, _context(op, sizes, dtype))
            )
    return tasks


# ----------------------------------------------------------------------------------------------------
# timing and memory
# ----------------------------------------------------------------------------------------------------


def time_call(fn: Callable[[], object], device: torch.device) -> dict:
    """Median milliseconds of ``fn()``: ``triton.testing.do_bench`` (CUDA events, after warm-up runs) on a
    GPU; elsewhere (a dry run: the numbers only rehearse the report) one wall-clock run."""
    if device.type == "cuda":
        import triton.testing

        return {
            "median_ms": float(triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")),
            "method": "triton.testing.do_bench",
        }
    start = time.perf_counter()
    fn()
    return {"median_ms": 1e3 * (time.perf_counter() - start), "method": "perf_counter"}


def _fractions(setting: Setting, op: str, sizes: Sizes, dtype: torch.dtype, seconds: float) -> dict:
    cost = OPS[op].cost(sizes, torch.empty((), dtype=dtype).element_size())
    moved = cost.bytes_forward + cost.bytes_backward
    out = {"flops": cost.flops, "bytes": moved, "flops_per_s": cost.flops / seconds, "bytes_per_s": moved / seconds}
    peaks = setting.peaks or {}
    flops_peak = (peaks.get("flops_per_s") or {}).get(peak_kind(dtype))
    out["peak_flops_kind"] = peak_kind(dtype)
    out["fraction_of_peak_flops"] = out["flops_per_s"] / flops_peak if flops_peak else None
    out["fraction_of_peak_bandwidth"] = out["bytes_per_s"] / peaks["bytes_per_s"] if peaks.get("bytes_per_s") else None
    return out


def _timing_task(setting: Setting, op: str, dtype: torch.dtype, backend: str) -> Task:
    sizes = setting.shapes[op]["paper"]

    def run() -> dict:
        case = make_case(op, sizes, dtype=dtype, device=setting.device, seed=13, a_mask_kind="prefix")
        if backend == "compiled-reference":
            compiled = torch.compile(OPS[op].reference, backend=setting.compile_backend)
            start = time.perf_counter()
            expected = evaluate(case, None, dense_inputs(case))
            got = evaluate(case, None, call=compiled)
            compile_s = time.perf_counter() - start
            problems = [
                f"{name}: {problem}"
                for name, g, w in zip(("value", "grad a", "grad b"), got, expected, strict=True)
                if (problem := op_parity.compare(g, w, op_parity.TOLERANCE[dtype])[2])
            ]

            def fn():
                return evaluate(case, None, call=compiled)
        else:
            compile_s, problems = None, []
            concrete = None if backend == "reference" else backend

            def fn():
                return evaluate(case, concrete) if concrete else evaluate(case, None)

        if not setting.dry:
            fn()  # warm-up: kernels compile and autotune here
            _synchronize(setting.device)
        with NvmlSampler(setting.device.index or 0) as sampler:
            timing = time_call(fn, setting.device)
        peak, method = measure_peak_memory(fn, setting.device)
        record = {
            "ok": not problems,
            "op": op,
            "backend": backend,
            "dtype": _dtype_name(dtype),
            "shape": sizes.label(),
            **timing,
            "peak_bytes": peak,
            "memory_method": method,
            **_fractions(setting, op, sizes, dtype, timing["median_ms"] / 1e3),
            "nvml": sampler.summary(),
            "problems": problems,
        }
        if compile_s is not None:
            record["first_call_s"] = compile_s
            record["compile_backend"] = setting.compile_backend
        return record

    # Rough guesses, like every estimate here (the time limit, not these, bounds the run). Inductor
    # compiles the forward and the backward of each op.
    estimate = {
        "gpu": 45.0 if backend == "compiled-reference" else 2.0,
        "dry": 2.0 if backend == "compiled-reference" else 0.6,
    }
    section = "compiled" if backend == "compiled-reference" else "timing"
    name = f"{op} paper {_dtype_name(dtype)} {backend}"
    return Task(section, name, estimate[setting.mode], run, _context(op, sizes, dtype, backend=backend))


def timing_tasks(setting: Setting) -> list[Task]:
    tasks = [
        _timing_task(setting, op, dtype, backend)
        for dtype in setting.dtypes("timing")
        for op in OPS
        for backend in ("triton", "torch", "reference")
    ]
    return tasks


def compiled_tasks(setting: Setting) -> list[Task]:
    return [_timing_task(setting, op, torch.float32, "compiled-reference") for op in OPS]


# ----------------------------------------------------------------------------------------------------
# training step
# ----------------------------------------------------------------------------------------------------


def _train_task(setting: Setting, preset: str, objective: str, gpu_batch: int, dry_batch: int, dry_overrides: dict):
    batch_size = dry_batch if setting.dry else gpu_batch
    overrides = dry_overrides if setting.dry else {}

    def run() -> dict:
        from ..data import Collator, open_dataset
        from ..model import preset_config
        from ..train import TrainConfig, Trainer, resolve_config

        fast = "triton" if setting.device.type != "cuda" else "auto"
        trainers = {}
        for path, backend in (("reference", "reference"), ("fast", fast)):
            config = resolve_config(
                TrainConfig(
                    preset=preset,
                    model_overrides=overrides,
                    **TRAIN_OBJECTIVES[objective],
                    backend=backend,
                    fine_start=0.0,
                    fine_ramp=0.0,
                    lr=1e-4,
                    device=str(setting.device),
                )
            )
            trainers[path] = Trainer(config)
        reference, fast_trainer = trainers["reference"], trainers["fast"]
        image_size = preset_config(preset, **overrides).image_resolution
        dataset = open_dataset("synthetic", "train", image_size, size=batch_size, seed=0)
        collator = Collator(reference.config.max_subcaptions, with_subcaptions=reference.needs_subcaptions)
        batch = collator([dataset[i] for i in range(batch_size)]).to(setting.device)
        logs, timing = {}, {}
        for path, trainer in trainers.items():
            # The first step of each path starts from the same parameters: its loss terms and gradients are
            # compared. In a dry run it is also the only step, timed and measured.
            start = time.perf_counter()
            if setting.dry:
                peak, method = measure_peak_memory(
                    lambda t=trainer, p=path: logs.update({p: t.step(batch, 0.5)}), setting.device
                )
                timing[path] = {"step_s": time.perf_counter() - start, "peak_bytes": peak, "memory_method": method}
            else:
                logs[path] = trainer.step(batch, progress=0.5)
        terms = [name for name in logs["reference"] if name not in ("lr", "fine_scale", "logit_scale")]
        problems = []
        for name in terms:
            want, got = logs["reference"][name], logs["fast"][name]
            if abs(got - want) > TRAIN_RTOL * max(abs(want), 1e-12):
                problems.append(f"loss term {name}: fast {got:.8g} vs reference {want:.8g}")
        pairs = [
            (p.grad, q.grad)
            for p, q in zip(reference.model.parameters(), fast_trainer.model.parameters(), strict=True)
            if p.grad is not None or q.grad is not None
        ]
        missing = sum(1 for p, q in pairs if p is None or q is None)
        want_flat = torch.cat([p.flatten().double() for p, q in pairs if p is not None and q is not None])
        got_flat = torch.cat([q.flatten().double() for p, q in pairs if p is not None and q is not None])
        grad_error = float((got_flat - want_flat).norm() / want_flat.norm().clamp(min=1e-30))
        if grad_error > TRAIN_RTOL:
            problems.append(f"parameter gradients differ by {grad_error:.3g} of their norm (> {TRAIN_RTOL:g})")
        if missing:
            problems.append(f"{missing} parameters have a gradient on one path only")
        for path, trainer in trainers.items() if not setting.dry else ():

            def step(trainer=trainer):
                out = trainer.step(batch, progress=0.5)
                # Released at the end, not the start: freed inside the measure, the previous step's gradients
                # would come off this step's peak (max_memory_allocated above a baseline that held them).
                trainer.optimizer.zero_grad(set_to_none=True)
                _synchronize(setting.device)
                return out

            times = []
            for _ in range(3):
                start = time.perf_counter()
                step()
                times.append(time.perf_counter() - start)
            peak, method = measure_peak_memory(step, setting.device)
            timing[path] = {"step_s": statistics.median(times), "peak_bytes": peak, "memory_method": method}
        return {
            "ok": not problems,
            "preset": preset,
            "objective": objective,
            "batch": batch_size,
            "model_overrides": overrides,
            "backend_fast": fast_trainer.config.backend,
            "loss_terms": {name: {"reference": logs["reference"][name], "fast": logs["fast"][name]} for name in terms},
            "grad_relative_error": grad_error,
            "timing": timing,
            "problems": problems,
        }

    estimate = {"gpu": 40.0 if preset == "vit-b-16" else 12.0, "dry": 4.0 if preset == "vit-b-16" else 3.0}
    context = {"op": f"train step {objective}", "shape": f"{preset} B={batch_size}", "dtype": "float32"}
    return Task("train_step", f"{preset} {objective} B={batch_size}", estimate[setting.mode], run, context)


def train_tasks(setting: Setting) -> list[Task]:
    return [_train_task(setting, *case) for case in TRAIN_CASES if not (setting.dry and case[3] is None)]


# ----------------------------------------------------------------------------------------------------
# scale: the all-pairs ops at the largest gathered batch
# ----------------------------------------------------------------------------------------------------

# FineLIP bidirectional over a gathered batch of 4096 with 197 tokens a side: n_k · n_rows = 4096 · 4096 · 197
# passes 2^31, so every offset product must be 64-bit. SAP all-pairs at the same batch (M = 8, k = 50).
SCALE_SHAPES = {
    "gpu": {
        "pairwise_maxsim": Sizes(4096, 197, 4096, 197, 512),
        "pairwise_reconstruction_scores": Sizes(4096, 197, 4096, 197, 512),
        "pairwise_topk_aggregate_cosines": Sizes(4096, 8, 4096, 197, 512, k=50),
    },
    "dry": {
        "pairwise_maxsim": Sizes(6, 5, 5, 7, 24),
        "pairwise_reconstruction_scores": Sizes(6, 5, 5, 7, 24),
        "pairwise_topk_aggregate_cosines": Sizes(6, 3, 5, 9, 24, k=3),
    },
}
SCALE_ROWS = 3  # query sets compared with the reference: the first, a middle one and the last


def _scale_bytes(op: str, sizes: Sizes) -> int:
    """Rough device memory the fused op needs at ``sizes`` in bf16: inputs and their gradients, and the saved
    per-(query set, key set, token) statistics (8 bytes each, both directions for max-sim)."""
    pairs = sizes.batch_a * sizes.batch_b
    if op == "pairwise_topk_aggregate_cosines":
        stats = pairs * sizes.len_a * ((sizes.len_b + 7) // 8 + 8)
    else:
        stats = pairs * (sizes.len_a + (sizes.len_b if op == "pairwise_maxsim" else 0)) * 8
    tokens = (sizes.batch_a * sizes.len_a + sizes.batch_b * sizes.len_b) * sizes.width
    return 2 * stats + tokens * 12


def _scale_task(setting: Setting, op: str) -> Task:
    sizes = SCALE_SHAPES[setting.mode][op]
    dtype = torch.bfloat16

    def run() -> dict:
        needed = _scale_bytes(op, sizes)
        if setting.device.type == "cuda":
            # Earlier sections' tensors are gone, but the caching allocator still holds their blocks, which
            # cudaMemGetInfo counts as used: hand them back first, or a GPU that fits the case is skipped.
            gc.collect()
            torch.cuda.empty_cache()
            free = torch.cuda.mem_get_info(setting.device)[0]
            if needed > free:
                return {"ok": True, "skipped": f"needs about {needed / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free"}
        case = make_case(
            op, sizes, dtype=dtype, device=setting.device, seed=21, a_mask_kind="prefix", draw_on_device=True
        )
        try:
            # One run of the first config each launch allows: a launch takes seconds here, and the tuner would
            # run every allowed config 8 times or more on these new keys. Any tile computes the same offsets.
            with tuning.untimed(tuning.autotuned_kernels()):
                value, grad_a, _ = evaluate(case, "triton")
        except torch.cuda.OutOfMemoryError as error:  # the estimate was short: a fact, not a kernel bug
            torch.cuda.empty_cache()
            return {"ok": True, "skipped": f"out of memory: {error}"}
        rows = sorted({0, sizes.batch_a // 2, sizes.batch_a - 1})[:SCALE_ROWS]
        a_rows = case.a.detach()[rows].requires_grad_()
        b_fixed = case.b.detach()
        want = OPS[op].reference(a_rows, b_fixed, case.a_mask[rows], case.b_mask, **case.options)
        upstream = case.upstream[(tuple(value.shape), value.dtype, value.device)][rows]
        (want_grad,) = torch.autograd.grad(want, (a_rows,), grad_outputs=upstream)
        tolerance = op_parity.TOLERANCE[dtype]
        scaled = {**tolerance, "atol": tolerance["atol"] * max(1.0, float(want_grad.abs().max()))}
        problems = []
        for name, got, expected, limits in (
            ("value rows", value[rows], want.detach(), tolerance),
            (f"grad {OPS[op].arg_names[0]} rows", grad_a[rows], want_grad, scaled),
        ):
            problem = op_parity.compare(got, expected, limits)[2]
            if problem:
                problems.append(f"{name}: {problem}")
        return {
            "ok": not problems,
            "op": op,
            "shape": sizes.label(),
            "dtype": _dtype_name(dtype),
            "rows_checked": rows,
            "estimated_bytes": needed,
            "problems": problems,
        }

    name = f"{op} {sizes.label()} {_dtype_name(dtype)}"
    estimate = {"gpu": 25.0, "dry": 1.0}[setting.mode]
    return Task("scale", name, estimate, run, _context(op, sizes, dtype))


def scale_tasks(setting: Setting) -> list[Task]:
    return [_scale_task(setting, op) for op in SCALE_SHAPES[setting.mode]]


# ----------------------------------------------------------------------------------------------------
# the C++/CUDA extension (csrc/): the patch sets the Triton kernels refuse
# ----------------------------------------------------------------------------------------------------

# ViT-L/14 at 336 px (576 patches, k = 144) and ViT-H/14 at 448 px (1024, k = 256), beyond the Triton
# kernels' 256; a dry run checks, at a small shape, the CPU twin (built from the same source) on a CPU and the
# CUDA kernels on a CUDA machine.
EXTENSION_SHAPES = {
    "gpu": (Sizes(16, 8, 16, 576, 768, k=144), Sizes(8, 8, 8, 1024, 1024, k=256)),
    "dry": (Sizes(2, 3, 2, 40, 24, k=10),),
}


def _extension_task(setting: Setting, op: str, sizes: Sizes, dtype: torch.dtype) -> Task:
    # The backend follows the tensors' device, not the mode: a dry run on a CUDA machine runs its tiny shapes
    # on the GPU, where ``cpp`` refuses CUDA tensors.
    backend = "cuda_ext" if setting.device.type == "cuda" else "cpp"

    def run() -> dict:
        from ..ops import extension

        # The background build, if still running: then require loads what it cached instead of building again
        # (minutes of nvcc on a GPU machine). If it failed, require's own attempt says why.
        waited = None if setting.extension_build is None else round(setting.extension_build.wait(), 3)
        try:
            extension.require(backend)
        except ValueError as error:  # not buildable here: a fact to report, not a failure of the kernels
            return {"ok": True, "skipped": str(error), "build_wait_s": waited}
        case = make_case(op, sizes, dtype=dtype, device=setting.device, seed=5, a_mask_kind="prefix")
        result = check_case(case, backend)
        inputs = dense_inputs(case)
        times = {
            name: time_call(lambda name=name: evaluate(case, name, inputs), setting.device)["median_ms"]
            for name in (backend, "torch")
        }
        return {
            "ok": result.ok,
            "op": op,
            "backend": backend,
            "case": result.case,
            "max_abs_error": result.max_abs_error,
            "problems": result.problems,
            "forward_backward_ms": times,
            "time_vs_torch": times[backend] / times["torch"] if backend != "torch" else None,
            "build_wait_s": waited,
        }

    name = f"{op} {backend} {sizes.label()} {_dtype_name(dtype)}"
    estimate = {"gpu": 20.0, "dry": 2.0}[setting.mode]
    return Task("extension", name, estimate, run, _context(op, sizes, dtype, backend=backend))


def extension_tasks(setting: Setting) -> list[Task]:
    dtypes = (torch.float32,) if setting.dry else (torch.float32, torch.bfloat16)
    return [
        _extension_task(setting, op, sizes, dtype)
        for sizes in EXTENSION_SHAPES[setting.mode]
        for dtype in dtypes
        for op in TOPK_OPS
    ]


# ----------------------------------------------------------------------------------------------------
# text attention: the packed text path's backends (docs/performance.md, "Packed text")
# ----------------------------------------------------------------------------------------------------

# Each tower's attention: (heads, head_dim, ALiBi) from its preset. The tiny tower adds ALiBi biases (flash-attn
# takes its slopes, xformers cannot); vit-b-16's 512-wide tower has learned positions only.
TEXT_TOWERS = ("tiny", "vit-b-16")
TEXT_BATCH = {"gpu": 64, "dry": 2}  # samples per pack: the paper's batch, and the dry run's stand-in
TEXT_DTYPES = (torch.bfloat16, torch.float16)
# The backends checked: flash-attn and xformers where they can run (CUDA, installed); elsewhere a recorded
# skip with the reason. The dry run also checks the torch backend itself, so that its code runs on a CPU.
TEXT_CANDIDATES = {"gpu": ("flash", "xformers"), "dry": ("torch", "flash", "xformers")}
# A backend in a 16-bit dtype against the torch backend in fp32 on the same rounded q, k, v (the exact answer
# to those inputs); for the output and each input gradient, max |error| <= TEXT_ATTENTION_RTOL · max |fp32|.
# 8 unit roundoffs (bf16 u = 2^-8, fp16 u = 2^-11): a fused kernel rounds at most four times in a chain, each
# at most u of the largest magnitude it feeds (the probabilities before P·V, the output, the probabilities
# again before dS = P∘(dP - D), the gradients), which is 4u; 8u leaves a factor 2. The torch backend in the
# same dtype is held to the same bound and reported beside it, as the error that is the dtype's alone: on the
# CPU, at the GPU run's pack (18,583 tokens), it measured up to 2.5u (grad k, both dtypes, vit-b-16's heads).
TEXT_ATTENTION_RTOL = {torch.bfloat16: 8 * 2.0**-8, torch.float16: 8 * 2.0**-11}


def text_pack_lengths(batch: int, seed: int = 0) -> list[int]:
    """Token counts of a MulCLIP batch's texts, as the packed path takes them (SOT to EOT).

    Per sample a long caption of 64…248 tokens, a summary of 8…77 and 1…8 subcaptions of 5…40 (uniform).
    The first sample has the extremes: a caption truncated at the 248-token context, a 77-token summary and
    8 subcaptions, so that the longest sequence a backend must handle is in every pack.
    """
    g = torch.Generator().manual_seed(seed)

    def draw(low: int, high: int, n: int) -> list[int]:
        return torch.randint(low, high + 1, (n,), generator=g).tolist()

    long, short, subs = draw(64, 248, batch), draw(8, 77, batch), draw(1, 8, batch)
    long[0], short[0], subs[0] = 248, 77, 8
    return long + short + [n for count in subs for n in draw(5, 40, count)]


def _text_backend_missing(backend: str, device: torch.device, dtype: torch.dtype, alibi: bool) -> str | None:
    """Why ``backend`` cannot run this case here (the attention module's own checks, which import flash-attn
    and xformers lazily), or None."""
    from ..model.attention import AttentionBackendUnavailable, choose_text_attention

    if backend != "torch" and device.type != "cuda":
        return f"{backend} needs a CUDA device; this run is on {device.type}"
    try:
        choose_text_attention(backend, torch.empty(0, device=device, dtype=dtype), alibi)
    except AttentionBackendUnavailable as error:
        return str(error)
    return None


def _text_attention_task(setting: Setting, preset: str, dtype: torch.dtype, backend: str) -> Task:
    from ..model import preset_config

    config = preset_config(preset)
    heads, head_dim = config.transformer_heads, config.transformer_width // config.transformer_heads
    alibi = config.text_alibi
    batch = TEXT_BATCH[setting.mode]
    tolerance = TEXT_ATTENTION_RTOL[dtype]

    def run() -> dict:
        from ..model.attention import PackedSequences, alibi_slopes, packed_causal_attention

        record = {"backend": backend, "preset": preset, "dtype": _dtype_name(dtype), "heads": heads}
        missing = _text_backend_missing(backend, setting.device, dtype, alibi)
        if missing:
            return {"ok": True, **record, "skipped": missing}
        lengths = text_pack_lengths(batch)
        sequences = PackedSequences(lengths, setting.device)
        g = torch.Generator().manual_seed(17)
        # q, k, v and the upstream gradient, rounded to the dtype once: every path sees the same numbers
        q, k, v, upstream = (
            torch.randn(sequences.total, heads, head_dim, generator=g).to(dtype).to(setting.device) for _ in range(4)
        )
        slopes = alibi_slopes(heads).to(setting.device) if alibi else None

        def forward_backward(name: str, as_dtype: torch.dtype) -> list[torch.Tensor]:
            inputs = [t.to(as_dtype).requires_grad_() for t in (q, k, v)]
            out = packed_causal_attention(*inputs, sequences, slopes, backend=name)
            return [out.detach(), *torch.autograd.grad(out, inputs, upstream.to(as_dtype))]

        exact = forward_backward("torch", torch.float32)
        errors, problems, times = {}, [], {}
        for name in dict.fromkeys(("torch", backend)):  # the torch backend in this dtype, then the candidate
            got = forward_backward(name, dtype)
            errors[name] = {}
            for output, x, want in zip(("value", "grad q", "grad k", "grad v"), got, exact, strict=True):
                abs_error = float((x.float() - want).abs().max())
                rel_error = abs_error / max(float(want.abs().max()), 1e-30)
                errors[name][output] = {"max_abs_error": abs_error, "max_rel_error": rel_error}
                if not rel_error <= tolerance:
                    problems.append(
                        f"{name} {output}: max error {rel_error:.3g} of the largest fp32 magnitude (> {tolerance:.3g})"
                    )
            if not setting.dry:
                _synchronize(setting.device)
            times[name] = time_call(lambda name=name: forward_backward(name, dtype), setting.device)["median_ms"]
        return {
            "ok": not problems,
            **record,
            "tokens": sequences.total,
            "sequences": len(lengths),
            "longest": sequences.max_length,
            "alibi": alibi,
            "rtol_of_max": tolerance,
            "errors": errors,
            "forward_backward_ms": times,
            "time_vs_torch": times[backend] / times["torch"] if backend != "torch" else None,
            "problems": problems,
        }

    known_skip = (backend == "xformers" and alibi) or (backend != "torch" and setting.device.type != "cuda")
    estimate = 0.0 if known_skip else {"gpu": 2.0, "dry": 0.5}[setting.mode]
    name = f"{backend} {preset} {_dtype_name(dtype)} B={batch}"
    context = {"op": f"packed text attention ({backend})", "shape": f"{preset} B={batch}", "dtype": _dtype_name(dtype)}
    return Task("text_attention", name, estimate, run, context)


def text_attention_tasks(setting: Setting) -> list[Task]:
    return [
        _text_attention_task(setting, preset, dtype, backend)
        for backend in TEXT_CANDIDATES[setting.mode]
        for preset in TEXT_TOWERS
        for dtype in TEXT_DTYPES
    ]


def build_plan(setting: Setting, sections: tuple[str, ...] = SECTIONS) -> list[Task]:
    builders = {
        "precompile": precompile_tasks,
        "parity": parity_tasks,
        "autotune": lambda s: autotune_tasks(s, ConfigSweep(thorough=not s.dry)),
        "determinism": determinism_tasks,
        "train_step": train_tasks,
        "timing": timing_tasks,
        "text_attention": text_attention_tasks,
        "scale": scale_tasks,
        "extension": extension_tasks,
        "compiled": compiled_tasks,
    }
    return [task for section in SECTIONS if section in sections for task in builders[section](setting)]
