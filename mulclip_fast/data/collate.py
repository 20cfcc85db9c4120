"""Batching: tokenise, split into summary and subcaptions, trim padding, drop unreadable images."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .text import LONG_CONTEXT, SHORT_CONTEXT, CLIPTokenizer, split_sentences, summary_of, trim_to_longest


@dataclass
class Batch:
    """One training / evaluation batch.

    ``long_ids [B, L]`` (L ≤ 248), ``short_ids [B, Ls]``, ``sub_ids [B, M, Lsub]`` with ``sub_mask [B, M]``
    (≤ 77 each), all trimmed to their longest row; ``probe_ids`` for the binding probes when every
    sample has one. ``skipped`` lists ``(path, reason)`` of the samples dropped from this batch.
    """

    images: torch.Tensor
    long_ids: torch.Tensor
    short_ids: torch.Tensor
    sub_ids: torch.Tensor
    sub_mask: torch.Tensor
    probe_ids: torch.Tensor | None
    keys: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return self.images.shape[0]

    def shard(self, rank: int, world_size: int) -> Batch:
        """Rows ``rank·n … (rank+1)·n`` of the batch, ``n = ⌊B / world_size⌋``: one micro-batch's slice
        of a batch. When skipped images leave B short of a multiple, the last ``B mod world_size`` rows are
        left out, so that every part has the same size."""
        if len(self) < world_size:
            raise ValueError(f"a batch of {len(self)} cannot be split over {world_size} parts")
        n = len(self) // world_size
        return self.take(slice(rank * n, (rank + 1) * n))

    def take(self, rows: slice | list[int]) -> Batch:
        """The batch's ``rows`` (a slice, or positions in order). Token ids keep the batch's padding,
        which is exact for a causal tower pooled at EOT."""
        index = rows if isinstance(rows, slice) else torch.tensor(rows, dtype=torch.long)
        part = lambda t: None if t is None else t[index]  # noqa: E731
        return Batch(
            part(self.images),
            part(self.long_ids),
            part(self.short_ids),
            part(self.sub_ids),
            part(self.sub_mask),
            part(self.probe_ids),
            self.keys[rows] if isinstance(rows, slice) else [self.keys[i] for i in rows],
            self.skipped,
        )

    def to(self, device: torch.device | str) -> Batch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(
            move(self.images),
            move(self.long_ids),
            move(self.short_ids),
            move(self.sub_ids),
            move(self.sub_mask),
            move(self.probe_ids),
            self.keys,
            self.skipped,
        )


def rank_rows(batch_size: int, rank: int, world_size: int, accum_steps: int = 1) -> list[int]:
    """Positions, in a global batch of ``batch_size`` rows, of the rows rank ``rank`` trains on.

    Micro-batch by micro-batch: of each of the ``accum_steps`` micro-batches (``Batch.shard(micro,
    accum_steps)``), the rank's slice (``.shard(rank, world_size)``). Splitting into micro-batches before
    ranks makes N ranks compute exactly what one process does with the same ``accum_steps``; the rank's
    rows are then its micro-batch parts in order, so ``shard(micro, accum_steps)`` of them gives each back."""
    micro = batch_size // accum_steps
    per_rank = micro // world_size
    return [m * micro + rank * per_rank + row for m in range(accum_steps) for row in range(per_rank)]


class Collator:
    """Turns dataset items into a ``Batch``. Picklable, so it works in DataLoader workers.

    ``long_context``: the text positions of the model, which long captions and probes are truncated to
    (EOT kept): 248 for Long-CLIP's stretched table, 77 for a CLIP as pretrained on short captions.
    Summaries and subcaptions take at most 77. ``with_probes=False`` leaves ``probe_ids`` None (training reads
    no probe, and tokenising them is a long caption's worth of work per sample).
    """

    def __init__(
        self,
        max_subcaptions: int = 8,
        with_subcaptions: bool = True,
        long_context: int = LONG_CONTEXT,
        with_probes: bool = True,
    ):
        if max_subcaptions < 1:
            raise ValueError(f"max_subcaptions must be >= 1, got {max_subcaptions}")
        if long_context < 2:
            raise ValueError(f"long_context must be >= 2 (SOT and EOT), got {long_context}")
        self.max_subcaptions = max_subcaptions
        self.with_subcaptions = with_subcaptions
        self.with_probes = with_probes
        self.long_context = long_context
        self.short_context = min(SHORT_CONTEXT, long_context)
        self._tokenizer = None

    @property
    def tokenizer(self) -> CLIPTokenizer:
        if self._tokenizer is None:  # created lazily: the Rust tokenizer object is not picklable
            self._tokenizer = CLIPTokenizer()
        return self._tokenizer

    def __getstate__(self):
        return {**self.__dict__, "_tokenizer": None}

    def __call__(self, items: list[dict]) -> Batch:
        skipped = [(it["key"], it.get("error") or "unreadable") for it in items if it["image"] is None]
        items = [it for it in items if it["image"] is not None]
        if not items:
            empty = torch.zeros(0, 2, dtype=torch.long)
            no_subs = torch.zeros(0, 1, dtype=torch.bool)
            return Batch(torch.zeros(0, 3, 1, 1), empty, empty, empty[:, None], no_subs, None, [], skipped)
        tok = self.tokenizer
        captions = [it["caption"] for it in items]
        long_ids = trim_to_longest(tok.tokenize(captions, self.long_context))
        if self.with_subcaptions:  # one sentence split per caption gives both (summary_of, subcaptions_of)
            sentences = [split_sentences(c) for c in captions]
            summaries = [s[0] if s else "" for s in sentences]
            subs = [s[: self.max_subcaptions] for s in sentences]
        else:
            summaries = [summary_of(c) for c in captions]
            subs = [[] for _ in captions]
        short_ids = trim_to_longest(tok.tokenize(summaries, self.short_context))
        m = max(1, max(len(s) for s in subs))
        flat = tok.tokenize([s for per in subs for s in per], self.short_context)
        sub_ids = torch.zeros(len(items), m, self.short_context, dtype=torch.long)
        sub_mask = torch.zeros(len(items), m, dtype=torch.bool)
        for b, per in enumerate(subs):
            sub_mask[b, : len(per)] = True
        sub_ids[sub_mask] = flat
        probe_ids = None
        if self.with_probes and all(it.get("probe") for it in items):
            probe_ids = trim_to_longest(tok.tokenize([it["probe"] for it in items], self.long_context))
        return Batch(
            images=torch.stack([it["image"] for it in items]),
            long_ids=long_ids,
            short_ids=short_ids,
            sub_ids=trim_to_longest(sub_ids),
            sub_mask=sub_mask,
            probe_ids=probe_ids,
            keys=[it["key"] for it in items],
            skipped=skipped,
        )
