"""Faults a long run meets: a run directory shared by two runs, kills in the middle of a save, a full disk,
torn logs, unreadable checkpoints, bad encodings, oversized images, unwritable outputs. Each asserts that
no data is lost and that every error is an ``error: …`` line with exit code 2 (docs/training.md,
"Reliability").
"""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch
from PIL import Image

from mulclip_fast import eval as eval_cli
from mulclip_fast.data import open_dataset, read_docci
from mulclip_fast.train import main, train

from .test_train import small_config


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") or "\nerror: " in err, err
    assert "Traceback" not in err
    return err


# ------------------------------------------------------------------------------------ one run per directory


def test_a_full_disk_during_a_save_leaves_no_partial_file_and_the_run_resumes(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    train(small_config(out, loss="global", steps=4), stop_at_step=2)
    real_save = torch.save

    def disk_full(obj, path):
        with open(path, "wb") as handle:
            handle.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(torch, "save", disk_full)
    assert main(["--resume", "--out", str(out)]) == 2
    assert "No space left on device" in _error(capsys)
    assert os.listdir(out / "checkpoints") == ["step_00000002.pt"]
    monkeypatch.setattr(torch, "save", real_save)
    assert main(["--resume", "--out", str(out)]) == 0
    assert sorted(os.listdir(out / "checkpoints")) == ["step_00000002.pt", "step_00000004.pt"]


def _docci_with_unreadable_images(tmp_path, n: int, unreadable: set[int]):
    """A DOCCI file of ``n`` training records whose images at ``unreadable`` positions are corrupt."""
    images = tmp_path / "images"
    images.mkdir()
    lines = []
    for i in range(n):
        if i in unreadable:
            (images / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\ncorrupt")
        else:
            Image.new("RGB", (64, 64), (20 * i, 90, 200 - 15 * i)).save(images / f"{i}.png")
        lines.append({"image_file": f"{i}.png", "description": f"Picture {i}. It is plain.", "split": "train"})
    data = tmp_path / "docci.jsonl"
    data.write_text("\n".join(json.dumps(x) for x in lines))
    return data, images


def test_a_badly_encoded_line_is_a_bad_record(tmp_path):
    data = tmp_path / "docci.jsonl"
    good = json.dumps({"image_file": "a.png", "description": "A caption.", "split": "train"}).encode()
    data.write_bytes(good + b"\n" + b'{"image_file": "b.png", "description": "caf\xe9"}\n' + good + b"\n")
    records, problems = read_docci(str(data), str(tmp_path))
    assert len(records) == 2
    (problem,) = problems
    assert problem.startswith(f"{data}:2: UnicodeDecodeError")


def test_an_image_above_the_pixel_limit_is_skipped_with_its_path(tmp_path, monkeypatch):
    data, images = _docci_with_unreadable_images(tmp_path, 3, set())
    Image.new("RGB", (400, 400)).save(images / "1.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 60_000)  # 400x400 is above twice that: PIL refuses it
    dataset = open_dataset(f"docci:{data}", "train", 64, 0)
    item = dataset[1]
    assert item["image"] is None and "exceeds limit" in item["error"] and item["key"] == str(images / "1.png")
    assert dataset[0]["image"] is not None


def test_eval_out_that_cannot_be_written_is_an_error_before_evaluating(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(eval_cli, "load_model_for_eval", lambda *a: pytest.fail("evaluation started"))
    file = tmp_path / "file"
    file.write_text("")
    for out, message in ((file / "eval.json", "does not exist"), (tmp_path, "is a directory")):
        assert eval_cli.main(["--checkpoint", str(tmp_path), "--out", str(out)]) == 2
        assert message in _error(capsys)
