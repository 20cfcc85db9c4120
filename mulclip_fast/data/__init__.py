"""Tokenizer, caption splitting, the synthetic dataset, real dataset formats and batching (docs/training.md, "Data")."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from .collate import Batch, Collator, rank_rows
from .real import (
    HELD_OUT_BY_COUNT,
    READERS,
    SHORT_CAPTION_READERS,
    DataError,
    ImageCaptionFiles,
    ImageCaptions,
    MultiCaptionFiles,
    Record,
    open_real_dataset,
    open_short_caption_dataset,
    read_coco,
    read_dci,
    read_docci,
    read_flickr30k,
    read_sharegpt4v,
    read_urban1k,
)
from .synthetic import SyntheticLongCaptions
from .text import (
    LONG_CONTEXT,
    SHORT_CONTEXT,
    CLIPTokenizer,
    split_sentences,
    subcaptions_of,
    summary_of,
    trim_to_longest,
)

SHORT_CAPTION_SETS = tuple(SHORT_CAPTION_READERS)  # coco, flickr30k: evaluation only
DATA_KINDS = ("synthetic", *READERS, *SHORT_CAPTION_SETS)  # synthetic, docci, sharegpt4v, dci, urban1k, coco, flickr30k

__all__ = [
    "Batch",
    "CLIPTokenizer",
    "Collator",
    "DATA_KINDS",
    "DataError",
    "HELD_OUT_BY_COUNT",
    "ImageCaptionFiles",
    "ImageCaptions",
    "LONG_CONTEXT",
    "MultiCaptionFiles",
    "Record",
    "SHORT_CAPTION_SETS",
    "SHORT_CONTEXT",
    "SummaryCaptions",
    "SyntheticLongCaptions",
    "batch_order",
    "iterate_batches",
    "open_dataset",
    "parse_data_spec",
    "rank_rows",
    "read_coco",
    "read_dci",
    "read_docci",
    "read_flickr30k",
    "read_sharegpt4v",
    "read_urban1k",
    "split_sentences",
    "subcaptions_of",
    "summary_of",
    "trim_to_longest",
]


def parse_data_spec(spec: str) -> tuple[str, str | None]:
    """``"synthetic"`` → (``"synthetic"``, None); ``"docci:PATH"`` → (``"docci"``, PATH); likewise
    ``sharegpt4v:``, ``dci:``, ``urban1k:`` and the short-caption evaluation sets ``coco:`` and
    ``flickr30k:``."""
    kind, _, path = spec.partition(":")
    if kind not in DATA_KINDS:
        forms = ", ".join(f"{k}:PATH" for k in DATA_KINDS[1:])
        raise DataError(f"--data must be synthetic or one of {forms}, got {spec!r}")
    if kind == "synthetic":
        if path:
            raise DataError(f"--data synthetic takes no path, got {spec!r}")
        return kind, None
    if not path:
        raise DataError(f"--data {kind}:PATH needs a path, got {spec!r}")
    if not os.path.exists(path):
        raise DataError(f"data path does not exist: {path}")
    return kind, path


def open_dataset(
    spec: str,
    split: str,
    image_size: int,
    size: int,
    seed: int = 0,
    image_root: str | None = None,
    holdout: int = 1000,
    twin_fraction: float = 0.0,
    captions: str = "long",
) -> torch.utils.data.Dataset:
    """The ``split`` (``train`` / ``val`` / ``test``) of the dataset named by ``spec``.

    ``size`` is the number of synthetic samples (ignored for files); real files hold out their ``test``
    split (all of DCI and Urban1k), or their last ``holdout`` records, for ``val`` / ``test``. COCO and
    Flickr30k give a ``MultiCaptionFiles`` (one item per image, with all its captions) for ``val`` /
    ``test`` and refuse ``train``. ``twin_fraction``: synthetic binding twins (see ``SyntheticLongCaptions``).
    ``captions="short"``: each long caption replaced by its summary (``SummaryCaptions``).
    """
    if captions not in ("long", "short"):
        raise ValueError(f"captions must be 'long' or 'short', got {captions!r}")
    kind, path = parse_data_spec(spec)
    if kind == "synthetic":
        if image_root is not None:  # silently ignoring it would hide a --data typo behind synthetic images
            raise DataError(f"--image-root {image_root} applies to datasets on disk; --data synthetic draws its images")
        dataset = SyntheticLongCaptions(
            size=size, seed=seed, split=split, image_size=image_size, twin_fraction=twin_fraction
        )
    elif kind in SHORT_CAPTION_SETS:  # short captions already, evaluation only
        return open_short_caption_dataset(kind, path, split, image_size, image_root)
    else:
        split = "train" if split == "train" else "test"
        dataset = open_real_dataset(kind, path, split, image_size, image_root, holdout)
    return SummaryCaptions(dataset) if captions == "short" else dataset


class SummaryCaptions(torch.utils.data.Dataset):
    """``dataset`` with every caption (and binding probe) replaced by its summary, its first sentence: the
    short, alt-text-like captions of CLIP-style pretraining. On the synthetic data the summary names the
    objects and their colours but not their sizes, places or relations, which the long caption adds."""

    def __init__(self, dataset: torch.utils.data.Dataset):
        self.dataset = dataset
        self.bad_records = getattr(dataset, "bad_records", [])

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = dict(self.dataset[index])
        item["caption"] = summary_of(item["caption"])
        if item.get("probe"):
            item["probe"] = summary_of(item["probe"])
        return item


def batch_order(n: int, batch_size: int, seed: int, epoch: int, shuffle: bool = True) -> list[list[int]]:
    """The batches of one epoch: a permutation fixed by (seed, epoch), last partial batch dropped.

    ``shuffle=False`` keeps index order: for generated data every index is already an independent draw,
    and neighbouring indices (binding twins) must stay in one batch."""
    if batch_size > n:
        raise DataError(f"batch size {batch_size} is larger than the dataset ({n} samples)")
    if shuffle:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=generator).tolist()
    else:
        order = list(range(n))
    return [order[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


def iterate_batches(
    dataset: torch.utils.data.Dataset,
    collator: Collator,
    batch_size: int,
    seed: int,
    start_step: int = 0,
    num_workers: int = 0,
    shuffle: bool = True,
    rank: int = 0,
    world_size: int = 1,
    accum_steps: int = 1,
    any_rank: Callable[[bool], bool] | None = None,
):
    """Batches from global step ``start_step`` on, forever, epoch after epoch.

    The order is a pure function of (seed, step), so a resumed run sees exactly the batches the
    uninterrupted run would have seen. Yields ``(step, epoch, batch)``.

    With ``world_size > 1`` each batch is rank ``rank``'s rows of the global batch (``rank_rows``), and
    only those samples are read: N ranks read and decode each sample once, not N times. When a rank's rows
    lose an unreadable sample, the rows of every rank would shift, as they do in one process that drops
    it. ``any_rank`` (a collective every rank calls once per batch: whether any rank's flag is set) tells
    every rank; each then reads the whole global batch and takes its rows of the readable samples, with
    every skipped sample listed, or no row when too few are left to split into equal parts.
    """
    per_epoch = len(dataset) // batch_size
    if per_epoch == 0:
        raise DataError(f"batch size {batch_size} is larger than the dataset ({len(dataset)} samples)")
    if world_size > 1 and any_rank is None:
        raise ValueError("iterate_batches over several ranks needs any_rank, the collective that agrees on skips")
    own = rank_rows(batch_size, rank, world_size, accum_steps) if world_size > 1 else None
    epoch, offset = divmod(start_step, per_epoch)
    step = start_step
    while True:
        batches = batch_order(len(dataset), batch_size, seed, epoch, shuffle)[offset:]
        reads = batches if own is None else [[indices[row] for row in own] for indices in batches]
        if num_workers > 0:
            # The workers' base seed from a generator of this epoch's, not from torch's global one: starting
            # them (each epoch, and at a resume step) drew from it, so a resumed run's RNG state strayed.
            loader = torch.utils.data.DataLoader(
                dataset,
                batch_sampler=reads,
                collate_fn=collator,
                num_workers=num_workers,
                persistent_workers=False,
                generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch),
            )
        else:
            loader = (collator([dataset[i] for i in indices]) for indices in reads)
        for indices, batch in zip(batches, loader, strict=True):
            if own is not None and any_rank(bool(batch.skipped)):
                whole = collator([dataset[i] for i in indices])
                enough = len(whole) >= max(2, world_size * accum_steps)
                batch = whole.take(rank_rows(len(whole), rank, world_size, accum_steps) if enough else [])
            yield step, epoch, batch
            step += 1
        epoch, offset = epoch + 1, 0
