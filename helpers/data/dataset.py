"""Training images: folders and captions, aspect-ratio buckets, crops, caption augmentation, latent cache.

Bucketing follows kohya sd-scripts (same bucket list, same nearest-aspect choice) so a dataset
trains the same way here as there. All randomness is a pure function of (seed, epoch, index), so
a run is reproducible whatever the number of DataLoader workers or processes.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .decode import IMAGE_EXTENSIONS, read_caption_file

logger = logging.getLogger(__name__)

Bucket = tuple[int, int]  # (width, height)


# =============================================================================================
# Images on disk
# =============================================================================================

_EXIF_ORIENTATION = 0x0112
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image as it will be loaded (EXIF rotation applied), without decoding pixels."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            w, h = im.size
            try:
                orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
            except Exception:  # a broken EXIF block must not make the image unusable
                orientation = 1
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"Cannot read image {path}: {e}. Remove or re-save this file.") from e
    return (h, w) if orientation in _SWAPPING_ORIENTATIONS else (w, h)


def unreadable_message(bad: list[tuple[Path, BaseException]], total: int) -> str:
    """One message for every image of a training set that cannot be opened, with the way to a clean copy."""
    folder = Path(os.path.commonpath([str(p.parent) for p, _ in bad]))
    examples = "; ".join(f"{p.name}: {str(e).splitlines()[0][:80]}" for p, e in bad[:3])
    which = (f"none of the {total} images in {folder} can be read" if len(bad) == total
             else f"{len(bad)} of the {total} images in {folder} cannot be read")
    return (f"{which} ({examples}"
            f"{'; ...' if len(bad) > 3 else ''}). `python -m helpers prepare --source {folder} --output-dir "
            f"{folder}_prepared` lists every bad file with its reason and writes a clean copy to train on")


def load_image(path: str | Path) -> Image.Image:
    """Load an image as RGB: EXIF rotation applied, transparency composited on white, first frame of a GIF."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            try:
                im = ImageOps.exif_transpose(im)
            except Exception:
                pass
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(background, rgba).convert("RGB")
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"Cannot read image {path}: {e}. Remove or re-save this file.") from e


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 tensor (3, H, W) in [-1, 1], the range the VAE expects."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


# =============================================================================================
# Folders and captions
# =============================================================================================

@dataclass
class ImageItem:
    """One training image with its caption and how often it counts per epoch."""

    path: Path
    caption: str
    repeats: int = 1
    is_class: bool = False  # prior-preservation (class) image


KOHYA_FOLDER = re.compile(r"^(\d+)_(.*)$")


def _is_image(p: Path) -> bool:
    return p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS


def _read_caption(image_path: Path, caption_extension: str) -> str | None:
    caption_path = image_path.with_suffix(caption_extension)
    if not caption_path.is_file():
        return None
    return read_caption_file(caption_path).strip()


def load_image_folder(folder: str | Path, caption_extension: str = ".txt", default_repeats: int = 1,
                      default_caption: str = "", is_class: bool = False) -> list[ImageItem]:
    """Images of a folder with their caption files (`name.txt` beside `name.png`), kohya layout supported.

    Images directly in `folder` get `default_repeats`; a subfolder named "<N>_<name>" (e.g.
    "10_sks flower") gives its images N repeats and, as in sd-scripts, "<name>" is the caption of
    its images that have no caption file when `default_caption` is empty. Other subfolders and
    hidden files are skipped. Sorted by relative path.
    """
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"Image folder not found: {folder}")
    if not folder.is_dir():
        raise ValueError(f"Expected a folder of images, got a file: {folder}")
    if int(default_repeats) < 1:
        raise ValueError(f"default_repeats must be >= 1, got {default_repeats}")
    if caption_extension and not caption_extension.startswith("."):
        caption_extension = "." + caption_extension

    # (relative path, path, repeats, folder caption)
    found: list[tuple[str, Path, int, str]] = []
    skipped: list[str] = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue  # .ipynb_checkpoints, .DS_Store, ...
        if entry.is_dir():
            if entry.name.startswith("_"):
                continue  # _report/, _dropped/ of a prepared set
            match = KOHYA_FOLDER.match(entry.name)
            if match is None or int(match.group(1)) < 1:
                skipped.append(entry.name)
                continue
            repeats, folder_caption = int(match.group(1)), match.group(2).strip()
            for sub in sorted(entry.iterdir()):
                if _is_image(sub):
                    found.append((f"{entry.name}/{sub.name}", sub, repeats, folder_caption))
        elif _is_image(entry):
            found.append((entry.name, entry, int(default_repeats), ""))
    if skipped:
        logger.warning("Skipped subfolders of %s not named '<repeats>_<name>' (e.g. '10_sks flower'): %s",
                       folder, ", ".join(skipped))
    if not found:
        raise ValueError(
            f"No images in {folder}. Put images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in the folder itself "
            "or in subfolders named '<repeats>_<name>', e.g. '10_sks flower'.")

    items = []
    missing: list[tuple[str, str]] = []   # (relative path, the folder caption it falls back to)
    empty: list[str] = []
    for rel, path, repeats, folder_caption in sorted(found, key=lambda t: t[0]):
        caption = _read_caption(path, caption_extension) if caption_extension else None
        if caption is None:
            missing.append((rel, folder_caption))
            caption = default_caption or folder_caption
        elif not caption:
            empty.append(rel)
        items.append(ImageItem(path=path, caption=caption, repeats=repeats, is_class=is_class))
    if caption_extension and not default_caption and (missing or empty):
        warnings.warn(caption_gaps_message(folder, caption_extension, len(items), missing, empty), UserWarning,
                      stacklevel=2)
    return items


def caption_gaps_message(folder: Path, extension: str, total: int, missing: list[tuple[str, str]],
                         empty: list[str]) -> str:
    """What a training set without (some) captions trains on, and how to caption it."""
    parts = []
    if len(missing) == total:
        others = sorted({p.suffix for p in folder.rglob("*") if p.is_file() and p.suffix.lower() not in
                         IMAGE_EXTENSIONS and not p.name.startswith(".")})
        parts.append(f"no {extension} caption file beside any of the {total} images in {folder}"
                     + (f" (other files there end in {', '.join(others[:5])}: is caption_extension right?)"
                        if others else ""))
    elif missing:
        names = ", ".join(Path(rel).name for rel, _ in missing[:3])
        parts.append(f"{len(missing)} of the {total} images in {folder} have no {extension} caption (e.g. {names})")
    by_folder = [rel for rel, fc in missing if fc]
    bare = [rel for rel, fc in missing if not fc]
    if by_folder:
        parts.append(f"{len(by_folder)} in '<repeats>_<name>' folders use the folder's name as caption, "
                     "as sd-scripts does")
    if bare or empty:
        n = len(bare) + len(empty)
        what = f"{len(empty)} caption file(s) are empty" + (f" (e.g. {Path(empty[0]).name})" if empty else "")
        parts.append((what + "; " if empty else "") + f"{n} image(s) train with an empty caption, so no word "
                     "(the trigger included) is tied to them")
    return ("; ".join(parts) + f". Caption them: python -m helpers tag {folder} --captioner blip --trigger <word>"
            " (or write the .txt files yourself)")


class CaptionProcessor:
    """Caption augmentation with sd-scripts semantics: keep_tokens, tag shuffle, tag dropout, caption dropout.

    Tags are split on `separator`. The first `keep_tokens` tags stay in place (or, when
    `keep_tokens_separator` occurs in the caption, the part before it, and the part after a second
    occurrence, stay); the others are shuffled if `shuffle` and each dropped with probability
    `tag_dropout`. With probability `dropout` the whole caption becomes "". Only the first line of
    a multi-line caption is used, as in sd-scripts.
    """

    def __init__(self, shuffle: bool = False, keep_tokens: int = 0, dropout: float = 0.0,
                 tag_dropout: float = 0.0, separator: str = ",", keep_tokens_separator: str = "") -> None:
        if keep_tokens < 0:
            raise ValueError(f"keep_tokens must be >= 0, got {keep_tokens}")
        for name, value in (("dropout", dropout), ("tag_dropout", tag_dropout)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {value}")
        if not separator:
            raise ValueError("separator must not be empty")
        self.shuffle = shuffle
        self.keep_tokens = int(keep_tokens)
        self.dropout = float(dropout)
        self.tag_dropout = float(tag_dropout)
        self.separator = separator
        self.keep_tokens_separator = keep_tokens_separator

    @property
    def is_random(self) -> bool:
        """True when the output can differ between calls (what a text cache must hold: `outcomes`)."""
        return self.shuffle or self.dropout > 0 or self.tag_dropout > 0

    def outcomes(self, caption: str) -> list[str]:
        """Every text this processor can turn `caption` into, when they are few (no tag shuffle or tag
        dropout): the processed caption, and "" under whole-caption dropout. What a text cache must hold."""
        if self.shuffle or self.tag_dropout > 0:
            raise ValueError("tag shuffle and tag dropout make a new caption every step: no fixed set to cache")
        kept = CaptionProcessor(keep_tokens=self.keep_tokens, separator=self.separator,
                                keep_tokens_separator=self.keep_tokens_separator)(caption, random.Random(0))
        return [kept, ""] if self.dropout > 0 else [kept]

    def _split(self, text: str) -> list[str]:
        return [t.strip() for t in text.split(self.separator) if t.strip()]

    def __call__(self, caption: str, rng: random.Random) -> str:
        """Process one caption; the result depends only on the caption and the state of `rng`."""
        # Same order of random draws as sd-scripts: caption dropout, then shuffle, then tag dropout.
        if self.dropout > 0 and rng.random() < self.dropout:
            return ""
        caption = caption.strip().split("\n")[0].strip()
        sep = self.keep_tokens_separator
        if sep and sep in caption:
            fixed_part, flex_part = caption.split(sep, 1)
            suffix_part = ""
            if sep in flex_part:
                flex_part, suffix_part = flex_part.split(sep, 1)
            fixed, flex, suffix = self._split(fixed_part), self._split(flex_part), self._split(suffix_part)
        elif self.shuffle or self.tag_dropout > 0:
            tags = self._split(caption)
            fixed, flex, suffix = tags[: self.keep_tokens], tags[self.keep_tokens:], []
        else:
            return caption  # nothing to do: leave free text untouched
        if self.shuffle:
            rng.shuffle(flex)
        if self.tag_dropout > 0:
            flex = [t for t in flex if rng.random() >= self.tag_dropout]
        return ", ".join(fixed + flex + suffix)


# =============================================================================================
# Buckets, resize and crop
# =============================================================================================

def _as_wh(resolution: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(resolution, (int, np.integer)):
        return int(resolution), int(resolution)
    w, h = resolution
    return int(w), int(h)


def make_buckets(resolution: int | tuple[int, int] = 512, min_size: int = 256, max_size: int = 1024,
                 step: int = 64) -> list[tuple[int, int]]:
    """(width, height) buckets of area <= resolution^2, the same list sd-scripts' make_bucket_resolutions builds.

    A square bucket, then for each width from min_size to max_size (by `step`) the tallest
    step-multiple height that keeps the area within budget (capped at max_size), both ways round.
    sd-scripts' defaults are min 256 / max 1024 / step 64 for every family; at SDXL's 1024 that caps
    the long side at 1024, so SDXL configs usually raise max_size to 2048. `resolution` may be
    (width, height).
    """
    width, height = _as_wh(resolution)
    if step <= 0:
        raise ValueError(f"bucket step must be > 0, got {step}")
    if min_size < step:
        raise ValueError(f"min bucket size {min_size} must be at least the bucket step {step}")
    if min_size > max_size:
        raise ValueError(f"min bucket size {min_size} is larger than max bucket size {max_size}")
    if max(width, height) > max_size:
        raise ValueError(f"max bucket size {max_size} must be >= the resolution {width}x{height}")
    if min(width, height) < min_size:
        raise ValueError(f"min bucket size {min_size} must be <= the resolution {width}x{height}")
    max_area = width * height
    side = int(math.sqrt(max_area) // step) * step
    buckets = {(side, side)}
    w = min_size
    while w <= max_size:
        h = min(max_size, (max_area // w) // step * step)
        if h >= min_size:
            buckets.add((w, h))
            buckets.add((h, w))
        w += step
    return sorted(buckets)


def _round_to_step(x: float, step: int) -> int:
    x = int(x + 0.5)
    return x - x % step


def select_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]], resolution: int | tuple[int, int],
                  no_upscale: bool = False, step: int = 64) -> tuple[int, int]:
    """The (width, height) bucket for an image, chosen as sd-scripts' BucketManager.select_bucket does.

    Normally: the image's own size if it is a bucket, else the bucket of nearest aspect ratio
    (first in list order on a tie). With `no_upscale`: the image's own size rounded down to `step`,
    after an aspect-preserving shrink to area resolution^2 if it is larger (`buckets` is unused);
    never below `step` on a side (sd-scripts would make a 0-pixel bucket there).
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    aspect = width / height
    if not no_upscale:
        if not buckets:
            raise ValueError("no buckets to choose from")
        if (width, height) in set(map(tuple, buckets)):
            return (int(width), int(height))
        errors = [abs(bw / bh - aspect) for bw, bh in buckets]
        best = min(range(len(errors)), key=errors.__getitem__)  # first index of the minimum, like argmin
        bw, bh = buckets[best]
        return (int(bw), int(bh))

    rw, rh = _as_wh(resolution)
    max_area = rw * rh
    if width * height > max_area:
        # Shrink keeping the aspect ratio; round the side whose rounding distorts the ratio less.
        resized_w = math.sqrt(max_area * aspect)
        resized_h = max_area / resized_w
        w_rounded = _round_to_step(resized_w, step)
        h_in_wr = _round_to_step(w_rounded / aspect, step)
        h_rounded = _round_to_step(resized_h, step)
        w_in_hr = _round_to_step(h_rounded * aspect, step)
        ar_w = w_rounded / h_in_wr if h_in_wr else math.inf
        ar_h = w_in_hr / h_rounded if h_rounded else math.inf
        if abs(ar_w - aspect) < abs(ar_h - aspect):
            size = (w_rounded, int(w_rounded / aspect + 0.5))
        else:
            size = (int(h_rounded * aspect + 0.5), h_rounded)
    else:
        size = (width, height)
    return (max(step, size[0] - size[0] % step), max(step, size[1] - size[1] % step))


def cover_size(width: int, height: int, bucket: Bucket) -> tuple[int, int]:
    """Smallest aspect-preserving (width, height) that covers the bucket (sd-scripts' rounding)."""
    bw, bh = bucket
    scale = max(bw / width, bh / height)
    return max(bw, int(width * scale + 0.5)), max(bh, int(height * scale + 0.5))


def resize_and_crop(image: Image.Image, bucket: tuple[int, int], crop: str = "center",
                    rng: random.Random | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """Scale `image` to cover the (width, height) bucket, then crop to it; returns (image, (crop_top, crop_left)).

    The crop offsets are in the resized image's pixels (what SDXL's crop conditioning wants).
    crop="random" draws the offsets from `rng` (a fresh Random when None).
    """
    if crop not in ("center", "random"):
        raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
    bw, bh = int(bucket[0]), int(bucket[1])
    rw, rh = cover_size(image.width, image.height, (bw, bh))
    if (rw, rh) != image.size:
        image = image.resize((rw, rh), Image.Resampling.LANCZOS, reducing_gap=3.0)
    if crop == "center":
        top, left = (rh - bh) // 2, (rw - bw) // 2
    else:
        rng = rng or random.Random()
        top, left = rng.randint(0, rh - bh), rng.randint(0, rw - bw)
    if (rw, rh) != (bw, bh):
        image = image.crop((left, top, left + bw, top + bh))
    return image, (top, left)


# =============================================================================================
# Training dataset
# =============================================================================================

def _derived_rng(*parts: object) -> random.Random:
    """A Random seeded from the parts' text: identical in every process, independent of PYTHONHASHSEED."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_CACHE_FORMAT = "sd-lora-helpers/latents/1"


def _warn_stale_cache(stale: list[tuple[str, list[str]]], cache_dir: Path | None) -> None:
    """Say which cached latents no longer match their images (and why) before they are re-encoded."""
    why = {"source_size": "the image file changed", "source_sha256": "the image file changed",
           "bucket": "its bucket changed (resolution or bucket settings)", "encoder_id": "another VAE or model",
           "format": "an older cache format", "crop": "another crop"}
    reasons = sorted({why.get(k, k) for _, keys in stale for k in keys})
    names = ", ".join(Path(p).name for p, _ in stale[:5]) + (f" and {len(stale) - 5} more" if len(stale) > 5 else "")
    warnings.warn(f"The dataset changed since its latent cache in {cache_dir} was written: {len(stale)} cached "
                  f"latent(s) no longer match ({'; '.join(reasons)}): {names}. Re-encoding them now; the stale "
                  f"files are replaced.", UserWarning, stacklevel=3)


class TrainDataset(torch.utils.data.Dataset):
    """One entry per (item, repeat); each entry has a bucket, a processed caption and, optionally, cached latents.

    Flips, crops and caption randomness are a pure function of (seed, epoch, index): call
    `set_epoch` before each epoch (in the main process, with DataLoader persistent_workers=False so
    workers see it). Without bucketing every image goes to the resolution x resolution bucket.
    """

    def __init__(self, items: list[ImageItem], resolution: int = 512, enable_bucket: bool = True,
                 min_bucket_reso: int = 256, max_bucket_reso: int = 1024, bucket_reso_steps: int = 64,
                 bucket_no_upscale: bool = False, flip: bool = False,
                 caption_processor: CaptionProcessor | None = None, seed: int = 0,
                 random_crop: bool = False, mask_source: str | Path | None = None) -> None:
        if not items:
            raise ValueError("The dataset has no images.")
        for item in items:
            if int(item.repeats) < 1:
                raise ValueError(f"repeats must be >= 1, got {item.repeats} for {item.path}")
        self.items = list(items)
        self.resolution = _as_wh(resolution)
        self.enable_bucket = enable_bucket
        self.bucket_no_upscale = bucket_no_upscale
        self.bucket_reso_steps = bucket_reso_steps
        self.flip = flip
        self.random_crop = random_crop
        self.caption_processor = caption_processor or CaptionProcessor()
        self.mask_source = mask_source   # "alpha", a mask folder, or None: no loss masks (helpers.data.masks)
        self.seed = int(seed)
        self.epoch = 0

        if enable_bucket and not bucket_no_upscale:
            # sd-scripts rounds min down and max up to the step before building buckets.
            lo = min_bucket_reso - min_bucket_reso % bucket_reso_steps
            hi = max_bucket_reso + (-max_bucket_reso) % bucket_reso_steps
            if (lo, hi) != (min_bucket_reso, max_bucket_reso):
                logger.warning("Bucket min/max %s/%s rounded to multiples of %s: %s/%s",
                               min_bucket_reso, max_bucket_reso, bucket_reso_steps, lo, hi)
            self.predefined_buckets: list[Bucket] | None = make_buckets(self.resolution, lo, hi, bucket_reso_steps)
        else:
            self.predefined_buckets = None

        self.sizes: list[tuple[int, int]] = []   # (width, height) of each item's source, EXIF-rotated
        self.item_buckets: list[Bucket] = []
        unreadable: list[tuple[Path, BaseException]] = []
        for item in self.items:
            try:
                w, h = image_size(item.path)
            except ValueError as e:
                unreadable.append((Path(item.path), e.__cause__ or e))
                continue
            self.sizes.append((w, h))
            if not enable_bucket:
                bucket = self.resolution
            else:
                bucket = select_bucket(w, h, self.predefined_buckets or [], self.resolution,
                                       no_upscale=bucket_no_upscale, step=bucket_reso_steps)
            self.item_buckets.append(bucket)

        if unreadable:
            raise ValueError(unreadable_message(unreadable, len(self.items)))
        self.entries: list[int] = [i for i, item in enumerate(self.items) for _ in range(int(item.repeats))]
        # In-memory latents, keyed by (resolved source path, bucket): (latents, flipped latents or None).
        self._latent_keys: list[tuple[str, Bucket]] = [
            (str(Path(item.path).resolve()), bucket) for item, bucket in zip(self.items, self.item_buckets)]
        self._latents: dict[tuple[str, Bucket], tuple[torch.Tensor, torch.Tensor | None]] = {}

    # ---- indexing -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.entries)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose flips and captions `__getitem__` returns."""
        self.epoch = int(epoch)

    def item_of(self, index: int) -> ImageItem:
        """The ImageItem behind dataset entry `index`."""
        return self.items[self.entries[index]]

    def bucket_of(self, index: int) -> tuple[int, int]:
        """(width, height) bucket of dataset entry `index`."""
        return self.item_buckets[self.entries[index]]

    @property
    def buckets(self) -> list[tuple[int, int]]:
        """The buckets in use, sorted."""
        return sorted(set(self.item_buckets))

    @property
    def latents_cached(self) -> bool:
        """True when every image has latents in memory (so `__getitem__` returns latents)."""
        need_flip = self.flip
        return all(key in self._latents and (not need_flip or self._latents[key][1] is not None)
                   for key in self._latent_keys)

    def _entry_flips(self, index: int) -> bool:
        return self.flip and _derived_rng(self.seed, self.epoch, index, "flip").random() < 0.5

    def __getitem__(self, index: int) -> dict:
        return self.example(index)

    def example(self, index: int, augment: bool = True) -> dict:
        """Entry `index` as the trainer sees it; `augment=False` gives the plain image (no flip,
        centre crop) with its caption unprocessed, for fixed validation batches."""
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)}")
        item_idx = self.entries[index]
        item = self.items[item_idx]
        bw, bh = self.item_buckets[item_idx]
        flipped = augment and self._entry_flips(index)
        processor = self.caption_processor if augment else CaptionProcessor()
        caption = processor(item.caption, _derived_rng(self.seed, self.epoch, index, "caption"))
        example: dict = {"caption": caption, "target_size": (bh, bw), "is_class": bool(item.is_class), "index": index}

        cached = self._latents.get(self._latent_keys[item_idx])
        if cached is not None and (not flipped or cached[1] is not None):
            w, h = self.sizes[item_idx]
            rw, rh = cover_size(w, h, (bw, bh))
            top, left = (rh - bh) // 2, (rw - bw) // 2
            example["latents"] = cached[1] if flipped else cached[0]
        else:
            image = load_image(item.path)
            w, h = image.size
            rw, rh = cover_size(w, h, (bw, bh))
            crop_rng = _derived_rng(self.seed, self.epoch, index, "crop")
            crop = "random" if self.random_crop and augment else "center"
            image, (top, left) = resize_and_crop(image, (bw, bh), crop, crop_rng)
            pixels = image_to_tensor(image)
            if flipped:
                pixels = pixels.flip(-1)
            example["pixel_values"] = pixels
        if self.mask_source is not None:
            from .masks import crop_mask, load_mask

            mask = None if item.is_class else load_mask(Path(item.path), self.mask_source)
            example["mask"] = crop_mask(mask, (rw, rh), (bw, bh), top, left, flipped)
        if flipped:
            left = rw - left - bw  # where the crop lies in the mirrored resized image
        example["original_size"] = (h, w)
        example["crop_top_left"] = (top, left)
        return example

    # ---- latent cache -------------------------------------------------------------------------

    def _cache_path(self, cache_dir: Path, item_idx: int) -> Path:
        path_key, (bw, bh) = self._latent_keys[item_idx]
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(path_key).stem)[:60]
        digest = hashlib.sha1(path_key.encode()).hexdigest()[:10]
        return cache_dir / f"{stem}-{digest}-{bw}x{bh}.safetensors"

    def _load_cache_file(self, file: Path, expected: dict[str, str]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """Latents from a cache file if it matches `expected` metadata and holds what is needed, else None."""
        from safetensors import safe_open

        if not file.is_file():
            return None
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                stale = [k for k, v in expected.items() if meta.get(k) != v]
                if stale:
                    self._stale_cache.append((meta.get("source_path") or file.name, stale))
                    return None
                keys = set(f.keys())
                if "latents" not in keys or (self.flip and "latents_flipped" not in keys):
                    return None
                latents = f.get_tensor("latents")
                flipped = f.get_tensor("latents_flipped") if "latents_flipped" in keys else None
        except Exception as e:  # truncated or foreign file: re-encode rather than fail or trust it
            logger.warning("Ignoring unreadable latent cache %s (%s); re-encoding", file, e)
            return None
        return latents.float(), (flipped.float() if flipped is not None else None)

    def cache_latents(self, encode_fn: Callable[[torch.Tensor], torch.Tensor], cache_dir: str | Path | None = None,
                      batch_size: int = 4, show_progress: bool = True, encoder_id: str = "") -> None:
        """Encode every distinct image once (and its mirror when flip=True) so `__getitem__` returns latents.

        `encode_fn` maps pixels (B, 3, H, W) float32 in [-1, 1] to scaled latents (B, C, h, w);
        same-bucket images are batched. With `cache_dir`, latents are also kept on disk, one
        safetensors file per image and bucket, and re-used only if the source file's size and sha256,
        the bucket and `encoder_id` (name the VAE and its scaling here, so a cache made with another
        model is never used) all still match; anything else is re-encoded.
        """
        from tqdm.auto import tqdm

        from ..atomic import save_safetensors

        if self.random_crop:
            raise ValueError("Latents can't be cached with random_crop: each epoch crops differently. "
                             "Turn off random_crop or latent caching.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        cache_path = Path(cache_dir) if cache_dir is not None else None
        if cache_path is not None:
            cache_path.mkdir(parents=True, exist_ok=True)

        self._stale_cache: list[tuple[str, list[str]]] = []
        # One representative item per distinct (image, bucket).
        todo: dict[Bucket, list[int]] = defaultdict(list)
        file_meta: dict[int, dict[str, str]] = {}
        seen: set[tuple[str, Bucket]] = set()
        for item_idx, key in enumerate(self._latent_keys):
            if key in seen:
                continue
            seen.add(key)
            have = self._latents.get(key)
            if have is not None and (not self.flip or have[1] is not None):
                continue
            if cache_path is not None:
                path = Path(key[0])
                stat = path.stat()
                bw, bh = key[1]
                meta = {"format": _CACHE_FORMAT, "source_size": str(stat.st_size),
                        "source_sha256": _file_sha256(path), "bucket": f"{bw}x{bh}",
                        "crop": "center", "encoder_id": encoder_id}
                loaded = self._load_cache_file(self._cache_path(cache_path, item_idx), meta)
                if loaded is not None:
                    self._latents[key] = loaded
                    continue
                file_meta[item_idx] = {**meta, "source_path": key[0], "source_mtime_ns": str(stat.st_mtime_ns),
                                       "flip": "1" if self.flip else "0"}
            todo[key[1]].append(item_idx)

        if self._stale_cache:
            _warn_stale_cache(self._stale_cache, cache_path)
        total = sum(len(v) for v in todo.values())
        if total == 0:
            return
        bar = tqdm(total=total, desc="caching latents", unit="img", disable=not show_progress)
        try:
            for bucket in sorted(todo):
                indices = todo[bucket]
                for start in range(0, len(indices), batch_size):
                    chunk = indices[start:start + batch_size]
                    pixels = torch.stack([image_to_tensor(resize_and_crop(load_image(self.items[i].path), bucket)[0])
                                          for i in chunk])
                    latents = self._encode(encode_fn, pixels)
                    flipped = self._encode(encode_fn, pixels.flip(-1)) if self.flip else None
                    for j, item_idx in enumerate(chunk):
                        lat = latents[j].clone()
                        lat_f = flipped[j].clone() if flipped is not None else None
                        self._latents[self._latent_keys[item_idx]] = (lat, lat_f)
                        if cache_path is not None:
                            tensors = {"latents": lat.contiguous()}
                            if lat_f is not None:
                                tensors["latents_flipped"] = lat_f.contiguous()
                            target = self._cache_path(cache_path, item_idx)
                            save_safetensors(tensors, target, metadata=file_meta[item_idx])
                    bar.update(len(chunk))
        finally:
            bar.close()

    @staticmethod
    def _encode(encode_fn: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = encode_fn(pixels)
        if not isinstance(out, torch.Tensor) or out.ndim != 4 or out.shape[0] != pixels.shape[0]:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"encode_fn must return latents (B, C, h, w) for B={pixels.shape[0]} images, got {shape}")
        return out.detach().to("cpu", torch.float32)


# =============================================================================================
# Batching
# =============================================================================================

class BucketBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of dataset indices that share one bucket; the order is a pure function of (seed, epoch).

    Like sd-scripts: shuffle the entries within each bucket, cut them into batches, shuffle the
    batch order. Instance and class (prior-preservation) entries are treated alike.
    """

    def __init__(self, dataset: TrainDataset, batch_size: int, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        groups: dict[Bucket, list[int]] = defaultdict(list)
        for index in range(len(dataset)):
            groups[dataset.bucket_of(index)].append(index)
        self.groups: list[tuple[Bucket, list[int]]] = sorted(groups.items())

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batch order `__iter__` yields."""
        self.epoch = int(epoch)

    def _batches(self) -> list[list[int]]:
        rng = _derived_rng(self.seed, self.epoch, "batches")
        batches = []
        for _, indices in self.groups:
            indices = list(indices)
            if self.shuffle:
                rng.shuffle(indices)
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start:start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        if self.drop_last:
            return sum(len(ix) // self.batch_size for _, ix in self.groups)
        return sum(math.ceil(len(ix) / self.batch_size) for _, ix in self.groups)


def collate(examples: list[dict]) -> dict:
    """Stack a list of `TrainDataset` examples into a batch (captions stay a list of str)."""
    if not examples:
        raise ValueError("collate got an empty batch")
    batch: dict = {}
    for key in ("pixel_values", "latents", "mask"):
        present = [key in e for e in examples]
        if any(present):
            if not all(present):
                raise ValueError(f"Batch mixes examples with and without {key!r}; cache latents for every image.")
            batch[key] = torch.stack([e[key] for e in examples])
    batch["captions"] = [e["caption"] for e in examples]
    for key in ("original_size", "crop_top_left", "target_size"):
        batch[key] = torch.tensor([list(e[key]) for e in examples], dtype=torch.long)
    batch["is_class"] = torch.tensor([bool(e["is_class"]) for e in examples], dtype=torch.bool)
    batch["index"] = torch.tensor([int(e["index"]) for e in examples], dtype=torch.long)
    return batch


def bucket_table(dataset: TrainDataset) -> list[tuple[tuple[int, int], int]]:
    """(bucket, number of entries including repeats) per bucket in use, sorted by bucket, for display."""
    counts: dict[Bucket, int] = defaultdict(int)
    for index in range(len(dataset)):
        counts[dataset.bucket_of(index)] += 1
    return sorted(counts.items())
