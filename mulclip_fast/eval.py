"""Retrieval and binding evaluation (docs/training.md, "Evaluation"); also ``python -m mulclip_fast.eval``.

Recall@K is computed on long captions (and on summaries, under ``short_*`` keys): text→image ranks the
images for each caption, image→text the captions for each image. A tie with the correct item counts
against it, so a model that scores everything equally gets recall 0, not 1. Binding accuracy is the
fraction of images whose true caption scores strictly higher than the same caption with two objects'
colours swapped (synthetic data only). On the synthetic test split, ``evaluate`` adds the fine-grained
metrics of ``mulclip_fast.fine_grained`` (hard negatives per kind of change, subcaption grounding, the
compositional split, zero-shot shape classification); ``--zeroshot imagefolder:PATH`` adds zero-shot
classification of an image folder. Short-caption sets (COCO, Flickr30k: about five captions per image)
get ``multi_caption_recall`` instead: an image is found when any of its captions is.

    python -m mulclip_fast.eval --checkpoint runs/default --data synthetic --pairs 1000
    python -m mulclip_fast.eval --checkpoint runs/default --zeroshot imagefolder:/data/imagenette/val
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

from .data import (
    HELD_OUT_BY_COUNT,
    SHORT_CAPTION_SETS,
    Collator,
    DataError,
    SyntheticLongCaptions,
    open_dataset,
    parse_data_spec,
)
from .data.hard_negatives import HARD_NEGATIVE_KINDS
from .fine_grained import (
    ClipEncoder,
    compositional_split,
    grounding_recall,
    hard_negative_accuracy,
    strict_win_rate,
    zeroshot_image_folder,
    zeroshot_synthetic,
)
from .model import (
    CLIP,
    PRESETS,
    CheckpointError,
    check_device,
    checked_preset_config,
    load_clip_weights,
    parse_model_overrides,
    preset_config,
    read_state_dict,
)
from .run_checkpoints import load_latest_training_checkpoint, load_training_checkpoint

RECALL_KS = (1, 5, 10)
EVAL_KEYS = tuple(f"{d}_r{k}" for d in ("t2i", "i2t") for k in RECALL_KS) + ("binding_acc",)


def recall_at_k(similarity: torch.Tensor, ks=RECALL_KS) -> dict[str, float]:
    """Recall@K both ways for a square ``[N texts, N images]`` similarity matrix whose diagonal holds
    the true pairs. Returns ``{"t2i_r1": …, "i2t_r1": …}`` as fractions in [0, 1]."""
    if similarity.dim() != 2 or similarity.shape[0] != similarity.shape[1] or similarity.shape[0] == 0:
        raise ValueError(f"similarity must be a non-empty square [N, N] matrix, got {tuple(similarity.shape)}")
    if not torch.isfinite(similarity).all():
        raise ValueError("similarity contains NaN or Inf")
    out = {}
    for name, sim in (("t2i", similarity), ("i2t", similarity.T)):
        correct = sim.diagonal()[:, None]
        # rank = how many other candidates score at least as high as the true one (ties count against it)
        rank = (sim >= correct).sum(dim=1) - 1
        for k in ks:
            out[f"{name}_r{k}"] = float((rank < k).float().mean())
    return out


def multi_caption_recall(similarity: torch.Tensor, caption_image: torch.Tensor, ks=RECALL_KS) -> dict[str, float]:
    """Recall@K both ways for ``[n_captions, n_images]`` similarities where caption ``c`` belongs to image
    ``caption_image[c]`` and every image has at least one caption (COCO / Flickr30k, about five each).

    Text→image: each caption ranks all images. Image→text: an image is a hit at K when any of its captions
    is in its top K, i.e. when fewer than K captions of other images score at least as high as its best
    caption (ties count against it, as in ``recall_at_k``, which this equals for one caption per image)."""
    if similarity.dim() != 2 or 0 in similarity.shape:
        raise ValueError(f"similarity must be a non-empty [n_captions, n_images] matrix, got {tuple(similarity.shape)}")
    if not torch.isfinite(similarity).all():
        raise ValueError("similarity contains NaN or Inf")
    n_captions, n_images = similarity.shape
    if caption_image.shape != (n_captions,) or caption_image.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"caption_image must be an integer tensor of shape ({n_captions},) (one image index per caption), "
            f"got {caption_image.dtype} {tuple(caption_image.shape)}"
        )
    caption_image = caption_image.long()
    low, high = int(caption_image.min()), int(caption_image.max())
    if low < 0 or high >= n_images:
        raise ValueError(f"caption_image must hold image indices in [0, {n_images}), got {low}..{high}")
    has_caption = torch.zeros(n_images, dtype=torch.bool, device=caption_image.device)
    has_caption.index_fill_(0, caption_image, True)
    if not has_caption.all():
        missing = int((~has_caption).nonzero()[0])
        raise ValueError(f"every image needs a caption; image {missing} has none in caption_image")
    true_score = similarity.gather(1, caption_image[:, None]).squeeze(1)
    t2i_rank = (similarity >= true_score[:, None]).sum(dim=1) - 1
    # each image's best caption score; the image's own captions that reach it are not counted against it
    best_own = torch.full((n_images,), float("-inf"), dtype=similarity.dtype, device=similarity.device)
    best_own = best_own.scatter_reduce(0, caption_image, true_score, reduce="amax")
    own_at_best = torch.bincount(caption_image[true_score >= best_own[caption_image]], minlength=n_images)
    i2t_rank = (similarity >= best_own[None, :]).sum(dim=0) - own_at_best
    out = {}
    for name, rank in (("t2i", t2i_rank), ("i2t", i2t_rank)):
        for k in ks:
            out[f"{name}_r{k}"] = float((rank < k).float().mean())
    return out


def binding_accuracy(image: torch.Tensor, true_text: torch.Tensor, negative_text: torch.Tensor) -> float:
    """Fraction of rows where ``⟨image, true⟩ > ⟨image, negative⟩`` (the negative: the caption with its
    attributes swapped): ``strict_win_rate`` on embeddings L2-normalised here."""
    return strict_win_rate(*(F.normalize(x.float(), dim=-1) for x in (image, true_text, negative_text)))


@torch.no_grad()
def embed_dataset(
    model: CLIP, dataset, batch_size: int = 250, device: str | torch.device = "cpu", packed_text: bool = True
) -> dict:
    """L2-normalised image, long-caption, summary and probe embeddings of every readable sample, and its
    ``keys`` (the image file of a real record).

    ``packed_text``: a batch's captions, summaries and probes in one packed pass of the text tower
    (``CLIP.encode_packed_text``); False encodes each group padded, the reference."""
    collator = Collator(with_subcaptions=False, long_context=model.config.context_length)
    # Evaluation runs in fp32, where flash-attn cannot: a model set to it (a run trained with --precision bf16
    # --text-attention flash) evaluates with auto's choice, as `eval` of its checkpoint does.
    evaluation_attention = "auto" if model.text_attention == "flash" else None
    was_training = model.training
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {"image": [], "long": [], "short": [], "probe": []}
    skipped: list[tuple[str, str]] = []
    keys: list[str] = []
    try:
        for start in range(0, len(dataset), batch_size):
            batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            skipped += batch.skipped
            if len(batch) == 0:
                continue
            keys += batch.keys
            batch = batch.to(device)
            parts["image"].append(F.normalize(model.encode_image(batch.images).float(), dim=-1))
            names = ["long", "short"] + (["probe"] if batch.probe_ids is not None else [])
            texts = [batch.long_ids, batch.short_ids, batch.probe_ids][: len(names)]
            if packed_text:
                embeddings = model.encode_packed_text(texts, attention=evaluation_attention)[0]
            else:
                embeddings = [model.encode_text(ids) for ids in texts]
            for name, embedding in zip(names, embeddings, strict=True):
                parts[name].append(F.normalize(embedding.float(), dim=-1))
    finally:
        model.train(was_training)
    if not parts["image"]:
        raise DataError(f"no readable sample to evaluate ({len(skipped)} skipped, e.g. {skipped[:1]})")
    out = {name: torch.cat(chunks).cpu() if chunks else None for name, chunks in parts.items()}
    if out["probe"] is not None and out["probe"].shape[0] != out["image"].shape[0]:
        out["probe"] = None  # probes only for part of the data: binding accuracy is undefined
    out["skipped"] = skipped
    out["keys"] = keys
    return out


def images_of_records(keys: list[str]) -> tuple[torch.Tensor, list[int]]:
    """``(caption_image, first)``: the image index of each record, records that name the same image file
    (``key``) sharing one, and the first record of each image. Recall then ranks each image once, with all
    its captions (:func:`multi_caption_recall`): two copies of one image would tie for each of its captions,
    and a tie counts against the true item."""
    index: dict[str, int] = {}
    first: list[int] = []
    for row, key in enumerate(keys):
        if key not in index:
            index[key] = len(first)
            first.append(row)
    return torch.tensor([index[key] for key in keys], dtype=torch.long), first


HARDNEG_PAIRS = 100  # test pairs whose hard negatives are scored (5 × 100 more captions to encode)


def evaluate(
    model: CLIP,
    dataset,
    batch_size: int = 250,
    device: str | torch.device = "cpu",
    hardneg_pairs: int = HARDNEG_PAIRS,
) -> dict:
    """The eval.json dictionary: recall both ways on long captions (and ``short_*`` on summaries),
    binding accuracy (NaN → null when the data has no probes), ``n_pairs``, ``n_images``, ``n_skipped`` and
    ``skipped`` (each unreadable image's path and reason); on the
    synthetic test split also ``fine_grained_metrics`` (hard negatives on the first ``hardneg_pairs``
    pairs).

    Records that name the same image file count as one image with several captions (``images_of_records``),
    as in COCO's protocol; with one record per image (every image distinct) this is ``recall_at_k``."""
    emb = embed_dataset(model, dataset, batch_size, device)
    caption_image, first = images_of_records(emb["keys"])
    image = emb["image"][first]
    result: dict[str, float | int | None] = dict(multi_caption_recall(emb["long"] @ image.T, caption_image))
    result["binding_acc"] = (
        binding_accuracy(emb["image"], emb["long"], emb["probe"]) if emb["probe"] is not None else None
    )
    short = multi_caption_recall(emb["short"] @ image.T, caption_image)
    result.update({f"short_{k}": v for k, v in short.items()})
    result["n_pairs"] = int(emb["image"].shape[0])
    result["n_images"] = len(first)
    result["n_skipped"] = len(emb["skipped"])
    result["skipped"] = dict(emb["skipped"])  # path -> why it could not be read
    if isinstance(dataset, SyntheticLongCaptions) and dataset.split == "test":
        result.update(fine_grained_metrics(model, dataset, emb, batch_size, device, hardneg_pairs))
    return result


COMPOSITIONAL_PAIRS = 100  # scenes of the compositional split
# The hard negatives that change a colour–shape combination; the others are left out to keep the eval cheap.
COMPOSITIONAL_KINDS = ("colour", "shape", "binding")


def fine_grained_metrics(
    model: CLIP,
    dataset: SyntheticLongCaptions,
    emb: dict,
    batch_size: int = 250,
    device: str | torch.device = "cpu",
    hardneg_pairs: int = HARDNEG_PAIRS,
) -> dict:
    """The synthetic test split's fine-grained numbers (docs/training.md, "Evaluation"): ``hardneg_*`` on its
    first ``hardneg_pairs`` pairs, ``grounding_r1/r5``, ``zeroshot_synthetic_acc`` and, on
    ``COMPOSITIONAL_PAIRS`` scenes of the compositional split, ``compositional_*`` (R@1/R@5 both ways and
    the ``COMPOSITIONAL_KINDS`` hard negatives). ``emb``: ``embed_dataset(model, dataset)``."""
    encoder = ClipEncoder(model, device, batch_size)
    n = min(hardneg_pairs, emb["image"].shape[0])
    result = hard_negative_accuracy(encoder, dataset, emb["image"][:n], emb["long"][:n], emb["probe"][:n])
    result.update(grounding_recall(encoder, dataset, emb["image"]))
    result.update(zeroshot_synthetic(encoder, dataset))
    split = compositional_split(dataset, COMPOSITIONAL_PAIRS)
    comp = embed_dataset(model, split, batch_size, device)
    result.update({f"compositional_{k}": v for k, v in recall_at_k(comp["long"] @ comp["image"].T, (1, 5)).items()})
    hard = hard_negative_accuracy(encoder, split, comp["image"], comp["long"], comp["probe"], COMPOSITIONAL_KINDS)
    result.update({f"compositional_{k}": v for k, v in hard.items()})
    return result


def evaluate_multi_caption(model: CLIP, dataset, batch_size: int = 250, device: str | torch.device = "cpu") -> dict:
    """The eval.json dictionary of a short-caption set (items with ``image`` and ``captions``, such as
    ``MultiCaptionFiles``): ``multi_caption_recall`` both ways, ``n_images``, ``n_captions``, ``n_skipped``
    and ``skipped`` (unreadable images by path, with the reason; their captions are left out too). Captions
    are tokenised to the model's context (truncation keeps EOT) and encoded padded to the batch's longest
    (``ClipEncoder``)."""
    encoder = ClipEncoder(model, device, batch_size)
    images, texts, caption_image, skipped, n_images = [], [], [], [], 0
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        skipped += [(item["key"], item["error"]) for item in items if item["image"] is None]
        items = [item for item in items if item["image"] is not None]
        if not items:
            continue
        for offset, item in enumerate(items):
            caption_image += [n_images + offset] * len(item["captions"])
        n_images += len(items)
        images.append(encoder.images(torch.stack([item["image"] for item in items])))
        texts.append(encoder.texts([caption for item in items for caption in item["captions"]]))
    if not images:
        raise DataError(f"no readable image to evaluate ({len(skipped)} skipped, e.g. {skipped[:1]})")
    image, text = torch.cat(images), torch.cat(texts)
    result: dict[str, float | int] = dict(multi_caption_recall(text @ image.T, torch.tensor(caption_image)))
    result.update(n_images=int(image.shape[0]), n_captions=int(text.shape[0]), n_skipped=len(skipped))
    result["skipped"] = dict(skipped)  # path -> why it could not be read
    return result


def format_multi_caption_table(result: dict) -> str:
    """A small text table of ``evaluate_multi_caption``'s recall."""
    lines = ["          R@1     R@5     R@10"]
    for direction in ("t2i", "i2t"):
        lines.append(f"   {direction}  " + "  ".join(f"{result[f'{direction}_r{k}']:6.3f}" for k in RECALL_KS))
    lines.append(f"images {result['n_images']}, captions {result['n_captions']}, skipped {result['n_skipped']}")
    return "\n".join(lines)


def format_table(result: dict) -> str:
    """A small text table of the recall and binding numbers."""
    lines = ["              R@1     R@5     R@10"]
    for prefix, label in (("", "long"), ("short_", "summary")):
        for direction in ("t2i", "i2t"):
            values = [result.get(f"{prefix}{direction}_r{k}") for k in RECALL_KS]
            if all(v is not None for v in values):
                lines.append(f"{label:>7} {direction}  " + "  ".join(f"{v:6.3f}" for v in values))
    binding = result.get("binding_acc")
    lines.append(f"binding accuracy {binding:.3f}" if binding is not None else "binding accuracy: n/a (no probes)")
    images = result.get("n_images", result["n_pairs"])
    shared = f" ({images} distinct images)" if images != result["n_pairs"] else ""
    lines.append(f"pairs {result['n_pairs']}{shared}, skipped {result.get('n_skipped', 0)}")
    lines += format_fine_grained(result)
    return "\n".join(lines)


def format_fine_grained(result: dict) -> list[str]:
    """Table lines of the fine-grained and zero-shot numbers present in ``result``."""
    lines = []
    for prefix, label in (("", "hard negatives"), ("compositional_", "compositional hard negatives")):
        if f"{prefix}hardneg_mean" in result:
            kinds = ", ".join(
                f"{kind} {result[f'{prefix}hardneg_{kind}']:.3f}"
                for kind in HARD_NEGATIVE_KINDS
                if f"{prefix}hardneg_{kind}" in result
            )
            pairs = result[f"{prefix}hardneg_pairs"]
            lines.append(f"{label} ({pairs} pairs): mean {result[f'{prefix}hardneg_mean']:.3f} ({kinds})")
    if "compositional_t2i_r1" in result:
        recall = ", ".join(f"{d} R@{k} {result[f'compositional_{d}_r{k}']:.3f}" for d in ("t2i", "i2t") for k in (1, 5))
        lines.append(f"compositional retrieval: {recall}")
    if "grounding_r1" in result:
        lines.append(
            f"grounding R@1 {result['grounding_r1']:.3f}, R@5 {result['grounding_r5']:.3f} "
            f"({result['grounding_queries']} object sentences)"
        )
    if "zeroshot_synthetic_acc" in result:
        lines.append(f"zero-shot synthetic shapes: accuracy {result['zeroshot_synthetic_acc']:.3f}")
    if "zeroshot_top1" in result:
        top5 = result["zeroshot_top5"]
        lines.append(
            f"zero-shot image folder: top-1 {result['zeroshot_top1']:.3f}, "
            + (f"top-5 {top5:.3f}" if top5 is not None else "top-5 n/a (5 classes or fewer)")
            + f" ({result['zeroshot_images']} images, {result['zeroshot_classes']} classes, "
            f"{result['zeroshot_skipped']} unreadable)"
        )
    return lines


def load_model_for_eval(
    checkpoint: str, preset: str | None, device: str, model_overrides: dict[str, int] | None = None
) -> tuple[CLIP, dict]:
    """A model from a run directory, a training checkpoint, or an OpenAI-layout CLIP file (needs preset, and
    the ``model_overrides`` of the run it was exported from, if any; the model gets the file's number of text
    positions).

    Returns the model and the training config stored with it (empty for a plain CLIP file).
    """
    path = checkpoint
    if os.path.isdir(path):
        path, state, unreadable = load_latest_training_checkpoint(path)
        for bad, reason in unreadable:
            print(f"warning: {bad} cannot be read ({reason}); evaluating the older {path}", file=sys.stderr)
    else:
        state = load_training_checkpoint(path)
    if state is not None:
        config = state["config"]
        if preset is not None and preset != config["preset"]:
            raise CheckpointError(
                f"{path} is a training checkpoint of a {config['preset']} model, not {preset}: --preset names "
                "the architecture of a plain CLIP checkpoint only; leave it out"
            )
        if model_overrides:
            raise CheckpointError(
                f"{path} is a training checkpoint, which names its own --model fields: --model is for a plain "
                "CLIP checkpoint only; leave it out"
            )
        model = CLIP(preset_config(config["preset"], **config.get("model_overrides", {})))
        model.load_state_dict(state["model"])
        return model.to(device), config
    if preset is None:
        raise CheckpointError(f"{path} is a plain CLIP checkpoint: give its --preset (e.g. vit-b-16)")
    weights = read_state_dict(path)
    # Evaluated with its own text positions (77 for OpenAI's CLIP, captions truncated to them keeping EOT),
    # not stretched to 248 as --init stretches a starting point for fine-tuning: stretched and not
    # fine-tuned, it would be another model than the checkpoint's, and an export of a 77-position run
    # would score otherwise than the run it came from.
    overrides = dict(model_overrides or {})
    table, config = weights.get("positional_embedding"), checked_preset_config(preset, overrides)
    if table is not None and table.shape[0] != config.context_length:
        overrides["context_length"] = table.shape[0]
    model = CLIP(preset_config(preset, **overrides))
    load_clip_weights(model, path, state=weights)
    return model.to(device), {"preset": preset, "model_overrides": overrides}


SKIPPED_PRINTED = 10  # unreadable images named on stderr; the JSON (--out, or stdout) lists them all


def _print_skipped(skipped: dict[str, str], listed_in: str | None) -> None:
    for path, reason in list(skipped.items())[:SKIPPED_PRINTED]:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    if len(skipped) > SKIPPED_PRINTED:
        where = f"all in {listed_in} under 'skipped'" if listed_in else "all in the JSON printed below"
        print(f"... and {len(skipped) - SKIPPED_PRINTED} more unreadable images ({where})", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mulclip_fast.eval", description="Retrieval Recall@1/5/10 and binding accuracy of a model."
    )
    parser.add_argument("--checkpoint", required=True, help="run directory, training checkpoint or CLIP .pt file")
    parser.add_argument(
        "--data",
        default="synthetic",
        help="synthetic | docci:PATH | sharegpt4v:PATH | dci:PATH | urban1k:PATH | coco:FILE.json | "
        "flickr30k:dataset_flickr30k.json (COCO and Flickr30k: short captions, about five per image; "
        "--split picks Karpathy's val or test images, --pairs caps the images)",
    )
    parser.add_argument("--image-root", default=None, help="folder the dataset's image paths are relative to")
    parser.add_argument(
        "--preset",
        default=None,
        choices=sorted(PRESETS),
        help="architecture of a plain CLIP checkpoint (a training checkpoint names its own)",
    )
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="FIELD=INT",
        help="a field of --preset that the plain checkpoint's run overrode, as export prints it (repeatable)",
    )
    parser.add_argument(
        "--pairs",
        type=int,
        default=1000,
        help="pairs evaluated at most, the first in file order (synthetic: generated; "
        "COCO, Flickr30k: images) (default: 1000)",
    )
    parser.add_argument("--seed", type=int, default=None, help="synthetic data seed (default: the run's)")
    parser.add_argument("--split", choices=("val", "test"), default="test", help="(default: test)")
    parser.add_argument("--batch-size", type=int, default=250, help="pairs per forward pass (default: 250)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--out", default=None, help="write the JSON here (default: print only)")
    parser.add_argument(
        "--zeroshot", default=None, help="imagefolder:PATH: also zero-shot classify PATH/CLASS_NAME/*.png|jpg|…"
    )
    return parser


def check_output_file(path: str) -> None:
    """Raise ``ValueError`` unless ``path`` is a file that can be written: checked before the evaluation,
    so that a bad ``--out`` does not cost a whole evaluation."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"--out {path} is a directory; give a file name")
    if not os.path.isdir(folder):
        raise ValueError(f"--out {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise ValueError(f"--out {path} is not writable")


def zeroshot_path(spec: str) -> str:
    """The folder of ``--zeroshot imagefolder:PATH``."""
    kind, _, path = spec.partition(":")
    if kind != "imagefolder" or not path:
        raise DataError(f"--zeroshot must be imagefolder:PATH, got {spec!r}")
    if not os.path.isdir(path):
        raise DataError(f"--zeroshot imagefolder:{path}: not a directory")
    return path


def held_out_records(config: dict, spec: str, pairs: int) -> int:
    """How many records at the end of ``spec``'s file are held out for evaluation: for the file a run trained
    on, when the file has no split of its own (ShareGPT4V), the run's ``eval_pairs`` (it trained on the rest),
    whatever ``pairs`` asks; otherwise ``pairs``."""
    kind, _, path = spec.partition(":")
    run_kind, _, run_path = config.get("data", "").partition(":")
    if kind not in HELD_OUT_BY_COUNT or (kind, os.path.realpath(path)) != (run_kind, os.path.realpath(run_path)):
        return pairs
    if not config.get("eval_pairs"):
        raise DataError(f"the run trained on every record of {path} (--eval-pairs 0): none is held out to evaluate")
    return config["eval_pairs"]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.pairs < 1 or args.batch_size < 1:
            raise DataError("--pairs and --batch-size must be >= 1")
        if args.seed is not None and args.seed < 0:
            raise DataError(f"--seed must be >= 0, got {args.seed}")
        check_device(args.device)
        if args.out:
            check_output_file(args.out)
        zeroshot_folder = zeroshot_path(args.zeroshot) if args.zeroshot else None
        model_overrides = parse_model_overrides(args.model)
        model, config = load_model_for_eval(args.checkpoint, args.preset, args.device, model_overrides)
        seed = args.seed if args.seed is not None else int(config.get("seed", 0))
        dataset = open_dataset(
            args.data,
            args.split,
            model.config.image_resolution,
            size=args.pairs,
            seed=seed,
            image_root=args.image_root,
            holdout=held_out_records(config, args.data, args.pairs),
        )
        bad_records = getattr(dataset, "bad_records", [])
        if bad_records:
            print(f"{len(bad_records)} bad records skipped, e.g. {bad_records[:3]}", file=sys.stderr)
        if len(dataset) > args.pairs:  # real files: the first --pairs held-out records
            dataset = torch.utils.data.Subset(dataset, range(args.pairs))
        short_captions = parse_data_spec(args.data)[0] in SHORT_CAPTION_SETS
        if short_captions:
            result = evaluate_multi_caption(model, dataset, args.batch_size, args.device)
        else:
            result = evaluate(model, dataset, args.batch_size, args.device)
        if zeroshot_folder:
            encoder = ClipEncoder(model, args.device, args.batch_size)
            result.update(zeroshot_image_folder(encoder, zeroshot_folder, model.config.image_resolution))
    except (DataError, CheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _print_skipped(result["skipped"], listed_in=args.out)
    print(format_multi_caption_table(result) if short_captions else format_table(result))
    if args.out:
        try:
            with open(args.out, "w") as handle:
                json.dump(result, handle, indent=2)
        except OSError as exc:  # checked before evaluating, but the file system can change meanwhile
            print(f"error: cannot write --out {args.out}: {exc.strerror}", file=sys.stderr)
            return 2
    else:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
