"""Fine-grained evaluation of the synthetic data, and zero-shot classification (docs/training.md, "Evaluation").

On a synthetic split: hard-negative accuracy per kind of one-detail change (``hardneg_*``), subcaption
grounding (``grounding_r1/r5``), the compositional split (``compositional_*``) and zero-shot shape
classification (``zeroshot_synthetic_acc``). On an ``ImageFolder`` directory: zero-shot top-1/top-5.
Every score is a cosine between L2-normalised embeddings, and a tie always counts against the true item.

The metrics take an *encoder*: an object with ``images(tensor [N, 3, R, R]) -> [N, d]`` and
``texts(list[str]) -> [N, d]`` returning L2-normalised rows. ``ClipEncoder`` wraps a ``CLIP`` model.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from .data import CLIPTokenizer, DataError, SyntheticLongCaptions
from .data.hard_negatives import HARD_NEGATIVE_KINDS, hard_negatives
from .data.images import try_load_image
from .data.synthetic import CELLS, COLOURS, SHAPES, SIZES, SPLITS, SceneObject, object_sentence
from .model import CLIP

# CLIP's prompt ensembling: the class embedding is the normalised mean of the templates' embeddings.
ZEROSHOT_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a drawing of a {}.")
ZEROSHOT_SYNTHETIC_IMAGES = 120  # single-object images, 20 per shape
TEXT_CHUNK = 64  # texts per pass of ClipEncoder.texts, after sorting by length


class ClipEncoder:
    """L2-normalised ``CLIP`` embeddings in batches, in eval mode without gradients (texts truncated to the
    model's context, EOT kept: 248 positions, or 77 for a model as pretrained on short captions)."""

    def __init__(self, model: CLIP, device: str | torch.device = "cpu", batch_size: int = 250):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.device, self.batch_size = model, device, batch_size
        self.tokenizer = CLIPTokenizer()

    @torch.no_grad()
    def _encode(self, rows, encode, chunk: int | None = None) -> torch.Tensor:
        """``encode`` of ``rows`` in chunks of ``chunk`` rows (default ``batch_size``), in eval mode,
        normalised, on the CPU."""
        chunk = chunk or self.batch_size
        was_training = self.model.training
        self.model.eval()
        try:
            chunks = [
                F.normalize(encode(rows[i : i + chunk]).float(), dim=-1).cpu() for i in range(0, len(rows), chunk)
            ]
        finally:
            self.model.train(was_training)
        return torch.cat(chunks)

    def images(self, images: torch.Tensor) -> torch.Tensor:
        return self._encode(images, lambda x: self.model.encode_image(x.to(self.device)))

    def texts(self, texts: list[str]) -> torch.Tensor:
        """Sorted by length and encoded in chunks of at most ``TEXT_CHUNK`` (and ``batch_size``) texts, each
        trimmed to its longest (``CLIP.encode_text_by_length``): the hard negatives are long captions of
        ~120 to ~240 tokens, and chunks of 250 in the given order, padded to their longest and attended
        through a dense ALiBi mask, cost twice the work."""
        ids = self.tokenizer.tokenize(list(texts), self.model.config.context_length)
        chunk = min(self.batch_size, TEXT_CHUNK)

        def encode(rows: torch.Tensor) -> torch.Tensor:
            return self.model.encode_text_by_length(rows.to(self.device), chunk)

        # All of them in one call: encode_text_by_length sorts the whole set by length and chunks it itself.
        return self._encode(ids, encode, chunk=max(1, len(ids)))


def strict_win_rate(image: torch.Tensor, true_text: torch.Tensor, negative_text: torch.Tensor) -> float:
    """Fraction of rows where ``⟨image, true⟩ > ⟨image, negative⟩`` (rows already L2-normalised)."""
    if not image.shape == true_text.shape == negative_text.shape or image.dim() != 2 or image.shape[0] == 0:
        raise ValueError("image, true_text and negative_text must be non-empty [N, d] tensors of one shape")
    return float(((image * true_text).sum(-1) > (image * negative_text).sum(-1)).float().mean())


def hard_negative_accuracy(
    encoder,
    dataset: SyntheticLongCaptions,
    image: torch.Tensor,
    caption: torch.Tensor,
    probe: torch.Tensor,
    kinds=HARD_NEGATIVE_KINDS,
) -> dict:
    """``hardneg_<kind>`` for each of ``kinds`` (of ``HARD_NEGATIVE_KINDS``) and their mean ``hardneg_mean``:
    the share of images whose true caption scores strictly above that kind's negative.

    ``image``, ``caption`` and ``probe`` (the binding negatives, already embedded by the caller): normalised
    embeddings of the first ``len(image)`` samples of ``dataset``, in order."""
    n = image.shape[0]
    if not 0 < n <= len(dataset) or not image.shape == caption.shape == probe.shape:
        raise ValueError(
            f"image, caption and probe must be [n, d] embeddings of the first n <= {len(dataset)} samples, "
            f"got {tuple(image.shape)}, {tuple(caption.shape)}, {tuple(probe.shape)}"
        )
    if not kinds or not set(kinds) <= set(HARD_NEGATIVE_KINDS):
        raise ValueError(f"kinds must be some of {HARD_NEGATIVE_KINDS}, got {kinds!r}")
    encoded = [kind for kind in kinds if kind != "binding"]
    negatives = [hard_negatives(dataset, i) for i in range(n)]
    texts = [neg[kind] for kind in encoded for neg in negatives]
    embedded = encoder.texts(texts).reshape(len(encoded), n, -1) if encoded else None
    out = {f"hardneg_{kind}": strict_win_rate(image, caption, embedded[k]) for k, kind in enumerate(encoded)}
    if "binding" in kinds:
        out["hardneg_binding"] = strict_win_rate(image, caption, probe)
    out = {f"hardneg_{kind}": out[f"hardneg_{kind}"] for kind in kinds}
    out["hardneg_mean"] = float(np.mean(list(out.values())))
    out["hardneg_pairs"] = n
    return out


def grounding_recall(encoder, dataset: SyntheticLongCaptions, image: torch.Tensor, ks=(1, 5)) -> dict:
    """Image retrieval from one object sentence of a caption ("In the top left there is a small red circle.").

    A sentence can describe several test images (the same object in the same cell), so each distinct
    sentence is one query and every image whose scene has that object counts as correct: its rank is the
    number of images *without* it that score at least as high as the best image with it. ``grounding_r<k>``
    is the share of queries with rank < k; ``grounding_queries`` their number. ``image``: the normalised
    embeddings of every sample of ``dataset``."""
    if image.dim() != 2 or image.shape[0] != len(dataset):
        raise ValueError(f"image must be [{len(dataset)}, d] embeddings of the dataset, got {tuple(image.shape)}")
    holders: dict[str, list[int]] = {}
    for i in range(len(dataset)):
        for obj in dataset.scene(i):
            holders.setdefault(object_sentence(obj), []).append(i)
    sentences = sorted(holders)
    sim = encoder.texts(sentences) @ image.T
    positive = torch.zeros_like(sim, dtype=torch.bool)
    for q, sentence in enumerate(sentences):
        positive[q, holders[sentence]] = True
    best = sim.masked_fill(~positive, float("-inf")).max(dim=1, keepdim=True).values
    rank = ((sim >= best) & ~positive).sum(dim=1)
    out = {f"grounding_r{k}": float((rank < k).float().mean()) for k in ks}
    out["grounding_queries"] = len(sentences)
    return out


def compositional_split(dataset: SyntheticLongCaptions, size: int) -> SyntheticLongCaptions:
    """``size`` scenes of the ``compositional`` split with ``dataset``'s seed, image size, object counts and
    held-out combinations: every scene shows a colour–shape combination the train split never does."""
    return SyntheticLongCaptions(
        size,
        seed=dataset.seed,
        split="compositional",
        image_size=dataset.image_size,
        min_objects=dataset.min_objects,
        max_objects=dataset.max_objects,
        held_out_combinations=dataset.held_out_combinations,
    )


def class_embeddings(encoder, classes: list[str], templates=ZEROSHOT_TEMPLATES) -> torch.Tensor:
    """``[C, d]``: per class, the normalised mean of its prompts' normalised embeddings (CLIP's ensembling)."""
    if not classes or not templates:
        raise ValueError("classes and templates must not be empty")
    prompts = [template.format(name) for name in classes for template in templates]
    return F.normalize(encoder.texts(prompts).reshape(len(classes), len(templates), -1).mean(dim=1), dim=-1)


def topk_accuracy(image: torch.Tensor, classes: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Share of images whose class is among the ``k`` best-scoring classes; a class scoring the same as the
    true one counts as above it."""
    if image.dim() != 2 or classes.dim() != 2 or labels.shape != (image.shape[0],) or image.shape[0] == 0:
        raise ValueError("image [N, d], classes [C, d] and labels [N] must match and be non-empty")
    if not 1 <= k <= classes.shape[0]:
        raise ValueError(f"k must be in [1, {classes.shape[0]}] (the number of classes), got {k}")
    sim = image @ classes.T
    rank = (sim >= sim.gather(1, labels[:, None])).sum(dim=1) - 1
    return float((rank < k).float().mean())


def single_object_scenes(dataset: SyntheticLongCaptions, n: int) -> list[tuple[list[SceneObject], int]]:
    """``n`` one-object scenes, shapes in turn (``SHAPES[i % 6]``), colour, size and cell drawn from a stream
    of (seed, split, i), each with the sample index whose pixel noise renders it (``dataset.image``)."""
    scenes = []
    for i in range(n):
        rng = np.random.default_rng([dataset.seed, SPLITS[dataset.split], i, 5])
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        obj = SceneObject(SHAPES[i % len(SHAPES)], colour, SIZES[int(rng.integers(2))], int(rng.integers(len(CELLS))))
        scenes.append(([obj], i))
    return scenes


def zeroshot_synthetic(encoder, dataset: SyntheticLongCaptions, n: int = ZEROSHOT_SYNTHETIC_IMAGES) -> dict:
    """``zeroshot_synthetic_acc``: top-1 accuracy of naming the shape of ``n`` single-object images from
    prompts (``ZEROSHOT_TEMPLATES`` with the 6 shape names; chance 1/6)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    scenes = single_object_scenes(dataset, n)
    image = encoder.images(torch.stack([dataset.image(objects, i) for objects, i in scenes]))
    labels = torch.tensor([SHAPES.index(objects[0].shape) for objects, _ in scenes])
    return {"zeroshot_synthetic_acc": topk_accuracy(image, class_embeddings(encoder, list(SHAPES)), labels, 1)}


def read_image_folder(
    path: str, image_size: int
) -> tuple[list[str], torch.Tensor, torch.Tensor, list[tuple[str, str]]]:
    """An ``ImageFolder`` directory: class names (subfolder names, sorted, ``_`` → space), the readable
    images (``try_load_image``), their labels, and ``(path, reason)`` of every file that could not be read.
    Raises ``DataError`` for a missing path, fewer than two class subfolders, or no readable image."""
    if not os.path.isdir(path):
        raise DataError(f"--zeroshot imagefolder:{path}: not a directory")
    folders = sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))
    if not folders:
        raise DataError(f"--zeroshot imagefolder:{path}: no class subfolders")
    if len(folders) == 1:  # top-1 would be 1.0 whatever the model
        raise DataError(
            f"--zeroshot imagefolder:{path}: one class subfolder ({folders[0]}); zero-shot classification needs "
            "at least two: give the folder whose subfolders are the classes"
        )
    images, labels, skipped = [], [], []
    for label, folder in enumerate(folders):
        for entry in sorted(os.scandir(os.path.join(path, folder)), key=lambda e: e.name):
            if entry.name.startswith(".") or not entry.is_file():
                continue
            image, error = try_load_image(entry.path, image_size)
            if image is None:
                skipped.append((entry.path, error))
                continue
            images.append(image)
            labels.append(label)
    if not images:
        raise DataError(f"--zeroshot imagefolder:{path}: no readable image ({len(skipped)} unreadable files)")
    return [f.replace("_", " ") for f in folders], torch.stack(images), torch.tensor(labels), skipped


def zeroshot_image_folder(encoder, path: str, image_size: int) -> dict:
    """Zero-shot classification of an ``ImageFolder`` directory: ``zeroshot_top1`` and ``zeroshot_top5``
    (None with 5 classes or fewer, where it is 1 by construction), ``zeroshot_images``,
    ``zeroshot_classes`` and ``zeroshot_skipped`` (unreadable files)."""
    classes, images, labels, skipped = read_image_folder(path, image_size)
    image = encoder.images(images)
    class_emb = class_embeddings(encoder, classes)
    return {
        "zeroshot_top1": topk_accuracy(image, class_emb, labels, 1),
        "zeroshot_top5": topk_accuracy(image, class_emb, labels, 5) if len(classes) > 5 else None,
        "zeroshot_images": int(labels.shape[0]),
        "zeroshot_classes": len(classes),
        "zeroshot_skipped": len(skipped),
    }
