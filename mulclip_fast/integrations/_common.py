"""What every CLIP adapter shares: the token-feature containers, the word mask and Long-CLIP's stretching.

Neither open_clip nor transformers is imported here or by the adapters: they work on the attributes of
a model object the caller already built, so ``import mulclip_fast.integrations`` costs nothing extra.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
from torch import nn

from ..features import MulCLIPFeatures
from ..model import LocalTokenCalibration
from ..model.attention import PackedSequences, check_text_attention, packed_causal_attention
from ..reference import stretch_positional_embedding

LONG_CONTEXT = 248  # Long-CLIP's context: 4·77 − 3·20 positions (docs/method.md, "Positional stretching")
KEPT_POSITIONS = 20  # leading positions copied unchanged, and frozen by default (Long-CLIP, FineLIP)
# How a packed layer is recomputed in backward where the model gives no checkpoint function of its own.
NON_REENTRANT_CHECKPOINT = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)


@dataclass
class ImageTokenFeatures:
    """Projected outputs of an image tower.

    Attributes:
        cls: ``[B, d]`` the model's own image embedding (CLS through the final LayerNorm and projection).
        tokens: ``[B, P, d]`` the patch tokens through the same LayerNorm and projection.
    """

    cls: torch.Tensor
    tokens: torch.Tensor


@dataclass
class TextTokenFeatures:
    """Projected outputs of a text tower.

    Attributes:
        eot: ``[B, d]`` the model's own text embedding (the EOT token, projected).
        tokens: ``[B, L, d]`` every position through the same final LayerNorm and projection.
        mask: ``[B, L]`` bool, True for word tokens only (SOT, EOT and padding are False).
    """

    eot: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor


def check_token_ids(name: str, ids: torch.Tensor, ndim: int = 2) -> None:
    if not isinstance(ids, torch.Tensor) or ids.dim() != ndim:
        form = "[B, L]" if ndim == 2 else "[B, M, L]"
        raise ValueError(f"{name} must be an integer tensor of shape {form}, got {getattr(ids, 'shape', ids)!r}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
    if ids.shape[-1] < 2:
        raise ValueError(f"{name} needs at least 2 positions (SOT and EOT), got shape {tuple(ids.shape)}")


def word_token_mask(eot_index: torch.Tensor, length: int, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, length]`` bool, True at the word positions ``1 .. eot_index-1`` (SOT at 0, EOT and padding excluded).

    ``attention_mask`` (1 = real token), when given, further removes anything it marks as padding.
    """
    positions = torch.arange(length, device=eot_index.device)
    mask = (positions[None, :] >= 1) & (positions[None, :] < eot_index[:, None])
    if attention_mask is not None:
        if tuple(attention_mask.shape) != tuple(mask.shape):
            raise ValueError(f"attention_mask must have shape {tuple(mask.shape)}, got {tuple(attention_mask.shape)}")
        mask = mask & attention_mask.to(device=mask.device).bool()
    return mask


def first_eos_index(input_ids: torch.Tensor, eos_token_id: int, name: str = "input_ids") -> torch.Tensor:
    """Index of the first ``eos_token_id`` in each row (padding may reuse the EOS id, so the first one counts)."""
    is_eos = input_ids == eos_token_id
    has_eos = is_eos.any(dim=1)
    if not bool(has_eos.all()):
        row = int((~has_eos).nonzero()[0])
        raise ValueError(
            f"{name} row {row} has no EOT token (id {eos_token_id}); tokenise with the model's tokenizer, "
            "which ends every caption with EOT, also on truncation"
        )
    return is_eos.int().argmax(dim=1)


def stretched_table(old: torch.Tensor, target: int, keep: int) -> torch.Tensor:
    """Long-CLIP's rule (reference ``stretch_positional_embedding``), validated for the adapters' arguments."""
    if old.shape[0] > target:
        raise ValueError(f"target={target} is shorter than the model's {old.shape[0]} text positions")
    return stretch_positional_embedding(old.detach(), target=target, keep=keep)


def freeze_leading_rows(table: nn.Parameter, keep: int) -> torch.utils.hooks.RemovableHandle | None:
    """Zero the gradient of the first ``keep`` rows of a positional table (Long-CLIP keeps them as trained),
    in place of any freeze this function put on ``table`` before (``keep`` 0: none).

    A gradient hook leaves the parameter and its ``state_dict`` key as the library defines them, so a
    stretched model still saves and reloads with the library's own code (a copy of the parameter does not
    carry the hook: freeze the copy again). Decoupled weight decay (AdamW) still shrinks those rows: put
    the table in a no-decay parameter group (open_clip's ``no_weight_decay()`` lists
    ``positional_embedding``, but its trainer's default AdamW does not read it and decays the table).
    A table that does not require grad (a frozen tower, an adapter-only fine-tune, evaluation) has no
    gradient to zero and cannot take a hook: it gets none; call this again once it is unfrozen.
    """
    key = id(table)
    previous = _FROZEN_ROWS.pop(key, None)
    if previous is not None and previous[0]() is table:  # not stacked, and dropped when asked
        previous[1].remove()
    if keep <= 0 or not table.requires_grad:
        return None
    frozen = torch.arange(table.shape[0], device=table.device) < keep

    def zero_frozen_rows(grad: torch.Tensor) -> torch.Tensor:
        return grad.masked_fill(frozen[:, None].to(grad.device), 0)

    handle = table.register_hook(zero_frozen_rows)
    _FROZEN_ROWS[key] = (weakref.ref(table, lambda _ref: _FROZEN_ROWS.pop(key, None)), handle)
    return handle


# Each frozen table's hook, by the table's id, beside the table rather than on it: an attribute holding the
# handle would be pickled with the parameter (``torch.save(model)``), and the hook it refers to cannot be.
_FROZEN_ROWS: dict[int, tuple[weakref.ref, torch.utils.hooks.RemovableHandle]] = {}


def subcaption_layout(
    sub_ids: torch.Tensor, sub_mask: torch.Tensor | None, batch: int, name: str = "sub_ids"
) -> torch.Tensor:
    """Validate ``sub_ids [B, M, L]`` and ``sub_mask [B, M]``; returns the mask (all True when None)."""
    check_token_ids(name, sub_ids, ndim=3)
    if sub_ids.shape[0] != batch:
        raise ValueError(f"{name} must have the batch size {batch} of the long captions, got {sub_ids.shape[0]}")
    if sub_mask is None:
        return torch.ones(sub_ids.shape[:2], dtype=torch.bool, device=sub_ids.device)
    if not isinstance(sub_mask, torch.Tensor) or sub_mask.dtype != torch.bool or sub_mask.shape != sub_ids.shape[:2]:
        raise ValueError(f"sub_mask must be a bool tensor of shape {tuple(sub_ids.shape[:2])} (True = real subcaption)")
    return sub_mask


def encode_subcaptions(encode_eot, sub_ids: torch.Tensor, sub_mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[B, M, d]`` EOT embeddings of the valid subcaptions (zeros in empty slots), in one text pass.

    Only the valid slots are encoded: empty slots are padding, and encoding them would cost a text pass
    each (subcaptions are MulCLIP's dominant extra cost, docs/method.md, "Model"). ``like`` (the long
    captions' ``[B, d]`` EOT embeddings) gives width, dtype and device when no slot is valid, which the SAP
    loss treats as contributing nothing.
    """
    flat_ids = sub_ids[sub_mask]  # [n_valid, L]
    if flat_ids.shape[0] == 0:
        return like.new_zeros(*sub_mask.shape, like.shape[-1])
    return scatter_subcaptions(encode_eot(flat_ids), sub_mask, like)


def check_caption_batch(
    names: tuple[str, str, str, str],
    batch: int,
    long_ids: torch.Tensor,
    short_ids: torch.Tensor | None,
    sub_ids: torch.Tensor | None,
    sub_mask: torch.Tensor | None,
) -> torch.Tensor | None:
    """Validate an adapter's captions against its ``batch`` images; returns ``sub_mask`` (all True when
    ``sub_ids`` comes without one). ``names``: the adapter's argument names of the images, the long
    captions, the summaries and the subcaptions, for errors."""
    image_name, long_name, short_name, sub_name = names
    for name, ids in ((long_name, long_ids), (short_name, short_ids)):
        if ids is None:
            continue
        check_token_ids(name, ids)
        if ids.shape[0] != batch:
            raise ValueError(f"{image_name} and {name} must have the same batch size, got {batch} and {ids.shape[0]}")
    if sub_ids is not None:
        sub_mask = subcaption_layout(sub_ids, sub_mask, batch, name=sub_name)
    elif sub_mask is not None:
        raise ValueError(f"sub_mask was given without {sub_name}")
    return sub_mask


def encode_padded_caption_groups(
    encode_long: Callable[[torch.Tensor], TextTokenFeatures],
    encode_eot: Callable[[torch.Tensor], torch.Tensor],
    long_ids: torch.Tensor,
    short_ids: torch.Tensor | None,
    sub_ids: torch.Tensor | None,
    sub_mask: torch.Tensor | None,
) -> tuple[TextTokenFeatures, torch.Tensor | None, torch.Tensor | None]:
    """What ``encode_packed_caption_groups`` returns, each group through the text tower in its own padded
    pass: the reference the packed pass is tested against. ``encode_long``: the long captions' token
    features; ``encode_eot``: the EOT embeddings of a batch of summaries or subcaptions."""
    text = encode_long(long_ids)
    short_eot = None if short_ids is None else encode_eot(short_ids)
    sub_eot = None if sub_ids is None else encode_subcaptions(encode_eot, sub_ids, sub_mask, text.eot)
    return text, short_eot, sub_eot


def assemble_features(
    image: ImageTokenFeatures,
    text: TextTokenFeatures,
    short_eot: torch.Tensor | None,
    sub_eot: torch.Tensor | None,
    sub_mask: torch.Tensor | None,
) -> MulCLIPFeatures:
    """The towers' outputs as the ``MulCLIPFeatures`` of one batch (raw, uncalibrated tokens)."""
    return MulCLIPFeatures(
        image_cls=image.cls,
        image_tokens=image.tokens,
        text_eot=text.eot,
        text_tokens=text.tokens,
        short_eot=short_eot,
        sub_eot=sub_eot,
        sub_mask=sub_mask,
        text_token_mask=text.mask,
    )


def check_packed_text(packed_text: bool, text_attention: str) -> None:
    """Validate the adapters' ``packed_text`` and ``text_attention`` arguments."""
    if not isinstance(packed_text, bool):
        raise ValueError(f"packed_text must be True or False, got {packed_text!r}")
    check_text_attention(text_attention)


def packed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, sequences: PackedSequences, backend: str
) -> torch.Tensor:
    """Causal attention within each text of a pack, ``q, k, v [T, width]`` (projected, unscaled) →
    ``[T, width]``, scaled by ``head_dim^-1/2`` as CLIP's towers are, through ``packed_causal_attention``."""
    t, width = q.shape
    q, k, v = (x.reshape(t, heads, width // heads) for x in (q, k, v))
    return packed_causal_attention(q, k, v, sequences, None, backend).reshape(t, width)


@dataclass
class PackedTextTower:
    """How an adapter runs its model's text tower on a pack ``[T, width]`` (docs/integrations.md, "Packed text").

    Attributes:
        embed: ``(token_ids [T], positions [T]) -> [T, width]``, the model's token plus positional embedding.
        layers: each ``(x [T, width], sequences) -> [T, width]``, one block of the model with its own modules,
            attending through ``packed_attention``.
        final_norm: the tower's final LayerNorm.
        project: the text projection into the joint space.
        max_positions: rows of the positional table.
        checkpoints: per layer, the function that runs it so that it is recomputed in backward,
            ``(layer, x, sequences) -> [T, width]`` (the model's gradient checkpointing setting), or None.
    """

    embed: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    layers: Sequence[Callable[[torch.Tensor, PackedSequences], torch.Tensor]]
    final_norm: Callable[[torch.Tensor], torch.Tensor]
    project: Callable[[torch.Tensor], torch.Tensor]
    max_positions: int
    checkpoints: Sequence[Callable | None]


def encode_packed_groups(
    tower: PackedTextTower, groups: Sequence[torch.Tensor], eot_indices: Sequence[torch.Tensor], names: Sequence[str]
) -> tuple[list[torch.Tensor], TextTokenFeatures]:
    """EOT embeddings of every group of texts, and the first group's token features, from one packed pass.

    Each text keeps its tokens up to its EOT (``eot_indices``, by the model's pooling rule) with positions
    from 0; the texts of all groups are concatenated into one stream and every layer attends within each
    text only, causally. The tower is causal with learned absolute positions, so each text's outputs equal
    the padded path's to fp32 rounding; padding is never computed.

    Returns:
        ``[eot [n_i, d] per group]`` and the first group's ``TextTokenFeatures``: tokens ``[n_0, L_0, d]``
        with ``L_0`` its longest text (EOT included), zeros past each EOT, and the words-only mask.
    """
    real = []
    for ids, eot, name in zip(groups, eot_indices, names, strict=True):
        longest = int(eot.max()) + 1 if eot.numel() else 0
        if longest > tower.max_positions:
            raise ValueError(
                f"{name} has a text of {longest} positions but the model has {tower.max_positions}; "
                "call stretch_text_positions(model) first for long captions"
            )
        real.append(torch.arange(ids.shape[1], device=ids.device) <= eot[:, None].to(ids.device))
    counts = [ids.shape[0] for ids in groups]
    lengths = torch.cat([eot.to(groups[0].device) + 1 for eot in eot_indices])
    sequences = PackedSequences(lengths.tolist(), lengths.device)
    token_ids = torch.cat([ids[mask] for ids, mask in zip(groups, real, strict=True)])
    starts = sequences.cu_seqlens[:-1].long()
    positions = torch.arange(sequences.total, device=lengths.device) - starts.repeat_interleave(lengths)
    x = tower.embed(token_ids, positions)
    for layer, checkpoint in zip(tower.layers, tower.checkpoints, strict=True):
        if checkpoint is not None and torch.is_grad_enabled():
            x = checkpoint(layer, x, sequences)
        else:
            x = layer(x, sequences)
    x = tower.final_norm(x)
    eot = list(tower.project(x.index_select(0, starts + lengths - 1)).split(counts))
    first_real, first_eot = real[0], eot_indices[0].to(groups[0].device)
    length = int(first_eot.max()) + 1
    first_real = first_real[:, :length]
    first_tokens = tower.project(x[: int(first_real.sum())])
    tokens = first_tokens.new_zeros(*first_real.shape, first_tokens.shape[-1])
    tokens = tokens.masked_scatter(first_real[..., None], first_tokens)
    return eot, TextTokenFeatures(eot=eot[0], tokens=tokens, mask=word_token_mask(first_eot, length))


def encode_packed_caption_groups(
    tower: PackedTextTower,
    eot_of: Callable[[torch.Tensor], torch.Tensor],
    names: tuple[str, str, str],
    long_ids: torch.Tensor,
    short_ids: torch.Tensor | None,
    sub_ids: torch.Tensor | None,
    sub_mask: torch.Tensor | None,
) -> tuple[TextTokenFeatures, torch.Tensor | None, torch.Tensor | None]:
    """The long captions' token features, the summaries' and the subcaptions' EOT embeddings (``[B, M, d]``
    in their slots), from one packed pass over every text (``encode_packed_groups``). ``eot_of``: the
    model's EOT index of each row; ``names``: the adapter's argument names of the three, for errors."""
    groups = {names[0]: long_ids}
    if short_ids is not None:
        groups[names[1]] = short_ids
    if sub_ids is not None and bool(sub_mask.any()):
        groups[names[2]] = sub_ids[sub_mask]
    eot_indices = [eot_of(ids) for ids in groups.values()]
    eots, text = encode_packed_groups(tower, list(groups.values()), eot_indices, list(groups))
    eots = dict(zip(groups, eots, strict=True))
    sub_eot = None if sub_ids is None else scatter_subcaptions(eots.get(names[2], text.eot[:0]), sub_mask, text.eot)
    return text, eots.get(names[1]), sub_eot


def scatter_subcaptions(flat: torch.Tensor, sub_mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[B, M, d]``: the valid subcaptions' EOT embeddings ``flat [n_valid, d]`` in their slots, zeros elsewhere."""
    out = like.new_zeros(*sub_mask.shape, like.shape[-1])
    if flat.shape[0] == 0:
        return out
    return out.index_put(sub_mask.nonzero(as_tuple=True), flat.to(out.dtype))


def token_calibrations(
    width: int, n_image_tokens: int, n_text_tokens: int | None = None, logit_std: float = 2.0
) -> tuple[LocalTokenCalibration, LocalTokenCalibration]:
    """MulCLIP's two local token calibration modules (patches, words), ready to train with a CLIP.

    Args:
        width: the joint embedding width d (the model's projection dim).
        n_image_tokens: N' for patches (MulCLIP: ⌊0.2·P⌋); ``n_text_tokens`` for words (default the same).
        logit_std: init std of the MLP's last layer. With PyTorch's default init the calibration logits
            are nearly equal, every calibrated token is the mean token, and WPR sits at its symmetric point
            ``2·ln N'`` with vanishing gradients; a wider init breaks the symmetry (as ``mulclip_fast.model``).
    """
    if width < 1 or n_image_tokens < 1 or (n_text_tokens is not None and n_text_tokens < 1):
        raise ValueError(f"width and token counts must be >= 1, got {width}, {n_image_tokens}, {n_text_tokens}")
    if not logit_std > 0:
        raise ValueError(f"logit_std must be > 0, got {logit_std}")
    modules = (
        LocalTokenCalibration(width, n_image_tokens),
        LocalTokenCalibration(width, n_image_tokens if n_text_tokens is None else n_text_tokens),
    )
    for module in modules:
        nn.init.normal_(module.mlp[-1].weight, std=logit_std)
    return modules


def calibrate(
    features: MulCLIPFeatures,
    image_calibration: LocalTokenCalibration,
    text_calibration: LocalTokenCalibration,
    sap_on_raw_patches: bool = False,
) -> MulCLIPFeatures:
    """Replace the raw tokens of ``features`` by their locally calibrated ``V'`` and ``T'`` (docs/method.md,
    "Local token calibration").

    MulCLIP computes WPR and SAP on calibrated tokens; ``sap_on_raw_patches`` keeps the raw patches for
    SAP (the paper's ablation flag). The calibrated tokens of a sample are all valid, or all invalid when it
    had no valid token (an empty caption: its ``T'`` is zeros), so that WPR leaves the sample out of its mean
    as ``CLIP.features`` does.
    """
    v_cal = image_calibration(features.image_tokens, features.image_token_mask)
    t_cal = text_calibration(features.text_tokens, features.text_token_mask)
    return MulCLIPFeatures(
        image_cls=features.image_cls,
        image_tokens=v_cal,
        text_eot=features.text_eot,
        text_tokens=t_cal,
        short_eot=features.short_eot,
        sub_eot=features.sub_eot,
        sub_mask=features.sub_mask,
        image_token_mask=_calibrated_mask(features.image_token_mask, v_cal),
        text_token_mask=_calibrated_mask(features.text_token_mask, t_cal),
        sap_tokens=features.image_tokens if sap_on_raw_patches else None,
        sap_token_mask=features.image_token_mask if sap_on_raw_patches else None,
    )


def _calibrated_mask(mask: torch.Tensor | None, calibrated: torch.Tensor) -> torch.Tensor | None:
    """``[B, N']`` mask of calibrated tokens: False on the rows of samples without any valid input token."""
    return None if mask is None else mask.any(dim=1, keepdim=True).expand(-1, calibrated.shape[1])


def as_clip_loss_inputs(features: MulCLIPFeatures) -> dict[str, torch.Tensor | None]:
    """Keyword arguments of ``MulCLIPClipLoss`` (all but ``logit_scale``) from a ``MulCLIPFeatures``."""
    return {
        "image_features": features.image_cls,
        "text_features": features.text_eot,
        "image_tokens": features.image_tokens,
        "text_tokens": features.text_tokens,
        "image_token_mask": features.image_token_mask,
        "text_token_mask": features.text_token_mask,
        "short_text_features": features.short_eot,
        "sub_text_features": features.sub_eot,
        "sub_mask": features.sub_mask,
        "sap_tokens": features.sap_tokens,
        "sap_token_mask": features.sap_token_mask,
    }
