"""Real-world file warts: annotation files with a byte-order mark, EXIF-rotated photos, captions whose
sentences hold abbreviations. Each loader reads what a user's crawl or editor produces without losing
records or reading them wrongly."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image, ImageOps

from mulclip_fast.data import read_coco, read_dci, read_docci, read_flickr30k, read_sharegpt4v, read_urban1k

BOM = b"\xef\xbb\xbf"  # what Windows editors (Notepad, Excel's "UTF-8" CSV/JSON export) put first


def _write_image(path, colour=(200, 30, 30), size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


# ------------------------------------------------------------------------------------- byte-order marks
def test_annotation_files_with_a_byte_order_mark_lose_no_record(tmp_path):
    """A UTF-8 BOM is valid UTF-8; Python's "utf-8" codec keeps it as U+FEFF, which json rejects, so the
    first DOCCI line became a bad record and a ShareGPT4V / DCI / COCO / Flickr30k file an error."""
    # DOCCI: the BOM of the first line, and one where two BOM'd files were concatenated (`cat a b > c`)
    docci = tmp_path / "docci"
    lines = [json.dumps({"image_file": f"{i}.jpg", "description": f"Photo {i}.", "split": "train"}) for i in range(3)]
    _write_image(docci / "images" / "0.jpg")
    (docci / "docci_descriptions.jsonlines").write_bytes(
        BOM + (lines[0] + "\n" + lines[1] + "\n").encode() + BOM + (lines[2] + "\n").encode()
    )
    records, problems = read_docci(str(docci))
    assert problems == [] and [r.caption for r in records] == ["Photo 0.", "Photo 1.", "Photo 2."]

    sharegpt = tmp_path / "sharegpt4v.json"
    entries = [{"id": "1", "image": "a.jpg", "conversations": [{"from": "gpt", "value": "A cat."}]}]
    sharegpt.write_bytes(BOM + json.dumps(entries).encode())
    records, problems = read_sharegpt4v(str(sharegpt))
    assert problems == [] and [r.caption for r in records] == ["A cat."]

    dci = tmp_path / "dci"
    _write_image(dci / "photos" / "sa_1.jpg")
    (dci / "annotations").mkdir()
    annotation = {"image": "sa_1.jpg", "short_caption": "A car.", "extra_caption": "It is red."}
    (dci / "annotations" / "sa_1.json").write_bytes(BOM + json.dumps(annotation).encode())
    records, problems = read_dci(str(dci))
    assert problems == [] and [r.caption for r in records] == ["A car.\nIt is red."]

    urban = tmp_path / "urban"
    _write_image(urban / "image" / "1.jpg")
    (urban / "caption").mkdir()
    (urban / "caption" / "1.txt").write_bytes(BOM + b"A street.")
    records, problems = read_urban1k(str(urban))
    assert problems == [] and [r.caption for r in records] == ["A street."]  # no U+FEFF kept in the caption

    coco = tmp_path / "coco" / "captions_val2017.json"
    _write_image(coco.parent / "val2017" / "1.jpg")
    obj = {"images": [{"id": 1, "file_name": "1.jpg"}], "annotations": [{"image_id": 1, "caption": "A dog."}]}
    coco.write_bytes(BOM + json.dumps(obj).encode())
    records, problems = read_coco(str(coco))
    assert problems == [] and [r.captions for r in records] == [("A dog.",)]

    flickr = tmp_path / "flickr" / "dataset_flickr30k.json"
    (flickr.parent / "flickr30k-images").mkdir(parents=True)
    karpathy = {"images": [{"filename": "1.jpg", "split": "test", "sentences": [{"raw": "A boat."}]}]}
    flickr.write_bytes(BOM + json.dumps(karpathy).encode())
    records, problems = read_flickr30k(str(flickr))
    assert problems == [] and [r.captions for r in records] == [("A boat.",)]


# ---------------------------------------------------------------------------------------- EXIF rotation
@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_photo_is_read_as_its_exif_orientation_shows_it(tmp_path, orientation):
    """Cameras and phones store a portrait photo's pixels sideways with an EXIF Orientation tag; every
    viewer, browser (and so a captioner) shows it turned, and captions say "on the left" of what they saw.
    The loader turns it too, all eight orientations, instead of reading the pixels as stored."""
    from mulclip_fast.data.images import load_image

    stored = Image.new("RGB", (60, 40), (255, 0, 0))  # four quadrants of different colours
    stored.paste((0, 255, 0), (30, 0, 60, 20))
    stored.paste((0, 0, 255), (0, 20, 30, 40))
    stored.paste((255, 255, 255), (30, 20, 60, 40))
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    stored.save(tmp_path / "camera.png", exif=exif)  # PNG: lossless, so the comparison is exact
    # PIL's own reading of the tag is the oracle (the loader does not call it: on some malformed tags it
    # raises while re-encoding the EXIF block, of images that decode fine).
    with Image.open(tmp_path / "camera.png") as camera:
        shown = ImageOps.exif_transpose(camera)
    assert shown.size == ((40, 60) if orientation >= 5 else (60, 40))
    shown.save(tmp_path / "shown.png")
    assert torch.equal(load_image(str(tmp_path / "camera.png"), 16), load_image(str(tmp_path / "shown.png"), 16))


# ------------------------------------------------------------------------------------ sentence splitting
@pytest.mark.parametrize(
    ("caption", "sentences"),
    [
        # A title before a name: the summary was "Dr." and "Smith stands ..." a subcaption of its own.
        ("Dr. Smith stands by a 3.5 m statue. It is bronze.", ["Dr. Smith stands by a 3.5 m statue.", "It is bronze."]),
        (
            "Mr. and Mrs. Jones wave. St. Mark's Square is behind them.",
            ["Mr. and Mrs. Jones wave.", "St. Mark's Square is behind them."],
        ),
        # Latin abbreviations inside a sentence
        (
            "There is furniture, e.g. a chair and a desk. The floor is oak.",
            ["There is furniture, e.g. a chair and a desk.", "The floor is oak."],
        ),
        (
            "Two shapes (i.e. a circle and a square) vs. one. Nothing else.",
            ["Two shapes (i.e. a circle and a square) vs. one.", "Nothing else."],
        ),
        # Abbreviations that may also end a sentence: they do when a capital letter follows
        (
            "It is 5 p.m. on a sunny day. Cups, plates, etc. The U.S. flag flies.",
            ["It is 5 p.m. on a sunny day.", "Cups, plates, etc.", "The U.S. flag flies."],
        ),
        (
            "Cups, plates, etc. are on the table. It costs $3.50. Approx. 20 people wait.",
            ["Cups, plates, etc. are on the table.", "It costs $3.50.", "Approx. 20 people wait."],
        ),
        # A sentence ending inside quotes or brackets ends there when a capital letter follows
        ('The sign reads "OPEN." Below it hangs a clock.', ['The sign reads "OPEN."', "Below it hangs a clock."]),
        (
            'A poster says "Sale!" in red. (It is torn.) The wall is white.',
            ['A poster says "Sale!" in red.', "(It is torn.)", "The wall is white."],
        ),
        # Chinese and Japanese full stops need no space after them
        ("一只猫坐在桌子上。旁边有一个杯子。", ["一只猫坐在桌子上。", "旁边有一个杯子。"]),
        # unchanged: lower-case text, decimals, no sentence end at all, ellipses, ! and ?
        ("a cat. a dog. 3.5 m tall", ["a cat.", "a dog.", "3.5 m tall"]),
        ("A run-on caption without any sentence end", ["A run-on caption without any sentence end"]),
        ("Is it raining? Yes... it is! Wow", ["Is it raining?", "Yes...", "it is!", "Wow"]),
    ],
)
def test_sentences_do_not_end_at_abbreviations(caption, sentences):
    """The summary (the first sentence) and SAP's subcaptions (the sentences) came from splitting after
    every ". ": a caption opening with "Dr. Smith ..." had the summary "Dr.", and "e.g. a chair" made two
    subcaptions, neither describing a part of the image."""
    from mulclip_fast.data import split_sentences, summary_of

    assert split_sentences(caption) == sentences
    assert summary_of(caption) == sentences[0]


def test_the_synthetic_captions_split_as_before():
    """The synthetic captions hold no abbreviation: their summaries and subcaptions (and so the default
    run's numbers) are those of the earlier rule, a split after every . ! ? followed by white space."""
    import re

    from mulclip_fast.data import SyntheticLongCaptions, split_sentences

    earlier = re.compile(r"(?<=[.!?])\s+")
    data = SyntheticLongCaptions(size=200, seed=3, split="train", image_size=32, twin_fraction=0.5)
    for i in range(len(data)):
        item = data[i]
        for text in filter(None, (item["caption"], item["probe"])):
            assert split_sentences(text) == [s for s in earlier.split(text.strip()) if s]


# -------------------------------------------------------------------------------------- DOCCI directory
def test_a_docci_directory_reads_docci_descriptions_whatever_else_it_holds(tmp_path):
    """`--data docci:DIR` read the first .jsonl / .jsonlines file by name, so a DIR that also held, say,
    `captions_cleaned.jsonl` trained on that file without a word. DOCCI's descriptions file is read when
    present; several other candidates without it are an error naming them."""
    from mulclip_fast.data import DataError

    _write_image(tmp_path / "images" / "a.jpg")
    line = {"image_file": "a.jpg", "description": "From DOCCI.", "split": "train"}
    (tmp_path / "docci_descriptions.jsonlines").write_text(json.dumps(line) + "\n")
    (tmp_path / "captions_cleaned.jsonl").write_text(json.dumps({**line, "description": "Another file."}) + "\n")
    (tmp_path / "docci_metadata.jsonlines").write_text(json.dumps({"image_file": "a.jpg"}) + "\n")
    records, problems = read_docci(str(tmp_path))
    assert [r.caption for r in records] == ["From DOCCI."] and problems == []
    (tmp_path / "docci_descriptions.jsonlines").unlink()
    with pytest.raises(DataError, match="captions_cleaned.jsonl, docci_metadata.jsonlines"):
        read_docci(str(tmp_path))
    (tmp_path / "docci_metadata.jsonlines").unlink()
    records, _ = read_docci(str(tmp_path))  # the only candidate: read, whatever its name
    assert [r.caption for r in records] == ["Another file."]


# ------------------------------------------------------------------------------------ extreme shapes
def test_a_thin_strip_is_skipped_instead_of_resized_into_gigabytes(tmp_path, monkeypatch):
    """A 1-pixel-high divider or spacer image (web crawls hold many) is tiny on disk and in pixels, but
    CLIP's transform scales its *short* side to the model's resolution: a 20000x1 PNG of 60 KB became a
    4,480,000 x 224 intermediate (3 GB) and MemoryError, which no caller catches, ended the run. An image
    whose resized form would exceed PIL's pixel limit is now unreadable like one above the limit itself:
    skipped and counted with its reason. Here the limit is lowered so the test stays small."""
    from mulclip_fast.data.images import load_image, try_load_image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200_000)
    Image.new("RGB", (400, 1), (10, 20, 30)).save(tmp_path / "strip.png")  # 400 pixels, 12800 x 32 resized
    Image.new("RGB", (2, 300), (10, 20, 30)).save(tmp_path / "tall.png")  # 32 x 4800 resized: within the limit
    Image.new("RGB", (1, 1), (10, 20, 30)).save(tmp_path / "dot.png")
    image, reason = try_load_image(str(tmp_path / "strip.png"), 32)
    assert image is None and reason.startswith("ValueError: ") and "400x1" in reason and "12800x32" in reason
    assert load_image(str(tmp_path / "tall.png"), 32).shape == (3, 32, 32)
    assert load_image(str(tmp_path / "dot.png"), 32).shape == (3, 32, 32)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # PIL's limit switched off: no limit here either
    assert load_image(str(tmp_path / "strip.png"), 32).shape == (3, 32, 32)
