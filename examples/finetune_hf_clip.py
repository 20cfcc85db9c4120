"""Fine-tune a Hugging Face ``transformers`` CLIP with the MulCLIP loss, on the built-in synthetic long captions.

Everything MulCLIP adds to a plain CLIP fine-tuning loop is marked ``# MulCLIP``: stretch the text
positions to 248, extract token features, calibrate them, and call the ClipLoss-style loss with them.

    python examples/finetune_hf_clip.py                       # tiny random CLIP, CPU, about a minute
    python examples/finetune_hf_clip.py --pretrained ./clip-vit-base-patch16 --steps 200 --device cuda

``--pretrained`` takes a local directory saved by ``CLIPModel.save_pretrained`` (or a Hub name, if this
machine can download). The script prints one line per step and, last, a JSON summary with the mean loss
of the first and of the last pass over the (small, repeated) training set.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from mulclip_fast.data import Collator, SyntheticLongCaptions, iterate_batches
from mulclip_fast.integrations import MulCLIPClipLoss, as_clip_loss_inputs, calibrate, hf, token_calibrations

OPENAI_SOT, OPENAI_EOT = 49406, 49407  # the ids of CLIP's BPE, which the synthetic data is tokenised with


def tiny_clip(image_size: int, width: int, layers: int):
    """A small randomly initialised ``CLIPModel`` with OpenAI CLIP's vocabulary (no download)."""
    from transformers import CLIPConfig, CLIPModel

    heads = max(1, width // 32)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=49408,
            hidden_size=width,
            intermediate_size=4 * width,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=77,
            bos_token_id=OPENAI_SOT,
            eos_token_id=OPENAI_EOT,
            pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=width,
            intermediate_size=4 * width,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            image_size=image_size,
            patch_size=8,
        ),
        projection_dim=width,
    )
    return CLIPModel(config)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrained", help="local CLIPModel directory (default: a tiny random CLIP)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches-per-pass", type=int, default=2, help="training set size, in batches")
    parser.add_argument("--image-size", type=int, default=32, help="tiny model only (a checkpoint has its own)")
    parser.add_argument("--width", type=int, default=64, help="tiny model only")
    parser.add_argument("--layers", type=int, default=2, help="tiny model only")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-subcaptions", type=int, default=4)
    parser.add_argument("--backend", default="auto", choices=("auto", "torch", "triton", "reference"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "batches_per_pass", "max_subcaptions"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.batch_size < 2:
        parser.error("--batch-size must be >= 2: the contrastive terms need negatives")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if args.pretrained:
        from transformers import CLIPModel

        model = CLIPModel.from_pretrained(args.pretrained)
    else:
        model = tiny_clip(args.image_size, args.width, args.layers)
    hf.stretch_text_positions(model)  # MulCLIP: 77 -> 248 text positions (Long-CLIP), first 20 frozen
    model.to(args.device).train()
    image_size = model.config.vision_config.image_size
    patches = (image_size // model.config.vision_config.patch_size) ** 2
    width = model.config.projection_dim

    # MulCLIP: local token calibration of patches and words, N' = ⌊0.2·P⌋ calibrated tokens each.
    n_calibrated = max(1, int(0.2 * patches))
    image_calibration, text_calibration = (m.to(args.device) for m in token_calibrations(width, n_calibrated))
    loss_fn = MulCLIPClipLoss(objective="mulclip", backend=args.backend)  # MulCLIP

    # The stretched position table stays out of weight decay: AdamW's decoupled decay would shrink the
    # frozen first 20 rows, whose gradient is zero.
    no_decay = [p for n, p in model.named_parameters() if n.endswith(("bias", "position_embedding.weight"))]
    no_decay += [p for n, p in model.named_parameters() if "norm" in n or n == "logit_scale"]
    no_decay_ids = {id(p) for p in no_decay}
    decay = [p for p in model.parameters() if id(p) not in no_decay_ids]
    calibration_params = [*image_calibration.parameters(), *text_calibration.parameters()]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": 0.1},
            {"params": list({id(p): p for p in no_decay}.values()) + calibration_params, "weight_decay": 0.0},
        ],
        lr=args.lr,
    )

    dataset = SyntheticLongCaptions(size=args.batch_size * args.batches_per_pass, seed=args.seed, image_size=image_size)
    batches = iterate_batches(dataset, Collator(max_subcaptions=args.max_subcaptions), args.batch_size, args.seed)
    losses, started = [], time.perf_counter()
    for step, _, batch in batches:
        if step >= args.steps:
            break
        batch = batch.to(args.device)
        # MulCLIP: CLS / patches / EOT / words from the model, summary and subcaption EOTs, then calibration.
        features = hf.mulclip_features(
            model,
            batch.images,
            batch.long_ids,
            short_ids=batch.short_ids,
            sub_ids=batch.sub_ids,
            sub_mask=batch.sub_mask,
        )
        features = calibrate(features, image_calibration, text_calibration)
        logit_scale = model.logit_scale.exp().clamp(max=100)
        terms = loss_fn(**as_clip_loss_inputs(features), logit_scale=logit_scale, output_dict=True)
        loss = sum(terms.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        shown = "  ".join(f"{name.removesuffix('_loss')} {value.item():.3f}" for name, value in terms.items())
        print(f"step {step + 1:4d}/{args.steps}  loss {loss.item():.4f}  ({shown})", flush=True)

    per_pass = args.batches_per_pass
    first, last = losses[:per_pass], losses[-per_pass:]
    summary = {
        "steps": len(losses),
        "first_pass_loss": sum(first) / len(first),
        "last_pass_loss": sum(last) / len(last),
        "seconds": round(time.perf_counter() - started, 2),
        "backend": args.backend,
    }
    if not all(math.isfinite(x) for x in losses):
        raise SystemExit(f"non-finite loss: {losses}")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
