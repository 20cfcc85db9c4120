"""Our CLIP towers and image preprocessing against independent implementations of OpenAI's CLIP.

* Towers: a Hugging Face ``transformers.CLIPModel`` with random weights (no download) is converted to
  OpenAI's state-dict layout (transformers' ``convert_clip_original_pytorch_to_hf`` mapping, reversed),
  written to a file and loaded through our own routes: ``eval.load_model_for_eval`` (a plain checkpoint,
  evaluated at its own 77 positions) and ``load_clip_weights`` (``--init openai:PATH``: stretched to 248
  positions). Image and text embeddings, all projected tokens and the logits must agree to fp32 rounding.
  Where open_clip imports, the same against open_clip's ``build_model_from_openai_state_dict`` (OpenAI's
  model class, which takes the OpenAI-layout dict directly).
* Stretching: positions 0..20 of the stretched table are the original rows (row 20 is where the
  interpolation starts), so every token at a position <= 20 — the whole of a caption of <= 21 tokens,
  SOT and EOT included — is computed as by the original model; beyond, the model is OpenAI's CLIP with
  Long-CLIP's 248-row table (checked against a 248-position HF model holding that table).
* Preprocessing: ``load_image`` against OpenAI's ``clip.load`` transform (torchvision ``Resize(n,
  BICUBIC)``, ``CenterCrop(n)``, ``convert("RGB")``, ``ToTensor``, ``Normalize``), pixel for pixel.

The tower and pixel comparisons are paired with tests that the same comparison fails for a model that is
not OpenAI's (GELU for QuickGELU, no causal mask, pooling at the last position, no ln_pre, ...) or for other
resampling, so the tolerance is known to be tight enough to catch such a slip. One slip it cannot see:
LayerNorm's eps (1e-6 for OpenAI's 1e-5 moves these outputs by ~2e-5 of their scale, about the tolerance:
with activations of variance of order 1 or more, as in a trained CLIP, eps hardly changes anything).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mulclip_fast.data.images import CLIP_MEAN, CLIP_STD, load_image
from mulclip_fast.model import CLIP, load_clip_weights, preset_config

pytestmark = pytest.mark.usefixtures("one_thread")

SOT, EOT = 49406, 49407  # OpenAI's BPE: EOT is the largest id; padding after it is 0

# Miniatures of the OpenAI presets: every architectural choice of the preset (QuickGELU, pre-LN, class token,
# ln_pre/ln_post, projections, causal text, EOT pooling, 49,408-token vocabulary), small widths and depths.
# Heads are width // 64, as OpenAI's build_model (and open_clip's) derive them.
MINIATURES = {
    # vit-b-16: 16-pixel patches, a 4x4 grid
    "vit-b-16": dict(
        embed_dim=64,
        image_resolution=64,
        vision_layers=2,
        vision_width=128,
        vision_heads=2,
        vision_patch_size=16,
        transformer_width=128,
        transformer_heads=2,
        transformer_layers=2,
    ),
    # vit-l-14: 14-pixel patches, an odd 3x3 grid
    "vit-l-14": dict(
        embed_dim=64,
        image_resolution=42,
        vision_layers=2,
        vision_width=128,
        vision_heads=2,
        vision_patch_size=14,
        transformer_width=64,
        transformer_heads=1,
        transformer_layers=3,
    ),
}
# fp32 rounding: the two implementations order their sums differently (SDPA against explicit softmax, fused
# against separate q/k/v projections). Observed differences are ~1e-6 of values of order 1; every
# architectural slip tried (see the sensitivity tests) moves them by 1e-2 or more.
TOL = dict(rtol=2e-5, atol=2e-5)


# ------------------------------------------------------------------------------------------------ helpers
def caption_ids(lengths: list[int], context: int, seed: int = 0) -> torch.Tensor:
    """``[B, context]`` ids as OpenAI's tokenizer gives them: SOT, words, EOT, then zeros.
    ``n`` is the caption's length in tokens, SOT and EOT included (EOT at position ``n - 1``)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), context, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, 0] = SOT
        ids[row, 1 : n - 1] = torch.randint(1, SOT, (n - 2,), generator=generator)
        ids[row, n - 1] = EOT
    return ids


def images_for(resolution: int, batch: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, resolution, resolution, generator=torch.Generator().manual_seed(seed))


def hf_clip(overrides: dict, context: int = 77, seed: int = 0, hidden_act: str = "quick_gelu"):
    """A randomly initialised ``transformers.CLIPModel`` of the miniature's architecture.

    Every parameter is redrawn (LayerNorm gains and biases too, which HF initialises to 1 and 0: a
    missing or misplaced LayerNorm would otherwise go unseen), at scales where every nonlinearity matters.
    """
    transformers = pytest.importorskip("transformers", reason="transformers is in the dev extra; install '.[dev]'")
    c = overrides
    config = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=49408,
            hidden_size=c["transformer_width"],
            intermediate_size=4 * c["transformer_width"],
            num_hidden_layers=c["transformer_layers"],
            num_attention_heads=c["transformer_heads"],
            max_position_embeddings=context,
            hidden_act=hidden_act,
            bos_token_id=SOT,
            eos_token_id=EOT,
            pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=c["vision_width"],
            intermediate_size=4 * c["vision_width"],
            num_hidden_layers=c["vision_layers"],
            num_attention_heads=c["vision_heads"],
            image_size=c["image_resolution"],
            patch_size=c["vision_patch_size"],
            hidden_act=hidden_act,
        ),
        projection_dim=c["embed_dim"],
    )
    config._attn_implementation = "eager"  # explicit softmax attention: independent of our SDPA calls
    model = transformers.CLIPModel(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "logit_scale":
                p.fill_(3.0)  # not CLIP's init value ln(1/0.07), so a logit_scale left unloaded shows
            elif "norm" in name or "layrnorm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.3 * torch.randn(p.shape, generator=generator))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=generator))
            elif p.dim() == 2 and "embedding" not in name:
                p.copy_(torch.randn(p.shape, generator=generator) / p.shape[1] ** 0.5)
            else:  # token, position and class embeddings, the patch convolution
                p.copy_(torch.randn(p.shape, generator=generator) * (0.5 if "embedding" in name else 0.1))
    return model


def openai_state_dict(hf) -> dict[str, torch.Tensor]:
    """The HF model's weights in OpenAI's ``clip/model.py`` layout (transformers' conversion, reversed)."""
    sd = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    out = {"logit_scale": sd["logit_scale"], "text_projection": sd["text_projection.weight"].T.contiguous()}
    out["visual.proj"] = sd["visual_projection.weight"].T.contiguous()
    for ours, prefix in (("", "text_model."), ("visual.", "vision_model.")):
        layers = {k.split(".")[3] for k in sd if k.startswith(prefix + "encoder.layers.")}
        for i in sorted(layers, key=int):
            hf_layer, layer = f"{prefix}encoder.layers.{i}.", f"{ours}transformer.resblocks.{i}."
            for kind in ("weight", "bias"):
                qkv = [sd[f"{hf_layer}self_attn.{p}_proj.{kind}"] for p in "qkv"]
                out[f"{layer}attn.in_proj_{kind}"] = torch.cat(qkv)
                for theirs, mine in (
                    ("self_attn.out_proj", "attn.out_proj"),
                    ("layer_norm1", "ln_1"),
                    ("layer_norm2", "ln_2"),
                    ("mlp.fc1", "mlp.c_fc"),
                    ("mlp.fc2", "mlp.c_proj"),
                ):
                    out[f"{layer}{mine}.{kind}"] = sd[f"{hf_layer}{theirs}.{kind}"]
    out["token_embedding.weight"] = sd["text_model.embeddings.token_embedding.weight"]
    out["positional_embedding"] = sd["text_model.embeddings.position_embedding.weight"]
    out["visual.conv1.weight"] = sd["vision_model.embeddings.patch_embedding.weight"]
    out["visual.class_embedding"] = sd["vision_model.embeddings.class_embedding"]
    out["visual.positional_embedding"] = sd["vision_model.embeddings.position_embedding.weight"]
    for kind in ("weight", "bias"):
        out[f"ln_final.{kind}"] = sd[f"text_model.final_layer_norm.{kind}"]
        out[f"visual.ln_pre.{kind}"] = sd[f"vision_model.pre_layrnorm.{kind}"]
        out[f"visual.ln_post.{kind}"] = sd[f"vision_model.post_layernorm.{kind}"]
    return out


@torch.no_grad()
def hf_outputs(hf, pixels: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """HF's embeddings, every projected token (our ``v_loc`` / ``t_loc``) and its logits."""
    out = hf(input_ids=ids, pixel_values=pixels)
    vision, text = hf.vision_model(pixel_values=pixels), hf.text_model(input_ids=ids)
    tokens = hf.vision_model.post_layernorm(vision.last_hidden_state)
    return {
        "image": hf.visual_projection(vision.pooler_output),
        "patches": hf.visual_projection(tokens[:, 1:]),
        "text": hf.text_projection(text.pooler_output),
        "text_tokens": hf.text_projection(text.last_hidden_state),
        "logits": out.logits_per_image,
    }


@torch.no_grad()
def our_outputs(model: CLIP, pixels: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    image, patches = model.encode_image_tokens(pixels)
    eot, text_tokens, _ = model.encode_text_tokens(ids)
    logits = model.logit_scale.exp() * F.normalize(image, dim=-1) @ F.normalize(eot, dim=-1).T
    outputs = {
        "image": image,
        "patches": patches,
        "text": eot,
        "text_tokens": text_tokens,
        "logits": logits,
        "encode_text": model.encode_text(ids),
    }
    if model.transformer.causal:  # the packed path refuses a non-causal tower (a slip below)
        outputs["packed_text"] = model.encode_packed_text([ids])[0][0]
    return outputs


def assert_agrees(ours: dict, theirs: dict) -> None:
    for key, expected in theirs.items():
        torch.testing.assert_close(ours[key], expected, **TOL, msg=lambda m, key=key: f"{key}: {m}")
    for key in ("encode_text", "packed_text"):  # the other text routes give the same EOT embeddings
        if key in ours:
            torch.testing.assert_close(ours[key], theirs["text"], **TOL, msg=lambda m, key=key: f"{key}: {m}")


def largest_gap(ours: dict, theirs: dict) -> float:
    """The largest difference over every compared output, relative to the output's own scale."""
    return max(float((ours[k] - v).abs().max() / v.abs().max()) for k, v in theirs.items())


def eval_route(path: str, name: str) -> CLIP:
    """A plain checkpoint through ``python -m mulclip_fast.eval --checkpoint PATH --preset NAME --model ...``."""
    from mulclip_fast.eval import load_model_for_eval

    model, _ = load_model_for_eval(path, name, "cpu", dict(MINIATURES[name]))
    return model.eval()


@pytest.fixture(scope="module", params=sorted(MINIATURES))
def converted(request, tmp_path_factory):
    """(preset name, HF model, path of its OpenAI-layout checkpoint)."""
    name = request.param
    hf = hf_clip(MINIATURES[name])
    path = tmp_path_factory.mktemp("ckpt") / f"{name}.pt"
    torch.save(openai_state_dict(hf), path)
    return name, hf, str(path)


# Captions of several lengths padded to 77: the shortest possible, short, past 20 tokens, the full context.
LENGTHS = [2, 9, 21, 40, 77]


# ------------------------------------------------------------------------------ towers: Hugging Face CLIP
def test_plain_checkpoint_computes_what_hf_clip_computes(converted):
    name, hf, path = converted
    model = eval_route(path, name)
    assert model.config.context_length == 77
    pixels, ids = images_for(MINIATURES[name]["image_resolution"]), caption_ids(LENGTHS, 77)
    assert_agrees(our_outputs(model, pixels, ids), hf_outputs(hf, pixels, ids))


def test_ids_trimmed_to_the_longest_caption_give_the_same_embeddings(converted):
    """Padding after EOT changes nothing (causal mask, EOT pooling): trimmed or padded, HF's answer."""
    name, hf, path = converted
    model = eval_route(path, name)
    pixels, ids = images_for(MINIATURES[name]["image_resolution"]), caption_ids([3, 12, 25], 77)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(ids[:, :25]), hf_outputs(hf, pixels, ids)["text"], **TOL)


# Slips an implementation of CLIP could make; each must move the comparison far outside TOL.
def _gelu(model):
    for block in [*model.transformer.resblocks, *model.visual.transformer.resblocks]:
        block.mlp.gelu = torch.nn.GELU()


def _bidirectional_text(model):
    model.transformer.causal = False


def _last_position_pooling(model):
    def hidden(ids, original=model._text_hidden):
        x = original(ids)
        x[torch.arange(ids.shape[0]), ids.argmax(dim=-1)] = x[:, -1]
        return x

    model._text_hidden = hidden


def _no_ln_pre(model):
    model.visual.ln_pre = torch.nn.Identity()


def _no_class_position(model):
    with torch.no_grad():
        model.visual.positional_embedding[0] = 0


def _twice_the_heads(model):
    for block in model.transformer.resblocks:
        block.attn.heads *= 2  # another head split and attention scale 1/sqrt(head width)


SLIPS = {
    "GELU for QuickGELU": _gelu,
    "text attention not causal": _bidirectional_text,
    "text pooled at the last position": _last_position_pooling,
    "no ln_pre": _no_ln_pre,
    "class token without its position": _no_class_position,
    "text heads split in two": _twice_the_heads,
}


@pytest.mark.parametrize("slip", sorted(SLIPS))
def test_the_hf_comparison_fails_for_a_model_that_is_not_openais(converted, slip):
    name, hf, path = converted
    model = eval_route(path, name)
    pixels, ids = images_for(MINIATURES[name]["image_resolution"]), caption_ids(LENGTHS, 77)
    theirs = hf_outputs(hf, pixels, ids)
    assert largest_gap(our_outputs(model, pixels, ids), theirs) < 1e-4
    SLIPS[slip](model)
    gap = largest_gap(our_outputs(model, pixels, ids), theirs)
    assert gap > 1e-3, f"{slip}: the outputs moved by only {gap:.2e}"
    with pytest.raises(AssertionError):
        assert_agrees(our_outputs(model, pixels, ids), theirs)


def test_hf_with_plain_gelu_is_not_what_we_compute(converted):
    """The other direction: the reference itself built with GELU (open_clip's LAION configs) disagrees."""
    name, _, path = converted
    gelu = hf_clip(MINIATURES[name], hidden_act="gelu")  # same seed, same weights, other activation
    model = eval_route(path, name)
    pixels, ids = images_for(MINIATURES[name]["image_resolution"]), caption_ids(LENGTHS, 77)
    assert largest_gap(our_outputs(model, pixels, ids), hf_outputs(gelu, pixels, ids)) > 1e-3


# ----------------------------------------------------------------------- stretched to 248 (--init openai:)
def long_clip_table(old: torch.Tensor) -> torch.Tensor:
    """Long-CLIP's ``load_from_clip`` stretch, transcribed row by row (not ``stretch_positional_embedding``)."""
    new = torch.zeros(4 * 77 - 3 * 20, old.shape[1], dtype=old.dtype)
    new[:20] = old[:20]
    for i in range(77 - 1 - 20):
        for r in range(4):
            new[4 * i + r + 20] = (4 - r) * old[i + 20] / 4 + r * old[i + 1 + 20] / 4
    for r in range(4):
        new[4 * 77 - 3 * 20 - 4 + r] = old[76] + r * (old[76] - old[75]) / 4
    return new


def init_route(path: str, name: str) -> tuple[CLIP, dict]:
    """``python -m mulclip_fast.train --preset NAME --model ... --init openai:PATH``'s loading."""
    model = CLIP(preset_config(name, **MINIATURES[name]))
    report = load_clip_weights(model, path)
    return model.eval(), report


def test_stretched_model_equals_the_original_on_positions_up_to_20(converted):
    name, hf, path = converted
    model, report = init_route(path, name)
    assert report["stretched_77_to"] == 248 and model.config.context_length == 248
    pixels = images_for(MINIATURES[name]["image_resolution"])
    # Captions of <= 21 tokens (EOT at position <= 20): the original model's embeddings, padded to 77 or not.
    short = caption_ids([2, 5, 20, 21], 77)
    for ids in (short, short[:, :21]):
        assert_agrees(
            {k: v for k, v in our_outputs(model, pixels, ids).items() if k != "text_tokens"},
            {k: v for k, v in hf_outputs(hf, pixels, short).items() if k != "text_tokens"},
        )
    # Any caption: its tokens at positions 0..20 are the original model's; from 21 on they are not.
    ids = caption_ids([40, 77], 77)
    with torch.no_grad():
        tokens = model.encode_text_tokens(ids)[1]
    reference = hf_outputs(hf, pixels, ids)["text_tokens"]
    torch.testing.assert_close(tokens[:, :21], reference[:, :21], **TOL)
    assert ((tokens[:, 21:] - reference[:, 21:]).abs().amax(dim=-1) > 1e-3).all()


def test_stretched_model_is_openai_clip_with_long_clips_table(converted):
    """Beyond 21 tokens the stretched model is OpenAI's CLIP with Long-CLIP's 248-row table, at every length."""
    name, hf, path = converted
    model, _ = init_route(path, name)
    hf248 = hf_clip(MINIATURES[name], context=248)
    hf248.load_state_dict(
        hf.state_dict()
        | {
            "text_model.embeddings.position_embedding.weight": long_clip_table(
                hf.text_model.embeddings.position_embedding.weight.detach()
            ),
        }
    )
    pixels, ids = images_for(MINIATURES[name]["image_resolution"]), caption_ids([2, 21, 22, 77, 150, 248], 248)
    assert_agrees(our_outputs(model, pixels, ids), hf_outputs(hf248, pixels, ids))


def test_long_clip_checkpoint_is_its_text_towers_table(tmp_path):
    """Long-CLIP's checkpoints hold ``positional_embedding`` and ``positional_embedding_res`` [248, width];
    its text tower adds rows 0..19 of the first and rows 20.. of the second (``mask1``, ``mask2``)."""
    name = "vit-b-16"
    hf = hf_clip(MINIATURES[name], context=248)
    state = openai_state_dict(hf)
    table = state["positional_embedding"]
    frozen = torch.randn(table.shape, generator=torch.Generator().manual_seed(5))
    state["positional_embedding"] = torch.cat([table[:20], frozen[20:]])
    state["positional_embedding_res"] = torch.cat([frozen[:20], table[20:]])
    torch.save(state, tmp_path / "longclip.pt")
    model, report = init_route(str(tmp_path / "longclip.pt"), name)
    assert report["stretched_77_to"] is None
    pixels, ids = images_for(MINIATURES[name]["image_resolution"]), caption_ids([2, 19, 20, 21, 100, 248], 248)
    assert_agrees(our_outputs(model, pixels, ids), hf_outputs(hf, pixels, ids))


# --------------------------------------------------------------------------- towers: open_clip (OpenAI's)
def test_plain_checkpoint_computes_what_open_clips_openai_model_computes(converted, tmp_path):
    """open_clip's ``build_model_from_openai_state_dict`` is OpenAI's model class fed the OpenAI-layout dict.
    It stores the weights in fp16 (as OpenAI's checkpoints are), so the dict is rounded to fp16 first and
    both models then compute in fp32 from the same weights."""
    open_clip = pytest.importorskip("open_clip", reason="open_clip needs torchvision, absent in CPU-only setups")
    from open_clip.model import build_model_from_openai_state_dict

    name, _, path = converted
    state = {k: v.half().float() for k, v in torch.load(path, weights_only=True).items()}
    torch.save(state, tmp_path / "fp16.pt")
    reference = build_model_from_openai_state_dict(dict(state), quick_gelu=True, cast_dtype=None).float().eval()
    model = eval_route(str(tmp_path / "fp16.pt"), name)
    pixels, ids = images_for(MINIATURES[name]["image_resolution"]), caption_ids(LENGTHS, 77)
    with torch.no_grad():
        image, text = reference.encode_image(pixels), reference.encode_text(ids)
        image_n, text_n, scale = reference(pixels, ids)[:3]  # normalised features, exp(logit_scale)
    ours = our_outputs(model, pixels, ids)
    torch.testing.assert_close(ours["image"], image, **TOL)
    torch.testing.assert_close(ours["text"], text, **TOL)
    torch.testing.assert_close(ours["encode_text"], text, **TOL)
    torch.testing.assert_close(ours["logits"], scale * image_n @ text_n.T, **TOL)
    assert open_clip.__version__


# ----------------------------------------------------------------------------------------- preprocessing
def openai_transform_transcribed(img: Image.Image, n: int) -> torch.Tensor:
    """OpenAI's ``clip._transform(n)`` for a PIL image, transcribed: torchvision's ``Resize(n, BICUBIC)`` (short
    side to ``n``, long side ``int(n * long / short)``, PIL's ``resize``), ``CenterCrop(n)`` (offsets
    ``int(round((side - n) / 2))``), ``convert("RGB")``, ``ToTensor`` (/255 in fp32), ``Normalize``."""
    w, h = img.size
    size = (n, int(n * h / w)) if w <= h else (int(n * w / h), n)
    if size != (w, h):  # torchvision returns the image itself when it already has the size
        img = img.resize(size, Image.Resampling.BICUBIC)
    left, top = int(round((size[0] - n) / 2.0)), int(round((size[1] - n) / 2.0))
    img = img.crop((left, top, left + n, top + n)).convert("RGB")
    pixels = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float().div(255)
    return (pixels - CLIP_MEAN[:, None, None]) / CLIP_STD[:, None, None]


def openai_transform(img: Image.Image, n: int) -> torch.Tensor:
    """OpenAI's transform through torchvision itself where it imports, else the transcription above."""
    try:
        from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor
    except Exception:  # not installed, or a build whose import fails on this machine
        return openai_transform_transcribed(img, n)
    return Compose(
        [
            Resize(n, interpolation=InterpolationMode.BICUBIC),
            CenterCrop(n),
            lambda image: image.convert("RGB"),
            ToTensor(),
            Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
        ]
    )(img)


# (width, height, n): square, landscape, portrait, odd sizes, one side already n, smaller than n, thin.
SIZES = [
    (224, 224, 224),
    (300, 225, 224),
    (225, 301, 224),
    (641, 479, 224),
    (1000, 224, 224),
    (223, 224, 224),
    (227, 224, 224),
    (101, 57, 64),
    (17, 400, 64),
    (48, 48, 64),
    (35, 33, 32),
]
# The modes a decoded file comes in (16-bit greyscale is scaled to 8 bits on purpose: not compared here).
MODES = ["RGB", "L", "RGBA", "LA", "P", "1", "CMYK"]


def sample_image(mode: str, width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colour gradients with noise and a partly transparent region: resampling shows at every pixel."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    rgba = np.stack(
        [
            255 * x / max(width - 1, 1),
            255 * y / max(height - 1, 1),
            128 + 100 * np.sin(x / 3.0 + y / 5.0),
            np.where((x + y) % 7 < 3, 0, 255),
        ],
        axis=-1,
    ) + rng.normal(0, 20, (height, width, 4))
    img = Image.fromarray(np.clip(rgba, 0, 255).astype(np.uint8), "RGBA")
    if mode == "P":
        return img.convert("RGB").quantize(32)
    return img if mode == "RGBA" else img.convert(mode)


@pytest.mark.parametrize("mode", MODES)
def test_load_image_gives_openais_pixels(tmp_path, mode):
    for width, height, n in SIZES:
        path = tmp_path / f"{width}x{height}.{'tiff' if mode == 'CMYK' else 'png'}"  # lossless
        sample_image(mode, width, height).save(path)
        with Image.open(path) as img:
            expected = openai_transform(img, n)
        ours = load_image(str(path), n)
        assert ours.shape == (3, n, n)
        gap = (ours - expected).abs().max().item()
        assert torch.equal(ours, expected), f"{mode} {width}x{height} -> {n}: pixels differ by up to {gap:.3g}"


def test_the_transcription_is_torchvisions_transform(tmp_path):
    """Where torchvision imports, the transcription used without it is the same transform, bit for bit."""
    pytest.importorskip("torchvision.transforms", reason="torchvision is not installed here")
    for mode in MODES:
        for width, height, n in SIZES:
            img = sample_image(mode, width, height)
            assert torch.equal(openai_transform_transcribed(img, n), openai_transform(img, n)), (mode, width, height)


def test_the_preprocessing_comparison_fails_for_other_resizing():
    """The pixel comparison is sensitive: bilinear for bicubic, or a crop offset floored where torchvision
    rounds (227 -> 224: offset round(1.5) = 2), changes the pixels."""
    img = sample_image("RGB", 227, 300)  # resized to 224x296 (int(224 * 300 / 227)): crop offset round(72 / 2) = 36
    expected = openai_transform(img, 224)
    as_tensor = lambda image: openai_transform(image, 224)  # noqa: E731  (a 224x224 image: normalised only)
    bicubic = img.resize((224, 296), Image.Resampling.BICUBIC)
    assert torch.equal(as_tensor(bicubic.crop((0, 36, 224, 260))), expected)
    assert not torch.equal(as_tensor(bicubic.crop((0, 35, 224, 259))), expected)
    assert not torch.equal(
        as_tensor(img.resize((224, 296), Image.Resampling.BILINEAR).crop((0, 36, 224, 260))), expected
    )
    odd = sample_image("RGB", 227, 224)
    assert not torch.equal(as_tensor(odd.crop((1, 0, 225, 224))), openai_transform(odd, 224))
