"""Loaders for real long-caption datasets whose files the user brings (docs/training.md, "Real data").

* DOCCI: ``docci_descriptions.jsonlines`` — one JSON object per line with ``image_file``,
  ``description`` and ``split`` (``train`` / ``test`` / ``qual_*``) — and an ``images/`` folder.
* ShareGPT4V: a JSON list of ``{"id", "image": "relative/path.jpg", "conversations": [{"from": "human",
  ...}, {"from": "gpt", "value": caption}]}``; image paths are relative to an image root.
* DCI (Densely Captioned Images): a ``densely_captioned_images/`` folder with ``annotations/*.json`` (one
  JSON object per image) and ``photos/``. Evaluation set: every record is a ``test`` record.
* Urban1k (Long-CLIP's benchmark): a folder with ``image/N.jpg`` and ``caption/N.txt``, paired by file
  stem. Evaluation set: every record is a ``test`` record.

Short-caption evaluation sets (about five captions per image; docs/training.md, "Short-caption sets"),
read into ``ImageCaptions`` (one image, all its captions):

* COCO: ``captions_val2017.json`` style (``images`` with ``id`` and ``file_name``, ``annotations`` with
  ``image_id`` and ``caption``), or Karpathy's ``dataset_coco.json`` (``images`` with ``filepath``,
  ``filename``, ``split`` and ``sentences: [{raw}]``).
* Flickr30k: Karpathy's ``dataset_flickr30k.json`` (the same layout, no ``filepath``) and
  ``flickr30k-images/``.

Bad records are reported by line / index / path and skipped; a source with no usable record is an error.
Unreadable or corrupt images are skipped when read and counted with their path (see ``collate``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from .images import try_load_image

# Annotation files are read as "utf-8-sig": UTF-8 that may begin with a byte-order mark, as Windows editors
# and exports write it. Plain "utf-8" keeps the mark as U+FEFF, which json rejects ("Unexpected UTF-8 BOM"),
# so a BOM'd file would lose its first record or be refused whole. Without a mark the two codecs agree.
TEXT_ENCODING = "utf-8-sig"


class DataError(ValueError):
    """Bad or unusable dataset input; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Record:
    image_path: str
    caption: str
    split: str | None = None


def _resolve(root: str, relative: str) -> str:
    return relative if os.path.isabs(relative) else os.path.join(root, relative)


DOCCI_DESCRIPTIONS = "docci_descriptions.jsonlines"


def read_docci(path: str, image_root: str | None = None) -> tuple[list[Record], list[str]]:
    """Records of a DOCCI jsonl file (or of the directory holding ``docci_descriptions.jsonlines``)."""
    if os.path.isdir(path):
        candidates = [f for f in sorted(os.listdir(path)) if f.endswith((".jsonl", ".jsonlines"))]
        if not candidates:
            raise DataError(f"no .jsonl / .jsonlines file in the DOCCI directory {path}")
        # DOCCI's own file when it is there: the first by name could be any other file the folder holds
        # (DOCCI ships docci_metadata.jsonlines beside it), read without a word.
        if DOCCI_DESCRIPTIONS in candidates:
            candidates = [DOCCI_DESCRIPTIONS]
        if len(candidates) > 1:
            raise DataError(
                f"the DOCCI directory {path} has no {DOCCI_DESCRIPTIONS} and several other files: "
                f"{', '.join(candidates)}; pass one as docci:FILE (with --image-root)"
            )
        path = os.path.join(path, candidates[0])
    if not os.path.isfile(path):
        raise DataError(f"DOCCI file not found: {path}")
    base = os.path.dirname(os.path.abspath(path))
    if image_root is None:
        image_root = os.path.join(base, "images") if os.path.isdir(os.path.join(base, "images")) else base
    records, problems = [], []
    # Bytes, decoded line by line: one badly encoded line is a bad record, not the end of the file. Each line
    # may start with a BOM (the file's first, or one inside a file concatenated from BOM'd files).
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode(TEXT_ENCODING))
                image, caption = obj["image_file"], obj["description"]
                if not isinstance(image, str) or not isinstance(caption, str) or not caption.strip():
                    raise TypeError("image_file and description must be non-empty strings")
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
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
        with open(path, encoding=TEXT_ENCODING) as handle:
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


def read_dci(path: str, image_root: str | None = None) -> tuple[list[Record], list[str]]:
    """Records of DCI (facebookresearch/DCI): ``path`` is the ``densely_captioned_images`` folder or
    the folder holding it.

    Each ``annotations/*.json`` is one image: ``image`` (file name relative to ``photos/``, or to
    ``image_root``), ``short_caption`` and ``extra_caption``; its other fields (``mask_data``,
    ``mask_keys``, ``summaries``, ``negatives``) are not read. The caption is ``short_caption`` and
    ``extra_caption`` joined by a newline: the long caption of DCI's own ``get_extended_caption`` and of
    the long-caption retrieval evaluations (LoTLIP's DCI loader builds it the same way). A period is added
    to a short caption without sentence-ending punctuation so that the summary (the first sentence, used
    by the ``short_*`` metrics) is the short caption. Those evaluations use the images of every split in
    ``splits.json``, so every annotation file is read and every record is a ``test`` record: DCI is an
    evaluation set here.
    """
    root = path
    if not os.path.isdir(os.path.join(root, "annotations")):
        root = os.path.join(path, "densely_captioned_images")
    annotations = os.path.join(root, "annotations")
    if not os.path.isdir(annotations):
        raise DataError(
            f"no DCI annotations folder in {path}: expected {path}/annotations or "
            f"{path}/densely_captioned_images/annotations"
        )
    if image_root is None:
        image_root = os.path.join(root, "photos")
        if not os.path.isdir(image_root):
            raise DataError(
                f"DCI photos folder not found: {image_root} (extract SA-1B's sa_000138.tar there, or pass --image-root)"
            )
    records, problems = [], []
    for name in sorted(f for f in os.listdir(annotations) if f.endswith(".json")):
        file = os.path.join(annotations, name)
        try:
            with open(file, encoding=TEXT_ENCODING) as handle:
                obj = json.load(handle)
            if not isinstance(obj, dict):
                raise TypeError(f"expected a JSON object, got {type(obj).__name__}")
            image, short, extra = obj["image"], obj["short_caption"], obj["extra_caption"]
            if not all(isinstance(v, str) for v in (image, short, extra)) or not image:
                raise TypeError("image, short_caption and extra_caption must be strings, image non-empty")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            problems.append(f"{file}: {type(exc).__name__}: {exc}")
            continue
        short, extra = short.strip(), extra.strip()
        if short and not short.endswith((".", "!", "?")):
            short += "."
        caption = f"{short}\n{extra}".strip()
        if not caption:
            problems.append(f"{file}: empty caption (short_caption and extra_caption are blank)")
            continue
        image_path = _resolve(image_root, image)
        if not os.path.isfile(image_path):
            problems.append(f"{file}: image not found: {image_path}")
            continue
        records.append(Record(image_path, caption, "test"))
    return records, problems


URBAN1K_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def _stem_order(stem: str) -> tuple:
    """Numeric stems (Urban1k's ``1`` … ``1000``) in numeric order, then the others by name."""
    return (0, int(stem), "") if stem.isdigit() else (1, 0, stem)


def read_urban1k(path: str, image_root: str | None = None) -> tuple[list[Record], list[str]]:
    """Records of Urban1k: ``path`` holds ``caption/STEM.txt`` (the long caption, UTF-8) and
    ``image/STEM.jpg`` (or .jpeg/.png/.webp/.bmp; ``image_root`` replaces ``image/``), paired by stem.

    The caption is the whole file, stripped (Long-CLIP's evaluation reads only its first line; the two
    agree on one-line caption files). A caption without an image, an image without a caption, two images for one
    stem, an unreadable or empty caption file are reported and skipped. Urban1k is an evaluation set:
    every record is a ``test`` record.
    """
    if not os.path.isdir(path):
        raise DataError(f"Urban1k path must be a folder holding image/ and caption/, got {path}")
    caption_dir = os.path.join(path, "caption")
    image_dir = image_root or os.path.join(path, "image")
    for folder in (caption_dir, image_dir):
        if not os.path.isdir(folder):
            raise DataError(f"Urban1k folder not found: {folder}")
    images: dict[str, list[str]] = {}
    for name in os.listdir(image_dir):
        stem, suffix = os.path.splitext(name)
        if suffix.lower() in URBAN1K_IMAGE_SUFFIXES and os.path.isfile(os.path.join(image_dir, name)):
            images.setdefault(stem, []).append(name)
    captions = {
        os.path.splitext(name)[0]: name
        for name in os.listdir(caption_dir)
        if name.endswith(".txt") and os.path.isfile(os.path.join(caption_dir, name))
    }
    records, problems = [], []
    for stem in sorted(set(captions) | set(images), key=_stem_order):
        if stem not in captions:
            problems.append(f"{os.path.join(image_dir, images[stem][0])}: no caption file {stem}.txt in {caption_dir}")
            continue
        file = os.path.join(caption_dir, captions[stem])
        if stem not in images:
            problems.append(f"{file}: no image {stem}.jpg (or .jpeg/.png/.webp/.bmp) in {image_dir}")
            continue
        if len(images[stem]) > 1:
            problems.append(f"{file}: several images for one caption in {image_dir}: {sorted(images[stem])}")
            continue
        try:
            with open(file, encoding=TEXT_ENCODING) as handle:
                caption = handle.read().strip()
        except UnicodeDecodeError as exc:
            problems.append(f"{file}: UnicodeDecodeError: {exc}")
            continue
        if not caption:
            problems.append(f"{file}: empty caption")
            continue
        records.append(Record(os.path.join(image_dir, images[stem][0]), caption, "test"))
    return records, problems


READERS = {"docci": read_docci, "sharegpt4v": read_sharegpt4v, "dci": read_dci, "urban1k": read_urban1k}
EVALUATION_SETS = ("dci", "urban1k")
# Sources without a split of their own: a run holds out their last ``holdout`` records (its --eval-pairs) and
# trains on the rest, so that number decides what is trained on as much as what is evaluated.
HELD_OUT_BY_COUNT = ("sharegpt4v",)


@dataclass(frozen=True)
class ImageCaptions:
    """One image of a short-caption set and all its captions (COCO and Flickr30k have about five)."""

    image_path: str
    captions: tuple[str, ...]
    split: str | None = None


def _load_json_object(path: str, label: str) -> dict:
    if not os.path.isfile(path):
        raise DataError(f"{label} file not found: {path}")
    try:
        with open(path, encoding=TEXT_ENCODING) as handle:
            obj = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("images"), list):
        raise DataError(f"{path} must hold a JSON object with an 'images' list ({label} layout)")
    return obj


def _caption_text(value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise TypeError("the caption must be a non-empty string")
    return value.strip()


def _read_karpathy(path: str, obj: dict, image_root: str) -> tuple[list[ImageCaptions], list[str]]:
    """Karpathy's split files: ``images[i]`` has ``filename``, ``split``, ``sentences: [{raw}]`` and, for
    COCO, ``filepath`` (the image is ``image_root/filepath/filename``). A bad sentence is reported and
    skipped; an image with no usable sentence is reported and skipped. Image files are not checked here:
    the file lists every split, and a user may hold only the images of the split evaluated."""
    records, problems = [], []
    for index, entry in enumerate(obj["images"]):
        where = f"{path}: images[{index}]"
        try:
            if not isinstance(entry, dict):
                raise TypeError(f"expected a JSON object, got {type(entry).__name__}")
            filename, split, sentences = entry["filename"], entry["split"], entry["sentences"]
            filepath = entry.get("filepath", "")
            if not all(isinstance(v, str) for v in (filename, split, filepath)) or not filename:
                raise TypeError("filename, split and filepath must be strings, filename non-empty")
            if not isinstance(sentences, list):
                raise TypeError(f"sentences must be a list, got {type(sentences).__name__}")
        except (KeyError, TypeError) as exc:
            problems.append(f"{where}: {type(exc).__name__}: {exc}")
            continue
        captions = []
        for number, sentence in enumerate(sentences):
            try:
                captions.append(_caption_text(sentence["raw"]))
            except (KeyError, TypeError) as exc:
                problems.append(f"{where}.sentences[{number}]: {type(exc).__name__}: {exc}")
        if not captions:
            problems.append(f"{where}: no usable caption")
            continue
        records.append(ImageCaptions(os.path.join(image_root, filepath, filename), tuple(captions), split))
    return records, problems


def _coco_image_root(path: str) -> str:
    """``captions_val2017.json``'s images: ``val2017/`` beside the file or beside its folder (COCO's own
    ``annotations/`` layout); the file's folder for a file not named ``captions_*.json``."""
    base = os.path.dirname(os.path.abspath(path))
    name = os.path.splitext(os.path.basename(path))[0]
    if not name.startswith("captions_"):
        return base
    candidates = [os.path.join(folder, name[len("captions_") :]) for folder in (base, os.path.dirname(base))]
    for candidate in candidates:
        if os.path.isdir(candidate):
            return candidate
    raise DataError(f"COCO image folder not found: looked for {' and '.join(candidates)}; pass --image-root")


def _read_coco_captions(path: str, obj: dict, image_root: str) -> tuple[list[ImageCaptions], list[str]]:
    """COCO's own captions files: an image's captions are the annotations with its ``image_id``, in file
    order. The file has no split: every image is an evaluation image."""
    if not isinstance(obj["annotations"], list):
        raise DataError(f"{path}: 'annotations' must be a list, got {type(obj['annotations']).__name__}")
    problems, files, captions = [], {}, {}
    for index, entry in enumerate(obj["images"]):
        try:
            image_id, file_name = entry["id"], entry["file_name"]
            if not isinstance(image_id, int) or not isinstance(file_name, str) or not file_name:
                raise TypeError("id must be an integer and file_name a non-empty string")
            if image_id in files:
                raise ValueError(f"id {image_id} is used by an earlier image")
        except (KeyError, TypeError, ValueError) as exc:
            problems.append(f"{path}: images[{index}]: {type(exc).__name__}: {exc}")
            continue
        files[image_id], captions[image_id] = file_name, []
    for index, entry in enumerate(obj["annotations"]):
        try:
            image_id = entry["image_id"]
            caption = _caption_text(entry["caption"])
            if image_id not in files:
                raise KeyError(f"image_id {image_id!r} is not among the usable images")
        except (KeyError, TypeError) as exc:
            problems.append(f"{path}: annotations[{index}]: {type(exc).__name__}: {exc}")
            continue
        captions[image_id].append(caption)
    records = []
    for image_id, file_name in files.items():
        if captions[image_id]:
            records.append(ImageCaptions(_resolve(image_root, file_name), tuple(captions[image_id])))
        else:
            problems.append(f"{path}: image id {image_id} ({file_name}): no caption")
    return records, problems


def read_coco(path: str, image_root: str | None = None) -> tuple[list[ImageCaptions], list[str]]:
    """Images and captions of a COCO captions file (``captions_val2017.json`` style, recognised by its
    ``annotations`` list) or of Karpathy's ``dataset_coco.json``. Image folder: ``image_root``, else for
    the captions file ``val2017/`` (the part after ``captions_``) beside the file or beside its folder, for
    Karpathy's file the file's folder (``filepath/filename`` below it)."""
    obj = _load_json_object(path, "COCO")
    if "annotations" in obj:
        return _read_coco_captions(path, obj, image_root or _coco_image_root(path))
    return _read_karpathy(path, obj, image_root or os.path.dirname(os.path.abspath(path)))


def read_flickr30k(path: str, image_root: str | None = None) -> tuple[list[ImageCaptions], list[str]]:
    """Images and captions of Karpathy's ``dataset_flickr30k.json``; images in ``flickr30k-images/``
    beside it, or in ``image_root``."""
    obj = _load_json_object(path, "Flickr30k")
    if image_root is None:
        image_root = os.path.join(os.path.dirname(os.path.abspath(path)), "flickr30k-images")
        if not os.path.isdir(image_root):
            raise DataError(f"Flickr30k image folder not found: {image_root}; pass --image-root")
    return _read_karpathy(path, obj, image_root)


SHORT_CAPTION_READERS = {"coco": read_coco, "flickr30k": read_flickr30k}


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
        image, error = try_load_image(record.image_path, self.image_size)
        return {"caption": record.caption, "probe": None, "key": record.image_path, "image": image, "error": error}


class MultiCaptionFiles(torch.utils.data.Dataset):
    """The images of a short-caption set; item ``i`` is image ``i`` with all its captions. An unreadable
    image gives ``image`` None and ``error`` set, and its captions drop out of the evaluation."""

    def __init__(self, records: list[ImageCaptions], image_size: int, source: str):
        self.records, self.image_size, self.source = records, image_size, source

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        image, error = try_load_image(record.image_path, self.image_size)
        return {"captions": list(record.captions), "key": record.image_path, "image": image, "error": error}


def _check_first_images(dataset, path: str) -> None:
    """Fail fast when the images are not where the records say (a wrong image root is the usual cause)."""
    probe = [dataset[i] for i in range(min(16, len(dataset)))]
    if all(item["image"] is None for item in probe):
        raise DataError(
            f"none of the first {len(probe)} images of {path} can be read, e.g. {probe[0]['key']}: "
            f"{probe[0]['error']}; check the image root (--image-root)"
        )


def open_short_caption_dataset(
    kind: str, path: str, split: str, image_size: int, image_root: str | None = None
) -> MultiCaptionFiles:
    """The ``split`` (``val`` / ``test``) images of a COCO / Flickr30k source: Karpathy's split of that
    name, or every image of a file without splits (COCO's captions files). These are evaluation sets:
    ``train`` is refused. An image of the split whose file is missing is reported and skipped."""
    if kind not in SHORT_CAPTION_READERS:
        raise DataError(f"unknown short-caption set {kind!r}; known: {', '.join(SHORT_CAPTION_READERS)}")
    if split not in ("val", "test"):
        raise DataError(
            f"{kind} is a short-caption evaluation set (about five captions per image), not training data for "
            f"MulCLIP's long-caption objective: use it with python -m mulclip_fast.eval (split {split!r} given)"
        )
    if image_root is not None and not os.path.isdir(image_root):
        raise DataError(f"image root is not a directory: {image_root}")
    records, problems = SHORT_CAPTION_READERS[kind](path, image_root)
    if not records:
        shown = "; ".join(problems[:3]) or "no records found"
        raise DataError(f"{path} has no usable {kind} image ({len(problems)} bad: {shown})")
    if any(r.split is not None for r in records):
        chosen = [r for r in records if r.split == split]
        if not chosen:
            found = sorted({r.split for r in records})
            raise DataError(f"{path} has {len(records)} images but none in the {split!r} split (splits: {found})")
    else:
        chosen = records
    present = [os.path.isfile(r.image_path) for r in chosen]
    problems += [f"{path}: image not found: {r.image_path}" for r, ok in zip(chosen, present, strict=True) if not ok]
    if not any(present):
        raise DataError(
            f"none of the {len(chosen)} {split} images of {path} exists, e.g. {chosen[0].image_path}; "
            "check the image root (--image-root)"
        )
    chosen = [r for r, ok in zip(chosen, present, strict=True) if ok]
    dataset = MultiCaptionFiles(chosen, image_size, source=f"{kind}:{path}")
    dataset.bad_records = problems
    _check_first_images(dataset, path)
    return dataset


def open_real_dataset(
    kind: str, path: str, split: str, image_size: int, image_root: str | None = None, holdout: int = 1000
) -> ImageCaptionFiles:
    """The ``split`` part of a DOCCI / ShareGPT4V / DCI / Urban1k source, checked to have readable records."""
    if kind not in READERS:
        raise DataError(f"unknown dataset kind {kind!r}; known: synthetic, {', '.join(READERS)}")
    if image_root is not None and not os.path.isdir(image_root):
        raise DataError(f"image root is not a directory: {image_root}")
    records, problems = READERS[kind](path, image_root)
    if not records:
        shown = "; ".join(problems[:3]) or "no records found"
        raise DataError(f"{path} has no usable {kind} record ({len(problems)} bad: {shown})")
    chosen = split_records(records, split, holdout)
    if not chosen:
        hint = (
            f"; {kind} is an evaluation set (every record is a test record): use it with python -m mulclip_fast.eval"
            if kind in EVALUATION_SETS
            else ""
        )
        raise DataError(f"{path} has {len(records)} records but none for the {split!r} split{hint}")
    dataset = ImageCaptionFiles(chosen, image_size, source=f"{kind}:{path}")
    dataset.bad_records = problems
    _check_first_images(dataset, path)
    return dataset
