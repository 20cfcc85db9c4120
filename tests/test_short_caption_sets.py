"""Short-caption evaluation sets (COCO captions files, Karpathy's COCO and Flickr30k splits): parsing,
bad records reported and skipped, split selection, the multi-caption recall, and the eval / train CLIs."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from mulclip_fast.data import DataError, MultiCaptionFiles, open_dataset, parse_data_spec, read_coco, read_flickr30k
from mulclip_fast.eval import main as eval_main
from mulclip_fast.eval import multi_caption_recall, recall_at_k
from mulclip_fast.model import CLIP, preset_config
from mulclip_fast.train import main as train_main


def _write_image(path, colour=(30, 120, 200)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), colour).save(path)


# ------------------------------------------------------------------------------------------ recall
def _naive_multi_caption_recall(sim, caption_image, ks):
    """Loops over sorted lists: a wrong candidate tied with the true one is ranked before it."""
    n_captions, n_images = sim.shape
    out = {}
    t2i = []
    for c in range(n_captions):
        order = sorted(range(n_images), key=lambda i: (-float(sim[c, i]), i == int(caption_image[c])))
        t2i.append(order.index(int(caption_image[c])))
    i2t = []
    for i in range(n_images):
        own = {c for c in range(n_captions) if int(caption_image[c]) == i}
        order = sorted(range(n_captions), key=lambda c: (-float(sim[c, i]), c in own))
        i2t.append(min(order.index(c) for c in own))
    for name, ranks in (("t2i", t2i), ("i2t", i2t)):
        for k in ks:
            out[f"{name}_r{k}"] = sum(r < k for r in ranks) / len(ranks)
    return out


def test_multi_caption_recall_on_a_known_case_with_ties():
    # captions 0, 1 belong to image 0, caption 2 to image 1, captions 3, 4 to image 2
    sim = torch.tensor(
        [
            [0.9, 0.1, 0.2],
            [0.9, 0.5, 0.8],  # ties with its own image's other caption on image 0: no harm
            [0.6, 0.6, 0.1],  # ties with a wrong image: rank 1
            [0.2, 0.3, 0.8],
            [0.1, 0.7, 0.7],  # ties with a wrong image: rank 1
        ]
    )
    caption_image = torch.tensor([0, 0, 1, 2, 2])
    result = multi_caption_recall(sim, caption_image, ks=(1, 2))
    # t2i ranks 0, 0, 1, 0, 1. i2t: image 0 best own 0.9, nothing else as high (rank 0); image 1's 0.6 is
    # beaten by caption 4's 0.7 (rank 1); image 2's best own 0.8 is tied by caption 1 (rank 1).
    assert result == pytest.approx({"t2i_r1": 0.6, "t2i_r2": 1.0, "i2t_r1": 1 / 3, "i2t_r2": 1.0})
    assert result == pytest.approx(_naive_multi_caption_recall(sim, caption_image, (1, 2)))


def test_multi_caption_recall_matches_loops_and_the_square_case():
    generator = torch.Generator().manual_seed(0)
    for n_images in (1, 4, 9):
        counts = torch.randint(1, 6, (n_images,), generator=generator)
        caption_image = torch.repeat_interleave(torch.arange(n_images), counts)
        caption_image = caption_image[torch.randperm(len(caption_image), generator=generator)]
        sim = torch.randint(0, 4, (len(caption_image), n_images), generator=generator).float()  # many ties
        ks = (1, 2, 5)
        assert multi_caption_recall(sim, caption_image, ks) == pytest.approx(
            _naive_multi_caption_recall(sim, caption_image, ks)
        )
    square = torch.randint(0, 3, (7, 7), generator=generator).float()
    assert multi_caption_recall(square, torch.arange(7)) == recall_at_k(square)


def test_multi_caption_recall_validates_its_arguments():
    sim = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="similarity must be a non-empty"):
        multi_caption_recall(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="NaN or Inf"):
        multi_caption_recall(torch.full((3, 2), float("nan")), torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match=r"caption_image must be an integer tensor of shape \(3,\)"):
        multi_caption_recall(sim, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="caption_image must be an integer tensor"):
        multi_caption_recall(sim, torch.tensor([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"image indices in \[0, 2\), got 0\.\.2"):
        multi_caption_recall(sim, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="image 1 has none"):
        multi_caption_recall(sim, torch.tensor([0, 0, 0]))


# ------------------------------------------------------------------------------------ COCO captions
@pytest.fixture
def coco(tmp_path):
    """COCO's own layout: annotations/captions_val2017.json and val2017/ beside annotations/."""
    root = tmp_path / "coco"
    images = [
        {"id": 1, "file_name": "000001.png"},
        {"id": 2, "file_name": "000002.png"},
        {"id": 3, "file_name": "000003.png"},
        {"id": 4, "file_name": "000004.png"},  # file missing
        {"id": 5, "file_name": "000005.png"},  # no caption
        {"id": 6},  # no file_name
        {"id": 1, "file_name": "again.png"},  # duplicate id
        {"id": 9, "file_name": "000009.png"},  # corrupt file: skipped when read
    ]
    for i in (1, 2, 3, 5):
        _write_image(root / "val2017" / f"00000{i}.png", colour=(40 * i, 60, 200 - 30 * i))
    (root / "val2017" / "000009.png").write_bytes(b"not a png")
    annotations = [
        {"image_id": 1, "id": 10, "caption": "A red bus on a street."},
        {"image_id": 2, "id": 11, "caption": "Two dogs play in the snow. "},
        {"image_id": 1, "id": 12, "caption": "A double-decker bus."},
        {"image_id": 3, "id": 13, "caption": "A bowl of fruit."},
        {"image_id": 4, "id": 14, "caption": "Missing photo."},
        {"image_id": 9, "id": 15, "caption": "A corrupt photo."},
        {"image_id": 7, "id": 16, "caption": "No such image."},
        {"image_id": 2, "id": 17},  # no caption
        {"image_id": 3, "id": 18, "caption": "  "},  # blank caption
        {"image_id": 1, "id": 19, "caption": "A bus parked near a “stop” sign."},
    ]
    (root / "annotations").mkdir(parents=True)
    file = root / "annotations" / "captions_val2017.json"
    file.write_text(json.dumps({"info": {}, "images": images, "annotations": annotations}))
    return file


def test_coco_captions_file_groups_captions_by_image_and_reports_bad_records(coco):
    records, problems = read_coco(str(coco))
    folder = coco.parent.parent / "val2017"
    assert [r.image_path for r in records] == [str(folder / f"00000{i}.png") for i in (1, 2, 3, 4, 9)]
    assert records[0].captions == ("A red bus on a street.", "A double-decker bus.", "A bus parked near a “stop” sign.")
    assert records[1].captions == ("Two dogs play in the snow.",)
    assert {r.split for r in records} == {None}
    assert len(problems) == 6  # and 000004.png is missing: reported when the split is opened
    text = "\n".join(problems)
    assert f"{coco}: images[5]: KeyError: 'file_name'" in text
    assert f"{coco}: images[6]: ValueError: id 1 is used by an earlier image" in text
    assert f"{coco}: annotations[6]: KeyError: 'image_id 7 is not among the usable images'" in text
    assert f"{coco}: annotations[7]: KeyError: 'caption'" in text
    assert f"{coco}: annotations[8]: TypeError: the caption must be a non-empty string" in text
    assert f"{coco}: image id 5 (000005.png): no caption" in text


def test_coco_image_folder_beside_the_file_or_image_root(coco, tmp_path):
    beside = tmp_path / "flat"
    beside.mkdir()
    flat = beside / "captions_val2017.json"
    flat.write_text(coco.read_text())
    with pytest.raises(DataError, match=f"COCO image folder not found: looked for {beside / 'val2017'} and"):
        read_coco(str(flat))
    (coco.parent.parent / "val2017").rename(beside / "val2017")
    records, _ = read_coco(str(flat))
    assert records[0].image_path == str(beside / "val2017" / "000001.png")
    records, _ = read_coco(str(coco), image_root=str(beside / "val2017"))
    assert len(records) == 5 and records[0].image_path == str(beside / "val2017" / "000001.png")


def test_coco_through_the_data_spec_and_the_eval_cli(coco, tmp_path, capsys):
    assert parse_data_spec(f"coco:{coco}") == ("coco", str(coco))
    for split in ("val", "test"):  # a captions file has no split: every image, either way
        dataset = open_dataset(f"coco:{coco}", split, image_size=32, size=0)
        assert isinstance(dataset, MultiCaptionFiles) and len(dataset) == 4 and len(dataset.bad_records) == 7
        assert dataset.bad_records[-1] == f"{coco}: image not found: {coco.parent.parent / 'val2017' / '000004.png'}"
    item = dataset[0]
    assert item["image"].shape == (3, 32, 32) and len(item["captions"]) == 3
    assert dataset[3]["image"] is None and "000009.png" in dataset[3]["key"]
    with pytest.raises(DataError, match="coco is a short-caption evaluation set .* python -m mulclip_fast.eval"):
        open_dataset(f"coco:{coco}", "train", 32, 0)

    weights = tmp_path / "tiny.pt"
    torch.save(CLIP(preset_config("tiny")).state_dict(), weights)
    out = tmp_path / "eval.json"
    argv = ["--checkpoint", str(weights), "--preset", "tiny", "--data", f"coco:{coco}", "--out", str(out)]
    assert eval_main([*argv, "--batch-size", "2"]) == 0
    result = json.loads(out.read_text())
    assert set(result) == {f"{d}_r{k}" for d in ("t2i", "i2t") for k in (1, 5, 10)} | {
        "n_images",
        "n_captions",
        "n_skipped",
        "skipped",
    }
    assert (result["n_images"], result["n_captions"], result["n_skipped"]) == (3, 5, 1)
    assert result["t2i_r5"] == result["i2t_r5"] == 1.0  # 3 images, 5 captions: everything is within 5
    printed = capsys.readouterr()
    assert "images 3, captions 5, skipped 1" in printed.out and "7 bad records skipped" in printed.err
    (path,) = result["skipped"]  # the unreadable image, by path, also on stderr
    assert path.endswith("000009.png") and f"skipped {path}: " in printed.err
    assert eval_main([*argv, "--pairs", "2"]) == 0  # --pairs caps the images
    assert json.loads(out.read_text())["n_images"] == 2

    assert train_main(["--data", f"coco:{coco}", "--out", str(tmp_path / "run")]) == 2
    assert "coco is a short-caption evaluation set" in capsys.readouterr().err


def test_coco_bad_files_fail_clearly(tmp_path):
    with pytest.raises(DataError, match="COCO file not found"):
        read_coco(str(tmp_path / "nothing.json"))
    bad = tmp_path / "captions_x.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="is not valid JSON"):
        read_coco(str(bad))
    bad.write_text(json.dumps([{"image": "a.png"}]))
    with pytest.raises(DataError, match="must hold a JSON object with an 'images' list"):
        read_coco(str(bad))
    (tmp_path / "x").mkdir()
    bad.write_text(json.dumps({"images": [], "annotations": {}}))
    with pytest.raises(DataError, match="'annotations' must be a list, got dict"):
        read_coco(str(bad))
    bad.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}], "annotations": []}))
    with pytest.raises(DataError, match=r"no usable coco image \(1 bad: .*image id 1 \(a.png\): no caption"):
        open_dataset(f"coco:{bad}", "test", 32, 0)
    with pytest.raises(DataError, match="image root is not a directory"):
        open_dataset(f"coco:{bad}", "test", 32, 0, image_root=str(tmp_path / "nowhere"))


# ---------------------------------------------------------------------------- Karpathy COCO / Flickr30k
def _karpathy_image(filename, split, captions, **more):
    return {"filename": filename, "split": split, "sentences": [{"raw": c, "tokens": []} for c in captions], **more}


@pytest.fixture
def karpathy_coco(tmp_path):
    root = tmp_path / "karpathy"
    entries = [
        _karpathy_image("COCO_val2014_1.jpg", "test", ["A cat on a sofa.", "A sleeping cat."], filepath="val2014"),
        _karpathy_image("COCO_val2014_2.jpg", "test", ["A plane in the sky."], filepath="val2014"),
        _karpathy_image("COCO_val2014_3.jpg", "val", ["A boat.", "A small boat."], filepath="val2014"),
        _karpathy_image("COCO_train2014_4.jpg", "restval", ["A horse."], filepath="train2014"),
        _karpathy_image("COCO_train2014_5.jpg", "train", ["A tree."], filepath="train2014"),
        _karpathy_image("COCO_val2014_6.jpg", "test", ["Missing photo."], filepath="val2014"),  # no file
        _karpathy_image("COCO_val2014_7.jpg", "test", [], filepath="val2014"),  # no sentence
        {"filename": "COCO_val2014_8.jpg", "split": "test", "filepath": "val2014"},  # no sentences field
        "not an object",
    ]
    entries[1]["sentences"].append({"tokens": ["no", "raw"]})  # a bad sentence: skipped, its image kept
    for entry in entries[:5] + entries[6:8]:
        _write_image(root / entry["filepath"] / entry["filename"])
    file = root / "dataset_coco.json"
    file.write_text(json.dumps({"dataset": "coco", "images": entries}))
    return file


def test_karpathy_coco_splits_and_bad_records(karpathy_coco):
    records, problems = read_coco(str(karpathy_coco))
    root = karpathy_coco.parent
    assert [r.split for r in records] == ["test", "test", "val", "restval", "train", "test"]
    assert records[0].image_path == str(root / "val2014" / "COCO_val2014_1.jpg")
    assert records[0].captions == ("A cat on a sofa.", "A sleeping cat.")
    assert records[1].captions == ("A plane in the sky.",)
    text = "\n".join(problems)
    assert len(problems) == 4
    assert f"{karpathy_coco}: images[1].sentences[1]: KeyError: 'raw'" in text
    assert f"{karpathy_coco}: images[6]: no usable caption" in text
    assert f"{karpathy_coco}: images[7]: KeyError: 'sentences'" in text
    assert f"{karpathy_coco}: images[8]: TypeError: expected a JSON object, got str" in text
    test = open_dataset(f"coco:{karpathy_coco}", "test", 32, 0)
    val = open_dataset(f"coco:{karpathy_coco}", "val", 32, 0)
    assert [len(test), len(val)] == [2, 1] and val[0]["captions"] == ["A boat.", "A small boat."]
    missing = f"{karpathy_coco}: image not found: {root / 'val2014' / 'COCO_val2014_6.jpg'}"
    assert test.bad_records == [*problems, missing] and val.bad_records == problems
    # only the evaluated split's images need to be there (the file lists every split's)
    for name in ("COCO_train2014_4.jpg", "COCO_train2014_5.jpg"):
        (root / "train2014" / name).unlink()
    assert len(open_dataset(f"coco:{karpathy_coco}", "test", 32, 0).bad_records) == 5


def test_karpathy_split_without_images_is_an_error(tmp_path):
    root = tmp_path / "k"
    _write_image(root / "a.jpg")
    file = root / "dataset_coco.json"
    file.write_text(json.dumps({"images": [_karpathy_image("a.jpg", "train", ["A thing."])]}))
    with pytest.raises(DataError, match=r"1 images but none in the 'test' split \(splits: \['train'\]\)"):
        open_dataset(f"coco:{file}", "test", 32, 0)
    file.write_text(json.dumps({"images": [_karpathy_image("b.jpg", "test", ["Another thing."])]}))
    with pytest.raises(DataError, match=f"none of the 1 test images of {file} exists, e.g. {root / 'b.jpg'}"):
        open_dataset(f"coco:{file}", "test", 32, 0)


@pytest.fixture
def flickr30k(tmp_path):
    root = tmp_path / "f30k"
    entries = [
        _karpathy_image("1000092795.jpg", "test", [f"Two young guys outside, caption {i}." for i in range(5)]),
        _karpathy_image("10002456.jpg", "test", ["Workers on a building."]),
        _karpathy_image("1000268201.jpg", "train", ["A child in a pink dress."]),
        _karpathy_image("gone.jpg", "test", ["Missing photo."]),
    ]
    for entry in entries[:3]:
        _write_image(root / "flickr30k-images" / entry["filename"], colour=(len(entry["filename"]) * 9, 40, 90))
    file = root / "dataset_flickr30k.json"
    file.write_text(json.dumps({"dataset": "flickr30k", "images": entries}))
    return file


def test_flickr30k_reads_karpathy_split_and_its_image_folder(flickr30k, tmp_path):
    records, problems = read_flickr30k(str(flickr30k))
    folder = flickr30k.parent / "flickr30k-images"
    names = ("1000092795.jpg", "10002456.jpg", "1000268201.jpg", "gone.jpg")
    assert [r.image_path for r in records] == [str(folder / name) for name in names]
    assert len(records[0].captions) == 5 and problems == []
    test = open_dataset(f"flickr30k:{flickr30k}", "test", 32, 0)
    assert len(test) == 2 and test.bad_records == [f"{flickr30k}: image not found: {folder / 'gone.jpg'}"]
    with pytest.raises(DataError, match="flickr30k is a short-caption evaluation set"):
        open_dataset(f"flickr30k:{flickr30k}", "train", 32, 0)
    folder.rename(tmp_path / "photos")
    with pytest.raises(DataError, match=f"Flickr30k image folder not found: {folder}; pass --image-root"):
        read_flickr30k(str(flickr30k))
    assert len(open_dataset(f"flickr30k:{flickr30k}", "test", 32, 0, image_root=str(tmp_path / "photos"))) == 2


def test_the_data_spec_names_the_short_caption_sets(tmp_path):
    with pytest.raises(DataError, match="urban1k:PATH, coco:PATH, flickr30k:PATH"):
        parse_data_spec("laion:/x")
    with pytest.raises(DataError, match="data path does not exist"):
        parse_data_spec(f"flickr30k:{tmp_path / 'missing.json'}")
