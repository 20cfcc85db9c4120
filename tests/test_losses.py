"""MulCLIPLoss composes the reference terms exactly as docs/method.md writes the total."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import mulclip_fast.reference as R
from mulclip_fast.losses import MulCLIPFeatures, MulCLIPLoss

B, P, K, M, D = 5, 7, 6, 3, 8
SCALE = 14.0


def features(seed=0) -> MulCLIPFeatures:
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    sub_mask = torch.rand(B, M, generator=g) < 0.7
    sub_mask[:, 0] = True
    text_mask = torch.ones(B, K, dtype=torch.bool)
    text_mask[1, 4:] = False
    return MulCLIPFeatures(
        image_cls=r(B, D),
        image_tokens=r(B, P, D),
        text_eot=r(B, D),
        text_tokens=r(B, K, D),
        short_eot=r(B, D),
        sub_eot=r(B, M, D),
        sub_mask=sub_mask,
        text_token_mask=text_mask,
    )


def n(x):
    return F.normalize(x, dim=-1)


def reference_terms(f: MulCLIPFeatures) -> dict[str, torch.Tensor]:
    """The default MulCLIP terms of ``f``, each from its reference function (matched SAP, k = ⌈0.25·P⌉)."""
    k = math.ceil(0.25 * P)
    return {
        "global_long": R.clip_contrastive_loss(n(f.image_cls), n(f.text_eot), SCALE),
        "global_short": R.clip_contrastive_loss(n(f.image_cls), n(f.short_eot), SCALE),
        "wpr": R.wpr_loss(n(f.image_tokens), n(f.text_tokens), None, f.text_token_mask),
        "sap": R.sap_loss(n(f.sub_eot), n(f.image_tokens), f.sub_mask, None, k, 0.07, SCALE),
    }


def test_mulclip_total_is_the_weighted_sum_of_reference_terms():
    f = features()
    out = MulCLIPLoss("mulclip")(f, SCALE)
    expected = reference_terms(f)
    for name, value in expected.items():
        torch.testing.assert_close(out[name], value, msg=name)
    total = expected["global_long"] + 0.5 * expected["global_short"] + expected["wpr"] + expected["sap"]
    torch.testing.assert_close(out["loss"], total)


def test_all_pairs_sap_matches_the_reference_sap_loss():
    f = features(1)
    out = MulCLIPLoss("mulclip", sap_pairing="all")(f, SCALE)
    k = math.ceil(0.25 * P)
    torch.testing.assert_close(
        out["sap"], R.sap_loss(n(f.sub_eot), n(f.image_tokens), f.sub_mask, None, k, 0.07, SCALE, "all")
    )


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_cosine_wpr_form_matches_its_reference_in_value_and_gradient(backend):
    """``wpr_form="cosine"`` on every backend (Triton under the interpreter here) against
    ``reference.wpr_cosine_loss``, with a masked word and a sample without words."""
    f = features(2)
    f.text_token_mask[3] = False
    for field in ("image_cls", "text_eot", "short_eot", "sub_eot"):
        setattr(f, field, getattr(f, field).float())
    tokens = (f.image_tokens.float().requires_grad_(), f.text_tokens.float().requires_grad_())
    f.image_tokens, f.text_tokens = tokens
    out = MulCLIPLoss("mulclip", terms=("wpr",), wpr_form="cosine", tau_attn=0.1, backend=backend)(f, SCALE)["wpr"]
    expected = R.wpr_cosine_loss(n(tokens[0]), n(tokens[1]), None, f.text_token_mask, 0.1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    for got, want in zip(torch.autograd.grad(out, tokens), torch.autograd.grad(expected, tokens), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_an_empty_batch_gives_the_reference_terms(backend):
    """B = 0 (a filtered batch with nothing left): every term is the reference's 0, not 0 / 0."""
    f = features()
    for field in ("image_cls", "image_tokens", "text_eot", "text_tokens", "short_eot", "sub_eot"):
        setattr(f, field, getattr(f, field)[:0].requires_grad_())
    f.sub_mask, f.text_token_mask = f.sub_mask[:0], f.text_token_mask[:0]
    out = MulCLIPLoss("mulclip", backend=backend)(f, SCALE)
    expected = reference_terms(f)
    for name, value in expected.items():
        torch.testing.assert_close(out[name], value, msg=name)
    out["loss"].backward()
    assert f.image_cls.grad is not None and f.image_cls.grad.shape == (0, D)


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("hardest_negative", [False, True], ids=["all-negatives", "hardest"])
def test_an_empty_batch_gives_a_zero_finelip_term(backend, hardest_negative):
    """FineLIP's hinge on B = 0 is 0 like every other term (it was 0 / 0, or amax over nothing)."""
    f = features()
    for field in ("image_cls", "image_tokens", "text_eot", "text_tokens", "short_eot"):
        setattr(f, field, getattr(f, field)[:0].requires_grad_())
    f.sub_eot, f.sub_mask, f.text_token_mask = None, None, f.text_token_mask[:0]
    out = MulCLIPLoss("finelip", finelip_hardest_negative=hardest_negative, backend=backend)(f, SCALE)
    assert float(out["finelip"]) == 0.0 and float(out["loss"]) == 0.0
    out["loss"].backward()
    assert f.image_tokens.grad is not None and f.image_tokens.grad.shape == f.image_tokens.shape
    scores = torch.zeros(0, 0, requires_grad=True)
    assert float(R.finelip_hinge_loss(scores, hardest_negative=hardest_negative)) == 0.0


def test_a_sap_token_mask_without_sap_tokens_is_refused():
    """SAP reads image_tokens with image_token_mask when sap_tokens is None: a sap_token_mask alone would
    be dropped without a word."""
    f = features()
    f.sap_token_mask = torch.ones(B, P, dtype=torch.bool)
    with pytest.raises(ValueError, match="sap_token_mask was given without features.sap_tokens"):
        MulCLIPLoss("mulclip")(f, SCALE)


def test_objectives_and_ablation_switches_select_terms():
    f = features()
    assert set(MulCLIPLoss("global")(f, SCALE)) == {"global_long", "global_short", "loss"}
    assert set(MulCLIPLoss("finelip")(f, SCALE)) == {"global_long", "global_short", "finelip", "loss"}
    no_sap = MulCLIPLoss(terms=("global_long", "global_short", "wpr"))(f, SCALE)
    assert "sap" not in no_sap and "wpr" in no_sap


@pytest.mark.parametrize("hardest_negative", [False, True])
def test_finelip_term_uses_late_interaction_over_tokens_with_cls_and_eot(hardest_negative):
    f = features(2)
    out = MulCLIPLoss("finelip", finelip_hardest_negative=hardest_negative)(f, SCALE)
    v = torch.cat([n(f.image_cls)[:, None], n(f.image_tokens)], 1)
    t = torch.cat([n(f.text_eot)[:, None], n(f.text_tokens)], 1)
    t_mask = torch.cat([torch.ones(B, 1, dtype=torch.bool), f.text_token_mask], 1)
    scores = R.pairwise_maxsim(t, v, t_mask, None, bidirectional=True, negative_slope=0.1)
    torch.testing.assert_close(out["finelip"], R.finelip_hinge_loss(scores, 0.2, hardest_negative))


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_finelip_term_on_captions_without_word_tokens_scores_the_eot_alone(backend):
    """A batch whose captions have no words (``text_tokens [B, 0, d]``): FineLIP's text sets are the EOT alone."""
    f = features(3)
    f.text_tokens, f.text_token_mask = f.text_tokens[:, :0], f.text_token_mask[:, :0]
    out = MulCLIPLoss("finelip", backend=backend)(f, SCALE)
    v = torch.cat([n(f.image_cls)[:, None], n(f.image_tokens)], 1)
    scores = R.pairwise_maxsim(n(f.text_eot)[:, None], v, None, None, bidirectional=True, negative_slope=0.1)
    torch.testing.assert_close(out["finelip"], R.finelip_hinge_loss(scores, 0.2))


def test_fine_grained_scale_ramps_only_the_fine_grained_terms():
    f = features()
    loss = MulCLIPLoss("mulclip", weights={"wpr": 2.0})
    out = loss(f, SCALE, fine_grained_scale=0.25)
    expected = out["global_long"] + 0.5 * out["global_short"] + 0.25 * (2.0 * out["wpr"] + out["sap"])
    torch.testing.assert_close(out["loss"], expected)


@pytest.mark.parametrize("scale", [-0.5, float("nan"), float("inf"), "0.5", True, None, torch.ones(2)])
def test_a_bad_fine_grained_scale_is_named(scale):
    # A negative factor turned the fine-grained terms into rewards without a word; a string or None failed
    # inside the weighted sum with a TypeError.
    with pytest.raises(ValueError, match="fine_grained_scale must be"):
        MulCLIPLoss("mulclip")(features(), SCALE, fine_grained_scale=scale)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_terms_are_accumulated_in_fp32_under_bf16_autocast(backend):
    """``--precision bf16`` runs the loss inside the step's autocast region. The loss must still compute in
    fp32 as docs/method.md ("Dtypes") says: autocast once turned its fp32 matmuls back into bf16, rounding
    logits of up to s = 100 to steps of 0.5 and returning bf16 losses."""
    f = features(4)
    for field in ("image_cls", "image_tokens", "text_eot", "text_tokens", "short_eot", "sub_eot"):
        setattr(f, field, getattr(f, field).to(torch.bfloat16))  # the towers' outputs under autocast
    loss = MulCLIPLoss("mulclip", terms=("global_long", "global_short", "wpr", "sap", "finelip"), backend=backend)
    scale = torch.tensor(100.0)
    expected = loss(f, scale)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss(f, scale)
    for name, value in expected.items():
        assert out[name].dtype == torch.float32, name
        torch.testing.assert_close(out[name], value, atol=1e-6, rtol=1e-6, msg=name)


def test_global_terms_run_on_meta_tensors_where_autocast_does_not_exist():
    """Switching autocast off must not refuse a device without autocast (shape and memory estimates)."""
    f = features()
    for field in ("image_cls", "text_eot", "short_eot"):
        setattr(f, field, getattr(f, field).to("meta"))
    out = MulCLIPLoss("global", backend="torch")(f, SCALE)
    assert out["loss"].device.type == "meta" and out["loss"].shape == ()


def test_gradients_flow_to_every_feature():
    f = features()
    for name in ("image_cls", "image_tokens", "text_eot", "text_tokens", "short_eot", "sub_eot"):
        getattr(f, name).requires_grad_()
    MulCLIPLoss("mulclip")(f, SCALE)["loss"].backward()
    for name in ("image_cls", "image_tokens", "text_eot", "text_tokens", "short_eot", "sub_eot"):
        grad = getattr(f, name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"objective": "clip"}, "objective must be one of"),
        ({"terms": ("global_long", "words")}, "unknown loss terms"),
        ({"terms": ()}, "terms must name at least one"),  # its "loss" was the int 0, which has no backward
        ({"terms": "wpr"}, "terms must be a tuple of term names"),  # was reported as unknown terms w, p, r
        ({"weights": [("wpr", 1.0)]}, "weights must be a dict"),
        ({"sap_pairing": "some"}, "sap_pairing must be"),
        ({"sap_topk_ratio": 0.0}, "sap_topk_ratio must be"),
        ({"tau_sap": 0.0}, "tau_sap must be"),
        ({"tau_attn": "0.07"}, "tau_attn must be"),  # e.g. read from a config file unparsed
        ({"tau_contrast": float("inf")}, "tau_contrast must be"),
        ({"sap_topk_ratio": "0.25"}, "sap_topk_ratio must be"),
        ({"finelip_margin": -0.2}, "finelip_margin must be"),  # reference.finelip_hinge_loss refuses it too
        ({"finelip_margin": float("nan")}, "finelip_margin must be"),
        ({"finelip_hardest_negative": "false"}, "finelip_hardest_negative must be a bool"),  # was truthy
        ({"weights": {"wpr": float("nan")}}, r"weights\['wpr'\] must be"),
        ({"weights": {"sap": "1"}}, r"weights\['sap'\] must be"),
        ({"weights": {"wpr": -1.0}}, r"weights\['wpr'\] must be a finite number >= 0"),  # a reward, not a loss
        ({"wpr_form": "l2"}, "wpr_form must be one of"),
        ({"backend": "cuda"}, "backend must be one of"),
    ],
)
def test_bad_configuration_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MulCLIPLoss(**kwargs)


def test_missing_features_for_an_enabled_term_are_named():
    f = features()
    f.sub_eot = None
    with pytest.raises(ValueError, match="sap term needs features.sub_eot"):
        MulCLIPLoss("mulclip")(f, SCALE)
