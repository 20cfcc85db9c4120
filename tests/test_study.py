"""``python -m mulclip_fast.study``: the --quick study end to end, its resume, and the rules of its table."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from mulclip_fast.export import export_clip_weights
from mulclip_fast.study import QUICK, ROWS, StudyError, run_study, runner
from mulclip_fast.study import __main__ as study_cli
from mulclip_fast.study.gradients import gradient_alignment
from mulclip_fast.study.report import METRICS, compare, metric_values, summarise
from mulclip_fast.train import resolve_config
from mulclip_fast.train.loop import open_training_set


@pytest.mark.slow
def test_quick_study_runs_every_row_and_seed_and_resumes_without_redoing_them(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "study")
    assert study_cli.main(["--quick", "--out", out]) == 0
    printed = capsys.readouterr().out
    results = json.load(open(os.path.join(out, "results.json")))
    assert list(results["rows"]) == [row.key for row in ROWS]
    for row in results["rows"].values():
        assert sorted(row["seeds"]) == ["1", "2"]
        assert row["label"] in printed
        per_seed = [metric_values(result) for result in row["seeds"].values()]
        assert set(row["mean"]) == {key for key, _, _ in METRICS}  # every metric, read from every seed
        for key, value in row["mean"].items():
            assert value == pytest.approx(sum(v[key] for v in per_seed) / len(per_seed))
    assert set(results["pretrained"]["seeds"]) == {"1", "2"}
    assert set(results["mulclip_vs_global"]) >= {"long_r1", "hardneg_mean", "hardneg_binding"}
    assert list(results["gradients"]) == ["mulclip"]  # the ablation's one row with Row.gradients
    assert set(results["gradients"]["mulclip"]["1"]) >= {"wpr", "sap", "finelip"}
    for name in ("results.md", "results.png", "pretrained.pt"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    # Finished rows keep their evaluation, not their 100 MB checkpoints.
    assert not os.path.exists(os.path.join(out, "runs", "mulclip", "seed1", "checkpoints"))

    # Run again: nothing retrains; drop one row's summary and only that row runs again.
    trained = []
    real_train = runner.train
    monkeypatch.setattr(runner, "train", lambda config, **kw: trained.append(config.out) or real_train(config, **kw))
    assert study_cli.main(["--quick", "--out", out]) == 0
    assert trained == []
    os.remove(os.path.join(out, "runs", "finelip", "seed2", "study_eval.json"))
    assert study_cli.main(["--quick", "--out", out]) == 0
    assert trained == [os.path.join(out, "runs", "finelip", "seed2")]
    again = json.load(open(os.path.join(out, "results.json")))
    assert again["rows"]["finelip"]["mean"] == results["rows"]["finelip"]["mean"]  # a function of the seed

    # Variant rows join the same directory: measured (their gradients too), tabled after the ablation's rows.
    assert study_cli.main(["--quick", "--out", out, "--rows", "mulclip-wpr-cosine,mulclip-no-lc"]) == 0
    assert trained[1:] == [
        os.path.join(out, "runs", k, f"seed{s}") for k in ("mulclip-no-lc", "mulclip-wpr-cosine") for s in (1, 2)
    ]
    variants = json.load(open(os.path.join(out, "results.json")))
    assert list(variants["rows"]) == [row.key for row in ROWS] + ["mulclip-no-lc", "mulclip-wpr-cosine"]
    assert list(variants["gradients"]) == ["mulclip", "mulclip-no-lc", "mulclip-wpr-cosine"]
    assert variants["gradients"]["mulclip"] == results["gradients"]["mulclip"]  # read, not measured again
    assert "| MulCLIP, WPR in cosine form | 2 |" in open(os.path.join(out, "results.md")).read()

    # Other settings in the same directory are refused, not mixed in.
    with pytest.raises(StudyError, match="other settings"):
        run_study(out, dataclasses.replace(QUICK, finetune_steps=3))
    assert study_cli.main(["--quick", "--out", out, "--rows", "nope"]) == 2


def test_compare_beats_only_above_the_larger_spread():
    def row(values):
        seeds = {str(i): {"t2i_r1": v, "i2t_r1": v} for i, v in enumerate(values)}
        return summarise(seeds), seeds

    (a, a_seeds), (b, b_seeds) = row([0.60, 0.62, 0.64]), row([0.50, 0.52, 0.54])
    result = compare(a, b, a_seeds, b_seeds)["long_r1"]
    assert result["difference"] == pytest.approx(0.10) and result["spread"] == pytest.approx(0.02)
    assert result["beats"] and result["paired_mean"] == pytest.approx(0.10) and result["paired_std"] == pytest.approx(0)
    (c, c_seeds) = row([0.40, 0.60, 0.80])  # same mean gap would be covered by its own spread
    assert not compare(c, b, c_seeds, b_seeds)["long_r1"]["beats"]


def test_one_seed_has_no_spread_and_answers_no_beats(tmp_path):
    # A sample standard deviation needs two seeds: one seed's spread is unknown, not 0, and the rule "above
    # by more than the spread across seeds" cannot be applied to it.
    from mulclip_fast.study.report import markdown

    a_seeds, b_seeds = {"1": {"t2i_r1": 0.6, "i2t_r1": 0.6}}, {"1": {"t2i_r1": 0.5, "i2t_r1": 0.5}}
    a, b = summarise(a_seeds), summarise(b_seeds)
    assert a["mean"]["long_r1"] == pytest.approx(0.6) and a["std"]["long_r1"] is None
    result = compare(a, b, a_seeds, b_seeds)["long_r1"]
    assert result["difference"] == pytest.approx(0.1) and result["paired_mean"] == pytest.approx(0.1)
    assert result["beats"] is None and result["spread"] is None and result["paired_std"] is None
    results = {
        "settings": {**QUICK.to_dict(), "seeds": [1]},
        "invocation_seconds": 1.0,
        "pretrained": b,
        "rows": {"global": {"label": "global only", **b}, "mulclip": {"label": "MulCLIP", **a}},
        "mulclip_vs_global": compare(a, b, a_seeds, b_seeds),
    }
    table = markdown(results)
    assert "0.600 (one seed)" in table and "± 0.000" not in table
    assert "— MulCLIP beats" not in table and "cannot tell" in table.split("## MulCLIP against global-only")[1]
    # Seeds are matched by name, not by position.
    c_seeds = {"2": {"t2i_r1": 0.9, "i2t_r1": 0.9}, "1": {"t2i_r1": 0.7, "i2t_r1": 0.7}}
    d_seeds = {"1": {"t2i_r1": 0.6, "i2t_r1": 0.6}, "2": {"t2i_r1": 0.6, "i2t_r1": 0.6}}
    paired = compare(summarise(c_seeds), summarise(d_seeds), c_seeds, d_seeds)["long_r1"]
    assert paired["paired_mean"] == pytest.approx(0.2) and paired["paired_std"] == pytest.approx(2**0.5 * 0.1)
    assert paired["paired"] == {"1": pytest.approx(0.1), "2": pytest.approx(0.3)}  # in the seeds' order


def test_the_table_prints_each_seeds_paired_difference():
    # docs/study.md: "the paired per-seed differences are printed beside it", each of them.
    from mulclip_fast.study.report import markdown

    a_seeds = {str(s): {"t2i_r1": v, "i2t_r1": v} for s, v in ((1, 0.40), (2, 0.50), (3, 0.62))}
    b_seeds = {str(s): {"t2i_r1": v, "i2t_r1": v} for s, v in ((1, 0.35), (2, 0.49), (3, 0.60))}
    a, b = summarise(a_seeds), summarise(b_seeds)
    results = {
        "settings": {**QUICK.to_dict(), "seeds": [1, 2, 3]},
        "invocation_seconds": 1.0,
        "pretrained": b,
        "rows": {"global": {"label": "global only", **b}, "mulclip": {"label": "MulCLIP", **a}},
        "mulclip_vs_global": compare(a, b, a_seeds, b_seeds),
    }
    line = next(x for x in markdown(results).splitlines() if x.startswith("- long R@1 (mean)"))
    assert "seed 1 +0.050, seed 2 +0.010, seed 3 +0.020" in line and "+0.027 ± 0.021" in line


def test_gradient_alignment_scales_with_the_term_weight(tmp_path):
    settings = dataclasses.replace(QUICK, pretrain_steps=1)
    runner._run(runner.pretrain_config(settings, str(tmp_path / "pre")), str(tmp_path / "pre.log"))
    weights = str(tmp_path / "w.pt")
    export_clip_weights(str(tmp_path / "pre"), weights)
    mulclip = next(row for row in ROWS if row.key == "mulclip")
    config = runner.finetune_config(mulclip, 1, settings, weights, str(tmp_path / "unused"))
    base = gradient_alignment(config, batches=1)
    doubled = gradient_alignment(dataclasses.replace(config, weights={"wpr": 2.0, "sap": 0.0}), batches=1)
    assert -1 <= base["wpr"]["cosine"] <= 1 and base["wpr"]["norm_ratio"] > 0
    assert doubled["wpr"]["norm_ratio"] == pytest.approx(2 * base["wpr"]["norm_ratio"], rel=1e-4)
    assert doubled["wpr"]["cosine"] == pytest.approx(base["wpr"]["cosine"], abs=1e-5)
    assert doubled["sap"]["norm_ratio"] == 0 and doubled["sap"]["cosine"] == 0
    assert doubled["global_norm"] == pytest.approx(base["global_norm"], rel=1e-5)


def test_gradient_alignment_reads_the_runs_own_first_batches(tmp_path, monkeypatch):
    # The run's training set has binding twins (--twin-fraction, 0.5 by default): the batches the
    # alignment is measured on must be the ones the run trains on, twins included.
    from mulclip_fast.study import gradients

    settings = dataclasses.replace(QUICK, pretrain_steps=1)
    runner._run(runner.pretrain_config(settings, str(tmp_path / "pre")), str(tmp_path / "pre.log"))
    weights = str(tmp_path / "w.pt")
    export_clip_weights(str(tmp_path / "pre"), weights)
    mulclip = next(row for row in ROWS if row.key == "mulclip")
    config = resolve_config(runner.finetune_config(mulclip, 1, settings, weights, str(tmp_path / "unused")))
    assert config.twin_fraction > 0
    read = []
    real_iterate = gradients.iterate_batches
    monkeypatch.setattr(
        gradients, "iterate_batches", lambda dataset, *a, **kw: read.append(dataset) or real_iterate(dataset, *a, **kw)
    )
    gradient_alignment(config, batches=1)
    n = 2 * settings.batch_size
    captions = lambda dataset: [dataset[i]["caption"] for i in range(n)]  # noqa: E731
    # What mulclip_fast/train/loop.py trains on; until 2026-12-01 the measurement read the set without twins.
    untwinned = open_training_set(dataclasses.replace(config, twin_fraction=0.0))
    assert captions(read[0]) == captions(open_training_set(config)) != captions(untwinned)


def test_gradients_of_a_finished_row_survive_an_interrupted_later_row(tmp_path, monkeypatch):
    from mulclip_fast.study.plan import ALL_ROWS

    rows = tuple(row for row in ALL_ROWS if row.gradients)[:2]
    measured = []

    def fake_alignment(config):
        if len(measured) == len(QUICK.seeds):  # the second row's first seed: the study is stopped
            raise KeyboardInterrupt("signal")
        measured.append(config.seed)
        return {"seed": config.seed}

    monkeypatch.setattr(runner, "gradient_alignment", fake_alignment)
    with pytest.raises(KeyboardInterrupt):
        runner._gradients(str(tmp_path), "w.pt", QUICK, rows)
    stored = json.load(open(tmp_path / "gradients.json"))
    assert stored == {rows[0].key: {str(s): {"seed": s} for s in QUICK.seeds}}
    # Run again: the finished row is read, not measured again.
    monkeypatch.setattr(runner, "gradient_alignment", lambda config: measured.append(config.seed) or {})
    measured.clear()
    result = runner._gradients(str(tmp_path), "w.pt", QUICK, rows)
    assert measured == list(QUICK.seeds) and list(result) == [row.key for row in rows]


def test_a_row_overrides_the_fine_tuning_defaults(tmp_path):
    from mulclip_fast.study.plan import ALL_ROWS, FULL

    rows = {row.key: row for row in ALL_ROWS}
    base = runner.finetune_config(rows["mulclip"], 2, FULL, "w.pt", "out")
    assert (base.steps, base.val_every, base.fine_start, base.lr, base.seed) == (100, 100, 0.0, 1e-4, 2)
    longer = runner.finetune_config(rows["mulclip-300-steps"], 2, FULL, "w.pt", "out")
    assert (longer.steps, longer.val_every, longer.loss) == (300, 300, "mulclip")
    light = runner.finetune_config(rows["mulclip-lambda-0.1"], 2, FULL, "w.pt", "out")
    assert light.weights == {"wpr": 0.1, "sap": 0.1} and light.init == "openai:w.pt"
    # Every row is a valid run: its settings resolve (a misspelt field or a bad value fails here, not after
    # the pretraining of a 45-minute study).
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"")  # resolve_config checks that --init names a file, not what it holds
    for row in ALL_ROWS:
        resolved = resolve_config(runner.finetune_config(row, 1, FULL, str(weights), str(tmp_path / "out")))
        assert resolved.init == f"openai:{weights}" and resolved.seed == 1, row.key
    knobs = {key: runner.finetune_config(rows[key], 1, FULL, "w.pt", "out") for key in rows}
    assert knobs["mulclip-lr-3e-4"].lr == 3e-4 and knobs["global-lr-3e-4"].loss == "global"
    assert (knobs["mulclip-tau-0.2"].tau_attn, knobs["mulclip-tau-0.2"].tau_sap) == (0.2, 0.2)
    assert not knobs["mulclip-no-lc"].calibration and knobs["mulclip-late-start"].fine_start == 0.5
    assert knobs["mulclip-wpr-cosine"].wpr_form == "cosine"
