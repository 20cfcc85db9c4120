"""Recall@K and binding accuracy on hand-made similarities; the eval CLI."""

from __future__ import annotations

import ast
import importlib.util
import inspect
import json
import subprocess
import sys

import pytest
import torch

import mulclip_fast.eval
from mulclip_fast.data import open_dataset
from mulclip_fast.eval import (
    binding_accuracy,
    evaluate,
    format_table,
    images_of_records,
    load_model_for_eval,
    recall_at_k,
)
from mulclip_fast.model import CLIP, preset_config


def test_recall_on_identity_and_reversed_rankings():
    perfect = recall_at_k(torch.eye(12))
    assert all(v == 1.0 for v in perfect.values())
    # Each text ranks its own image last: recall is 0 at every K < N.
    worst = recall_at_k(-torch.eye(12))
    assert all(v == 0.0 for v in worst.values())


def test_recall_hand_made_ranks():
    # Rows are texts, columns images; the true image of text i is column i.
    sim = torch.tensor(
        [
            [0.9, 0.1, 0.0, 0.0],  # rank 0
            [0.8, 0.5, 0.0, 0.0],  # rank 1 (image 0 scores higher)
            [0.7, 0.6, 0.3, 0.4],  # rank 3
            [0.0, 0.0, 0.0, 0.5],  # rank 0
        ]
    )
    r = recall_at_k(sim, ks=(1, 2, 4))
    assert r["t2i_r1"] == pytest.approx(0.5) and r["t2i_r2"] == pytest.approx(0.75) and r["t2i_r4"] == 1.0
    # Image→text uses the columns: image 0 is best for text 0 (0.9 > 0.8, 0.7): rank 0;
    # image 1: text 1 has 0.5, texts 0.1, 0.6, 0.0 -> rank 1; image 2: 0.3 vs 0, 0, 0 -> rank 0;
    # image 3: 0.5 vs 0, 0, 0.4 -> rank 0.
    assert r["i2t_r1"] == pytest.approx(0.75) and r["i2t_r2"] == 1.0


def test_ties_count_against_the_true_item():
    r = recall_at_k(torch.zeros(5, 5))
    assert r["t2i_r1"] == 0.0 and r["t2i_r5"] == 1.0 and r["i2t_r1"] == 0.0


def test_recall_rejects_bad_matrices():
    with pytest.raises(ValueError, match="square"):
        recall_at_k(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="NaN"):
        recall_at_k(torch.tensor([[float("nan")]]))


def test_binding_accuracy_counts_strict_wins():
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    true = torch.tensor([[1.0, 0.1], [0.0, 1.0], [0.0, 1.0]])
    swapped = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])  # third row: tie -> not a win
    assert binding_accuracy(image, true, swapped) == pytest.approx(1 / 3)
    assert binding_accuracy(image, true * 5, swapped) == pytest.approx(1 / 3)  # scale-free (normalised)


def test_format_table_lists_every_number():
    result = {k: 0.5 for k in ("t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10")}
    text = format_table({**result, "binding_acc": 0.75, "n_pairs": 10})
    assert "0.500" in text and "binding accuracy 0.750" in text and "pairs 10" in text


@pytest.mark.slow
def test_records_that_name_one_image_file_share_its_index():
    caption_image, first = images_of_records(["a.jpg", "b.jpg", "a.jpg", "c.jpg", "b.jpg"])
    assert caption_image.tolist() == [0, 1, 0, 2, 1] and first == [0, 1, 3]


def _embeddings(image_rows: list[int], keys: list[str]) -> dict:
    """What ``embed_dataset`` returns for records whose images are the one-hot vectors ``image_rows`` and whose
    captions and summaries point exactly at their own image."""
    image = torch.eye(4)[image_rows]
    return {"image": image, "long": image.clone(), "short": image.clone(), "probe": None, "skipped": [], "keys": keys}


def test_an_image_two_records_name_is_ranked_once_with_both_captions(monkeypatch):
    # Records 0 and 2 describe the same file. Counted as two images, each of their captions would find its
    # image tied with the copy, and the tie counts against it: t2i R@1 0.5 with a perfect model.
    emb = _embeddings([0, 1, 0, 2], ["a.jpg", "b.jpg", "a.jpg", "c.jpg"])
    monkeypatch.setattr(mulclip_fast.eval, "embed_dataset", lambda *args, **kwargs: emb)
    result = evaluate(model=None, dataset=None)
    assert {key: result[key] for key in ("t2i_r1", "i2t_r1", "short_t2i_r1", "short_i2t_r1")} == dict.fromkeys(
        ("t2i_r1", "i2t_r1", "short_t2i_r1", "short_i2t_r1"), 1.0
    )
    assert (result["n_pairs"], result["n_images"]) == (4, 3)
    assert "pairs 4 (3 distinct images)" in format_table(result)


def test_with_every_image_distinct_evaluation_is_square_recall(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    emb = {
        "image": torch.randn(40, 8, generator=generator).round(),  # rounded: ties, which count against
        "long": torch.randn(40, 8, generator=generator).round(),
        "short": torch.randn(40, 8, generator=generator).round(),
        "probe": None,
        "skipped": [],
        "keys": [f"img{i}.jpg" for i in range(40)],
    }
    monkeypatch.setattr(mulclip_fast.eval, "embed_dataset", lambda *args, **kwargs: emb)
    result = evaluate(model=None, dataset=None)
    assert {k: result[k] for k in recall_at_k(emb["long"] @ emb["image"].T)} == recall_at_k(
        emb["long"] @ emb["image"].T
    )
    short = recall_at_k(emb["short"] @ emb["image"].T)
    assert {k: result[f"short_{k}"] for k in short} == short
    assert (result["n_pairs"], result["n_images"]) == (40, 40)
    assert "distinct images" not in format_table(result)


def test_a_real_dataset_that_repeats_an_image_evaluates_it_once(tmp_path):
    from PIL import Image

    (tmp_path / "images").mkdir()
    for colour, image in ((40, "a.jpg"), (200, "b.jpg")):
        Image.new("RGB", (40, 32), (colour, 90, 160)).save(tmp_path / "images" / image)
    lines = [
        json.dumps({"image_file": image, "description": f"Picture {i}. Detail {i}.", "split": "test"})
        for i, image in enumerate(["a.jpg", "b.jpg", "a.jpg"])
    ]
    (tmp_path / "docci_descriptions.jsonlines").write_text("\n".join(lines) + "\n")
    torch.manual_seed(0)
    model = CLIP(preset_config("tiny", vision_layers=1, transformer_layers=1))
    dataset = open_dataset(f"docci:{tmp_path}", "test", image_size=model.config.image_resolution, size=0)
    result = evaluate(model, dataset)
    assert (result["n_pairs"], result["n_images"]) == (3, 2)


def test_eval_cli_on_a_training_checkpoint(tmp_path):
    run = tmp_path / "run"
    train = [sys.executable, "-m", "mulclip_fast.train", "--steps", "2", "--batch-size", "4", "--out", str(run)]
    train += ["--model", "vision_layers=1", "--model", "transformer_layers=1", "--eval-pairs", "0", "--loss", "global"]
    subprocess.run(train, check=True, capture_output=True, timeout=240)
    out = tmp_path / "eval.json"
    cmd = [sys.executable, "-m", "mulclip_fast.eval", "--checkpoint", str(run), "--pairs", "30", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    keys = {"t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10", "binding_acc", "n_pairs"}
    assert keys <= set(result) and result["n_pairs"] == 30
    assert all(0.0 <= result[k] <= 1.0 for k in keys - {"n_pairs"})
    assert "R@5" in done.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "mulclip_fast.eval", "--checkpoint", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "error:" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("context", [77, 248])
def test_a_plain_clip_checkpoint_is_evaluated_with_its_own_text_positions(tmp_path, context):
    """OpenAI's CLIP (77 positions) is evaluated as it is, captions truncated to 77 keeping EOT, not
    stretched to 248 as ``--init`` prepares a starting point: stretched and not fine-tuned it is another
    model, and an export of a 77-position run scored otherwise than the run itself."""
    torch.manual_seed(0)
    source = CLIP(preset_config("tiny", context_length=context)).eval()
    path = tmp_path / "clip.pt"
    torch.save({k: v for k, v in source.state_dict().items() if "calibration" not in k}, path)
    model, config = load_model_for_eval(str(path), "tiny", "cpu")
    assert model.config.context_length == context
    assert config["model_overrides"] == ({} if context == 248 else {"context_length": 77})
    ids = torch.zeros(2, context, dtype=torch.long)
    ids[:, 0], ids[:, 1:-1], ids[:, -1] = 49406, 320, 49407
    ids[1, 5:] = 0
    ids[1, 4] = 49407
    with torch.no_grad():
        torch.testing.assert_close(model.eval().encode_text(ids), source.encode_text(ids))


def _imported_modules(module) -> set[str]:
    """Absolute names of every module that ``module``'s source imports, at the top or inside functions."""
    package = module.__name__.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(inspect.getsource(module))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def test_evaluation_does_not_import_training():
    """Training evaluates, so evaluation must not import training (not even lazily): the checkpoint format
    both need lives in ``mulclip_fast.run_checkpoints``, below them."""
    imported = _imported_modules(mulclip_fast.eval)
    assert "mulclip_fast.run_checkpoints" in imported
    assert not [name for name in imported if name == "mulclip_fast.train" or name.startswith("mulclip_fast.train.")]


def test_a_preset_that_is_not_the_training_checkpoints_own_is_an_error(tmp_path, capsys):
    # --preset names a plain CLIP checkpoint's architecture; with a run directory it was silently ignored,
    # even when it named no preset at all (--preset nope), so the user believed another model was scored.
    from mulclip_fast.train import train

    from .test_train import small_config

    run = tmp_path / "run"
    train(small_config(run, loss="global", steps=1))
    with pytest.raises(mulclip_fast.eval.CheckpointError, match="a training checkpoint of a tiny model, not vit-b-16"):
        load_model_for_eval(str(run), "vit-b-16", "cpu")
    assert load_model_for_eval(str(run), "tiny", "cpu")[1]["preset"] == "tiny"
    with pytest.raises(SystemExit) as bad:
        mulclip_fast.eval.main(["--checkpoint", str(run), "--preset", "nope"])
    assert bad.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err


def test_an_export_of_a_run_with_model_overrides_evaluates_with_them(tmp_path, capsys):
    # export prints the --model fields the run overrode; eval of the exported file takes them as train does
    # (before 2026-12-01 it had no --model, so such a file could not be evaluated at all).
    from mulclip_fast.export import main as export_main
    from mulclip_fast.train import train

    from .test_train import SMALL, small_config

    run, exported = tmp_path / "run", tmp_path / "clip.pt"
    train(small_config(run, loss="global", steps=1))
    assert export_main(["--checkpoint", str(run), "--out", str(exported)]) == 0
    assert "--model vision_layers=1 --model transformer_layers=1" in capsys.readouterr().out
    scores = {}
    for name, argv in {
        "run": ["--checkpoint", str(run)],
        "file": ["--checkpoint", str(exported), "--preset", "tiny", *SMALL],
    }.items():
        out = tmp_path / f"{name}.json"
        assert mulclip_fast.eval.main([*argv, "--pairs", "20", "--out", str(out)]) == 0
        scores[name] = json.loads(out.read_text())
    assert scores["file"] == scores["run"]
    capsys.readouterr()
    for argv, message in [
        (["--checkpoint", str(exported), "--preset", "tiny"], "does not fit"),
        (["--checkpoint", str(exported), "--preset", "tiny", "--model", "layers=1"], "--model layers: no such field"),
        (["--checkpoint", str(exported), "--preset", "tiny", "--model", "vision_layers"], "--model expects FIELD=INT"),
        (["--checkpoint", str(run), *SMALL], "a training checkpoint, which names its own --model fields"),
    ]:
        assert mulclip_fast.eval.main(argv) == 2
        assert message in capsys.readouterr().err


def test_eval_help_gives_the_defaults_the_docs_state():
    # docs/training.md gives --pairs a default of 1,000; --help showed none for --pairs, --split, --batch-size
    # or --device (the trainer's --help shows every default).
    text = " ".join(mulclip_fast.eval.build_parser().format_help().split())
    for default in ("(default: 1000)", "(default: test)", "(default: 250)", "(default: cpu)"):
        assert default in text


def test_unreadable_images_are_named_on_stderr_up_to_ten(capsys):
    skipped = {f"img{i}.jpg": "cannot identify image file" for i in range(12)}
    mulclip_fast.eval._print_skipped(skipped, listed_in=None)
    err = capsys.readouterr().err.splitlines()
    assert err[:10] == [f"skipped img{i}.jpg: cannot identify image file" for i in range(10)]
    assert err[10:] == ["... and 2 more unreadable images (all in the JSON printed below)"]
    mulclip_fast.eval._print_skipped(skipped, listed_in="eval.json")
    assert "(all in eval.json under 'skipped')" in capsys.readouterr().err
