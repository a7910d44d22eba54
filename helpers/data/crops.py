"""Crops for a training set: none, centre, subject (a saliency map keeps an off-centre subject), face (the crop
placed on the detected face), pad, and bucket (sd-scripts' aspect-ratio buckets), never upscaling unless asked.

Every mode is first a `CropPlan` (scale to a size, then cut a box, or paste on a canvas), so the same plan
crops the image, its mask and its face box alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

from ..config import PrepareConfig
from ..drawing import fit_size
from .dataset import cover_size, select_bucket
from .faces import FaceBox, face_window

_STEP = 64  # side step of sizes kept without upscaling (sd-scripts' bucket_reso_steps)


def _box_blur(a: np.ndarray, r: int) -> np.ndarray:
    """Mean over a (2r+1)^2 window with reflected borders."""
    if r <= 0:
        return a
    p = np.pad(a, r, mode="reflect")
    c = np.cumsum(np.cumsum(p, 0), 1)
    c = np.pad(c, ((1, 0), (1, 0)))
    k = 2 * r + 1
    return (c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]) / (k * k)


def saliency_map(image: Image.Image, size: int = 128) -> np.ndarray:
    """Where the subject probably is: mean of spectral residual saliency (Hou & Zhang 2007) and local
    contrast (local standard deviation of luminance), each scaled to [0, 1]; long side `size` pixels."""
    scale = size / max(image.size)
    w, h = max(8, round(image.width * scale)), max(8, round(image.height * scale))
    a = np.asarray(image.convert("L").resize((w, h), Image.Resampling.BILINEAR), dtype=np.float64) / 255.0

    # Spectral residual of the image less its best-fit plane (brightness and a smooth gradient such as a
    # sky are not salient), mirror-padded so the wrap-around of the FFT adds no border edges.
    yy, xx = np.mgrid[0:h, 0:w]
    design = np.stack([np.ones(h * w), xx.ravel() / w, yy.ravel() / h], axis=1)
    coef, *_ = np.linalg.lstsq(design, a.ravel(), rcond=None)
    pad = max(h, w) // 4
    p = np.pad(a - (design @ coef).reshape(h, w), pad, mode="reflect")
    spectrum = np.fft.fft2(p)
    log_amp = np.log(np.abs(spectrum) + 1e-9)
    residual = log_amp - _box_blur(log_amp, 1)
    sr = np.abs(np.fft.ifft2(np.exp(residual + 1j * np.angle(spectrum)))) ** 2
    sr = _box_blur(_box_blur(sr, 2), 2)[pad:pad + h, pad:pad + w]

    mean = _box_blur(a, 2)
    contrast = np.sqrt(np.maximum(_box_blur(a * a, 2) - mean * mean, 0.0))
    contrast = _box_blur(contrast, 2)

    def norm(x: np.ndarray) -> np.ndarray:
        lo, hi = float(x.min()), float(x.max())
        return (x - lo) / (hi - lo) if hi - lo > 1e-12 else np.zeros_like(x)

    return 0.5 * norm(sr) + 0.5 * norm(contrast)


def _best_offset(profile: np.ndarray, length: int, window: int) -> int:
    """Offset in [0, length - window] of the window that holds the most of `profile` (sampled along
    `length` pixels). The window's edges count less (Tukey taper), so the subject lands inside, not on
    the edge. The centre wins unless the best window beats it by 10% (no clear subject), and among
    windows within 2% of the best the one nearest the centre is taken."""
    free = length - window
    if free <= 0:
        return 0
    xs = (np.arange(length) + 0.5) * len(profile) / length - 0.5
    values = np.interp(xs, np.arange(len(profile)), profile)
    t = (np.arange(window) + 0.5) / window
    taper = np.ones(window)
    edge = 0.25  # the outer quarter of each side tapers to zero
    lo, hi = t < edge, t > 1 - edge
    taper[lo] = 0.5 * (1 - np.cos(np.pi * t[lo] / edge))
    taper[hi] = 0.5 * (1 - np.cos(np.pi * (1 - t[hi]) / edge))
    scores = np.correlate(values, taper, mode="valid")  # len free + 1
    best = float(scores.max())
    centre = free // 2
    if best <= 1.1 * float(scores[centre]):
        return centre
    candidates = np.nonzero(scores >= 0.98 * best)[0]
    return int(candidates[np.argmin(np.abs(candidates - free / 2))])


@dataclass(frozen=True)
class CropPlan:
    """How a source image becomes the prepared one: scale it to `resize`, then cut `box` (left, top, right, bottom)
    out of the scaled image; for "pad", paste the scaled image onto a `canvas` at `offset` instead."""

    source: tuple[int, int]
    resize: tuple[int, int]
    box: tuple[int, int, int, int]
    canvas: tuple[int, int] | None = None
    offset: tuple[int, int] = (0, 0)

    @property
    def size(self) -> tuple[int, int]:
        """The prepared image's (width, height)."""
        if self.canvas is not None:
            return self.canvas
        return self.box[2] - self.box[0], self.box[3] - self.box[1]

    def apply(self, image: Image.Image, *, mask: bool = False,
              fill: tuple[int, int, int] | int = (255, 255, 255)) -> Image.Image:
        """The plan carried out on `image` (the source, or anything of its size: a mask is scaled bilinearly
        and its padding, if any, is 0 = not trained)."""
        if image.size != self.source:
            raise ValueError(f"this crop plan is for a {self.source[0]}x{self.source[1]} image, "
                             f"got {image.width}x{image.height}")
        if image.size != self.resize:
            image = (image.resize(self.resize, Image.Resampling.BILINEAR) if mask
                     else image.resize(self.resize, Image.Resampling.LANCZOS, reducing_gap=3.0))
        if self.canvas is not None:
            out = Image.new(image.mode, self.canvas, 0 if mask else fill)
            out.paste(image, self.offset)
            return out
        if self.box != (0, 0, *self.resize):
            image = image.crop(self.box)
        return image

    def map_box(self, box: FaceBox) -> FaceBox:
        """A box in source pixels, in the prepared image's pixels (it may reach outside a crop)."""
        scaled = box.scaled(self.resize[0] / self.source[0], self.resize[1] / self.source[1])
        if self.canvas is not None:
            return scaled.shifted(*self.offset)
        return scaled.shifted(-self.box[0], -self.box[1])


def _cover_plan(size: tuple[int, int], target: tuple[int, int], left: int | None = None,
                top: int | None = None) -> CropPlan:
    """Scale to cover `target`, then crop it at (left, top) of the scaled image (centred when None)."""
    tw, th = int(target[0]), int(target[1])
    rw, rh = cover_size(size[0], size[1], (tw, th))
    left = (rw - tw) // 2 if left is None else int(left)
    top = (rh - th) // 2 if top is None else int(top)
    return CropPlan(tuple(size), (rw, rh), _clamped_box(left, top, tw, th, rw, rh))


def subject_plan(image: Image.Image, size: tuple[int, int]) -> CropPlan:
    """Scale to cover (width, height), with the window placed on the most salient part (see `saliency_map`)
    rather than the centre."""
    tw, th = int(size[0]), int(size[1])
    rw, rh = cover_size(image.width, image.height, (tw, th))
    sal = saliency_map(image)
    left, top = _best_offset(sal.sum(axis=0), rw, tw), _best_offset(sal.sum(axis=1), rh, th)
    return _cover_plan(image.size, (tw, th), left, top)


def subject_crop(image: Image.Image, size: tuple[int, int]) -> tuple[Image.Image, tuple[int, int]]:
    """`subject_plan` carried out; returns (image, (crop_top, crop_left))."""
    plan = subject_plan(image, size)
    return plan.apply(image), (plan.box[1], plan.box[0])


def face_plan(size: tuple[int, int], face: FaceBox, target: tuple[int, int], *, margin: float,
              allow_upscale: bool) -> CropPlan:
    """Crop to `target` around the face (`faces.face_window`: `margin` face sizes of room on each side), zoomed
    in as far as that allows but never past the source's own pixels unless `allow_upscale`."""
    W, H = size
    tw, th = int(target[0]), int(target[1])
    left, top, right, bottom = face_window(size, face, (tw, th), margin=margin,
                                           min_size=None if allow_upscale else (tw, th))
    scale = tw / (right - left)
    rw, rh = max(tw, round(W * scale)), max(th, round(H * scale))
    return CropPlan((W, H), (rw, rh), _clamped_box(round(left * scale), round(top * scale), tw, th, rw, rh))


def _clamped_box(left: int, top: int, tw: int, th: int, rw: int, rh: int) -> tuple[int, int, int, int]:
    left, top = min(max(left, 0), rw - tw), min(max(top, 0), rh - th)
    return left, top, left + tw, top + th


def _floor_step(x: int, step: int = _STEP) -> int:
    return max(step, x - x % step) if x >= step else max(8, x - x % 8)


def plan_crop(image: Image.Image, cfg: PrepareConfig, buckets: Sequence[tuple[int, int]],
              face: FaceBox | None = None) -> tuple[CropPlan, list[str]]:
    """The crop plan for crop mode `cfg.crop`, and flags saying what it does.

    "upscale_needed": smaller than the target, kept at its own size (step-rounded); "upscaled": the
    same, scaled up because `allow_upscale`; plus "cropped", "resized", "padded", and "no_face" when
    crop="face" found no face and placed the crop by saliency instead.
    none: unchanged (long side capped at `max_side`); bucket: sd-scripts bucket (resize + centre crop);
    face: the bucket, cut around `face` with `cfg.face_margin`; center / subject: resolution-sided square,
    centred or placed on the subject; pad: letterboxed square.
    """
    w, h = image.size
    res = cfg.resolution
    flags: list[str] = []
    small = False
    if cfg.crop == "none":
        size = fit_size((w, h), cfg.max_side)
        plan = CropPlan((w, h), size, (0, 0, *size))
        bucket = select_bucket(size[0], size[1], buckets, res)
        if bucket[0] > size[0] or bucket[1] > size[1]:
            flags.append("upscale_needed")  # "none" never scales up
    elif cfg.crop in ("bucket", "face"):
        bucket = select_bucket(w, h, buckets, res)
        small = bucket[0] > w or bucket[1] > h
        if small and not cfg.allow_upscale:
            bucket = select_bucket(w, h, [], res, no_upscale=True, step=cfg.bucket_reso_steps)
        if cfg.crop == "bucket":
            plan = _cover_plan((w, h), bucket)
        elif face is not None:
            plan = face_plan((w, h), face, bucket, margin=cfg.face_margin, allow_upscale=cfg.allow_upscale)
        else:
            plan = subject_plan(image, bucket)
            flags.append("no_face")
    elif cfg.crop in ("center", "subject"):
        side = res
        small = min(w, h) < res
        if small and not cfg.allow_upscale:
            side = _floor_step(min(w, h), cfg.bucket_reso_steps)
        plan = _cover_plan((w, h), (side, side)) if cfg.crop == "center" else subject_plan(image, (side, side))
    else:  # pad
        side = res
        small = max(w, h) < res
        if small and not cfg.allow_upscale:
            side = min(res, -(-max(w, h) // 8) * 8)
        s = side / max(w, h)
        inner = (max(1, round(w * s)), max(1, round(h * s)))
        plan = CropPlan((w, h), inner, (0, 0, *inner), canvas=(side, side),
                        offset=((side - inner[0]) // 2, (side - inner[1]) // 2))
        if inner != (side, side):
            flags.append("padded")
        if inner != (w, h):
            flags.append("resized")
    if small:
        flags.append("upscaled" if cfg.allow_upscale else "upscale_needed")
    if cfg.crop != "pad":
        out_w, out_h = plan.size
        if abs(out_w / out_h - w / h) > 0.01 * (w / h) or out_w * out_h < 0.99 * plan.resize[0] * plan.resize[1]:
            flags.append("cropped")
        if plan.resize != (w, h):
            flags.append("resized")
    return plan, flags


def crop_image(image: Image.Image, cfg: PrepareConfig, buckets: Sequence[tuple[int, int]],
               face: FaceBox | None = None) -> tuple[Image.Image, list[str]]:
    """The prepared image for crop mode `cfg.crop`, and the flags of `plan_crop`."""
    plan, flags = plan_crop(image, cfg, buckets, face)
    return plan.apply(image, fill=cfg.background_rgb), flags
