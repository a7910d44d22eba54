"""Crops for a training set: none, centre, subject (a saliency map keeps an off-centre subject), pad, and
bucket (sd-scripts' aspect-ratio buckets), never upscaling unless asked."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from ..config import PrepareConfig
from .dataset import resize_and_crop, select_bucket

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


def subject_crop(image: Image.Image, size: tuple[int, int]) -> tuple[Image.Image, tuple[int, int]]:
    """Scale `image` to cover (width, height), then crop there with the window placed on the most salient
    part (see `saliency_map`) rather than the centre; returns (image, (crop_top, crop_left))."""
    tw, th = int(size[0]), int(size[1])
    scale = max(tw / image.width, th / image.height)
    rw, rh = max(tw, int(image.width * scale + 0.5)), max(th, int(image.height * scale + 0.5))
    sal = saliency_map(image)
    left = _best_offset(sal.sum(axis=0), rw, tw)
    top = _best_offset(sal.sum(axis=1), rh, th)
    if (rw, rh) != image.size:
        image = image.resize((rw, rh), Image.Resampling.LANCZOS, reducing_gap=3.0)
    if (rw, rh) != (tw, th):
        image = image.crop((left, top, left + tw, top + th))
    return image, (top, left)


def _floor_step(x: int, step: int = _STEP) -> int:
    return max(step, x - x % step) if x >= step else max(8, x - x % 8)


def _shrink_to_fit(image: Image.Image, max_side: int) -> Image.Image:
    if max(image.size) <= max_side:
        return image
    s = max_side / max(image.size)
    size = (max(1, round(image.width * s)), max(1, round(image.height * s)))
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def crop_image(image: Image.Image, cfg: PrepareConfig,
               buckets: Sequence[tuple[int, int]]) -> tuple[Image.Image, list[str]]:
    """The prepared image for crop mode `cfg.crop`, and flags saying what was done.

    "upscale_needed": smaller than the target, kept at its own size (step-rounded); "upscaled": the
    same, scaled up because `allow_upscale`; plus "cropped", "resized", "padded".
    none: unchanged (long side capped at `max_side`); bucket: sd-scripts bucket (resize + centre crop);
    center / subject: resolution-sided square, centred or placed on the subject; pad: letterboxed square.
    """
    w, h = image.size
    res = cfg.resolution
    flags: list[str] = []
    small = False
    if cfg.crop == "none":
        out = _shrink_to_fit(image, cfg.max_side) if cfg.max_side else image
        bucket = select_bucket(out.width, out.height, buckets, res)
        small = bucket[0] > out.width or bucket[1] > out.height
        if small:
            flags.append("upscale_needed")  # "none" never scales up
        small = False
    elif cfg.crop == "bucket":
        bucket = select_bucket(w, h, buckets, res)
        small = bucket[0] > w or bucket[1] > h
        if small and not cfg.allow_upscale:
            bucket = select_bucket(w, h, [], res, no_upscale=True, step=cfg.bucket_reso_steps)
        out, _ = resize_and_crop(image, bucket, "center")
    elif cfg.crop in ("center", "subject"):
        side = res
        small = min(w, h) < res
        if small and not cfg.allow_upscale:
            side = _floor_step(min(w, h), cfg.bucket_reso_steps)
        out = (resize_and_crop(image, (side, side), "center")[0] if cfg.crop == "center"
               else subject_crop(image, (side, side))[0])
    else:  # pad
        side = res
        small = max(w, h) < res
        if small and not cfg.allow_upscale:
            side = min(res, -(-max(w, h) // 8) * 8)
        s = side / max(w, h)
        inner = (max(1, round(w * s)), max(1, round(h * s)))
        scaled = image if inner == image.size else image.resize(inner, Image.Resampling.LANCZOS, reducing_gap=3.0)
        out = Image.new("RGB", (side, side), cfg.background_rgb)
        out.paste(scaled, ((side - inner[0]) // 2, (side - inner[1]) // 2))
        if inner != (side, side):
            flags.append("padded")
        if inner != image.size:
            flags.append("resized")
    if small:
        flags.append("upscaled" if cfg.allow_upscale else "upscale_needed")
    if cfg.crop != "pad":
        if abs(out.width / out.height - w / h) > 0.01 * (w / h):
            flags.append("cropped")
        if abs(max(out.width / w, out.height / h) - 1.0) > 1e-9:
            flags.append("resized")
    return out, flags
