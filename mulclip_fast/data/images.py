"""Image reading and CLIP preprocessing with PIL and torch (no torchvision)."""

from __future__ import annotations

import numpy as np
import torch

CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])


def _as_displayed(img):
    """``img`` turned as its EXIF Orientation tag says, as viewers and browsers (and so captioners) show it.

    Cameras store a portrait photo's pixels sideways and tag it; read as stored, the model would see it
    lying on its side while the caption says what is "on the left" of the upright photo. OpenAI's own
    preprocessing reads pixels as stored. Not ``ImageOps.exif_transpose``: it also re-encodes the EXIF
    block, which raises ``struct.error`` on some malformed tags of images that decode fine.
    """
    from PIL import ExifTags, Image

    method = {
        2: Image.Transpose.FLIP_LEFT_RIGHT,
        3: Image.Transpose.ROTATE_180,
        4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE,
        6: Image.Transpose.ROTATE_270,
        7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_90,
    }.get(img.getexif().get(ExifTags.Base.Orientation))
    return img if method is None else img.transpose(method)


def load_image(path: str, size: int) -> torch.Tensor:
    """OpenAI CLIP's preprocessing: shorter side resized to ``size`` (bicubic), centre crop, RGB, normalise.
    A photo with an EXIF Orientation tag is first turned upright, as viewers show it, and a 16-bit greyscale
    image scaled to 8 bits; otherwise the pixels are those of OpenAI's ``clip.load`` transform, bit for bit.

    Raises ``OSError``/``ValueError`` (from PIL) for a missing, truncated or corrupt file, and
    ``ValueError`` for an image above PIL's pixel limit (``Image.MAX_IMAGE_PIXELS``) or one so thin that its
    resized form would be; callers skip and count those.
    """
    from PIL import Image

    try:
        img = Image.open(path)
    except Image.DecompressionBombError as exc:  # above PIL's pixel limit: as unusable as a corrupt file
        raise ValueError(str(exc)) from None
    with img:
        img.load()  # decode now, so a truncated file fails here and not later
        img = _as_displayed(img)
        if img.mode.startswith("I;16") or img.mode == "I":
            # 16-bit greyscale (PNG, TIFF; mode I in Pillow < 10): convert("RGB") clips each level at 255,
            # which makes nearly the whole image white, so scale 0-65535 to 0-255 first.
            levels = np.clip(np.asarray(img, dtype=np.float64), 0, 65535)
            img = Image.fromarray(np.round(levels / 257).astype(np.uint8))
        w, h = img.size
        if min(w, h) < 1:
            raise ValueError(f"empty image ({w}x{h})")
        # OpenAI CLIP's transform is torchvision's Resize(size) then CenterCrop(size): the long side is
        # truncated, int(size * long / short), and the crop offsets are rounded, not floored. Rounding the
        # other way rescales or shifts the image by a pixel against what the pretrained towers saw.
        new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
        # The short side is scaled to ``size``, so a thin strip (a 20000x1 divider: 60 KB on disk) would
        # become gigabytes before the crop, and MemoryError would end the run. Held to PIL's own pixel limit,
        # as the decoded image is: one resized above it is as unusable.
        if Image.MAX_IMAGE_PIXELS is not None and new_w * new_h > Image.MAX_IMAGE_PIXELS:
            raise ValueError(
                f"image of {w}x{h} would be resized to {new_w}x{new_h} before the centre crop, above PIL's "
                f"pixel limit of {Image.MAX_IMAGE_PIXELS} (Image.MAX_IMAGE_PIXELS)"
            )
        # Resized and cropped in the file's own mode, then converted to RGB, in OpenAI's order: PIL resizes a
        # palette or 1-bit image with nearest neighbour and an image with alpha premultiplied (a transparent
        # pixel's colour does not bleed into its neighbours, and comes out black), so converting first gives
        # other pixels (tests/test_model_fidelity.py).
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
        left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
        img = img.crop((left, top, left + size, top + size)).convert("RGB")
        pixels = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (pixels - CLIP_MEAN[:, None, None]) / CLIP_STD[:, None, None]


# What PIL raises for a missing, truncated, corrupt or oversized file (``load_image``): a record to skip.
UNREADABLE_IMAGE_ERRORS = (OSError, ValueError, SyntaxError)


def try_load_image(path: str, size: int) -> tuple[torch.Tensor | None, str | None]:
    """``load_image``, or ``(None, reason)`` for a file that cannot be read, for the caller to skip and count."""
    try:
        return load_image(path, size), None
    except UNREADABLE_IMAGE_ERRORS as exc:
        return None, f"{type(exc).__name__}: {exc}"
