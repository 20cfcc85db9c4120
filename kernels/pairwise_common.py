"""Autotune configs per input dtype for the all-pairs kernels (``pairwise_*.py``).

fp32 inputs run ``tl.dot`` in IEEE fp32 on the CUDA cores (``_aot.dot_precision``), where every thread
holds its rows of both operands for the whole reduction: the d chunk must stay small (16) or registers
spill. fp16/bf16 inputs go to the tensor cores, where larger d chunks and tiles pay. Each kernel gets
two lists; the autotuner keeps the list of the launch's dtype (an early prune on a pointer argument's
dtype) and the compile check (``compile_check``) compiles exactly that list per dtype.
"""

from __future__ import annotations

import torch


def _key(config) -> tuple:
    return tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages


class DtypeConfigs:
    """Two autotune config lists, one for fp32 inputs and one for fp16/bf16 inputs."""

    def __init__(self, fp32: list, half: list, pointer_arg: str):
        self.fp32, self.half, self.pointer_arg = fp32, half, pointer_arg

    @property
    def all(self) -> list:
        """Every distinct config, the fp16/bf16 list first: under the interpreter ``_aot.autotune`` keeps
        only the first, and its larger tiles mean fewer (slowly interpreted) program instances."""
        unique = {}
        for config in self.half + self.fp32:
            unique.setdefault(_key(config), config)
        return list(unique.values())

    def for_dtype(self, dtype: torch.dtype) -> list:
        return self.fp32 if dtype == torch.float32 else self.half

    def prune(self) -> dict:
        """``prune_configs_by`` for ``triton.autotune``: keep the configs of the launch's dtype."""

        def early_config_prune(configs, named_args, **kwargs):
            wanted = {_key(c) for c in self.for_dtype(named_args[self.pointer_arg].dtype)}
            kept = [c for c in configs if _key(c) in wanted]
            return kept or configs[:1]

        return {"early_config_prune": early_config_prune}

    def select_specs(self, specs: list, dtype: torch.dtype) -> list:
        """The compile specs (from ``_aot.autotuned_specs``) of the configs this dtype launches."""
        wanted = self.for_dtype(dtype)

        def launched(spec) -> bool:
            return any(
                c.num_warps == spec.num_warps
                and c.num_stages == spec.num_stages
                and all(spec.constexprs.get(name) == value for name, value in c.kwargs.items())
                for c in wanted
            )

        return [spec for spec in specs if launched(spec)]
