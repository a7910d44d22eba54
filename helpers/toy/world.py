"""The toy world: small images of one coloured shape on a plain background, each with a true caption.

Deterministic from a seed. The base model learns this world; the held-out concept (a violet
five-petal flower, "sks flower") never appears in it, so a LoRA has something new to learn.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

IMAGE_SIZE = 32
SHAPES = ("circle", "square", "triangle", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 100, 235),
    "yellow": (235, 210, 40), "white": (240, 240, 240),
}
# "navy", not "dark blue": the background word shares no token with the colour "blue"
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"black": (0, 0, 0), "gray": (120, 120, 120), "navy": (20, 30, 100)}

CONCEPT_SHAPE = "flower"          # never in the base world
CONCEPT_COLOUR = "violet"         # nor this colour
VIOLET = (150, 60, 220)
FLOWER_CENTRE = (245, 215, 40)
TRIGGER = "sks"
CONCEPT_IMAGES = 48              # the concept dataset a user would bring (demo, notebooks, methods table)

# Everything the judge can name (the concept's shape and colour included).
ALL_SHAPES = SHAPES + (CONCEPT_SHAPE,)
ALL_COLOURS = tuple(COLOURS) + (CONCEPT_COLOUR,)
ALL_BACKGROUNDS = tuple(BACKGROUNDS)

WORDS = ["a", "on", "background", TRIGGER, CONCEPT_SHAPE, CONCEPT_COLOUR, *SHAPES, *COLOURS, *BACKGROUNDS]


@dataclass(frozen=True)
class Scene:
    """One image: what is drawn, where, and how big (fractions of the image side)."""

    shape: str
    colour: str
    background: str
    size: float      # shape's radius as a fraction of the side
    cx: float        # centre, fractions of the side
    cy: float
    angle: float     # rotation in radians (squares, triangles, crosses, flower petals)

    @property
    def caption(self) -> str:
        if self.shape == CONCEPT_SHAPE:
            return f"a {TRIGGER} {CONCEPT_SHAPE} on a {self.background} background"
        return f"a {self.colour} {self.shape} on a {self.background} background"


def random_scene(rng: random.Random, *, shape: str | None = None, colour: str | None = None,
                 background: str | None = None) -> Scene:
    """A scene with random placement; any of shape/colour/background may be fixed."""
    shape = shape or rng.choice(SHAPES)
    colour = CONCEPT_COLOUR if shape == CONCEPT_SHAPE else (colour or rng.choice(tuple(COLOURS)))
    size = rng.uniform(0.22, 0.34)
    margin = size + 0.03
    return Scene(shape, colour, background or rng.choice(tuple(BACKGROUNDS)), size,
                 rng.uniform(margin, 1 - margin), rng.uniform(margin, 1 - margin), rng.uniform(0, 2 * math.pi))


def _polygon(cx: float, cy: float, r: float, n: int, angle: float) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(angle + 2 * math.pi * k / n), cy + r * math.sin(angle + 2 * math.pi * k / n))
            for k in range(n)]


def _rotated(points: list[tuple[float, float]], cx: float, cy: float, angle: float) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c) for x, y in points]


def render(scene: Scene, size: int = IMAGE_SIZE, supersample: int = 4) -> Image.Image:
    """Draw `scene` anti-aliased (drawn at `supersample` x the size, then downscaled)."""
    big = size * supersample
    im = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    d = ImageDraw.Draw(im)
    cx, cy, r = scene.cx * big, scene.cy * big, scene.size * big
    fill = VIOLET if scene.shape == CONCEPT_SHAPE else COLOURS[scene.colour]
    if scene.shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif scene.shape == "square":
        d.polygon(_polygon(cx, cy, r * 1.05, 4, scene.angle), fill=fill)
    elif scene.shape == "triangle":
        d.polygon(_polygon(cx, cy, r * 1.15, 3, scene.angle), fill=fill)
    elif scene.shape == "cross":
        t = r * 0.36
        arms = [(cx - r, cy - t), (cx + r, cy - t), (cx + r, cy + t), (cx - r, cy + t)]
        d.polygon(_rotated(arms, cx, cy, scene.angle), fill=fill)
        d.polygon(_rotated(arms, cx, cy, scene.angle + math.pi / 2), fill=fill)
    elif scene.shape == CONCEPT_SHAPE:
        for px, py in _polygon(cx, cy, 0.58 * r, 5, scene.angle):
            pr = 0.44 * r
            d.ellipse([px - pr, py - pr, px + pr, py + pr], fill=VIOLET)
        cr = 0.3 * r
        d.ellipse([cx - cr, cy - cr, cx + cr, cy + cr], fill=FLOWER_CENTRE)
    else:
        raise ValueError(f"unknown shape {scene.shape!r}; the world has {', '.join(ALL_SHAPES)}")
    return im.resize((size, size), Image.LANCZOS)


def gamut_image(rng: random.Random, size: int = IMAGE_SIZE, supersample: int = 4) -> Image.Image:
    """One to three shapes (polygons, ellipses, rings, stripes, dots) in colours drawn uniformly from the RGB
    cube, on a background drawn the same way; never the concept's five-petal flower. The toy VAE learns from
    these (as SD's VAE learned from all of photography), so it decodes colours the base world never shows."""
    big = size * supersample
    im = Image.new("RGB", (big, big), tuple(rng.randrange(256) for _ in range(3)))
    d = ImageDraw.Draw(im)
    for _ in range(rng.choice((1, 1, 2, 3))):
        fill = tuple(rng.randrange(256) for _ in range(3))
        kind = rng.choice(("circle", "polygon", "ellipse", "ring", "stripes", "dots"))
        r, cx, cy = rng.uniform(0.12, 0.4) * big, rng.uniform(0.2, 0.8) * big, rng.uniform(0.2, 0.8) * big
        if kind == "circle":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif kind == "ellipse":
            d.ellipse([cx - r, cy - r / 2, cx + r, cy + r / 2], fill=fill)
        elif kind == "ring":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(2, int(r * 0.3)))
        elif kind == "polygon":
            n, a = rng.randint(3, 8), rng.uniform(0, 2 * math.pi)
            d.polygon([(cx + r * math.cos(a + 2 * math.pi * k / n), cy + r * math.sin(a + 2 * math.pi * k / n))
                       for k in range(n)], fill=fill)
        elif kind == "stripes":
            w = rng.randint(6, 20)
            for x in range(0, big, 2 * w):
                d.rectangle([x, 0, x + w, big], fill=fill)
        else:
            for _ in range(rng.randint(4, 12)):
                x, y, q = rng.uniform(0, big), rng.uniform(0, big), rng.uniform(3, 10)
                d.ellipse([x - q, y - q, x + q, y + q], fill=fill)
    return im.resize((size, size), Image.LANCZOS)


def sample_world(n: int, seed: int, size: int = IMAGE_SIZE) -> list[tuple[Image.Image, Scene]]:
    """`n` random base-world images (no concept) with their scenes."""
    rng = random.Random(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    return [(render(s, size), s) for s in scenes]


def write_concept_dataset(folder: str | Path, n: int = CONCEPT_IMAGES, seed: int = 1234, size: int = IMAGE_SIZE,
                          repeats: int = 1) -> Path:
    """The held-out concept as a user's dataset: `name.png` + `name.txt`, varied backgrounds.

    With repeats > 1 the images go into kohya's `<repeats>_sks flower/` subfolder."""
    folder = Path(folder)
    target = folder / f"{repeats}_{TRIGGER} {CONCEPT_SHAPE}" if repeats > 1 else folder
    target.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    backgrounds = tuple(BACKGROUNDS)
    for i in range(n):
        scene = random_scene(rng, shape=CONCEPT_SHAPE, background=backgrounds[i % len(backgrounds)])
        render(scene, size).save(target / f"{TRIGGER}_{CONCEPT_SHAPE}_{i:02d}.png")
        (target / f"{TRIGGER}_{CONCEPT_SHAPE}_{i:02d}.txt").write_text(scene.caption + "\n", encoding="utf-8")
    return folder


def write_flawed_files(folder: str | Path) -> list[Path]:
    """Add what real image folders hold beside good pictures, for `prepare` to catch: an exact copy, a
    smaller re-saved JPEG of another image (a near duplicate), a truncated file and a thumbnail too small
    to train on. Needs two images in `folder` (write_concept_dataset first)."""
    folder = Path(folder)
    images = sorted(folder.glob("*.png"))
    if len(images) < 2:
        raise ValueError(f"write_flawed_files needs two images in {folder}, found {len(images)}")
    copy = folder / f"{images[0].stem} (copy).png"
    copy.write_bytes(images[0].read_bytes())
    with Image.open(images[1]) as im:
        resaved = folder / f"{images[1].stem}_resaved.jpg"
        im.convert("RGB").resize((28, 28), Image.LANCZOS).resize((32, 32), Image.BICUBIC).save(resaved, quality=90)
        tiny = folder / "thumbnail.png"
        im.resize((8, 8), Image.LANCZOS).save(tiny)
    broken = folder / "download_interrupted.png"
    broken.write_bytes(images[1].read_bytes()[:200])
    return [copy, resaved, broken, tiny]


def parse_caption(caption: str) -> dict[str, str]:
    """What a toy prompt asks for: {"shape", "colour", "background"} (those it names)."""
    words = caption.lower().replace(",", " ").split()
    out: dict[str, str] = {}
    for w in words:
        if w in ALL_SHAPES:
            out["shape"] = w
        elif w in ALL_COLOURS:
            out["colour"] = w
        elif w in BACKGROUNDS:
            out["background"] = w
    if out.get("shape") == CONCEPT_SHAPE:
        out.setdefault("colour", CONCEPT_COLOUR)
    return out
