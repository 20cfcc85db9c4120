"""The built-in synthetic long-caption dataset (docs/training.md, "Synthetic (the default)").

Each image shows 3–6 objects on a dark, noisy background; each object has a shape, a colour (distinct
within an image), a size and a cell of a 3×3 grid. The long caption is a summary sentence listing the
objects, one sentence per object, and a cycle of relation sentences between consecutive objects, so it exceeds 77
tokens. Every sample is a pure function of (seed, split, index): nothing is stored and any sample can
be regenerated, which is what makes resumed training bit-for-bit equal.

Binding probe: the same caption with the colours of two objects swapped everywhere. It has the same
words, so only a model that binds colours to the right objects prefers the true caption.

Binding twins (``twin_fraction``, used for training): a share of the odd indices hold the probe scene of
the index before them, rendered on its own. Read in index order, a batch then contains scenes whose
captions have the same bag of words, so the contrastive loss itself rewards binding — otherwise a batch
of independent scenes can nearly always be told apart by which colours and shapes occur at all.

Held-out combinations (``held_out_combinations``, default ``HELD_OUT_COMBINATIONS``): colour–shape pairs
the train split never shows, in its scenes, probes or twins (an object drawn with one gets another shape of
its colour, drawn from a stream of its own). The ``compositional`` split shows at least one in every scene.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .images import CLIP_MEAN, CLIP_STD

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
COLOURS = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.80, 0.15),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.90, 0.10),
    "purple": (0.60, 0.15, 0.80),
    "cyan": (0.10, 0.85, 0.90),
    "orange": (1.00, 0.55, 0.05),
    "white": (0.95, 0.95, 0.95),
}
SIZES = ("small", "large")
CELLS = (
    "the top left",
    "the top middle",
    "the top right",
    "the middle left",
    "the center",
    "the middle right",
    "the bottom left",
    "the bottom middle",
    "the bottom right",
)
NUMBERS = {3: "three", 4: "four", 5: "five", 6: "six"}
# Separate streams per split: a training index never produces a validation or test image.
SPLITS = {"train": 0, "val": 1, "test": 2, "compositional": 3}
# Colour–shape combinations the train split never shows (``held_out_combinations``), one per colour, each
# shape held out once or twice, so every colour and every shape still occurs in training. The
# ``compositional`` split puts at least one of them in every scene: it tests whether a model composes
# a colour and a shape it has only seen apart (docs/training.md, "Evaluation").
HELD_OUT_COMBINATIONS = (
    ("red", "circle"),
    ("green", "square"),
    ("blue", "triangle"),
    ("yellow", "diamond"),
    ("purple", "cross"),
    ("cyan", "ring"),
    ("orange", "square"),
    ("white", "triangle"),
)


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    cell: int


def _relation(a: SceneObject, b: SceneObject) -> str:
    ra, ca = divmod(a.cell, 3)
    rb, cb = divmod(b.cell, 3)
    if ca != cb:
        where = "to the left of" if ca < cb else "to the right of"
    else:
        where = "above" if ra < rb else "below"
    return f"The {a.colour} {a.shape} is {where} the {b.colour} {b.shape}."


def object_sentence(obj: SceneObject) -> str:
    return f"In {CELLS[obj.cell]} there is a {obj.size} {obj.colour} {obj.shape}."


def caption_sentences(objects: list[SceneObject]) -> list[str]:
    """The sentences of ``describe(objects)``: the summary, one per object, then the relations."""
    listing = [f"a {o.colour} {o.shape}" for o in objects]
    shapes = f"{', '.join(listing[:-1])} and {listing[-1]}"
    summary = f"An image of {NUMBERS[len(objects)]} shapes: {shapes}."
    sentences = [summary]
    sentences += [object_sentence(o) for o in objects]
    # A cycle of relations mentions every object exactly twice, so the attribute-swapped probe has the
    # very same bag of words as the true caption.
    sentences += [_relation(a, b) for a, b in zip(objects, objects[1:] + objects[:1], strict=True)]
    return sentences


def describe(objects: list[SceneObject]) -> str:
    """The long caption of a scene: summary, one sentence per object, relations around the cycle of objects."""
    return " ".join(caption_sentences(objects))


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.8 * r
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if shape == "triangle":  # apex up
        return (dy <= 0.8 * r) & (2 * np.abs(dx) <= dy + r)
    if shape == "cross":
        arm = r / 3
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    if shape == "ring":
        d2 = dx**2 + dy**2
        return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    raise ValueError(f"unknown shape {shape!r}")


def _check_held_out(combinations) -> tuple[tuple[str, str], ...]:
    """``held_out_combinations`` as distinct (colour, shape) pairs, every colour keeping at least one shape.

    A tuple in the order of ``COLOURS`` and ``SHAPES``, never a set: the compositional split iterates over it,
    and a set of strings iterates in an order that changes from one Python process to the next (string
    hashing is salted per process), which gave each process different compositional scenes."""
    try:
        pairs = frozenset((colour, shape) for colour, shape in combinations)
    except (TypeError, ValueError):
        raise ValueError(f"held_out_combinations must be (colour, shape) pairs, got {combinations!r}") from None
    for colour, shape in pairs:
        if colour not in COLOURS or shape not in SHAPES:
            raise ValueError(f"held_out_combinations: unknown colour or shape in {(colour, shape)!r}")
    for colour in COLOURS:
        if all((colour, shape) in pairs for shape in SHAPES):
            raise ValueError(f"held_out_combinations hold out every shape of {colour!r}; keep at least one")
    colours, shapes = list(COLOURS), list(SHAPES)
    return tuple(sorted(pairs, key=lambda pair: (colours.index(pair[0]), shapes.index(pair[1]))))


class SyntheticLongCaptions(torch.utils.data.Dataset):
    """``size`` procedurally generated image–long-caption pairs of one split.

    Items are dicts: ``image`` (float ``[3, R, R]``, CLIP-normalised), ``caption``, ``probe`` (the
    attribute-swapped caption) and ``key`` (a name for logs). ``split`` is ``train``, ``val``, ``test`` or
    ``compositional``; ``held_out_combinations`` (``()`` for none) are kept out of ``train`` and put into
    every ``compositional`` scene.
    """

    def __init__(
        self,
        size: int,
        seed: int = 0,
        split: str = "train",
        image_size: int = 64,
        min_objects: int = 3,
        max_objects: int = 6,
        twin_fraction: float = 0.0,
        held_out_combinations=HELD_OUT_COMBINATIONS,
    ):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        if not 3 <= min_objects <= max_objects <= 6:
            raise ValueError(f"need 3 <= min_objects <= max_objects <= 6, got {min_objects}, {max_objects}")
        if not 0 <= twin_fraction <= 1:
            raise ValueError(f"twin_fraction must be in [0, 1], got {twin_fraction}")
        if image_size < 24:
            raise ValueError(f"image_size must be >= 24 pixels, got {image_size}")
        self.size, self.seed, self.split = size, seed, split
        self.image_size, self.min_objects, self.max_objects = image_size, min_objects, max_objects
        self.twin_fraction = twin_fraction
        self.held_out_combinations = _check_held_out(held_out_combinations)
        if split == "compositional" and not self.held_out_combinations:
            raise ValueError("the compositional split needs held_out_combinations; got none")
        if split == "compositional" and twin_fraction:
            raise ValueError("the compositional split has no twin_fraction (a twin may lose its held-out combination)")
        coords = np.arange(image_size, dtype=np.float32) + 0.5
        self._yy, self._xx = np.meshgrid(coords, coords, indexing="ij")

    def __len__(self) -> int:
        return self.size

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, SPLITS[self.split], index])

    def is_twin(self, index: int) -> bool:
        """Whether sample ``index`` (odd) is the binding twin of sample ``index - 1``: the same scene with
        the colours of two objects swapped. Twins sit next to each other, so a batch read in index order
        holds both, and telling them apart takes binding colours to objects (see ``twin_fraction``)."""
        if index % 2 == 0 or self.twin_fraction == 0:
            return False
        return bool(np.random.default_rng([self.seed, SPLITS[self.split], index, 2]).random() < self.twin_fraction)

    def scene(self, index: int) -> list[SceneObject]:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} samples")
        if self.is_twin(index):
            return self.probe_objects(self.scene(index - 1), index - 1)
        rng = self._rng(index)
        n = int(rng.integers(self.min_objects, self.max_objects + 1))
        colours = rng.choice(len(COLOURS), size=n, replace=False)
        cells = rng.choice(9, size=n, replace=False)
        names = list(COLOURS)
        objects = [
            SceneObject(SHAPES[int(rng.integers(len(SHAPES)))], names[int(c)], SIZES[int(rng.integers(2))], int(cell))
            for c, cell in zip(colours, cells, strict=True)
        ]
        if self.split == "train" and self.held_out_combinations:
            return self._without_held_out(objects, index)
        if self.split == "compositional":
            return self._with_held_out(objects, index)
        return objects

    def _held_out(self, colour: str, shape: str) -> bool:
        return (colour, shape) in self.held_out_combinations

    def _swappable_pairs(self, objects: list[SceneObject]) -> list[tuple[int, int]]:
        """The pairs of objects whose colour swap creates no held-out combination."""
        return [
            (i, j)
            for i in range(len(objects))
            for j in range(i + 1, len(objects))
            if not self._held_out(objects[j].colour, objects[i].shape)
            and not self._held_out(objects[i].colour, objects[j].shape)
        ]

    def _without_held_out(self, objects: list[SceneObject], index: int) -> list[SceneObject]:
        """A train scene with every held-out combination's shape redrawn among its colour's other shapes
        (a scene without one is left as drawn), redrawn again until some colour swap (the binding probe
        and twin) creates none either. Deterministic: the redraws have their own stream of the index."""
        rng = np.random.default_rng([self.seed, SPLITS[self.split], index, 3])
        for _ in range(100):
            objects = [
                SceneObject(self._allowed_shape(o.colour, rng), o.colour, o.size, o.cell)
                if self._held_out(o.colour, o.shape)
                else o
                for o in objects
            ]
            if self._swappable_pairs(objects):
                return objects
            objects = [SceneObject(SHAPES[int(rng.integers(len(SHAPES)))], o.colour, o.size, o.cell) for o in objects]
        raise ValueError(
            f"held_out_combinations leave train sample {index} no colour swap without a held-out combination "
            "in 100 draws; hold out fewer combinations"
        )

    def _allowed_shape(self, colour: str, rng: np.random.Generator) -> str:
        allowed = [s for s in SHAPES if not self._held_out(colour, s)]
        return allowed[int(rng.integers(len(allowed)))]

    def _with_held_out(self, objects: list[SceneObject], index: int) -> list[SceneObject]:
        """A compositional scene: as drawn if it holds a held-out combination, else one object becomes one
        (colour and shape; its size and cell stay), with a colour no other object has."""
        if any(self._held_out(o.colour, o.shape) for o in objects):
            return objects
        rng = np.random.default_rng([self.seed, SPLITS[self.split], index, 3])
        choices = [
            (k, combo)
            for k in range(len(objects))
            for combo in self.held_out_combinations
            if combo[0] not in {o.colour for m, o in enumerate(objects) if m != k}
        ]
        k, (colour, shape) = choices[int(rng.integers(len(choices)))]
        changed = list(objects)
        changed[k] = SceneObject(shape, colour, objects[k].size, objects[k].cell)
        return changed

    def render(self, objects: list[SceneObject], rng: np.random.Generator) -> np.ndarray:
        """An ``[R, R, 3]`` float image in [0, 1]."""
        r_img = self.image_size
        cell = r_img / 3
        image = 0.08 + 0.03 * rng.standard_normal((r_img, r_img, 3)).astype(np.float32)
        for obj in objects:
            row, col = divmod(obj.cell, 3)
            radius = cell * (0.22 if obj.size == "small" else 0.40)
            # how far the centre may move and keep the object inside its cell; below 30 pixels a large
            # object has no room (negative), and sits at the centre (same draws: same images above 30)
            jitter = max(0.0, cell * 0.5 - radius - 1)
            cx = (col + 0.5) * cell + rng.uniform(-jitter, jitter)
            cy = (row + 0.5) * cell + rng.uniform(-jitter, jitter)
            mask = _shape_mask(obj.shape, self._xx - cx, self._yy - cy, radius)
            colour = np.asarray(COLOURS[obj.colour], dtype=np.float32) * rng.uniform(0.85, 1.0)
            image[mask] = colour
        return np.clip(image, 0.0, 1.0)

    def probe_objects(self, objects: list[SceneObject], index: int) -> list[SceneObject]:
        """The scene with the colours of two of its objects swapped (which two is fixed by the index).

        A twin's probe swaps back the same two objects, i.e. it is its partner's caption."""
        if self.is_twin(index):
            i, j = self._probe_pair(self.scene(index - 1), index - 1)
        else:
            i, j = self._probe_pair(objects, index)
        swapped = list(objects)
        swapped[i] = SceneObject(objects[i].shape, objects[j].colour, objects[i].size, objects[i].cell)
        swapped[j] = SceneObject(objects[j].shape, objects[i].colour, objects[j].size, objects[j].cell)
        return swapped

    def _probe_pair(self, objects: list[SceneObject], index: int) -> tuple[int, int]:
        """The two objects the probe of (non-twin) sample ``index`` swaps. In the train split, when that
        swap would create a held-out combination, a pair whose swap does not (train scenes have one)."""
        rng = np.random.default_rng([self.seed, SPLITS[self.split], index, 1])
        i, j = sorted(int(k) for k in rng.choice(len(objects), size=2, replace=False))
        if self.split == "train" and self.held_out_combinations:
            pairs = self._swappable_pairs(objects)
            if (i, j) not in pairs:
                i, j = pairs[int(rng.integers(len(pairs)))]
        return i, j

    def image(self, objects: list[SceneObject], index: int) -> torch.Tensor:
        """``objects`` rendered with sample ``index``'s pixel noise and jitter, CLIP-normalised ``[3, R, R]``.

        With the sample's own scene this is its image; with its probe scene, the image its probe caption
        describes (``examples/binding_diagnostic.py`` compares the two)."""
        rng = self._rng(index)
        rng.bit_generator.advance(1 << 20)  # a stream for pixels disjoint from the scene draws
        pixels = torch.from_numpy(self.render(objects, rng)).permute(2, 0, 1)
        return (pixels - CLIP_MEAN[:, None, None]) / CLIP_STD[:, None, None]

    def __getitem__(self, index: int) -> dict:
        objects = self.scene(index)
        return {
            "image": self.image(objects, index),
            "caption": describe(objects),
            "probe": describe(self.probe_objects(objects, index)),
            "key": f"synthetic/{self.split}/{index}",
        }
