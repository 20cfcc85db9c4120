"""The reference implementation against the naive loop transcriptions, plus invariances and edge cases."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mulclip_fast.reference as R
from mulclip_fast.model import LocalTokenCalibration

from . import naive

TAU = 0.07


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def random_mask(*shape, p_valid=0.7, seed=1, min_valid=1):
    """Random validity mask with at least ``min_valid`` valid entries in each row."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(*shape, generator=g) < p_valid
    mask[..., :min_valid] = True
    return mask


# --- every reference function against the naive transcription ---------------------------------------


def test_stretch_positional_embedding_matches_long_clip_rule():
    old = torch.randn(77, 6, dtype=torch.float64)
    new = R.stretch_positional_embedding(old)
    assert new.shape == (248, 6)
    torch.testing.assert_close(new, naive.stretch(old))
    torch.testing.assert_close(new[:20], old[:20])  # the first 20 positions are copied
    torch.testing.assert_close(new[20::4][:56], old[20:76])  # every 4th position is an original one


def test_clip_contrastive_loss_matches_naive():
    a, b = unit(7, 5, seed=0), unit(7, 5, seed=1)
    torch.testing.assert_close(R.clip_contrastive_loss(a, b, 10.0), naive.infonce(a, b, 10.0))
    mask = torch.tensor([True, False, True, True, False, True, True])
    torch.testing.assert_close(R.clip_contrastive_loss(a, b, 10.0, mask), naive.infonce(a[mask], b[mask], 10.0))


def test_local_token_calibration_matches_naive():
    torch.manual_seed(0)
    module = LocalTokenCalibration(d=10, n_out=3).double()
    with torch.no_grad():
        module.alpha.fill_(1.7)
    x = torch.randn(4, 9, 10, dtype=torch.float64)
    mask = random_mask(4, 9)
    torch.testing.assert_close(module(x, mask), naive.calibrate(x, mask, module.mlp, 1.7))


def test_token_reconstruction_matches_naive():
    q, kv = unit(3, 5, 6, seed=0), unit(3, 7, 6, seed=1)
    q_mask, kv_mask = random_mask(3, 5, seed=2), random_mask(3, 7, seed=3)
    torch.testing.assert_close(
        R.token_reconstruction(q, kv, q_mask, kv_mask, TAU), naive.reconstruct(q, kv, q_mask, kv_mask, TAU)
    )


def test_wpr_loss_matches_naive():
    v, t = unit(4, 6, 8, seed=0), unit(4, 5, 8, seed=1)
    v_mask, t_mask = random_mask(4, 6, seed=2), random_mask(4, 5, seed=3)
    expected = naive.wpr_loss(v, t, v_mask, t_mask, 0.1, 0.05)
    torch.testing.assert_close(R.wpr_loss(v, t, v_mask, t_mask, 0.1, 0.05, reduction="none"), expected)
    torch.testing.assert_close(R.wpr_loss(v, t, v_mask, t_mask, 0.1, 0.05), expected.mean())


def test_wpr_cosine_loss_matches_naive_and_is_zero_for_a_perfect_reconstruction():
    v, t = unit(4, 6, 8, seed=0), unit(4, 5, 8, seed=1)
    v_mask, t_mask = random_mask(4, 6, seed=2), random_mask(4, 5, seed=3)
    expected = naive.wpr_cosine_loss(v, t, v_mask, t_mask, 0.1)
    torch.testing.assert_close(R.wpr_cosine_loss(v, t, v_mask, t_mask, 0.1, reduction="none"), expected)
    torch.testing.assert_close(R.wpr_cosine_loss(v, t, v_mask, t_mask, 0.1), expected[expected != 0].mean())
    # Patches and words that are the same few orthogonal tokens rebuild each other exactly (at a sharp τa):
    # the loss is 0. Opposite tokens rebuild each other as their negatives: 2 per side.
    same = torch.eye(3, 8, dtype=torch.float64)[None].repeat(2, 1, 1)
    assert R.wpr_cosine_loss(same, same, tau_attn=1e-3).item() == pytest.approx(0, abs=1e-9)
    assert R.wpr_cosine_loss(same[:, :1], -same[:, :1]).item() == pytest.approx(4)


def test_topk_patch_aggregate_matches_naive():
    sub, patches = unit(3, 4, 6, seed=0), unit(3, 11, 6, seed=1)
    sub_mask, patch_mask = random_mask(3, 4, seed=2), random_mask(3, 11, seed=3)
    for k in (1, 3, 11):
        torch.testing.assert_close(
            R.topk_patch_aggregate(sub, patches, sub_mask, patch_mask, k, TAU),
            naive.topk_patch_aggregate(sub, patches, sub_mask, patch_mask, k, TAU),
        )


def test_sap_loss_matched_matches_naive():
    sub, patches = unit(5, 4, 6, seed=0), unit(5, 9, 6, seed=1)
    sub_mask, patch_mask = random_mask(5, 4, p_valid=0.6, seed=2), random_mask(5, 9, seed=3)
    torch.testing.assert_close(
        R.sap_loss(sub, patches, sub_mask, patch_mask, 3, TAU, 12.0),
        naive.sap_loss_matched(sub, patches, sub_mask, patch_mask, 3, TAU, 12.0),
    )


def test_sap_loss_all_pairs_scores_every_subcaption_against_every_image():
    sub, patches = unit(4, 3, 6, seed=0), unit(4, 9, 6, seed=1)
    sub_mask, patch_mask = random_mask(4, 3, seed=2), random_mask(4, 9, seed=3)
    logits = naive.pairwise_topk_aggregate_cosines(sub, patches, sub_mask, patch_mask, 3, TAU)
    slot_losses = []
    for i in range(3):
        rows = [b for b in range(4) if sub_mask[b, i]]
        if len(rows) < 2:
            continue
        s = 12.0 * logits[rows][:, rows, i]
        labels = torch.arange(len(rows))
        slot_losses.append(0.5 * (F.cross_entropy(s, labels) + F.cross_entropy(s.T, labels)))
    expected = sum(slot_losses) / len(slot_losses)
    torch.testing.assert_close(R.sap_loss(sub, patches, sub_mask, patch_mask, 3, TAU, 12.0, pairing="all"), expected)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("negative_slope", [None, 0.1])
def test_pairwise_maxsim_matches_naive(bidirectional, negative_slope):
    q, k = unit(3, 5, 6, seed=0), unit(4, 7, 6, seed=1)
    q_mask, k_mask = random_mask(3, 5, seed=2), random_mask(4, 7, seed=3)
    torch.testing.assert_close(
        R.pairwise_maxsim(q, k, q_mask, k_mask, bidirectional, negative_slope),
        naive.pairwise_maxsim(q, k, q_mask, k_mask, bidirectional, negative_slope),
    )


def test_pairwise_reconstruction_scores_matches_naive():
    q, k = unit(3, 5, 6, seed=0), unit(4, 7, 6, seed=1)
    q_mask, k_mask = random_mask(3, 5, seed=2), random_mask(4, 7, seed=3)
    torch.testing.assert_close(
        R.pairwise_reconstruction_scores(q, k, q_mask, k_mask, TAU),
        naive.pairwise_reconstruction_scores(q, k, q_mask, k_mask, TAU),
    )


def test_pairwise_topk_aggregate_cosines_matches_naive():
    sub, patches = unit(3, 4, 6, seed=0), unit(5, 9, 6, seed=1)
    sub_mask, patch_mask = random_mask(3, 4, seed=2), random_mask(5, 9, seed=3)
    for k in (1, 4, 9):
        torch.testing.assert_close(
            R.pairwise_topk_aggregate_cosines(sub, patches, sub_mask, patch_mask, k, TAU),
            naive.pairwise_topk_aggregate_cosines(sub, patches, sub_mask, patch_mask, k, TAU),
        )


@pytest.mark.parametrize("hardest", [False, True])
def test_finelip_hinge_loss_matches_naive(hardest):
    scores = torch.randn(6, 6, dtype=torch.float64) * 0.3
    expected = naive.finelip_hinge(scores, 0.2, hardest)
    torch.testing.assert_close(R.finelip_hinge_loss(scores, 0.2, hardest).item(), expected)


# --- invariances -----------------------------------------------------------------------------------


def test_padding_tokens_never_change_a_result():
    """Appending padding tokens with arbitrary values leaves every output unchanged."""
    v, t, sub = unit(3, 6, 8, seed=0), unit(3, 5, 8, seed=1), unit(3, 4, 8, seed=2)
    v_mask, t_mask, sub_mask = random_mask(3, 6, seed=3), random_mask(3, 5, seed=4), random_mask(3, 4, seed=5)

    def pad(x, mask, extra):
        junk = 100 * torch.randn(x.shape[0], extra, x.shape[2], dtype=x.dtype)
        return torch.cat([x, junk], 1), torch.cat([mask, torch.zeros(x.shape[0], extra, dtype=torch.bool)], 1)

    vp, vpm = pad(v, v_mask, 3)
    tp, tpm = pad(t, t_mask, 2)
    sp, spm = pad(sub, sub_mask, 2)
    torch.testing.assert_close(R.wpr_loss(vp, tp, vpm, tpm), R.wpr_loss(v, t, v_mask, t_mask))
    torch.testing.assert_close(
        R.token_reconstruction(vp, tp, vpm, tpm)[:, :6], R.token_reconstruction(v, t, v_mask, t_mask)
    )
    torch.testing.assert_close(
        R.topk_patch_aggregate(sp, vp, spm, vpm, 4)[:, :4], R.topk_patch_aggregate(sub, v, sub_mask, v_mask, 4)
    )
    torch.testing.assert_close(
        R.sap_loss(sp, vp, spm, vpm, 4, TAU, 10.0), R.sap_loss(sub, v, sub_mask, v_mask, 4, TAU, 10.0)
    )
    torch.testing.assert_close(
        R.pairwise_maxsim(tp, vp, tpm, vpm, True, 0.1), R.pairwise_maxsim(t, v, t_mask, v_mask, True, 0.1)
    )
    torch.testing.assert_close(
        R.pairwise_reconstruction_scores(tp, vp, tpm, vpm), R.pairwise_reconstruction_scores(t, v, t_mask, v_mask)
    )
    torch.testing.assert_close(
        R.pairwise_topk_aggregate_cosines(sp, vp, spm, vpm, 4)[:, :, :4],
        R.pairwise_topk_aggregate_cosines(sub, v, sub_mask, v_mask, 4),
    )
    module = LocalTokenCalibration(8, 3).double()
    torch.testing.assert_close(module(vp, vpm), module(v, v_mask))


def test_permuting_the_batch_permutes_the_outputs():
    v, t, sub = unit(5, 6, 8, seed=0), unit(5, 5, 8, seed=1), unit(5, 3, 8, seed=2)
    v_mask, t_mask, sub_mask = random_mask(5, 6, seed=3), random_mask(5, 5, seed=4), random_mask(5, 3, seed=5)
    perm = torch.tensor([3, 0, 4, 1, 2])
    torch.testing.assert_close(
        R.wpr_loss(v[perm], t[perm], v_mask[perm], t_mask[perm], reduction="none"),
        R.wpr_loss(v, t, v_mask, t_mask, reduction="none")[perm],
    )
    torch.testing.assert_close(
        R.topk_patch_aggregate(sub[perm], v[perm], sub_mask[perm], v_mask[perm], 2),
        R.topk_patch_aggregate(sub, v, sub_mask, v_mask, 2)[perm],
    )
    torch.testing.assert_close(
        R.pairwise_maxsim(t[perm], v[perm], t_mask[perm], v_mask[perm]),
        R.pairwise_maxsim(t, v, t_mask, v_mask)[perm][:, perm],
    )
    torch.testing.assert_close(
        R.pairwise_topk_aggregate_cosines(sub[perm], v[perm], sub_mask[perm], v_mask[perm], 2),
        R.pairwise_topk_aggregate_cosines(sub, v, sub_mask, v_mask, 2)[perm][:, perm],
    )
    # Batch-level losses are invariant to a permutation of the pairs.
    torch.testing.assert_close(
        R.clip_contrastive_loss(v[perm, 0], t[perm, 0], 5.0), R.clip_contrastive_loss(v[:, 0], t[:, 0], 5.0)
    )
    torch.testing.assert_close(
        R.sap_loss(sub[perm], v[perm], sub_mask[perm], v_mask[perm], 2, TAU, 5.0),
        R.sap_loss(sub, v, sub_mask, v_mask, 2, TAU, 5.0),
    )


# --- edge cases ------------------------------------------------------------------------------------


def test_k_equal_one_picks_the_most_similar_patch():
    sub, patches = unit(2, 3, 6, seed=0), unit(2, 7, 6, seed=1)
    out = R.topk_patch_aggregate(sub, patches, k=1)
    best = (sub @ patches.transpose(1, 2)).argmax(-1)
    torch.testing.assert_close(out, torch.stack([patches[b, best[b]] for b in range(2)]))


def test_k_equal_n_pools_every_valid_patch():
    sub, patches = unit(2, 3, 6, seed=0), unit(2, 7, 6, seed=1)
    patch_mask = random_mask(2, 7, seed=4)
    weights = torch.softmax((sub @ patches.transpose(1, 2) / TAU).masked_fill(~patch_mask[:, None], -torch.inf), -1)
    expected = F.normalize(weights @ patches, dim=-1)
    torch.testing.assert_close(R.topk_patch_aggregate(sub, patches, None, patch_mask, 7, TAU), expected)


def test_fewer_valid_patches_than_k_pools_all_valid_ones():
    sub, patches = unit(1, 2, 6, seed=0), unit(1, 7, 6, seed=1)
    patch_mask = torch.tensor([[True, False, True, False, False, False, False]])
    torch.testing.assert_close(
        R.topk_patch_aggregate(sub, patches, None, patch_mask, 5),
        R.topk_patch_aggregate(sub, patches, None, patch_mask, 2),
    )


def test_k_above_n_is_an_error():
    with pytest.raises(ValueError, match="k must satisfy"):
        R.topk_patch_aggregate(unit(2, 3, 6), unit(2, 7, 6), k=8)
    with pytest.raises(ValueError, match="k must satisfy"):
        R.pairwise_topk_aggregate_cosines(unit(2, 3, 6), unit(2, 7, 6), k=0)


def test_subcaption_count_varying_per_sample_with_empty_rows():
    sub, patches = unit(4, 3, 6, seed=0), unit(4, 8, 6, seed=1)
    sub_mask = torch.tensor([[True, True, True], [True, False, False], [False, False, False], [True, True, False]])
    agg = R.topk_patch_aggregate(sub, patches, sub_mask, None, 3)
    assert torch.all(agg[~sub_mask] == 0)  # invalid subcaptions give zero rows
    torch.testing.assert_close(agg[sub_mask].norm(dim=-1), torch.ones(int(sub_mask.sum()), dtype=torch.float64))
    loss = R.sap_loss(sub, patches, sub_mask, None, 3, TAU, 10.0)
    # slot 2 has one valid sample and carries no contrast; slots 0 (3 samples) and 1 (2) are averaged.
    torch.testing.assert_close(
        loss, naive.sap_loss_matched(sub, patches, sub_mask, torch.ones(4, 8, dtype=torch.bool), 3, TAU, 10.0)
    )


def test_all_subcaptions_masked_gives_zero_loss_with_a_gradient():
    sub = unit(3, 2, 6, seed=0).requires_grad_()
    loss = R.sap_loss(sub, unit(3, 8, 6, seed=1), torch.zeros(3, 2, dtype=torch.bool), None, 2, TAU, 10.0)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(sub.grad == 0)


def test_batch_size_one():
    v, t = unit(1, 5, 6, seed=0), unit(1, 4, 6, seed=1)
    assert R.clip_contrastive_loss(v[:, 0], t[:, 0], 10.0).item() == pytest.approx(0.0, abs=1e-12)
    assert torch.isfinite(R.wpr_loss(v, t))
    assert R.sap_loss(t, v, None, None, 2, TAU, 10.0).item() == 0.0  # no slot has two samples
    assert R.pairwise_maxsim(t, v).shape == (1, 1)
    assert R.finelip_hinge_loss(torch.ones(1, 1)).item() == 0.0


def test_fully_masked_token_row_gives_zeros_and_finite_gradients():
    v = unit(2, 5, 6, seed=0).requires_grad_()
    t = unit(2, 4, 6, seed=1).requires_grad_()
    v_mask = torch.ones(2, 5, dtype=torch.bool)
    t_mask = torch.tensor([[True, True, False, True], [False, False, False, False]])
    rec = R.token_reconstruction(v, t, v_mask, t_mask)
    assert torch.all(rec[1] == 0)
    per_sample = R.wpr_loss(v, t, v_mask, t_mask, reduction="none")
    assert per_sample[1].item() == 0.0
    mean = R.wpr_loss(v, t, v_mask, t_mask)
    torch.testing.assert_close(mean, per_sample[0])  # the empty sample is left out of the mean
    mean.backward()
    assert torch.isfinite(v.grad).all() and torch.isfinite(t.grad).all()
    assert torch.all(t.grad[1] == 0)
    scores = R.pairwise_maxsim(v, t, v_mask, t_mask)
    assert torch.all(scores[:, 1] == 0)
    module = LocalTokenCalibration(6, 2).double()
    out = module(t, t_mask)
    assert torch.all(out[1] == 0)
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters())


# --- gradients -------------------------------------------------------------------------------------


def _grad_inputs(*shapes):
    return [unit(*shape, seed=i).requires_grad_() for i, shape in enumerate(shapes)]


def test_gradcheck_every_differentiable_function():
    q, kv = _grad_inputs((2, 3, 4), (2, 4, 4))
    q_mask, kv_mask = random_mask(2, 3, seed=7), random_mask(2, 4, seed=8)
    checks = {
        "token_reconstruction": (lambda a, b: R.token_reconstruction(a, b, q_mask, kv_mask, 0.5), (q, kv)),
        "wpr_loss": (lambda a, b: R.wpr_loss(a, b, q_mask, kv_mask, 0.5, 0.3), (q, kv)),
        "topk_patch_aggregate": (lambda a, b: R.topk_patch_aggregate(a, b, q_mask, kv_mask, 2, 0.5), (q, kv)),
        "sap_loss": (lambda a, b: R.sap_loss(a, b, q_mask, kv_mask, 2, 0.5, 3.0), (q, kv)),
        "sap_loss_all": (lambda a, b: R.sap_loss(a, b, q_mask, kv_mask, 2, 0.5, 3.0, "all"), (q, kv)),
        "pairwise_maxsim": (lambda a, b: R.pairwise_maxsim(a, b, q_mask, kv_mask, True, 0.1), (q, kv)),
        "pairwise_reconstruction_scores": (
            lambda a, b: R.pairwise_reconstruction_scores(a, b, q_mask, kv_mask, 0.5),
            (q, kv),
        ),
        "pairwise_topk_aggregate_cosines": (
            lambda a, b: R.pairwise_topk_aggregate_cosines(a, b, q_mask, kv_mask, 2, 0.5),
            (q, kv),
        ),
        "clip_contrastive_loss": (lambda a, b: R.clip_contrastive_loss(a[:, 0], b[:, 0], 4.0), (q, kv)),
        "finelip_hinge_loss": (lambda a, b: R.finelip_hinge_loss(a[:, 0] @ b[:, 0].T), (q, kv)),
        "stretch_positional_embedding": (
            lambda a, b: R.stretch_positional_embedding(a.reshape(-1, 4)[:6], 14, 2),
            (q, kv),
        ),
    }
    for name, (fn, inputs) in checks.items():
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5), name
    module = LocalTokenCalibration(4, 2).double()
    assert torch.autograd.gradcheck(lambda x: module(x, q_mask), (q,), eps=1e-6, atol=1e-5)


# --- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: R.wpr_loss(unit(2, 5), unit(2, 3, 5)), "v_tokens must have shape"),
        (lambda: R.wpr_loss(unit(2, 4, 5), unit(2, 3, 6)), "share the feature width"),
        (lambda: R.wpr_loss(unit(2, 4, 5), unit(3, 3, 5)), "same batch size"),
        (
            lambda: R.wpr_loss(unit(2, 4, 5), unit(2, 3, 5), torch.ones(2, 5, dtype=torch.bool)),
            "v_mask must have shape",
        ),
        (lambda: R.wpr_loss(unit(2, 4, 5), unit(2, 3, 5), torch.ones(2, 4)), "v_mask must have dtype torch.bool"),
        (lambda: R.wpr_loss(unit(2, 4, 5), unit(2, 3, 5), tau_attn=0.0), "tau_attn must be a positive"),
        (lambda: R.token_reconstruction(unit(2, 4, 5), unit(2, 3, 5), tau=-1.0), "tau must be a positive"),
        (lambda: R.topk_patch_aggregate(unit(2, 4, 5), unit(2, 3, 5), k=2, tau=0), "tau must be a positive"),
        (lambda: R.topk_patch_aggregate(unit(2, 4, 5), unit(2, 3, 5), k=2.0), "k must be an int"),
        (lambda: R.pairwise_maxsim(unit(2, 4, 5), unit(2, 3, 5).int()), "k must be float16"),
        # the same options the fused max-sim refuses (one check serves both)
        (lambda: R.pairwise_maxsim(unit(2, 4, 5), unit(2, 3, 5), negative_slope=float("inf")), "negative_slope"),
        (lambda: R.pairwise_maxsim(unit(2, 4, 5), unit(2, 3, 5), bidirectional=1), "bidirectional must be a bool"),
        (lambda: R.token_reconstruction(unit(2, 4, 5), unit(2, 3, 5), tau=True), "tau must be a positive"),
        (lambda: R.pairwise_reconstruction_scores(unit(2, 4, 5), unit(2, 3, 5), tau=0), "tau must be a positive"),
        (lambda: R.clip_contrastive_loss(unit(2, 5), unit(2, 5), 0.0), "logit_scale must be a positive"),
        (lambda: R.clip_contrastive_loss(unit(2, 5), unit(2, 5), 1.0, torch.ones(3, dtype=torch.bool)), "mask must be"),
        (lambda: R.sap_loss(unit(2, 4, 5), unit(2, 3, 5), None, None, 2, TAU, 1.0, "some"), "pairing must be"),
        (lambda: R.wpr_loss(unit(2, 4, 5) * torch.nan, unit(2, 3, 5)), "v_tokens contains NaN"),
        (lambda: R.finelip_hinge_loss(torch.ones(2, 3)), "scores must be a square"),
        (lambda: R.finelip_hinge_loss(torch.ones(2, 2), margin=-0.2), "margin must be"),
        (lambda: R.finelip_hinge_loss(torch.ones(2, 2), margin=float("nan")), "margin must be"),
        (lambda: R.stretch_positional_embedding(torch.ones(77, 4), target=250), "target must be"),
    ],
)
def test_bad_input_names_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [None, float("nan"), float("inf"), -float("inf")])
def test_finite_scan_agrees_with_isfinite_and_allocates_nothing_input_sized(dtype, bad):
    from mulclip_fast.profiling import PeakMemoryTracker
    from mulclip_fast.reference.checks import all_finite

    x = torch.randn(4, 300, 64).to(dtype)
    if bad is not None:
        x[2, 123, 45] = bad
    with PeakMemoryTracker() as mem:
        verdict = all_finite(x)
    assert verdict == bool(torch.isfinite(x).all()) == (bad is None)
    # min, max and their two flags: a few scalars, where isfinite(x).all() holds 1.7x the input.
    assert mem.peak < 1024, mem.peak
    assert all_finite(torch.empty(2, 0, 3, dtype=dtype))


def test_finite_checks_can_be_switched_off_and_back_on():
    import mulclip_fast
    from mulclip_fast import ops

    v, t = unit(2, 4, 5), unit(2, 3, 5)
    v[0, 1, 2] = torch.nan
    with pytest.raises(ValueError, match="v_tokens contains NaN"):
        R.wpr_loss(v, t)
    previous = mulclip_fast.set_finite_checks(False)
    try:
        assert previous is True
        # No scan: the NaN reaches the result, in the reference and in the fused ops alike.
        assert torch.isnan(R.wpr_loss(v, t))
        assert torch.isnan(ops.wpr_loss(v, t, backend="torch"))
        assert torch.isnan(ops.pairwise_maxsim(v, t, backend="torch")).any()
        with pytest.raises(ValueError, match="must share the feature width"):  # other checks stay on
            R.wpr_loss(v, unit(2, 3, 6))
    finally:
        assert mulclip_fast.set_finite_checks(previous) is False
    with pytest.raises(ValueError, match="q contains NaN"):
        ops.pairwise_maxsim(v, t, backend="torch")
