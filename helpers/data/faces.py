"""Faces in training photos: where they are, how much of a crop they fill, and a crop window placed on them.

The detector is scikit-image's LBP frontal-face cascade (`skimage.feature.Cascade` with the OpenCV cascade file
the scikit-image wheel ships), so it works offline and on a CPU. It finds frontal and near-frontal faces, not
profiles. Its settings were measured on scikit-image's `lfw_subset` (100 face crops, 100 non-face crops, each
upscaled to 100 px on a 180 px grey canvas): with FACE_NEIGHBOURS = 8 windows agreeing, 91 of 100 faces are
found and 1 of 100 non-faces is flagged (2 neighbours: 99 and 9; 12: 86 and 0). The largest box is taken as the
subject's face, so a small false hit elsewhere in a portrait does not move the crop.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..drawing import fit_size

FACE_NEIGHBOURS = 8        # overlapping detections a face needs (see the module docstring for what it gives)
MIN_FACE_FRACTION = 0.08   # smallest face side searched for, as a share of the image's short side
DETECT_SIDE = 512          # photos are searched at this long side (a 24 MP photo would take a minute)
SCALE_STEP = 1.1           # window scale factor between search passes


@dataclass(frozen=True)
class FaceBox:
    """A face's box in pixels of some image: left, top, right, bottom (right/bottom exclusive, may be fractional)."""

    x0: float
    y0: float
    x1: float
    y1: float

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    @property
    def area(self) -> float:
        return max(0.0, self.width) * max(0.0, self.height)

    @property
    def centre(self) -> tuple[float, float]:
        return (self.x0 + self.x1) / 2, (self.y0 + self.y1) / 2

    def scaled(self, sx: float, sy: float | None = None) -> "FaceBox":
        sy = sx if sy is None else sy
        return FaceBox(self.x0 * sx, self.y0 * sy, self.x1 * sx, self.y1 * sy)

    def shifted(self, dx: float, dy: float) -> "FaceBox":
        return FaceBox(self.x0 + dx, self.y0 + dy, self.x1 + dx, self.y1 + dy)

    def clipped(self, width: float, height: float) -> "FaceBox":
        """The part of the box inside a width x height image (zero area when it lies outside)."""
        x0, y0 = min(max(self.x0, 0.0), width), min(max(self.y0, 0.0), height)
        return FaceBox(x0, y0, max(x0, min(self.x1, width)), max(y0, min(self.y1, height)))

    def iou(self, other: "FaceBox") -> float:
        """Intersection over union of two boxes (0 when they do not overlap)."""
        ix = max(0.0, min(self.x1, other.x1) - max(self.x0, other.x0))
        iy = max(0.0, min(self.y1, other.y1) - max(self.y0, other.y0))
        inter = ix * iy
        union = self.area + other.area - inter
        return inter / union if union > 0 else 0.0

    def inside(self, width: float, height: float, tol: float = 1e-6) -> bool:
        """Whether the whole box lies within a width x height image."""
        return self.x0 >= -tol and self.y0 >= -tol and self.x1 <= width + tol and self.y1 <= height + tol

    def as_list(self, ndigits: int = 1) -> list[float]:
        """[x0, y0, x1, y1] rounded, as the manifest stores it."""
        return [round(v, ndigits) for v in (self.x0, self.y0, self.x1, self.y1)]

    @classmethod
    def from_list(cls, values) -> "FaceBox":
        x0, y0, x1, y1 = (float(v) for v in values)
        return cls(x0, y0, x1, y1)


@functools.lru_cache(maxsize=1)
def load_face_detector():
    """scikit-image's LBP frontal-face cascade, loaded once; ImportError saying what to install without it."""
    try:
        from skimage import data
        from skimage.feature import Cascade
    except ImportError as e:
        raise ImportError("Face detection needs scikit-image: `pip install scikit-image` (Colab has it)") from e
    return Cascade(data.lbp_frontal_face_cascade_filename())


def detect_faces(image: Image.Image, *, neighbours: int = FACE_NEIGHBOURS,
                 min_fraction: float = MIN_FACE_FRACTION) -> list[FaceBox]:
    """Frontal faces in `image`, largest first, as boxes in the image's own pixels ([] when none is found).

    The photo is searched in greyscale at DETECT_SIDE long side; faces smaller than `min_fraction` of the short
    side (and than the cascade's 24 px window) are not looked for.
    """
    size = fit_size(image.size, DETECT_SIDE)
    small = image if size == image.size else image.resize(size, Image.Resampling.BILINEAR)
    grey = np.asarray(small.convert("L"), dtype=np.float64) / 255.0
    short = min(grey.shape)
    side = max(24, int(short * float(min_fraction)))
    if short < side:
        return []
    found = load_face_detector().detect_multi_scale(img=grey, scale_factor=SCALE_STEP, step_ratio=1, min_size=(side, side),
                                          max_size=(short, short), min_neighbor_number=int(neighbours))
    sx, sy = image.width / small.width, image.height / small.height
    boxes = [FaceBox(d["c"], d["r"], d["c"] + d["width"], d["r"] + d["height"]).scaled(sx, sy) for d in found]
    return sorted(boxes, key=lambda b: -b.area)


def face_coverage(box: FaceBox, size: tuple[int, int]) -> float:
    """Share of a width x height crop that the face box fills (the part of the box inside the crop)."""
    w, h = size
    return box.clipped(w, h).area / float(w * h) if w > 0 and h > 0 else 0.0


def face_window(image_size: tuple[int, int], box: FaceBox, target: tuple[int, int], *, margin: float,
                min_size: tuple[int, int] | None = None) -> tuple[float, float, float, float]:
    """The region (left, top, right, bottom) of the source image to crop and scale to `target` so that the face
    sits in the middle with `margin` face-widths (and face-heights) of room on each side.

    The region has the target's aspect ratio. It is at least `min_size` source pixels (no upscaling: pass the
    target itself) and at most the whole image; it is centred on the face and moved, never shrunk, to stay inside
    the image, so the whole face box is kept whenever the region can hold it.
    """
    W, H = image_size
    tw, th = target
    aspect = tw / th
    need_w = box.width * (1 + 2 * margin)
    need_h = box.height * (1 + 2 * margin)
    rw = max(need_w, need_h * aspect)
    if min_size is not None:
        rw = max(rw, min_size[0], min_size[1] * aspect)
    rh = rw / aspect
    fit = min(1.0, W / rw, H / rh)   # larger than the image: the largest region of that shape
    rw, rh = rw * fit, rh * fit
    cx, cy = box.centre
    left = min(max(cx - rw / 2, 0.0), W - rw)
    top = min(max(cy - rh / 2, 0.0), H - rh)
    return left, top, left + rw, top + rh
