"""Running the study: pretraining once, then every row × seed, resumable at any point.

Layout of the study directory::

    study.json                 the settings (a resumed study must be given the same)
    pretrain/                  the short-caption pretraining run (a normal run directory)
    pretrained.pt              its CLIP weights, OpenAI layout (``python -m mulclip_fast.export``)
    pretrained_eval.json       the pretrained model evaluated on each seed's test set
    gradients.json             gradient alignment of the fine-grained terms at the fine-tuning start, per row
    runs/ROW/seedN/            one fine-tuning run directory per row and seed: its logs, ``study_eval.json``
                               (its checkpoint is deleted once evaluated)
    logs/                      what each run printed
    results.json, results.md, results.png

A fine-tuning run counts as done when its ``study_eval.json`` exists (written after training, before its
checkpoint is deleted); an interrupted run resumes from its newest checkpoint, one that never checkpointed
starts over.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time

from ..data import open_dataset
from ..eval import evaluate, load_model_for_eval
from ..export import export_clip_weights
from ..model import CLIP, load_clip_weights, preset_config
from ..run_checkpoints import list_checkpoints
from ..train import TrainConfig, train
from ..train.checkpoint import atomic_write_text
from .gradients import gradient_alignment
from .plan import ALL_ROWS, ROWS, Row, StudySettings
from .report import write_results


class StudyError(ValueError):
    """A study directory that does not fit the requested study; the message says why."""


def pretrain_config(settings: StudySettings, out: str) -> TrainConfig:
    """CLIP-style pretraining: the global loss on the summaries alone, 77 text positions, independent pairs
    (no binding twins: alt-text scraped from the web has none)."""
    return TrainConfig(
        captions="short",
        loss="global",
        twin_fraction=0.0,
        steps=settings.pretrain_steps,
        lr=settings.pretrain_lr,
        batch_size=settings.batch_size,
        seed=settings.pretrain_seed,
        eval_pairs=settings.eval_pairs,
        val_every=settings.pretrain_steps,  # no validation pass mid-run: the final evaluation is the result
        val_pairs=min(64, settings.eval_pairs),
        checkpoint_every=max(1, settings.pretrain_steps // 4),
        keep_checkpoints=1,
        precision="fp32",
        model_overrides=dict(settings.model_overrides),
        out=out,
    )


def finetune_config(row: Row, seed: int, settings: StudySettings, pretrained: str, out: str) -> TrainConfig:
    """One row's fine-tuning from the pretrained weights: every term at full weight from the first step,
    unless the row's settings say otherwise (they override these)."""
    settings_of_run = dict(
        init=f"openai:{pretrained}",
        steps=settings.finetune_steps,
        lr=settings.finetune_lr,
        batch_size=settings.batch_size,
        seed=seed,
        fine_start=0.0,
        fine_ramp=0.0,
        eval_pairs=0,  # evaluated by the study itself (``evaluate_study_model``): hard negatives on every pair
        val_pairs=min(64, settings.eval_pairs),
        checkpoint_every=0,  # a row is short: a signal still checkpoints it, a kill redoes it
        keep_checkpoints=1,
        precision="fp32",
        model_overrides=dict(settings.model_overrides),
        out=out,
    )
    settings_of_run.update(row.settings)
    settings_of_run["val_every"] = settings_of_run["steps"]  # no validation pass mid-run
    return TrainConfig(**settings_of_run)


def evaluate_study_model(model: CLIP, seed: int, settings: StudySettings) -> dict:
    """Every metric of ``eval.evaluate`` on seed ``seed``'s synthetic test split, with the hard negatives
    scored on all ``eval_pairs`` pairs (the trainer's evaluation scores 100): the study compares rows
    by them, and 100 pairs leave a standard error of up to 0.05."""
    test = open_dataset("synthetic", "test", model.config.image_resolution, settings.eval_pairs, seed)
    return evaluate(model, test, hardneg_pairs=settings.eval_pairs)


def _run(config: TrainConfig, log_path: str) -> None:
    """``train(config)`` with its output in ``log_path``: does nothing for a finished run (its
    ``summary.json`` and checkpoint written), resumes one that has a checkpoint, restarts one that has none."""
    folder = os.path.join(config.out, "checkpoints")
    resume = os.path.isdir(folder) and bool(list_checkpoints(folder))
    if resume and os.path.exists(os.path.join(config.out, "summary.json")):
        return
    overwrite = os.path.isdir(config.out) and not resume
    with open(log_path, "a") as log, contextlib.redirect_stdout(log):
        summary = train(config, resume=resume, overwrite=overwrite, given=set())
    if summary.get("interrupted") is not None:
        raise KeyboardInterrupt(f"{config.out} was interrupted")


def _finetune(config: TrainConfig, seed: int, settings: StudySettings, log_path: str) -> dict:
    """One row × seed: trained, evaluated (``study_eval.json``), then its checkpoint deleted (about 100 MB
    for the tiny preset with its optimizer state; the study needs the evaluation, and 21 checkpoints would
    fill gigabytes). A finished row returns its stored evaluation."""
    result_path = os.path.join(config.out, "study_eval.json")
    if os.path.exists(result_path):
        with open(result_path) as handle:
            return json.load(handle)
    _run(config, log_path)
    model, _ = load_model_for_eval(config.out, preset=None, device="cpu")
    result = evaluate_study_model(model, seed, settings)
    atomic_write_text(result_path, json.dumps(result, indent=2))
    shutil.rmtree(os.path.join(config.out, "checkpoints"))
    return result


def _check_settings(out: str, settings: StudySettings) -> None:
    path = os.path.join(out, "study.json")
    if os.path.exists(path):
        with open(path) as handle:
            stored = json.load(handle)
        if stored != json.loads(json.dumps(settings.to_dict())):  # as stored: tuples become lists
            raise StudyError(f"{out} holds a study with other settings ({stored}); give another --out to run this one")
    else:
        atomic_write_text(path, json.dumps(settings.to_dict(), indent=2))


def _evaluate_pretrained(out: str, pretrained: str, settings: StudySettings) -> dict:
    """The pretrained model's evaluation on each seed's test set: where every row starts."""
    path = os.path.join(out, "pretrained_eval.json")
    if os.path.exists(path):
        with open(path) as handle:
            return json.load(handle)
    model = CLIP(preset_config("tiny", **settings.model_overrides))
    load_clip_weights(model, pretrained)
    result = {str(seed): evaluate_study_model(model, seed, settings) for seed in settings.seeds}
    atomic_write_text(path, json.dumps(result, indent=2))
    return result


def _gradients(out: str, pretrained: str, settings: StudySettings, rows: tuple[Row, ...]) -> dict:
    """``{row: {seed: gradient_alignment}}`` for the rows that ask for it (``Row.gradients``), read from
    ``gradients.json`` where an earlier invocation measured them. Each row is written as soon as all its
    seeds are measured, so an interrupted invocation keeps the rows it finished."""
    path = os.path.join(out, "gradients.json")
    result = {}
    if os.path.exists(path):
        with open(path) as handle:
            result = json.load(handle)
    for row in rows:
        if not row.gradients or row.key in result:
            continue
        result[row.key] = {
            str(seed): gradient_alignment(finetune_config(row, seed, settings, pretrained, out="unused"))
            for seed in settings.seeds
        }
        atomic_write_text(path, json.dumps(result, indent=2))
    return result


def run_study(out: str, settings: StudySettings, rows: tuple[Row, ...] = ROWS) -> dict:
    """Run (or resume) the study in ``out``; returns the results written to ``results.json``."""
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    _check_settings(out, settings)
    bar = _Progress(3 + len(rows) * len(settings.seeds))  # pretraining, its evaluation, gradients, the runs
    started = time.perf_counter()
    pretrained = os.path.join(out, "pretrained.pt")
    bar.start("pretraining on short captions")
    _run(pretrain_config(settings, os.path.join(out, "pretrain")), os.path.join(out, "logs", "pretrain.log"))
    if not os.path.exists(pretrained):
        export_clip_weights(os.path.join(out, "pretrain"), pretrained)
    bar.start("evaluating the pretrained model")
    baseline = _evaluate_pretrained(out, pretrained, settings)
    bar.start("gradient alignment at the fine-tuning start")
    gradients = _gradients(out, pretrained, settings, rows)
    evals: dict[str, dict[str, dict]] = {}
    for row in rows:
        for seed in settings.seeds:
            bar.start(f"{row.label}, seed {seed}")
            run_dir = os.path.join(out, "runs", row.key, f"seed{seed}")
            config = finetune_config(row, seed, settings, pretrained, run_dir)
            log_path = os.path.join(out, "logs", f"{row.key}-seed{seed}.log")
            evals.setdefault(row.key, {})[str(seed)] = _finetune(config, seed, settings, log_path)
    bar.close()
    # Rows that an earlier invocation finished in this directory (e.g. ``--rows`` of the knob variants) stay
    # in the table: results.json describes the whole directory, in the plan's order.
    for row in ALL_ROWS:
        paths = [os.path.join(out, "runs", row.key, f"seed{seed}", "study_eval.json") for seed in settings.seeds]
        if row.key not in evals and all(os.path.exists(p) for p in paths):
            evals[row.key] = {}
            for seed, path in zip(settings.seeds, paths, strict=True):
                with open(path) as handle:
                    evals[row.key][str(seed)] = json.load(handle)
    done = tuple(row for row in ALL_ROWS if row.key in evals)
    return write_results(out, settings, done, evals, baseline, gradients, time.perf_counter() - started)


class _Progress:
    """A tqdm bar over the study's stages on a terminal, one line per stage elsewhere (logs, CI)."""

    def __init__(self, total: int):
        self.total, self.done, self.bar = total, 0, None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="stage", dynamic_ncols=True)

    def start(self, what: str) -> None:
        if self.bar is not None:
            if self.done:
                self.bar.update(1)
            self.bar.set_description(what)
        else:
            print(f"[{self.done + 1}/{self.total}] {what}", file=sys.stderr, flush=True)
        self.done += 1

    def close(self) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.close()
