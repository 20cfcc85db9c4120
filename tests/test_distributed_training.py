"""One data-parallel training step over 2 gloo processes equals one process on the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mulclip_fast.data import Collator, iterate_batches, open_dataset, rank_rows
from mulclip_fast.distributed import DistributedContext
from mulclip_fast.train import TrainConfig, Trainer, resolve_config
from mulclip_fast.train.report import read_jsonl

# Each case runs in 1 process and in 2. "accumulated" also checks that DDP's no_sync micro-batches add up,
# "checkpointed" that recomputation in backward works under DDP.
OBJECTIVES = {
    "mulclip": {},
    "mulclip_all_pairs": {"sap_pairing": "all"},
    "finelip": {"loss": "finelip"},
    "accumulated": {"accum_steps": 2},
    "checkpointed": {"grad_checkpointing": True},
}


def _config(**overrides) -> TrainConfig:
    return resolve_config(
        TrainConfig(
            model_overrides={"vision_layers": 1, "transformer_layers": 1},
            batch_size=8,
            steps=4,
            fine_start=0.0,
            fine_ramp=0.0,
            eval_pairs=0,
            seed=5,
            backend="torch",
            threads=1,
            **overrides,
        )
    )


def _one_step(context: DistributedContext, **overrides) -> tuple[dict, dict]:
    """Parameters after one step on the first global batch, and the logged loss terms."""
    config = _config(**overrides)
    torch.set_num_threads(1)
    dataset = open_dataset("synthetic", "train", 64, 64, config.seed, twin_fraction=0.5)
    _, _, batch = next(iterate_batches(dataset, Collator(config.max_subcaptions), config.batch_size, config.seed))
    trainer = Trainer(config, context=context)
    logged = trainer.step(batch.take(rank_rows(len(batch), context.rank, context.world_size, config.accum_steps)), 0.5)
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}, logged


def _rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {name: _one_step(DistributedContext(rank, world), **o) for name, o in OBJECTIVES.items()}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _torchrun_env(tmp_path, **extra: str) -> dict:
    """A torchrun launch's environment: one thread per rank, and TMPDIR in the test's own directory, where
    torchrun leaves the torchelastic_* directory of its logs (it does not remove it)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path), **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_step_equals_one_process_step(tmp_path, monkeypatch):
    # mp.spawn keeps its logs in a torchelastic_* directory it does not remove: in the test's directory
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name, overrides in OBJECTIVES.items():
        params, logged = _one_step(DistributedContext(), **overrides)
        for rank in ranks:
            rank_params, rank_logged = rank[name]
            for term in ("loss", "global_long", "global_short", "wpr", "sap", "finelip"):
                if term in logged:
                    assert rank_logged[term] == pytest.approx(logged[term], rel=1e-5), f"{name}: {term}"
            for key, value in params.items():
                torch.testing.assert_close(rank_params[key], value, atol=1e-5, rtol=0, msg=f"{name}: {key}")


@pytest.mark.slow
def test_torchrun_two_processes_write_one_run_directory(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(_free_port())]
    cmd += ["-m", "mulclip_fast.train", "--steps", "4", "--batch-size", "8", "--out", str(out)]
    cmd += ["--model", "vision_layers=1", "--model", "transformer_layers=1", "--fine-start", "0"]
    cmd += ["--eval-pairs", "20", "--val-pairs", "8", "--val-every", "2"]
    env = _torchrun_env(tmp_path)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1, 2, 3]  # one writer: each step logged once
    # Throughput counts the global batch (each rank holds only its 4 rows of the 8).
    assert [round(m["samples_per_s"] * m["step_time_s"], 6) for m in metrics] == [8] * 4
    assert json.loads((out / "eval.json").read_text())["n_pairs"] == 20
    assert sorted(os.listdir(out / "checkpoints")) == ["step_00000004.pt"]
    assert done.stdout.count("run directory:") == 1  # only rank 0 prints the summary table


@pytest.mark.slow
def test_validations_longer_than_the_collective_timeout_end_the_run_normally(tmp_path):
    """Rank 0 alone validates during the run and evaluates at the end; the other ranks must not wait for it in
    a collective, whose timeout (300 s in a real run) would fail them, and torchrun would then stop rank 0 in
    the middle of its evaluation. Mid-run they wait in a group of a much longer timeout; at the end they leave."""
    script = os.path.join(os.path.dirname(__file__), "slow_final_eval_train.py")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(_free_port())]
    cmd += [script, "--steps", "2", "--batch-size", "8", "--out", str(out), "--eval-pairs", "8"]
    cmd += ["--model", "vision_layers=1", "--model", "transformer_layers=1", "--val-every", "1", "--val-pairs", "8"]
    env = _torchrun_env(tmp_path, COLLECTIVE_TIMEOUT_S="10", EVAL_SLEEP_S="15")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [record["step"] for record in read_jsonl(out / "val.jsonl")] == [1, 2]  # mid-run, and the final one
    assert json.loads((out / "eval.json").read_text())["n_pairs"] == 8


def test_a_short_batch_splits_into_equal_parts():
    """Skipped images can leave a batch short of a multiple of the ranks: every rank still gets as many rows."""
    batch = next(iterate_batches(open_dataset("synthetic", "train", 64, 16, 0), Collator(), batch_size=7, seed=0))[2]
    parts = [batch.shard(rank, 3) for rank in range(3)]
    assert [len(p) for p in parts] == [2, 2, 2]
    torch.testing.assert_close(torch.cat([p.images for p in parts]), batch.images[:6])
    with pytest.raises(ValueError, match="cannot be split over 8 parts"):
        batch.shard(0, 8)


@pytest.mark.slow
def test_torchrun_resume_continues_the_run_exactly(tmp_path):
    """Stopped at step 2 and resumed under torchrun, a 2-process run logs the losses of an uninterrupted one."""
    common = ["-m", "mulclip_fast.train", "--steps", "4", "--batch-size", "8", "--fine-start", "0"]
    common += ["--model", "vision_layers=1", "--model", "transformer_layers=1", "--eval-pairs", "0"]
    env = _torchrun_env(tmp_path)

    def torchrun(*args):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
        cmd += ["--master_port", str(_free_port()), *common, *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        return done

    def losses(out):
        return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]

    assert torchrun("--out", str(tmp_path / "whole")).returncode == 0
    stopped = torchrun("--out", str(tmp_path / "split"), "--stop-at-step", "2")
    assert stopped.returncode == 0 and "--resume" in stopped.stdout, stopped.stderr[-2000:]
    resumed = torchrun("--out", str(tmp_path / "split"), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed at step 2" in resumed.stdout  # it continued, it did not start over
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")


@pytest.mark.slow
def test_a_failing_rank_ends_the_job_with_its_message(tmp_path):
    script = os.path.join(os.path.dirname(__file__), "failing_rank_train.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(_free_port())]
    cmd += [script, "--steps", "4", "--batch-size", "8", "--out", str(tmp_path / "run"), "--eval-pairs", "0"]
    cmd += ["--model", "vision_layers=1", "--model", "transformer_layers=1"]
    # Ended by torchrun's supervision, not by a collective's timeout: rank 0, left waiting, would end only after
    # init_distributed's 300 s (counted from its own start), past this call's timeout, which would fail the test.
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_torchrun_env(tmp_path))
    assert done.returncode != 0
    assert "shard unreadable on rank 1" in done.stdout + done.stderr
