"""``torch.compile(fullgraph=True)`` of the MulCLIP loss through the fused ops (docs/kernels.md).

Dynamo must trace the custom ops without a graph break, AOTAutograd must run their fake implementations
and registered backward, and the compiled loss and gradients must equal eager ones. The ``aot_eager``
backend checks exactly those contracts; Inductor's C++ code generation adds minutes on a 2-core CPU and
nothing about the ops, so it is not used here.
"""

from __future__ import annotations

import torch

from mulclip_fast.losses import MulCLIPFeatures, MulCLIPLoss


def _features(seed: int = 0) -> MulCLIPFeatures:
    g = torch.Generator().manual_seed(seed)
    batch, patches, words, subcaptions, width = 4, 6, 7, 3, 16

    def leaf(*shape):
        return torch.randn(*shape, generator=g).requires_grad_()

    text_mask = torch.rand(batch, words, generator=g) > 0.2
    text_mask[:, 0] = True
    sub_mask = torch.rand(batch, subcaptions, generator=g) > 0.3
    sub_mask[:, 0] = True
    return MulCLIPFeatures(
        image_cls=leaf(batch, width),
        image_tokens=leaf(batch, patches, width),
        text_eot=leaf(batch, width),
        text_tokens=leaf(batch, words, width),
        short_eot=leaf(batch, width),
        sub_eot=leaf(batch, subcaptions, width),
        sub_mask=sub_mask,
        text_token_mask=text_mask,
    )


def _leaves(f: MulCLIPFeatures) -> list[torch.Tensor]:
    return [f.image_cls, f.image_tokens, f.text_eot, f.text_tokens, f.short_eot, f.sub_eot]


def test_compiled_mulclip_loss_matches_eager():
    loss_fn = MulCLIPLoss(backend="torch")
    features = _features()
    # A learnable tensor logit scale, as a trainer passes model.logit_scale.exp().
    log_scale = torch.tensor(2.6, requires_grad=True)
    eager = loss_fn(features, log_scale.exp())
    eager_grads = torch.autograd.grad(eager["loss"], [*_leaves(features), log_scale])

    compiled_fn = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    compiled = compiled_fn(features, log_scale.exp())
    compiled_grads = torch.autograd.grad(compiled["loss"], [*_leaves(features), log_scale])

    assert set(compiled) == set(eager) == {"global_long", "global_short", "wpr", "sap", "loss"}
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], atol=1e-6, rtol=1e-5)
    for got, want in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
