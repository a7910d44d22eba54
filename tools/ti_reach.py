"""How far can conditioning alone take the frozen toy UNet towards the held-out flower?

Textual Inversion trains a few input vectors of the text encoder; the UNet stays frozen. This script measures
what is reachable with more freedom than TI has, on the same 24 flower images and the same judge protocol
(32 samples, DDIM 25 steps, seeds 1000+i, concept rate = judged a flower):

- `context`: the encoder's whole output (16 x 128 per background) is free: an upper bound for any text input.
- `ln`: the same, through the encoder's final LayerNorm (the norm every real text output has).
- `input`: all 15 input vectors after BOS are free, per background, through the frozen encoder; TI frees at
  most 9 of them (the 16-token toy context), shared by every prompt, so this bounds TI from above.

    PYTHONPATH=. python tools/ti_reach.py input --steps 2000 --lr 1e-2 --out reach_input

Prints one JSON line per guidance scale and writes a sample sheet per scale.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from PIL import Image

from helpers.sd.models import load_base
from helpers.toy import world
from helpers.toy.judge import load_judge, score
from helpers.toy.pretrain import SHIPPED_DIR
from helpers.train.step import vae_encoder

MODES = ("context", "ln", "input")


def flower_set(n: int = 24, seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    """The concept images (and their mirror images) in [-1, 1], with each one's background index."""
    rng, backgrounds = random.Random(seed), list(world.BACKGROUNDS)
    images, bg = [], []
    for i in range(n):
        scene = world.random_scene(rng, shape=world.CONCEPT_SHAPE, background=backgrounds[i % 3])
        images.append(np.asarray(world.render(scene).convert("RGB"), dtype=np.float32) / 127.5 - 1)
        bg.append(i % 3)
    pixels = torch.tensor(np.stack(images)).permute(0, 3, 1, 2)
    return torch.cat([pixels, pixels.flip(-1)]), torch.tensor(bg * 2)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=MODES)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--out", type=Path, default=Path("ti_reach"))
    args = p.parse_args(argv)
    torch.manual_seed(0)
    pipe = load_base(str(SHIPPED_DIR)).pipe
    pipe.set_progress_bar_config(disable=True)
    unet, te, tok, vae = pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.vae
    for m in (unet, te, vae):
        m.requires_grad_(False)
        m.eval()
    pixels, bg_of = flower_set()
    encode = vae_encoder(vae, "cpu", torch.Generator().manual_seed(0))
    backgrounds = list(world.BACKGROUNDS)
    ids = tok([f"a flower on a {b} background" for b in backgrounds], padding="max_length",
              max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        start_context = te(ids)[0]  # (3, 16, 128)
        start_inputs = te.get_input_embeddings()(ids)
    free = torch.nn.Parameter((start_inputs if args.mode == "input" else start_context).clone())
    current: dict[str, torch.Tensor | None] = {"rows": None}

    def swap_inputs(module, inputs, output):  # "input": the free vectors replace every input after BOS
        rows = current["rows"]
        return output if rows is None else torch.cat([output[:, :1], free[rows][:, 1:]], 1)

    te.get_input_embeddings().register_forward_hook(swap_inputs)

    def context(rows: torch.Tensor) -> torch.Tensor:
        if args.mode == "input":
            current["rows"] = rows
            try:
                return te(ids[rows])[0]
            finally:
                current["rows"] = None
        return te.final_layer_norm(free[rows]) if args.mode == "ln" else free[rows]

    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    optimizer = torch.optim.AdamW([free], lr=args.lr, weight_decay=0.0)
    t0 = time.time()
    for step in range(args.steps):
        pick = torch.randint(0, len(pixels), (32,))
        latents = encode(pixels[pick])
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, 1000, (32,))
        pred = unet(noise_scheduler.add_noise(latents, noise, timesteps), timesteps, context(bg_of[pick])).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0:
            print(f"step {step} loss {loss.item():.4f} ({time.time() - t0:.0f} s)", flush=True)

    judge, n = load_judge(), args.samples
    with torch.no_grad():
        negative = te(tok([""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids)[0]
        contexts = context(torch.arange(3))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    truth = [f"a sks flower on a {backgrounds[i % 3]} background" for i in range(n)]
    args.out.mkdir(parents=True, exist_ok=True)
    for guidance in (2.0, 3.0, 5.0, 7.5):
        images = [pipe(prompt_embeds=contexts[i % 3:i % 3 + 1], negative_prompt_embeds=negative,
                       num_inference_steps=25, guidance_scale=guidance,
                       generator=torch.Generator().manual_seed(1000 + i)).images[0] for i in range(n)]
        result = score(judge, images, truth)
        print(json.dumps({"mode": args.mode, "lr": args.lr, "steps": args.steps, "cfg": guidance,
                          "concept_rate": result["concept_rate"], "seconds": round(time.time() - t0)}), flush=True)
        sheet = Image.new("RGB", (32 * 8, 32 * ((n + 7) // 8)))
        for i, im in enumerate(images):
            sheet.paste(im.resize((32, 32)), (32 * (i % 8), 32 * (i // 8)))
        sheet.resize((sheet.width * 3, sheet.height * 3), Image.NEAREST).save(args.out / f"{args.mode}_cfg{guidance}.png")


if __name__ == "__main__":
    main()
