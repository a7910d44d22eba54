"""Real photographs for the tests and the toy notebooks: the ones scikit-image ships inside its wheel, so they are
there offline. `astronaut` has a frontal face; `coffee`, `rocket`, `chelsea` (a cat) and `motorcycle` have none
the detector finds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle")


def photo(name: str) -> Image.Image:
    """One of PHOTOS as an RGB image at its shipped size (astronaut 512x512, coffee 600x400, ...)."""
    from skimage import data

    if name not in PHOTOS:
        raise ValueError(f"no photo {name!r}: choose from {', '.join(PHOTOS)}")
    array = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    return Image.fromarray(np.asarray(array)[..., :3].astype(np.uint8), "RGB")


def cutout(name: str = "chelsea") -> Image.Image:
    """A photo as an RGBA cut-out: opaque inside a soft-edged ellipse around the middle, transparent outside (what
    a background remover gives)."""
    image = photo(name)
    w, h = image.size
    alpha = Image.new("L", (w, h), 0)
    ImageDraw.Draw(alpha).ellipse([w * 0.15, h * 0.08, w * 0.85, h * 0.95], fill=255)
    out = image.convert("RGBA")
    out.putalpha(alpha.filter(ImageFilter.GaussianBlur(3)))
    return out


def write_photos(folder: str | Path, names: tuple[str, ...] = PHOTOS, *, with_cutout: bool = True) -> list[Path]:
    """Write the photos as PNGs into `folder` (and `<name>_cutout.png`, an RGBA cut-out); returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        paths.append(folder / f"{name}.png")
        photo(name).save(paths[-1])
    if with_cutout:
        paths.append(folder / "chelsea_cutout.png")
        cutout("chelsea").save(paths[-1])
    return paths
