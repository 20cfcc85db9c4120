"""``train(config)``: one whole training job, from the run directory to the final evaluation.

Around ``Trainer.step`` the loop logs metrics (``RunLog``), validates, saves checkpoints, obeys the time
limit and stops cleanly on SIGINT / SIGTERM (``StopRequest``). The data order is a pure function of
(seed, step) and a checkpoint holds everything else a step depends on, so ``--resume`` continues
bit-for-bit.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import threading
import time

import torch

from ..data import DataError, iterate_batches, open_dataset
from ..distributed import (
    agree,
    finish_collectives,
    init_distributed,
    is_main_process,
    shutdown_distributed,
    wait_for_main_rank,
)
from ..eval import evaluate
from ..losses import TERMS
from ..model import CheckpointError, preset_config
from ..run_checkpoints import load_latest_training_checkpoint
from .checkpoint import atomic_write_text, save_checkpoint
from .config import ConfigError, TrainConfig, resolve_config, resumed_config
from .report import summary_table, truncate_jsonl, write_plots
from .run_dir import claim_run_directory
from .trainer import Trainer


class SecondSignal(KeyboardInterrupt):
    """A second SIGINT / SIGTERM while the loop was finishing its step for the first: the run stops at once."""


class StopRequest:
    """SIGINT / SIGTERM set a flag; the loop saves a checkpoint after the current step and exits."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second signal: stop now
            raise SecondSignal
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def _append_record(path: str, record: dict) -> None:
    """Append one record to a jsonl log. A write that fails (disk full, no permission) is the same
    ``error: cannot write …`` as a failed save, not a traceback; the part of the line that was written is a
    torn last line, which a resumed run drops (``report.read_jsonl``)."""
    try:
        with open(path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
    except OSError as exc:
        raise CheckpointError(f"cannot write {path}: {exc.strerror or exc}") from None


class RunLog:
    """``metrics.jsonl`` / ``val.jsonl`` writer plus a tqdm bar on a terminal or plain log lines."""

    def __init__(self, out: str, total_steps: int, start_step: int, resumed: bool, enabled: bool = True):
        self.enabled = enabled  # False on the ranks other than 0 of a distributed run: they write nothing
        self.bar = None
        if not enabled:
            return
        self.metrics_path = os.path.join(out, "metrics.jsonl")
        self.val_path = os.path.join(out, "val.jsonl")
        if resumed:
            # Drop what was logged after the checkpoint we resume from: it will be redone. A metrics record
            # is the step of that index; a validation record follows its step and precedes the checkpoint of
            # the same step, except the final test, which a resumed run repeats.
            truncate_jsonl(self.metrics_path, lambda record: record["step"] < start_step)
            truncate_jsonl(
                self.val_path,
                lambda record: record["step"] < start_step or (record["step"] == start_step and "split" not in record),
            )
        self.total_steps = total_steps
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self.print_every = max(1, total_steps // 20)

    def metrics(self, record: dict) -> None:
        if not self.enabled:
            return
        _append_record(self.metrics_path, record)
        step = record["step"]
        if self.bar is not None:
            self.bar.update(step + 1 - self.bar.n)
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.1e}")
        elif (step + 1) % self.print_every == 0 or step == 0:
            terms = " ".join(f"{k}={record[k]:.3f}" for k in ("loss", *TERMS) if k in record)
            print(
                f"step {step + 1}/{self.total_steps} {terms} lr={record['lr']:.2e} "
                f"{record['samples_per_s']:.0f} samples/s",
                flush=True,
            )

    def val(self, record: dict) -> None:
        if not self.enabled:
            return
        _append_record(self.val_path, record)
        self.write(f"val step {record['step']}: t2i R@5 {record['t2i_r5']:.3f} i2t R@5 {record['i2t_r5']:.3f}")

    def write(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _count_steps(config: TrainConfig, train_len: int) -> int:
    per_epoch = train_len // config.batch_size
    if per_epoch < 1:
        raise DataError(f"--batch-size {config.batch_size} is larger than the training set ({train_len} samples)")
    return config.epochs * per_epoch if config.epochs else config.steps


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    # ru_maxrss is in KiB on Linux: the process's peak resident memory.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _set_aside_unreadable(unreadable: list[tuple[str, str]], resumed_from: str) -> None:
    """Rename checkpoints that cannot be read out of the way, loudly: left in place, they would sort after
    the new ones and keep-last pruning would delete good checkpoints instead of them."""
    for path, reason in unreadable:
        os.replace(path, f"{path}.unreadable")
        print(
            f"warning: {path} cannot be read ({reason}); renamed to {path}.unreadable, "
            f"resuming from the older {resumed_from}",
            file=sys.stderr,
            flush=True,
        )


def _write_skipped(out: str, skipped: dict[str, str]) -> None:
    if skipped:
        atomic_write_text(os.path.join(out, "skipped.json"), json.dumps(skipped, indent=2))


def _checkpoint(
    trainer: Trainer, step: int, elapsed: float, skipped: dict[str, str], out: str, keep: int, step_seconds: float
) -> str:
    """Save the checkpoint of ``step`` with the images skipped so far (a resumed run lists them again), and
    ``skipped.json`` as of that checkpoint. ``step_seconds``, the last step's duration, is the pace a resumed
    run under ``--time-limit`` starts from."""
    _write_skipped(out, skipped)
    state = {**trainer.state_dict(step, elapsed), "skipped_images": dict(skipped), "step_seconds": step_seconds}
    return save_checkpoint(state, out, keep)


def train(
    config: TrainConfig,
    resume: bool = False,
    stop_at_step: int | None = None,
    overwrite: bool = False,
    given: set[str] | None = None,
) -> dict:
    """Run (or resume) a training job; returns the summary (also the final evaluation, if run).

    The run directory ``config.out`` is this run's alone while it runs (``run_dir``): a directory an
    earlier run used is refused unless ``resume`` continues that run or ``overwrite`` deletes it. With
    ``resume``, ``given`` names the settings the caller chose (the flags of the command line; by default
    the fields of ``config`` that differ from ``TrainConfig``'s defaults): see ``resumed_config``.
    ``stop_at_step`` ends the run after that many steps as if interrupted (checkpoint written): tests
    use it to check that resuming is exact.
    """
    if not resume:  # a bad setting is an error before the run directory is claimed (and created)
        config = resolve_config(config)
    # Under torchrun every rank runs this function; rank 0 alone writes the run directory.
    lock = claim_run_directory(config.out, resume, overwrite) if is_main_process() else None
    try:
        summary = _train(config, resume, stop_at_step, given)
    except BaseException:
        if lock is not None:
            lock.release_unused()
        raise
    if lock is not None:
        lock.release()
    return summary


def open_training_set(config: TrainConfig):
    """The training split a run of ``config`` reads, binding twins and caption kind included: one definition
    for the trainer and for the study's gradient measurement, which must see the run's own batches."""
    image_size = preset_config(config.preset, **config.model_overrides).image_resolution
    return open_dataset(
        config.data,
        "train",
        image_size,
        config.train_size,
        config.seed,
        config.image_root,
        config.eval_pairs,
        twin_fraction=config.twin_fraction,
        captions=config.captions,
    )


def _train(config, resume, stop_at_step, given) -> dict:
    out = config.out
    state = None
    if resume:
        latest, state, unreadable = load_latest_training_checkpoint(out)
        if is_main_process():
            _set_aside_unreadable(unreadable, latest)
        if given is None:
            default = TrainConfig()
            given = {f.name for f in dataclasses.fields(config) if getattr(config, f.name) != getattr(default, f.name)}
        config = resolve_config(resumed_config(TrainConfig(**state["config"]), config, given), resuming=True)
    if config.threads:
        torch.set_num_threads(config.threads)
    context = init_distributed(config.device)
    if context.enabled:
        if config.batch_size % context.world_size:
            raise ConfigError(f"--batch-size {config.batch_size} must be a multiple of the {context.world_size} ranks")
        if config.device.startswith("cuda"):
            config = dataclasses.replace(config, device=f"cuda:{context.local_rank}")
    main_rank = context.is_main

    image_size = preset_config(config.preset, **config.model_overrides).image_resolution
    synthetic = config.data == "synthetic"
    train_set = open_training_set(config)
    total_steps = _count_steps(config, len(train_set))
    if state is not None and total_steps < state["step"]:
        raise ConfigError(f"the run has done {state['step']} steps; --steps / --epochs give only {total_steps}")
    trainer = Trainer(config, context, load_init=state is None)
    start_step, elapsed_before = 0, 0.0
    if state is not None:
        start_step, elapsed_before = trainer.load_state_dict(state)
    if main_rank:
        atomic_write_text(
            os.path.join(out, "config.json"),
            json.dumps({**config.to_dict(), "total_steps": total_steps, "world_size": context.world_size}, indent=2),
        )
    val_set = None
    val_every = config.val_every or max(1, total_steps // 5)
    if synthetic:
        val_set = open_dataset("synthetic", "val", image_size, config.val_pairs, config.seed)

    log = RunLog(out, total_steps, start_step, resumed=state is not None, enabled=main_rank)
    log.write(
        f"training {config.preset} ({trainer.model.num_parameters() / 1e6:.2f}M non-embedding parameters) "
        f"with --loss {config.loss} terms {', '.join(trainer.terms)} on {config.data}, backend {config.backend}, "
        f"{total_steps} steps of {config.batch_size} on {config.device} -> {out}"
        + ("" if state is None else f" (resumed at step {start_step})")
    )
    if trainer.init_report is not None:
        init = trainer.init_report
        notes = [f"initialised from {init['path']}"]
        if init["stretched_77_to"]:
            notes.append(f"text positions stretched from 77 to {init['stretched_77_to']}")
        if init["ignored_keys"]:
            notes.append(f"{len(init['ignored_keys'])} checkpoint keys ignored")
        log.write(", ".join(notes))
    # Records the loader could not use (bad lines, missing fields): listed, never silently dropped.
    bad_records = getattr(train_set, "bad_records", [])
    if bad_records:
        log.write(f"{len(bad_records)} bad records skipped (see bad_records.json), e.g. {bad_records[0]}")
        if main_rank:
            atomic_write_text(os.path.join(out, "bad_records.json"), json.dumps(bad_records, indent=2))
    collator = trainer.collator()
    skipped: dict[str, str] = dict(state.get("skipped_images", {})) if state is not None else {}
    step, interrupted, time_limited = start_step, None, False
    trained_steps = 0  # by this process: a run that never had a usable batch must not pass for a success
    # How long the last step took (batch included), to tell whether the next one fits. A resumed run starts
    # from the pace its checkpoint recorded: with none, it would start any step until its second (its first
    # warms up and is no measure), so a run stopped near its time limit trained a step past it on resume,
    # and a time-limited run that had finished trained on.
    last_step_s = float(state.get("step_seconds", 0.0)) if state is not None else 0.0
    loop_start = time.perf_counter()
    try:
        with StopRequest() as stop:
            batches = iterate_batches(
                train_set,
                collator,
                config.batch_size,
                config.seed,
                start_step,
                config.num_workers,
                shuffle=not synthetic,  # generated samples are independent draws; twins must stay adjacent
                rank=context.rank,
                world_size=context.world_size,
                accum_steps=config.accum_steps,
                any_rank=lambda flag: agree(flag, context),
            )
            while step < total_steps:
                elapsed = elapsed_before + time.perf_counter() - loop_start
                progress = step / total_steps
                if config.time_limit:
                    # Every rank must stop at the same step. A step that would end past the limit if it took
                    # as long as the last one is not started (the first, which compiles and warms up, is not
                    # taken as a measure), so a run overshoots only by what that estimate misses.
                    elapsed, next_step_s = agree((elapsed, last_step_s), context)
                    if elapsed + next_step_s > config.time_limit:
                        time_limited = True
                        log.write(f"time limit of {config.time_limit:.0f} s reached at step {step}")
                        break
                    # Under a time limit the schedule follows whichever runs out first, steps or time.
                    progress = max(progress, elapsed / config.time_limit)
                t0 = time.perf_counter()
                _, epoch, batch = next(batches)
                for path, reason in batch.skipped:
                    if path not in skipped:
                        skipped[path] = reason
                        log.write(f"skipped unreadable image {path}: {reason}")
                # With too few readable samples to contrast or split, the step trains nothing; its position is
                # still consumed, and its validation, checkpoint and stop check come as for any other step.
                if len(batch) >= config.accum_steps and len(batch) * context.world_size >= 2:
                    logged = trainer.step(batch, progress, 1 / total_steps)
                    trained_steps += 1
                    step_time = time.perf_counter() - t0
                    if trained_steps > 1:
                        last_step_s = step_time
                    if step % config.log_every == 0 or step == total_steps - 1:
                        log.metrics(
                            {
                                "step": step,
                                "epoch": epoch,
                                **logged,
                                "samples_per_s": len(batch) * context.world_size / step_time,  # every rank's
                                "step_time_s": step_time,
                                "memory_mb": _peak_memory_mb(trainer.device),
                                "elapsed_s": elapsed_before + time.perf_counter() - loop_start,
                            }
                        )
                step += 1
                validate = val_set is not None and step % val_every == 0 and step < total_steps
                save = bool(config.checkpoint_every) and step % config.checkpoint_every == 0
                if main_rank and validate:
                    log.val({"step": step, **evaluate(trainer.model, val_set, device=trainer.device)})
                if main_rank and save:
                    elapsed = elapsed_before + time.perf_counter() - loop_start
                    _checkpoint(trainer, step, elapsed, skipped, out, config.keep_checkpoints, last_step_s)
                if validate or save:  # rank 0 worked alone: the others wait for it outside the collectives
                    wait_for_main_rank(context)
                if agree(stop.signal is not None, context) or step == stop_at_step:
                    interrupted = stop.signal or "stop_at_step"
                    break
            # The final checkpoint is written under the same handlers: a SIGINT / SIGTERM from here until it
            # is on disk lets it finish (a second one still stops at once). Under the default handlers such
            # a signal ended the run without it, losing every step since the last periodic checkpoint: with
            # the default --checkpoint-every 0, the whole run. A signal that came after the last step skips
            # the final evaluation, as any signal does; --resume runs it.
            train_seconds = elapsed_before + time.perf_counter() - loop_start
            finish_collectives(context)  # before any rank leaves, and before rank 0's work of its own below
            if not main_rank:
                shutdown_distributed(context)
                return {"steps": step, "total_steps": total_steps, "interrupted": interrupted, "rank": context.rank}
            if step > start_step and trained_steps == 0:  # no checkpoint: it would claim steps that never trained
                _write_skipped(out, skipped)
                raise DataError(
                    f"no step trained: each of the {step - start_step} batches had fewer than 2 readable images "
                    f"({len(skipped)} unreadable, listed in {os.path.join(out, 'skipped.json')})"
                )
            path = _checkpoint(trainer, step, train_seconds, skipped, out, config.keep_checkpoints, last_step_s)
            if interrupted is None and stop.signal is not None:
                interrupted = stop.signal
    finally:
        log.close()
    summary = {
        "steps": step,
        "total_steps": total_steps,
        "train_seconds": train_seconds,
        "checkpoint": path,
        "skipped_images": len(skipped),
        "bad_records": len(bad_records),
        "interrupted": interrupted,
        "time_limited": time_limited,
    }
    if interrupted is not None:
        reason = "a signal" if isinstance(interrupted, int) else "--stop-at-step"
        print(f"stopped by {reason} at step {step}; checkpoint {path}; continue with --resume --out {out}", flush=True)
        shutdown_distributed(context)
        return summary
    if config.eval_pairs:
        test_set = open_dataset(
            config.data, "test", image_size, config.eval_pairs, config.seed, config.image_root, config.eval_pairs
        )
        if len(test_set) > config.eval_pairs:
            test_set = torch.utils.data.Subset(test_set, range(config.eval_pairs))
        result = evaluate(trainer.model, test_set, device=trainer.device)
        atomic_write_text(os.path.join(out, "eval.json"), json.dumps(result, indent=2))
        summary["eval"] = result
        _append_record(os.path.join(out, "val.jsonl"), {"step": step, "split": "test", **result})
    write_plots(out)
    summary["wall_seconds"] = time.perf_counter() - loop_start + elapsed_before
    atomic_write_text(os.path.join(out, "summary.json"), json.dumps(summary, indent=2))
    print(summary_table(config, summary, trainer.terms), flush=True)
    shutdown_distributed(context)
    return summary
