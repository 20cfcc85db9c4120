"""Loaders for real long-caption datasets whose files the user brings (DESIGN §7).

* DOCCI: ``docci_descriptions.jsonlines`` — one JSON object per line with ``image_file``,
  ``description`` and ``split`` (``train`` / ``test`` / ``qual_*``) — and an ``images/`` folder.
* ShareGPT4V: a JSON list of ``{"id", "image": "relative/path.jpg", "conversations": [{"from": "human",
  ...}, {"from": "gpt", "value": caption}]}``; image paths are relative to an image root.

Bad records are reported by line / index and skipped; a file with no usable record is an error.
Unreadable or corrupt images are skipped when read and counted with their path (see ``collate``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from .images import load_image


class DataError(ValueError):
    """Bad or unusable dataset input; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Record:
    image_path: str
    caption: str
    split: str | None = None


def _resolve(root: str, relative: str) -> str:
    return relative if os.path.isabs(relative) else os.path.join(root, relative)


def read_docci(path: str, image_root: str | None = None) -> tuple[list[Record], list[str]]:
    """Records of a DOCCI jsonl file (or of the directory holding ``docci_descriptions.jsonlines``)."""
    if os.path.isdir(path):
        candidates = [f for f in sorted(os.listdir(path)) if f.endswith((".jsonl", ".jsonlines"))]
        if not candidates:
            raise DataError(f"no .jsonl / .jsonlines file in the DOCCI directory {path}")
        path = os.path.join(path, candidates[0])
    if not os.path.isfile(path):
        raise DataError(f"DOCCI file not found: {path}")
    base = os.path.dirname(os.path.abspath(path))
    if image_root is None:
        image_root = os.path.join(base, "images") if os.path.isdir(os.path.join(base, "images")) else base
    records, problems = [], []
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                image, caption = obj["image_file"], obj["description"]
                if not isinstance(image, str) or not isinstance(caption, str) or not caption.strip():
                    raise TypeError("image_file and description must be non-empty strings")
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                problems.append(f"{path}:{line_no}: {type(exc).__name__}: {exc}")
                continue
            records.append(Record(_resolve(image_root, image), caption.strip(), obj.get("split")))
    return records, problems


def read_sharegpt4v(path: str, image_root: str | None = None) -> tuple[list[Record], list[str]]:
    """Records of a ShareGPT4V json file; the caption is the first ``gpt`` turn."""
    if not os.path.isfile(path):
        raise DataError(f"ShareGPT4V file not found: {path}")
    image_root = image_root or os.path.dirname(os.path.abspath(path))
    try:
        with open(path, encoding="utf-8") as handle:
            entries = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(entries, list):
        raise DataError(f"{path} must hold a JSON list of records, got {type(entries).__name__}")
    records, problems = [], []
    for index, obj in enumerate(entries):
        try:
            image = obj["image"]
            caption = next(turn["value"] for turn in obj["conversations"] if turn.get("from") == "gpt")
            if not isinstance(image, str) or not isinstance(caption, str) or not caption.strip():
                raise TypeError("image and the gpt turn must be non-empty strings")
        except (KeyError, TypeError, StopIteration, AttributeError) as exc:
            problems.append(f"{path}[{index}]: {type(exc).__name__}: {str(exc) or 'no gpt turn'}")
            continue
        records.append(Record(_resolve(image_root, image), caption.strip()))
    return records, problems


READERS = {"docci": read_docci, "sharegpt4v": read_sharegpt4v}


def split_records(records: list[Record], split: str, holdout: int) -> list[Record]:
    """Training or evaluation records: the file's own split field when it has one (DOCCI's
    ``train``/``test``), otherwise the last ``holdout`` records are held out for evaluation."""
    if any(r.split for r in records):
        wanted = "train" if split == "train" else "test"
        return [r for r in records if r.split == wanted]
    holdout = min(holdout, len(records) // 2)
    return records[: len(records) - holdout] if split == "train" else records[len(records) - holdout :]


class ImageCaptionFiles(torch.utils.data.Dataset):
    """Image–caption records read from local files. An unreadable image gives an item with ``image``
    None and ``error`` set; the collator drops it and counts it with its path."""

    def __init__(self, records: list[Record], image_size: int, source: str):
        self.records, self.image_size, self.source = records, image_size, source

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        item = {"caption": record.caption, "probe": None, "key": record.image_path, "image": None, "error": None}
        try:
            item["image"] = load_image(record.image_path, self.image_size)
        except (OSError, ValueError, SyntaxError) as exc:  # PIL raises these for missing / corrupt files
            item["error"] = f"{type(exc).__name__}: {exc}"
        return item


def open_real_dataset(
    kind: str, path: str, split: str, image_size: int, image_root: str | None = None, holdout: int = 1000
) -> ImageCaptionFiles:
    """The ``split`` part of a DOCCI / ShareGPT4V file, checked to have readable records."""
    if kind not in READERS:
        raise DataError(f"unknown dataset kind {kind!r}; known: synthetic, {', '.join(READERS)}")
    if image_root is not None and not os.path.isdir(image_root):
        raise DataError(f"image root is not a directory: {image_root}")
    records, problems = READERS[kind](path, image_root)
    if not records:
        shown = "; ".join(problems[:3]) or "the file is empty"
        raise DataError(f"{path} has no usable {kind} record ({len(problems)} bad: {shown})")
    chosen = split_records(records, split, holdout)
    if not chosen:
        raise DataError(f"{path} has {len(records)} records but none for the {split!r} split")
    dataset = ImageCaptionFiles(chosen, image_size, source=f"{kind}:{path}")
    dataset.bad_records = problems
    # Fail fast when the images are not where the records say (a wrong image root is the usual cause).
    probe = [dataset[i] for i in range(min(16, len(dataset)))]
    if all(item["image"] is None for item in probe):
        raise DataError(
            f"none of the first {len(probe)} images of {path} can be read, e.g. {probe[0]['key']}: "
            f"{probe[0]['error']}; check the image root (--image-root)"
        )
    return dataset
