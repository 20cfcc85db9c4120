"""Every public op, on every backend, on the input layouts trainers pass (issue 14).

Values and input gradients of ``mulclip_fast.ops.<op>(..., backend=...)`` on laid-out inputs against the
reference on dense copies of the same values (``mulclip_fast.op_parity``): expanded (stride-0) masks,
token tensors sliced out of wider ones or transposed, a batch that is a view of a larger tensor, masks
that are transposed or sliced views, one sample with every token masked, batch 1, and widths that are not
multiples of 16 (24 and 40). ``uint8`` masks are refused with an error naming the argument. Tolerances:
fp32 atol 1e-5 / rtol 1e-4.

The Triton cases run in Triton's interpreter on machines without CUDA (root conftest), so sizes stay tiny.
"""

from __future__ import annotations

import pytest
import torch

from mulclip_fast import ops
from mulclip_fast.op_parity import (
    BACKENDS,
    MASK_LAYOUTS,
    OPS,
    TOKEN_LAYOUTS,
    Sizes,
    check_case,
    make_case,
    missing_ops,
)
from mulclip_fast.ops._dispatch import interpreter_enabled

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.usefixtures("one_thread")

# (sizes, make_case keyword arguments) per scenario; the matched ops take batch_b = batch_a.
SCENARIOS = {
    "expanded-row-masks": ({}, {"a_mask_layout": "expanded-row", "b_mask_layout": "expanded-row"}),
    "expanded-ones-masks": ({}, {"a_mask_layout": "expanded-ones", "b_mask_layout": "expanded-ones"}),
    "sliced-and-transposed-tokens": ({}, {"a_layout": "sliced-width", "b_layout": "transposed"}),
    "transposed-and-sliced-tokens": ({}, {"a_layout": "transposed", "b_layout": "sliced-width"}),
    "batch-views": ({}, {"a_layout": "batch-offset", "b_layout": "batch-strided"}),
    "strided-tokens-and-masks": (
        {},
        {
            "a_layout": "token-strided",
            "b_layout": "batch-offset",
            "a_mask_layout": "transposed",
            "b_mask_layout": "batch-strided",
        },
    ),
    "sliced-masks-expanded-tokens": ({}, {"a_mask_layout": "sliced", "b_mask_layout": "expanded-row"}),
    "one-sample-all-masked": ({}, {"a_mask_kind": "one-empty", "b_mask_kind": "one-empty"}),
    "batch-1": ({"batch_a": 1, "batch_b": 1}, {"a_layout": "sliced-width", "b_mask_layout": "expanded-row"}),
    "width-24-all-layouts": ({"width": 24}, {"a_layout": "transposed", "b_layout": "batch-strided"}),
}


def _sizes(op: str, **override) -> Sizes:
    base = {"batch_a": 3, "len_a": 5, "batch_b": 3 if OPS[op].matched else 2, "len_b": 7, "width": 40, "k": 3}
    base.update(override)
    if OPS[op].matched:
        base["batch_b"] = base["batch_a"]
    return Sizes(**base)


def _skip_without_triton(backend: str) -> None:
    if backend == "triton" and not (torch.cuda.is_available() or interpreter_enabled()):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")


def test_every_public_op_is_covered():
    assert missing_ops() == [], "describe the new op in mulclip_fast.op_parity.OPS so the layout tests cover it"
    for op, spec in OPS.items():
        cost = spec.cost(_sizes(op), 4)  # the FLOP/byte model the GPU check reports against
        assert cost.flops > 0 and cost.bytes_forward > 0 and cost.bytes_backward > 0, op


@pytest.mark.parametrize("layout", list(TOKEN_LAYOUTS))
def test_token_layouts_keep_values_and_change_strides(layout):
    case = make_case("token_reconstruction", _sizes("token_reconstruction"), a_layout=layout)
    generator = torch.Generator().manual_seed(0)
    dense = torch.randn(3, 5, 40, generator=generator, dtype=torch.float64)
    dense = torch.nn.functional.normalize(dense, dim=-1).float()
    assert torch.equal(case.a.detach().cpu(), dense)
    assert case.a.is_leaf and case.a.requires_grad
    # every layout but "dense" is a view a kernel cannot read as a fresh dense tensor
    assert (case.a.is_contiguous() and case.a.storage_offset() == 0) == (layout == "dense")


@pytest.mark.parametrize("layout", MASK_LAYOUTS)
def test_mask_layouts_are_the_views_they_claim(layout):
    case = make_case("token_reconstruction", _sizes("token_reconstruction"), a_mask_layout=layout)
    mask = case.a_mask
    assert mask.dtype == torch.bool and mask.shape == (3, 5)
    if layout.startswith("expanded"):
        assert mask.stride(0) == 0
    else:
        assert mask.is_contiguous() == (layout == "dense")
    if layout == "expanded-ones":
        assert bool(mask.all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("op", list(OPS))
def test_layout_parity(op: str, scenario: str, backend: str):
    """Values and gradients of the op on the scenario's layouts equal the reference on dense inputs."""
    _skip_without_triton(backend)
    size_override, layouts = SCENARIOS[scenario]
    case = make_case(op, _sizes(op, **size_override), device=DEVICE, seed=11, **layouts)
    result = check_case(case, backend)
    assert result.ok, result.message()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(OPS))
def test_uint8_masks_are_refused_with_the_argument_named(op: str, backend: str):
    """Masks are boolean (True = valid); a uint8 mask is refused up front, not read as bytes by a kernel."""
    _skip_without_triton(backend)
    case = make_case(op, _sizes(op), device=DEVICE)
    mask_names = OPS[op].arg_names[2:]
    for position, name in enumerate(mask_names):
        masks = [case.a_mask, case.b_mask]
        masks[position] = masks[position].to(torch.uint8)
        with pytest.raises(ValueError, match=rf"{name} must have dtype torch\.bool"):
            getattr(ops, op)(case.a, case.b, *masks, **case.options, backend=backend)


def _lnd_tokens(batch: int, length: int, width: int = 16) -> torch.Tensor:
    """``[B, L, d]`` tokens stored as ``[L, B, d]``: CLIP's ``permute(1, 0, 2)`` of its transformer output, dense
    but not contiguous, so ``torch.empty_like`` keeps its strides."""
    generator = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(length, batch, width, generator=generator), dim=-1)
    return x.to(DEVICE).transpose(0, 1)


def _custom_op_cases(backend: str):
    """(op name, token and mask arguments, forward options, the forward outputs its backward reads, backward
    options) per custom op."""
    a, b = _lnd_tokens(2, 5), _lnd_tokens(2, 4)
    a_mask = torch.ones(2, 5, dtype=torch.bool, device=DEVICE)
    b_mask = torch.ones(2, 4, dtype=torch.bool, device=DEVICE)
    none = slice(0)
    return [
        ("token_reconstruction", (a, b, a_mask, b_mask), (0.2, backend), slice(0, 2), (0.2, backend)),
        ("wpr_loss", (a, b, a_mask, b_mask), (0.2, 0.3, backend), none, (0.2, 0.3, backend)),
        ("topk_patch_aggregate", (b, a, b_mask, a_mask), (2, 0.2, backend), none, (2, 0.2, backend)),
        ("pairwise_maxsim", (a, b, a_mask, b_mask), (True, 0.1, backend), slice(1, 5), (True, 0.1, backend)),
        ("pairwise_reconstruction_scores", (a, b, a_mask, b_mask), (0.2, backend), slice(1, 3), (0.2, backend)),
        ("pairwise_topk_aggregate_cosines", (b, a, b_mask, a_mask), (2, 0.2, backend), slice(1, 3), (0.2, backend)),
    ]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_custom_ops_declare_the_strides_they_return_for_permuted_tokens(backend):
    """Each forward and backward custom op returns, for tokens laid out ``[L, B, d]``, the strides its fake
    declares: ``torch.compile`` asserts them (Inductor raised in ``pairwise_maxsim_backward`` on such tokens)."""
    _skip_without_triton(backend)
    checks = ("test_schema", "test_faketensor")
    for name, inputs, options, saved, backward_options in _custom_op_cases(backend):
        forward = getattr(torch.ops.mulclip_fast, name).default
        backward = getattr(torch.ops.mulclip_fast, f"{name}_backward").default
        torch.library.opcheck(forward, (*inputs, *options), test_utils=checks)
        outputs = forward(*inputs, *options)
        outputs = (outputs,) if isinstance(outputs, torch.Tensor) else outputs
        grad = torch.randn_like(outputs[0])
        torch.library.opcheck(backward, (grad, *inputs, *outputs[saved], *backward_options), test_utils=checks)
