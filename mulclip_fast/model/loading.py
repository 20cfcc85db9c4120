"""Loading OpenAI / Long-CLIP / open_clip OpenAI-layout checkpoints into ``CLIP`` (docs/method.md, "Model").

A checkpoint is a local file holding either a TorchScript archive (OpenAI's released ``ViT-B-16.pt``)
or a plain state dict (Long-CLIP's ``longclip-B.pt``, open_clip's OpenAI-layout exports, this project's
``python -m mulclip_fast.export`` files), possibly wrapped in ``{"state_dict": …}`` / ``{"model": …}`` (so a
training checkpoint of this project loads too) and with ``module.`` prefixes from DDP. A 77-position
text table is stretched to the model's 248 positions with Long-CLIP's rule. Long-CLIP's own checkpoints
hold two 248-position tables; they are merged into the one table Long-CLIP's text tower adds.

The towers use OpenAI's QuickGELU, so open_clip checkpoints compute what they were trained with only when
trained with it (OpenAI's weights, the ``-quickgelu`` configs). One trained with ``nn.GELU`` (open_clip's
plain ``ViT-B-16`` and ``ViT-L-14`` configs, e.g. its LAION-2B weights) has the same keys and shapes and
loads without error, but its features are not the ones it was trained to give.
"""

from __future__ import annotations

import os
import re
import zipfile

import torch

from ..reference import stretch_positional_embedding
from .clip import CLIP

# Keys OpenAI's checkpoints carry that are metadata, not parameters (clip/model.py build_model drops them).
_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")
# Long-CLIP's checkpoints keep the stretched table, frozen, in ``positional_embedding`` and train a copy,
# ``positional_embedding_res``; its text tower adds rows 0..19 of the first and rows 20.. of the second
# (``mask1``, ``mask2`` in Long-CLIP's model/model_longclip.py, ``encode_text``).
LONGCLIP_RESIDUAL_KEY = "positional_embedding_res"
LONGCLIP_KEPT_POSITIONS = 20
# The calibration modules of our model, which a CLIP checkpoint does not have: freshly initialised on load.
CALIBRATION_PREFIXES = ("patch_calibration.", "word_calibration.")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the model; the message says why."""


def checkpoint_read_error(path: str, exc: BaseException) -> CheckpointError:
    """The error for a file ``torch.load(path, weights_only=True)`` could not read: PyTorch's own message for a
    file of other pickled objects (or no pickle at all) is a paragraph that advises ``weights_only=False``,
    which these loaders refuse on purpose, and an empty file gives an ``EOFError`` with no message."""
    text = str(exc)
    if "Weights only load failed" in text:
        found = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\n\s*\n|Check the documentation|$)", text, re.S)
        reason = found.group(1).strip() if found else ""
        return CheckpointError(
            f"cannot read checkpoint {path}: not a PyTorch file of tensors and plain values, the only kind "
            "loaded (a pickle of other objects can run code)" + (f"; torch.load says: {reason}" if reason else "")
        )
    if isinstance(exc, EOFError) or not text:
        return CheckpointError(f"cannot read checkpoint {path}: the file is empty or cut short")
    return CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {text}")


def _is_torchscript(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The raw state dict stored in ``path`` (TorchScript archive or pickled dict), on the CPU."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        if _is_torchscript(path):
            state = torch.jit.load(path, map_location="cpu").state_dict()
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as exc:  # torch raises many types for unreadable files; report them uniformly
        if "numpy" in str(exc) and "weights_only" in str(exc).lower():
            # Training checkpoints of mulclip-fast before 2026-11-30 pickled numpy's RNG state with the weights.
            raise CheckpointError(
                f"{path} holds pickled numpy objects besides its weights (a training checkpoint of an older "
                "mulclip-fast?), which are not loaded as weights for safety: write its weights with "
                "`python -m mulclip_fast.export --checkpoint PATH --out weights.pt` and pass that file"
            ) from None
        raise checkpoint_read_error(path, exc) from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items() if k not in _METADATA_KEYS}


def describe_clip_state_dict(state: dict[str, torch.Tensor]) -> str:
    """A one-line description of the architecture a CLIP state dict was saved from (for error messages)."""
    try:
        width = state["visual.conv1.weight"].shape[0]
        patch = state["visual.conv1.weight"].shape[-1]
        grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        v_layers = len({k.split(".")[3] for k in state if k.startswith("visual.transformer.resblocks.")})
        t_layers = len({k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")})
        t_width = state["ln_final.weight"].shape[0]
        embed = state["text_projection"].shape[1]
        ctx = state["positional_embedding"].shape[0]
        return (
            f"ViT with {v_layers} layers of width {width}, patch {patch}, {grid * patch}px images; "
            f"text {t_layers} layers of width {t_width}, {ctx} positions; embedding {embed}"
        )
    except (KeyError, IndexError):
        return "not a CLIP vision-transformer state dict"


def load_clip_weights(
    model: CLIP, path: str, freeze_positions: int = 20, state: dict[str, torch.Tensor] | None = None
) -> dict[str, object]:
    """Load an OpenAI-layout CLIP checkpoint into ``model``; returns what was done (for the run log).

    A 77-position text table is stretched to the model's context, and Long-CLIP's two tables are merged
    into the one its text tower computes with; the first ``freeze_positions`` text positions are then kept
    frozen (Long-CLIP, FineLIP). Any shape that does not match the model is an
    error naming the key, both shapes and the architecture the checkpoint was saved from. ``state``: the
    file's ``read_state_dict``, when the caller has read it already (it is changed in place).
    """
    if state is None:
        state = read_state_dict(path)
    if "visual.conv1.weight" not in state or "token_embedding.weight" not in state:
        raise CheckpointError(
            f"{path} is not an OpenAI-layout CLIP checkpoint (no visual.conv1.weight / token_embedding.weight); "
            "ResNet CLIPs and Hugging Face layouts are not supported"
        )
    own = model.state_dict()
    residual = state.pop(LONGCLIP_RESIDUAL_KEY, None)
    if residual is not None:
        table = state.get("positional_embedding")
        if table is None or residual.shape != table.shape:
            raise CheckpointError(
                f"{path}: {LONGCLIP_RESIDUAL_KEY} {tuple(residual.shape)} must have the shape of positional_embedding "
                f"{None if table is None else tuple(table.shape)} (Long-CLIP checkpoints hold two [248, width] tables)"
            )
        state["positional_embedding"] = torch.cat([table[:LONGCLIP_KEPT_POSITIONS], residual[LONGCLIP_KEPT_POSITIONS:]])
    stretched = False
    table = state.get("positional_embedding")
    target = own["positional_embedding"].shape[0]
    if table is not None and table.shape[0] != target and table.shape[1:] == own["positional_embedding"].shape[1:]:
        try:
            state["positional_embedding"] = stretch_positional_embedding(table, target=target, keep=20)
        except ValueError as exc:
            raise CheckpointError(f"{path}: cannot stretch its {table.shape[0]}-position text table: {exc}") from None
        stretched = True
    mismatched = [
        f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}"
        for key, value in state.items()
        if key in own and value.shape != own[key].shape
    ]
    missing = [k for k in own if k not in state and not k.startswith(CALIBRATION_PREFIXES)]
    if mismatched or missing:
        details = "; ".join(mismatched[:3] + [f"missing {k}" for k in missing[:3]])
        raise CheckpointError(
            f"{path} does not fit preset with {describe_clip_state_dict(model.state_dict())}: it was saved from "
            f"{describe_clip_state_dict(state)} ({details}). Pick the matching --preset."
        )
    unexpected = [k for k in state if k not in own]
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    model.freeze_leading_positions(freeze_positions)
    return {"path": path, "stretched_77_to": target if stretched else None, "ignored_keys": unexpected}


def check_device(device: str) -> torch.device:
    """``device`` as a torch device this process can use; ``ValueError`` naming ``--device`` otherwise, so
    that a bad value is an error line before any work instead of a traceback when a model moves there."""
    try:
        parsed = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"--device {device!r} is not a torch device ({exc})") from None
    accelerator = getattr(torch, parsed.type, None)  # torch.cuda, torch.mps, torch.xpu: each says if it is there
    if parsed.type != "cpu" and not (hasattr(accelerator, "is_available") and accelerator.is_available()):
        raise ValueError(f"--device {device} requested but {parsed.type.upper()} is not available")
    count = getattr(accelerator, "device_count", None)
    if parsed.index is not None and count is not None and parsed.index >= count():
        raise ValueError(f"--device {device} requested but this machine has {count()} {parsed.type.upper()} device(s)")
    return parsed
