"""Faults a long run meets: a run directory shared by two runs, kills in the middle of a save, a full disk,
torn logs, unreadable checkpoints, bad encodings, oversized images, unwritable outputs. Each asserts that
no data is lost and that every error is an ``error: …`` line with exit code 2 (docs/training.md,
"Reliability").
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from mulclip_fast import eval as eval_cli
from mulclip_fast import run_checkpoints
from mulclip_fast.data import batch_order, open_dataset, read_docci
from mulclip_fast.model import CheckpointError, check_device, read_state_dict
from mulclip_fast.run_checkpoints import CHECKPOINT_FORMAT, load_training_checkpoint
from mulclip_fast.train import TrainConfig, main, train
from mulclip_fast.train.config import ConfigError, resolve_config, resumed_config
from mulclip_fast.train.run_dir import LOCK_FILE, claim_run_directory

from .test_train import SMALL, read_jsonl, small_config


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") or "\nerror: " in err, err
    assert "Traceback" not in err
    return err


# ------------------------------------------------------------------------------------ one run per directory


def test_a_second_run_into_a_directory_in_use_is_refused_until_the_first_ends(tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from mulclip_fast.train.run_dir import RunDirectoryLock as L; l = L({str(out)!r}); "
            "print('locked', flush=True); import time; time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        out.mkdir()
        assert holder.stdout.readline().strip() == "locked"
        assert main(["--out", str(out), "--steps", "2"]) == 2
        err = _error(capsys)
        assert "in use by another run" in err and f"process {holder.pid}" in err
    finally:
        holder.send_signal(signal.SIGKILL)  # a crash: the kernel drops the lock with the process
        holder.wait()
    claim_run_directory(str(out), resume=False, overwrite=False).release()


def test_a_used_directory_is_refused_without_resume_and_overwrite_keeps_only_foreign_files(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "step_00000006.pt").write_bytes(b"an earlier run's model")
    (out / "metrics.jsonl").write_text('{"step": 0, "loss": 1.0}\n')
    (out / "notes.txt").write_text("the user's own file")
    assert main(["--out", str(out), "--steps", "2"]) == 2
    err = _error(capsys)
    assert "holds an earlier run" in err and "--resume" in err and "--overwrite" in err
    assert (out / "checkpoints" / "step_00000006.pt").exists()  # nothing of the earlier run was touched
    assert main(["--out", str(out), "--resume", "--overwrite"]) == 2
    assert "give one of them" in _error(capsys)
    claim_run_directory(str(out), resume=False, overwrite=True).release()
    assert sorted(os.listdir(out)) == sorted([LOCK_FILE, "notes.txt"])


def test_out_that_is_a_file_or_below_a_file_is_an_error_before_any_work(tmp_path, capsys, monkeypatch):
    from mulclip_fast.train import loop

    monkeypatch.setattr(loop, "open_dataset", lambda *a, **k: pytest.fail("the data was opened"))
    file = tmp_path / "file"
    file.write_text("")
    assert main(["--out", str(file)]) == 2
    assert "is a file" in _error(capsys)
    assert main(["--out", str(file / "run")]) == 2
    assert "cannot create --out" in _error(capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes everywhere")
def test_unwritable_out_is_an_error(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert main(["--out", str(locked / "run")]) == 2
    assert "cannot create --out" in _error(capsys)


# ------------------------------------------------------------------------------------ resume restores every log


def test_resume_keeps_the_validation_at_the_resume_step_and_tolerates_a_torn_log(tmp_path):
    settings = dict(steps=4, val_every=2, checkpoint_every=2, loss="global")
    train(small_config(tmp_path / "straight", **settings))
    train(small_config(tmp_path / "resumed", **settings), stop_at_step=2)
    metrics = tmp_path / "resumed" / "metrics.jsonl"
    with open(metrics, "a") as handle:  # a kill in the middle of writing the next record
        handle.write('{"step": 2, "loss": 2.7')
    train(TrainConfig(out=str(tmp_path / "resumed")), resume=True)
    for log in ("val.jsonl", "metrics.jsonl"):
        straight = read_jsonl(tmp_path / "straight" / log)
        resumed = read_jsonl(tmp_path / "resumed" / log)
        assert [r["step"] for r in resumed] == [r["step"] for r in straight], log
    assert read_jsonl(tmp_path / "resumed" / "val.jsonl") == read_jsonl(tmp_path / "straight" / "val.jsonl")


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


def test_resume_keeps_the_images_skipped_before_the_checkpoint(tmp_path):
    # One unreadable image in the first batch of the epoch (before the checkpoint), one in the last.
    order = batch_order(12, 4, seed=0, epoch=0)
    data, images = _docci_with_unreadable_images(tmp_path, 12, {order[0][0], order[2][0]})
    settings = dict(data=f"docci:{data}", steps=3, loss="global", val_pairs=1)
    train(small_config(tmp_path / "straight", **settings))
    train(small_config(tmp_path / "resumed", checkpoint_every=1, **settings), stop_at_step=1)
    train(TrainConfig(out=str(tmp_path / "resumed")), resume=True)
    straight = json.loads((tmp_path / "straight" / "skipped.json").read_text())
    assert len(straight) == 2
    assert json.loads((tmp_path / "resumed" / "skipped.json").read_text()) == straight


def test_a_step_whose_batch_is_unreadable_keeps_its_checkpoint_and_stop(tmp_path):
    # Three of the four images of step 1's batch are unreadable: that step trains nothing, but it still ends
    # at a checkpoint boundary (every 2 steps) and is where --stop-at-step (the path a signal takes) stops.
    order = batch_order(12, 4, seed=0, epoch=0)
    data, _ = _docci_with_unreadable_images(tmp_path, 12, set(order[1][:3]))
    settings = dict(data=f"docci:{data}", loss="global", val_pairs=1, checkpoint_every=2, keep_checkpoints=5)
    train(small_config(tmp_path / "straight", steps=3, **settings))
    assert sorted(os.listdir(tmp_path / "straight" / "checkpoints")) == ["step_00000002.pt", "step_00000003.pt"]
    stopped = train(small_config(tmp_path / "stopped", steps=3, **settings), stop_at_step=2)
    assert (stopped["interrupted"], stopped["steps"]) == ("stop_at_step", 2)


def test_flags_given_with_resume_apply_where_safe_and_are_refused_otherwise(tmp_path, capsys):
    out = tmp_path / "run"
    train(small_config(out, loss="global", steps=4), stop_at_step=2)
    assert main(["--resume", "--out", str(out), "--batch-size", "8", "--preset", "vit-b-16"]) == 2
    err = _error(capsys)
    assert "--batch-size 8 (the run has 4)" in err and "--preset vit-b-16 (the run has tiny)" in err
    assert main(["--resume", "--out", str(out), "--no-packed-text"]) == 2  # was "--no-packed-text False (… True)"
    assert "--no-packed-text (the run ran without it)" in _error(capsys)
    assert main(["--resume", "--out", str(out), "--batch-size", "4", "--steps", "1"]) == 2  # the same batch: fine
    assert "the run has done 2 steps" in _error(capsys)
    assert main(["--resume", "--out", str(out), "--steps", "5"]) == 0
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == [0, 1, 2, 3, 4]
    assert json.loads((out / "config.json").read_text())["steps"] == 5


def test_a_resumed_run_stays_on_its_device_unless_device_moves_it(tmp_path, capsys):
    out = tmp_path / "run"
    train(small_config(out, loss="global", steps=4), stop_at_step=2)
    # Make the checkpoint one of a run that ran on a GPU; this machine has none. Before, a resume without
    # --device went on on the CPU (the flag's default) without a word.
    latest = max((out / "checkpoints").glob("step_*.pt"))
    state = torch.load(latest, weights_only=False)
    state["config"]["device"] = "cuda"
    torch.save(state, latest)
    assert main(["--resume", "--out", str(out)]) == 2
    err = _error(capsys)
    assert "the run ran on cuda, which this machine does not have" in err and "--device cpu" in err
    assert main(["--resume", "--out", str(out), "--device", "cpu"]) == 0
    assert json.loads((out / "config.json").read_text())["device"] == "cpu"


def test_resumed_config_keeps_the_stored_device_and_checks_the_gpu_index(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    stored = TrainConfig(device="cuda:0")
    assert resumed_config(stored, TrainConfig(), given=set()).device == "cuda:0"
    assert resumed_config(stored, TrainConfig(device="cpu"), given={"device"}).device == "cpu"
    with pytest.raises(ConfigError, match="the run ran on cuda:1, which this machine does not have"):
        resumed_config(TrainConfig(device="cuda:1"), TrainConfig(), given=set())
    with pytest.raises(ValueError, match="--device cuda:1 requested but this machine has 1 CUDA device"):
        check_device("cuda:1")


def test_keyed_flags_given_with_resume_compare_with_the_values_the_run_trains_with():
    # A stored run holds only the --w-* / --model keys its command line gave. Before, giving a default again
    # (--w-wpr 1) was refused as "--w {'wpr': 1.0} (the run has {})", and a real change was named the same way.
    stored = TrainConfig(weights={"sap": 2.0})
    kept = resumed_config(stored, TrainConfig(weights={"wpr": 1.0, "sap": 2.0}), given={"weights"})
    assert kept.weights == {"sap": 2.0}
    same_model = resumed_config(stored, TrainConfig(model_overrides={"text_alibi": 1}), given={"model_overrides"})
    assert same_model.model_overrides == {}
    with pytest.raises(ConfigError) as refused:
        resumed_config(
            stored,
            TrainConfig(weights={"wpr": 2.0, "sap": 2.0}, model_overrides={"text_alibi": 0}),
            given={"weights", "model_overrides"},
        )
    message = str(refused.value)
    assert "--w-wpr 2.0 (the run has 1.0)" in message and "--model text_alibi=0 (the run has text_alibi=1)" in message
    assert "{" not in message and "--w-sap" not in message


def _sharegpt4v(tmp_path, n: int):
    """A ShareGPT4V file of ``n`` records. It has no split of its own: a run holds out its last --eval-pairs."""
    (tmp_path / "coco").mkdir()
    entries = []
    for i in range(n):
        Image.new("RGB", (64, 64), (20 * i, 90, 200 - 15 * i)).save(tmp_path / "coco" / f"{i}.png")
        turns = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": f"Picture {i}. It is plain."}]
        entries.append({"id": str(i), "image": f"coco/{i}.png", "conversations": turns})
    data = tmp_path / "share.json"
    data.write_text(json.dumps(entries))
    return data


def test_eval_pairs_that_would_move_the_held_out_records_are_refused_on_resume(tmp_path, capsys):
    data = _sharegpt4v(tmp_path, 12)
    settings = dict(data=f"sharegpt4v:{data}", steps=4, loss="global", eval_pairs=4)
    train(small_config(tmp_path / "straight", **settings))
    out = tmp_path / "run"
    train(small_config(out, checkpoint_every=2, **settings), stop_at_step=2)
    # The last 4 records are the run's test set: --eval-pairs 2 would train on two of them from here on.
    assert main(["--resume", "--out", str(out), "--eval-pairs", "2"]) == 2
    assert "--eval-pairs 2 (the run has 4)" in _error(capsys)
    assert main(["--resume", "--out", str(out)]) == 0
    a, b = read_jsonl(tmp_path / "straight" / "metrics.jsonl"), read_jsonl(out / "metrics.jsonl")
    assert [m["loss"] for m in a] == [m["loss"] for m in b]


def test_a_run_on_a_relative_data_path_still_holds_out_its_records_in_eval(tmp_path, monkeypatch):
    """The run stores its data path absolute: evaluated under another spelling of the same file (or from
    another directory), a ShareGPT4V file still holds out the run's --eval-pairs, not --pairs, which
    would score records the run trained on."""
    data = _sharegpt4v(tmp_path, 12)
    monkeypatch.chdir(tmp_path)
    config = resolve_config(TrainConfig(data="sharegpt4v:share.json", eval_pairs=3)).to_dict()
    assert config["data"] == f"sharegpt4v:{data}"
    assert eval_cli.held_out_records(config, f"sharegpt4v:{data}", 6) == 3
    # Resuming with the run's own relative spelling is not a change of --data.
    stored = resolve_config(TrainConfig(data="sharegpt4v:share.json"))
    assert resumed_config(stored, TrainConfig(data="sharegpt4v:share.json"), {"data"}).data == stored.data


def test_eval_of_a_run_scores_only_the_records_it_held_out(tmp_path, capsys):
    data = _sharegpt4v(tmp_path, 12)
    run = tmp_path / "run"
    train(small_config(run, data=f"sharegpt4v:{data}", steps=1, loss="global", eval_pairs=3))
    out = tmp_path / "eval.json"
    # The run trained on the first 9 records; more --pairs than it held out must not score those.
    argv = ["--checkpoint", str(run), "--data", f"sharegpt4v:{data}", "--out", str(out)]
    assert eval_cli.main([*argv, "--pairs", "6"]) == 0
    assert json.loads(out.read_text())["n_pairs"] == 3
    everything = tmp_path / "everything"
    train(small_config(everything, data=f"sharegpt4v:{data}", steps=1, loss="global", eval_pairs=0))
    assert eval_cli.main(["--checkpoint", str(everything), "--data", f"sharegpt4v:{data}"]) == 2
    assert "none is held out" in _error(capsys)


# ------------------------------------------------------------------------------------ saves clean up after themselves


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


def test_a_full_disk_while_appending_a_log_record_is_an_error_and_the_run_resumes(tmp_path, capsys, monkeypatch):
    # metrics.jsonl and val.jsonl are appended to, not saved: a full disk there ended the run with an
    # OSError traceback instead of the "error: cannot write ..." line of a failed save.
    import builtins

    train(small_config(tmp_path / "straight", loss="global", steps=4))
    out = tmp_path / "run"
    real_open = builtins.open
    appends = []

    def full_on_third_append(path, mode="r", *args, **kwargs):
        if str(path).endswith("metrics.jsonl") and "a" in mode:
            appends.append(path)
            if len(appends) == 3:
                handle = real_open(path, mode, *args, **kwargs)
                handle.write('{"step": 2, "lo')  # the part that still fitted
                handle.close()
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", full_on_third_append)
    argv = [*SMALL, "--steps", "4", "--batch-size", "4", "--loss", "global", "--eval-pairs", "0", "--val-pairs", "4"]
    assert main([*argv, "--checkpoint-every", "2", "--out", str(out)]) == 2
    err = _error(capsys)
    assert f"cannot write {out / 'metrics.jsonl'}: No space left on device" in err
    monkeypatch.setattr(builtins, "open", real_open)
    assert main(["--resume", "--out", str(out)]) == 0
    a, b = read_jsonl(tmp_path / "straight" / "metrics.jsonl"), read_jsonl(out / "metrics.jsonl")
    assert [m["loss"] for m in a] == [m["loss"] for m in b]


def test_temporaries_of_a_killed_save_are_removed_at_start(tmp_path, capsys):
    out = tmp_path / "run"
    train(small_config(out, loss="global", steps=3), stop_at_step=2)
    stale = [out / "checkpoints" / "step_00000003.pt.tmp.4242", out / "config.json.tmp.4242"]
    for path in stale:
        path.write_bytes(b"x" * 1000)
    (out / "mine.tmp.4242").write_text("a file of the user's: not ours to delete")
    assert main(["--resume", "--out", str(out)]) == 0
    assert not any(path.exists() for path in stale) and (out / "mine.tmp.4242").exists()
    assert "left by a save that was interrupted" in capsys.readouterr().out


@pytest.mark.slow
def test_a_kill_inside_a_save_loses_nothing(tmp_path, one_thread):
    # one thread in both runs: the killed run is another process, and a reduction split over another number
    # of threads rounds differently (1e-7 apart by step 2), which is not what this test is about
    straight = tmp_path / "straight"
    train(small_config(straight, loss="global", steps=4))
    out = tmp_path / "run"
    cmd = [sys.executable, os.path.join(os.path.dirname(__file__), "killed_save_train.py"), "--out", str(out)]
    cmd += SMALL + ["--steps", "4", "--batch-size", "4", "--loss", "global", "--checkpoint-every", "1"]
    cmd += ["--threads", "1"]
    cmd += ["--fine-start", "0", "--fine-ramp", "0.5", "--eval-pairs", "0", "--val-pairs", "4", "--val-every", "1000"]
    env = {**os.environ, "KILL_IN_SAVE_OF": "step_00000003.pt"}
    run = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in run.stdout:
            if line.strip() == "in save":
                break
    finally:
        run.send_signal(signal.SIGKILL)
        run.wait()
    (temporary,) = [name for name in os.listdir(out / "checkpoints") if ".tmp." in name]
    assert temporary.startswith("step_00000003.pt.tmp.")
    assert main(["--resume", "--out", str(out)]) == 0
    assert not [name for name in os.listdir(out / "checkpoints") if ".tmp." in name]
    a, b = read_jsonl(straight / "metrics.jsonl"), read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in b] == [0, 1, 2, 3] and [m["loss"] for m in a] == [m["loss"] for m in b]


def test_an_unreadable_latest_checkpoint_falls_back_to_the_previous_one_loudly(tmp_path, capsys):
    train(small_config(tmp_path / "straight", loss="global", steps=4))
    out = tmp_path / "run"
    train(small_config(out, loss="global", steps=4, checkpoint_every=1), stop_at_step=3)
    latest = out / "checkpoints" / "step_00000003.pt"
    latest.write_bytes(latest.read_bytes()[:1000])  # cut off, as by a disk that filled under another writer
    capsys.readouterr()
    model, _ = eval_cli.load_model_for_eval(str(out), None, "cpu")  # evaluation falls back too, and says so
    assert "step_00000003.pt cannot be read" in capsys.readouterr().err
    assert main(["--resume", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "step_00000003.pt cannot be read" in err and "resuming from the older" in err
    assert (out / "checkpoints" / "step_00000003.pt.unreadable").exists()
    a = read_jsonl(tmp_path / "straight" / "metrics.jsonl")
    b = read_jsonl(out / "metrics.jsonl")
    assert [m["loss"] for m in a] == [m["loss"] for m in b]


# ------------------------------------------------------------------------------------ bad data and outputs


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


def test_a_run_that_trains_on_nothing_fails(tmp_path, capsys):
    data, _ = _docci_with_unreadable_images(tmp_path, 8, set(range(1, 8)))
    argv = ["--data", f"docci:{data}", "--out", str(tmp_path / "run"), "--steps", "2", "--batch-size", "4"]
    assert main(argv + SMALL + ["--eval-pairs", "0", "--loss", "global"]) == 2
    err = _error(capsys)
    assert "no step trained" in err and "7 unreadable" in err
    assert len(json.loads((tmp_path / "run" / "skipped.json").read_text())) == 7
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_eval_out_that_cannot_be_written_is_an_error_before_evaluating(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(eval_cli, "load_model_for_eval", lambda *a: pytest.fail("evaluation started"))
    file = tmp_path / "file"
    file.write_text("")
    for out, message in ((file / "eval.json", "does not exist"), (tmp_path, "is a directory")):
        assert eval_cli.main(["--checkpoint", str(tmp_path), "--out", str(out)]) == 2
        assert message in _error(capsys)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--device", "gpu0"], "--device 'gpu0' is not a torch device"),
        (["--device", "mps"], "--device mps requested but MPS is not available"),
        (["--threads", "-1"], "invalid value for --threads (-1)"),
    ],
)
def test_bad_device_and_threads_are_errors_in_train_and_eval(tmp_path, capsys, argv, message):
    assert main([*argv, "--out", str(tmp_path / "run")]) == 2
    assert message in _error(capsys)
    if argv[0] == "--device":
        assert eval_cli.main(["--checkpoint", str(tmp_path), *argv]) == 2
        assert message in _error(capsys)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--seed", "-1"], "invalid value for --seed (-1)"),
        (["--checkpoint-every", "-2"], "invalid value for --checkpoint-every (-2)"),
        (["--val-every", "-1"], "invalid value for --val-every (-1)"),
    ],
)
def test_a_negative_seed_or_interval_is_an_error_before_any_work(tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    short = ["--steps", "1", "--batch-size", "4", "--eval-pairs", "0", "--loss", "global", *SMALL]
    assert main([*argv, *short, "--out", str(out)]) == 2
    assert message in _error(capsys)
    assert not out.exists()
    if argv[0] == "--seed":
        assert eval_cli.main(["--checkpoint", str(tmp_path), *argv]) == 2
        assert "--seed must be >= 0" in _error(capsys)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--lr", "inf"], "invalid value for --lr (inf)"),
        (["--weight-decay", "inf"], "invalid value for --weight-decay (inf)"),
        (["--tau-attn", "inf"], "invalid value for --tau-attn (inf)"),
        (["--w-wpr", "nan"], "invalid value for --w-wpr (nan)"),
        (["--w-global-short", "inf"], "invalid value for --w-global-short (inf)"),
        (["--w-sap", "-1"], "invalid value for --w-sap (-1.0): a finite number >= 0"),  # trained SAP as a reward
    ],
)
def test_an_infinite_rate_temperature_or_weight_is_an_error_before_any_work(tmp_path, capsys, argv, message):
    # These ended in a traceback and exit 1 (the loss's ValueError, or NaN similarities at the first step).
    out = tmp_path / "run"
    assert main([*argv, "--steps", "1", "--batch-size", "4", "--eval-pairs", "0", *SMALL, "--out", str(out)]) == 2
    assert message in _error(capsys)
    assert not out.exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--train-size", "3"], "invalid value for --train-size (3): at least --batch-size (4)"),
        (["--batch-size", "1"], "invalid value for --batch-size (1): at least 2"),
        (["--warmup", "1"], "invalid value for --warmup (1.0): a fraction of the steps in [0, 1)"),
        (["--sap-topk-ratio", "0"], "invalid value for --sap-topk-ratio (0.0): in (0, 1]"),
        (["--lr", "-1"], "invalid value for --lr (-1.0): a finite number > 0"),
    ],
)
def test_an_out_of_range_value_error_says_what_the_flag_accepts(tmp_path, capsys, argv, message):
    # "invalid value for --train-size (10)" left the user to guess the rule (here: a batch must fit in an epoch).
    out = tmp_path / "run"
    short = ["--steps", "1", "--batch-size", "4", "--eval-pairs", "0", "--loss", "global", *SMALL]
    assert main([*short, *argv, "--out", str(out)]) == 2
    assert message in _error(capsys)
    assert not out.exists()


class _OpensAFile:
    """A pickle payload: unpickling it calls ``open(marker, "w")``, as a hostile file could call anything."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_file_from_elsewhere_cannot_run_code(tmp_path):
    # eval and export read any file they are given as a training checkpoint first; until 2026-12-01 with
    # torch.load(weights_only=False), which runs whatever a pickle calls.
    path, marker = tmp_path / "downloaded.pt", tmp_path / "marker"
    torch.save({"format": CHECKPOINT_FORMAT, "payload": _OpensAFile(marker)}, path)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_training_checkpoint(str(path))
    assert not marker.exists()


def _checkpoint_with_numpy_rng_state(path) -> None:
    """A training checkpoint as written before 2026-11-30, its numpy RNG key table an ndarray."""
    keys = np.random.RandomState(0).get_state()[1]
    torch.save({"format": CHECKPOINT_FORMAT, "version": 2, "config": {}, "rng": {"numpy": ("MT19937", keys)}}, path)


def test_the_allowlist_names_numpys_array_constructor_by_both_module_paths_where_pytorch_can(tmp_path):
    # (object, path) pairs in weights_only's allowlist came after PyTorch 2.5.0; this PyTorch has them.
    assert run_checkpoints._allowlist_takes_paths()
    pairs = [entry for entry in run_checkpoints._numpy_array_globals() if isinstance(entry, tuple)]
    assert [name for _, name in pairs] == [f"numpy.{core}.multiarray._reconstruct" for core in ("core", "_core")]
    path = tmp_path / "old.pt"
    _checkpoint_with_numpy_rng_state(path)
    assert load_training_checkpoint(str(path))["rng"]["numpy"][1].dtype == np.uint32


def test_without_named_allowlist_entries_an_old_checkpoint_of_this_numpy_still_loads(tmp_path, monkeypatch):
    # A PyTorch whose allowlist takes no (object, path) pairs (2.5) gets none, and reads what this numpy wrote.
    monkeypatch.setattr(run_checkpoints, "_allowlist_takes_paths", lambda: False)
    assert not any(isinstance(entry, tuple) for entry in run_checkpoints._numpy_array_globals())
    path = tmp_path / "old.pt"
    _checkpoint_with_numpy_rng_state(path)
    keys = load_training_checkpoint(str(path))["rng"]["numpy"][1]
    assert np.array_equal(keys, np.random.RandomState(0).get_state()[1])


@pytest.mark.parametrize("content", [b"print('not a checkpoint')\n", b""], ids=["text", "empty"])
def test_a_file_that_is_no_checkpoint_is_named_so_without_torchs_advice_to_unpickle_it(tmp_path, content):
    # The message was PyTorch's paragraph: "Re-running torch.load with weights_only set to False will likely
    # succeed ... Please file an issue ...", for a file that is no checkpoint at all; an empty file gave
    # "EOFError: " with nothing after it.
    path = tmp_path / "weights.pt"
    path.write_bytes(content)
    for load in (load_training_checkpoint, read_state_dict):
        with pytest.raises(CheckpointError) as error:
            load(str(path))
        message = str(error.value)
        assert message.startswith(f"cannot read checkpoint {path}: ")
        assert "weights_only" not in message and "file an issue" not in message and not message.endswith(": ")
