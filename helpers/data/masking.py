"""Loss masks for masked training, made for a prepared set: from the photo's transparency, from the detected face,
or from a text prompt with CLIPSeg (transformers' CLIPSegForImageSegmentation).

A mask is a greyscale PNG with the prepared image's size and name under `<prepared>/_masks/` (kohya folders
kept), white = train, black = ignore: the layout the trainer reads with `masked_loss=True` (train/masks). The
manifest records each image's mask. `mask_sheet` draws image, mask and overlay side by side to check them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..atomic import atomic_path
from ..drawing import fit_thumbnail
from .faces import FaceBox
from .records import MASK_DIR

logger = logging.getLogger(__name__)

DEFAULT_CLIPSEG = "CIDAS/clipseg-rd64-refined"
FACE_GROW = 0.35      # a face mask is the ellipse around the face box grown by this share of its size per side
FEATHER = 0.01        # edges are softened over this share of the image's short side


def mask_rel(prepared: str) -> str:
    """Where the mask of a prepared image (its path inside the prepared folder) lives, relative to that folder."""
    return str(PurePosixPath(MASK_DIR) / PurePosixPath(prepared).with_suffix(".png"))


def save_mask(mask: Image.Image, path: Path, *, fsync: bool = True) -> Path:
    """Write a mask as an 8-bit greyscale PNG, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, fsync=fsync) as tmp:
        mask.convert("L").save(tmp, format="PNG")
    return path


def _feather(mask: Image.Image) -> Image.Image:
    radius = FEATHER * min(mask.size)
    return mask.filter(ImageFilter.GaussianBlur(radius)) if radius >= 0.5 else mask


def face_mask(size: tuple[int, int], box: FaceBox, *, grow: float = FACE_GROW) -> Image.Image:
    """White ellipse around a face box (grown by `grow` of its size on each side, so hair and chin count), soft
    edged, on black; `size` is the image's (width, height)."""
    dx, dy = box.width * grow, box.height * grow
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).ellipse([box.x0 - dx, box.y0 - dy, box.x1 + dx, box.y1 + dy], fill=255)
    return _feather(mask)


# =============================================================================================
# CLIPSeg
# =============================================================================================

@dataclass
class ClipSeg:
    """A loaded CLIPSeg model and its processor on a device; `close()` frees it."""

    model: object
    processor: object
    device: str
    name: str

    def probabilities(self, images: Sequence[Image.Image], prompt: str) -> list[np.ndarray]:
        """Per image, the probability (0-1, float32, the image's own height x width) that a pixel shows `prompt`."""
        import torch

        if not images:
            return []
        images = [im.convert("RGB") for im in images]
        inputs = self.processor(text=[prompt] * len(images), images=images, padding="max_length",
                                return_tensors="pt").to(self.device)
        with torch.inference_mode():
            logits = self.model(**inputs).logits
        if logits.ndim == 2:  # one image: transformers squeezes the batch dimension
            logits = logits[None]
        probs = torch.sigmoid(logits.float())[:, None]
        out = []
        for p, im in zip(probs, images):
            up = torch.nn.functional.interpolate(p[None], size=(im.height, im.width), mode="bilinear",
                                                 align_corners=False)
            out.append(up[0, 0].cpu().numpy())
        return out

    def masks(self, images: Sequence[Image.Image], prompt: str, threshold: float) -> list[Image.Image]:
        """White where the probability is at least `threshold`, soft edged, one "L" mask per image."""
        return [_feather(Image.fromarray(((p >= threshold) * 255).astype(np.uint8), "L"))
                for p in self.probabilities(images, prompt)]

    def close(self) -> None:
        """Drop the model and give its memory back (the GPU is needed for training next)."""
        from ..sd.models import free_memory

        self.model = None
        self.processor = None
        free_memory()

    def __enter__(self) -> "ClipSeg":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_clipseg(model: str | None = None, *, device: str = "auto") -> ClipSeg:
    """CLIPSeg from a Hub id or a local folder (default DEFAULT_CLIPSEG, about 0.6 GB in fp32)."""
    from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

    from .tagging import CaptionerLoadError, load_pretrained, model_source, resolve_device

    source, local = model_source("clipseg", model, DEFAULT_CLIPSEG)
    device = resolve_device(device)
    try:
        processor = load_pretrained("clipseg", CLIPSegProcessor, source, local)
        net = load_pretrained("clipseg", CLIPSegForImageSegmentation, source, local)
    except CaptionerLoadError as e:
        raise CaptionerLoadError(str(e).replace("captioner", "mask model")) from None
    return ClipSeg(net.to(device).eval(), processor, device, f"clipseg:{source}")


def write_clipseg_masks(seg: ClipSeg, folder: Path, names: Sequence[str], prompt: str, threshold: float, *,
                        batch_size: int = 8, progress: bool = True, fsync: bool = True) -> dict[str, str | None]:
    """CLIPSeg's mask of each prepared image `names` (paths inside `folder`) written under `_masks/`: {name: the
    mask's path inside the set, or None when CLIPSeg finds nothing for `prompt` (no file written)}."""
    from tqdm.auto import tqdm

    out: dict[str, str | None] = {}
    for start in tqdm(range(0, len(names), batch_size), desc=f"masks ({seg.name})", disable=not progress):
        batch = list(names[start:start + batch_size])
        images = []
        for name in batch:
            with Image.open(folder / name) as im:
                images.append(im.convert("RGB"))
        for name, mask in zip(batch, seg.masks(images, prompt, threshold)):
            if mask.getextrema()[1] == 0:
                out[name] = None
                continue
            out[name] = mask_rel(name)
            save_mask(mask, folder / out[name], fsync=fsync)
    return out


# =============================================================================================
# Masks for a prepared set
# =============================================================================================

@dataclass
class MaskResult:
    """What `make_masks` did: image -> mask path written (relative to the set), and images left without one."""

    written: dict[str, str]
    missing: dict[str, str]          # image -> why it has no mask

    def summary(self) -> str:
        lines = [f"masks written: {len(self.written)}; without a mask: {len(self.missing)}"]
        lines += [f"  {name}: {why}" for name, why in list(self.missing.items())[:10]]
        return "\n".join(lines)


def make_masks(prepared_dir: str | Path, source: str = "clipseg", *, prompt: str = "", model: str | None = None,
               threshold: float = 0.3, batch_size: int = 8, device: str = "auto", clipseg: ClipSeg | None = None,
               progress: bool = True) -> MaskResult:
    """Write a mask for every prepared image of a set (`prepare`'s output) and record it in the manifest.

    source "clipseg": the pixels CLIPSeg finds for `prompt` ("a person", "a red flower"), at `threshold`;
    "face": the ellipse around the face `prepare` found (images without a face get none). Existing masks are
    replaced. Images without a mask train on every pixel (the trainer warns about them).
    """
    from .prepare import update_records
    from .records import load_manifest

    folder = Path(prepared_dir)
    if source not in ("clipseg", "face"):
        raise ValueError(f'source must be "clipseg" or "face" (alpha masks are made by prepare(masks="alpha"), '
                         f"which still sees the transparency), got {source!r}")
    if source == "clipseg" and not str(prompt).strip():
        raise ValueError('source="clipseg" needs prompt: what the mask keeps, e.g. "a person"')
    if not 0.0 < float(threshold) < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    records = [r for r in load_manifest(folder)["files"] if r.get("kind") == "image" and r.get("status") == "ok"]
    written: dict[str, str] = {}
    missing: dict[str, str] = {}
    if source == "face":
        for r in records:
            if not r.get("face_box"):
                missing[r["prepared"]] = "no face was found in it"
                continue
            rel = mask_rel(r["prepared"])
            save_mask(face_mask(tuple(r["prepared_size"]), FaceBox.from_list(r["face_box"])), folder / rel)
            written[r["prepared"]] = rel
    else:
        own = clipseg is None
        seg = clipseg or load_clipseg(model, device=device)
        try:
            found = write_clipseg_masks(seg, folder, [r["prepared"] for r in records], prompt, float(threshold),
                                        batch_size=batch_size, progress=progress)
        finally:
            if own:
                seg.close()
        for name, rel in found.items():
            if rel is None:
                missing[name] = f"CLIPSeg finds nothing for {prompt!r} at threshold {threshold}"
            else:
                written[name] = rel
    for name in missing:
        stale = folder / mask_rel(name)
        if stale.is_file():
            stale.unlink()
    update_records(folder, {name: {"mask": rel} for name, rel in written.items()}
                   | {name: {"mask": ""} for name in missing})
    return MaskResult(written, missing)


def mask_sheet(prepared_dir: str | Path, path: str | Path | None = None, *, max_images: int = 8) -> Path:
    """The mask preview of a prepared set (`mask_sheet_for` over its masked images); by default written to
    `_report/masks.png` (where `prepare` and `make_masks` keep it up to date)."""
    from .records import REPORT_DIR, FileRecord, load_manifest

    folder = Path(prepared_dir)
    rows = [FileRecord.from_dict(d) for d in load_manifest(folder)["files"]]
    rows = [r for r in rows if r.kind == "image" and r.status == "ok" and r.mask]
    if not rows:
        raise ValueError(f"no image of {folder} has a mask: make them first (prepare(masks=...) or make_masks)")
    return mask_sheet_for(folder, rows, path or folder / REPORT_DIR / "masks.png", max_images=max_images)


def mask_sheet_for(folder: Path, records: Sequence, path: str | Path, *, max_images: int = 8,
                   cell: int = 160) -> Path:
    """A PNG with one row per masked image: the image, its mask, and the image with the ignored part tinted red,
    so a wrong mask is seen before training. `records` are FileRecords with a `mask`."""
    from ..drawing import load_font

    rows = [r for r in records if r.mask][:int(max_images)]
    font = load_font(12)
    head = 18
    sheet = Image.new("RGB", (3 * cell, max(1, len(rows)) * (cell + head)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, r in enumerate(rows):
        with Image.open(folder / r.prepared) as im:
            image = im.convert("RGB")
        with Image.open(folder / r.mask) as m:
            mask = m.convert("L").resize(image.size, Image.Resampling.BILINEAR)
        tint = Image.new("RGB", image.size, (200, 30, 30))
        overlay = Image.composite(image, Image.blend(image, tint, 0.6), mask)
        y = i * (cell + head)
        kept = np.asarray(mask, dtype=np.float64).mean() / 255
        draw.text((4, y + 2), f"{r.prepared}: image | mask | ignored part tinted (kept {kept:.0%})",
                  fill=(0, 0, 0), font=font)
        for j, tile in enumerate((image, mask.convert("RGB"), overlay)):
            tile = fit_thumbnail(tile, cell)
            sheet.paste(tile, (j * cell + (cell - tile.width) // 2, y + head + (cell - tile.height) // 2))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return path
