"""Hard negatives of a synthetic long caption, each changing one detail (docs/training.md, "Evaluation").

``colour``, ``shape``, ``size`` and ``position`` change one field of one object of the scene and describe
the changed scene (so the text stays a consistent description); ``relation`` flips one relation sentence
(left of ↔ right of, above ↔ below) and leaves the rest; ``binding`` is the dataset's probe (two objects'
colours swapped). Which object, value and sentence is a pure function of (seed, split, index, kind).
"""

from __future__ import annotations

import numpy as np

from .synthetic import CELLS, COLOURS, SHAPES, SPLITS, SceneObject, SyntheticLongCaptions, caption_sentences

HARD_NEGATIVE_KINDS = ("colour", "shape", "size", "position", "relation", "binding")
RELATION_FLIPS = {
    " is to the left of ": " is to the right of ",
    " is to the right of ": " is to the left of ",
    " is above ": " is below ",
    " is below ": " is above ",
}


def changed_scene(objects: list[SceneObject], kind: str, rng: np.random.Generator) -> list[SceneObject]:
    """``objects`` with one field of one object changed: ``colour`` to a colour no object has, ``shape``
    to another shape, ``size`` small ↔ large, ``position`` to a free cell. A free cell that keeps every
    relation sentence is preferred, so that, where one exists, only the object's own sentence changes."""
    k = int(rng.integers(len(objects)))
    obj = objects[k]
    if kind == "colour":
        free = [c for c in COLOURS if c not in {o.colour for o in objects}]
        new = SceneObject(obj.shape, free[int(rng.integers(len(free)))], obj.size, obj.cell)
    elif kind == "shape":
        others = [s for s in SHAPES if s != obj.shape]
        new = SceneObject(others[int(rng.integers(len(others)))], obj.colour, obj.size, obj.cell)
    elif kind == "size":
        new = SceneObject(obj.shape, obj.colour, "large" if obj.size == "small" else "small", obj.cell)
    elif kind == "position":
        free = [c for c in range(len(CELLS)) if c not in {o.cell for o in objects}]
        relations = caption_sentences(objects)[1 + len(objects) :]
        keep = [c for c in free if caption_sentences(_moved(objects, k, c))[1 + len(objects) :] == relations]
        cells = keep or free
        new = SceneObject(obj.shape, obj.colour, obj.size, cells[int(rng.integers(len(cells)))])
    else:
        raise ValueError(f"kind must be colour, shape, size or position, got {kind!r}")
    changed = list(objects)
    changed[k] = new
    return changed


def _moved(objects: list[SceneObject], k: int, cell: int) -> list[SceneObject]:
    moved = list(objects)
    moved[k] = SceneObject(objects[k].shape, objects[k].colour, objects[k].size, cell)
    return moved


def flipped_relation(objects: list[SceneObject], rng: np.random.Generator) -> list[str]:
    """The caption sentences of ``objects`` with one relation sentence's relation reversed."""
    sentences = caption_sentences(objects)
    r = 1 + len(objects) + int(rng.integers(len(objects)))
    (phrase,) = [p for p in RELATION_FLIPS if p in sentences[r]]
    sentences[r] = sentences[r].replace(phrase, RELATION_FLIPS[phrase])
    return sentences


def hard_negatives(dataset: SyntheticLongCaptions, index: int) -> dict[str, str]:
    """Kind → the negative caption of sample ``index``, for every kind of ``HARD_NEGATIVE_KINDS``."""
    objects = dataset.scene(index)
    out = {}
    for number, kind in enumerate(HARD_NEGATIVE_KINDS):
        rng = np.random.default_rng([dataset.seed, SPLITS[dataset.split], index, 4, number])
        if kind == "relation":
            sentences = flipped_relation(objects, rng)
        elif kind == "binding":
            sentences = caption_sentences(dataset.probe_objects(objects, index))
        else:
            sentences = caption_sentences(changed_scene(objects, kind, rng))
        out[kind] = " ".join(sentences)
    return out
