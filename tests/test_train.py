"""The training CLI: run directory, resume equality, checkpoints, signals and bad input."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from mulclip_fast.eval import load_model_for_eval
from mulclip_fast.model import CLIP, CheckpointError, preset_config
from mulclip_fast.train import (
    TrainConfig,
    Trainer,
    build_parser,
    config_from_args,
    load_training_checkpoint,
    loop,
    main,
    resolve_config,
    train,
)

SMALL = ["--model", "vision_layers=1", "--model", "transformer_layers=1"]
SMALL_OVERRIDES = {"vision_layers": 1, "transformer_layers": 1}


def small_config(out, **kwargs) -> TrainConfig:
    settings = dict(
        model_overrides=dict(SMALL_OVERRIDES),
        batch_size=4,
        steps=6,
        fine_start=0.0,
        fine_ramp=0.5,
        eval_pairs=0,
        val_pairs=4,
        val_every=1000,
        backend="auto",  # the fused ops of mulclip_fast.ops (their chunked torch path on CPU)
        out=str(out),
    )
    settings.update(kwargs)
    return TrainConfig(**settings)


def read_jsonl(path):
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


@pytest.mark.slow
def test_cli_smoke_run_writes_the_run_directory(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "mulclip_fast.train", "--steps", "4", "--batch-size", "4", "--out", str(out)]
    cmd += SMALL + ["--eval-pairs", "20", "--val-pairs", "8", "--val-every", "2", "--fine-start", "0.25"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["loss"] == "mulclip" and config["steps"] == 4 and config["total_steps"] == 4
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [0, 1, 2, 3]
    for key in ("loss", "global_long", "global_short", "lr", "samples_per_s", "memory_mb", "fine_scale"):
        assert all(key in m for m in metrics), key
    # The fine-grained terms appear once the ramp starts (a quarter of the way in).
    assert "wpr" not in metrics[0] and {"wpr", "sap"} <= set(metrics[-1])
    result = json.loads((out / "eval.json").read_text())
    for key in ("t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10", "binding_acc"):
        assert 0.0 <= result[key] <= 1.0
    assert result["n_pairs"] == 20
    assert (out / "loss.png").stat().st_size > 0 and (out / "retrieval.png").stat().st_size > 0
    assert os.listdir(out / "checkpoints") == ["step_00000004.pt"]
    assert "summary" in done.stdout and "R@5" in done.stdout and "step 4/4" in done.stdout
    assert "\r" not in done.stderr  # no progress bar when not on a terminal


def test_the_summary_table_says_its_losses_are_means_of_the_last_steps(tmp_path):
    # The rows were "final loss" and "final wpr": a 10-step run printed "final loss 3.85" under a last step
    # of loss 10.2 (the mean of 10 steps, where WPR and SAP ran in the last only).
    from mulclip_fast.train.report import summary_table

    records = [{"step": s, "loss": 3.0, "global_long": 2.0, "samples_per_s": 10.0, "memory_mb": 1.0} for s in range(9)]
    records.append({"step": 9, "loss": 10.0, "global_long": 2.0, "wpr": 5.0, "samples_per_s": 10.0, "memory_mb": 1.0})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    table = summary_table(TrainConfig(out=str(tmp_path)), {"steps": 10, "total_steps": 10, "train_seconds": 1.0}, ())
    assert "final " not in table
    assert "mean loss" in table and "3.7000 (last 10 logged steps)" in table
    assert "mean wpr" in table and "5.0000 (last logged step)" in table
    # memory_mb is MiB of rank 0's process; samples / s a mean over logged records (--log-every apart)
    assert "1 MiB (rank 0's process)" in table and "10.0 (mean of the last 10 logged steps)" in table


def test_by_default_a_run_validates_every_fifth_of_it_before_the_final_evaluation(tmp_path):
    # --help said "0: 5 per run" and docs/training.md "5 validations"; the run validates at 1/5 .. 4/5 of
    # its steps, the final evaluation taking the place of a fifth.
    train(small_config(tmp_path / "run", loss="global", steps=10, val_every=0))
    assert [record["step"] for record in read_jsonl(tmp_path / "run" / "val.jsonl")] == [2, 4, 6, 8]
    assert "4 before the final evaluation" in " ".join(build_parser().format_help().split())


def test_resume_is_bit_for_bit(tmp_path):
    straight = train(small_config(tmp_path / "straight"))
    assert straight["steps"] == 6
    stopped = train(small_config(tmp_path / "resumed", checkpoint_every=2), stop_at_step=3)
    assert stopped["interrupted"] == "stop_at_step" and stopped["steps"] == 3
    # Resuming takes every setting from the checkpoint; only where to run comes from the caller.
    resumed = train(TrainConfig(out=str(tmp_path / "resumed")), resume=True)
    assert resumed["steps"] == 6
    a = read_jsonl(tmp_path / "straight" / "metrics.jsonl")
    b = read_jsonl(tmp_path / "resumed" / "metrics.jsonl")
    assert [m["step"] for m in b] == list(range(6))
    for key in ("loss", "global_long", "global_short", "wpr", "sap", "lr", "logit_scale"):
        assert [m.get(key) for m in a] == [m.get(key) for m in b], key
    final_a = load_training_checkpoint(straight["checkpoint"])["model"]
    final_b = load_training_checkpoint(resumed["checkpoint"])["model"]
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_resume_with_data_loader_workers_restores_every_rng_state(tmp_path):
    # Starting the workers drew their seed from torch's global generator (at each epoch start and at the
    # resume step), so the resumed run's torch RNG state differed from the uninterrupted run's.
    settings = dict(loss="global", steps=4, num_workers=1)
    straight = train(small_config(tmp_path / "straight", **settings))
    train(small_config(tmp_path / "resumed", **settings), stop_at_step=2)
    resumed = train(TrainConfig(out=str(tmp_path / "resumed")), resume=True)
    a, b = (load_training_checkpoint(run["checkpoint"]) for run in (straight, resumed))
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_version_1_checkpoints_resume_as_towers_without_alibi(tmp_path):
    """Checkpoints written before the tiny text tower gained ALiBi (version 1) hold towers without it."""
    no_alibi = {**SMALL_OVERRIDES, "text_alibi": 0}
    train(small_config(tmp_path / "straight", model_overrides=no_alibi))
    train(small_config(tmp_path / "old", model_overrides=no_alibi, checkpoint_every=3), stop_at_step=3)
    path = tmp_path / "old" / "checkpoints" / "step_00000003.pt"
    state = torch.load(path, weights_only=False)
    state["version"] = 1
    state["config"]["model_overrides"] = dict(SMALL_OVERRIDES)  # what a version-1 run stored
    torch.save(state, path)
    model, _ = load_model_for_eval(str(path), None, "cpu")
    assert not model.config.text_alibi
    resumed = train(TrainConfig(out=str(tmp_path / "old")), resume=True)
    assert resumed["steps"] == 6
    a = read_jsonl(tmp_path / "straight" / "metrics.jsonl")
    b = read_jsonl(tmp_path / "old" / "metrics.jsonl")
    assert [m["loss"] for m in a] == [m["loss"] for m in b]
    state["version"] = 7
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="version 7, expected 1 or 2"):
        load_training_checkpoint(str(path))


def test_checkpoint_round_trip_and_keep_last(tmp_path):
    summary = train(small_config(tmp_path, steps=5, checkpoint_every=1, keep_checkpoints=2, loss="global"))
    names = sorted(os.listdir(tmp_path / "checkpoints"))
    assert names == ["step_00000004.pt", "step_00000005.pt"]
    assert not [n for n in names if ".tmp" in n]
    state = load_training_checkpoint(summary["checkpoint"])
    assert state["step"] == 5 and state["config"]["loss"] == "global"
    assert {"model", "optimizer", "rng", "elapsed"} <= set(state)
    model, config = load_model_for_eval(str(tmp_path), None, "cpu")
    reloaded = CLIP(preset_config("tiny", **SMALL_OVERRIDES))
    reloaded.load_state_dict(state["model"])
    reloaded_state = reloaded.state_dict()
    assert all(torch.equal(value, reloaded_state[key]) for key, value in model.state_dict().items())
    assert config["seed"] == 0


def test_init_from_openai_checkpoint_keeps_first_positions(tmp_path):
    torch.manual_seed(7)
    source = CLIP(preset_config("tiny", **SMALL_OVERRIDES))
    state = {k: v for k, v in source.state_dict().items() if "calibration" not in k}
    state["positional_embedding"] = state["positional_embedding"][:77].clone()
    path = tmp_path / "openai.pt"
    torch.save(state, path)
    summary = train(small_config(tmp_path / "run", steps=2, init=f"openai:{path}", lr=1e-3, loss="global"))
    trained = load_training_checkpoint(summary["checkpoint"])["model"]["positional_embedding"]
    from mulclip_fast.reference import stretch_positional_embedding

    start = stretch_positional_embedding(state["positional_embedding"])
    assert torch.equal(trained[:20], start[:20])
    assert not torch.equal(trained[20:60], start[20:60])


def test_a_fine_tuning_run_resumes_without_its_init_checkpoint(tmp_path):
    """A checkpoint holds every weight: resuming needs no --init file, and the leading positions stay frozen."""
    torch.manual_seed(7)
    source = CLIP(preset_config("tiny", **SMALL_OVERRIDES))
    path = tmp_path / "openai.pt"
    torch.save({k: v for k, v in source.state_dict().items() if "calibration" not in k}, path)
    settings = dict(steps=4, init=f"openai:{path}", lr=1e-3, loss="global")
    straight = train(small_config(tmp_path / "straight", **settings))
    train(small_config(tmp_path / "resumed", **settings), stop_at_step=2)
    path.unlink()  # moved since, or the run goes on on another machine
    resumed = train(TrainConfig(out=str(tmp_path / "resumed")), resume=True)
    a = read_jsonl(tmp_path / "straight" / "metrics.jsonl")
    b = read_jsonl(tmp_path / "resumed" / "metrics.jsonl")
    assert [m["loss"] for m in a] == [m["loss"] for m in b]
    final_a = load_training_checkpoint(straight["checkpoint"])["model"]
    final_b = load_training_checkpoint(resumed["checkpoint"])["model"]
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    assert torch.equal(final_b["positional_embedding"][:20], source.positional_embedding[:20])


def test_corrupt_and_missing_images_are_skipped_and_counted(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    lines = []
    for i in range(6):
        Image.new("RGB", (70, 64), (40 * i, 90, 200 - 30 * i)).save(images / f"{i}.png")
        lines.append({"image_file": f"{i}.png", "description": f"A picture number {i}. It is plain.", "split": "train"})
    (images / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\ncorrupt")
    lines.append({"image_file": "bad.png", "description": "Bad. Image.", "split": "train"})
    lines.append({"image_file": "gone.png", "description": "Gone. Image.", "split": "train"})
    data = tmp_path / "docci.jsonl"
    data.write_text("\n".join([*(json.dumps(x) for x in lines), "{not json"]))
    summary = train(small_config(tmp_path / "run", data=f"docci:{data}", steps=4, loss="global", val_pairs=1))
    assert summary["skipped_images"] == 2
    skipped = json.loads((tmp_path / "run" / "skipped.json").read_text())
    assert set(skipped) == {str(images / "bad.png"), str(images / "gone.png")}
    assert summary["bad_records"] == 1  # the unparseable line, named by file and line number
    (bad,) = json.loads((tmp_path / "run" / "bad_records.json").read_text())
    assert bad.startswith(f"{data}:{len(lines) + 1}:")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--data", "docci:/nonexistent/file.jsonl"], "data path does not exist"),
        (["--data", "imagenet"], "--data must be synthetic"),
        (["--init", "openai:/nonexistent.pt"], "checkpoint not found"),
        (["--init", "clip:x"], "--init must be openai:PATH or longclip:PATH"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--steps", "3", "--epochs", "1"], "not both"),
        (["--model", "layers"], "FIELD=INT"),
        (["--model", "layers=2"], "--model layers: no such field of the tiny preset; its fields: embed_dim,"),
        (["--batch-size", "1"], "--batch-size"),
        (["--resume"], "no checkpoint"),
    ],
)
def test_bad_input_gives_a_clear_error(tmp_path, capsys, argv, message):
    code = main([*argv, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and message in err


def test_wrong_checkpoint_and_unusable_dataset_leave_no_run_directory(tmp_path, capsys):
    # These fail after the run directory is claimed (the files are read then): the run leaves --out as it
    # found it, not an empty directory with a lock file.
    torch.save(CLIP(preset_config("tiny", transformer_width=64, transformer_heads=2)).state_dict(), tmp_path / "w.pt")
    assert main(["--init", f"openai:{tmp_path / 'w.pt'}", "--out", str(tmp_path / "a")] + SMALL) == 2
    assert "does not fit" in capsys.readouterr().err
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    assert main(["--init", f"openai:{tmp_path / 'garbage.pt'}", "--out", str(tmp_path / "a")] + SMALL) == 2
    assert "garbage.pt" in capsys.readouterr().err
    (tmp_path / "empty.json").write_text("[]")
    assert main(["--data", f"sharegpt4v:{tmp_path / 'empty.json'}", "--out", str(tmp_path / "b")]) == 2
    assert "no usable sharegpt4v record" in capsys.readouterr().err
    assert main(["--image-root", str(tmp_path), "--out", str(tmp_path / "c")]) == 2
    assert "--data synthetic draws its images" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in "abc")
    (tmp_path / "mine").mkdir()  # a folder the user made is kept, without the lock file
    assert main(["--init", f"openai:{tmp_path / 'w.pt'}", "--out", str(tmp_path / "mine")] + SMALL) == 2
    assert (tmp_path / "mine").is_dir() and not list((tmp_path / "mine").iterdir())


def test_unknown_choice_values_exit_nonzero(capsys):
    for argv in (["--preset", "vit-h-14"], ["--loss", "siglip"], ["--sap-pairing", "some"], ["--backend", "cuda"]):
        with pytest.raises(SystemExit) as info:
            build_parser().parse_args(argv)
        assert info.value.code == 2
        assert "invalid choice" in capsys.readouterr().err


def test_the_first_warm_up_step_trains(tmp_path):
    # Two warm-up steps of ten: the k-th trains at (k + 1) / 2 of the rate (open_clip's rule), then the
    # cosine decay starts from the full rate. Until 2026-12-01 the first step trained at 0, so a one-step
    # run changed nothing.
    train(small_config(tmp_path / "run", steps=10, warmup=0.2, lr=1e-3))
    rates = [m["lr"] for m in read_jsonl(tmp_path / "run" / "metrics.jsonl")]
    cosine = [0.5e-3 * (1 + math.cos(math.pi * k / 8)) for k in range(8)]
    assert rates == pytest.approx([0.5e-3, 1e-3] + cosine)


def test_default_command_settings():
    def parse(*argv):
        return config_from_args(build_parser().parse_args(list(argv)))

    config = parse()
    assert config.preset == "tiny" and config.data == "synthetic" and config.loss == "mulclip"
    assert config.backend == "auto" and config.steps is None  # 400, resolved later
    assert (config.fine_start, config.fine_ramp) == (0.8, 0.05)
    # A result that is a function of the seed, not of the machine: no clock in the schedule, fp32 on every CPU.
    assert config.time_limit == 0 and config.precision == "fp32"
    assert resolve_config(config).steps == 400
    assert parse("--precision", "bf16", "--time-limit", "30").precision == "bf16"


def test_every_setting_is_set_by_its_flag():
    """The parser is generated from TrainConfig's fields: each field has a flag with the documented spelling."""
    argv = ["--preset", "vit-b-16", "--model", "vision_layers=1", "--model", "text_alibi=0", "--data", "docci:/d"]
    argv += ["--image-root", "/img", "--init", "openai:/w.pt", "--freeze-positions", "0", "--train-size", "64"]
    argv += ["--twin-fraction", "0.25", "--max-subcaptions", "3", "--captions", "short", "--loss", "finelip"]
    argv += ["--no-wpr", "--no-sap"]
    argv += ["--w-wpr", "2", "--w-global-short", "0.25", "--sap-pairing", "all", "--sap-topk-ratio", "0.5"]
    argv += ["--sap-raw-patches", "--fine-start", "0.1", "--fine-ramp", "0.2", "--backend", "reference"]
    argv += [
        "--no-calibration",
        "--wpr-form",
        "cosine",
        "--tau-attn",
        "0.1",
        "--tau-contrast",
        "0.2",
        "--tau-sap",
        "0.3",
    ]
    argv += ["--steps", "7", "--epochs", "2", "--time-limit", "30", "--batch-size", "16", "--lr", "0.01"]
    argv += ["--weight-decay", "0", "--warmup", "0.1", "--seed", "3", "--out", "/runs/x", "--device", "cuda"]
    argv += ["--precision", "bf16", "--grad-checkpointing", "--accum-steps", "2", "--compile", "--threads", "2"]
    argv += ["--num-workers", "1", "--log-every", "5", "--checkpoint-every", "10", "--keep-checkpoints", "3"]
    argv += ["--val-every", "4", "--val-pairs", "8", "--eval-pairs", "0"]
    argv += ["--no-packed-text", "--text-attention", "torch"]
    expected = TrainConfig(
        preset="vit-b-16",
        model_overrides={"vision_layers": 1, "text_alibi": 0},
        data="docci:/d",
        image_root="/img",
        init="openai:/w.pt",
        freeze_positions=0,
        train_size=64,
        twin_fraction=0.25,
        max_subcaptions=3,
        captions="short",
        loss="finelip",
        wpr=False,
        sap=False,
        weights={"wpr": 2.0, "global_short": 0.25},
        sap_pairing="all",
        sap_topk_ratio=0.5,
        sap_raw_patches=True,
        calibration=False,
        wpr_form="cosine",
        tau_attn=0.1,
        tau_contrast=0.2,
        tau_sap=0.3,
        fine_start=0.1,
        fine_ramp=0.2,
        backend="reference",
        steps=7,
        epochs=2,
        time_limit=30.0,
        batch_size=16,
        lr=0.01,
        weight_decay=0.0,
        warmup=0.1,
        seed=3,
        out="/runs/x",
        device="cuda",
        precision="bf16",
        grad_checkpointing=True,
        accum_steps=2,
        compile="inductor",  # --compile alone; --compile BACKEND names one
        packed_text=False,
        text_attention="torch",
        threads=2,
        num_workers=1,
        log_every=5,
        checkpoint_every=10,
        keep_checkpoints=3,
        val_every=4,
        val_pairs=8,
        eval_pairs=0,
    )
    assert config_from_args(build_parser().parse_args(argv)) == expected
    default = dataclasses.asdict(TrainConfig())
    assert [name for name, value in dataclasses.asdict(expected).items() if value == default[name]] == []  # all set
    assert config_from_args(build_parser().parse_args(["--compile", "aot_eager"])).compile == "aot_eager"
    # Left out, every flag keeps the field's default (time limit and precision follow the no-argument run).
    assert config_from_args(build_parser().parse_args(["--steps", "5"])) == TrainConfig(steps=5)


def test_one_ctrl_c_and_two_are_told_apart(monkeypatch, capsys):
    """A second signal during the loop stops without its checkpoint; one Ctrl-C outside the loop (setup, the
    final evaluation) stops at once too, and must not be reported as a second signal."""
    import mulclip_fast.train.cli as cli
    from mulclip_fast.train.loop import SecondSignal, StopRequest

    stop = StopRequest()
    stop._handle(signal.SIGINT, None)  # the first signal only asks the loop to stop after its step
    with pytest.raises(SecondSignal):
        stop._handle(signal.SIGINT, None)
    for raised, message in ((SecondSignal, "interrupted twice"), (KeyboardInterrupt, "during setup or the final")):

        def interrupted(*args, raised=raised, **kwargs):
            raise raised

        monkeypatch.setattr(cli, "train", interrupted)
        assert main(["--steps", "1", "--out", "unused"]) == 130
        assert message in capsys.readouterr().err


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_the_run_resumes(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "mulclip_fast.train", "--steps", "10000", "--batch-size", "4", "--out", str(out)]
    cmd += SMALL + ["--eval-pairs", "0", "--loss", "global"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and (not metrics.exists() or len(read_jsonl(metrics)) < 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "stopped by a signal" in stdout and "Traceback" not in stderr
    (checkpoint,) = os.listdir(out / "checkpoints")
    step = load_training_checkpoint(str(out / "checkpoints" / checkpoint))["step"]
    assert step >= 2 and [m["step"] for m in read_jsonl(metrics)] == list(range(step))


def test_a_time_limit_starts_no_step_that_would_end_past_it(tmp_path, monkeypatch):
    # A fake clock on which every step takes 10 s (the first 30 s: compilation and warm-up are not a pace).
    # Under a 65 s limit steps end at 30, 40, 50 and 60 s; a fifth would end at 70 s and does not start.
    # Until 2026-12-01 a step started whenever the limit had not yet passed, and the run ended at 70 s.
    clock = {"now": 0.0}
    monkeypatch.setattr(loop, "time", SimpleNamespace(perf_counter=lambda: clock["now"]))
    step = Trainer.step

    def timed_step(self, *args, **kwargs):
        clock["now"] += 30.0 if clock["now"] == 0 else 10.0
        return step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "step", timed_step)
    summary = train(small_config(tmp_path / "run", steps=20, time_limit=65))
    assert summary["steps"] == 4 and clock["now"] == 60.0
    assert [m["step"] for m in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [0, 1, 2, 3]


def test_a_signal_during_the_final_save_keeps_the_checkpoint(tmp_path, monkeypatch, capsys):
    # The final checkpoint was written after the signal handlers were put back: a SIGINT (Ctrl-C) or SIGTERM
    # while it was being written ended the run without it, losing every step since the last periodic
    # checkpoint (with the default --checkpoint-every 0, the whole run). SIGINT here: under the default
    # handler a SIGTERM would end pytest itself; both take the same path.
    settings = ["--steps", "3", "--batch-size", "4", "--loss", "global", "--eval-pairs", "4", "--val-pairs", "4"]
    assert main([*SMALL, *settings, "--out", str(tmp_path / "straight")]) == 0
    real_save = torch.save

    def interrupted_save(obj, path):
        if os.path.basename(str(path)).startswith("step_00000003.pt.tmp."):
            os.kill(os.getpid(), signal.SIGINT)
        real_save(obj, path)

    monkeypatch.setattr(torch, "save", interrupted_save)
    out = tmp_path / "run"
    assert main([*SMALL, *settings, "--out", str(out)]) == 128 + signal.SIGINT
    assert "stopped by a signal at step 3" in capsys.readouterr().out
    assert os.listdir(out / "checkpoints") == ["step_00000003.pt"]
    assert not (out / "eval.json").exists()  # stopped before the final evaluation, which --resume runs
    monkeypatch.setattr(torch, "save", real_save)
    assert main(["--resume", "--out", str(out)]) == 0
    assert read_jsonl(out / "metrics.jsonl") != [] and json.loads((out / "eval.json").read_text()) == json.loads(
        (tmp_path / "straight" / "eval.json").read_text()
    )
    final_a = load_training_checkpoint(str(tmp_path / "straight" / "checkpoints" / "step_00000003.pt"))["model"]
    final_b = load_training_checkpoint(str(out / "checkpoints" / "step_00000003.pt"))["model"]
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_a_resumed_time_limited_run_keeps_the_pace_it_measured(tmp_path, monkeypatch):
    # A fake clock on which every step takes 10 s: under a 65 s limit the run trains 6 steps (the 7th would
    # end at 70 s). The pace was not in the checkpoint, so a resumed run had none until its second step and
    # started any step: stopped at step 5 and resumed it trained 7 steps, and the finished run resumed
    # trained an 8th.
    clock = {"now": 0.0}
    monkeypatch.setattr(loop, "time", SimpleNamespace(perf_counter=lambda: clock["now"]))
    step = Trainer.step

    def timed_step(self, *args, **kwargs):
        clock["now"] += 10.0
        return step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "step", timed_step)
    settings = dict(steps=20, time_limit=65, loss="global")
    assert train(small_config(tmp_path / "straight", **settings))["steps"] == 6
    out = tmp_path / "resumed"
    train(small_config(out, **settings), stop_at_step=5)
    assert train(TrainConfig(out=str(out)), resume=True)["steps"] == 6
    assert train(TrainConfig(out=str(out)), resume=True)["steps"] == 6  # a finished run stays finished
    a = read_jsonl(tmp_path / "straight" / "metrics.jsonl")
    b = read_jsonl(out / "metrics.jsonl")
    assert [(m["step"], m["loss"], m["lr"]) for m in a] == [(m["step"], m["loss"], m["lr"]) for m in b]
