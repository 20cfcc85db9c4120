"""DCI and Urban1k loaders: parsing, bad records reported by path, empty sources, and end-to-end reads
through the ``--data kind:PATH`` spec and the train / eval CLIs."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from mulclip_fast.data import Collator, DataError, open_dataset, parse_data_spec, read_dci, read_urban1k, summary_of
from mulclip_fast.eval import main as eval_main
from mulclip_fast.model import CLIP, preset_config
from mulclip_fast.train import main as train_main


def _write_image(path, colour=(30, 120, 200), size=(48, 36)):
    Image.new("RGB", size, colour).save(path)


# ----------------------------------------------------------------------------------------------- Urban1k
@pytest.fixture
def urban1k(tmp_path):
    root = tmp_path / "Urban1k"
    (root / "image").mkdir(parents=True)
    (root / "caption").mkdir()
    for i in (1, 2, 3, 10):  # 10 sorts after 3: stems are ordered by number
        _write_image(root / "image" / f"{i}.jpg", colour=(20 * i, 50, 90))
        (root / "caption" / f"{i}.txt").write_text(f"Street {i} under a grey sky. A red bus passes.\n")
    (root / "caption" / "4.txt").write_text("A caption whose image is missing.")
    _write_image(root / "image" / "5.jpg")  # image without caption
    _write_image(root / "image" / "6.jpg")
    (root / "caption" / "6.txt").write_text("  \n")  # blank caption
    _write_image(root / "image" / "7.jpg")
    (root / "caption" / "7.txt").write_bytes(b"caf\xe9 in latin-1")  # not UTF-8
    _write_image(root / "image" / "8.jpg")
    _write_image(root / "image" / "8.png")  # two images for one caption
    (root / "caption" / "8.txt").write_text("Which image?")
    (root / "image" / "9.jpg").write_bytes(b"not a jpeg")  # readable record, corrupt image: skipped when read
    (root / "caption" / "9.txt").write_text("A corrupt photo.")
    (root / "image" / ".DS_Store").write_bytes(b"\0")  # not an image suffix: ignored
    (root / "caption" / "notes.md").write_text("not a caption")  # not .txt: ignored
    return root


def test_urban1k_parses_pairs_by_stem_and_reports_bad_records(urban1k):
    records, problems = read_urban1k(str(urban1k))
    assert [r.image_path for r in records] == [str(urban1k / "image" / f"{i}.jpg") for i in (1, 2, 3, 9, 10)]
    assert records[0].caption == "Street 1 under a grey sky. A red bus passes."
    assert {r.split for r in records} == {"test"}
    assert len(problems) == 5
    by_path = {p.split(": ", 1)[0]: p for p in problems}
    caption, image = urban1k / "caption", urban1k / "image"
    assert "no image 4.jpg" in by_path[str(caption / "4.txt")]
    assert "no caption file 5.txt" in by_path[str(image / "5.jpg")]
    assert "empty caption" in by_path[str(caption / "6.txt")]
    assert "UnicodeDecodeError" in by_path[str(caption / "7.txt")]
    assert "several images" in by_path[str(caption / "8.txt")] and "'8.png'" in by_path[str(caption / "8.txt")]


def test_urban1k_through_the_data_spec(urban1k):
    assert parse_data_spec(f"urban1k:{urban1k}") == ("urban1k", str(urban1k))
    test = open_dataset(f"urban1k:{urban1k}", "test", image_size=32, size=0)
    val = open_dataset(f"urban1k:{urban1k}", "val", image_size=32, size=0, holdout=1)
    assert len(test) == len(val) == 5  # an evaluation set: every record, whatever the holdout
    assert len(test.bad_records) == 5
    item = test[0]
    assert item["image"].shape == (3, 32, 32) and item["caption"].startswith("Street 1 ")
    assert not torch.equal(test[0]["image"], test[1]["image"])  # each record reads its own image
    batch = Collator()([test[i] for i in range(len(test))])
    assert len(batch) == 4 and batch.images.shape == (4, 3, 32, 32)
    assert [path for path, _ in batch.skipped] == [str(urban1k / "image" / "9.jpg")]


def test_urban1k_image_root_replaces_the_image_folder(urban1k, tmp_path):
    elsewhere = tmp_path / "photos"
    elsewhere.mkdir()
    _write_image(elsewhere / "4.jpg")
    records, problems = read_urban1k(str(urban1k), image_root=str(elsewhere))
    assert [r.image_path for r in records] == [str(elsewhere / "4.jpg")]
    assert any("no image 1.jpg" in p for p in problems)


def test_urban1k_bad_layouts_fail_clearly(tmp_path, urban1k):
    empty = tmp_path / "empty"
    (empty / "image").mkdir(parents=True)
    (empty / "caption").mkdir()
    with pytest.raises(DataError, match=r"no usable urban1k record \(0 bad: no records found\)"):
        open_dataset(f"urban1k:{empty}", "test", 32, 0)
    (empty / "caption" / "1.txt").write_text("No image for me.")
    with pytest.raises(DataError, match=r"no usable urban1k record \(1 bad: .*1\.txt: no image 1\.jpg"):
        open_dataset(f"urban1k:{empty}", "test", 32, 0)
    no_captions = tmp_path / "no_captions"
    (no_captions / "image").mkdir(parents=True)
    with pytest.raises(DataError, match=f"Urban1k folder not found: {no_captions / 'caption'}"):
        open_dataset(f"urban1k:{no_captions}", "test", 32, 0)
    with pytest.raises(DataError, match="must be a folder"):
        open_dataset(f"urban1k:{urban1k / 'caption' / '1.txt'}", "test", 32, 0)
    with pytest.raises(DataError, match="none for the 'train' split; urban1k is an evaluation set"):
        open_dataset(f"urban1k:{urban1k}", "train", 32, 0)


# --------------------------------------------------------------------------------------------------- DCI
def _annotation(image, short, extra, **more):
    return {"image": image, "short_caption": short, "extra_caption": extra, "mask_data": {}, "mask_keys": [], **more}


@pytest.fixture
def dci(tmp_path):
    base = tmp_path / "dci_root"
    root = base / "densely_captioned_images"
    annotations, photos = root / "annotations", root / "photos"
    annotations.mkdir(parents=True)
    photos.mkdir()
    good = {
        "sa_1.json": _annotation("sa_1.jpg", "A red car", "It is parked by a wall. A tree stands behind it."),
        "sa_2.json": _annotation("sa_2.jpg", "A blue door.", "", summaries={"base": ["A door."]}),
        "sa_3.json": _annotation("sa_3.jpg", "", "Only the extra caption is filled in."),
        "sa_9.json": _annotation("sa_9.jpg", "A corrupt photo.", "It cannot be decoded."),
    }
    for i, (name, obj) in enumerate(good.items()):
        if name != "sa_9.json":
            _write_image(photos / obj["image"], colour=(60 * i, 20, 200))
        (annotations / name).write_text(json.dumps(obj))
    (photos / "sa_9.jpg").write_bytes(b"not a jpeg")
    (annotations / "sa_4.json").write_text("{not json")
    (annotations / "sa_5.json").write_text(json.dumps({"image": "sa_1.jpg", "short_caption": "No extra."}))
    (annotations / "sa_6.json").write_text(json.dumps(_annotation("gone.jpg", "Missing photo.", "Nowhere.")))
    (annotations / "sa_7.json").write_text(json.dumps(_annotation("sa_1.jpg", " ", "\n")))
    (annotations / "sa_8.json").write_text(json.dumps(["a", "list"]))
    (annotations / "sa_10.json").write_text(json.dumps(_annotation(17, "Numeric image.", "")))
    (annotations / "README.txt").write_text("not an annotation")  # not .json: ignored
    (root / "splits.json").write_text(json.dumps({"train": ["sa_1.json"], "valid": [], "test": ["sa_2.json"]}))
    return base


def test_dci_builds_the_long_caption_and_reports_bad_records(dci):
    root = dci / "densely_captioned_images"
    records, problems = read_dci(str(dci))
    assert [r.image_path for r in records] == [str(root / "photos" / f"sa_{i}.jpg") for i in (1, 2, 3, 9)]
    assert records[0].caption == "A red car.\nIt is parked by a wall. A tree stands behind it."
    assert summary_of(records[0].caption) == "A red car."  # the short caption is the summary
    assert records[1].caption == "A blue door."
    assert records[2].caption == "Only the extra caption is filled in."
    assert {r.split for r in records} == {"test"}  # every split of splits.json is evaluation data
    assert len(problems) == 6
    by_file = {p.split(": ", 1)[0]: p for p in problems}
    annotations = root / "annotations"
    assert "JSONDecodeError" in by_file[str(annotations / "sa_4.json")]
    assert "KeyError: 'extra_caption'" in by_file[str(annotations / "sa_5.json")]
    assert f"image not found: {root / 'photos' / 'gone.jpg'}" in by_file[str(annotations / "sa_6.json")]
    assert "empty caption" in by_file[str(annotations / "sa_7.json")]
    assert "expected a JSON object, got list" in by_file[str(annotations / "sa_8.json")]
    assert "must be strings" in by_file[str(annotations / "sa_10.json")]
    # the densely_captioned_images folder itself is accepted as PATH too
    assert read_dci(str(root)) == (records, problems)


def test_dci_through_the_data_spec(dci):
    test = open_dataset(f"dci:{dci}", "test", image_size=32, size=0)
    assert len(test) == 4 and len(test.bad_records) == 6
    assert test[0]["image"].shape == (3, 32, 32) and test[0]["caption"].startswith("A red car.\n")
    batch = Collator()([test[i] for i in range(len(test))])
    assert len(batch) == 3 and batch.long_ids.shape[0] == 3
    assert [path for path, _ in batch.skipped] == [str(dci / "densely_captioned_images" / "photos" / "sa_9.jpg")]
    with pytest.raises(DataError, match="none for the 'train' split; dci is an evaluation set"):
        open_dataset(f"dci:{dci}", "train", 32, 0)


def test_dci_bad_layouts_fail_clearly(tmp_path, dci):
    with pytest.raises(DataError, match="no DCI annotations folder in"):
        open_dataset(f"dci:{tmp_path}", "test", 32, 0)
    root = tmp_path / "bare"
    (root / "annotations").mkdir(parents=True)
    with pytest.raises(DataError, match=f"DCI photos folder not found: {root / 'photos'}"):
        open_dataset(f"dci:{root}", "test", 32, 0)
    (root / "photos").mkdir()
    with pytest.raises(DataError, match=r"no usable dci record \(0 bad: no records found\)"):
        open_dataset(f"dci:{root}", "test", 32, 0)
    (root / "annotations" / "a.json").write_text("[]")
    with pytest.raises(DataError, match=r"no usable dci record \(1 bad: .*a\.json: TypeError"):
        open_dataset(f"dci:{root}", "test", 32, 0)
    # --image-root replaces photos/, which then need not exist
    photos = dci / "densely_captioned_images" / "photos"
    moved = tmp_path / "moved_photos"
    photos.rename(moved)
    with pytest.raises(DataError, match="DCI photos folder not found"):
        open_dataset(f"dci:{dci}", "test", 32, 0)
    assert len(open_dataset(f"dci:{dci}", "test", 32, 0, image_root=str(moved))) == 4


# --------------------------------------------------------------------------------------------------- CLIs
def test_eval_cli_reads_urban1k_and_train_cli_refuses_it(urban1k, tmp_path, capsys):
    weights = tmp_path / "tiny.pt"
    torch.save(CLIP(preset_config("tiny")).state_dict(), weights)
    out = tmp_path / "eval.json"
    argv = ["--checkpoint", str(weights), "--preset", "tiny", "--data", f"urban1k:{urban1k}", "--out", str(out)]
    assert eval_main(argv) == 0
    result = json.loads(out.read_text())
    assert result["n_pairs"] == 4 and result["n_skipped"] == 1 and result["binding_acc"] is None
    (path,) = result["skipped"]  # the unreadable image, by path (until 2026-12-01 only counted)
    assert f"skipped {path}: " in capsys.readouterr().err
    assert train_main(["--data", f"urban1k:{urban1k}", "--out", str(tmp_path / "run")]) == 2
    assert "urban1k is an evaluation set" in capsys.readouterr().err
    assert train_main(["--data", "laion:/x", "--out", str(tmp_path / "run")]) == 2
    assert "dci:PATH, urban1k:PATH, coco:PATH, flickr30k:PATH" in capsys.readouterr().err
