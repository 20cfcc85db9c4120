"""The two stages of the paper's setting: short-caption pretraining (``--captions short``), the export of its
weights as an OpenAI-layout file, and fine-tuning from it (or from a training checkpoint) through ``--init``."""

from __future__ import annotations

import glob
import json

import numpy as np
import pytest
import torch

from mulclip_fast.data import LONG_CONTEXT, SHORT_CONTEXT, Collator, SummaryCaptions, open_dataset, summary_of
from mulclip_fast.export import main as export_main
from mulclip_fast.model import CLIP, CheckpointError, load_clip_weights, preset_config
from mulclip_fast.model.loading import CALIBRATION_PREFIXES
from mulclip_fast.train import ConfigError, TrainConfig, Trainer, build_parser, config_from_args, resolve_config, train

SMALL_OVERRIDES = {"vision_layers": 1, "transformer_layers": 1}


def pretrain(out, **kwargs) -> str:
    config = TrainConfig(
        captions="short",
        loss="global",
        model_overrides=dict(SMALL_OVERRIDES),
        batch_size=4,
        steps=2,
        eval_pairs=0,
        val_pairs=4,
        val_every=1000,
        out=str(out),
        **kwargs,
    )
    train(config)
    return sorted(glob.glob(f"{out}/checkpoints/step_*.pt"))[-1]


def test_short_captions_are_the_summaries_and_the_model_gets_77_positions(tmp_path):
    long = open_dataset("synthetic", "train", 64, 4, seed=1)
    short = open_dataset("synthetic", "train", 64, 4, seed=1, captions="short")
    assert isinstance(short, SummaryCaptions)
    for i in range(4):
        assert short[i]["caption"] == summary_of(long[i]["caption"]) != long[i]["caption"]
        assert short[i]["probe"] == summary_of(long[i]["probe"])
        assert torch.equal(short[i]["image"], long[i]["image"])
    config = resolve_config(TrainConfig(captions="short", loss="global", out=str(tmp_path)))
    assert config.model_overrides["context_length"] == SHORT_CONTEXT
    assert Trainer(config).terms == ("global_long",)  # the summary is the caption: one contrastive term
    kept = resolve_config(TrainConfig(captions="short", loss="global", model_overrides={"context_length": 100}))
    assert kept.model_overrides["context_length"] == 100
    with pytest.raises(ConfigError, match="--captions short.*--loss mulclip"):
        resolve_config(TrainConfig(captions="short"))


def test_collator_truncates_to_the_model_context_keeping_eot():
    item = open_dataset("synthetic", "test", 64, 1, seed=0)[0]
    long = Collator(with_subcaptions=False)([item])
    short = Collator(with_subcaptions=False, long_context=SHORT_CONTEXT)([item])
    assert long.long_ids.shape[1] > SHORT_CONTEXT  # the synthetic long caption needs more than 77 positions
    assert short.long_ids.shape[1] == short.probe_ids.shape[1] == SHORT_CONTEXT
    eot = long.long_ids.max()
    assert short.long_ids[0, -1] == eot and torch.equal(short.long_ids[0, :-1], long.long_ids[0, : SHORT_CONTEXT - 1])
    assert Collator(long_context=LONG_CONTEXT).short_context == SHORT_CONTEXT
    assert Collator(long_context=40).short_context == 40
    with pytest.raises(ValueError, match="long_context"):
        Collator(long_context=1)


def test_a_training_checkpoint_is_init_weights_and_exports_to_openai_layout(tmp_path, capsys):
    checkpoint = pretrain(tmp_path / "pre")
    state = torch.load(checkpoint, weights_only=True)  # what --init does: no pickled objects besides tensors
    assert state["model"]["positional_embedding"].shape[0] == SHORT_CONTEXT
    exported = tmp_path / "pretrained.pt"
    assert export_main(["--checkpoint", str(tmp_path / "pre"), "--out", str(exported)]) == 0
    assert "--init openai:" in capsys.readouterr().out
    weights = torch.load(exported, weights_only=True)
    assert not any(k.startswith(CALIBRATION_PREFIXES) for k in weights)
    assert set(weights) == {k for k in state["model"] if not k.startswith(CALIBRATION_PREFIXES)}
    for source in (exported, checkpoint):  # both load as a released checkpoint does: 77 -> 248, 20 frozen
        model = CLIP(preset_config("tiny", **SMALL_OVERRIDES))
        report = load_clip_weights(model, str(source))
        assert report["stretched_77_to"] == LONG_CONTEXT
        assert torch.equal(model.positional_embedding[:20], weights["positional_embedding"][:20])
        assert torch.equal(model.visual.conv1.weight, weights["visual.conv1.weight"])
    assert export_main(["--checkpoint", str(exported), "--out", str(tmp_path / "x.pt")]) == 2
    assert "not a training checkpoint" in capsys.readouterr().err


def test_an_older_checkpoint_with_numpy_state_is_refused_with_the_way_out(tmp_path, capsys):
    checkpoint = pretrain(tmp_path / "pre")
    state = torch.load(checkpoint, weights_only=True)
    kind, keys, pos, has_gauss, cached = state["rng"]["numpy"]
    state["rng"]["numpy"] = (kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached)  # as before 2026-11-30
    old = tmp_path / "old.pt"
    torch.save(state, old)
    with pytest.raises(CheckpointError, match="python -m mulclip_fast.export"):
        load_clip_weights(CLIP(preset_config("tiny", **SMALL_OVERRIDES)), str(old))
    assert export_main(["--checkpoint", str(old), "--out", str(tmp_path / "w.pt")]) == 0  # the way out works
    assert "positional_embedding" in torch.load(tmp_path / "w.pt", weights_only=True)


def test_fine_tuning_from_the_export_starts_every_term_at_once(tmp_path):
    pretrain(tmp_path / "pre")
    exported = str(tmp_path / "pretrained.pt")
    assert export_main(["--checkpoint", str(tmp_path / "pre"), "--out", exported]) == 0
    parse = lambda *argv: config_from_args(build_parser().parse_args(list(argv)))  # noqa: E731
    assert parse("--init", f"openai:{exported}").fine_start == 0.0
    assert parse().fine_start == 0.8
    assert parse("--init", f"openai:{exported}", "--fine-start", "0.5").fine_start == 0.5
    config = TrainConfig(
        init=f"openai:{exported}",
        loss="mulclip-clim",
        model_overrides=dict(SMALL_OVERRIDES),
        batch_size=4,
        steps=2,
        fine_start=0.0,
        fine_ramp=0.0,
        eval_pairs=8,
        val_pairs=4,
        val_every=1000,
        out=str(tmp_path / "ft"),
    )
    summary = train(config)
    assert summary["steps"] == 2 and summary["eval"]["n_pairs"] == 8
    metrics = [json.loads(line) for line in open(tmp_path / "ft" / "metrics.jsonl")]
    assert {"finelip", "sap"} <= set(metrics[0]) and "wpr" not in metrics[0]  # CLIM in WPR's place, from step 0
