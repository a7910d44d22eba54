"""Loss masks for masked training: which pixels of a training image count (white) and which do not (black).

A mask comes from the image's own alpha channel (`alpha_mask`) or from a mask image with the same name in a
mask folder (by default `<train_data_dir>/_masks/`, where `helpers` writes them). It is resized, cropped and
flipped exactly as its image is, so it lines up with the latents the loss is computed on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .decode import IMAGE_EXTENSIONS
from .records import MASK_DIR as MASK_FOLDER   # beside the prepared images; underscore folders are not trained on


def find_mask(image_path: Path, mask_dir: Path) -> Path | None:
    """The mask of `image_path` in `mask_dir`: same stem, any image extension, flat or under the image's
    own subfolder name (kohya's "10_name/")."""
    for folder in (mask_dir, mask_dir / image_path.parent.name):
        for ext in sorted(IMAGE_EXTENSIONS):
            candidate = folder / f"{image_path.stem}{ext}"
            if candidate.is_file():
                return candidate
    return None


def load_mask(image_path: Path, source: str | Path) -> Image.Image | None:
    """The mask (mode "L", the image's size, EXIF rotation applied) or None when the image has none."""
    if source == "alpha":
        with Image.open(image_path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                return im.convert("RGBA").getchannel("A")
            return None
    path = find_mask(Path(image_path), Path(source))
    if path is None:
        return None
    with Image.open(path) as im:
        return ImageOps.exif_transpose(im).convert("L")


def crop_mask(mask: Image.Image | None, cover: tuple[int, int], bucket: tuple[int, int], top: int, left: int,
              flipped: bool) -> torch.Tensor:
    """(1, bh, bw) weights in [0, 1]: the mask resized to the image's cover size, cropped and flipped as the
    image was (an image without a mask counts everywhere)."""
    bw, bh = bucket
    if mask is None:
        return torch.ones(1, bh, bw)
    if mask.size != cover:
        mask = mask.resize(cover, Image.Resampling.BILINEAR)
    mask = mask.crop((left, top, left + bw, top + bh))
    t = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None]
    return t.flip(-1) if flipped else t


def mask_source(masked_loss: bool, alpha_mask: bool, mask_dir: str | None, train_data_dir: str) -> str | Path | None:
    """Where the masks come from: "alpha", a folder, or None (masked loss off). ValueError when masked loss is
    on and there are no masks to read."""
    if not masked_loss:
        return None
    if alpha_mask:
        return "alpha"
    folder = Path(mask_dir) if mask_dir else Path(train_data_dir) / MASK_FOLDER
    if not folder.is_dir():
        raise ValueError(f"masked_loss needs masks: no mask folder at {folder}. Put a mask per image there "
                         f"(same name, white = train, black = ignore), or set alpha_mask=True to use the images' "
                         "transparency")
    return folder
