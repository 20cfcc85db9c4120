"""Parity of the public fused ops with the reference, on any input layout: the machinery shared by the
layout tests, the property-based tests and ``python -m mulclip_fast.gpu_check``.

Every public op of :mod:`mulclip_fast.ops` has the form ``op(a, b, a_mask, b_mask, **options)``: two token
sets ``a [Ba, La, d]`` and ``b [Bb, Lb, d]`` (``Ba = Bb`` for the matched ops), their boolean validity masks
and scalar options. :data:`OPS` describes each one. :func:`make_case` draws L2-normalised tokens and masks
from a seed and lays them out in memory the way trainers hand them over (:data:`TOKEN_LAYOUTS`,
:data:`MASK_LAYOUTS`): a slice of a wider feature tensor, a transposed view, a batch that is a view of a
larger one, an expanded (stride-0) mask. The values never depend on the layout, so :func:`check_case`
compares an op's values and input gradients, on the laid-out inputs, with the reference on dense copies.

Tolerances (:data:`TOLERANCE`): fp32 atol 1e-5 / rtol 1e-4 (the kernels use IEEE fp32 dots), fp16 and bf16
rtol 2e-2, always against the reference computed from the same rounded inputs; the atol of a 16-bit input's
gradient is scaled by the gradient's largest magnitude (at least 1), as the matched-op tests do, since that
gradient is rounded to 16 bits once more.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import ops
from . import reference as R
from .ops import costs

TOLERANCE = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-4},
    torch.float16: {"atol": 2e-3, "rtol": 2e-2},
    torch.bfloat16: {"atol": 1e-2, "rtol": 2e-2},
    torch.float64: {"atol": 1e-10, "rtol": 1e-8},
}
HALF_DTYPES = (torch.float16, torch.bfloat16)
BACKENDS = ("torch", "triton", "reference")


@dataclass(frozen=True)
class Sizes:
    """The sizes of one case: ``a [batch_a, len_a, width]``, ``b [batch_b, len_b, width]``.

    For the matched ops ``batch_b`` must equal ``batch_a``. ``k`` is the top-k count of the SAP ops
    (``None`` elsewhere; ``1 <= k <= len_b``)."""

    batch_a: int
    len_a: int
    batch_b: int
    len_b: int
    width: int
    k: int | None = None

    def label(self) -> str:
        text = f"a=[{self.batch_a},{self.len_a},{self.width}] b=[{self.batch_b},{self.len_b},{self.width}]"
        return text + (f" k={self.k}" if self.k is not None else "")


@dataclass(frozen=True)
class OpSpec:
    """One public op: its argument names (for messages), whether both sides share the batch, its
    options for given sizes, and its FLOP/byte model."""

    name: str
    arg_names: tuple[str, str, str, str]
    matched: bool
    options: Callable[[Sizes], dict]
    cost: Callable[[Sizes, int], costs.OpCost]

    @property
    def fused(self) -> Callable:
        return getattr(ops, self.name)

    @property
    def reference(self) -> Callable:
        return getattr(R, self.name)


def _topk(sizes: Sizes) -> dict:
    k = sizes.k if sizes.k is not None else max(1, math.ceil(0.25 * sizes.len_b))
    return {"k": k, "tau": 0.07}


OPS: dict[str, OpSpec] = {
    spec.name: spec
    for spec in (
        OpSpec(
            "wpr_loss",
            ("v_tokens", "t_tokens", "v_mask", "t_mask"),
            True,
            lambda s: {"tau_attn": 0.07, "tau_contrast": 0.07, "reduction": "none"},
            lambda s, item: costs.wpr_loss_cost(s.batch_a, s.len_a, s.len_b, s.width, item),
        ),
        OpSpec(
            "token_reconstruction",
            ("q", "kv", "q_mask", "kv_mask"),
            True,
            lambda s: {"tau": 0.07},
            lambda s, item: costs.token_reconstruction_cost(s.batch_a, s.len_a, s.len_b, s.width, item),
        ),
        OpSpec(
            "topk_patch_aggregate",
            ("sub", "patches", "sub_mask", "patch_mask"),
            True,
            _topk,
            lambda s, item: costs.topk_patch_aggregate_cost(s.batch_a, s.len_a, s.len_b, _topk(s)["k"], s.width, item),
        ),
        OpSpec(
            "pairwise_maxsim",
            ("q", "k", "q_mask", "k_mask"),
            False,
            lambda s: {"bidirectional": True, "negative_slope": 0.1},
            lambda s, item: costs.pairwise_maxsim_cost(s.batch_a, s.len_a, s.batch_b, s.len_b, s.width, True, item),
        ),
        OpSpec(
            "pairwise_reconstruction_scores",
            ("q", "k", "q_mask", "k_mask"),
            False,
            lambda s: {"tau": 0.07},
            lambda s, item: costs.pairwise_reconstruction_cost(s.batch_a, s.len_a, s.batch_b, s.len_b, s.width, item),
        ),
        OpSpec(
            "pairwise_topk_aggregate_cosines",
            ("sub", "patches", "sub_mask", "patch_mask"),
            False,
            _topk,
            lambda s, item: costs.pairwise_topk_aggregate_cost(
                s.batch_a, s.len_a, s.batch_b, s.len_b, _topk(s)["k"], s.width, item
            ),
        ),
    )
}


def missing_ops() -> list[str]:
    """Public ops of ``mulclip_fast.ops`` that :data:`OPS` does not describe (a new op must be added)."""
    return sorted(set(ops.__all__) - set(OPS))


# ----------------------------------------------------------------------------------------------------
# Layouts: the same values, laid out in memory as trainers pass them
# ----------------------------------------------------------------------------------------------------


def _sliced_width(x: torch.Tensor) -> torch.Tensor:
    """``x_big[:, :, :d]`` of a wider feature tensor: rows strided by ``d + 7``."""
    big = x.new_zeros(*x.shape[:-1], x.shape[-1] + 7)
    big[..., : x.shape[-1]] = x
    return big[..., : x.shape[-1]]


def _transposed(x: torch.Tensor) -> torch.Tensor:
    """A ``[B, L, d]`` view of a ``[B, d, L]`` tensor (unit stride along the tokens)."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def _batch_offset(x: torch.Tensor) -> torch.Tensor:
    """``x_big[1:1+B]``: the batch starts one sample into a larger tensor (a storage offset)."""
    big = x.new_zeros(x.shape[0] + 2, *x.shape[1:])
    big[1 : 1 + x.shape[0]] = x
    return big[1 : 1 + x.shape[0]]


def _batch_strided(x: torch.Tensor) -> torch.Tensor:
    """``x_big[::2]``: every other sample of a tensor twice as long (batch stride doubled)."""
    big = x.new_zeros(2 * x.shape[0], *x.shape[1:])
    big[::2] = x
    return big[::2]


def _token_strided(x: torch.Tensor) -> torch.Tensor:
    """``x_big[:, ::2]``: every other token of a longer sequence."""
    big = x.new_zeros(x.shape[0], 2 * x.shape[1], x.shape[2])
    big[:, ::2] = x
    return big[:, ::2]


TOKEN_LAYOUTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "dense": lambda x: x.contiguous(),
    "sliced-width": _sliced_width,
    "transposed": _transposed,
    "batch-offset": _batch_offset,
    "batch-strided": _batch_strided,
    "token-strided": _token_strided,
}


def _mask_transposed(m: torch.Tensor) -> torch.Tensor:
    return m.t().contiguous().t()


def _mask_sliced(m: torch.Tensor) -> torch.Tensor:
    big = torch.zeros(m.shape[0], m.shape[1] + 5, dtype=m.dtype, device=m.device)
    big[:, : m.shape[1]] = m
    return big[:, : m.shape[1]]


# Mask layouts. "expanded-row" repeats sample 0's mask over the batch through a stride-0 view
# (``mask[:1].expand(B, L)``), as a model builds a mask shared by every sample; "expanded-ones" is
# ``torch.ones(L).bool().expand(B, L)``. Both change the mask's values (every row equals row 0, or all
# valid): make_case applies them before drawing anything else, so the reference sees the same values.
MASK_LAYOUTS: tuple[str, ...] = ("dense", "expanded-row", "expanded-ones", "transposed", "sliced", "batch-strided")


def _lay_out_mask(mask: torch.Tensor, layout: str) -> torch.Tensor:
    batch, length = mask.shape
    if layout == "dense":
        return mask.contiguous()
    if layout == "expanded-row":
        return mask[:1].expand(batch, length)
    if layout == "expanded-ones":
        return torch.ones(length, dtype=torch.bool, device=mask.device).expand(batch, length)
    if layout == "transposed":
        return _mask_transposed(mask)
    if layout == "sliced":
        return _mask_sliced(mask)
    if layout == "batch-strided":
        return _batch_strided(mask[..., None])[..., 0]
    raise ValueError(f"mask layout must be one of {MASK_LAYOUTS}, got {layout!r}")


# Mask contents: "random" (about 70 % valid, every sample keeps a token), "prefix" (a random number of
# leading valid tokens, as padded captions), "all-valid", "one-empty" (random, sample 0 fully masked),
# "all-empty" (nothing valid anywhere).
MASK_KINDS: tuple[str, ...] = ("random", "prefix", "all-valid", "one-empty", "all-empty")


def draw_mask(kind: str, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """A ``[batch, length]`` bool validity mask of ``kind`` (see :data:`MASK_KINDS`), on the CPU."""
    if kind == "all-valid":
        return torch.ones(batch, length, dtype=torch.bool)
    if kind == "all-empty":
        return torch.zeros(batch, length, dtype=torch.bool)
    if kind == "prefix":
        valid = torch.randint(1, length + 1, (batch,), generator=generator)
        return torch.arange(length)[None, :] < valid[:, None]
    if kind not in ("random", "one-empty"):
        raise ValueError(f"mask kind must be one of {MASK_KINDS}, got {kind!r}")
    mask = torch.rand(batch, length, generator=generator) < 0.7
    mask[torch.arange(batch), torch.randint(0, length, (batch,), generator=generator)] = True
    if kind == "one-empty":
        mask[0] = False
    return mask


# ----------------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------------


@dataclass
class Case:
    """The inputs of one call of ``op``: laid-out leaf tensors (``a``, ``b`` require grad) and masks."""

    op: OpSpec
    sizes: Sizes
    dtype: torch.dtype
    a: torch.Tensor
    b: torch.Tensor
    a_mask: torch.Tensor
    b_mask: torch.Tensor
    options: dict
    upstream_seed: int
    description: dict = field(default_factory=dict)
    upstream: dict = field(default_factory=dict, repr=False)  # output gradients drawn so far (_upstream)

    def label(self) -> str:
        """Everything needed to reproduce the case, for failure messages and reports."""
        parts = [f"{key}={value}" for key, value in self.description.items()]
        return f"{self.op.name}({self.sizes.label()}, {', '.join(parts)}, options={self.options})"


def make_case(
    op: str | OpSpec,
    sizes: Sizes,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
    a_layout: str = "dense",
    b_layout: str = "dense",
    a_mask_kind: str = "random",
    b_mask_kind: str = "random",
    a_mask_layout: str = "dense",
    b_mask_layout: str = "dense",
    options: dict | None = None,
    draw_on_device: bool = False,
) -> Case:
    """Draw the inputs of ``op`` at ``sizes`` from ``seed`` and lay them out as asked.

    Tokens are L2-normalised in float64 and rounded once to ``dtype`` (what the reference sees is what the
    op sees). ``options`` override the op's defaults (``OpSpec.options``). The tokens are drawn on the CPU, so
    that a seed gives the same case on every device, or with ``draw_on_device`` on ``device`` itself: at the
    GPU check's gathered batch of 4096 a float64 draw is 3.3 GB a side, tens of seconds of a CPU's time.
    """
    spec = OPS[op] if isinstance(op, str) else op
    if spec.matched and sizes.batch_a != sizes.batch_b:
        raise ValueError(f"{spec.name} pairs samples: batch_a and batch_b must match, got {sizes}")
    for name, layout in (("a_layout", a_layout), ("b_layout", b_layout)):
        if layout not in TOKEN_LAYOUTS:
            raise ValueError(f"{name} must be one of {tuple(TOKEN_LAYOUTS)}, got {layout!r}")
    generator = torch.Generator().manual_seed(seed)
    token_generator = torch.Generator(device) if draw_on_device else generator
    if draw_on_device:
        token_generator.manual_seed(seed)

    def tokens(batch: int, length: int, layout: str) -> torch.Tensor:
        shape = (batch, length, sizes.width)
        x = torch.randn(shape, generator=token_generator, dtype=torch.float64, device=token_generator.device)
        x = F.normalize(x, dim=-1).to(dtype=dtype, device=device)
        return TOKEN_LAYOUTS[layout](x).detach().requires_grad_()

    a = tokens(sizes.batch_a, sizes.len_a, a_layout)
    b = tokens(sizes.batch_b, sizes.len_b, b_layout)
    a_mask = draw_mask(a_mask_kind, sizes.batch_a, sizes.len_a, generator).to(device)
    b_mask = draw_mask(b_mask_kind, sizes.batch_b, sizes.len_b, generator).to(device)
    return Case(
        op=spec,
        sizes=sizes,
        dtype=dtype,
        a=a,
        b=b,
        a_mask=_lay_out_mask(a_mask, a_mask_layout),
        b_mask=_lay_out_mask(b_mask, b_mask_layout),
        options={**spec.options(sizes), **(options or {})},
        upstream_seed=seed + 1,
        description={
            "dtype": str(dtype).removeprefix("torch."),
            "layouts": f"{a_layout}/{b_layout}",
            "masks": f"{a_mask_kind}:{a_mask_layout}/{b_mask_kind}:{b_mask_layout}",
            "seed": seed,
        },
    )


def _upstream(case: Case, out: torch.Tensor) -> torch.Tensor:
    """The fixed random output gradient ``g`` of the case (drawn once per output shape, dtype and device, so
    that timing a call does not time drawing it)."""
    key = (tuple(out.shape), out.dtype, out.device)
    if key not in case.upstream:
        generator = torch.Generator().manual_seed(case.upstream_seed)
        g = torch.randn(out.shape, generator=generator, dtype=torch.float32)
        case.upstream[key] = g.to(device=out.device, dtype=out.dtype)
    return case.upstream[key]


def evaluate(
    case: Case, backend: str | None, inputs: tuple[torch.Tensor, ...] | None = None, call: Callable | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(value, grad_a, grad_b)`` of the op on ``case`` with ``backend`` (``None``: the reference function
    itself, or ``call``, e.g. a compiled reference), the gradients those of ``⟨value, g⟩`` for a fixed random
    ``g``. ``inputs`` replaces ``(a, b, a_mask, b_mask)``."""
    a, b, a_mask, b_mask = inputs if inputs is not None else (case.a, case.b, case.a_mask, case.b_mask)
    if backend is None:
        out = (call or case.op.reference)(a, b, a_mask, b_mask, **case.options)
    else:
        out = case.op.fused(a, b, a_mask, b_mask, **case.options, backend=backend)
    grad_a, grad_b = torch.autograd.grad(out, (a, b), grad_outputs=_upstream(case, out))
    return out.detach(), grad_a, grad_b


def dense_inputs(case: Case) -> tuple[torch.Tensor, ...]:
    """Dense, contiguous copies of the case's inputs (fresh leaves), for the reference."""
    return (
        case.a.detach().contiguous().requires_grad_(),
        case.b.detach().contiguous().requires_grad_(),
        case.a_mask.contiguous(),
        case.b_mask.contiguous(),
    )


@dataclass
class Comparison:
    """How far one backend's value and input gradients are from the reference's on one case."""

    case: str
    backend: str
    tolerance: dict
    # per output ("value", grad names): max |got - want|, and the largest excess over atol + rtol·|want|
    max_abs_error: dict
    worst_excess: dict
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems

    def message(self) -> str:
        return f"{self.backend} backend vs reference on {self.case}: " + "; ".join(self.problems)


def compare(got: torch.Tensor, want: torch.Tensor, tolerance: dict) -> tuple[float, float, str | None]:
    """``(max abs error, worst excess over atol + rtol·|want|, problem or None)`` of two tensors."""
    if got.shape != want.shape or got.dtype != want.dtype:
        return math.inf, math.inf, f"shape/dtype {tuple(got.shape)}/{got.dtype} != {tuple(want.shape)}/{want.dtype}"
    g, w = got.double(), want.double()
    if g.numel() == 0:
        return 0.0, -tolerance["atol"], None
    finite_mismatch = (torch.isfinite(g) != torch.isfinite(w)).any()
    error = (g - w).abs().nan_to_num(nan=math.inf)
    excess = error - (tolerance["atol"] + tolerance["rtol"] * w.abs().nan_to_num(nan=0.0))
    max_error, worst = float(error.max()), float(excess.max())
    if bool(finite_mismatch) or worst > 0:
        index = tuple(int(i) for i in torch.unravel_index(excess.argmax(), excess.shape))
        return (
            max_error,
            worst,
            (
                f"max |error| {max_error:.3g} exceeds atol {tolerance['atol']:g} + rtol {tolerance['rtol']:g}·|want| "
                f"(at {index}: got {float(g[index]):.6g}, want {float(w[index]):.6g})"
            ),
        )
    return max_error, worst, None


def check_case(case: Case, backend: str, tolerance: dict | None = None, expected=None) -> Comparison:
    """Compare ``backend`` on the case's (laid-out) inputs with the reference on dense copies.

    ``expected`` may pass a reference result computed earlier (``evaluate(case, None, dense_inputs(case))``)
    to compare several backends with one reference call.
    """
    tolerance = tolerance or TOLERANCE[case.dtype]
    if expected is None:
        expected = evaluate(case, None, dense_inputs(case))
    got = evaluate(case, backend)
    names = ("value", f"grad {case.op.arg_names[0]}", f"grad {case.op.arg_names[1]}")
    errors, excesses, problems = {}, {}, []
    for name, g, w in zip(names, got, expected, strict=True):
        limits = tolerance
        if name != "value" and case.dtype in HALF_DTYPES:
            # gradients of 16-bit inputs are rounded once more: atol scales with their magnitude
            limits = {
                **tolerance,
                "atol": tolerance["atol"] * max(1.0, float(w.detach().abs().max()) if w.numel() else 1.0),
            }
        errors[name], excesses[name], problem = compare(g, w, limits)
        if problem:
            problems.append(f"{name}: {problem}")
    return Comparison(case.label(), backend, tolerance, errors, excesses, problems)
