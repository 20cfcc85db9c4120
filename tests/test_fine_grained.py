"""Hard negatives, held-out combinations, grounding, compositional split and zero-shot (mulclip_fast.fine_grained)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from mulclip_fast.data import DataError, SyntheticLongCaptions
from mulclip_fast.data.hard_negatives import HARD_NEGATIVE_KINDS, changed_scene, flipped_relation, hard_negatives
from mulclip_fast.data.synthetic import HELD_OUT_COMBINATIONS, SHAPES, caption_sentences, describe, object_sentence
from mulclip_fast.fine_grained import (
    compositional_split,
    grounding_recall,
    hard_negative_accuracy,
    read_image_folder,
    single_object_scenes,
    topk_accuracy,
    zeroshot_image_folder,
    zeroshot_synthetic,
)

OBJECT = re.compile(r"^In (the [a-z ]+?) there is a (small|large) ([a-z]+) ([a-z]+)\.$")
RELATION = re.compile(
    r"^The ([a-z]+) ([a-z]+) is (to the left of|to the right of|above|below) the ([a-z]+) ([a-z]+)\.$"
)
WORDS = set(SHAPES)


class FactEncoder:
    """A model built to be perfect: a text is the set of facts its sentences state (one per object
    sentence, one per relation sentence; other sentences contribute the shape names they mention, weight
    1e-3), an image the facts of the scene it was registered with. Embeddings are normalised one-hot sums."""

    def __init__(self):
        self.facts: dict[tuple, int] = {}
        self.scenes: dict[bytes, list] = {}

    def register(self, image: torch.Tensor, objects: list) -> None:
        self.scenes[image.numpy().tobytes()] = objects

    def _text_facts(self, text: str) -> dict[tuple, float]:
        facts = {}
        for sentence in re.split(r"(?<=\.)\s+", text.strip()):
            if m := OBJECT.match(sentence):
                facts[("object", *m.groups())] = 1.0
            elif m := RELATION.match(sentence):
                facts[("relation", *m.groups())] = 1.0
            elif not sentence.startswith("An image of"):  # a prompt
                facts.update({("word", w): 1e-3 for w in re.findall(r"[a-z]+", sentence) if w in WORDS})
        return facts

    def _vector(self, facts: dict[tuple, float]) -> torch.Tensor:
        v = torch.zeros(4096, dtype=torch.float64)
        for fact, weight in facts.items():
            v[self.facts.setdefault(fact, len(self.facts))] = weight
        return torch.nn.functional.normalize(v, dim=0)

    def texts(self, texts):
        return torch.stack([self._vector(self._text_facts(t)) for t in texts])

    def images(self, images):
        rows = []
        for image in images:
            objects = self.scenes[image.numpy().tobytes()]
            sentences = caption_sentences(objects)[1:] if len(objects) >= 3 else []
            facts = self._text_facts(" ".join(sentences))
            facts.update({("word", o.shape): 1e-3 for o in objects})
            if len(objects) < 3:
                facts.update(self._text_facts(" ".join(object_sentence(o) for o in objects)))
            rows.append(self._vector(facts))
        return torch.stack(rows)


def _registered(encoder: FactEncoder, dataset: SyntheticLongCaptions) -> torch.Tensor:
    images = torch.stack([dataset.image(dataset.scene(i), i) for i in range(len(dataset))])
    for i in range(len(dataset)):
        encoder.register(images[i], dataset.scene(i))
    return images


def _differences(a, b) -> list[tuple[int, str]]:
    return [
        (k, f)
        for k, (x, y) in enumerate(zip(a, b, strict=True))
        for f in ("shape", "colour", "size", "cell")
        if getattr(x, f) != getattr(y, f)
    ]


@pytest.mark.parametrize("kind", ["colour", "shape", "size", "position"])
def test_scene_negatives_change_one_field_of_one_object(kind):
    data = SyntheticLongCaptions(60, seed=1, split="test")
    field = "cell" if kind == "position" else kind
    for i in range(len(data)):
        objects = data.scene(i)
        changed = changed_scene(objects, kind, np.random.default_rng(i))
        assert [f for _, f in _differences(objects, changed)] == [field]
        assert describe(changed) != describe(objects)
        assert len({o.colour for o in changed}) == len(changed) and len({o.cell for o in changed}) == len(changed)


def test_relation_negative_flips_one_sentence_and_binding_is_the_probe():
    data = SyntheticLongCaptions(60, seed=2, split="test")
    for i in range(len(data)):
        objects = data.scene(i)
        true, flipped = caption_sentences(objects), flipped_relation(objects, np.random.default_rng(i))
        diff = [k for k, (a, b) in enumerate(zip(true, flipped, strict=True)) if a != b]
        assert len(diff) == 1 and diff[0] > len(objects)
        a, b = RELATION.match(true[diff[0]]).groups(), RELATION.match(flipped[diff[0]]).groups()
        assert a[:2] + a[3:] == b[:2] + b[3:] and {a[2], b[2]} in (
            {"to the left of", "to the right of"},
            {"above", "below"},
        )
        negatives = hard_negatives(data, i)
        assert set(negatives) == set(HARD_NEGATIVE_KINDS) and data[i]["caption"] not in negatives.values()
        assert negatives["binding"] == data[i]["probe"]
        assert hard_negatives(data, i) == negatives  # deterministic


def test_a_perfect_model_wins_every_hard_negative_and_grounds_every_sentence():
    data = SyntheticLongCaptions(40, seed=3, split="test")
    encoder = FactEncoder()
    image = encoder.images(_registered(encoder, data))
    caption = encoder.texts([data[i]["caption"] for i in range(len(data))])
    probe = encoder.texts([data[i]["probe"] for i in range(len(data))])
    result = hard_negative_accuracy(encoder, data, image, caption, probe)
    assert all(result[f"hardneg_{kind}"] == 1.0 for kind in HARD_NEGATIVE_KINDS) and result["hardneg_mean"] == 1.0
    grounding = grounding_recall(encoder, data, image)
    assert grounding["grounding_r1"] == 1.0 and grounding["grounding_r5"] == 1.0
    assert grounding["grounding_queries"] == len(
        {s for i in range(len(data)) for s in caption_sentences(data.scene(i))[1 : 1 + len(data.scene(i))]}
    )


def test_equal_scores_count_against_the_true_caption():
    data = SyntheticLongCaptions(10, seed=3, split="test")

    class Blind:
        def texts(self, texts):
            return torch.ones(len(texts), 4) / 2

    image = torch.ones(10, 4) / 2
    result = hard_negative_accuracy(Blind(), data, image, image, image)
    assert result["hardneg_mean"] == 0.0
    grounding = grounding_recall(Blind(), data, image)
    assert grounding["grounding_r1"] == 0.0
    subset = hard_negative_accuracy(Blind(), data, image, image, image, kinds=("shape", "binding"))
    assert set(subset) == {"hardneg_shape", "hardneg_binding", "hardneg_mean", "hardneg_pairs"}
    with pytest.raises(ValueError, match="kinds must be"):
        hard_negative_accuracy(Blind(), data, image, image, image, kinds=("texture",))
    with pytest.raises(ValueError, match="first n"):
        hard_negative_accuracy(Blind(), data, torch.ones(11, 4), torch.ones(11, 4), torch.ones(11, 4))


def _has_held_out(objects) -> bool:
    return any((o.colour, o.shape) in HELD_OUT_COMBINATIONS for o in objects)


def test_train_split_never_shows_a_held_out_combination():
    data = SyntheticLongCaptions(3000, seed=4, split="train", twin_fraction=0.5)
    for i in range(len(data)):
        objects = data.scene(i)
        assert not _has_held_out(objects) and not _has_held_out(data.probe_objects(objects, i))
        if data.is_twin(i):
            assert data.probe_objects(objects, i) == data.scene(i - 1)
    # Switched off, the same seed draws them (about half the scenes have one).
    free = SyntheticLongCaptions(200, seed=4, split="train", held_out_combinations=())
    assert sum(_has_held_out(free.scene(i)) for i in range(200)) > 50
    # Scenes without a held-out combination, and with a colour swap that creates none, are drawn exactly
    # as without the hold-out; the others are redrawn.
    for i in range(200):
        objects = free.scene(i)
        swaps = [
            (a, b)
            for a in objects
            for b in objects
            if a != b
            and (a.colour, b.shape) not in HELD_OUT_COMBINATIONS
            and (b.colour, a.shape) not in HELD_OUT_COMBINATIONS
        ]
        if not data.is_twin(i):
            assert (data.scene(i) == objects) == (not _has_held_out(objects) and bool(swaps))
    # Every colour and every shape still occurs in training.
    seen = {(o.colour, o.shape) for i in range(500) for o in data.scene(i)}
    assert {c for c, _ in seen} == {c for c, _ in HELD_OUT_COMBINATIONS} and {s for _, s in seen} == set(SHAPES)


def test_compositional_split_always_shows_one_and_is_deterministic():
    test = SyntheticLongCaptions(300, seed=5, split="test")
    comp = compositional_split(test, 300)
    for i in range(300):
        objects = comp.scene(i)
        assert _has_held_out(objects) and len({o.colour for o in objects}) == len(objects)
    again = compositional_split(test, 300)
    assert all(
        again[i]["caption"] == comp[i]["caption"] and torch.equal(again[i]["image"], comp[i]["image"])
        for i in (0, 7, 299)
    )
    # The same in another Python process, whatever its string-hash salt (a set of held-out pairs once made the
    # scenes depend on it).
    script = (
        "from mulclip_fast.data.synthetic import SyntheticLongCaptions as S;"
        "d = S(300, seed=5, split='compositional');"
        "print([d.scene(i) for i in range(300)])"
    )
    scenes = {
        subprocess.run(
            [sys.executable, "-c", script],
            env={**os.environ, "PYTHONHASHSEED": salt},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for salt in ("1", "2", "3")
    }
    assert len(scenes) == 1
    custom = SyntheticLongCaptions(50, seed=5, split="compositional", held_out_combinations=[("red", "ring")])
    assert all(any((o.colour, o.shape) == ("red", "ring") for o in custom.scene(i)) for i in range(50))
    with pytest.raises(ValueError, match="held_out_combinations"):
        SyntheticLongCaptions(5, split="compositional", held_out_combinations=())
    with pytest.raises(ValueError, match="twin_fraction"):
        SyntheticLongCaptions(5, split="compositional", twin_fraction=0.5)
    with pytest.raises(ValueError, match="held_out_combinations"):
        SyntheticLongCaptions(5, held_out_combinations=[("red", "hexagon")])
    with pytest.raises(ValueError, match="every shape of 'red'"):
        SyntheticLongCaptions(5, held_out_combinations=[("red", s) for s in SHAPES])
    # One shape left per colour, different for most colours: most scenes have no allowed colour swap.
    only = dict(zip(("red", "green", "blue", "yellow", "purple", "cyan"), SHAPES, strict=True))
    only |= {"orange": "circle", "white": "square"}
    strict = SyntheticLongCaptions(5, held_out_combinations=[(c, s) for c in only for s in SHAPES if s != only[c]])
    with pytest.raises(ValueError, match="no colour swap"):
        [strict.scene(i) for i in range(5)]


def test_zeroshot_synthetic_perfect_and_blind():
    data = SyntheticLongCaptions(10, seed=6, split="test")
    encoder = FactEncoder()
    for objects, i in single_object_scenes(data, 30):
        encoder.register(data.image(objects, i), objects)
    assert zeroshot_synthetic(encoder, data, 30)["zeroshot_synthetic_acc"] == 1.0
    assert [objects[0].shape for objects, _ in single_object_scenes(data, 12)] == list(SHAPES) * 2


def test_topk_accuracy_counts_ties_against():
    image = torch.eye(3)
    classes = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 1, 0]])
    labels = torch.tensor([0, 1, 2])
    assert topk_accuracy(image, classes, labels, 1) == pytest.approx(1 / 3)  # image 1 ties with class 2
    assert topk_accuracy(image, classes, labels, 2) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="k must be"):
        topk_accuracy(image, classes, labels, 4)


def _png(path, rgb):
    Image.new("RGB", (6, 5), rgb).save(path)


def test_image_folder_zero_shot(tmp_path):
    colours = {"red_thing": (255, 0, 0), "green_thing": (0, 255, 0), "blue_thing": (0, 0, 255)}
    for name, rgb in colours.items():
        (tmp_path / name).mkdir()
        for k in range(2):
            _png(tmp_path / name / f"{k}.png", rgb)
    (tmp_path / "red_thing" / "broken.png").write_bytes(b"not a png")
    classes, images, labels, skipped = read_image_folder(str(tmp_path), 8)
    assert classes == ["blue thing", "green thing", "red thing"] and images.shape == (6, 3, 8, 8)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2] and len(skipped) == 1 and "broken.png" in skipped[0][0]

    class ColourEncoder:  # perfect: an image is its mean colour, a prompt the colour it names
        def images(self, images):
            return torch.nn.functional.normalize(images.mean(dim=(2, 3)) + 3, dim=-1) ** 8

        def texts(self, texts):
            rows = [[float(c in t) for c in ("red", "green", "blue")] for t in texts]
            return torch.tensor(rows)

    result = zeroshot_image_folder(ColourEncoder(), str(tmp_path), 8)
    assert result == {
        "zeroshot_top1": 1.0,
        "zeroshot_top5": None,
        "zeroshot_images": 6,
        "zeroshot_classes": 3,
        "zeroshot_skipped": 1,
    }


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        read_image_folder(str(tmp_path / "missing"), 8)
    with pytest.raises(DataError, match="no class subfolders"):
        read_image_folder(str(tmp_path), 8)
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "bad.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="no readable image"):
        read_image_folder(str(tmp_path), 8)


def test_an_image_folder_with_one_class_is_an_error(tmp_path):
    # One class scores top-1 1.0 whatever the model (a folder of one class's images inside, such as
    # imagenette/val/n01440764/.. or a dataset root holding val/ alone): a number that means nothing.
    (tmp_path / "val" / "n01440764").mkdir(parents=True)
    _png(tmp_path / "val" / "n01440764" / "0.png", (255, 0, 0))
    with pytest.raises(DataError, match=r"one class subfolder \(val\).*at least two"):
        read_image_folder(str(tmp_path), 8)


def test_eval_cli_rejects_a_bad_zeroshot_spec_before_loading_the_model(tmp_path, capsys):
    from mulclip_fast.eval import main

    assert main(["--checkpoint", str(tmp_path / "nope"), "--zeroshot", "folder:/x"]) == 2
    assert "--zeroshot must be imagefolder:PATH" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path / "nope"), "--zeroshot", f"imagefolder:{tmp_path / 'none'}"]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_format_table_prints_the_fine_grained_numbers():
    from mulclip_fast.eval import format_table

    result = {"n_pairs": 10, "binding_acc": 0.5, "grounding_r1": 0.25, "grounding_r5": 0.5, "grounding_queries": 7}
    result.update({f"hardneg_{kind}": 0.5 for kind in HARD_NEGATIVE_KINDS} | {"hardneg_mean": 0.5, "hardneg_pairs": 10})
    result.update({f"compositional_{d}_r{k}": 0.125 for d in ("t2i", "i2t") for k in (1, 5)})
    result.update({"zeroshot_synthetic_acc": 0.75, "zeroshot_top1": 0.5, "zeroshot_top5": None})
    result.update({"zeroshot_images": 6, "zeroshot_classes": 3, "zeroshot_skipped": 1})
    text = format_table(result)
    assert "hard negatives (10 pairs): mean 0.500 (colour 0.500" in text and "relation 0.500" in text
    assert "compositional retrieval: t2i R@1 0.125" in text and "grounding R@1 0.250, R@5 0.500" in text
    assert "zero-shot synthetic shapes: accuracy 0.750" in text and "top-5 n/a" in text and "1 unreadable" in text


def test_a_perfect_model_wins_the_compositional_hard_negatives():
    comp = compositional_split(SyntheticLongCaptions(10, seed=7, split="test"), 30)
    encoder = FactEncoder()
    image = encoder.images(_registered(encoder, comp))
    caption = encoder.texts([comp[i]["caption"] for i in range(len(comp))])
    probe = encoder.texts([comp[i]["probe"] for i in range(len(comp))])
    assert hard_negative_accuracy(encoder, comp, image, caption, probe)["hardneg_mean"] == 1.0


def test_evaluate_reports_the_fine_grained_keys_on_the_synthetic_test_split():
    from mulclip_fast.eval import evaluate
    from mulclip_fast.model import CLIP, preset_config

    torch.manual_seed(0)
    model = CLIP(preset_config("tiny", vision_layers=1, transformer_layers=1))
    result = evaluate(model, SyntheticLongCaptions(12, seed=8, split="test"), batch_size=64)
    keys = {f"hardneg_{kind}" for kind in HARD_NEGATIVE_KINDS} | {"hardneg_mean", "grounding_r1", "grounding_r5"}
    keys |= {f"compositional_{d}_r{k}" for d in ("t2i", "i2t") for k in (1, 5)} | {"zeroshot_synthetic_acc"}
    keys |= {f"compositional_hardneg_{kind}" for kind in ("colour", "shape", "binding", "mean")}
    assert keys <= set(result) and all(0.0 <= result[k] <= 1.0 for k in keys)
    assert result["hardneg_pairs"] == 12 and result["compositional_hardneg_pairs"] == 100
    assert result["hardneg_binding"] == result["binding_acc"]  # the same probes, all 12 pairs
    val = evaluate(model, SyntheticLongCaptions(12, seed=8, split="val"), batch_size=64)
    assert "hardneg_mean" not in val  # the periodic validation stays cheap


@pytest.mark.slow
def test_eval_cli_zero_shot_on_an_image_folder(tmp_path):
    import json
    import subprocess
    import sys

    run = tmp_path / "run"
    train = [sys.executable, "-m", "mulclip_fast.train", "--steps", "2", "--batch-size", "4", "--out", str(run)]
    train += ["--model", "vision_layers=1", "--model", "transformer_layers=1", "--eval-pairs", "0", "--loss", "global"]
    subprocess.run(train, check=True, capture_output=True, timeout=240)
    folder = tmp_path / "classes"
    for name, rgb in {"red_square": (255, 0, 0), "blue_circle": (0, 0, 255)}.items():
        (folder / name).mkdir(parents=True)
        _png(folder / name / "a.png", rgb)
    (folder / "blue_circle" / "bad.png").write_bytes(b"")
    out = tmp_path / "eval.json"
    cmd = [sys.executable, "-m", "mulclip_fast.eval", "--checkpoint", str(run), "--pairs", "20", "--out", str(out)]
    done = subprocess.run([*cmd, "--zeroshot", f"imagefolder:{folder}"], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["zeroshot_images"] == 2 and result["zeroshot_classes"] == 2 and result["zeroshot_skipped"] == 1
    assert 0.0 <= result["zeroshot_top1"] <= 1.0 and result["zeroshot_top5"] is None
    assert "zero-shot image folder: top-1" in done.stdout and "hard negatives (20 pairs)" in done.stdout
