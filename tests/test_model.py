"""CLIP towers: OpenAI layout, feature extraction, trimming exactness, checkpoint loading."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from mulclip_fast.losses import MulCLIPLoss
from mulclip_fast.model import CLIP, CheckpointError, load_clip_weights, preset_config
from mulclip_fast.model.clip import alibi_bias
from mulclip_fast.reference import stretch_positional_embedding

EOT, SOT = 49407, 49406
# A two-layer tiny model keeps these tests fast; every code path is the same as the preset's.
SMALL = {"vision_layers": 1, "transformer_layers": 1}


def small_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return CLIP(preset_config("tiny", **{**SMALL, **overrides}))


def token_ids(lengths, width):
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, 0] = SOT
        ids[row, 1 : n - 1] = torch.randint(1, 49000, (n - 2,))
        ids[row, n - 1] = EOT
    return ids


def test_openai_layout_keys_and_shapes():
    state = CLIP(preset_config("vit-b-16")).state_dict()
    expected = {
        "visual.conv1.weight": (768, 3, 16, 16),
        "visual.class_embedding": (768,),
        "visual.positional_embedding": (197, 768),
        "visual.transformer.resblocks.11.attn.in_proj_weight": (2304, 768),
        "visual.transformer.resblocks.0.attn.out_proj.weight": (768, 768),
        "visual.transformer.resblocks.0.mlp.c_fc.weight": (3072, 768),
        "visual.ln_post.weight": (768,),
        "visual.proj": (768, 512),
        "token_embedding.weight": (49408, 512),
        "positional_embedding": (248, 512),
        "transformer.resblocks.11.mlp.c_proj.weight": (512, 2048),
        "ln_final.weight": (512,),
        "text_projection": (512, 512),
        "logit_scale": (),
    }
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key
    assert "visual.transformer.resblocks.12.ln_1.weight" not in state
    extra = {k for k in state if k.split(".")[0] in ("patch_calibration", "word_calibration")}
    assert {k.split(".")[0] for k in extra} == {"patch_calibration", "word_calibration"}
    assert state["patch_calibration.mlp.3.weight"].shape == (39, 102)  # N' = floor(0.2 * 196), hidden 0.2 d


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown preset 'vit-h-14'"):
        preset_config("vit-h-14")


def test_features_shapes_masks_and_calibration():
    model = small_model()
    b, m = 3, 4
    images = torch.randn(b, 3, 64, 64)
    long_ids = token_ids([30, 12, 2], 30)  # the last caption is empty: SOT, EOT only
    sub_ids = torch.stack([token_ids([9, 5, 7, 2], 9) for _ in range(b)])
    sub_mask = torch.tensor([[True, True, True, False], [True, False, False, False], [True, True, True, True]])
    f = model.features(images, long_ids, token_ids([8, 5, 6], 8), sub_ids, sub_mask)
    n_out = model.config.num_calibrated_tokens
    assert f.image_cls.shape == (b, 128) and f.text_eot.shape == (b, 128)
    assert f.image_tokens.shape == (b, n_out, 128) and f.text_tokens.shape == (b, n_out, 128)
    assert f.short_eot.shape == (b, 128) and f.sub_eot.shape == (b, m, 128)
    assert (f.sub_eot[~sub_mask] == 0).all() and (f.sub_eot[sub_mask].abs().sum(-1) > 0).all()
    assert f.text_token_mask[:2].all() and not f.text_token_mask[2].any()
    _, _, word_mask = model.encode_text_tokens(long_ids)
    assert word_mask.sum(1).tolist() == [28, 10, 0]  # SOT, EOT and padding excluded
    losses = MulCLIPLoss(backend="reference")(f, model.logit_scale.exp())
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"]) and model.word_calibration.alpha.grad is not None


def test_features_without_calibration_are_the_raw_tokens():
    """``calibrate=False`` (``--no-calibration``, the "LC off" ablation): WPR and SAP read the projected patches
    and the caption's word tokens, masked to its words, and the calibration modules take no part."""
    model = small_model()
    images = torch.randn(3, 3, 64, 64)
    long_ids = token_ids([30, 12, 2], 30)
    sub_ids = torch.stack([token_ids([9, 5], 9) for _ in range(3)])
    sub_mask = torch.tensor([[True, True], [True, False], [False, True]])
    raw = model.features(images, long_ids, token_ids([8, 5, 6], 8), sub_ids, sub_mask, calibrate=False)
    _, v_loc = model.encode_image_tokens(images)
    _, t_loc, words = model.encode_text_tokens(long_ids)
    torch.testing.assert_close(raw.image_tokens, v_loc)
    torch.testing.assert_close(raw.text_tokens[words], t_loc[words], atol=1e-5, rtol=1e-5)
    assert torch.equal(raw.text_token_mask, words) and raw.sap_tokens is None
    losses = MulCLIPLoss(backend="reference")(raw, model.logit_scale.exp())
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"]) and losses["wpr"] > 0 and losses["sap"] > 0
    assert model.patch_calibration.alpha.grad is None and model.word_calibration.alpha.grad is None
    assert model.visual.proj.grad is not None


def test_subcaptions_match_single_encodings_and_trimming_is_exact():
    model = small_model().eval()
    ids = token_ids([5, 17, 9, 3], 77)
    full = model.encode_text(ids)
    trimmed = model.encode_text(ids[:, :17])
    torch.testing.assert_close(full, trimmed, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.encode_text_by_length(ids, chunk=2), full, atol=1e-5, rtol=1e-5)
    sub_ids = ids[None].expand(2, -1, -1)
    mask = torch.tensor([[True, True, False, True], [False, True, True, True]])
    f = model.features(torch.randn(2, 3, 64, 64), ids[:2, :20], sub_ids=sub_ids, sub_mask=mask)
    torch.testing.assert_close(f.sub_eot[mask], full[None].expand(2, -1, -1)[mask], atol=1e-5, rtol=1e-5)


def test_text_tower_is_causal_and_pooled_at_eot():
    model = small_model().eval()
    ids = token_ids([6, 6], 10)
    ids[1, 6:] = torch.randint(1, 49000, (4,))  # garbage after EOT must not change the EOT embedding
    ids[1, :6] = ids[0, :6]
    out = model.encode_text(ids)
    torch.testing.assert_close(out[0], out[1], atol=1e-5, rtol=1e-5)


def test_alibi_bias_is_causal_with_press_et_al_slopes():
    bias = alibi_bias(4, 5)
    assert bias.shape == (4, 5, 5)
    above = torch.ones(5, 5, dtype=torch.bool).triu(1)
    assert (bias[:, above] == float("-inf")).all() and torch.isfinite(bias[:, ~above]).all()  # causal
    for head, slope in enumerate([1 / 4, 1 / 16, 1 / 64, 1 / 256]):
        torch.testing.assert_close(bias[head, 4, :], -slope * torch.tensor([4.0, 3, 2, 1, 0]))


def test_text_alibi_only_in_the_tiny_preset_and_adds_no_state():
    assert preset_config("tiny").text_alibi
    assert not any(preset_config(name).text_alibi for name in ("vit-b-16", "vit-l-14", "vit-l-14-336"))
    with_alibi, without = small_model(), small_model(text_alibi=0)
    assert with_alibi.transformer.alibi is not None and without.transformer.alibi is None
    assert with_alibi.visual.transformer.alibi is None  # the vision tower is not causal and has none
    # Same keys and shapes: checkpoints keep OpenAI's layout either way.
    assert {k: v.shape for k, v in with_alibi.state_dict().items()} == {
        k: v.shape for k, v in without.state_dict().items()
    }
    without.load_state_dict(with_alibi.state_dict())
    ids = token_ids([12, 7], 12)
    # Same weights, different attention: the biases are really applied ...
    assert not torch.allclose(with_alibi.encode_text(ids), without.encode_text(ids), atol=1e-4)
    # ... and match attention computed by hand: softmax(q·k/√d - m_h·(i - j)) over j ≤ i.
    block = with_alibi.transformer.resblocks[0]
    x = torch.randn(2, 6, 128)
    q, k, v = torch.nn.functional.linear(x, block.attn.in_proj_weight, block.attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.view(2, 6, 4, 32).transpose(1, 2) for t in (q, k, v))
    weights = (q @ k.transpose(-1, -2) / 32**0.5 + alibi_bias(4, 6)).softmax(-1)
    expected = block.attn.out_proj((weights @ v).transpose(1, 2).reshape(2, 6, 128))
    torch.testing.assert_close(block.attn(x, True, with_alibi.transformer.alibi[:, :6, :6]), expected)
    with pytest.raises(ValueError, match="text_alibi must be 0 or 1"):
        preset_config("tiny", text_alibi=2)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"vision_heads": 5}, "vision_width 128 must be a multiple of vision_heads 5"),
        ({"transformer_heads": 0}, "transformer_heads must be >= 1"),
        ({"vision_patch_size": 0}, "vision_patch_size must be >= 1"),
        ({"vision_patch_size": 128}, "vision_patch_size 128 must be <= image_resolution 64"),
        ({"embed_dim": 0}, "embed_dim must be >= 1"),
        ({"vision_layers": -1}, "vision_layers must be >= 0"),
        ({"calibrated_tokens": -2}, "calibrated_tokens must be >= 0"),
        ({"context_length": 1}, "context_length must be >= 2"),
        ({"vocab_size": 1000}, "vocab_size must be >= 49408"),
    ],
)
def test_bad_architecture_fields_name_the_field(override, message):
    """``--model FIELD=N`` values that cannot make a working model: a ValueError naming the field when the
    config is made (the trainer reports it as a bad --model override), not a ZeroDivisionError when the
    model is built, an IndexError at the first EOT id, or a tower that silently has no layer."""
    with pytest.raises(ValueError, match=message):
        preset_config("tiny", **override)


def test_bad_inputs_are_reported():
    model = small_model()
    with pytest.raises(ValueError, match="must be 64x64"):
        model.encode_image(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="248"):
        model.encode_text(torch.ones(1, 300, dtype=torch.long))
    with pytest.raises(ValueError, match="sub_mask"):
        model.features(torch.randn(1, 3, 64, 64), token_ids([5], 5), sub_ids=token_ids([5], 5)[None])


def _features_batch():
    images = torch.randn(2, 3, 64, 64)
    sub_ids = torch.stack([token_ids([4, 6], 9)] * 2)
    return dict(images=images, long_ids=token_ids([7, 12], 12), short_ids=token_ids([5, 3], 5), sub_ids=sub_ids)


@pytest.mark.parametrize("packed_text", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda b: {"long_ids": b["long_ids"][0]}, "long_ids must be an integer"),
        (lambda b: {"short_ids": b["short_ids"][0]}, "short_ids must be an integer"),
        (lambda b: {"short_ids": b["short_ids"].float()}, "short_ids must be an integer"),
        (lambda b: {"sub_ids": b["sub_ids"].float()}, "sub_ids must be an integer"),
        (lambda b: {"sub_mask": torch.ones(2, 2, dtype=torch.long)}, "sub_mask"),
        (lambda b: {"sub_mask": torch.ones(2, 2, dtype=torch.uint8)}, "sub_mask"),
        (lambda b: {"images": (b["images"] * 64 + 128).clamp(0, 255).to(torch.uint8)}, "floating-point"),
    ],
    ids=["1d-long", "1d-short", "float-short", "float-sub", "int-sub-mask", "uint8-sub-mask", "uint8-images"],
)
def test_bad_feature_inputs_name_the_argument(bad, message, packed_text):
    """Wrong ranks and dtypes of ``features``' arguments: a ValueError naming the argument, not an error
    about an internal name (``groups[2]``), an IndexError, or uint8 pixels computed as floats 0..255."""
    model = small_model()
    batch = _features_batch()
    inputs = {**batch, "sub_mask": torch.ones(2, 2, dtype=torch.bool)}
    with pytest.raises(ValueError, match=message):
        model.features(**{**inputs, **bad(batch)}, packed_text=packed_text)


def _openai_state(model: CLIP, context: int = 77) -> dict:
    """model's weights as an OpenAI CLIP file would hold them: 77 positions, metadata keys, no LC."""
    state = {k: v.clone() for k, v in model.state_dict().items() if "calibration" not in k}
    state["positional_embedding"] = state["positional_embedding"][:context].clone()
    state["input_resolution"] = torch.tensor(64)
    state["context_length"] = torch.tensor(context)
    state["vocab_size"] = torch.tensor(49408)
    return state


def test_loading_openai_checkpoint_stretches_and_freezes_positions(tmp_path):
    source = small_model(seed=1)
    state = _openai_state(source)
    path = tmp_path / "openai.pt"
    torch.save(state, path)
    model = small_model(seed=2)
    report = load_clip_weights(model, str(path))
    assert report["stretched_77_to"] == 248
    torch.testing.assert_close(model.visual.proj, source.visual.proj)
    torch.testing.assert_close(model.positional_embedding, stretch_positional_embedding(state["positional_embedding"]))
    # Frozen rows get no gradient; the others do.
    model.encode_text(token_ids([100], 100)).sum().backward()
    grad = model.positional_embedding.grad
    assert (grad[:20] == 0).all() and (grad[20:100].abs().sum(-1) > 0).all()


def test_loading_longclip_checkpoint_uses_its_trained_positions(tmp_path):
    """Long-CLIP's checkpoints hold the stretched table (frozen) in ``positional_embedding`` and the trained
    one in ``positional_embedding_res``; its text tower adds rows 0..19 of the first and 20.. of the second.
    Ignoring the second loaded the un-fine-tuned positions for every token past the 20th."""
    source = small_model(seed=1)
    state = {k: v.clone() for k, v in source.state_dict().items() if "calibration" not in k}
    frozen, trained = state["positional_embedding"], torch.randn_like(state["positional_embedding"])
    state["positional_embedding_res"] = trained
    path = tmp_path / "longclip.pt"
    torch.save(state, path)
    model = small_model(seed=2)
    report = load_clip_weights(model, str(path))
    assert report["ignored_keys"] == [] and report["stretched_77_to"] is None
    ids = token_ids([100, 30], 100)
    # Long-CLIP's encode_text: x + positional_embedding * mask1 + positional_embedding_res * mask2
    mask1 = (torch.arange(248) < 20).float()[:, None]
    source.positional_embedding.data = frozen * mask1 + trained * (1 - mask1)
    torch.testing.assert_close(model.encode_text(ids), source.encode_text(ids))
    state["positional_embedding_res"] = trained[:77]
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="positional_embedding_res"):
        load_clip_weights(model, str(path))


def _pickled(model: CLIP) -> CLIP:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _assigned(model: CLIP) -> CLIP:
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    return model


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("transform", [copy.deepcopy, _pickled, _assigned], ids=["deepcopy", "pickle", "assign"])
def test_frozen_positions_stay_frozen_in_a_copy_of_the_model(transform, packed):
    """A model whose leading positions are frozen keeps them frozen through what replaces its parameter
    objects (a deep copy, a pickle round trip, ``load_state_dict(assign=True)``), as ``frozen_positions``
    says; a gradient hook on the parameter was lost in each, or made the model unpicklable."""
    model = small_model()
    model.freeze_leading_positions(20)
    model = transform(model)
    assert model.frozen_positions == 20
    ids = token_ids([100, 30], 100)
    if packed:
        model.encode_packed_text([ids])[0][0].sum().backward()
    else:
        model.encode_text(ids).sum().backward()
    grad = model.positional_embedding.grad
    assert (grad[:20] == 0).all() and (grad[20:100].abs().sum(-1) > 0).all()


def test_loading_torchscript_archive_and_wrapped_dicts(tmp_path):
    # OpenAI ships TorchScript archives of a 77-context CLIP: trace one of ours the same way.
    source = small_model(seed=3, context_length=77).eval()
    traced = torch.jit.trace(source, (torch.randn(1, 3, 64, 64), token_ids([7], 7)), check_trace=False)
    path = tmp_path / "scripted.pt"
    torch.jit.save(traced, str(path))
    model = small_model(seed=4)
    report = load_clip_weights(model, str(path))
    assert report["stretched_77_to"] == 248
    torch.testing.assert_close(model.visual.proj, source.visual.proj)
    torch.testing.assert_close(
        model.positional_embedding, stretch_positional_embedding(source.positional_embedding.detach())
    )
    # open_clip / DDP style: wrapped in {"state_dict": ...} with "module." prefixes.
    state = _openai_state(small_model(seed=5))
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, wrapped)
    load_clip_weights(model, str(wrapped))
    torch.testing.assert_close(model.text_projection, state["text_projection"])


def test_checkpoint_of_another_preset_fails_clearly(tmp_path):
    other = small_model(transformer_width=64, transformer_heads=2, embed_dim=64)
    path = tmp_path / "other.pt"
    torch.save(_openai_state(other), path)
    with pytest.raises(CheckpointError, match="does not fit") as info:
        load_clip_weights(small_model(), str(path))
    assert "text 1 layers of width 64" in str(info.value) and "--preset" in str(info.value)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_clip_weights(small_model(), str(garbage))
    torch.save({"weights": torch.zeros(3)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not an OpenAI-layout CLIP"):
        load_clip_weights(small_model(), str(tmp_path / "plain.pt"))
    with pytest.raises(CheckpointError, match="not found"):
        load_clip_weights(small_model(), str(tmp_path / "missing.pt"))
