"""Run every autotune config of every kernel, one at a time.

The kernels are ``triton.autotune`` objects made by ``kernels/_aot.py::autotune``, which keeps the full
config list on the decorated kernel (``all_configs``; under the interpreter the tuner itself holds only the
first). Left alone, the tuner times the configs a launch allows and runs the fastest, so a config that is
never fastest is never checked for correctness on the GPU.

:func:`pinned` forces one config without touching the kernel modules: for the duration of a ``with`` block it
wraps the tuner's ``run``. Before each launch the wrapper asks the kernel's own prune (its
``early_config_prune`` hook) which of the full list this launch may use (the dtype class of the inputs, the
warps of the patch tile, …) and hands the tuner a list of one: the pinned config. A tuner with a single config
launches it without timing it, so pinning also skips the benchmarking (a lone config the prune leaves is still
benchmarked by Triton 3.6, the lent H200's, though no longer by 3.9).
When the first launch is one the pinned config does not serve (a fp32 config and fp16 inputs), the wrapper
raises :class:`NotServed`, which abandons the call at once rather than running the op to no purpose; a later
launch the config does not serve (after some it did) runs the first config the kernel's prune allows and is
counted. On exit the tuner's configs and ``run`` are restored. :func:`untimed` does the same for the first config each
launch allows, for a check whose launches are too slow to benchmark.

:class:`LaunchRecorder` wraps each tuner's ``run`` to record which kernels a call launched and with which
config (``best_config``), which is how the caller learns what an op launches and confirms that the pinned
config is the one that ran.
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass, field

# The kernels package itself imports no Triton: the parser imports this module before the runner has decided
# TRITON_INTERPRET, and Triton imported before that would run no kernel on a machine without CUDA.
from ..kernels import config_label

KERNEL_MODULES_FROM = "mulclip_fast.kernels.compile_check"


def autotuned_kernels() -> dict[str, object]:
    """Every ``triton.autotune`` kernel of the kernel modules the compile check covers, by ``module.name``.

    Imports the kernel modules: call it after ``TRITON_INTERPRET`` has its final value.
    """
    from triton.runtime.autotuner import Autotuner

    modules = importlib.import_module(KERNEL_MODULES_FROM).KERNEL_MODULES
    found = {}
    for module_name in modules:
        module = importlib.import_module(module_name)
        for name, value in vars(module).items():
            if isinstance(value, Autotuner):
                found[f"{module_name.rsplit('.', 1)[-1]}.{name}"] = value
    return found


def all_configs(kernel) -> list:
    """The kernel's full config list (``_aot.autotune`` keeps it; a plain ``triton.autotune`` has ``configs``)."""
    return list(getattr(kernel, "all_configs", None) or kernel.configs)


def pinning_supported(kernel) -> str | None:
    """``None`` when this Triton's tuner has the attributes :func:`pinned` relies on, else why not."""
    missing = [name for name in ("configs", "arg_names", "early_config_prune", "run") if not hasattr(kernel, name)]
    return f"triton.autotune object lacks {', '.join(missing)}" if missing else None


class NotServed(Exception):
    """The pinned config does not serve this launch (another dtype class, another tile): nothing to check."""


@dataclass
class PinState:
    """What the pinned launches did: ``served`` counts launches that ran the pinned config, ``not_served``
    those whose own prune excluded it (they ran the kernel's own choice)."""

    served: int = 0
    not_served: int = 0


@contextlib.contextmanager
def _choosing(kernel, choose):
    """Within the block, each launch of ``kernel`` runs ``choose(allowed)[0]``, untimed: ``allowed`` is what the
    kernel's own prune lets this launch use, out of its full list, and the tuner gets a list of one."""
    problem = pinning_supported(kernel)
    if problem:
        raise RuntimeError(f"cannot pin autotune configs: {problem}")
    everything = all_configs(kernel)
    saved_configs, own_prune, launch = kernel.configs, kernel.early_config_prune, kernel.run
    wrapped = "run" in vars(kernel)  # a LaunchRecorder's wrapper, put back on exit

    def run(*args, **kwargs):
        # the arguments the tuner's own prune sees (Autotuner.run: named positional args, launch kwargs)
        named_args = dict(zip(kernel.arg_names, args, strict=False))
        kernel.configs = choose(own_prune(everything, named_args, **kwargs) if own_prune else everything)[:1]
        try:
            return launch(*args, **kwargs)
        finally:
            kernel.configs = saved_configs

    kernel.run = run
    try:
        yield
    finally:
        kernel.configs = saved_configs
        if wrapped:
            kernel.run = launch
        else:
            del kernel.run


@contextlib.contextmanager
def pinned(kernel, config):
    """Within the block, every launch of ``kernel`` that ``config`` may serve runs ``config``."""
    state = PinState()

    def choose(allowed):
        if any(c is config for c in allowed):
            state.served += 1
            return [config]
        if state.served == 0:
            raise NotServed(config_label(config))
        state.not_served += 1
        return allowed

    if len(all_configs(kernel)) < 2:
        raise ValueError("a kernel with a single config has nothing to pin: every launch runs it")
    with _choosing(kernel, choose):
        yield state


@contextlib.contextmanager
def untimed(kernels: dict[str, object]):
    """Within the block, every launch of ``kernels`` runs the first config its own prune allows, without
    benchmarking any: for shapes where one launch takes seconds, which the tuner would run 8 times or more per
    allowed config on a key it has not tuned."""
    with contextlib.ExitStack() as stack:
        for kernel in kernels.values():
            if len(all_configs(kernel)) > 1:
                stack.enter_context(_choosing(kernel, lambda allowed: allowed))
        yield


@dataclass
class LaunchRecorder:
    """Records ``(kernel label, config label)`` of every tuned launch while active."""

    kernels: dict[str, object]
    launches: list[tuple[str, str]] = field(default_factory=list)

    def __enter__(self) -> LaunchRecorder:
        for label, kernel in self.kernels.items():
            original = kernel.run

            def run(*args, _label=label, _kernel=kernel, _original=original, **kwargs):
                result = _original(*args, **kwargs)
                best = getattr(_kernel, "best_config", None)
                self.launches.append((_label, config_label(best) if best is not None else "?"))
                return result

            kernel.run = run
        return self

    def __exit__(self, *exc) -> None:
        for kernel in self.kernels.values():
            # the wrapper is an instance attribute: deleting it exposes the class's run again
            with contextlib.suppress(AttributeError):
                del kernel.run

    def launched(self) -> list[str]:
        return sorted({label for label, _ in self.launches})
