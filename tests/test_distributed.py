"""Data parallelism: a 2-process loss share equals the 1-process loss on the same global batch.

Both distributed entry points run the same loss terms: ``DistributedMulCLIPLoss`` (the ``torchrun``
training path) and the open_clip-style adapter ``MulCLIPClipLoss`` with ``local_loss`` on and off.
"""

from __future__ import annotations

import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mulclip_fast.distributed import DistributedContext, agree, all_reduce_mean
from mulclip_fast.integrations import MulCLIPClipLoss, as_clip_loss_inputs
from mulclip_fast.integrations.clip_loss import OUTPUT_KEYS
from mulclip_fast.loss_terms import slotwise_contrastive_share
from mulclip_fast.losses import DistributedMulCLIPLoss, MulCLIPFeatures, MulCLIPLoss
from mulclip_fast.reference import slotwise_contrastive_loss

GLOBAL_B, P, K, M, D = 6, 7, 5, 4, 8
SCALE = 12.0
FEATURE_NAMES = ("image_cls", "image_tokens", "text_eot", "text_tokens", "short_eot", "sub_eot")
CONFIGS = {
    "mulclip": {"objective": "mulclip"},
    "mulclip_all_pairs": {"objective": "mulclip", "sap_pairing": "all"},
    "finelip": {"objective": "finelip"},
    "finelip_hardest_negative": {"objective": "finelip", "finelip_hardest_negative": True},
}
# Runs: the configuration, and None for DistributedMulCLIPLoss or the adapter's distributed options.
RUNS = {name: (name, None) for name in CONFIGS} | {
    "adapter/mulclip/local_loss": ("mulclip", {"local_loss": True}),
    "adapter/mulclip_all_pairs/every_row": ("mulclip_all_pairs", {"local_loss": False}),
    "adapter/mulclip_all_pairs/local_loss": ("mulclip_all_pairs", {"local_loss": True}),
    "adapter/finelip_hardest_negative/local_loss": ("finelip_hardest_negative", {"local_loss": True}),
    # open_clip's defaults: every row on every rank, the other ranks' features gathered without gradient
    "adapter/mulclip/every_row/gather_without_grad": ("mulclip", {"local_loss": False, "gather_with_grad": False}),
}


def global_features() -> MulCLIPFeatures:
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    sub_mask = torch.rand(GLOBAL_B, M, generator=g) < 0.6
    sub_mask[:, 0] = True
    sub_mask[:, 3] = False
    sub_mask[0, 3] = True  # a slot with a single valid sample, on rank 0 only
    text_mask = torch.ones(GLOBAL_B, K, dtype=torch.bool)
    text_mask[4, 2:] = False
    return MulCLIPFeatures(
        image_cls=r(GLOBAL_B, D),
        image_tokens=r(GLOBAL_B, P, D),
        text_eot=r(GLOBAL_B, D),
        text_tokens=r(GLOBAL_B, K, D),
        short_eot=r(GLOBAL_B, D),
        sub_eot=r(GLOBAL_B, M, D),
        sub_mask=sub_mask,
        text_token_mask=text_mask,
    )


def local_slice(f: MulCLIPFeatures, rank: int, world: int) -> MulCLIPFeatures:
    n = GLOBAL_B // world
    rows = slice(rank * n, (rank + 1) * n)
    kwargs = {name: getattr(f, name)[rows].clone().requires_grad_() for name in FEATURE_NAMES}
    last_slot = M if rank == 0 else M - 1  # ranks may hold different numbers of subcaption slots
    kwargs["sub_eot"] = kwargs["sub_eot"][:, :last_slot].detach().requires_grad_()
    return MulCLIPFeatures(**kwargs, sub_mask=f.sub_mask[rows, :last_slot], text_token_mask=f.text_token_mask[rows])


def _grad(x: torch.Tensor) -> torch.Tensor:
    """The gradient of a leaf, zeros for one the objective does not use (e.g. subcaptions in FineLIP)."""
    return torch.zeros_like(x) if x.grad is None else x.grad


def _rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        for name, (config, adapter_options) in RUNS.items():
            local = local_slice(global_features(), rank, world)
            if adapter_options is None:
                loss = DistributedMulCLIPLoss(MulCLIPLoss(**CONFIGS[config]), DistributedContext(rank, world))
                out = loss(local, SCALE, fine_grained_scale=0.5)
            else:
                loss = MulCLIPClipLoss(
                    **CONFIGS[config], **({"gather_with_grad": True} | adapter_options), rank=rank, world_size=world
                )
                out = loss(**as_clip_loss_inputs(local), logit_scale=SCALE, output_dict=True, fine_grained_scale=0.5)
                out["loss"] = sum(out.values())
            out["loss"].backward()
            results[name] = {
                "values": {term: all_reduce_mean(value) for term, value in out.items()},
                # Under DDP the parameter gradient is averaged over ranks; for leaf features that
                # average is the rank's own gradient divided by the world size.
                "grads": {f: _grad(getattr(local, f)) / world for f in FEATURE_NAMES},
            }
        # The training loop's stop decisions: the largest value over ranks, element by element for a tuple.
        context = DistributedContext(rank, world)
        results["agree"] = (agree((1.5 * rank, 10 - rank, rank == 1), context), agree(rank == 0, context))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        # Teardown with the last all-reduce's messages still in flight aborted rank 0 once in CI (gloo:
        # "terminate called without an active exception"): every rank passes the barrier first.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process_on_the_global_batch(tmp_path, monkeypatch):
    world = 2
    # mp.spawn keeps its logs in a torchelastic_* directory it does not remove: in the test's directory
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    mp.spawn(_rank_main, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    assert [r["agree"] for r in per_rank] == [((1.5, 10, True), True)] * world
    assert [type(v) for v in per_rank[0]["agree"][0]] == [float, int, bool]
    for name, (config, adapter_options) in RUNS.items():
        f = global_features()
        for field in FEATURE_NAMES:
            getattr(f, field).requires_grad_()
        loss = MulCLIPLoss(**CONFIGS[config])
        expected = loss(f, SCALE, fine_grained_scale=0.5)
        expected["loss"].backward()
        if adapter_options is not None:  # the adapter returns the weighted terms under open_clip-style keys
            expected = {
                OUTPUT_KEYS[term]: loss.term_weight(term, 0.5) * value
                for term, value in expected.items()
                if term != "loss"
            } | {"loss": expected["loss"]}
        assert per_rank[0][name]["values"].keys() == expected.keys(), name
        for term, value in expected.items():
            torch.testing.assert_close(per_rank[0][name]["values"][term], value.detach(), msg=f"{name}/{term}")
            torch.testing.assert_close(per_rank[1][name]["values"][term], value.detach(), msg=f"{name}/{term}")
        # Without gather_with_grad (and every row on every rank) each rank back-propagates the global loss
        # through its own features alone, ∂L/∂x_r: DDP's average is ∇L / W, open_clip's scaling, the same
        # for every term so that their weights keep their meaning.
        scale = 1 / world if adapter_options is not None and not adapter_options.get("gather_with_grad", True) else 1
        for field in FEATURE_NAMES:
            parts = [per_rank[r][name]["grads"][field] for r in range(world)]
            full = scale * _grad(getattr(f, field))
            if field == "sub_eot":  # rank 1 held one slot fewer: compare the slots both ranks hold
                torch.testing.assert_close(parts[0][:, M - 1 :], full[: GLOBAL_B // world, M - 1 :])
                parts, full = [p[:, : M - 1] for p in parts], full[:, : M - 1]
            grad = torch.cat(parts)
            torch.testing.assert_close(grad, full, msg=f"{name}/{field}")


def test_slotwise_share_of_the_whole_batch_is_the_reference_loss():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 5, 5, generator=g, dtype=torch.float64)
    mask = torch.rand(5, 3, generator=g) < 0.6
    share = slotwise_contrastive_share(logits, logits.transpose(1, 2), mask, mask, offset=0)
    torch.testing.assert_close(share, slotwise_contrastive_loss(logits, mask))


def test_single_process_context_returns_the_plain_loss():
    f = global_features()
    loss = MulCLIPLoss("mulclip")
    single = DistributedMulCLIPLoss(loss, DistributedContext())(f, SCALE)
    for term, value in loss(f, SCALE).items():
        torch.testing.assert_close(single[term], value)
