"""MulCLIP inside other CLIP trainers: the Hugging Face / open_clip adapters and the ClipLoss-style loss.

The HF tests build a tiny randomly initialised ``transformers.CLIPModel`` from a config (no download).
The open_clip tests run where open_clip imports; it needs torchvision, which a CPU-only environment
must not install (it resolves a CUDA build), so there they are skipped with that reason; the packed text
pass of the open_clip adapter also runs on a stand-in with open_clip's text-tower layout, everywhere.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mulclip_fast.integrations import MulCLIPClipLoss, as_clip_loss_inputs, calibrate, hf, token_calibrations
from mulclip_fast.integrations import open_clip as oc
from mulclip_fast.losses import DEFAULT_WEIGHTS, MulCLIPFeatures, MulCLIPLoss
from mulclip_fast.model import LocalTokenCalibration

transformers = pytest.importorskip("transformers", reason="transformers is in the dev extra; install '.[dev]'")

SOT, EOT, PAD = 98, 99, 0
VOCAB = 100


def long_clip_rule(old: torch.Tensor) -> torch.Tensor:
    """docs/method.md's stretching rule, position by position (independent of ``stretch_positional_embedding``)."""
    new = torch.empty(248, old.shape[1], dtype=torch.float64)
    old = old.double()
    for p in range(20):
        new[p] = old[p]
    for i in range(56):
        for r in range(4):
            new[20 + 4 * i + r] = (1 - r / 4) * old[20 + i] + (r / 4) * old[21 + i]
    step = (old[76] - old[75]) / 4
    for r in range(4):
        new[244 + r] = old[76] + r * step
    return new


def caption_ids(lengths: list[int], context: int, generator: torch.Generator) -> torch.Tensor:
    """``[B, context]`` ids: SOT, ``n - 1`` words, EOT at position ``n``, padding after."""
    ids = torch.full((len(lengths), context), PAD, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, 0] = SOT
        ids[row, 1:n] = torch.randint(1, SOT, (n - 1,), generator=generator)
        ids[row, n] = EOT
    return ids


def tiny_hf_clip(seed: int = 0, eos_token_id: int = EOT):
    config = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=SOT,
            eos_token_id=eos_token_id,
            pad_token_id=PAD,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    return transformers.CLIPModel(config).eval()


@pytest.fixture(scope="module")
def hf_batch():
    generator = torch.Generator().manual_seed(1)
    batch = 4
    long_ids = caption_ids([120, 7, 201, 60], 248, generator)  # two beyond 77 positions
    short_ids = caption_ids([5, 9, 4, 12], 77, generator)
    sub_ids = torch.stack([caption_ids([6, 4, 9], 77, generator) for _ in range(batch)])
    sub_mask = torch.tensor([[True, True, True], [True, False, False], [True, True, False], [True, True, True]])
    pixels = torch.randn(batch, 3, 32, 32, generator=generator)
    return dict(pixels=pixels, long_ids=long_ids, short_ids=short_ids, sub_ids=sub_ids, sub_mask=sub_mask)


pytestmark = pytest.mark.usefixtures("one_thread")


# -- imports -----------------------------------------------------------------------------------------


def test_adapters_import_and_run_without_open_clip_or_transformers():
    """``sys.modules[name] = None`` makes any import of that name fail, as if it were not installed."""
    script = textwrap.dedent(
        """
        import sys
        sys.modules["open_clip"] = None
        sys.modules["transformers"] = None
        sys.modules["torchvision"] = None
        import torch
        from mulclip_fast.integrations import MulCLIPClipLoss, hf, open_clip
        g = torch.Generator().manual_seed(0)
        v, t = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
        tokens = torch.randn(3, 5, 8, generator=g)
        loss = MulCLIPClipLoss()(v, t, torch.tensor(10.0), image_tokens=tokens, text_tokens=tokens)
        assert torch.isfinite(loss), loss
        assert "transformers" not in [m for m, mod in sys.modules.items() if mod is not None]
        print("ok")
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# -- Hugging Face: positions -------------------------------------------------------------------------


def test_hf_stretch_follows_long_clip_rule_and_freezes_kept_positions(hf_batch):
    model = tiny_hf_clip()
    old = model.text_model.embeddings.position_embedding.weight.detach().clone()
    hf.stretch_text_positions(model)
    embeddings = model.text_model.embeddings
    table = embeddings.position_embedding.weight
    assert table.shape == (248, old.shape[1])
    torch.testing.assert_close(table.detach().double(), long_clip_rule(old), rtol=1e-6, atol=1e-7)
    assert torch.equal(embeddings.position_ids, torch.arange(248)[None])
    assert model.config.text_config.max_position_embeddings == 248
    assert model.text_model.config.max_position_embeddings == 248

    # A 201-token caption now runs through the model's own API, and only the stretched rows learn.
    model.get_text_features(input_ids=hf_batch["long_ids"]).pooler_output.sum().backward()
    assert table.grad[:20].abs().max() == 0
    assert table.grad[20:202].abs().sum(dim=1).gt(0).all()
    # A second call (e.g. on a checkpoint that is already long) keeps the table.
    hf.stretch_text_positions(model)
    assert model.text_model.embeddings.position_embedding.weight is table


def test_hf_stretch_can_train_kept_positions_and_round_trips_save_pretrained(tmp_path, hf_batch):
    model = hf.stretch_text_positions(tiny_hf_clip(), train_kept_positions=True)
    model.get_text_features(input_ids=hf_batch["long_ids"]).pooler_output.sum().backward()
    assert model.text_model.embeddings.position_embedding.weight.grad[:20].abs().sum(dim=1).gt(0).all()

    model.save_pretrained(tmp_path)
    reloaded = transformers.CLIPModel.from_pretrained(tmp_path).eval()
    assert torch.equal(
        reloaded.text_model.embeddings.position_embedding.weight, model.text_model.embeddings.position_embedding.weight
    )
    ids = hf_batch["long_ids"]
    torch.testing.assert_close(
        reloaded.get_text_features(input_ids=ids).pooler_output, model.get_text_features(input_ids=ids).pooler_output
    )


def test_hf_text_longer_than_the_table_is_a_clear_error(hf_batch):
    with pytest.raises(ValueError, match="stretch_text_positions"):
        hf.encode_text_tokens(tiny_hf_clip(), hf_batch["long_ids"])


# -- Hugging Face: features --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "eos_token_id", [EOT, 2], ids=["first-eos", "legacy-argmax"]
)  # OpenAI's own HF checkpoints still carry eos_token_id = 2: pooled at the largest id
def test_hf_features_are_the_models_own_embeddings_with_a_words_only_mask(hf_batch, eos_token_id):
    model = hf.stretch_text_positions(tiny_hf_clip(eos_token_id=eos_token_id))
    with torch.no_grad():
        image = hf.encode_image_tokens(model, hf_batch["pixels"])
        text = hf.encode_text_tokens(model, hf_batch["long_ids"])
        untrimmed = hf.encode_text_tokens(model, hf_batch["long_ids"], trim=False)
        expected_cls = model.get_image_features(pixel_values=hf_batch["pixels"]).pooler_output
        expected_eot = model.get_text_features(input_ids=hf_batch["long_ids"]).pooler_output
    assert image.cls.shape == (4, 16) and image.tokens.shape == (4, 16, 16)  # (32 / 8)² patches, width 16
    torch.testing.assert_close(image.cls, expected_cls, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(text.eot, expected_eot, rtol=1e-5, atol=1e-6)

    lengths = torch.tensor([120, 7, 201, 60])  # EOT positions
    assert text.tokens.shape == (4, 202, 16)  # trimmed after the longest caption's EOT
    positions = torch.arange(202)
    assert torch.equal(text.mask, (positions >= 1) & (positions < lengths[:, None]))
    # The EOT row of the token tensor is the pooled embedding: same LayerNorm, same projection.
    torch.testing.assert_close(text.tokens[torch.arange(4), lengths], text.eot)
    # Trimming is exact for the causal tower.
    torch.testing.assert_close(untrimmed.tokens[:, :202], text.tokens, rtol=1e-5, atol=1e-6)
    assert not untrimmed.mask[:, 202:].any()


def test_hf_mulclip_features_encode_only_the_real_subcaptions(hf_batch):
    model = hf.stretch_text_positions(tiny_hf_clip())
    with torch.no_grad():
        features = hf.mulclip_features(
            model,
            hf_batch["pixels"],
            hf_batch["long_ids"],
            short_ids=hf_batch["short_ids"],
            sub_ids=hf_batch["sub_ids"],
            sub_mask=hf_batch["sub_mask"],
        )
        one_sub = model.get_text_features(input_ids=hf_batch["sub_ids"][2, 1:2]).pooler_output[0]
        short = model.get_text_features(input_ids=hf_batch["short_ids"]).pooler_output
    assert features.sub_eot.shape == (4, 3, 16)
    torch.testing.assert_close(features.sub_eot[2, 1], one_sub, rtol=1e-5, atol=1e-6)
    assert torch.equal(features.sub_eot[~hf_batch["sub_mask"]], torch.zeros(3, 16))
    torch.testing.assert_close(features.short_eot, short, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "make_bad, message",
    [
        (lambda b: dict(input_ids=b["long_ids"].float()), "input_ids must hold integer token ids"),
        (lambda b: dict(input_ids=b["long_ids"][:, :5]), "no EOT token"),
        (lambda b: dict(input_ids=b["long_ids"], sub_mask=b["sub_mask"]), "sub_mask was given without sub_ids"),
        (lambda b: dict(input_ids=b["long_ids"], sub_ids=b["sub_ids"][:2]), "sub_ids must have the batch size 4"),
        (lambda b: dict(input_ids=b["long_ids"][:3]), "same batch size"),
        (
            lambda b: dict(input_ids=b["long_ids"], short_ids=b["short_ids"][:3]),
            "pixel_values and short_ids must have the same batch size, got 4 and 3",
        ),
        # the shape of input_ids as passed (248 positions), not of the captions trimmed to their longest (202)
        (
            lambda b: dict(input_ids=b["long_ids"], attention_mask=torch.ones(4, 77, dtype=torch.long)),
            r"attention_mask must be a tensor of shape \(4, 248\) \(that of input_ids\), got torch.Size\(\[4, 77\]\)",
        ),
    ],
)
@pytest.mark.parametrize("packed_text", [True, False], ids=["packed", "padded"])
def test_hf_bad_input_names_the_argument(hf_batch, make_bad, message, packed_text):
    model = hf.stretch_text_positions(tiny_hf_clip())
    with pytest.raises(ValueError, match=message):
        hf.mulclip_features(model, hf_batch["pixels"], packed_text=packed_text, **make_bad(hf_batch))


def test_stretching_a_copy_again_puts_its_frozen_positions_back():
    """The freeze is a gradient hook, which a deep copy does not carry (docs/integrations.md): stretching
    the copy again keeps its 248-row table and freezes the first 20 rows again."""
    import copy
    import io

    model = hf.stretch_text_positions(tiny_hf_clip())
    torch.save(model, io.BytesIO())  # the freeze's bookkeeping does not travel with the model: it pickles
    twin = copy.deepcopy(model)
    table = twin.text_model.embeddings.position_embedding.weight
    table.sum().backward()
    assert not bool((table.grad[:20] == 0).all())  # the copy lost the freeze
    hf.stretch_text_positions(twin)
    assert twin.text_model.embeddings.position_embedding.weight is table  # the stretched table is kept
    table.grad = None
    (table * torch.randn_like(table)).sum().backward()
    assert bool((table.grad[:20] == 0).all()) and bool((table.grad[20:] != 0).any())
    # stretching again replaces the freeze rather than stacking one more, and can drop it
    hf.stretch_text_positions(twin, train_kept_positions=True)
    table.grad = None
    table.sum().backward()
    assert bool((table.grad[:20] != 0).all())


@pytest.mark.parametrize("adapter", ["hf", "open_clip"])
def test_stretching_a_frozen_table_and_freezing_its_positions_once_unfrozen(adapter):
    """A tower frozen for evaluation or an adapter-only fine-tune: its table stretches (it has no gradient
    to zero, and a tensor without grad cannot take a hook), and stretching again once unfrozen freezes."""
    module, model = (hf, tiny_hf_clip()) if adapter == "hf" else (oc, OpenClipLayoutCLIP())
    model.requires_grad_(False)
    module.stretch_text_positions(model)
    if adapter == "hf":
        table = model.text_model.embeddings.position_embedding.weight
    else:
        table = model.positional_embedding
    assert table.shape[0] == 248 and not table.requires_grad
    table.requires_grad_(True)
    module.stretch_text_positions(model)
    (table * torch.randn_like(table)).sum().backward()
    assert bool((table.grad[:20] == 0).all()) and bool((table.grad[20:] != 0).all())


def test_hf_adapter_rejects_a_model_that_is_not_a_clip_model(hf_batch):
    with pytest.raises(ValueError, match="CLIPModel"):
        hf.stretch_text_positions(torch.nn.Linear(2, 2))
    # Same four top-level attributes as CLIPModel, but a BERT text tower pooled at the first token
    width = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = transformers.ChineseCLIPConfig(
        text_config=dict(vocab_size=VOCAB, **width), vision_config=dict(image_size=32, patch_size=8, **width)
    )
    model = transformers.ChineseCLIPModel(config)
    ids = hf_batch["short_ids"]
    for call in (
        lambda: hf.stretch_text_positions(model),
        lambda: hf.encode_text_tokens(model, ids),
        lambda: hf.mulclip_features(model, hf_batch["pixels"], ids),
    ):
        with pytest.raises(ValueError, match="lacks text_model.embeddings.position_embedding.*ChineseCLIP"):
            call()


# -- Hugging Face: the packed text pass against the padded one ---------------------------------------


def text_features_and_grads(model, batch, packed_text: bool, sub_mask=None) -> tuple[MulCLIPFeatures, dict]:
    """Features of the batch and the gradients of a loss that reads every text output the loss terms read."""
    model.zero_grad()
    features = hf.mulclip_features(
        model,
        batch["pixels"],
        batch["long_ids"],
        short_ids=batch["short_ids"],
        sub_ids=batch["sub_ids"],
        sub_mask=batch["sub_mask"] if sub_mask is None else sub_mask,
        packed_text=packed_text,
    )
    g = torch.Generator().manual_seed(7)
    words = features.text_tokens * features.text_token_mask[..., None]  # past EOT the paths differ by design
    loss = sum(
        (t * torch.randn(t.shape, generator=g)).sum()
        for t in (features.text_eot, words, features.short_eot, features.sub_eot)
    )
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.text_model.named_parameters() if p.grad is not None}
    grads["text_projection"] = model.text_projection.weight.grad.clone()
    return features, grads


def assert_grads_close(actual: dict, expected: dict) -> None:
    """Each gradient within 1e-5 of its own largest entry, floored at 1e-3 of the largest of all: the key
    biases' gradients are zero in exact arithmetic (softmax ignores a shift shared by every key), so
    theirs are rounding noise of the other terms (~1e-6 here, measured on both paths)."""
    floor = 1e-3 * max(float(g.abs().max()) for g in expected.values())
    for name, grad in expected.items():
        err = float((actual[name] - grad).abs().max()) / max(float(grad.abs().max()), floor)
        assert err < 1e-5, (name, err)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "grad-checkpointing"])
def test_hf_packed_text_equals_the_padded_path_values_and_gradients(hf_batch, checkpointing):
    """One packed pass over captions (up to 202 tokens), summaries and the real subcaptions, against each
    group padded: EOT embeddings, word tokens and every text-tower gradient to fp32 rounding."""
    model = hf.stretch_text_positions(tiny_hf_clip()).train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpoints = hf._packed_tower(model, "auto").checkpoints  # the packed pass honours the setting
    assert [c is not None for c in checkpoints] == [checkpointing] * 2
    packed, packed_grads = text_features_and_grads(model, hf_batch, packed_text=True)
    padded, padded_grads = text_features_and_grads(model, hf_batch, packed_text=False)
    for name in ("text_eot", "short_eot", "sub_eot"):
        torch.testing.assert_close(getattr(packed, name), getattr(padded, name), rtol=1e-5, atol=1e-5, msg=name)
    assert torch.equal(packed.text_token_mask, padded.text_token_mask)
    assert packed.text_tokens.shape == padded.text_tokens.shape == (4, 202, 16)
    mask = packed.text_token_mask
    torch.testing.assert_close(packed.text_tokens[mask], padded.text_tokens[mask], rtol=1e-5, atol=1e-5)
    eot = torch.tensor([120, 7, 201, 60])
    past_eot = torch.arange(202) > eot[:, None]
    assert not packed.text_tokens[past_eot].any()  # the packed path computes no padding
    assert packed_grads.keys() == padded_grads.keys() and len(packed_grads) > 10
    assert_grads_close(packed_grads, padded_grads)
    assert padded_grads["embeddings.position_embedding.weight"][20:202].abs().sum(dim=1).gt(0).all()


def test_hf_packed_text_checkpoints_the_layers_the_model_checkpoints(hf_batch):
    """transformers 5 can checkpoint every n-th layer only (and offload what it saves, with its own
    checkpoint function): the packed pass recomputes in backward exactly the layers the model would."""
    model = hf.stretch_text_positions(tiny_hf_clip()).train()
    if "every_n_layers" not in inspect.signature(getattr(model, "activation_checkpointing_enable", len)).parameters:
        pytest.skip("this transformers checkpoints every layer or none")
    model.activation_checkpointing_enable(every_n_layers=2)  # of the 2 text layers, the first only
    calls = [0, 0]
    for i, layer in enumerate(model.text_model.encoder.layers):
        # a pre-hook of the layer's first module: recomputation may stop before the layer's end
        layer.layer_norm1.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    features = hf.mulclip_features(model, hf_batch["pixels"], hf_batch["long_ids"])
    assert calls == [1, 1]
    features.text_eot.sum().backward()
    assert calls == [2, 1]  # the first layer's forward again in backward, the second's kept


def test_hf_packed_text_without_real_subcaptions_gives_zero_slots(hf_batch):
    model = hf.stretch_text_positions(tiny_hf_clip())
    none = torch.zeros_like(hf_batch["sub_mask"])
    with torch.no_grad():
        packed = hf.mulclip_features(
            model, hf_batch["pixels"], hf_batch["long_ids"], sub_ids=hf_batch["sub_ids"], sub_mask=none
        )
        expected = model.get_text_features(input_ids=hf_batch["long_ids"]).pooler_output
    assert torch.equal(packed.sub_eot, torch.zeros(4, 3, 16))
    torch.testing.assert_close(packed.text_eot, expected, rtol=1e-5, atol=1e-5)


def test_hf_packed_text_takes_a_right_padded_attention_mask(hf_batch):
    model = hf.stretch_text_positions(tiny_hf_clip())
    ids = hf_batch["long_ids"]
    right = (torch.arange(248) <= torch.tensor([120, 7, 201, 60])[:, None]).long()
    with torch.no_grad():
        packed = hf.mulclip_features(model, hf_batch["pixels"], ids, attention_mask=right)
        padded = hf.mulclip_features(model, hf_batch["pixels"], ids, attention_mask=right, packed_text=False)
    torch.testing.assert_close(packed.text_eot, padded.text_eot, rtol=1e-5, atol=1e-5)
    assert torch.equal(packed.text_token_mask, padded.text_token_mask)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(packed_text="yes"), "packed_text must be True or False"),
        (dict(text_attention="sdpa"), "text_attention must be one of"),
        (dict(attention_mask=torch.ones(4, 248, dtype=torch.long).index_fill(1, torch.tensor([3]), 0)), "right pad"),
        (dict(attention_mask=torch.ones(4, 7)), "attention_mask must be a tensor of shape"),
    ],
)
def test_hf_packed_text_bad_input_names_the_argument(hf_batch, kwargs, message):
    model = hf.stretch_text_positions(tiny_hf_clip())
    with pytest.raises(ValueError, match=message):
        hf.mulclip_features(model, hf_batch["pixels"], hf_batch["long_ids"], **kwargs)


def test_hf_packed_text_longer_than_the_table_is_a_clear_error(hf_batch):
    model = tiny_hf_clip()  # 77 positions: not stretched
    with pytest.raises(ValueError, match="input_ids has a text of 202 positions.*stretch_text_positions"):
        hf.mulclip_features(model, hf_batch["pixels"], hf_batch["long_ids"])


# -- the loss: same values and gradients as the reference -----------------------------------------


def features_with_grad(model, batch, calibrations=None) -> MulCLIPFeatures:
    features = hf.mulclip_features(
        model,
        batch["pixels"],
        batch["long_ids"],
        short_ids=batch["short_ids"],
        sub_ids=batch["sub_ids"],
        sub_mask=batch["sub_mask"],
    )
    return features if calibrations is None else calibrate(features, *calibrations)


def skip_without_ops(backend: str, settings: dict) -> None:
    """The fused backends need the ops the settings use: all-pairs SAP and FineLIP need the all-pairs ops."""
    if backend == "reference":
        return
    from mulclip_fast import ops

    needed = {"wpr_loss", "topk_patch_aggregate"}
    if settings.get("sap_pairing") == "all":
        needed.add("pairwise_topk_aggregate_cosines")
    if settings.get("objective") == "finelip":
        needed.add("pairwise_maxsim")
    missing = sorted(name for name in needed if not hasattr(ops, name))
    if missing:
        pytest.skip(f"mulclip_fast.ops does not export {', '.join(missing)} yet")


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize(
    "settings",
    [
        dict(objective="mulclip"),
        dict(objective="mulclip", sap_pairing="all", weights={"wpr": 0.5, "sap": 2.0}),
        dict(objective="mulclip", wpr_form="cosine", tau_attn=0.2),
        dict(objective="finelip"),
        dict(objective="finelip", finelip_hardest_negative=True),
    ],
    ids=["mulclip-matched", "mulclip-all-pairs", "mulclip-wpr-cosine", "finelip", "finelip-hardest"],
)
def test_clip_loss_matches_reference_loss_and_gradients_on_hf_features(hf_batch, settings, backend):
    skip_without_ops(backend, settings)
    model = hf.stretch_text_positions(tiny_hf_clip())
    torch.manual_seed(3)
    calibrations = (LocalTokenCalibration(16, 5), LocalTokenCalibration(16, 5))
    params = [p for p in model.parameters() if p.requires_grad] + [p for c in calibrations for p in c.parameters()]
    features = features_with_grad(model, hf_batch, calibrations)
    logit_scale = model.logit_scale.exp()

    reference = MulCLIPLoss(**settings, backend="reference")(features, logit_scale, fine_grained_scale=0.7)
    ours = MulCLIPClipLoss(**settings, backend=backend)(
        **as_clip_loss_inputs(features), logit_scale=logit_scale, output_dict=True, fine_grained_scale=0.7
    )
    weights = {**DEFAULT_WEIGHTS, **settings.get("weights", {})}
    names = {"global_long": "contrastive_loss", "global_short": "short_contrastive_loss", "wpr": "wpr_loss"}
    names |= {"sap": "sap_loss", "finelip": "finelip_loss"}
    expected_terms = {names[t] for t in reference if t != "loss"}
    assert set(ours) == expected_terms
    for term, value in reference.items():
        if term == "loss":
            continue
        scale = weights[term] * (0.7 if term in ("wpr", "sap", "finelip") else 1.0)
        torch.testing.assert_close(ours[names[term]], scale * value, rtol=1e-5, atol=1e-6)
    total = sum(ours.values())
    torch.testing.assert_close(total, reference["loss"], rtol=1e-5, atol=1e-6)

    grads_ref = torch.autograd.grad(reference["loss"], params, retain_graph=True, allow_unused=True)
    grads_ours = torch.autograd.grad(total, params, allow_unused=True)
    compared = 0
    for g_ref, g_ours in zip(grads_ref, grads_ours, strict=True):
        if g_ref is None:
            assert g_ours is None or g_ours.abs().max() == 0
            continue
        # The fused path sums in another order; docs/kernels.md's fp32 tolerance (atol 1e-5, rtol 1e-4) applies
        # to it. The reference backend computes the same expressions, so its gradients agree more tightly.
        tolerance = dict(rtol=1e-4, atol=1e-6) if backend == "reference" else dict(rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(g_ours, g_ref, **tolerance)
        compared += 1
    assert compared > 20  # both towers, the projections, the calibrations and the logit scale


def test_clip_loss_without_token_features_is_open_clips_clip_loss():
    """The open_clip ClipLoss formula, written out: ½[CE(s·I Tᵀ + b) + CE(s·T Iᵀ + b)] on normalised features."""
    g = torch.Generator().manual_seed(0)
    image, text = (
        F.normalize(torch.randn(6, 8, generator=g), dim=-1),
        F.normalize(torch.randn(6, 8, generator=g), dim=-1),
    )
    scale, bias = torch.tensor(14.0), torch.tensor(-2.0)
    labels = torch.arange(6)
    for logit_bias in (None, bias):
        extra = 0.0 if logit_bias is None else logit_bias
        expected = 0.5 * (
            F.cross_entropy(scale * image @ text.T + extra, labels)
            + F.cross_entropy(scale * text @ image.T + extra, labels)
        )
        loss_fn = MulCLIPClipLoss(cache_labels=True)
        torch.testing.assert_close(loss_fn(image, text, scale, logit_bias), expected)
        assert loss_fn(image, text, scale, logit_bias, output_dict=True).keys() == {"contrastive_loss"}
        torch.testing.assert_close(loss_fn(image, text, scale, logit_bias), expected)  # cached labels


def test_clip_loss_takes_every_option_of_mulclip_loss_with_the_same_default():
    """The adapter forwards MulCLIPLoss's options one by one: an option added there must be added here."""
    loss_options = inspect.signature(MulCLIPLoss).parameters
    adapter_options = inspect.signature(MulCLIPClipLoss).parameters
    missing = sorted(set(loss_options) - set(adapter_options))
    assert not missing, f"MulCLIPClipLoss lacks MulCLIPLoss's options {missing}"
    # the backend defaults differ on purpose (docstring): the adapter exists to bring in the fused ops
    differing = {n for n in loss_options if n != "backend" and adapter_options[n].default != loss_options[n].default}
    assert not differing, differing
    built = MulCLIPClipLoss(wpr_form="cosine", tau_sap=0.3).loss
    assert (built.wpr_form, built.tau_sap) == ("cosine", 0.3)


def test_clip_loss_takes_open_clips_create_loss_arguments():
    """open_clip's ``create_loss`` builds its ``ClipLoss`` with these arguments: they must pass unchanged."""
    loss_fn = MulCLIPClipLoss(
        local_loss=False, gather_with_grad=False, cache_labels=True, rank=0, world_size=1, use_horovod=False
    )
    assert torch.isfinite(loss_fn(torch.randn(3, 8), torch.randn(3, 8), torch.tensor(10.0)))
    with pytest.raises(ValueError, match="use_horovod must be False.*torchrun"):
        MulCLIPClipLoss(use_horovod=True)


@pytest.mark.parametrize(
    "kwargs, call, message",
    [
        (dict(world_size=0), None, "world_size must be an int >= 1"),
        (dict(rank=2, world_size=2), None, r"rank must be an int in \[0, world_size=2\)"),
        (dict(objective="nope"), None, "objective must be one of"),
        (dict(world_size=2, rank=1), {}, "needs an initialised torch.distributed process group"),
        (dict(), dict(text_token_mask=torch.ones(3, 5, dtype=torch.bool)), "token mask was passed without its tokens"),
        (dict(), dict(sub_mask=torch.ones(3, 2, dtype=torch.bool)), "sub_mask was passed without sub_text_features"),
        (dict(), dict(image_tokens=torch.randn(2, 5, 8), text_tokens=torch.randn(3, 5, 8)), "image_tokens must have"),
        (dict(), dict(image_tokens=torch.randn(3, 5, 4), text_tokens=torch.randn(3, 5, 8)), "feature width"),
        (
            dict(),
            dict(image_tokens=torch.randn(3, 5, 8), text_tokens=torch.randn(3, 5, 8), text_token_mask=torch.ones(3, 5)),
            "text_token_mask must have dtype torch.bool",
        ),
        (dict(terms=("wpr",)), {}, "none of the enabled terms"),
    ],
)
def test_clip_loss_bad_input_names_the_argument(kwargs, call, message):
    with pytest.raises(ValueError, match=message):
        loss_fn = MulCLIPClipLoss(**kwargs)
        loss_fn(torch.randn(3, 8), torch.randn(3, 8), torch.tensor(10.0), **call)


def test_token_calibrations_start_with_more_distinct_tokens_than_the_default_init(hf_batch):
    """Default init: calibration logits nearly equal, calibrated tokens close to the mean token, so WPR
    starts near its symmetric point 2·ln N' (the example's word loss stayed at 2.197 = 2·ln 3 for 12 steps)."""
    model = hf.stretch_text_positions(tiny_hf_clip())
    with torch.no_grad():
        features = features_with_grad(model, hf_batch)
        results = {}
        for name, make in (
            ("default", lambda: (LocalTokenCalibration(16, 3), LocalTokenCalibration(16, 3))),
            ("token_calibrations", lambda: token_calibrations(16, 3)),
        ):
            torch.manual_seed(5)
            calibrated = calibrate(features, *make())
            tokens = F.normalize(calibrated.image_tokens, dim=-1)
            cosine = tokens @ tokens.transpose(1, 2)
            off_diagonal = ~torch.eye(3, dtype=torch.bool)
            results[name] = float(cosine[:, off_diagonal].mean())
    assert results["token_calibrations"] < results["default"] - 0.1, results


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_calibrate_leaves_a_caption_without_words_out_of_wpr(hf_batch, backend):
    """An empty caption (SOT, EOT) has no word to calibrate: its T' is zeros, and WPR must leave the sample
    out of its mean (docs/method.md, "Edge cases"), as ``CLIP.features`` does, not score it as a sample."""
    model = hf.stretch_text_positions(tiny_hf_clip())
    long_ids = caption_ids([1, 7, 9, 5], 77, torch.Generator().manual_seed(0))  # row 0: SOT, EOT
    with torch.no_grad():
        features = hf.mulclip_features(model, hf_batch["pixels"], long_ids)
        torch.manual_seed(2)
        calibrated = calibrate(features, *token_calibrations(16, 3))
    assert calibrated.text_token_mask is not None and not calibrated.text_token_mask[0].any()
    assert calibrated.text_token_mask[1:].all()
    wpr = MulCLIPLoss(terms=("wpr",), backend=backend)
    rest = MulCLIPFeatures(
        image_cls=calibrated.image_cls[1:],
        image_tokens=calibrated.image_tokens[1:],
        text_eot=calibrated.text_eot[1:],
        text_tokens=calibrated.text_tokens[1:],
    )
    logit_scale = torch.tensor(10.0)
    torch.testing.assert_close(wpr(calibrated, logit_scale)["wpr"], wpr(rest, logit_scale)["wpr"])


def test_a_few_steps_of_the_mulclip_loss_reduce_it_on_a_tiny_hf_clip(hf_batch):
    model = hf.stretch_text_positions(tiny_hf_clip()).train()
    torch.manual_seed(4)
    calibrations = token_calibrations(16, 3)
    params = list(model.parameters()) + [p for c in calibrations for p in c.parameters()]
    optimizer = torch.optim.Adam(params, lr=2e-3)
    loss_fn = MulCLIPClipLoss()
    losses = []
    for _ in range(6):
        features = features_with_grad(model, hf_batch, calibrations)
        loss = loss_fn(**as_clip_loss_inputs(features), logit_scale=model.logit_scale.exp())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


# -- distributed: two gloo processes against one process on the global batch -------------------------

DISTRIBUTED_WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch, torch.distributed as dist
    from mulclip_fast.integrations import MulCLIPClipLoss

    def global_batch(even_subcaptions):
        g = torch.Generator().manual_seed(0)
        B, d = 6, 8
        sub_mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1], [0, 1, 1], [1, 1, 1]], dtype=torch.bool)
        if even_subcaptions:
            sub_mask = torch.ones_like(sub_mask)
        text_mask = torch.rand(B, 7, generator=g) > 0.3
        text_mask[:, 0] = True
        return dict(
            image_features=torch.randn(B, d, generator=g), text_features=torch.randn(B, d, generator=g),
            image_tokens=torch.randn(B, 5, d, generator=g), text_tokens=torch.randn(B, 7, d, generator=g),
            text_token_mask=text_mask, short_text_features=torch.randn(B, d, generator=g),
            sub_text_features=torch.randn(B, 3, d, generator=g), sub_mask=sub_mask,
        )

    def local_slice(batch, rank, even_subcaptions):
        # Rank 0 holds 3 samples whose texts are trimmed to 5 tokens and subcaptions to 2 slots, rank 1 the
        # other 3 untrimmed: token sets of different lengths must be padded and masked by the gather.
        rows = slice(0, 3) if rank == 0 else slice(3, 6)
        out = {k: v[rows] for k, v in batch.items()}
        if rank == 0:
            out["text_tokens"], out["text_token_mask"] = out["text_tokens"][:, :5], out["text_token_mask"][:, :5]
            if not even_subcaptions:
                out["sub_text_features"], out["sub_mask"] = out["sub_text_features"][:, :2], out["sub_mask"][:, :2]
        return out

    def run(rank, world, settings):
        even = settings.pop("even_subcaptions", False)
        batch = global_batch(even)
        batch["text_token_mask"][:3, 5:] = False   # what rank 0 trimmed away
        if not even:
            batch["sub_mask"][:3, 2:] = False
        local = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in local_slice(batch, rank, even).items()}
        settings.setdefault("gather_with_grad", True)
        loss_fn = MulCLIPClipLoss(**settings, rank=rank, world_size=world)
        loss = loss_fn(logit_scale=torch.tensor(10.0), **local)
        loss.backward()
        # Features that no enabled term uses (e.g. subcaptions under FineLIP) get no gradient.
        grads = {k: v.grad for k, v in local.items() if v.grad is not None}
        return loss.detach(), grads, batch

    def main():
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        # A file rendezvous: no port to pick, so no race with other tests for a free one.
        dist.init_process_group("gloo", init_method="file://" + os.environ["STORE_FILE"], rank=rank, world_size=world)
        report = {}
        for name, settings in json.loads(sys.argv[1]).items():
            loss, grads, batch = run(rank, world, settings)
            losses = [torch.zeros(()) for _ in range(world)]
            dist.all_gather(losses, loss)
            if rank == 0:
                full = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in batch.items()}
                distributed_only = ("local_loss", "gather_with_grad")
                single = MulCLIPClipLoss(**{k: v for k, v in settings.items() if k not in distributed_only})
                expected = single(logit_scale=torch.tensor(10.0), **full)
                expected.backward()
                unused = {k for k, v in full.items() if v.is_floating_point() and v.grad is None}
                assert unused == {k for k, v in full.items() if v.is_floating_point()} - grads.keys(), unused
                mean_loss = torch.stack(losses).mean()
                # DDP averages gradients over ranks: (rank's feature gradient) / world is the global gradient.
                grad_err = max(
                    float((grads[k] / world - full[k].grad[:3, : grads[k].shape[1]]).abs().max()) for k in grads
                )
                if not settings["gather_with_grad"]:
                    grad_err = None
                report[name] = dict(loss_err=abs(float(mean_loss - expected.detach())), grad_err=grad_err,
                                    loss=float(expected.detach()))
            dist.barrier()
        if rank == 0:
            print(json.dumps(report))
        dist.destroy_process_group()

    main()
    """
)


@pytest.mark.slow
def test_two_gloo_ranks_average_to_the_single_process_loss_and_gradients(tmp_path):
    """Rank-mean of the losses and world-averaged gradients equal one process on the global batch.

    Covers the all-gather with gradient (``gather_with_grad``), ``local_loss`` label offsets, and
    token sets / subcaption slots of different lengths per rank, padded and masked by the gather. With
    ``local_loss`` each rank returns the world size times its exact share of the global loss, so the
    ranks agree with one process whether or not they hold the same number of valid subcaptions per slot.
    """
    settings = {
        "mulclip-matched": dict(objective="mulclip"),
        "mulclip-matched-local": dict(objective="mulclip", local_loss=True, even_subcaptions=True),
        "mulclip-matched-local-uneven-subcaptions": dict(objective="mulclip", local_loss=True),
        "mulclip-all-pairs": dict(objective="mulclip", sap_pairing="all"),
        "mulclip-all-pairs-local": dict(objective="mulclip", sap_pairing="all", local_loss=True, even_subcaptions=True),
        "finelip": dict(objective="finelip"),
        "finelip-local": dict(objective="finelip", local_loss=True),
        # open_clip's default gather: only the local slice keeps its gradient, so only the value must agree.
        "mulclip-gather-without-grad": dict(objective="mulclip", sap_pairing="all", gather_with_grad=False),
    }
    worker = tmp_path / "worker.py"
    worker.write_text(DISTRIBUTED_WORKER)
    store = tmp_path / "rendezvous"
    world = 2
    ranks = [
        subprocess.Popen(
            [sys.executable, str(worker), json.dumps(settings)],
            env={**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "WORLD_SIZE": str(world)}
            | {"STORE_FILE": str(store)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(world)
    ]
    outputs = []
    try:
        for process in ranks:
            outputs.append(process.communicate(timeout=180))
    finally:
        for process in ranks:
            if process.poll() is None:
                process.kill()
    for process, (_, stderr) in zip(ranks, outputs, strict=True):
        assert process.returncode == 0, stderr[-3000:]
    stdout = outputs[0][0]
    report = json.loads(stdout.strip().splitlines()[-1])
    assert report.keys() == settings.keys()
    for name, numbers in report.items():
        assert numbers["loss_err"] < 1e-5 * max(1.0, abs(numbers["loss"])), (name, numbers)
        if numbers["grad_err"] is not None:
            assert numbers["grad_err"] < 1e-5, (name, numbers)


# -- open_clip -------------------------------------------------------------------------------------


def import_open_clip():
    try:
        import open_clip
    except ImportError as error:  # open_clip imports torchvision at module import
        pytest.skip(
            f"open_clip does not import here ({error}); it needs torchvision, which a CPU-only environment must "
            "not install (pip resolves a CUDA build). The adapter itself imports without it (tested above)."
        )
    return open_clip


@pytest.fixture(scope="module")
def open_clip_model():
    open_clip = import_open_clip()
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=16,
        vision_cfg=CLIPVisionCfg(layers=2, width=32, head_width=16, patch_size=8, image_size=32),
        text_cfg=CLIPTextCfg(context_length=77, vocab_size=VOCAB, width=32, heads=2, layers=2),
    )
    return open_clip, model.eval()


def test_open_clip_stretch_features_and_loss(open_clip_model, hf_batch):
    open_clip, model = open_clip_model
    old = model.positional_embedding.detach().clone()
    oc.stretch_text_positions(model)
    assert model.context_length == 248 and model.attn_mask.shape == (248, 248)
    torch.testing.assert_close(model.positional_embedding.detach().double(), long_clip_rule(old), rtol=1e-6, atol=1e-7)
    # open_clip pools at the largest id (argmax): our EOT id is the largest of this vocabulary.
    ids, pixels = hf_batch["long_ids"], hf_batch["pixels"]
    features = oc.mulclip_features(model, pixels, ids, sub_text=hf_batch["sub_ids"], sub_mask=hf_batch["sub_mask"])
    torch.testing.assert_close(features.image_cls, model.encode_image(pixels), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(features.text_eot, model.encode_text(ids), rtol=1e-5, atol=1e-5)
    assert features.image_tokens.shape == (4, 16, 16) and features.text_tokens.shape == (4, 202, 16)
    assert torch.equal(features.text_token_mask.sum(dim=1), torch.tensor([119, 6, 200, 59]))

    image_features, text_features, logit_scale = model(pixels, ids)
    expected = open_clip.ClipLoss()(image_features, text_features, logit_scale)
    torch.testing.assert_close(MulCLIPClipLoss()(image_features, text_features, logit_scale), expected)

    model.train()
    features = oc.mulclip_features(model, pixels, ids)
    loss = MulCLIPClipLoss()(**as_clip_loss_inputs(features), logit_scale=model.logit_scale.exp())
    loss.backward()
    assert model.positional_embedding.grad[:20].abs().max() == 0
    assert model.positional_embedding.grad[20:202].abs().sum(dim=1).gt(0).all()


def test_open_clip_stretched_model_reloads_as_documented(tmp_path, hf_batch):
    """docs/integrations.md: stretch a fresh model first, then open_clip.load_checkpoint."""
    open_clip = import_open_clip()
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    def build():
        return open_clip.CLIP(
            embed_dim=16,
            vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=32),
            text_cfg=CLIPTextCfg(context_length=77, vocab_size=VOCAB, width=32, heads=2, layers=1),
        ).eval()

    torch.manual_seed(0)
    model = oc.stretch_text_positions(build())
    torch.save(model.state_dict(), tmp_path / "long.pt")
    reloaded = oc.stretch_text_positions(build())
    open_clip.load_checkpoint(reloaded, str(tmp_path / "long.pt"))
    ids = hf_batch["long_ids"]
    torch.testing.assert_close(reloaded.encode_text(ids), model.encode_text(ids))


def test_clip_loss_accepts_every_argument_of_open_clips_clip_loss():
    open_clip = import_open_clip()
    for theirs, ours in ((open_clip.ClipLoss, MulCLIPClipLoss), (open_clip.ClipLoss.forward, MulCLIPClipLoss.forward)):
        expected = inspect.signature(theirs).parameters
        accepted = inspect.signature(ours).parameters
        assert not set(expected) - set(accepted), sorted(set(expected) - set(accepted))
        assert all(accepted[name].default == p.default for name, p in expected.items() if p.default is not p.empty)
    # the positional order of forward: (image_features, text_features, logit_scale, logit_bias, output_dict)
    assert list(inspect.signature(MulCLIPClipLoss.forward).parameters)[:6] == list(
        inspect.signature(open_clip.ClipLoss.forward).parameters
    )


def test_open_clip_packed_text_equals_the_padded_path(open_clip_model, hf_batch):
    """open_clip's own blocks composed on the pack: same EOT embeddings, word tokens and gradients as each
    group padded (the stand-in test below runs the same code where open_clip cannot be installed)."""
    _, model = open_clip_model
    oc.stretch_text_positions(model)
    assert_packed_equals_padded(open_clip_packed_and_padded(model.train(), hf_batch))


class OpenClipLayoutBlock(torch.nn.Module):
    """A stand-in with open_clip's ``ResidualAttentionBlock`` layout (batch-first ``nn.MultiheadAttention``,
    pre-LN, LayerScale slots), so that the open_clip adapter's packed blocks run where open_clip cannot."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = torch.nn.LayerNorm(width)
        self.attn = torch.nn.MultiheadAttention(width, heads, batch_first=True)
        self.ls_1 = torch.nn.Identity()
        self.ln_2 = torch.nn.LayerNorm(width)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(width, 2 * width), torch.nn.GELU(), torch.nn.Linear(2 * width, width)
        )
        # a LayerScale-like gain, so that the packed block must apply ls_2 where the block does
        self.ls_2 = LayerScaleStandIn(width)

    def forward(self, x, attn_mask=None):
        h = self.ln_1(x)
        x = x + self.ls_1(self.attn(h, h, h, need_weights=False, attn_mask=attn_mask)[0])
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class LayerScaleStandIn(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.gamma = torch.nn.Parameter(torch.linspace(0.5, 1.5, width))

    def forward(self, x):
        return x * self.gamma


class OpenClipLayoutTransformer(torch.nn.Module):
    def __init__(self, width: int, heads: int, layers: int):
        super().__init__()
        self.resblocks = torch.nn.ModuleList(OpenClipLayoutBlock(width, heads) for _ in range(layers))
        self.grad_checkpointing = False

    def get_cast_dtype(self):
        return self.resblocks[0].mlp[0].weight.dtype

    def forward(self, x, attn_mask=None):
        for block in self.resblocks:
            x = block(x, attn_mask=attn_mask)
        return x


class OpenClipLayoutVisual(torch.nn.Module):
    """Just enough of open_clip's ``VisionTransformer`` for ``encode_image_tokens``: class token and patches."""

    def __init__(self, width: int, embed_dim: int):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, width, kernel_size=8, stride=8)
        self.class_embedding = torch.nn.Parameter(torch.randn(width) * 0.1)
        self.transformer = torch.nn.Identity()
        self.ln_post = torch.nn.LayerNorm(width)
        self.proj = torch.nn.Parameter(torch.randn(width, embed_dim) * width**-0.5)

    def _embeds(self, image):
        x = self.conv1(image).flatten(2).transpose(1, 2)
        return torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1)


class OpenClipLayoutCLIP(torch.nn.Module):
    def __init__(self, width: int = 32, heads: int = 2, layers: int = 2, embed_dim: int = 16):
        super().__init__()
        self.visual = OpenClipLayoutVisual(width, embed_dim)
        self.token_embedding = torch.nn.Embedding(VOCAB, width)
        self.positional_embedding = torch.nn.Parameter(torch.randn(77, width) * 0.01)
        self.transformer = OpenClipLayoutTransformer(width, heads, layers)
        self.ln_final = torch.nn.LayerNorm(width)
        self.text_projection = torch.nn.Parameter(torch.randn(width, embed_dim) * width**-0.5)
        self.register_buffer("attn_mask", torch.full((77, 77), float("-inf")).triu_(1), persistent=False)
        self.context_length = 77


def open_clip_packed_and_padded(model, batch):
    outputs = []
    for packed_text in (True, False):
        model.zero_grad()
        features = oc.mulclip_features(
            model,
            batch["pixels"],
            batch["long_ids"],
            short_text=batch["short_ids"],
            sub_text=batch["sub_ids"],
            sub_mask=batch["sub_mask"],
            packed_text=packed_text,
        )
        g = torch.Generator().manual_seed(7)
        words = features.text_tokens * features.text_token_mask[..., None]  # past EOT the paths differ by design
        loss = sum(
            (t * torch.randn(t.shape, generator=g)).sum()
            for t in (features.text_eot, words, features.short_eot, features.sub_eot)
        )
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None and "visual" not in n}
        outputs.append((features, grads))
    return outputs


def assert_packed_equals_padded(outputs) -> None:
    (packed, packed_grads), (padded, padded_grads) = outputs
    for name in ("text_eot", "short_eot", "sub_eot"):
        torch.testing.assert_close(getattr(packed, name), getattr(padded, name), rtol=1e-5, atol=1e-5, msg=name)
    mask = packed.text_token_mask
    assert torch.equal(mask, padded.text_token_mask)
    torch.testing.assert_close(packed.text_tokens[mask], padded.text_tokens[mask], rtol=1e-5, atol=1e-5)
    assert packed_grads.keys() == padded_grads.keys() and len(packed_grads) > 10
    assert_grads_close(packed_grads, padded_grads)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "grad-checkpointing"])
def test_open_clip_layout_packed_text_equals_the_padded_path(hf_batch, checkpointing):
    """The open_clip adapter's packed blocks (in_proj split into q, k, v, ls_1 and ls_2) on a stand-in with
    open_clip's text-tower layout: same EOT embeddings, word tokens and gradients as each group padded."""
    torch.manual_seed(3)
    model = oc.stretch_text_positions(OpenClipLayoutCLIP()).train()
    model.transformer.grad_checkpointing = checkpointing
    assert [c is not None for c in oc._packed_tower(model, "auto").checkpoints] == [checkpointing] * 2
    assert_packed_equals_padded(open_clip_packed_and_padded(model, hf_batch))


@pytest.mark.parametrize(
    "make_bad, message",
    [
        (lambda b: dict(text=b["long_ids"].float()), "text must hold integer token ids"),
        (lambda b: dict(text=b["long_ids"][:3]), "image and text must have the same batch size, got 4 and 3"),
        (lambda b: dict(text=b["long_ids"], sub_mask=b["sub_mask"]), "sub_mask was given without sub_text"),
        (lambda b: dict(text=b["long_ids"], sub_text=b["sub_ids"][:2]), "sub_text must have the batch size 4"),
        (lambda b: dict(text=b["long_ids"], short_text=b["short_ids"][0]), r"short_text must be .* \[B, L\]"),
        (
            lambda b: dict(text=b["long_ids"], short_text=b["short_ids"][:3]),
            "image and short_text must have the same batch size, got 4 and 3",
        ),
    ],
)
@pytest.mark.parametrize("packed_text", [True, False], ids=["packed", "padded"])
def test_open_clip_bad_input_names_the_argument(hf_batch, make_bad, message, packed_text):
    model = oc.stretch_text_positions(OpenClipLayoutCLIP())
    with pytest.raises(ValueError, match=message):
        oc.mulclip_features(model, hf_batch["pixels"], packed_text=packed_text, **make_bad(hf_batch))


@pytest.mark.parametrize("adapter", ["hf", "open_clip"])
def test_a_distributed_data_parallel_wrapper_is_a_clear_error(hf_batch, adapter):
    """DDP keeps the model as .module: the error says to pass that, not that an attribute is missing."""
    module, model = (hf, tiny_hf_clip()) if adapter == "hf" else (oc, OpenClipLayoutCLIP())
    wrapper = torch.nn.Module()
    wrapper.module = model
    for call in (
        lambda: module.mulclip_features(wrapper, hf_batch["pixels"], hf_batch["short_ids"]),
        lambda: module.encode_image_tokens(wrapper, hf_batch["pixels"]),
    ):
        with pytest.raises(ValueError, match="DistributedDataParallel-wrapped model as model.module"):
            call()


def test_open_clip_packed_text_refuses_blocks_it_cannot_compose(hf_batch):
    model = oc.stretch_text_positions(OpenClipLayoutCLIP())
    with pytest.raises(ValueError, match="text_attention must be one of"):
        oc.mulclip_features(model, hf_batch["pixels"], hf_batch["long_ids"], text_attention="sdpa")
    model.transformer.resblocks[1].attn = torch.nn.Identity()  # e.g. CustomResidualAttentionBlock's Attention
    with pytest.raises(ValueError, match="text block 1 .*packed_text=False"):
        oc.mulclip_features(model, hf_batch["pixels"], hf_batch["long_ids"])
    model.train()
    model.transformer.resblocks[1].attn = torch.nn.MultiheadAttention(32, 2, dropout=0.1, batch_first=True)
    with pytest.raises(ValueError, match="attention dropout 0.1 in training"):
        oc.mulclip_features(model, hf_batch["pixels"], hf_batch["long_ids"])


# -- the documented snippets run as written ---------------------------------------------------------


def docstring_snippet(module) -> str:
    """The indented code block of a module docstring (the lines indented by four spaces)."""
    lines = [line[4:] for line in module.__doc__.splitlines() if line.startswith("    ")]
    assert lines, module.__name__
    return "\n".join(lines)


def docs_python_blocks(page: str) -> list[str]:
    text = (Path(__file__).resolve().parent.parent / "docs" / page).read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("adapter", ["hf", "open_clip"])
def test_adapter_docstring_snippets_run_as_written(hf_batch, adapter):
    torch.manual_seed(0)
    module, model = (hf, tiny_hf_clip()) if adapter == "hf" else (oc, OpenClipLayoutCLIP())
    calibrations = token_calibrations(16, 3)
    namespace = dict(
        model=model,
        pixel_values=hf_batch["pixels"],
        images=hf_batch["pixels"],
        long_ids=hf_batch["long_ids"],
        short_ids=hf_batch["short_ids"],
        sub_ids=hf_batch["sub_ids"],
        m=hf_batch["sub_mask"],
        MulCLIPLoss=MulCLIPLoss,
        calibrate=calibrate,
        v_calibration=calibrations[0],
        t_calibration=calibrations[1],
    )
    exec(docstring_snippet(module), namespace)
    assert namespace["feats"].sub_eot.shape == (4, 3, 16)


def test_integrations_page_hugging_face_snippet_runs_as_written(hf_batch):
    torch.manual_seed(0)
    model = tiny_hf_clip()
    namespace = dict(
        model=model,
        pixel_values=hf_batch["pixels"],
        long_ids=hf_batch["long_ids"],
        short_ids=hf_batch["short_ids"],
        sub_ids=hf_batch["sub_ids"],
        sub_mask=hf_batch["sub_mask"],
    )
    exec(docs_python_blocks("integrations.md")[0], namespace)
    assert namespace["losses"].keys() == {"contrastive_loss", "short_contrastive_loss", "wpr_loss", "sap_loss"}
    assert model.text_model.embeddings.position_embedding.weight.grad[20:202].abs().sum(dim=1).gt(0).all()
