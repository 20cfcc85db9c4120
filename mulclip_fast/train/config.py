"""Every setting of a training run (``TrainConfig``), its command-line form, and its validation.

Each field carries a ``Flag`` in its metadata: the help text, the group of ``--help`` it appears in, and
where the command line differs from the field (another flag name, choices, a parser, a default that
depends on the other settings). ``cli.build_parser`` and ``cli.config_from_args`` are generated from them,
so a new setting is one field here.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from ..data import HELD_OUT_BY_COUNT, SHORT_CONTEXT, parse_data_spec
from ..loss_terms import WPR_FORMS
from ..losses import DEFAULT_WEIGHTS, OBJECTIVES, RENAMED_TERMS, TERMS, current_term_names
from ..model import (
    PRESETS,
    CheckpointError,
    check_device,
    checked_preset_config,
    parse_model_overrides,
    preset_config,
)
from ..model.attention import TEXT_ATTENTION_BACKENDS, AttentionBackendUnavailable, check_text_attention
from ..reference.checks import check_non_negative


class ConfigError(ValueError):
    """An invalid combination of settings; the message names the flag."""


# ---------------------------------------------------------------------------------------------- defaults
# The no-argument run: tiny model from scratch on synthetic data, a fixed number of fp32 steps, so that its
# result is a function of its seed and not of the machine's speed (docs/training.md, "The default run").
# Tuned values; see docs/notes/2026-11-27-binding.md. 400 steps take 3 min 51 s on an idle 2-core EPYC (2026-12-01),
# 23 % under the five minutes the default must fit, with binding 0.641 against its 0.6 floor (docs/training.md).
DEFAULT_STEPS_SCRATCH = 400
DEFAULT_LR_SCRATCH = 5e-4
DEFAULT_LR_FINETUNE = 1e-6
DEFAULT_FINE_START_SCRATCH = 0.8


# Fine-tuning a pretrained CLIP (the paper's setting) trains every term from the first step; from scratch,
# the fine-grained terms wait until the towers have learnt the global alignment they build on
# (docs/notes/2026-11-27-binding.md).
def _default_fine_start(config: TrainConfig) -> float:
    return 0.0 if config.init else DEFAULT_FINE_START_SCRATCH


# A compiled tower is specialised to its input layout, and a pack's layout changes with every batch, so
# compiled towers keep the padded text path unless --no-packed-text says otherwise explicitly.
def _default_packed_text(config: TrainConfig) -> bool:
    return config.compile is None


def _parse_model_overrides(items: list[str]) -> dict[str, int]:
    try:
        return parse_model_overrides(items)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


# ---------------------------------------------------------------------------------------------- flags
MODEL_AND_DATA = "model and data"
OBJECTIVE = "objective"
OPTIMISATION = "optimisation"
RUN = "run"


@dataclass(frozen=True)
class Flag:
    """How one ``TrainConfig`` field is set on the command line.

    By default the field is ``--field-name VALUE``, parsed as the field's type, and leaving the flag out
    keeps the field's default. A bool field is a switch that flips its default: ``--name`` for one that is
    off by default, ``--no-name`` for one that is on.
    """

    help: str
    group: str
    name: str | None = None  # the flag, when it is not derived from the field's name
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    repeatable: bool = False  # the flag may be given many times; ``parse`` gets the list of values
    optional_value: str | None = None  # the flag may be given alone, meaning this value
    parse: Callable | None = None  # the command-line string (or list of them) -> the field's value
    # The value when the flag is left out, computed from the other settings (instead of the field default).
    unset: Callable[[TrainConfig], object] | None = None
    # One flag per key, ``NAME-KEY VALUE``, its help formatted with the key and the default the mapping gives;
    # the field is a dict of the keys given.
    keys: Mapping[str, object] = field(default_factory=dict)
    # Old keys of ``keys`` -> their current names: ``NAME-OLD`` still sets the current key, with a deprecation
    # message on stderr, so that existing scripts keep running.
    renamed_keys: Mapping[str, str] = field(default_factory=dict)


def setting(default, help: str, group: str, **flag) -> dataclasses.Field:
    """A ``TrainConfig`` field with its command-line ``Flag``; a dict default is copied per instance."""
    metadata = {"cli": Flag(help, group, **flag)}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Every setting of a training run; written to ``config.json`` fully resolved."""

    # model and data
    preset: str = setting("tiny", "architecture (OpenAI CLIP layout)", MODEL_AND_DATA, choices=tuple(sorted(PRESETS)))
    model_overrides: dict = setting(
        {},
        "override a field of the preset (repeatable; text_alibi=0: tiny text tower without ALiBi)",
        MODEL_AND_DATA,
        name="--model",
        metavar="FIELD=INT",
        repeatable=True,
        parse=_parse_model_overrides,
    )
    data: str = setting(
        "synthetic",
        "synthetic | docci:PATH | sharegpt4v:PATH | dci:PATH | urban1k:PATH (dci, urban1k: evaluation only)",
        MODEL_AND_DATA,
    )
    image_root: str | None = setting(None, "folder the dataset's image paths are relative to", MODEL_AND_DATA)
    init: str | None = setting(
        None, "start from a local checkpoint: openai:PATH | longclip:PATH (OpenAI layout)", MODEL_AND_DATA
    )
    freeze_positions: int = setting(20, "leading text positions kept frozen after --init", MODEL_AND_DATA)
    train_size: int = setting(1_000_000, "synthetic training samples per epoch", MODEL_AND_DATA)
    twin_fraction: float = setting(
        0.5, "synthetic training pairs followed by their colour-swapped twin in the same batch", MODEL_AND_DATA
    )
    max_subcaptions: int = setting(8, "subcaptions per caption at most", MODEL_AND_DATA)
    captions: str = setting(
        "long",
        "train on the long captions, or on their summaries only: CLIP-style pretraining on short captions "
        "(--loss global, 77 text positions unless --model context_length=N says otherwise)",
        MODEL_AND_DATA,
        choices=("long", "short"),
    )
    # objective
    loss: str = setting("mulclip", "objective", OBJECTIVE, choices=tuple(sorted(OBJECTIVES)))
    wpr: bool = setting(True, "leave out word-patch reconstruction", OBJECTIVE)
    sap: bool = setting(True, "leave out subcaption-aggregated patches", OBJECTIVE)
    weights: dict = setting(
        {},
        "weight of the {key} term (default: {default})",
        OBJECTIVE,
        name="--w",
        metavar="W",
        keys=DEFAULT_WEIGHTS,
        renamed_keys=RENAMED_TERMS,
    )
    sap_pairing: str = setting(
        "matched", "SAP against each image's own subcaptions, or all pairs", OBJECTIVE, choices=("matched", "all")
    )
    sap_topk_ratio: float = setting(0.25, "share of patches SAP aggregates per subcaption", OBJECTIVE)
    sap_raw_patches: bool = setting(False, "SAP on raw patches, not calibrated ones", OBJECTIVE)
    calibration: bool = setting(
        True, "leave out local token calibration (LC): WPR, SAP and CLIM read the raw patch and word tokens", OBJECTIVE
    )
    wpr_form: str = setting(
        "contrast",
        "WPR compares each calibrated token with its reconstruction by a within-sample contrast, or by their cosine",
        OBJECTIVE,
        choices=WPR_FORMS,
    )
    tau_attn: float = setting(0.07, "WPR's attention temperature τa", OBJECTIVE, metavar="TAU")
    tau_contrast: float = setting(0.07, "WPR's within-sample contrast temperature τr", OBJECTIVE, metavar="TAU")
    tau_sap: float = setting(0.07, "SAP's aggregation temperature τs", OBJECTIVE, metavar="TAU")
    fine_start: float = setting(
        DEFAULT_FINE_START_SCRATCH,
        f"fraction of training before the fine-grained terms (default: {DEFAULT_FINE_START_SCRATCH:g} from scratch, "
        "0 with --init)",
        OBJECTIVE,
        unset=_default_fine_start,
    )
    fine_ramp: float = setting(0.05, "fraction over which they ramp to full weight", OBJECTIVE)
    backend: str = setting(
        "auto",
        "loss implementation: fused ops (auto: Triton on CUDA, torch elsewhere) or the reference",
        OBJECTIVE,
        choices=("auto", "torch", "triton", "reference"),
    )
    # optimisation
    steps: int | None = setting(None, f"optimisation steps (default: {DEFAULT_STEPS_SCRATCH})", OPTIMISATION)
    epochs: int | None = setting(None, "passes over the training set, instead of --steps", OPTIMISATION)
    time_limit: float = setting(
        0.0,
        "seconds of training at most (0: none): no step starts that would end past it at the last step's "
        "pace; the schedule then follows whichever runs out first, so the result depends on the machine's speed",
        OPTIMISATION,
    )
    batch_size: int = setting(32, "pairs per optimisation step (over all processes)", OPTIMISATION)
    lr: float | None = setting(
        None,
        f"peak learning rate (default: {DEFAULT_LR_SCRATCH:g} from scratch, {DEFAULT_LR_FINETUNE:g} with --init)",
        OPTIMISATION,
    )
    weight_decay: float = setting(0.1, "AdamW weight decay", OPTIMISATION)
    warmup: float = setting(0.05, "warm-up fraction of training", OPTIMISATION)
    seed: int = setting(0, "seed of the model, the data order and the synthetic data", OPTIMISATION)
    # run
    out: str = setting("runs/default", "run directory", RUN)
    device: str = setting("cpu", "torch device (cuda: the local rank's GPU under torchrun)", RUN)
    precision: str = setting(
        "fp32",
        "bf16: autocast the towers, the loss stays fp32 (faster on GPUs and on CPUs with native bf16)",
        RUN,
        choices=("fp32", "bf16"),
    )
    grad_checkpointing: bool = setting(False, "recompute the towers' blocks in backward (less memory)", RUN)
    accum_steps: int = setting(1, "micro-batches per step; contrast within each", RUN)
    # A torch.compile backend for the towers' transformers ("inductor"), or None.
    compile: str | None = setting(
        None,
        "torch.compile the towers' transformers (backend inductor unless named)",
        RUN,
        metavar="BACKEND",
        optional_value="inductor",
    )
    packed_text: bool = setting(
        True,
        "encode each group of texts padded (the reference path) instead of every text of the batch in one "
        "packed pass (the default, except with --compile)",
        RUN,
        unset=_default_packed_text,
    )
    text_attention: str = setting(
        "auto",
        "attention of the packed text pass: flash-attn, xformers, or PyTorch SDPA on groups of similar length "
        "(auto: flash-attn on CUDA fp16/bf16, else xformers on CUDA without ALiBi, else torch)",
        RUN,
        choices=TEXT_ATTENTION_BACKENDS,
    )
    threads: int = setting(0, "torch CPU threads (0: torch's default)", RUN)
    num_workers: int = setting(0, "data loader processes", RUN)
    log_every: int = setting(1, "steps between metrics.jsonl records", RUN)
    checkpoint_every: int = setting(0, "steps between checkpoints (0: only at the end)", RUN)
    keep_checkpoints: int = setting(2, "checkpoints kept (the newest)", RUN)
    val_every: int = setting(0, "steps between validations (0: a fifth of the run: 4 before the final evaluation)", RUN)
    val_pairs: int = setting(256, "held-out synthetic pairs of each validation", RUN)
    eval_pairs: int = setting(1000, "held-out pairs of the final evaluation (0: none)", RUN)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def flag_of(config_field: dataclasses.Field) -> Flag:
    return config_field.metadata["cli"]


def flag_name(config_field: dataclasses.Field) -> str:
    """The command-line name of a field: the one its ``Flag`` gives, else ``--field-name`` (``--no-field-name``
    for a switch that is on by default)."""
    flag = flag_of(config_field)
    if flag.name:
        return flag.name
    dashed = config_field.name.replace("_", "-")
    return f"--no-{dashed}" if config_field.default is True else f"--{dashed}"


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def resolve_config(config: TrainConfig, resuming: bool = False) -> TrainConfig:
    """Fill the defaults that depend on other settings and validate everything; raises ConfigError.

    ``resuming``: the settings of a run continued from its checkpoint, which holds its weights, so its
    ``--init`` file need not exist any more."""
    weights = current_term_names(config.weights)  # a script's old names still work, with a warning
    c = dataclasses.replace(config, weights=weights, model_overrides=dict(config.model_overrides))
    if c.preset not in PRESETS:
        raise ConfigError(f"unknown --preset {c.preset!r}; choose one of {sorted(PRESETS)}")
    if c.loss not in OBJECTIVES:
        raise ConfigError(f"unknown --loss {c.loss!r}; choose one of {sorted(OBJECTIVES)}")
    parse_data_spec(c.data)  # raises DataError with the reason
    c = dataclasses.replace(c, data=absolute_data_spec(c.data))  # found again by eval and --resume
    if c.init is not None:
        kind, _, path = c.init.partition(":")
        if kind not in ("openai", "longclip") or not path:
            raise ConfigError(f"--init must be openai:PATH or longclip:PATH, got {c.init!r}")
        if not resuming and not os.path.isfile(path):
            raise CheckpointError(f"--init checkpoint not found: {path}")
    if c.captions not in ("long", "short"):
        raise ConfigError(f"--captions must be long or short, got {c.captions!r}")
    if c.captions == "short":
        if c.loss != "global":
            raise ConfigError(
                f"--captions short trains CLIP's contrastive loss on summaries; --loss {c.loss} needs long captions"
            )
        c.model_overrides.setdefault("context_length", SHORT_CONTEXT)
    if c.precision not in ("fp32", "bf16"):
        raise ConfigError(f"--precision must be fp32 or bf16, got {c.precision!r}")
    if c.compile is not None and c.compile not in torch._dynamo.list_backends(exclude_tags=()):
        raise ConfigError(
            f"--compile backend {c.compile!r} unknown; torch.compile knows {torch._dynamo.list_backends()}"
        )
    try:
        check_text_attention(c.text_attention)
    except (ValueError, AttentionBackendUnavailable) as exc:
        raise ConfigError(f"--text-attention {c.text_attention}: {exc}") from None
    if c.text_attention == "flash" and c.precision != "bf16":
        raise ConfigError("--text-attention flash needs --precision bf16: flash-attn computes in fp16/bf16 only")
    if c.accum_steps < 1 or c.batch_size % c.accum_steps:
        raise ConfigError(f"--accum-steps must be >= 1 and divide --batch-size {c.batch_size}, got {c.accum_steps}")
    if c.steps is not None and c.epochs is not None:
        raise ConfigError("give --steps or --epochs, not both")
    if c.steps is None and c.epochs is None:
        c.steps = DEFAULT_STEPS_SCRATCH
    for name in ("steps", "epochs"):
        value = getattr(c, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name} must be >= 1, got {value}")
    if c.lr is None:
        c.lr = DEFAULT_LR_FINETUNE if c.init else DEFAULT_LR_SCRATCH
    # Each field's condition and what the error says it accepts.
    valid = {
        "batch_size": (c.batch_size >= 2, "at least 2"),
        "lr": (c.lr > 0 and math.isfinite(c.lr), "a finite number > 0"),
        "weight_decay": (0 <= c.weight_decay < math.inf, "a finite number >= 0"),
        "warmup": (0 <= c.warmup < 1, "a fraction of the steps in [0, 1)"),
        "fine_start": (0 <= c.fine_start <= 1, "a fraction of the steps in [0, 1]"),
        "fine_ramp": (0 <= c.fine_ramp <= 1, "a fraction of the steps in [0, 1]"),
        "time_limit": (c.time_limit >= 0, "seconds >= 0 (0: none)"),
        "max_subcaptions": (c.max_subcaptions >= 1, "at least 1"),
        "sap_topk_ratio": (0 < c.sap_topk_ratio <= 1, "in (0, 1]"),
        "tau_attn": (0 < c.tau_attn < math.inf, "a finite number > 0"),
        "tau_contrast": (0 < c.tau_contrast < math.inf, "a finite number > 0"),
        "tau_sap": (0 < c.tau_sap < math.inf, "a finite number > 0"),
        "freeze_positions": (0 <= c.freeze_positions <= 248, "from 0 to 248"),
        "keep_checkpoints": (c.keep_checkpoints >= 1, "at least 1"),
        # the synthetic data and the data order are seeded by non-negative integers
        "seed": (c.seed >= 0, "at least 0"),
        "log_every": (c.log_every >= 1, "at least 1"),
        "checkpoint_every": (c.checkpoint_every >= 0, "at least 0 (0: only at the end)"),
        "val_every": (c.val_every >= 0, "at least 0 (0: a fifth of the run)"),
        "eval_pairs": (c.eval_pairs >= 0, "at least 0 (0: no final evaluation)"),
        "val_pairs": (c.val_pairs >= 1, "at least 1"),
        "num_workers": (c.num_workers >= 0, "at least 0"),
        "threads": (c.threads >= 0, "at least 0 (0: torch's default)"),
        "train_size": (c.train_size >= c.batch_size, f"at least --batch-size ({c.batch_size})"),
        "twin_fraction": (0 <= c.twin_fraction <= 1, "a fraction in [0, 1]"),
    }
    invalid = [name for name, (ok, _) in valid.items() if not ok]
    if invalid:
        name = invalid[0]
        raise ConfigError(f"invalid value for {flag_name(_FIELDS[name])} ({getattr(c, name)}): {valid[name][1]}")
    if c.sap_pairing not in ("matched", "all"):
        raise ConfigError(f"--sap-pairing must be matched or all, got {c.sap_pairing!r}")
    unknown = set(c.weights) - set(TERMS)
    if unknown:
        raise ConfigError(f"unknown loss term weight(s) {sorted(unknown)}")
    for term, weight in c.weights.items():  # MulCLIPLoss refuses them too, but with a traceback mid-setup
        try:
            check_non_negative(term, weight)
        except ValueError:
            raise ConfigError(
                f"invalid value for --w-{term.replace('_', '-')} ({weight}): a finite number >= 0"
            ) from None
    try:
        checked_preset_config(c.preset, c.model_overrides)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    try:
        check_device(c.device)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return c


# What a resumed run may change: where and how fast it runs, its bookkeeping, and how long it trains.
# Every other setting defines what is trained; changing one mid-run would make the run a mix of two.
RESUMABLE_CHANGES = frozenset(
    {
        "out",
        "device",
        "threads",
        "num_workers",
        "compile",
        "grad_checkpointing",
        "log_every",
        "checkpoint_every",
        "keep_checkpoints",
        "val_every",
        "val_pairs",
        "eval_pairs",
        "steps",
        "epochs",
        "time_limit",
    }
)


def absolute_data_spec(spec: str) -> str:
    """``--data kind:PATH`` with PATH made absolute. A run stores its data so: ``eval`` recognises the run's
    own ShareGPT4V file, whose last ``--eval-pairs`` records it held out, by its path, and a relative path
    would not match another spelling of it (or name another file from another directory), so more
    ``--pairs`` than the run held out would score records it trained on."""
    kind, _, path = spec.partition(":")
    return f"{kind}:{os.path.abspath(path)}" if path else spec


def _holds_out_by_count(config: TrainConfig) -> bool:
    """Whether the run's --eval-pairs also splits its data (ShareGPT4V: the last records are its test set), so
    that changing it would train on test records or leave training records out."""
    return config.data.partition(":")[0] in HELD_OUT_BY_COUNT


def _keyed_flag_contradictions(stored: TrainConfig, name: str, given: dict) -> list[str]:
    """The keys of a keyed flag (``--w-KEY``, ``--model KEY=INT``) given with ``--resume`` whose value differs
    from the one the stored run trains with, each as its own flag: a stored dict holds only the keys its
    command line gave, so a key left out there has its default (``DEFAULT_WEIGHTS``, the preset's field), and
    giving that default again is no change."""
    if name == "model_overrides":
        preset = preset_config(stored.preset, **stored.model_overrides)
        current = {key: getattr(preset, key, None) for key in given}
        current = {key: int(value) if isinstance(value, bool) else value for key, value in current.items()}
        return [
            f"--model {key}={value} (the run has {key}={current[key]})"
            for key, value in sorted(given.items())
            if value != current[key]
        ]
    flag = flag_of(_FIELDS[name])
    current = {**flag.keys, **current_term_names(getattr(stored, name), warn=False)}
    return [
        f"{flag.name}-{key.replace('_', '-')} {value} (the run has {current.get(key)})"
        for key, value in sorted(given.items())
        if value != current.get(key)
    ]


def resumed_config(stored: TrainConfig, requested: TrainConfig, given: set[str]) -> TrainConfig:
    """The settings of a resumed run: the ``stored`` run's, its directory (``out``) from ``requested``, and
    the ``given`` settings of ``requested`` that may change (``RESUMABLE_CHANGES``). Without ``device`` in
    ``given`` the run stays on the device it ran on: a CUDA run resumed after a crash must not go on on the CPU.

    Raises ``ConfigError`` naming every given flag that contradicts the stored run in a setting that may
    not change (``eval_pairs`` too, where it splits the data); a given setting equal to the stored one is fine;
    and when the run's device is not on this machine and no ``device`` is given.
    """
    if "device" not in given:
        try:
            check_device(stored.device)
        except ValueError:
            raise ConfigError(
                f"the run ran on {stored.device}, which this machine does not have; a resumed run stays on its "
                "device unless --device moves it (e.g. --device cpu)"
            ) from None
    changes, refused = {"out": requested.out}, []
    for name in sorted(given):
        before, value = getattr(stored, name), getattr(requested, name)
        if isinstance(before, dict):  # keyed flags (--w-*, --model) give only the keys on the command line
            refused += _keyed_flag_contradictions(stored, name, value)
            continue
        if name == "data":  # stored absolute (``absolute_data_spec``); the run's own spelling is no change
            before, value = absolute_data_spec(before), absolute_data_spec(value)
        if value == before:
            continue
        if name in RESUMABLE_CHANGES and not (name == "eval_pairs" and _holds_out_by_count(stored)):
            changes[name] = value
        elif isinstance(value, bool):  # a switch: giving it contradicts a run that ran without it
            refused.append(f"{flag_name(_FIELDS[name])} (the run ran without it)")
        else:
            refused.append(f"{flag_name(_FIELDS[name])} {value} (the run has {before})")
    if refused:
        raise ConfigError(
            "--resume continues the stored run, and these flags contradict it: "
            + "; ".join(refused)
            + ". Leave them out, or start a new run (another --out, or --overwrite)"
        )
    # The run's length is --steps or --epochs: giving one replaces the other.
    for length, other in (("steps", "epochs"), ("epochs", "steps")):
        if length in changes and other not in given:
            changes[other] = None
    return dataclasses.replace(stored, **changes)
