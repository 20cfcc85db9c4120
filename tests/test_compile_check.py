"""The ahead-of-time compile check (docs/kernels.md): every kernel compiles for sm_80/sm_90 in every dtype.

The check compiles real GPU code, so it runs in a subprocess with ``TRITON_INTERPRET`` removed (the root
conftest sets it for this process). Compiles are cached by Triton (``~/.triton/cache``): a cold run of the
whole check takes minutes on a 2-core machine, a warm one seconds.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mulclip_fast.kernels import compile_check
from mulclip_fast.kernels._aot import CompileSpec

ROOT = Path(__file__).resolve().parents[1]


def _run_check(*args: str, timeout: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, "-m", "mulclip_fast.kernels.compile_check", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_module_takes_a_kernel_modules_short_name_and_names_the_choices_otherwise(capsys):
    # --help said "kernel modules (default: KERNEL_MODULES)"; --module token_softmax ended in a
    # ModuleNotFoundError traceback, as only the dotted mulclip_fast.kernels.token_softmax was importable.
    assert compile_check._kernel_module("token_softmax") == "mulclip_fast.kernels.token_softmax"
    assert compile_check._kernel_module("mulclip_fast.kernels.pairwise_topk") == "mulclip_fast.kernels.pairwise_topk"
    with pytest.raises(SystemExit) as bad:
        compile_check.main(["--module", "softmax"])
    assert bad.value.code == 2
    assert "unknown kernel module 'softmax'; choose from token_softmax, topk_aggregate" in capsys.readouterr().err


@pytest.mark.parametrize("module_name", compile_check.KERNEL_MODULES)
def test_every_kernel_module_follows_the_protocol(module_name):
    """Each listed module gives specs for every dtype whose signatures name every kernel argument."""
    module = importlib.import_module(module_name)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        specs = module.compile_specs(dtype)
        assert specs and all(isinstance(spec, CompileSpec) for spec in specs)
        labels = [(spec.name, spec.config) for spec in specs]
        assert len(set(labels)) == len(labels), "each kernel × config appears once"
        for spec in specs:
            assert list(spec.signature) == list(spec.fn.arg_names)
            constexprs = {name for name, kind in spec.signature.items() if kind == "constexpr"}
            assert constexprs == set(spec.constexprs)
            for name, value in spec.constexprs.items():
                if name.startswith("BLOCK"):
                    assert value >= 16 and value & (value - 1) == 0, f"{spec.name}: {name}={value}"


def test_result_problems_name_each_rule():
    ok = compile_check.Result("k", "c", 90, "fp32", shared=1024, registers=64, spill_bytes=0)
    assert ok.problems() == []
    over = compile_check.Result(
        "k", "c", 80, "fp32", shared=compile_check.SHARED_LIMIT[80] + 1, registers=64, spill_bytes=0
    )
    assert "shared memory" in over.problems()[0]
    spilled = compile_check.Result("k", "c", 90, "fp16", shared=0, registers=255, spill_bytes=48)
    assert "spills" in spilled.problems()[0]
    broken = compile_check.Result("k", "c", 90, "bf16", error="CompilationError: boom")
    assert broken.problems() == ["compile error: CompilationError: boom"]


def test_refuses_to_run_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mulclip_fast.kernels.compile_check"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 2 and "TRITON_INTERPRET" in done.stderr


@pytest.mark.slow
def test_check_fails_on_compile_error_shared_memory_and_spills():
    done = _run_check(
        "--module", "tests.aot_bad_kernels", "--arch", "90", "--dtype", "fp32", "--jobs", "1", timeout=300
    )
    assert done.returncode == 1, done.stdout + done.stderr
    rows = {line.split()[0]: line for line in done.stdout.splitlines() if line.split()}
    assert "compile error" in rows["does_not_compile"]
    assert "shared memory" in rows["too_much_shared_memory"]
    assert "spills" in rows["spills_registers"]


@pytest.mark.slow
def test_every_kernel_compiles_for_sm80_and_sm90_in_every_dtype():
    done = _run_check(timeout=1800)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    expected = sum(
        len(importlib.import_module(module).compile_specs(dtype)) * len(compile_check.ARCHS)
        for module in compile_check.KERNEL_MODULES
        for dtype in (torch.float32, torch.float16, torch.bfloat16)
    )
    table = [line for line in done.stdout.splitlines() if line.endswith("  ok") and " csrc/" not in line]
    assert len(table) == expected
    cuda_rows = [line for line in done.stdout.splitlines() if " csrc/" in line]
    if shutil.which("nvcc") is None:
        assert "nvcc not found" in done.stdout
    else:
        assert cuda_rows and all(line.endswith("  ok") for line in cuda_rows)
    assert f"{expected + len(cuda_rows)} compiles, 0 failed" in done.stdout


NVCC = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (the CUDA extension is optional)")


@NVCC
def test_every_cuda_extension_kernel_compiles_without_spills_for_sm80_and_sm90():
    """Each kernel of csrc/*.cu, in each dtype its launchers dispatch to, for both targets: no error, no
    spill, shared memory within the target's limit."""
    results = list(compile_check.check_cuda_sources())
    assert results and not [r for r in results if r.problems()]
    kernels = {r.kernel for r in results}
    assert {"topk_aggregate_forward_kernel", "topk_aggregate_row_backward_kernel"} <= kernels
    for kernel in kernels:
        instances = {(r.arch, r.dtype) for r in results if r.kernel == kernel}
        assert instances == {(arch, dtype) for arch in compile_check.ARCHS for dtype in compile_check.DTYPES}
    # The launch check in topk_aggregate_cuda_ops.cpp adds kStaticSharedBytes (csrc/topk_aggregate_cuda.h:
    # 256 threads / 32 · (4 + 4) bytes of reduction partials) to the dynamic bytes: no kernel may use more
    # (ptxas drops the partials a kernel does not use, so some use less).
    assert max(r.shared for r in results) == (256 // 32) * (4 + 4)


BAD_CUDA_SOURCE = """
__global__ void __launch_bounds__(1024) uses_local_memory(float* out, int pick) {
  float local[512];  // indexed at run time: lives in local memory, a stack frame
  for (int j = 0; j < 512; ++j) local[j] = out[j] * j;
  out[threadIdx.x] = local[pick];
}
"""


@NVCC
def test_cuda_check_reports_local_memory_and_compile_errors(tmp_path):
    spilling, broken = tmp_path / "spills.cu", tmp_path / "broken.cu"
    spilling.write_text(BAD_CUDA_SOURCE)
    broken.write_text("__global__ void broken(float* out) { out[0] = undefined_name; }\n")
    results = list(compile_check.check_cuda_sources([spilling, broken], archs=(90,)))
    by_kernel = {r.kernel: r for r in results}
    assert "spills" in by_kernel["uses_local_memory"].problems()[0]
    assert "compile error" in by_kernel["broken.cu"].problems()[0]


# Compiles the token-softmax forward's first fp16 spec for sm_90 through compile_one, as the check does, and
# prints the enable_fp_fusion option of every kernel triton.compile returned (Triton's compilation listener).
COMPILE_ONE = """
import json
from triton import knobs
from mulclip_fast.kernels import compile_check

fused = []
knobs.compilation.listener = lambda *, metadata, **_: fused.append(metadata["enable_fp_fusion"])
result = compile_check.compile_one("mulclip_fast.kernels.token_softmax", "fp16", 0, 90)
print(json.dumps({"problems": result.problems(), "fused": fused}))
"""


@pytest.mark.parametrize("triton_default", ["0", "1"])
def test_compiles_with_the_launches_options_whatever_tritons_default(triton_default):
    """Every launch states FMA fusion (``_launch.LAUNCH_OPTIONS``, see test_kernel_launchers); the check compiles
    with the same option, so neither follows Triton's default (fused through 3.9, unfused from 3.10)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = triton_default
    done = subprocess.run(
        [sys.executable, "-c", COMPILE_ONE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"problems": [], "fused": [True]}


@pytest.mark.parametrize("module_name", compile_check.KERNEL_MODULES)
def test_compiles_with_the_runtime_alignment_hints(module_name):
    """The launched kernels are specialised on 16-aligned pointers and widths (Triton's runtime does it for
    every contiguous allocation at d = 512/768/1024): the check compiles exactly that variant, with each
    pointer and width argument marked ``tt.divisibility`` 16 and no other."""
    for spec in importlib.import_module(module_name).compile_specs(torch.float16):
        hinted = {spec.fn.arg_names[index] for (index,) in compile_check.runtime_hints(spec)}
        pointers = {name for name, kind in spec.signature.items() if kind.startswith("*")}
        widths = {name for name in compile_check.ALIGNED_INTS if spec.signature.get(name) == "i32"}
        assert pointers and hinted == pointers | widths, spec.name
