"""Why did binding stay at chance on the synthetic data? Measurements: docs/notes/2026-11-27-binding.md.

Binding accuracy (``mulclip_fast.eval``) asks whether an image's true caption scores above the same
caption with two objects' colours swapped. It needs both towers to encode *which colour goes with which
shape*, not just which colours and shapes occur.

``twins``: for a trained run, how far each tower separates a sample from its colour-swapped twin:
``cos(text(caption), text(probe))`` and ``cos(image, image of the swapped scene rendered)``, next to the
cosine of unrelated samples. Values near 1 mean that tower encodes a bag of attributes.

    python examples/binding_diagnostic.py twins --checkpoint runs/default

``oracle``: can ONE tower of a fresh ``tiny`` model learn binding when the other side is replaced by a
fixed code that is binding-aware by construction? The code of a scene is the normalised sum over its
objects of random vectors indexed by (colour, shape) and by (colour, grid cell): swapping two colours
changes it. The tower trains with the symmetric InfoNCE of the global loss (batch 32, binding twins in
half the batches' pairs, AdamW 5e-4 with warm-up and cosine decay, the trainer's settings), then binding
accuracy and Recall@5 against the codes are measured on held-out test scenes.

    python examples/binding_diagnostic.py oracle --tower image --steps 300
    python examples/binding_diagnostic.py oracle --tower text --steps 300 [--text-alibi 0]

``attention``: where a trained text tower looks from each shape word (``circle`` in "a red circle"):
the mean attention weight on the word right before it, per layer and head, next to what an even spread
over the causal prefix would give. A tower that binds colours to shapes needs a head that reads the
previous word; without the tiny preset's ALiBi biases none formed within the default run.

    python examples/binding_diagnostic.py attention --checkpoint runs/default

Each prints a JSON summary as its last line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
import torch.nn.functional as F

from mulclip_fast.data.synthetic import COLOURS, SHAPES, SceneObject, SyntheticLongCaptions
from mulclip_fast.data.text import CLIPTokenizer, trim_to_longest
from mulclip_fast.eval import binding_accuracy, embed_dataset, load_model_for_eval, recall_at_k
from mulclip_fast.model.clip import CLIP, Transformer, preset_config

_tokenizer = CLIPTokenizer()


def tokenize(captions: list[str]) -> torch.Tensor:
    return trim_to_longest(_tokenizer.tokenize(captions))


def mean_off_diagonal(similarity: torch.Tensor) -> float:
    n = similarity.shape[0]
    return float((similarity.sum() - similarity.diagonal().sum()) / (n * (n - 1)))


@torch.no_grad()
def twins(args: argparse.Namespace) -> dict:
    model, _ = load_model_for_eval(args.checkpoint, args.preset, "cpu")
    model.eval()
    dataset = SyntheticLongCaptions(args.pairs, seed=args.seed, split="test", image_size=model.config.image_resolution)
    emb = embed_dataset(model, dataset)  # what python -m mulclip_fast.eval scores: image, long caption, probe
    # The probe scene (two objects' colours swapped) drawn with the sample's own pixel noise and jitter.
    twin_scenes = [dataset.image(dataset.probe_objects(dataset.scene(i), i), i) for i in range(args.pairs)]
    twin_image = F.normalize(model.encode_image(torch.stack(twin_scenes)).float(), dim=-1)
    image, caption, probe = emb["image"], emb["long"], emb["probe"]
    return {
        "pairs": args.pairs,
        "cos_caption_probe": float((caption * probe).sum(-1).mean()),
        "cos_caption_unrelated": mean_off_diagonal(caption @ caption.T),
        "cos_image_twin_image": float((image * twin_image).sum(-1).mean()),
        "cos_image_unrelated": mean_off_diagonal(image @ image.T),
        "binding_acc": binding_accuracy(image, caption, probe),
    }


class BindingCode:
    """A fixed, binding-aware embedding of a scene: normalise(Σ_objects R[colour, shape] + R'[colour, cell])."""

    def __init__(self, dim: int, seed: int = 123):
        generator = torch.Generator().manual_seed(seed)
        self.colour_shape = torch.randn(len(COLOURS), len(SHAPES), dim, generator=generator)
        self.colour_cell = torch.randn(len(COLOURS), 9, dim, generator=generator)
        self.colours = list(COLOURS)

    def __call__(self, objects: list[SceneObject]) -> torch.Tensor:
        total = 0
        for obj in objects:
            colour = self.colours.index(obj.colour)
            total = total + self.colour_shape[colour, SHAPES.index(obj.shape)] + self.colour_cell[colour, obj.cell]
        return F.normalize(total, dim=-1)


def oracle(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    model = CLIP(preset_config("tiny", text_alibi=args.text_alibi))
    code = BindingCode(model.config.embed_dim)
    train = SyntheticLongCaptions(args.steps * args.batch_size, seed=args.seed, split="train", twin_fraction=0.5)
    test = SyntheticLongCaptions(args.pairs, seed=args.seed, split="test")

    def encode(items: list[dict], key: str) -> torch.Tensor:
        if args.tower == "image":
            return F.normalize(model.encode_image(torch.stack([it["image"] for it in items])), dim=-1)
        return F.normalize(model.encode_text(tokenize([it[key] for it in items])), dim=-1)

    trained = [p for name, p in model.named_parameters() if name.startswith("visual") == (args.tower == "image")]
    optimizer = torch.optim.AdamW(trained, lr=args.lr, weight_decay=0.1)
    warmup = max(1, args.steps // 10)
    logit_scale, labels = 1 / 0.07, torch.arange(args.batch_size)
    start, first_loss, loss = time.perf_counter(), None, torch.tensor(float("nan"))
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        indices = range(step * args.batch_size, (step + 1) * args.batch_size)  # in order: twins stay together
        features = encode([train[i] for i in indices], "caption")
        targets = torch.stack([code(train.scene(i)) for i in indices])
        logits = logit_scale * features @ targets.T
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        first_loss = loss.item() if first_loss is None else first_loss
    model.eval()
    with torch.no_grad():
        items = [test[i] for i in range(args.pairs)]
        true_code = torch.stack([code(test.scene(i)) for i in range(args.pairs)])
        probe_code = torch.stack([code(test.probe_objects(test.scene(i), i)) for i in range(args.pairs)])
        features = encode(items, "caption")
        if args.tower == "image":  # the image against its scene's code and the swapped scene's code
            binding = binding_accuracy(features, true_code, probe_code)
        else:  # the scene's code against the caption and the swapped caption
            binding = binding_accuracy(true_code, features, encode(items, "probe"))
        recall5 = recall_at_k(features @ true_code.T, ks=(5,))["t2i_r5"]  # tower output → the true code
    return {
        "tower": args.tower,
        "text_alibi": args.text_alibi,
        "steps": args.steps,
        "seconds": round(time.perf_counter() - start, 1),
        "first_loss": first_loss,
        "last_loss": loss.item(),
        "pairs": args.pairs,
        "binding_acc": binding,
        "r5_against_codes": recall5,
        "probe_codes_differ": float(((true_code - probe_code).norm(dim=-1) > 1e-6).float().mean()),
    }


def attention_weights(transformer: Transformer, x: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's attention probabilities ``[B, heads, n, n]`` for the text tower's input ``x``: the
    computation of ``SelfAttention`` (causal mask plus the ALiBi biases, if any) with the softmax kept."""
    n = x.shape[1]
    alibi = None if transformer.alibi is None else transformer.alibi[:, :n, :n]
    bias = torch.full((n, n), float("-inf")).triu(1) if alibi is None else alibi  # alibi holds the causal mask
    weights = []
    for block in transformer.resblocks:
        q, k, _ = block.attn.project(block.ln_1(x))
        weights.append((q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias).softmax(-1))
        x = block(x, transformer.causal, alibi)
    return weights


@torch.no_grad()
def attention(args: argparse.Namespace) -> dict:
    model, _ = load_model_for_eval(args.checkpoint, args.preset, "cpu")
    model.eval()
    dataset = SyntheticLongCaptions(args.pairs, seed=args.seed, split="test")
    ids = tokenize([dataset[i]["caption"] for i in range(args.pairs)])
    shape_ids = _tokenizer.tokenize(list(SHAPES), 3)[:, 1]  # each shape name is one BPE token
    # Shape words after position 1, whose previous word is (in every sentence of the captions) a colour.
    is_shape = torch.isin(ids, shape_ids)
    is_shape[:, :2] = False
    x = model.token_embedding(ids) + model.positional_embedding[: ids.shape[1]]
    batch, position = is_shape.nonzero(as_tuple=True)
    previous = [
        [round(float(w[batch, h, position, position - 1].mean()), 3) for h in range(w.shape[1])]
        for w in attention_weights(model.transformer, x)
    ]
    return {
        "pairs": args.pairs,
        "text_alibi": model.config.text_alibi,
        "shape_words": int(is_shape.sum()),
        "previous_word_attention": previous,  # [layer][head]
        "even_spread": round(float((1 / (position + 1).float()).mean()), 3),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=500, help="held-out test pairs measured")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    commands = parser.add_subparsers(dest="command", required=True)
    twin = commands.add_parser("twins", help="twin cosines of a trained run")
    twin.add_argument("--checkpoint", required=True, help="run directory, training checkpoint or OpenAI-layout file")
    twin.add_argument("--preset", default=None, help="preset of a plain OpenAI-layout checkpoint")
    orc = commands.add_parser("oracle", help="train one tower against binding-aware codes")
    orc.add_argument("--tower", choices=("image", "text"), required=True)
    orc.add_argument("--steps", type=int, default=300)
    orc.add_argument("--batch-size", type=int, default=32)
    orc.add_argument("--lr", type=float, default=5e-4)
    orc.add_argument("--text-alibi", type=int, choices=(0, 1), default=1, help="the tiny text tower's ALiBi biases")
    att = commands.add_parser("attention", help="how much a text tower's shape words look at the word before")
    att.add_argument("--checkpoint", required=True, help="run directory, training checkpoint or OpenAI-layout file")
    att.add_argument("--preset", default=None, help="preset of a plain OpenAI-layout checkpoint")
    args = parser.parse_args(argv)
    if args.pairs < 2:
        parser.error("--pairs must be >= 2")
    if args.command == "oracle" and (args.steps < 1 or args.batch_size < 2):
        parser.error("--steps must be >= 1 and --batch-size >= 2")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps({"twins": twins, "oracle": oracle, "attention": attention}[args.command](args)))


if __name__ == "__main__":
    sys.exit(main())
