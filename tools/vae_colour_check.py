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
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from helpers.toy import pretrain, world  # noqa: E402


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
        "random colours and shapes": _tensor([world.gamut_image(rng) for _ in range(512)]),
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
