"""How well a toy VAE reconstructs colours it may never have seen: the concept's violet flowers, random
colours and shapes over the whole RGB cube, and the base world. Prints PSNR per set and the violet petals'
mean colour in and out (RGB and HSV); a VAE that cannot decode the concept's colour caps what any LoRA can show.

    python tools/vae_colour_check.py                      # the shipped toy VAE
    python tools/vae_colour_check.py path/to/vae_folder   # another one (a diffusers AutoencoderKL folder)
"""

from __future__ import annotations

import argparse
import colorsys
import json
import math
import random
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from helpers.toy import pretrain, world  # noqa: E402


def gamut_image(rng: random.Random, size: int = world.IMAGE_SIZE, supersample: int = 4) -> Image.Image:
    """One to three shapes (polygons, ellipses, rings, stripes, dots) in colours drawn uniformly from the RGB
    cube, on a background drawn the same way; never the concept's five-petal flower."""
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


def _tensor(images: list[Image.Image]) -> torch.Tensor:
    arr = np.stack([np.asarray(i, dtype=np.uint8) for i in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@torch.no_grad()
def check(vae) -> dict:
    """PSNR on three held-out sets and the violet petals' colour before and after a round trip."""
    rng = random.Random(7)
    concept_rng = random.Random(4321)
    backgrounds = tuple(world.BACKGROUNDS)
    sets = {
        "concept (violet flowers)": _tensor([world.render(world.random_scene(
            concept_rng, shape=world.CONCEPT_SHAPE, background=backgrounds[i % 3])) for i in range(96)]),
        "random colours and shapes": _tensor([gamut_image(rng) for _ in range(512)]),
        "base world": pretrain.render_set(512, 1000)[0],
    }
    out: dict = {}
    recon = {}
    for name, x in sets.items():
        r = torch.cat([vae.decode(vae.encode(x[i:i + 256]).latent_dist.mean).sample
                       for i in range(0, len(x), 256)]).clamp(-1, 1)
        recon[name] = r
        out[name] = {"psnr_db": round(10 * math.log10(4 / F.mse_loss(r, x).item()), 1)}
    x, r = (sets["concept (violet flowers)"] + 1) * 127.5, (recon["concept (violet flowers)"] + 1) * 127.5
    petals = (x - torch.tensor(world.VIOLET).view(1, 3, 1, 1)).abs().max(dim=1).values < 30
    for label, img in (("in", x), ("out", r)):
        rgb = [round(img[:, c][petals].mean().item()) for c in range(3)]
        h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in rgb))
        out[f"violet petals {label}"] = {"rgb": rgb, "hue_deg": round(h * 360), "saturation": round(s, 2),
                                         "value": round(v, 2)}
    out["violet petals mean abs error (0-255)"] = round((r - x).abs().permute(1, 0, 2, 3)[:, petals].mean().item(), 1)
    return out


def main() -> int:
    from diffusers import AutoencoderKL

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("vae", nargs="?", default=str(pretrain.SHIPPED_DIR / "vae"),
                        help="a diffusers AutoencoderKL folder (default: the shipped toy model's VAE)")
    args = parser.parse_args()
    vae = AutoencoderKL.from_pretrained(args.vae).float().eval()
    print(json.dumps(check(vae), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
