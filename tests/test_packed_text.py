"""The packed text path: every text of a batch in one pass, against the padded path it replaces, and the
attention backends behind it (docs/performance.md, "Packed text")."""

from __future__ import annotations

import logging
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from mulclip_fast.data import Collator, iterate_batches, open_dataset
from mulclip_fast.eval import embed_dataset
from mulclip_fast.model import CLIP, attention, preset_config
from mulclip_fast.model.attention import (
    AttentionBackendUnavailable,
    PackedSequences,
    causal_alibi_bias,
    check_text_attention,
    packed_causal_attention,
)
from mulclip_fast.tools.packed_text_report import count_text_tokens
from mulclip_fast.train import ConfigError, TrainConfig, Trainer, resolve_config
from mulclip_fast.train.cli import build_parser, config_from_args
from mulclip_fast.train.cli import main as train_main

EOT, SOT = 49407, 49406
# Tiny-sized towers; "openai" has vit-b-16's structure (learned positions only, no ALiBi, QuickGELU).
SMALL_VISION = {"image_resolution": 32, "vision_patch_size": 16, "vision_width": 64, "vision_heads": 2}
CONFIGS = {
    "tiny-alibi": preset_config("tiny", vision_layers=1, transformer_layers=2, **SMALL_VISION),
    "tiny-no-alibi": preset_config("tiny", vision_layers=1, transformer_layers=2, text_alibi=0, **SMALL_VISION),
    "openai": preset_config(
        "vit-b-16",
        embed_dim=64,
        transformer_width=64,
        transformer_heads=2,
        transformer_layers=2,
        vision_layers=1,
        **SMALL_VISION,
    ),
}


@pytest.fixture(autouse=True)
def fresh_backend_imports():
    """Each test sees the modules as it patches them, and a fresh log of the choices made."""
    for load in (attention._load_flash_attn, attention._load_xformers_fmha):
        load.cache_clear()
    attention._logged_choices.clear()
    yield
    for load in (attention._load_flash_attn, attention._load_xformers_fmha):
        load.cache_clear()


def token_ids(lengths, width):
    """Rows of ``width`` ids, padded with zeros after EOT; length 1 is a lone EOT."""
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        if n > 1:
            ids[row, 0] = SOT
            ids[row, 1 : n - 1] = torch.randint(1, 49000, (n - 2,))
        ids[row, n - 1] = EOT
    return ids


def mixed_batch():
    """Long captions of 248 tokens (the full context), 1 token and in between; summaries of 1–77 tokens;
    subcaptions in 4 slots with empty slots, one sample without any."""
    long_ids = token_ids([248, 1, 90, 17], 248)
    short_ids = token_ids([77, 1, 12, 30], 77)
    sub_ids = torch.stack([token_ids([9, 1, 40, 2], 40) for _ in range(4)])
    sub_mask = torch.tensor([[True, True, True, False], [False] * 4, [True, False, True, True], [True] * 4])
    images = torch.randn(4, 3, 32, 32)
    return dict(images=images, long_ids=long_ids, short_ids=short_ids, sub_ids=sub_ids, sub_mask=sub_mask)


def features_and_grads(model, batch, packed_text):
    model.zero_grad(set_to_none=True)
    features = model.features(**batch, need_tokens=True, packed_text=packed_text)
    outputs = {
        "text_eot": features.text_eot,
        "short_eot": features.short_eot,
        "sub_eot": features.sub_eot,
        "text_tokens": features.text_tokens,
    }
    # A random linear read-out of every output, so every output's gradient reaches the parameters.
    generator = torch.Generator().manual_seed(1)
    loss = sum((out * torch.randn(out.shape, generator=generator)).sum() for out in outputs.values())
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return {name: out.detach() for name, out in outputs.items()}, grads


def assert_close_to_scale(got, expected, name, rel=1e-5, floor=1e-6):
    """fp32 rounding relative to the tensor's scale: gradients summed over hundreds of tokens (the
    positional table's rows gather every text) reach magnitudes ~100 where elementwise rtol is too strict;
    ``floor`` for gradients that are zero in exact arithmetic (a bias before a softmax) and left as noise."""
    error = (got - expected).abs().max()
    assert error <= rel * expected.abs().max() + floor, (
        f"{name}: max error {error:.3g}, scale {expected.abs().max():.3g}"
    )


@pytest.mark.parametrize("config", list(CONFIGS))
def test_packed_features_and_gradients_equal_the_padded_path(config):
    torch.manual_seed(0)
    model = CLIP(CONFIGS[config])
    batch = mixed_batch()
    packed, packed_grads = features_and_grads(model, batch, packed_text=True)
    padded, padded_grads = features_and_grads(model, batch, packed_text=False)
    for name in padded:
        torch.testing.assert_close(packed[name], padded[name], rtol=1e-5, atol=1e-5, msg=name)
    assert packed["sub_eot"][1].abs().sum() == 0  # the sample without subcaptions keeps zeros
    assert set(packed_grads) == set(padded_grads)
    assert "positional_embedding" in packed_grads and "transformer.resblocks.1.attn.in_proj_weight" in packed_grads
    for name in padded_grads:
        assert_close_to_scale(packed_grads[name], padded_grads[name], name)


def test_a_batch_without_any_subcaption_packs_long_captions_and_summaries_only():
    torch.manual_seed(0)
    model = CLIP(CONFIGS["openai"])
    batch = {**mixed_batch(), "sub_mask": torch.zeros(4, 4, dtype=torch.bool)}
    packed = model.features(**batch, packed_text=True)
    padded = model.features(**batch, packed_text=False)
    assert packed.sub_eot.shape == padded.sub_eot.shape and packed.sub_eot.abs().sum() == 0
    torch.testing.assert_close(packed.short_eot, padded.short_eot, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", ["tiny-alibi", "openai"])
def test_packed_word_tokens_equal_the_padded_tokens_where_the_text_is(config):
    torch.manual_seed(0)
    model = CLIP(CONFIGS[config])
    long_ids, short_ids = token_ids([248, 1, 2, 60], 248), token_ids([5, 77], 77)
    (eot, short_eot), tokens, words = model.encode_packed_text([long_ids, short_ids], tokens_of_first=True)
    ref_eot, ref_tokens, ref_words = model.encode_text_tokens(long_ids)
    real = torch.arange(248) <= long_ids.argmax(dim=-1, keepdim=True)  # up to EOT
    torch.testing.assert_close(eot, ref_eot, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tokens[real], ref_tokens[real], rtol=1e-5, atol=1e-5)
    assert tokens[~real].abs().sum() == 0
    assert torch.equal(words, ref_words)
    torch.testing.assert_close(short_eot, model.encode_text(short_ids), rtol=1e-5, atol=1e-5)


def test_packed_path_under_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = CLIP(CONFIGS["tiny-alibi"])
    batch = mixed_batch()
    _, plain = features_and_grads(model, batch, packed_text=True)
    model.set_grad_checkpointing(True)
    _, checkpointed = features_and_grads(model, batch, packed_text=True)
    for name in plain:
        assert_close_to_scale(checkpointed[name], plain[name], name)


def attention_per_sequence(q, k, v, lengths, slopes):
    """Each sequence on its own with the dense causal softmax: what the pack must equal."""
    outputs, start = [], 0
    for n in lengths:
        qs, ks, vs = (t[start : start + n].transpose(0, 1) for t in (q, k, v))  # [heads, n, head_dim]
        logits = qs @ ks.transpose(-1, -2) / q.shape[-1] ** 0.5
        if slopes is None:
            logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        else:
            logits = logits + causal_alibi_bias(slopes, n)
        outputs.append((logits.softmax(-1) @ vs).transpose(0, 1))
        start += n
    return torch.cat(outputs)


@pytest.mark.parametrize("with_alibi", [False, True])
def test_torch_backend_equals_attention_per_sequence(with_alibi):
    torch.manual_seed(0)
    lengths = [1, 248, 3, 77, 76, 60, 1, 14, 15, 200]
    q, k, v = (torch.randn(sum(lengths), 4, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    slopes = attention.alibi_slopes(4).double() if with_alibi else None
    sequences = PackedSequences(lengths, "cpu")
    out = packed_causal_attention(q, k, v, sequences, slopes, backend="torch")
    expected = attention_per_sequence(q, k, v, lengths, slopes)
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    expected_grads = torch.autograd.grad(expected.square().sum(), (q, k, v))
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_biased_attention_is_sdpa_bit_for_bit_on_cpu(layout):
    """The CPU fp32 path without SDPA's all-masked-row scan gives SDPA's bits, forward and backward, in the
    layouts of the packed groups and of the padded tower."""
    torch.manual_seed(0)
    count, length, heads, head_dim = 6, 57, 4, 32
    bias = causal_alibi_bias(attention.alibi_slopes(heads), 80)[:, :length, :length]
    if layout == "packed":  # [G·L, heads, d] viewed [G, heads, L, d]
        leaves = [torch.randn(count * length, heads, head_dim, requires_grad=True) for _ in range(3)]
        views = lambda: [t.view(count, length, heads, head_dim).transpose(1, 2) for t in leaves]  # noqa: E731
    else:  # the padded tower's projection [B, L, 3·width] split into q, k, v
        leaves = [torch.randn(count, length, 3 * heads * head_dim, requires_grad=True)]
        views = lambda: leaves[0].view(count, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # noqa: E731
    grad = torch.randn(count, heads, length, head_dim)
    results = []
    for attend in (attention.biased_attention, lambda q, k, v, b: F.scaled_dot_product_attention(q, k, v, attn_mask=b)):
        out = attend(*views(), bias.contiguous() if layout == "packed" else bias)
        results.append((out, torch.autograd.grad(out, leaves, grad)))
    (out, grads), (expected, expected_grads) = results
    assert torch.equal(out, expected)
    for got, want in zip(grads, expected_grads, strict=True):
        assert torch.equal(got, want)


def test_torch_backend_groups_cover_every_token_once_with_bounded_padding():
    lengths = [248, 1, 186, 187, 2, 77, 40, 30, 31, 5]
    groups, inverse = PackedSequences(lengths, "cpu").similar_length_groups()
    rows = torch.cat([r.flatten()[real] for r, real in groups])
    assert torch.equal(rows[inverse], torch.arange(sum(lengths)))
    for rows, real in groups:
        sequence_lengths = torch.bincount(real // rows.shape[1], minlength=rows.shape[0])
        assert sequence_lengths.min() >= attention.SIMILAR_LENGTH_RATIO * sequence_lengths.max()
    # No group is [T, T]: the widest is the longest sequence.
    assert max(r.shape[1] for r, _ in groups) == 248


def test_a_pack_without_sequences_is_an_error():
    with pytest.raises(ValueError, match="at least one sequence"):
        PackedSequences([], "cpu")
    with pytest.raises(ValueError, match="length >= 1"):
        PackedSequences([3, 0], "cpu")


def test_auto_picks_the_torch_backend_on_cpu_and_logs_it_once(caplog, monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=None))
    q = torch.zeros(3, 2, 4)
    with caplog.at_level(logging.INFO, logger=attention.__name__):
        assert attention.choose_text_attention("auto", q, with_alibi=False) == "torch"
        assert attention.choose_text_attention("auto", q, with_alibi=True) == "torch"
    assert [r.getMessage() for r in caplog.records] == [
        "packed text attention: torch (requested auto, cpu torch.float32)"
    ]


@pytest.mark.parametrize("backend, package", [("flash", "flash_attn"), ("xformers", "xformers.ops.fmha")])
def test_asking_for_a_backend_that_is_not_installed_is_a_clear_error(backend, package, monkeypatch):
    monkeypatch.setitem(sys.modules, package, None)  # makes the import raise ImportError
    with pytest.raises(AttentionBackendUnavailable, match=f"text_attention='{backend}' needs"):
        check_text_attention(backend)
    model = CLIP(CONFIGS["tiny-no-alibi"])
    with pytest.raises(AttentionBackendUnavailable, match="not installed"):
        model.set_text_attention(backend)
    assert model.text_attention == "auto"


def _broken_flash_attn(monkeypatch):
    """flash-attn 1.x: the package imports but has no ``flash_attn_varlen_func``."""
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))


def _import_raising(package, error):
    """An installed ``package`` whose import raises ``error`` (built for another PyTorch or CUDA)."""

    def install(monkeypatch):
        real_import = attention.importlib.import_module

        def import_module(name, *args, **kwargs):
            if name == package or name.startswith(package + "."):
                raise error
            return real_import(name, *args, **kwargs)

        monkeypatch.setattr(attention.importlib, "import_module", import_module)

    return install


BROKEN_INSTALLS = {
    "flash-without-varlen": ("flash", _broken_flash_attn, "has no flash_attn_varlen_func"),
    "flash-oserror": ("flash", _import_raising("flash_attn", OSError("libcudart.so.11.0: cannot open")), "OSError"),
    "xformers-runtimeerror": (
        "xformers",
        _import_raising("xformers", RuntimeError("operator torchvision::nms does not exist")),
        "RuntimeError",
    ),
}


@pytest.mark.parametrize("case", BROKEN_INSTALLS)
def test_a_broken_install_is_refused_with_its_reason_and_skipped_by_auto(case, monkeypatch, caplog):
    """A package that is installed but fails to import is neither a crash nor reported as missing: asking
    for it is an error with the reason (a config error at start-up), and ``auto`` takes the next backend
    and logs why."""
    backend, install, reason = BROKEN_INSTALLS[case]
    install(monkeypatch)
    with pytest.raises(AttentionBackendUnavailable, match=f"installed but not usable.*{reason}"):
        check_text_attention(backend)
    with pytest.raises(ConfigError, match=f"--text-attention {backend}: .*installed but not usable"):
        resolve_config(TrainConfig(text_attention=backend))
    # a bf16 CUDA tensor as choose_text_attention sees it (this machine may have no GPU)
    cuda_bf16 = types.SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, device=torch.device("cuda"))
    monkeypatch.setitem(sys.modules, "xformers.ops.fmha" if backend == "flash" else "flash_attn", None)
    attention._load_flash_attn.cache_clear()
    attention._load_xformers_fmha.cache_clear()
    with caplog.at_level(logging.WARNING, logger=attention.__name__):
        assert attention.choose_text_attention("auto", cuda_bf16, with_alibi=False) == "torch"
    assert any("installed but not usable" in r.getMessage() and reason in r.getMessage() for r in caplog.records)


def _flash_attn_without_alibi(monkeypatch):
    """A flash-attn 2 from before ALiBi: its varlen function has no ``alibi_slopes`` parameter. It computes the
    pack's causal attention per sequence, so that the CPU can check what it is handed."""

    def flash_attn_varlen_func(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None, causal=False
    ):
        assert causal and torch.equal(cu_seqlens_q, cu_seqlens_k)
        return attention_per_sequence(q, k, v, cu_seqlens_q.diff().tolist(), None)

    fake = types.ModuleType("flash_attn")
    fake.flash_attn_varlen_func = flash_attn_varlen_func
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    monkeypatch.setitem(sys.modules, "xformers.ops.fmha", None)


def test_a_flash_attn_without_alibi_serves_towers_without_alibi_only(monkeypatch):
    """flash-attn versions without ``alibi_slopes`` run the towers without ALiBi (the keyword is not passed
    to them); ``auto`` passes over them for an ALiBi tower, and asking for them there is a clear error."""
    _flash_attn_without_alibi(monkeypatch)
    cuda_bf16 = types.SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, device=torch.device("cuda"))
    assert attention.choose_text_attention("auto", cuda_bf16, with_alibi=False) == "flash"
    assert attention.choose_text_attention("auto", cuda_bf16, with_alibi=True) == "torch"
    with pytest.raises(AttentionBackendUnavailable, match="flash-attn.*takes no alibi_slopes"):
        attention.choose_text_attention("flash", cuda_bf16, with_alibi=True)
    # the call itself, on CPU tensors standing in for CUDA ones
    monkeypatch.setattr(attention, "choose_text_attention", lambda *args: "flash")
    lengths = [5, 1, 9]
    q, k, v = (torch.randn(15, 2, 8) for _ in range(3))
    out = packed_causal_attention(q, k, v, PackedSequences(lengths, "cpu"), backend="flash")
    torch.testing.assert_close(out, attention_per_sequence(q, k, v, lengths, None))


def test_an_unknown_backend_is_named_in_the_error():
    with pytest.raises(ValueError, match="text_attention must be one of .* got 'sdpa'"):
        check_text_attention("sdpa")


def test_flash_needs_half_precision_cuda_tensors(monkeypatch):
    fake = types.ModuleType("flash_attn")
    fake.flash_attn_varlen_func = lambda *args, **kwargs: pytest.fail("flash-attn must not run on CPU tensors")
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    with pytest.raises(AttentionBackendUnavailable, match="needs CUDA fp16/bf16 tensors, got cpu torch.float32"):
        attention.choose_text_attention("flash", torch.zeros(3, 2, 4), with_alibi=False)


def fake_xformers(monkeypatch):
    """An ``xformers.ops.fmha`` whose block-diagonal causal attention is computed per sequence."""
    fmha = types.ModuleType("xformers.ops.fmha")

    class BlockDiagonalCausalMask:
        def __init__(self, lengths):
            self.lengths = lengths

        @classmethod
        def from_seqlens(cls, lengths):
            assert isinstance(lengths, list) and all(isinstance(n, int) for n in lengths)
            return cls(lengths)

    def memory_efficient_attention(q, k, v, attn_bias):
        assert q.dim() == 4 and q.shape[0] == 1  # [1, T, heads, head_dim]
        return attention_per_sequence(q[0], k[0], v[0], attn_bias.lengths, None)[None]

    fmha.attn_bias = types.SimpleNamespace(BlockDiagonalCausalMask=BlockDiagonalCausalMask)
    fmha.memory_efficient_attention = memory_efficient_attention
    monkeypatch.setitem(sys.modules, "xformers.ops.fmha", fmha)


def test_xformers_backend_hands_the_pack_as_a_block_diagonal_causal_mask(monkeypatch):
    fake_xformers(monkeypatch)
    lengths = [5, 1, 9]
    q, k, v = (torch.randn(15, 2, 8) for _ in range(3))
    out = packed_causal_attention(q, k, v, PackedSequences(lengths, "cpu"), backend="xformers")
    torch.testing.assert_close(out, attention_per_sequence(q, k, v, lengths, None))


def test_xformers_refuses_alibi(monkeypatch):
    fake_xformers(monkeypatch)
    q = torch.zeros(3, 4, 8)
    with pytest.raises(AttentionBackendUnavailable, match="cannot add ALiBi"):
        packed_causal_attention(q, q, q, PackedSequences([3], "cpu"), attention.alibi_slopes(4), backend="xformers")


def _trainer_config(**overrides):
    return resolve_config(
        TrainConfig(
            model_overrides={"vision_layers": 1, "transformer_layers": 2},
            batch_size=8,
            steps=2,
            fine_start=0.0,
            fine_ramp=0.0,
            eval_pairs=0,
            seed=7,
            backend="torch",
            **overrides,
        )
    )


def test_training_step_is_the_same_packed_and_padded(monkeypatch):
    dataset = open_dataset("synthetic", "train", 64, 64, 7, twin_fraction=0.5)
    batch = next(iterate_batches(dataset, Collator(8), batch_size=8, seed=7))[2]
    packs = []
    encode = CLIP.encode_packed_text
    monkeypatch.setattr(CLIP, "encode_packed_text", lambda self, *a, **k: packs.append(1) or encode(self, *a, **k))
    logged = {}
    for packed_text in (True, False):
        logged[packed_text] = Trainer(_trainer_config(packed_text=packed_text)).step(batch, progress=0.5)
    assert len(packs) == 1  # the padded trainer never packs
    assert set(logged[True]) == set(logged[False]) and "loss" in logged[True]
    for term in logged[False]:  # the loss, each of its terms, lr, logit scale
        assert logged[True][term] == pytest.approx(logged[False][term], rel=1e-5), term


def test_packed_text_flags():
    parse = lambda *argv: config_from_args(build_parser().parse_args(list(argv)))  # noqa: E731
    assert parse().packed_text and parse().text_attention == "auto"
    assert not parse("--no-packed-text").packed_text
    assert not parse("--compile").packed_text  # compiled towers keep the padded path
    assert parse("--text-attention", "torch").text_attention == "torch"


def test_forcing_a_missing_text_attention_is_a_config_error(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    with pytest.raises(ConfigError, match="--text-attention flash: .*flash-attn, which is not installed"):
        resolve_config(TrainConfig(text_attention="flash"))
    assert train_main(["--text-attention", "flash", "--steps", "1", "--out", str(tmp_path / "run")]) == 2
    assert not (tmp_path / "run").exists()  # refused before the run directory is created
    assert "error: --text-attention flash" in capsys.readouterr().err


def test_flash_needs_bf16_training_and_a_flash_run_evaluates_in_fp32_with_auto(monkeypatch, capsys, tmp_path):
    """flash-attn computes in fp16/bf16 only: an fp32 run could never use it, and evaluation (fp32, so that it
    gives what `eval` of the checkpoint gives) takes auto's choice instead of failing at the first validation."""
    fake = types.ModuleType("flash_attn")
    fake.flash_attn_varlen_func = lambda *args, **kwargs: pytest.fail("flash-attn must not run on fp32 tensors")
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    with pytest.raises(ConfigError, match="--text-attention flash needs --precision bf16"):
        resolve_config(TrainConfig(text_attention="flash"))
    assert resolve_config(TrainConfig(text_attention="flash", precision="bf16")).text_attention == "flash"
    torch.manual_seed(0)
    model = CLIP(preset_config("tiny", vision_layers=1, transformer_layers=2))
    dataset = open_dataset("synthetic", "test", 64, 6, 3, holdout=6)
    expected = embed_dataset(model, dataset, batch_size=3)
    model.set_text_attention("flash")
    embedded = embed_dataset(model, dataset, batch_size=3)
    for name in ("long", "short", "probe"):
        torch.testing.assert_close(embedded[name], expected[name], rtol=0, atol=0, msg=name)
    assert model.text_attention == "flash"


def test_evaluation_embeddings_are_the_same_packed_and_padded():
    torch.manual_seed(0)
    model = CLIP(preset_config("tiny", vision_layers=1, transformer_layers=2))
    dataset = open_dataset("synthetic", "test", 64, 12, 3, holdout=12)
    packed = embed_dataset(model, dataset, batch_size=5)
    padded = embed_dataset(model, dataset, batch_size=5, packed_text=False)
    assert packed["probe"] is not None  # synthetic data has binding probes: three groups per pack
    for name in ("image", "long", "short", "probe"):
        torch.testing.assert_close(packed[name], padded[name], rtol=1e-5, atol=1e-6, msg=name)


def test_the_report_counts_real_tokens_packed_and_padded_widths_otherwise():
    dataset = open_dataset("synthetic", "train", 64, 64, 7, twin_fraction=0.5)
    batch = next(iterate_batches(dataset, Collator(8), batch_size=8, seed=7))[2]
    real_subs = batch.sub_ids[batch.sub_mask]
    real = sum(int((ids.argmax(dim=-1) + 1).sum()) for ids in (batch.long_ids, batch.short_ids, real_subs))
    counts = {}
    for packed_text in (True, False):
        trainer = Trainer(_trainer_config(packed_text=packed_text))
        counts[packed_text] = count_text_tokens(trainer, batch, progress=0.5)  # every term (fine_start 0)
    assert counts[True] == real
    # padded: every long caption at the batch's width, summaries and subcaptions at their chunk's longest
    summaries = batch.short_ids.shape[0] * int(batch.short_ids.argmax(dim=-1).max() + 1)
    subs = real_subs.shape[0] * int(real_subs.argmax(dim=-1).max() + 1)  # one chunk: fewer than 128
    assert counts[False] == batch.long_ids.numel() + summaries + subs


def gpu_backend_missing(backend: str) -> str | None:
    """Why ``backend`` cannot run here, or None."""
    if not torch.cuda.is_available():
        return f"the {backend} backend needs a CUDA GPU; this machine has none"
    load = {"flash": attention._load_flash_attn, "xformers": attention._load_xformers_fmha}[backend]
    return None if load() is not None else f"{backend} is not installed"


@pytest.mark.parametrize("with_alibi", [False, True], ids=["causal", "alibi"])
@pytest.mark.parametrize("backend", ["flash", "xformers"])
def test_gpu_backend_equals_the_torch_backend(backend, with_alibi):
    missing = gpu_backend_missing(backend)
    if missing:
        pytest.skip(missing)
    if backend == "xformers" and with_alibi:
        pytest.skip("xformers takes no ALiBi slopes; the backend refuses ALiBi towers by design")
    torch.manual_seed(0)
    lengths = [1, 248, 3, 77, 76, 60, 14, 200]
    inputs = [torch.randn(sum(lengths), 8, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    slopes = attention.alibi_slopes(8).cuda() if with_alibi else None
    sequences = PackedSequences(lengths, "cuda")
    results = {}
    for name, dtype in ((backend, torch.bfloat16), ("torch", torch.float32)):
        q, k, v = (t.to(dtype).requires_grad_() for t in inputs)
        out = packed_causal_attention(q, k, v, sequences, slopes, backend=name)
        out.float().square().sum().backward()
        results[name] = [out.float()] + [t.grad.float() for t in (q, k, v)]
    for got, want in zip(results[backend], results["torch"], strict=True):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
