"""CLIP towers in OpenAI CLIP's state-dict layout, with MulCLIP's feature extraction (docs/method.md, "Features").

The parameter names and shapes follow OpenAI's ``clip/model.py`` (``visual.conv1``,
``visual.transformer.resblocks.N.attn.in_proj_weight``, ``token_embedding``, ``text_projection``, …) so
OpenAI, Long-CLIP and open_clip OpenAI-layout checkpoints load with a plain ``load_state_dict``. The two
local-token-calibration modules (``patch_calibration``, ``word_calibration``) are the only extra keys.
Attention goes through ``F.scaled_dot_product_attention``, except on the packed text path
(``CLIP.encode_packed_text``): every text of a batch in one token stream, attended per sequence by
``attention.packed_causal_attention`` (flash-attn, xformers or SDPA on groups of similar length).

The ``tiny`` preset's text tower adds ALiBi recency biases (Press et al., 2022) to its causal attention:
no parameters, so the layout is unchanged, and the OpenAI presets compute exactly OpenAI's CLIP. Why:
trained from scratch for a few minutes, a text tower with only learned absolute positions spreads its
attention evenly over the ~170 caption tokens and never learns to look at the word before (``examples/
binding_diagnostic.py attention`` measures it), so "red circle" and "blue circle" look alike and colours
cannot be bound to shapes. With the recency heads binding is learned within the default run.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..features import MulCLIPFeatures
from .attention import (
    PackedSequences,
    alibi_slopes,
    biased_attention,
    causal_alibi_bias,
    check_text_attention,
    packed_causal_attention,
)
from .calibration import LocalTokenCalibration

LONG_CONTEXT = 248  # Long-CLIP's stretched text context
SHORT_CONTEXT = 77  # OpenAI CLIP's context, used for summaries and subcaptions
VOCAB_SIZE = 49408
CALIBRATION_LOGIT_STD = 2.0  # init std of the calibration MLP's last layer (see CLIP._init_parameters)
SUBCAPTION_CHUNK = 128  # subcaptions encoded per chunk, each chunk trimmed to its own longest


@dataclass(frozen=True)
class CLIPConfig:
    """Architecture of both towers. ``calibrated_tokens`` is N' of the calibration modules (0: ⌊0.2·P⌋)."""

    embed_dim: int
    image_resolution: int
    vision_layers: int
    vision_width: int
    vision_patch_size: int
    vision_heads: int
    context_length: int
    vocab_size: int
    transformer_width: int
    transformer_heads: int
    transformer_layers: int
    calibrated_tokens: int = 0
    text_alibi: bool = False  # ALiBi recency biases in the text tower's attention (see the module docstring)

    def __post_init__(self):
        # Also reached from ``--model FIELD=N``: a bad value is an error naming the field here, not a
        # ZeroDivisionError when the model is built, an IndexError at the first EOT id, or a tower that
        # silently has no layer (``range(-1)``).
        if self.text_alibi not in (0, 1):
            raise ValueError(f"text_alibi must be 0 or 1 (false or true), got {self.text_alibi!r}")
        object.__setattr__(self, "text_alibi", bool(self.text_alibi))
        minimum = {"vision_layers": 0, "transformer_layers": 0, "calibrated_tokens": 0, "context_length": 2}
        for name, value in asdict(self).items():
            if name != "text_alibi" and value < minimum.get(name, 1):
                raise ValueError(f"{name} must be >= {minimum.get(name, 1)}, got {value}")
        for tower in ("vision", "transformer"):
            width, heads = getattr(self, f"{tower}_width"), getattr(self, f"{tower}_heads")
            if width % heads:
                raise ValueError(f"{tower}_width {width} must be a multiple of {tower}_heads {heads}")
        if self.vision_patch_size > self.image_resolution:
            raise ValueError(
                f"vision_patch_size {self.vision_patch_size} must be <= image_resolution {self.image_resolution}"
            )
        if self.vocab_size < VOCAB_SIZE:
            raise ValueError(f"vocab_size must be >= {VOCAB_SIZE}: CLIP's tokenizer gives ids up to {VOCAB_SIZE - 1}")

    @property
    def num_patches(self) -> int:
        return (self.image_resolution // self.vision_patch_size) ** 2

    @property
    def num_calibrated_tokens(self) -> int:
        return self.calibrated_tokens or max(1, int(0.2 * self.num_patches))

    def to_dict(self) -> dict:
        return asdict(self)


def _openai_vit(embed, res, layers, width, patch, t_width, t_heads, t_layers) -> CLIPConfig:
    return CLIPConfig(
        embed_dim=embed,
        image_resolution=res,
        vision_layers=layers,
        vision_width=width,
        vision_patch_size=patch,
        vision_heads=width // 64,
        context_length=LONG_CONTEXT,
        vocab_size=VOCAB_SIZE,
        transformer_width=t_width,
        transformer_heads=t_heads,
        transformer_layers=t_layers,
    )


PRESETS: dict[str, CLIPConfig] = {
    # The CPU default: ~1.6M non-embedding parameters, 64x64 images cut into 8x8 patches (64 patches).
    "tiny": CLIPConfig(
        embed_dim=128,
        image_resolution=64,
        vision_layers=4,
        vision_width=128,
        vision_patch_size=8,
        vision_heads=4,
        context_length=LONG_CONTEXT,
        vocab_size=VOCAB_SIZE,
        transformer_width=128,
        transformer_heads=4,
        transformer_layers=4,
        text_alibi=True,
    ),
    "vit-b-16": _openai_vit(512, 224, 12, 768, 16, 512, 8, 12),
    "vit-l-14": _openai_vit(768, 224, 24, 1024, 14, 768, 12, 12),
    "vit-l-14-336": _openai_vit(768, 336, 24, 1024, 14, 768, 12, 12),
}


def preset_config(name: str, **overrides) -> CLIPConfig:
    """The named preset, with optional field overrides (e.g. a smaller ``vision_layers`` for tests)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)


def parse_model_overrides(items: Sequence[str]) -> dict[str, int]:
    """The command lines' ``--model FIELD=INT`` (repeatable) as a dict of preset fields; ValueError if malformed."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not value.lstrip("-").isdigit():
            raise ValueError(f"--model expects FIELD=INT, got {item!r}")
        overrides[key] = int(value)
    return overrides


def checked_preset_config(name: str, overrides: dict[str, int]) -> CLIPConfig:
    """``preset_config`` for the command lines: a ValueError naming the ``--model`` field that does not exist
    or whose value the model refuses, instead of dataclasses' TypeError."""
    fields = [f.name for f in dataclasses.fields(CLIPConfig)]
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"--model {unknown[0]}: no such field of the {name} preset; its fields: {', '.join(fields)}")
    try:
        return preset_config(name, **overrides)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"bad --model override: {exc}") from None


class QuickGELU(nn.Module):
    """OpenAI CLIP's activation; kept so that its checkpoints compute what they were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class SelfAttention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameter names, computed by SDPA."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values ``[B, heads, n, width / heads]`` of ``x [B, n, width]``."""
        b, n, w = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        return qkv.view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, x: torch.Tensor, causal: bool, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``bias``: an additive ``[heads, n, n]`` attention bias that already holds the causal mask, or on
        the packed path a ``PackedAttention`` (``x`` is then a pack ``[T, width]``)."""
        if isinstance(bias, PackedAttention):
            return self.forward_packed(x, bias)
        b, n, w = x.shape
        q, k, v = self.project(x)
        if bias is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        else:
            out = biased_attention(q, k, v, bias.to(q.dtype))
        return self.out_proj(out.transpose(1, 2).reshape(b, n, w))

    def forward_packed(self, x: torch.Tensor, packed: PackedAttention) -> torch.Tensor:
        """Causal attention within each sequence of a pack ``x [T, width]``."""
        t, w = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(t, 3, self.heads, w // self.heads)
        q, k, v = qkv.unbind(1)
        out = packed_causal_attention(q, k, v, packed.sequences, packed.alibi_slopes, packed.backend)
        return self.out_proj(out.reshape(t, w))


@dataclass(frozen=True)
class PackedAttention:
    """What a block's attention needs on the packed path, passed where the padded path passes its bias
    (so gradient checkpointing calls both alike): the pack's layout, the ALiBi slopes (None without
    ALiBi) and the attention backend."""

    sequences: PackedSequences
    alibi_slopes: torch.Tensor | None
    backend: str


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = SelfAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("gelu", QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, causal: bool, bias: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal, bias)
        return x + self.mlp(self.ln_2(x))


def alibi_bias(heads: int, length: int) -> torch.Tensor:
    """Causal ALiBi biases ``[heads, length, length]``: ``-m_h·(i - j)`` for ``j ≤ i``, ``-inf`` above.

    Slopes ``m_h = 2^(-8h/heads)``, h = 1…heads (Press et al., 2022, §3): with 4 heads 1/4, 1/16, 1/64,
    1/256, from a head that sees the last few words to one that sees the whole caption nearly evenly.
    """
    return causal_alibi_bias(alibi_slopes(heads), length)


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, causal: bool, alibi_length: int = 0):
        """``alibi_length > 0``: add causal ALiBi biases for sequences up to that length (needs ``causal``)."""
        super().__init__()
        if alibi_length and not causal:
            raise ValueError("ALiBi biases are built causal; the transformer must be causal")
        self.causal = causal
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads) for _ in range(layers))
        self.grad_checkpointing = False
        # A buffer, not a parameter: no state-dict key, so checkpoints keep OpenAI's layout.
        self.register_buffer("alibi", alibi_bias(heads, alibi_length) if alibi_length else None, persistent=False)
        self.register_buffer("alibi_slopes", alibi_slopes(heads) if alibi_length else None, persistent=False)

    def forward(self, x: torch.Tensor, packed: PackedSequences | None = None, attention: str = "auto") -> torch.Tensor:
        """``x [B, n, width]``, or with ``packed`` a pack ``[T, width]`` attended per sequence through the
        ``attention`` backend (``attention.TEXT_ATTENTION_BACKENDS``)."""
        if packed is not None:
            if not self.causal:
                raise ValueError("the packed path attends causally; this transformer is not causal")
            bias = PackedAttention(packed, self.alibi_slopes, attention)
        else:
            n = x.shape[1]
            bias = None if self.alibi is None else self.alibi[:, :n, :n]
        for block in self.resblocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, self.causal, bias, use_reentrant=False)
            else:
                x = block(x, self.causal, bias)
        return x


class VisionTransformer(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        width, grid = cfg.vision_width, cfg.image_resolution // cfg.vision_patch_size
        scale = width**-0.5
        self.input_resolution = cfg.image_resolution
        self.conv1 = nn.Conv2d(3, width, kernel_size=cfg.vision_patch_size, stride=cfg.vision_patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, cfg.vision_layers, cfg.vision_heads, causal=False)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, cfg.embed_dim))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, 3, R, R]`` → (CLS embedding ``[B, d]``, patch embeddings ``[B, P, d]``), both projected."""
        x = self.conv1(images).flatten(2).transpose(1, 2)  # [B, P, width]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        # Every token goes through the same final LayerNorm and projection (docs/method.md, "Features").
        x = self.ln_post(x) @ self.proj
        return x[:, 0], x[:, 1:]


def word_mask(ids: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` True at the words of ``ids [B, L]``: SOT, EOT (the largest id) and padding excluded."""
    positions = torch.arange(ids.shape[1], device=ids.device)
    return (positions > 0) & (positions < ids.argmax(dim=-1, keepdim=True))


class CLIP(nn.Module):
    """OpenAI-layout CLIP plus the two calibration modules MulCLIP and FineLIP use."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.config = cfg
        self.visual = VisionTransformer(cfg)
        self.transformer = Transformer(
            cfg.transformer_width,
            cfg.transformer_layers,
            cfg.transformer_heads,
            causal=True,
            alibi_length=cfg.context_length if cfg.text_alibi else 0,
        )
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.transformer_width))
        self.ln_final = nn.LayerNorm(cfg.transformer_width)
        self.text_projection = nn.Parameter(torch.empty(cfg.transformer_width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        n_out = cfg.num_calibrated_tokens
        self.patch_calibration = LocalTokenCalibration(cfg.embed_dim, n_out)
        self.word_calibration = LocalTokenCalibration(cfg.embed_dim, n_out)
        self.frozen_positions = 0
        self.text_attention = "auto"  # the packed text path's attention backend (set_text_attention)
        self._init_parameters()

    def _init_parameters(self) -> None:
        # OpenAI CLIP's initialisation (clip/model.py, initialize_parameters).
        cfg = self.config
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        width, layers = cfg.transformer_width, cfg.transformer_layers
        proj_std = (width**-0.5) * ((2 * layers) ** -0.5)
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=width**-0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width**-0.5)
        # The calibration modules start far from uniform attention. With PyTorch's default init their
        # logits Z are ~0.2 apart, every calibrated token is ~the mean token (cosine 0.9999 on a fresh
        # tiny model), WPR sits at its symmetric point ln(N') with gradients ~1e-6 and never leaves it.
        for calibration in (self.patch_calibration, self.word_calibration):
            nn.init.normal_(calibration.mlp[-1].weight, std=CALIBRATION_LOGIT_STD)

    # ------------------------------------------------------------------ positional freezing
    def freeze_leading_positions(self, n: int) -> None:
        """Keep the first ``n`` text positions fixed (Long-CLIP): their gradient is zero.

        With a zero gradient from the first step Adam's moments stay zero, so the rows never move as
        long as the optimizer puts ``positional_embedding`` in a group without weight decay (the
        trainer does). The text passes read the table through ``text_positions``, which detaches the
        rows: a gradient hook on the parameter would be lost with the parameter object (a deep copy,
        ``load_state_dict(assign=True)``) and would make the model unpicklable.
        """
        if not 0 <= n <= self.config.context_length:
            raise ValueError(f"frozen positions must be in [0, {self.config.context_length}], got {n}")
        self.frozen_positions = n

    def text_positions(self) -> torch.Tensor:
        """The text positional table as the text passes use it: the frozen leading rows detached."""
        n = self.frozen_positions
        table = self.positional_embedding
        return torch.cat([table[:n].detach(), table[n:]]) if n else table

    def set_text_attention(self, backend: str) -> None:
        """The packed text path's attention backend: auto | flash | xformers | torch (``attention`` module).
        Raises when it is unknown or not installed."""
        check_text_attention(backend)
        self.text_attention = backend

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.visual.transformer.grad_checkpointing = enabled
        self.transformer.grad_checkpointing = enabled

    # ------------------------------------------------------------------ towers
    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def encode_image_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(``v_cls [B, d]``, ``v_loc [B, P, d]``)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        if not images.is_floating_point():
            # uint8 pixels would be computed as floats 0..255, silently far from the preprocessed range.
            raise ValueError(f"images must be a floating-point tensor of preprocessed pixels, got {images.dtype}")
        res = self.config.image_resolution
        if images.shape[-2:] != (res, res):
            raise ValueError(f"images must be {res}x{res} for this model, got {tuple(images.shape[-2:])}")
        return self.visual(images.to(self.dtype))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode_image_tokens(images)[0]

    def _check_ids(self, ids: torch.Tensor, name: str = "token ids", form: str = "[B, L]") -> None:
        if ids.dim() != form.count(",") + 1 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{name} must be an integer {form} tensor, got {ids.dtype} {tuple(ids.shape)}")
        if ids.shape[-1] > self.config.context_length:
            raise ValueError(f"{name} have {ids.shape[-1]} positions, the model has {self.config.context_length}")

    def _text_hidden(self, ids: torch.Tensor) -> torch.Tensor:
        self._check_ids(ids)
        x = self.token_embedding(ids) + self.text_positions()[: ids.shape[1]].to(self.dtype)
        return self.ln_final(self.transformer(x))

    def encode_text_tokens(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(``t_eot [B, d]``, ``t_loc [B, L, d]``, word mask ``[B, L]``: SOT, EOT and padding excluded)."""
        x = self._text_hidden(ids) @ self.text_projection
        eot = ids.argmax(dim=-1)  # EOT has the largest id in CLIP's vocabulary
        return x[torch.arange(ids.shape[0], device=ids.device), eot], x, word_mask(ids)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """EOT embedding ``[B, d]``; only the EOT rows are projected."""
        x = self._text_hidden(ids)
        eot = ids.argmax(dim=-1)
        return x[torch.arange(ids.shape[0], device=ids.device), eot] @ self.text_projection

    def encode_text_by_length(self, ids: torch.Tensor, chunk: int = SUBCAPTION_CHUNK) -> torch.Tensor:
        """``encode_text`` of many short texts, sorted by length and encoded in chunks, each trimmed to
        its longest text. Exact (the tower is causal and pooled at EOT) and much cheaper when lengths vary:
        a batch's subcaptions are mostly ~14 tokens but its longest is often ~40."""
        lengths = ids.argmax(dim=-1) + 1
        order = torch.argsort(lengths, stable=True)
        parts = []
        for start in range(0, ids.shape[0], chunk):
            index = order[start : start + chunk]
            parts.append(self.encode_text(ids[index, : int(lengths[index].max())]))
        return torch.cat(parts)[torch.argsort(order)]

    def encode_packed_text(
        self, groups: Sequence[torch.Tensor], tokens_of_first: bool = False, attention: str | None = None
    ) -> tuple[list[torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
        """The EOT embeddings of every group of texts, from one pass of the tower over all of them packed.

        ``groups``: integer ``[n_i, L_i]`` id tensors (padded after EOT, as the collator gives them; a
        group may have no row). Each text keeps its real tokens only (up to its EOT, the largest id) and its
        own positions from 0; the tower runs once on their concatenation, attention per text (``attention``
        module, backend ``attention``, by default ``self.text_attention``). Equal to ``encode_text`` of each
        group to fp32 rounding, and with ``tokens_of_first`` to ``encode_text_tokens`` of the first group.

        Returns (``[eot [n_i, d] per group]``, then for ``tokens_of_first`` the first group's projected
        tokens ``[n_0, L_0, d]`` (zeros past EOT) and word mask ``[n_0, L_0]``, else None, None).
        """
        for i, ids in enumerate(groups):
            self._check_ids(ids, f"groups[{i}]")
        real = [torch.arange(ids.shape[1], device=ids.device) <= ids.argmax(dim=-1, keepdim=True) for ids in groups]
        counts = [ids.shape[0] for ids in groups]
        lengths = torch.cat([mask.sum(dim=1) for mask in real])
        sequences = PackedSequences(lengths.tolist(), lengths.device)
        token_ids = torch.cat([ids[mask] for ids, mask in zip(groups, real, strict=True)])
        starts = sequences.cu_seqlens[:-1].long()
        positions = torch.arange(sequences.total, device=lengths.device) - starts.repeat_interleave(lengths)
        # F.embedding, not indexing: its backward sums rows densely, where indexing's is an index_put
        x = self.token_embedding(token_ids) + F.embedding(positions, self.text_positions()).to(self.dtype)
        if attention is not None:
            check_text_attention(attention)
        backend = self.text_attention if attention is None else attention
        x = self.ln_final(self.transformer(x, packed=sequences, attention=backend))
        eot = list((x.index_select(0, starts + lengths - 1) @ self.text_projection).split(counts))
        if not tokens_of_first:
            return eot, None, None
        first_real = real[0]
        first_tokens = x[: int(first_real.sum())] @ self.text_projection
        tokens = first_tokens.new_zeros(*first_real.shape, first_tokens.shape[-1])
        tokens = tokens.masked_scatter(first_real[..., None], first_tokens)
        return eot, tokens, word_mask(groups[0])

    def forward(self, images: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Plain CLIP: (image embeddings, text embeddings), unnormalised."""
        return self.encode_image(images), self.encode_text(ids)

    # ------------------------------------------------------------------ MulCLIP features
    def features(
        self,
        images: torch.Tensor,
        long_ids: torch.Tensor,
        short_ids: torch.Tensor | None = None,
        sub_ids: torch.Tensor | None = None,
        sub_mask: torch.Tensor | None = None,
        need_tokens: bool = True,
        sap_raw_patches: bool = False,
        packed_text: bool = True,
        calibrate: bool = True,
    ) -> MulCLIPFeatures:
        """Everything ``MulCLIPLoss`` consumes for one batch.

        Args:
            images: ``[B, 3, R, R]``.
            long_ids: ``[B, L]`` long-caption ids (L ≤ 248), ideally trimmed to the longest caption.
            short_ids: ``[B, Ls]`` summary ids (77 context) or None.
            sub_ids: ``[B, M, Lsub]`` subcaption ids (77 context) with ``sub_mask [B, M]``, or None.
            need_tokens: compute the calibrated token sets (the global objective does not need them).
            sap_raw_patches: give SAP the raw projected patches ``v_loc`` instead of the calibrated ``V'``.
            calibrate: False leaves out local token calibration: the token sets are the raw patches ``v_loc``
                and the caption's word tokens ``t_loc`` (masked to its words), the "LC off" ablation.
            packed_text: encode every text of the batch in one packed pass (``encode_packed_text``); False
                encodes each group padded, the reference the packed path is tested against.
        """
        # Checked here under the caller's names: past this point they are the packed path's groups[i].
        self._check_ids(long_ids, "long_ids")
        if short_ids is not None:
            self._check_ids(short_ids, "short_ids")
        if sub_ids is not None:
            self._check_ids(sub_ids, "sub_ids", "[B, M, L]")
            if sub_mask is None or sub_mask.dtype != torch.bool or sub_mask.shape != sub_ids.shape[:2]:
                raise ValueError(
                    f"sub_ids {tuple(sub_ids.shape)} needs a bool sub_mask {tuple(sub_ids.shape[:2])}, got "
                    f"{None if sub_mask is None else (sub_mask.dtype, tuple(sub_mask.shape))}"
                )
        v_cls, v_loc = self.encode_image_tokens(images)
        # Only the real subcaptions are encoded (padding slots cost nothing), then scattered back.
        real_subs = None if sub_ids is None else sub_ids[sub_mask]
        if packed_text:
            groups = [g for g in (long_ids, short_ids, real_subs) if g is not None]
            eots, t_loc, words = self.encode_packed_text(groups, tokens_of_first=need_tokens)
            t_eot = eots.pop(0)
            short_eot = None if short_ids is None else eots.pop(0)
            flat_subs = None if sub_ids is None else eots.pop(0)
        else:
            if need_tokens:
                t_eot, t_loc, words = self.encode_text_tokens(long_ids)
            else:
                # Only EOT embeddings are needed: encode in length-sorted chunks (exact, ~25% less padding).
                t_eot = self.encode_text_by_length(long_ids, chunk=max(8, long_ids.shape[0] // 4))
            short_eot = None if short_ids is None else self.encode_text_by_length(short_ids)
            flat_subs = self.encode_text_by_length(real_subs) if sub_ids is not None and sub_mask.any() else None
        if need_tokens and not calibrate:
            image_tokens, text_tokens, has_words = v_loc, t_loc, words
        elif need_tokens:
            image_tokens = self.patch_calibration(v_loc)
            text_tokens = self.word_calibration(t_loc, words)
            # A caption with no word at all (empty text) has no calibrated tokens: mask its row out.
            has_words = words.any(dim=1, keepdim=True).expand(-1, text_tokens.shape[1])
        else:
            image_tokens, text_tokens, has_words = v_loc, v_loc[:, :0], None
        sub_eot = None
        if sub_ids is not None:
            sub_eot = torch.zeros(*sub_mask.shape, self.config.embed_dim, dtype=t_eot.dtype, device=t_eot.device)
            if flat_subs is not None:
                sub_eot = sub_eot.masked_scatter(sub_mask[..., None], flat_subs.to(sub_eot.dtype))
        return MulCLIPFeatures(
            image_cls=v_cls,
            image_tokens=image_tokens,
            text_eot=t_eot,
            text_tokens=text_tokens,
            short_eot=short_eot,
            sub_eot=sub_eot,
            sub_mask=sub_mask,
            image_token_mask=None,
            text_token_mask=has_words,
            sap_tokens=v_loc if (need_tokens and sap_raw_patches and calibrate) else None,
        )

    def num_parameters(self, non_embedding: bool = True) -> int:
        """Parameter count; ``non_embedding`` leaves out the token and positional tables."""
        skip = {"token_embedding.weight", "positional_embedding", "visual.positional_embedding"}
        return sum(p.numel() for n, p in self.named_parameters() if not (non_embedding and n in skip))
