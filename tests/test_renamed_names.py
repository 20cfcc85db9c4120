"""Names from before WPR and SAP took one name each still work, with a deprecation message: the loss terms
"word" / "sub" (now "wpr" / "sap"), the flags --w-word / --w-sub, the op pairwise_topk_aggregate_logits, and
checkpoints and metrics.jsonl files written under the old names."""

from __future__ import annotations

import json

import pytest
import torch

from mulclip_fast import bench_report, ops
from mulclip_fast.losses import MulCLIPLoss
from mulclip_fast.train import TrainConfig, build_parser, config_from_args, load_training_checkpoint, train
from mulclip_fast.train.config import resolve_config
from tests.test_losses import SCALE, features
from tests.test_train import read_jsonl, small_config


def test_old_term_names_select_and_weight_the_renamed_terms_with_a_warning():
    f = features()
    current = MulCLIPLoss(terms=("global_long", "wpr", "sap"), weights={"wpr": 2.0, "sap": 0.5})
    with pytest.warns(DeprecationWarning, match="'word' is now 'wpr'"):
        old = MulCLIPLoss(terms=("global_long", "word", "sub"), weights={"word": 2.0, "sub": 0.5})
    assert old.terms == current.terms == ("global_long", "wpr", "sap")
    assert old.weights == current.weights
    expected, got = current(f, SCALE), old(f, SCALE)
    assert set(got) == {"global_long", "wpr", "sap", "loss"}
    for name in expected:
        torch.testing.assert_close(got[name], expected[name])


def test_a_term_named_under_its_old_and_its_current_name_is_refused():
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="name a term twice"):
        MulCLIPLoss(weights={"word": 2.0, "wpr": 1.0})


def test_old_op_name_returns_the_cosines_with_a_warning():
    g = torch.Generator().manual_seed(0)
    sub, patches = torch.randn(2, 3, 8, generator=g), torch.randn(4, 5, 8, generator=g)
    expected = ops.pairwise_topk_aggregate_cosines(sub, patches, k=2, backend="torch")
    with pytest.warns(DeprecationWarning, match="call pairwise_topk_aggregate_cosines"):
        got = ops.pairwise_topk_aggregate_logits(sub, patches, k=2, backend="torch")
    torch.testing.assert_close(got, expected)


def test_old_weight_flags_set_the_renamed_weights_and_say_so_on_stderr(capsys):
    parser = build_parser()
    config = config_from_args(parser.parse_args(["--w-word", "2", "--w-sub", "0.5", "--w-finelip", "3"]))
    assert config.weights == {"wpr": 2.0, "sap": 0.5, "finelip": 3.0}
    err = capsys.readouterr().err
    assert "--w-word is deprecated; use --w-wpr" in err and "--w-sub is deprecated; use --w-sap" in err
    assert config_from_args(parser.parse_args(["--w-wpr", "2"])).weights == {"wpr": 2.0}
    assert capsys.readouterr().err == ""
    help_text = parser.format_help()
    assert "--w-wpr" in help_text and "--w-sap" in help_text and "--w-word" not in help_text


def test_a_scripts_config_with_old_term_names_resolves_to_the_current_ones():
    with pytest.warns(DeprecationWarning, match="'sub' is now 'sap'"):
        config = resolve_config(TrainConfig(weights={"sub": 0.5}))
    assert config.weights == {"sap": 0.5}


def test_a_run_written_under_the_old_term_names_resumes_under_the_current_ones(tmp_path):
    weights = {"wpr": 2.0, "sap": 0.5}
    train(small_config(tmp_path / "straight", weights=weights))
    run = tmp_path / "old"
    train(small_config(run, weights=weights, checkpoint_every=3), stop_at_step=3)
    # What a run before the rename wrote: its weights and its logged terms under the old names.
    path = run / "checkpoints" / "step_00000003.pt"
    state = torch.load(path, weights_only=False)
    state["config"]["weights"] = {"word": 2.0, "sub": 0.5}
    torch.save(state, path)
    old_names = {"wpr": "word", "sap": "sub"}
    records = [{old_names.get(k, k): v for k, v in r.items()} for r in read_jsonl(run / "metrics.jsonl")]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert load_training_checkpoint(str(path))["config"]["weights"] == weights

    resumed = train(TrainConfig(out=str(run)), resume=True)

    assert resumed["steps"] == 6
    assert json.loads((run / "config.json").read_text())["weights"] == weights
    a = read_jsonl(tmp_path / "straight" / "metrics.jsonl")
    b = read_jsonl(run / "metrics.jsonl")
    assert not [r for r in b if {"word", "sub"} & set(r)]
    for key in ("loss", "wpr", "sap"):
        assert [m.get(key) for m in a] == [m.get(key) for m in b], key


def test_benchmark_results_of_the_old_op_name_are_reported_under_the_current_one(tmp_path):
    record = {"op": "pairwise_topk_aggregate_logits", "backend": "torch", "mode": "forward", "shape": "Bq=2"}
    path = tmp_path / "bench-cpu-20260101T000000Z.json"
    path.write_text(json.dumps({"machine": {"device": "cpu"}, "results": [record]}))
    (loaded,) = bench_report.load_results(path)["results"]
    assert loaded["op"] == "pairwise_topk_aggregate_cosines"
