"""The protocol between kernel modules and the ahead-of-time compile check (docs/kernels.md).

A kernel module joins the check by being listed in ``compile_check.KERNEL_MODULES`` and defining::

    def compile_specs(dtype: torch.dtype) -> list[CompileSpec]:
        '''Every kernel variant × autotune config this module launches for inputs of ``dtype``.'''

:func:`autotuned_specs` builds that list from a ``triton.autotune``-decorated kernel: it expands every
config into one :class:`CompileSpec` and derives the signature from the kernel's argument names, so a
module only states the types of its runtime arguments and the constexprs of each launch variant::

    def compile_specs(dtype):
        ptr = pointer(dtype)
        return autotuned_specs(
            _my_kernel, "my_kernel", args={"X": ptr, "Out": ptr, "n": "i32", "scale": "fp32"},
            constexprs={"UPCAST": False, "DOT_PRECISION": dot_precision(dtype)},
        )

Configs must be the module's real autotune list (not the interpreter-pruned one): decorate the kernel
with :func:`autotune`, which keeps the full list on the decorated kernel for the check while the
interpreter runs only the first config (:func:`autotune_configs`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import triton

from . import config_label, interpreter_enabled

TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def autotune_configs(configs: list[triton.Config]) -> list[triton.Config]:
    """The configs to hand ``triton.autotune``: all of them on a GPU, the first under the interpreter.

    The interpreter cannot time configs (no CUDA events), and one config is all a numerics check needs.
    """
    return configs[:1] if interpreter_enabled() else configs


@dataclass(frozen=True)
class CompileSpec:
    """One kernel × launch variant × autotune config, ready for ``triton.compile``."""

    name: str  # kernel label shown in the table, e.g. "token_softmax_fwd[recon]"
    fn: object  # the triton.runtime.jit.JITFunction
    signature: dict[str, str]  # argument -> Triton type ("*fp16", "i32", "fp32", "constexpr")
    constexprs: dict[str, object]
    num_warps: int
    num_stages: int
    config: str = field(default="")  # autotune config label, e.g. "BLOCK_M=64,BLOCK_N=64,w4,s2"


def pointer(dtype: torch.dtype) -> str:
    return "*" + TRITON_DTYPES[dtype]


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: full IEEE fp32 for fp32 inputs (TF32's 10-bit mantissa, scaled by
    1/τ ≈ 14, would break the 1e-4 parity the training run needs); ignored for fp16/bf16 operands."""
    return "ieee" if dtype == torch.float32 else "tf32"


def dtype_class(dtype: torch.dtype) -> str:
    """Register budgets differ by operand width: ``"fp32"`` (IEEE FMA dots) or ``"half"`` (fp16/bf16 MMA)."""
    return "fp32" if dtype == torch.float32 else "half"


def autotuned_specs(
    kernel, name: str, args: dict[str, str], constexprs: dict[str, object], dtype: torch.dtype | None = None
) -> list[CompileSpec]:
    """One :class:`CompileSpec` per autotune config of ``kernel`` (made with :func:`autotune`) for ``dtype``.

    ``args`` gives the Triton type of every runtime argument; every other argument of the kernel must
    be a constexpr given either in ``constexprs`` or by the config.
    """
    fn = kernel.fn
    by_class = getattr(kernel, "configs_by_class", None)
    if by_class is not None:
        configs = by_class[dtype_class(dtype)]
    else:
        configs = getattr(kernel, "all_configs", kernel.configs)
    specs = []
    for config in configs:
        values = {**constexprs, **config.kwargs}
        signature = {}
        for arg in fn.arg_names:
            if arg in values:
                signature[arg] = "constexpr"
            elif arg in args:
                signature[arg] = args[arg]
            else:
                raise ValueError(f"{name}: argument {arg!r} has neither a type nor a constexpr value")
        specs.append(
            CompileSpec(name, fn, signature, values, config.num_warps, config.num_stages, config_label(config))
        )
    return specs


def settle_cache_keys(namespace: dict) -> None:
    """Hash every Triton function a kernel module defines, in the order it defines them; call it last in the
    module.

    A kernel's cache key (its place in Triton's in-memory and on-disk caches) should not depend on which
    kernels a process happened to hash first, but under Triton 3.6 it does: a caller takes over the
    module-level constexprs its callee reads before it hashes the callee, so only a callee hashed earlier
    adds them to the caller's key (fixed by Triton 3.9). Two processes making different calls first, as the
    GPU check's precompile workers and its main process do, then disagree on the keys of the top-k kernels
    and compile them twice. Hashed here, each helper is hashed before the kernels that call it: the helpers
    are defined above their callers, or in modules imported first, which settled theirs on import.
    """
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    for value in list(namespace.values()):
        fn = value.fn if isinstance(value, Autotuner) else value  # a tuner wraps its JITFunction
        # (under the interpreter the functions are no JITFunction and have no key)
        if isinstance(fn, JITFunction) and fn.__module__ == namespace["__name__"]:
            fn.cache_key  # noqa: B018 (computed and kept by Triton: the point of the call)


def autotune(configs, key: list[str], dtype_arg: str | None = None, keep=None, **kwargs):
    """``triton.autotune`` that keeps the full config list for the compile check, runs only the first
    config under the interpreter, and may choose configs by dtype — the one per-dtype config mechanism of
    the kernels.

    ``configs`` is a list, or ``{"half": [...], "fp32": [...]}`` (see :func:`dtype_class`) chosen by the
    dtype of the argument ``dtype_arg``: fp32 operands need smaller tiles to stay clear of spills. List
    ``"half"`` first: the interpreter runs the first config, and larger tiles mean fewer (slowly
    interpreted) programs. ``keep(config, named_args, launch_constexprs) -> bool`` drops, at each launch,
    the configs meant for other launches (e.g. the warp count of another tile width or dtype); the compile
    check applies the same rule to its specs.
    """
    by_class = configs if isinstance(configs, dict) else None
    everything = [c for group in by_class.values() for c in group] if by_class else list(configs)
    if by_class or keep:
        owner = {id(c): cls for cls, group in (by_class or {}).items() for c in group}

        def early_config_prune(candidates, named_args, **launch_constexprs):
            wanted = dtype_class(named_args[dtype_arg].dtype) if by_class else None
            return [
                c
                for c in candidates
                if (wanted is None or owner[id(c)] == wanted)
                and (keep is None or keep(c, named_args, launch_constexprs))
            ]

        kwargs["prune_configs_by"] = {"early_config_prune": early_config_prune}

    def decorate(fn):
        tuned = triton.autotune(configs=autotune_configs(everything), key=key, **kwargs)(fn)
        tuned.all_configs = everything
        tuned.configs_by_class = by_class
        return tuned

    return decorate
