"""Hugging Face ``transformers`` CLIP adapter: MulCLIP's features from a ``CLIPModel``, 248 text positions.

Works on any object laid out like ``transformers.CLIPModel`` (``vision_model``, ``text_model``,
``visual_projection``, ``text_projection``); transformers itself is never imported here.

    from mulclip_fast.integrations import hf
    hf.stretch_text_positions(model)                       # 77 -> 248 positions, Long-CLIP's rule
    feats = hf.mulclip_features(model, pixel_values, long_ids, short_ids=short_ids, sub_ids=sub_ids, sub_mask=m)
    out = MulCLIPLoss()(calibrate(feats, v_calibration, t_calibration), model.logit_scale.exp())

Feature extraction follows docs/method.md, "Features": every token goes through the same final LayerNorm and projection
as the pooled CLS / EOT embedding, so ``cls`` and ``eot`` equal ``get_image_features`` /
``get_text_features`` exactly (in transformers 5 the ``.pooler_output`` of what they return).

``mulclip_features`` runs every text of the batch through the text tower in one packed pass by default
(``packed_text=False``: each group padded); docs/integrations.md, "Packed text".
"""

from __future__ import annotations

import torch
from torch import nn

from ..features import MulCLIPFeatures
from ._common import (
    KEPT_POSITIONS,
    LONG_CONTEXT,
    NON_REENTRANT_CHECKPOINT,
    ImageTokenFeatures,
    PackedTextTower,
    TextTokenFeatures,
    assemble_features,
    check_caption_batch,
    check_packed_text,
    check_token_ids,
    encode_packed_caption_groups,
    encode_padded_caption_groups,
    first_eos_index,
    freeze_leading_rows,
    packed_attention,
    stretched_table,
    word_token_mask,
)

__all__ = [
    "encode_image_tokens",
    "encode_text_tokens",
    "eot_index",
    "mulclip_features",
    "stretch_text_positions",
]


# What the adapter reads. ChineseCLIPModel and AltCLIPModel have the four top-level attributes too, but
# their text towers are BERT / XLM-R encoders pooled at the first token, not CLIP's causal one at EOT.
_LAYOUT = (
    "vision_model",
    "text_model",
    "visual_projection",
    "text_projection",
    "vision_model.post_layernorm",
    "text_model.embeddings.position_embedding",
    "text_model.encoder.layers",
    "text_model.final_layer_norm",
    "text_model.eos_token_id",
)


def _has(model, path: str) -> bool:
    for name in path.split("."):
        if not hasattr(model, name):
            return False
        model = getattr(model, name)
    return True


def _check_model(model) -> None:
    missing = [path for path in _LAYOUT if not _has(model, path)]
    if missing:
        raise ValueError(
            f"model must be a transformers CLIPModel (or laid out like one); it lacks {', '.join(missing)}. "
            "Pass a DistributedDataParallel-wrapped model as model.module; ChineseCLIP and AltCLIP text towers "
            "(BERT / XLM-R, pooled at the first token) are not supported"
        )


def stretch_text_positions(
    model: nn.Module, target: int = LONG_CONTEXT, keep: int = KEPT_POSITIONS, train_kept_positions: bool = False
) -> nn.Module:
    """Stretch the text position table of a ``CLIPModel`` to ``target`` positions (Long-CLIP's rule), in place.

    Replaces ``text_model.embeddings.position_embedding`` by an ``nn.Embedding(target, width)`` holding
    the stretched table, the ``position_ids`` buffer by ``arange(target)`` and sets
    ``max_position_embeddings`` in the configs, so ``save_pretrained`` / ``from_pretrained`` round-trip
    the long model. Unless ``train_kept_positions``, the first ``keep`` rows get zero gradient (see
    ``freeze_leading_rows`` about weight decay). A table that already has ``target`` rows is kept as is.

    Returns:
        ``model``, for chaining.
    """
    _check_model(model)
    embeddings = model.text_model.embeddings
    old = embeddings.position_embedding.weight
    if old.shape[0] != target:
        table = stretched_table(old, target, keep)
        stretched = nn.Embedding(target, old.shape[1], device=old.device, dtype=old.dtype)
        with torch.no_grad():
            stretched.weight.copy_(table)
        stretched.weight.requires_grad_(old.requires_grad)
        embeddings.position_embedding = stretched
        # A registered buffer keeps its (non-persistent) registration when assigned a new tensor.
        embeddings.position_ids = torch.arange(target, device=old.device).expand((1, -1))
        for config in {id(c): c for c in (model.config.text_config, model.text_model.config)}.values():
            config.max_position_embeddings = target
    freeze_leading_rows(embeddings.position_embedding.weight, 0 if train_kept_positions else keep)
    return model


def eot_index(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """``[B]`` position of the EOT token, by the same rule as ``CLIPTextModel`` pools it.

    Configs from before transformers PR #24773 carry ``eos_token_id == 2`` and pool at the largest id
    (EOT is the largest id of CLIP's vocabulary); newer ones pool at the first ``eos_token_id``.
    """
    eos = model.text_model.eos_token_id
    if eos == 2:
        return input_ids.to(torch.int).argmax(dim=-1)
    return first_eos_index(input_ids, eos)


def encode_image_tokens(model: nn.Module, pixel_values: torch.Tensor) -> ImageTokenFeatures:
    """CLS and patch tokens, each through ``post_layernorm`` and ``visual_projection``.

    Args:
        pixel_values: ``[B, 3, H, W]`` at the model's image size.

    Returns:
        ``cls [B, d]`` (equal to ``get_image_features``) and ``tokens [B, P, d]`` (P = number of patches).
    """
    _check_model(model)
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
        raise ValueError(f"pixel_values must be a [B, 3, H, W] tensor, got {getattr(pixel_values, 'shape', None)!r}")
    vision = model.vision_model
    hidden = vision(pixel_values=pixel_values).last_hidden_state  # [B, 1+P, width], before post_layernorm
    projected = model.visual_projection(vision.post_layernorm(hidden))
    return ImageTokenFeatures(cls=projected[:, 0], tokens=projected[:, 1:])


def encode_text_tokens(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, trim: bool = True
) -> TextTokenFeatures:
    """EOT embedding and all token embeddings (final LayerNorm, then ``text_projection``), with the word mask.

    Args:
        input_ids: ``[B, L]`` token ids, SOT first and one EOT per row (as CLIP's tokenizer makes them).
        attention_mask: optional ``[B, L]`` (1 = real token), passed to the model.
        trim: cut the batch after its longest caption's EOT before encoding. The text tower is causal and
            pooled at EOT, so this is exact and saves the padded positions' compute (docs/method.md, "Model").

    Returns:
        ``eot [B, d]`` (equal to ``get_text_features``), ``tokens [B, L', d]`` and ``mask [B, L']`` with
        True at words only; ``L'`` is the trimmed length.
    """
    _check_model(model)
    check_token_ids("input_ids", input_ids)
    if attention_mask is not None:
        _check_attention_mask_shape(attention_mask, input_ids)
    eot = eot_index(model, input_ids)
    if trim:
        length = int(eot.max()) + 1
        input_ids = input_ids[:, :length]
        attention_mask = None if attention_mask is None else attention_mask[:, :length]
    max_positions = model.text_model.embeddings.position_embedding.weight.shape[0]
    if input_ids.shape[1] > max_positions:
        raise ValueError(
            f"input_ids has {input_ids.shape[1]} positions but the model has {max_positions}; "
            "call stretch_text_positions(model) first for long captions"
        )
    hidden = model.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # final LN'd
    tokens = model.text_projection(hidden)
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    mask = word_token_mask(eot.to(tokens.device), tokens.shape[1], attention_mask)
    return TextTokenFeatures(eot=tokens[rows, eot.to(tokens.device)], tokens=tokens, mask=mask)


def _packed_tower(model: nn.Module, backend: str) -> PackedTextTower:
    """``CLIPTextModel``'s own modules on a pack. Its ``CLIPEncoderLayer`` takes a padded ``[B, L, width]``
    batch and a dense mask (a block-diagonal ``[T, T]`` one is what packing avoids), so each layer is
    composed here from its submodules in its own order: pre-LN attention and MLP, each added to the residual."""
    text = model.text_model
    layers = text.encoder.layers
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        if abs(attn.scale - attn.head_dim**-0.5) > 1e-12 * attn.scale:
            raise ValueError(
                f"text layer {i} scales attention by {attn.scale}, not head_dim^-1/2; use packed_text=False"
            )
        if attn.training and attn.dropout > 0:
            raise ValueError(
                f"text layer {i} has attention dropout {attn.dropout} in training; the packed path has none "
                "(use packed_text=False)"
            )
    embeddings = text.embeddings

    def embed(token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return embeddings.token_embedding(token_ids) + embeddings.position_embedding(positions)

    def packed_layer(layer):
        def forward(x: torch.Tensor, sequences) -> torch.Tensor:
            attn = layer.self_attn
            h = layer.layer_norm1(x)
            x = x + attn.out_proj(
                packed_attention(attn.q_proj(h), attn.k_proj(h), attn.v_proj(h), attn.num_heads, sequences, backend)
            )
            return x + layer.mlp(layer.layer_norm2(x))

        return forward

    def checkpoint_of(layer):
        # The layer's own flag where it has one (transformers 5 may checkpoint every n-th layer only), else
        # the encoder's (older releases), run through the model's own checkpoint function: it carries the
        # kwargs (use_reentrant) and the offload of the saved activations the model was set up with.
        owner = layer if hasattr(layer, "gradient_checkpointing") else text.encoder
        if not (owner.training and getattr(owner, "gradient_checkpointing", False)):
            return None
        return getattr(owner, "_gradient_checkpointing_func", NON_REENTRANT_CHECKPOINT)

    return PackedTextTower(
        embed=embed,
        layers=[packed_layer(layer) for layer in layers],
        final_norm=text.final_layer_norm,
        project=model.text_projection,
        max_positions=embeddings.position_embedding.weight.shape[0],
        checkpoints=[checkpoint_of(layer) for layer in layers],
    )


def mulclip_features(
    model: nn.Module,
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    short_ids: torch.Tensor | None = None,
    sub_ids: torch.Tensor | None = None,
    sub_mask: torch.Tensor | None = None,
    packed_text: bool = True,
    text_attention: str = "auto",
) -> MulCLIPFeatures:
    """Everything ``MulCLIPLoss`` needs for one batch, from raw (uncalibrated) tokens.

    Args:
        pixel_values: ``[B, 3, H, W]``.
        input_ids: ``[B, L]`` long captions (up to 248 tokens after ``stretch_text_positions``).
        attention_mask: optional ``[B, L]`` for ``input_ids`` (right padding: 1 up to each EOT).
        short_ids: optional ``[B, L_s]`` summary captions (77-token context).
        sub_ids: optional ``[B, M, L_s]`` subcaptions; ``sub_mask [B, M]`` marks the real ones (None: all).
        packed_text: run every long caption, summary and real subcaption through the text tower in one
            packed pass, each text's real tokens only (docs/integrations.md, "Packed text"); False encodes
            each group padded, the reference the packed path is tested against. Equal to fp32 rounding,
            except the long captions' tokens past EOT: zeros when packed (the word mask excludes them).
        text_attention: the packed pass's attention backend, ``auto | flash | xformers | torch``
            (``mulclip_fast.model.attention``).

    Returns:
        ``MulCLIPFeatures`` with raw patch and word tokens; pass it through ``calibrate`` for MulCLIP's
        calibrated ``V'`` / ``T'``.
    """
    check_packed_text(packed_text, text_attention)
    image = encode_image_tokens(model, pixel_values)
    names = ("pixel_values", "input_ids", "short_ids", "sub_ids")
    sub_mask = check_caption_batch(names, image.cls.shape[0], input_ids, short_ids, sub_ids, sub_mask)
    captions = (input_ids, short_ids, sub_ids, sub_mask)
    if packed_text:
        if attention_mask is not None:
            _check_right_padded(attention_mask, input_ids, eot_index(model, input_ids))
        text, short_eot, sub_eot = encode_packed_caption_groups(
            _packed_tower(model, text_attention), lambda ids: eot_index(model, ids), names[1:], *captions
        )
    else:
        text, short_eot, sub_eot = encode_padded_caption_groups(
            lambda ids: encode_text_tokens(model, ids, attention_mask),
            lambda ids: encode_text_tokens(model, ids).eot,
            *captions,
        )
    return assemble_features(image, text, short_eot, sub_eot, sub_mask)


def _check_attention_mask_shape(attention_mask: torch.Tensor, input_ids: torch.Tensor) -> None:
    """Checked against ``input_ids`` as the caller passed them, before trimming shortens both."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask must be a tensor of shape {tuple(input_ids.shape)} (that of input_ids), "
            f"got {getattr(attention_mask, 'shape', None)!r}"
        )


def _check_right_padded(attention_mask: torch.Tensor, input_ids: torch.Tensor, eot: torch.Tensor) -> None:
    """The packed pass keeps each caption's positions 0 … EOT: ``attention_mask`` must mark them all real."""
    _check_attention_mask_shape(attention_mask, input_ids)
    upto_eot = torch.arange(input_ids.shape[1], device=input_ids.device) <= eot[:, None]
    if not bool(attention_mask.to(input_ids.device).bool()[upto_eot].all()):
        raise ValueError(
            "attention_mask marks padding at or before a caption's EOT (left padding?); the packed pass needs "
            "right padding: tokenise with padding_side='right', or pass packed_text=False"
        )
