"""Tokenizer, caption splitting, synthetic dataset, real-format loaders and collation."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from mulclip_fast.data import (
    CLIPTokenizer,
    Collator,
    DataError,
    SyntheticLongCaptions,
    batch_order,
    iterate_batches,
    open_dataset,
    parse_data_spec,
    rank_rows,
    split_sentences,
    subcaptions_of,
    summary_of,
    trim_to_longest,
)
from mulclip_fast.data.synthetic import describe

EOT, SOT = 49407, 49406


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer()


def test_truncation_keeps_eot(tokenizer):
    long_text = "a red circle next to a blue square. " * 60  # ~600 tokens
    ids = tokenizer.tokenize([long_text, "a cat."], 248)
    assert ids.shape == (2, 248) and ids.dtype == torch.long
    assert ids[0, 0] == SOT and ids[0, -1] == EOT and (ids[0] != 0).all()
    assert ids[1, :2].tolist()[0] == SOT and int(ids[1].argmax()) == int((ids[1] != 0).sum()) - 1
    short = tokenizer.tokenize([long_text], 77)
    assert short.shape == (1, 77) and short[0, -1] == EOT
    assert torch.equal(short[0, :76], ids[0, :76])  # same prefix, EOT replaces the cut-off token


def test_tokenizer_matches_openai_ids(tokenizer):
    # Ids from OpenAI's clip.tokenize("a photo of a cat") (a well-known row of CLIP's vocabulary).
    assert tokenizer.tokenize(["a photo of a cat"], 77)[0, :7].tolist() == [SOT, 320, 1125, 539, 320, 2368, EOT]


def test_trim_to_longest_keeps_every_eot():
    ids = torch.zeros(3, 10, dtype=torch.long)
    ids[0, :4] = torch.tensor([SOT, 5, 6, EOT])
    ids[1, :2] = torch.tensor([SOT, EOT])
    trimmed = trim_to_longest(ids)
    assert trimmed.shape == (3, 4) and torch.equal(trimmed, ids[:, :4])
    sub = torch.zeros(2, 3, 77, dtype=torch.long)
    sub[1, 2, :6] = torch.tensor([SOT, 1, 2, 3, 4, EOT])
    assert trim_to_longest(sub).shape == (2, 3, 6)


def test_sentence_splitting_and_summary():
    text = "A dog runs.  It is brown! Is it happy? Yes"
    assert split_sentences(text) == ["A dog runs.", "It is brown!", "Is it happy?", "Yes"]
    assert summary_of(text) == "A dog runs."
    assert subcaptions_of(text, 2) == ["A dog runs.", "It is brown!"]
    assert summary_of("no full stop here") == "no full stop here"
    assert split_sentences("   ") == []
    with pytest.raises(ValueError, match="max_subcaptions"):
        subcaptions_of(text, 0)


def test_synthetic_is_deterministic_and_splits_differ():
    a = SyntheticLongCaptions(50, seed=3)
    b = SyntheticLongCaptions(50, seed=3)
    for i in (0, 17, 49):
        x, y = a[i], b[i]
        assert x["caption"] == y["caption"] and x["probe"] == y["probe"]
        assert torch.equal(x["image"], y["image"])
    assert a[0]["caption"] != SyntheticLongCaptions(50, seed=4)[0]["caption"]
    train_caps = {a[i]["caption"] for i in range(50)}
    test_caps = {SyntheticLongCaptions(50, seed=3, split="test")[i]["caption"] for i in range(50)}
    assert not train_caps & test_caps
    with pytest.raises(IndexError):
        a[50]


@pytest.mark.parametrize("image_size", [24, 29, 30])
def test_every_allowed_synthetic_image_size_renders(image_size):
    """Below 30 pixels a large object's jitter range (half a cell less its radius and a pixel) was negative
    and numpy's uniform raised "high - low < 0": `--model image_resolution=24` ended in a traceback although
    24 is the documented minimum. Such objects now sit at their cell's centre."""
    data = SyntheticLongCaptions(size=32, seed=0, split="train", image_size=image_size)
    assert any(o.size == "large" for i in range(len(data)) for o in data.scene(i))
    for i in range(len(data)):
        assert data[i]["image"].shape == (3, image_size, image_size)


def test_synthetic_probe_image_is_the_twin_the_dataset_renders():
    """``image(probe_objects(scene(i)), i)`` draws the probe caption's scene with sample i's noise: the
    twin a training batch holds at i + 1 shows the same scene (with its own noise), and the sample's own
    scene drawn this way is its image."""
    data = SyntheticLongCaptions(40, seed=3, twin_fraction=1.0)
    for i in (0, 10, 22):
        assert torch.equal(data.image(data.scene(i), i), data[i]["image"])
        probe_scene = data.probe_objects(data.scene(i), i)
        assert probe_scene == data.scene(i + 1)  # the twin at i + 1 is the probe scene
        assert not torch.equal(data.image(probe_scene, i), data[i]["image"])


def test_synthetic_captions_are_long_and_probes_swap_colours(tokenizer):
    data = SyntheticLongCaptions(100, seed=0)
    lengths = [tokenizer.count_tokens(data[i]["caption"]) for i in range(100)]
    assert min(lengths) > 77 and max(lengths) <= 248
    for i in range(20):
        item = data[i]
        assert item["image"].shape == (3, 64, 64)
        assert item["probe"] != item["caption"]
        # Same bag of words: only the binding of colours to objects differs.
        assert sorted(re.findall(r"\w+", item["probe"])) == sorted(re.findall(r"\w+", item["caption"]))
        objects = data.scene(i)
        swapped = data.probe_objects(objects, i)
        changed = [k for k, (o, s) in enumerate(zip(objects, swapped, strict=True)) if o != s]
        assert len(changed) == 2 and describe(swapped) == item["probe"]


def test_synthetic_image_shows_the_described_colour():
    data = SyntheticLongCaptions(10, seed=1)
    objects = data.scene(0)
    pixels = data.render(objects, np.random.default_rng(0))
    big = max(objects, key=lambda o: o.size == "large")
    from mulclip_fast.data.synthetic import COLOURS

    target = np.asarray(COLOURS[big.colour])
    close = np.abs(pixels - target).max(axis=-1) < 0.2
    assert close.sum() > 10  # the object is drawn with its colour


def test_batch_order_and_iteration_resume_exactly():
    order0 = batch_order(20, 4, seed=1, epoch=0)
    assert len(order0) == 5 and sorted(sum(order0, [])) == list(range(20))
    assert order0 != batch_order(20, 4, seed=1, epoch=1)
    data = SyntheticLongCaptions(20, seed=0)
    collate = Collator(max_subcaptions=3)
    straight = [b.keys for _, _, b in _take(iterate_batches(data, collate, 4, seed=1), 8)]
    resumed = [b.keys for _, _, b in _take(iterate_batches(data, collate, 4, seed=1, start_step=3), 5)]
    assert resumed == straight[3:]
    with pytest.raises(DataError, match="larger than the dataset"):
        next(iterate_batches(data, collate, 21, seed=0))


class _CountedReads(torch.utils.data.Dataset):
    """Synthetic samples whose reads are counted; ``unreadable`` indices come back as a skipped image."""

    def __init__(self, n: int, unreadable=()):
        self.data, self.unreadable, self.reads = SyntheticLongCaptions(n, seed=0), set(unreadable), []

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        self.reads.append(index)
        item = dict(self.data[index])
        if index in self.unreadable:
            item.update(image=None, error="corrupt")
        return item


@pytest.mark.parametrize("batch_size, world_size, accum_steps", [(8, 2, 1), (12, 3, 2), (11, 2, 3)])
def test_rank_rows_are_each_ranks_part_of_each_micro_batch(batch_size, world_size, accum_steps):
    batch = Collator(max_subcaptions=3)([SyntheticLongCaptions(batch_size, seed=0)[i] for i in range(batch_size)])
    for rank in range(world_size):
        mine = batch.take(rank_rows(batch_size, rank, world_size, accum_steps))
        for micro in range(accum_steps):
            expected = batch.shard(micro, accum_steps).shard(rank, world_size)
            assert mine.shard(micro, accum_steps).keys == expected.keys


def _answering(answers):
    """A stand-in for the ``any_rank`` collective that gives ``answers`` in turn."""
    remaining = iter(answers)
    return lambda _flag: next(remaining)


@pytest.mark.parametrize("unreadable", [(), (5,)], ids=["all readable", "one unreadable"])
def test_each_rank_reads_only_its_rows_unless_a_sample_is_unreadable(unreadable):
    # Two ranks and two micro-batches of 12 samples a step, simulated in one process: ``any_rank`` answers
    # what the collective would (whether some rank's rows lost a sample this step).
    world, accum, size, steps = 2, 2, 12, 2
    collate = Collator(max_subcaptions=3)
    whole = [b for _, _, b in _take(iterate_batches(_CountedReads(24, unreadable), collate, size, seed=1), steps)]
    lost = [bool(b.skipped) for b in whole]
    ranks = []
    for rank in range(world):
        data = _CountedReads(24, unreadable)
        agree = _answering(lost)
        batches = iterate_batches(
            data, collate, size, seed=1, rank=rank, world_size=world, accum_steps=accum, any_rank=agree
        )
        ranks.append(([b for _, _, b in _take(batches, steps)], data.reads))
    for step, global_batch in enumerate(whole):
        for rank, (batches, _) in enumerate(ranks):
            # What one process would train on: the micro-batches of the readable samples, then the rank's part.
            expected = global_batch.take(rank_rows(len(global_batch), rank, world, accum))
            assert batches[step].keys == expected.keys and batches[step].skipped == global_batch.skipped
            torch.testing.assert_close(batches[step].images, expected.images)
    reads = [sorted(r) for _, r in ranks]
    if not unreadable:  # each sample read once over the ranks
        assert sorted(reads[0] + reads[1]) == sorted(sum(batch_order(24, size, seed=1, epoch=0)[:steps], []))
    else:  # the step that lost a sample reads the whole global batch on every rank
        assert all(len(r) > size * steps // world for r in reads)


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_collation_shapes_masks_and_trimming():
    data = SyntheticLongCaptions(6, seed=0)
    batch = Collator(max_subcaptions=8)([data[i] for i in range(6)])
    assert batch.images.shape == (6, 3, 64, 64)
    assert batch.long_ids.shape[1] <= 248 and (batch.long_ids[:, -1] != 0).any()
    assert batch.sub_ids.shape[:2] == batch.sub_mask.shape and batch.sub_ids.shape[2] <= 77
    for b in range(6):
        n_sub = min(8, len(split_sentences(data[b]["caption"])))
        assert batch.sub_mask[b].sum() == n_sub
        assert (batch.sub_ids[b, :n_sub].argmax(-1) > 0).all()  # every real subcaption has its EOT
        assert (batch.sub_ids[b, n_sub:] == 0).all()
    assert batch.probe_ids is not None and batch.probe_ids.shape[0] == 6


# ---------------------------------------------------------------------------------- image preprocessing
def _normalised(img):
    from mulclip_fast.data.images import CLIP_MEAN, CLIP_STD

    pixels = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (pixels - CLIP_MEAN[:, None, None]) / CLIP_STD[:, None, None]


@pytest.mark.parametrize(
    ("width", "height", "size", "resized", "box"),
    [
        # torchvision's Resize(100), as in OpenAI CLIP's transform: long side int(100 * 335 / 200) = 167 (not
        # 168); CenterCrop(100): left int(round(67 / 2)) = 34.
        (335, 200, 100, (167, 100), (34, 0, 134, 100)),
        # Already the size along the short side: CenterCrop's left offset is round(3 / 2) = 2, not 1.
        (227, 224, 224, (227, 224), (2, 0, 226, 224)),
        # Portrait: the same rules along the height.
        (200, 335, 100, (100, 167), (0, 34, 100, 134)),
    ],
)
def test_image_preprocessing_is_openai_clips_resize_and_centre_crop(tmp_path, width, height, size, resized, box):
    from mulclip_fast.data.images import load_image

    pixels = (np.random.default_rng(0).random((height, width, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "photo.png")  # lossless: the reference starts from the same pixels
    expected = _normalised(Image.fromarray(pixels).resize(resized, Image.Resampling.BICUBIC).crop(box))
    assert torch.equal(load_image(str(tmp_path / "photo.png"), size), expected)


def test_a_16_bit_greyscale_image_keeps_its_levels(tmp_path):
    """PIL's convert("RGB") clips a 16-bit level at 255, which turns nearly all of a 16-bit PNG white;
    its levels are scaled to 8 bits instead (level · 257 → level)."""
    from mulclip_fast.data.images import load_image

    levels = np.tile(np.arange(256, dtype=np.uint16), (40, 1))  # 40 x 256, every 8-bit level
    Image.fromarray(levels * 257).save(tmp_path / "deep.png")
    Image.fromarray(levels.astype(np.uint8)).save(tmp_path / "plain.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    assert torch.equal(load_image(str(tmp_path / "deep.png"), 32), load_image(str(tmp_path / "plain.png"), 32))


# ------------------------------------------------------------------------------------------ real formats
def _write_image(path, colour=(200, 30, 30), size=(40, 30)):
    Image.new("RGB", size, colour).save(path)


@pytest.fixture
def docci_dir(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    lines = []
    for i in range(6):
        _write_image(images / f"img{i}.jpg")
        split = "test" if i >= 4 else "train"
        lines.append(
            json.dumps(
                {"example_id": i, "image_file": f"img{i}.jpg", "description": f"Caption {i}. More.", "split": split}
            )
        )
    (images / "broken.jpg").write_bytes(b"not a jpeg at all")
    lines.append(json.dumps({"image_file": "broken.jpg", "description": "Broken one.", "split": "train"}))
    lines.append(json.dumps({"image_file": "missing.jpg", "description": "Missing one.", "split": "train"}))
    lines.append("{not json")
    lines.append(json.dumps({"image_file": "img0.jpg"}))  # no description
    (tmp_path / "docci_descriptions.jsonlines").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_docci_loader_splits_and_skips_bad_images(docci_dir):
    train = open_dataset(f"docci:{docci_dir}", "train", image_size=32, size=0)
    test = open_dataset(f"docci:{docci_dir / 'docci_descriptions.jsonlines'}", "test", image_size=32, size=0)
    assert len(train) == 6 and len(test) == 2
    assert len(train.bad_records) == 2 and ":9:" in train.bad_records[0]
    batch = Collator()([train[i] for i in range(len(train))])
    assert len(batch) == 4 and batch.images.shape == (4, 3, 32, 32)
    skipped = dict(batch.skipped)
    assert set(skipped) == {str(docci_dir / "images" / "broken.jpg"), str(docci_dir / "images" / "missing.jpg")}
    assert batch.probe_ids is None


def test_sharegpt4v_loader_and_holdout(tmp_path):
    (tmp_path / "coco").mkdir()
    entries = []
    for i in range(10):
        _write_image(tmp_path / "coco" / f"{i}.png", size=(50, 80))
        entries.append(
            {
                "id": str(i),
                "image": f"coco/{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nDescribe."},
                    {"from": "gpt", "value": f"Long {i}."},
                ],
            }
        )
    entries.append({"id": "x", "image": "coco/0.png", "conversations": [{"from": "human", "value": "hi"}]})
    path = tmp_path / "share.json"
    path.write_text(json.dumps(entries))
    train = open_dataset(f"sharegpt4v:{path}", "train", 32, 0, holdout=3)
    test = open_dataset(f"sharegpt4v:{path}", "test", 32, 0, holdout=3)
    assert len(train) == 7 and len(test) == 3
    assert train[0]["caption"] == "Long 0." and train[0]["image"].shape == (3, 32, 32)
    assert "no gpt turn" in train.bad_records[0]


def test_bad_data_inputs_fail_clearly(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        parse_data_spec(f"docci:{tmp_path / 'nope.jsonl'}")
    with pytest.raises(DataError, match="must be synthetic"):
        parse_data_spec("imagenet:/x")
    with pytest.raises(DataError, match="needs a path"):
        parse_data_spec("docci:")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("{bad json\n")
    with pytest.raises(DataError, match="no usable docci record"):
        open_dataset(f"docci:{empty}", "train", 32, 0)
    (tmp_path / "noimg.jsonl").write_text(json.dumps({"image_file": "gone.jpg", "description": "x", "split": "train"}))
    with pytest.raises(DataError, match="none of the first 1 images"):
        open_dataset(f"docci:{tmp_path / 'noimg.jsonl'}", "train", 32, 0)
    not_list = tmp_path / "s.json"
    not_list.write_text("{}")
    with pytest.raises(DataError, match="JSON list"):
        open_dataset(f"sharegpt4v:{not_list}", "train", 32, 0)


def test_binding_twins_are_swapped_scenes_next_to_each_other():
    data = SyntheticLongCaptions(200, seed=5, twin_fraction=0.5)
    twins = [i for i in range(200) if data.is_twin(i)]
    assert all(i % 2 == 1 for i in twins) and 30 < len(twins) < 70
    i = twins[0]
    base, twin = data[i - 1], data[i]
    assert twin["caption"] == base["probe"] and twin["probe"] == base["caption"]
    assert sorted(re.findall(r"\w+", twin["caption"])) == sorted(re.findall(r"\w+", base["caption"]))
    assert not torch.equal(twin["image"], base["image"])
    # Unshuffled batches keep each twin with its partner; evaluation splits have no twins by default.
    assert batch_order(200, 8, seed=0, epoch=0, shuffle=False)[0] == list(range(8))
    assert not any(SyntheticLongCaptions(50, seed=5, split="test").is_twin(k) for k in range(50))
    with pytest.raises(ValueError, match="twin_fraction"):
        SyntheticLongCaptions(10, twin_fraction=1.5)
