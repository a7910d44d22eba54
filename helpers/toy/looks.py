"""What a person sees in a toy image, measured from its pixels: is it a violet five-petal flower?

The judge (a CNN) can learn to accept whatever the samples look like; this check cannot. It finds the
object (pixels far from the border's colour), asks that most of it be violet (hue 255-300 degrees,
saturation >= 0.35) and that its outline have five lobes (the 5th harmonic of its radius around the
centre is the strongest one and clearly above a circle's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

VIOLET_HUE = (255.0, 300.0)     # degrees
MIN_SATURATION = 0.35
MIN_VIOLET_SHARE = 0.5          # "mostly violet": at least half of the object's pixels
MIN_LOBES = 0.06                # 5th-harmonic amplitude / mean radius; a drawn circle stays under 0.02
UPSCALE = 4                     # outline measured on a 4x bicubic upscale (sub-pixel radii)
_BINS = 90


@dataclass(frozen=True)
class Looks:
    """One image: the object's share of the frame, its violet share, its lobes, the verdict."""

    object_share: float     # object pixels / all pixels
    violet_share: float     # violet pixels / object pixels
    lobes: int              # the outline's strongest harmonic (0: no object)
    lobe_strength: float    # that harmonic's amplitude / mean radius
    five_petal_strength: float

    @property
    def violet(self) -> bool:
        return self.violet_share >= MIN_VIOLET_SHARE

    @property
    def five_petals(self) -> bool:
        return self.lobes == 5 and self.five_petal_strength >= MIN_LOBES

    @property
    def is_concept(self) -> bool:
        return self.violet and self.five_petals


def _hsv(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hue (degrees) and saturation of (N, 3) RGB values in [0, 1]."""
    mx, mn = pixels.max(axis=1), pixels.min(axis=1)
    delta = mx - mn
    sat = np.where(mx > 0, delta / np.maximum(mx, 1e-8), 0.0)
    r, g, b = pixels.T
    d = np.maximum(delta, 1e-8)
    hue = np.select([mx == r, mx == g], [((g - b) / d) % 6, (b - r) / d + 2], (r - g) / d + 4) * 60.0
    return np.where(delta > 0, hue, 0.0), sat


def _object_mask(rgb: np.ndarray) -> np.ndarray:
    """Pixels whose colour is far (> 60 of 255, euclidean) from the border's median colour, largest blob only."""
    from scipy import ndimage

    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    background = np.median(border, axis=0)
    mask = np.linalg.norm(rgb - background, axis=2) > 60 / 255
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = ndimage.sum(mask, labels, range(1, n + 1))
        mask = labels == (1 + int(np.argmax(sizes)))
    return mask


def _outline_harmonics(mask: np.ndarray) -> np.ndarray:
    """Amplitudes of harmonics 0..8 of the object's radius as a function of angle around its centroid."""
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    angle = np.arctan2(ys - cy, xs - cx)
    radius = np.hypot(ys - cy, xs - cx)
    bins = ((angle + math.pi) / (2 * math.pi) * _BINS).astype(int) % _BINS
    profile = np.zeros(_BINS)
    np.maximum.at(profile, bins, radius)
    theta = (np.arange(_BINS) + 0.5) / _BINS * 2 * math.pi
    k = np.arange(9)[:, None]
    return np.abs((profile[None] * np.exp(-1j * k * theta[None])).sum(axis=1)) / _BINS * np.r_[1, [2] * 8]


def look(image: Image.Image) -> Looks:
    """Measure one image (any size; small ones are upscaled for the outline)."""
    im = image.convert("RGB")
    rgb = np.asarray(im, dtype=np.float64) / 255
    mask = _object_mask(rgb)
    if mask.sum() < max(4, 0.01 * mask.size):
        return Looks(float(mask.mean()), 0.0, 0, 0.0, 0.0)
    hue, sat = _hsv(rgb[mask])
    violet = (hue >= VIOLET_HUE[0]) & (hue <= VIOLET_HUE[1]) & (sat >= MIN_SATURATION)
    big = np.asarray(im.resize((im.width * UPSCALE, im.height * UPSCALE), Image.BICUBIC), dtype=np.float64) / 255
    amps = _outline_harmonics(_object_mask(big))
    mean_r = max(amps[0], 1e-8)
    strongest = 2 + int(np.argmax(amps[2:]))
    return Looks(float(mask.mean()), float(violet.mean()), strongest, float(amps[strongest] / mean_r),
                 float(amps[5] / mean_r))


def concept_look_rate(images: Sequence[Image.Image]) -> float | None:
    """Share of images a person would call the concept: mostly violet and five-petalled (None for none)."""
    if not images:
        return None
    return sum(look(im).is_concept for im in images) / len(images)

