"""open_clip adapter: MulCLIP's features from an ``open_clip.CLIP`` model, 248 text positions.

Supports ``open_clip.CLIP`` with its built-in causal text transformer (the OpenAI layout: ViT-B-16,
ViT-L-14, ... loaded from ``openai``, ``laion2b_*`` and other tags) and a ``VisionTransformer`` image
tower pooled at the class token. open_clip itself is never imported here: the functions read the
attributes of the model you built, so this module imports without open_clip (which needs torchvision).

    from mulclip_fast.integrations import open_clip as oc
    oc.stretch_text_positions(model)                      # 77 -> 248 positions, Long-CLIP's rule
    feats = oc.mulclip_features(model, images, long_ids, short_text=short_ids, sub_text=sub_ids, sub_mask=m)

``mulclip_features`` runs every text of the batch through the text tower in one packed pass by default
(``packed_text=False``: each group padded); docs/integrations.md, "Packed text".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


def _check_text_tower(model) -> None:
    missing = [
        a
        for a in ("token_embedding", "positional_embedding", "transformer", "ln_final", "attn_mask")
        if not hasattr(model, a)
    ]
    if missing:
        raise ValueError(
            "model must be an open_clip CLIP with the built-in text transformer (CustomTextCLIP towers such as "
            f"Hugging Face text encoders are not supported); it lacks {', '.join(missing)}. Pass a "
            "DistributedDataParallel-wrapped model as model.module"
        )
    if model.attn_mask is None:
        raise ValueError("the open_clip text tower is not causal (attn_mask is None): EOT pooling and trimming need it")
    pool = getattr(model, "text_pool_type", "argmax")
    if pool not in ("argmax", "eos"):
        raise ValueError(f"text_pool_type must be 'argmax' or 'eos' (pooled at EOT), got {pool!r}")


def _check_vision_tower(visual) -> None:
    needed = ("_embeds", "transformer", "ln_post", "proj")
    if any(not hasattr(visual, a) for a in needed):
        raise ValueError(
            "model.visual must be an open_clip VisionTransformer (open_clip >= 3.0); ModifiedResNet and timm "
            "towers have no projected patch tokens"
        )
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
        raise ValueError("model.visual must pool at the class token (pool_type='tok', no attentional pooler)")
    if getattr(visual, "final_ln_after_pool", False):
        raise ValueError("model.visual applies ln_post after pooling only; patch tokens would skip the final LayerNorm")
    if visual.proj is None:
        raise ValueError("model.visual has no projection (proj is None): its tokens are not in the joint space")


def _causal_mask(length: int, like: torch.Tensor) -> torch.Tensor:
    """open_clip's additive causal mask: -inf above the diagonal."""
    return torch.full((length, length), float("-inf"), dtype=like.dtype, device=like.device).triu_(1)


def stretch_text_positions(
    model: nn.Module, target: int = LONG_CONTEXT, keep: int = KEPT_POSITIONS, train_kept_positions: bool = False
) -> nn.Module:
    """Stretch ``model.positional_embedding`` to ``target`` positions (Long-CLIP's rule), in place.

    Replaces the parameter (the state-dict key stays ``positional_embedding``), rebuilds the causal
    ``attn_mask`` buffer for ``target`` positions and sets ``model.context_length``, so ``encode_text``
    and ``model(image, text)`` take 248-token captions. Unless ``train_kept_positions``, the first ``keep``
    rows get zero gradient, but AdamW's decoupled weight decay still shrinks them: open_clip's trainer
    decays the table with its default AdamW (it exempts 1-D, ``ln``, ``bn``, ``bias`` and ``logit_scale``
    parameters; only its timm optimizers read ``no_weight_decay()``), so exempt ``positional_embedding``
    there to keep the rows as trained. A table that already has ``target`` rows is kept as is. Build
    optimizers after this call: the parameter object changes. To reload a stretched model, call this first,
    then ``open_clip.load_checkpoint``: ``create_model(..., pretrained=path)`` silently interpolates the
    saved table back to the config's positions.

    Returns:
        ``model``, for chaining.
    """
    _check_text_tower(model)
    old = model.positional_embedding
    if old.shape[0] != target:
        model.positional_embedding = nn.Parameter(stretched_table(old, target, keep), requires_grad=old.requires_grad)
        model.attn_mask = _causal_mask(target, model.attn_mask)
        model.context_length = target
    freeze_leading_rows(model.positional_embedding, 0 if train_kept_positions else keep)
    return model


def eot_index(model: nn.Module, text: torch.Tensor) -> torch.Tensor:
    """``[B]`` position of the EOT token, by the model's own pooling rule (``argmax`` id or first ``eos``)."""
    if getattr(model, "text_pool_type", "argmax") == "eos":
        return first_eos_index(text, model.text_eos_id, name="text")
    return text.argmax(dim=-1)


def _project_text(model, x: torch.Tensor) -> torch.Tensor:
    if model.text_projection is None:
        return x
    if isinstance(model.text_projection, nn.Linear):
        return model.text_projection(x)
    return x @ model.text_projection


def encode_image_tokens(model: nn.Module, image: torch.Tensor) -> ImageTokenFeatures:
    """CLS and patch tokens, each through ``ln_post`` and ``proj``.

    Args:
        image: ``[B, 3, H, W]`` preprocessed images.

    Returns:
        ``cls [B, d]`` (equal to ``encode_image``) and ``tokens [B, P, d]``. In training mode open_clip's
        patch dropout, when configured, leaves fewer than ``P`` tokens.
    """
    if not hasattr(model, "visual"):
        raise ValueError(
            "model must be an open_clip CLIP (it has no visual tower); pass a DistributedDataParallel-wrapped "
            "model as model.module"
        )
    visual = model.visual
    _check_vision_tower(visual)
    if not isinstance(image, torch.Tensor) or image.dim() != 4:
        raise ValueError(f"image must be a [B, 3, H, W] tensor, got {getattr(image, 'shape', None)!r}")
    x = visual.transformer(visual._embeds(image))
    projected = visual.ln_post(x) @ visual.proj
    return ImageTokenFeatures(cls=projected[:, 0], tokens=projected[:, 1:])


def encode_text_tokens(model: nn.Module, text: torch.Tensor, trim: bool = True) -> TextTokenFeatures:
    """EOT embedding and all token embeddings (``ln_final``, then ``text_projection``), with the word mask.

    Unlike ``encode_text``, this accepts any length up to ``context_length`` (the positional table and
    causal mask are sliced), so batches can be trimmed.

    Args:
        text: ``[B, L]`` token ids from open_clip's tokenizer (SOT first, one EOT per row).
        trim: cut the batch after its longest caption's EOT first; exact for the causal tower.

    Returns:
        ``eot [B, d]`` (equal to ``encode_text``), ``tokens [B, L', d]``, ``mask [B, L']`` True at words.
    """
    _check_text_tower(model)
    check_token_ids("text", text)
    eot = eot_index(model, text)
    if trim:
        text = text[:, : int(eot.max()) + 1]
    length = text.shape[1]
    if length > model.positional_embedding.shape[0]:
        raise ValueError(
            f"text has {length} positions but the model has {model.positional_embedding.shape[0]}; "
            "call stretch_text_positions(model) first for long captions"
        )
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(text).to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    tokens = _project_text(model, model.ln_final(x))
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    return TextTokenFeatures(eot=tokens[rows, eot], tokens=tokens, mask=word_token_mask(eot, length))


def _packed_tower(model: nn.Module, backend: str) -> PackedTextTower:
    """The text tower's own modules on a pack. open_clip's ``ResidualAttentionBlock`` attends through
    ``nn.MultiheadAttention`` with a dense mask (a block-diagonal ``[T, T]`` one is what packing avoids), so
    each block is composed here from its submodules in its own order: ``x + ls_1(attn(ln_1(x)))``, then
    ``x + ls_2(mlp(ln_2(x)))``, the attention computed from the module's own ``in_proj`` and ``out_proj``."""
    blocks = model.transformer.resblocks
    for i, block in enumerate(blocks):
        attn = getattr(block, "attn", None)
        if not isinstance(attn, nn.MultiheadAttention) or any(
            not hasattr(block, a) for a in ("ln_1", "ls_1", "ln_2", "mlp", "ls_2")
        ):
            raise ValueError(
                f"text block {i} is not open_clip's ResidualAttentionBlock with nn.MultiheadAttention (a "
                "CustomResidualAttentionBlock?); the packed pass cannot run it: use packed_text=False"
            )
        if not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn:
            raise ValueError(f"text block {i}'s attention has extra key/value terms; use packed_text=False")
        if attn.training and attn.dropout > 0:
            raise ValueError(
                f"text block {i} has attention dropout {attn.dropout} in training; the packed path has none "
                "(use packed_text=False)"
            )
    cast_dtype = model.transformer.get_cast_dtype()

    def embed(token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # F.embedding, not indexing: its backward sums rows densely, where indexing's is an index_put
        table = model.positional_embedding
        return model.token_embedding(token_ids).to(cast_dtype) + F.embedding(positions, table).to(cast_dtype)

    def packed_block(block):
        def forward(x: torch.Tensor, sequences) -> torch.Tensor:
            attn = block.attn
            q, k, v = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
            x = x + block.ls_1(attn.out_proj(packed_attention(q, k, v, attn.num_heads, sequences, backend)))
            return x + block.ls_2(block.mlp(block.ln_2(x)))

        return forward

    # open_clip's Transformer checkpoints every block or none, non-reentrant
    checkpoint = NON_REENTRANT_CHECKPOINT if model.training and model.transformer.grad_checkpointing else None
    return PackedTextTower(
        embed=embed,
        layers=[packed_block(block) for block in blocks],
        final_norm=model.ln_final,
        project=lambda x: _project_text(model, x),
        max_positions=model.positional_embedding.shape[0],
        checkpoints=[checkpoint] * len(blocks),
    )


def mulclip_features(
    model: nn.Module,
    image: torch.Tensor,
    text: torch.Tensor,
    short_text: torch.Tensor | None = None,
    sub_text: torch.Tensor | None = None,
    sub_mask: torch.Tensor | None = None,
    packed_text: bool = True,
    text_attention: str = "auto",
) -> MulCLIPFeatures:
    """Everything ``MulCLIPLoss`` needs for one batch, from raw (uncalibrated) tokens.

    Args:
        image: ``[B, 3, H, W]``; text: ``[B, L]`` long captions (248 tokens after stretching).
        short_text: optional ``[B, L_s]`` summary captions.
        sub_text: optional ``[B, M, L_s]`` subcaptions; ``sub_mask [B, M]`` marks the real ones (None: all).
        packed_text: run every long caption, summary and real subcaption through the text tower in one
            packed pass, each text's real tokens only (docs/integrations.md, "Packed text"); False encodes
            each group padded, the reference the packed path is tested against. Equal to fp32 rounding,
            except the long captions' tokens past EOT: zeros when packed (the word mask excludes them).
        text_attention: the packed pass's attention backend, ``auto | flash | xformers | torch``
            (``mulclip_fast.model.attention``).

    Returns:
        ``MulCLIPFeatures`` with raw tokens; pass it through ``calibrate`` for MulCLIP's ``V'`` / ``T'``.
    """
    check_packed_text(packed_text, text_attention)
    image_features = encode_image_tokens(model, image)
    _check_text_tower(model)
    names = ("image", "text", "short_text", "sub_text")
    sub_mask = check_caption_batch(names, image_features.cls.shape[0], text, short_text, sub_text, sub_mask)
    captions = (text, short_text, sub_text, sub_mask)
    if packed_text:
        text_features, short_eot, sub_eot = encode_packed_caption_groups(
            _packed_tower(model, text_attention), lambda ids: eot_index(model, ids), names[1:], *captions
        )
    else:
        text_features, short_eot, sub_eot = encode_padded_caption_groups(
            lambda ids: encode_text_tokens(model, ids), lambda ids: encode_text_tokens(model, ids).eot, *captions
        )
    return assemble_features(image_features, text_features, short_eot, sub_eot, sub_mask)
