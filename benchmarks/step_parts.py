"""Where a toy training step's time goes: the VAE encode, the frozen text encoder, and the UNet's forward,
backward and AdamW update, each timed alone on the settings of benchmarks/vs_diffusers.py (the shipped toy base,
32 px, batch 32, a rank-8 attention LoRA, fp32). What a latent cache or a text cache can save is at most the
share of its part.

    python benchmarks/step_parts.py                 # the table
    python benchmarks/step_parts.py --tiny          # the tiny test model, 2 repeats (the test runs this)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a checkout


def _seconds(fn: Callable[[], None], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def parts(model_dir: str, batch: int = 32, resolution: int = 32, rank: int = 8, repeats: int = 20
          ) -> dict[str, float]:
    """Seconds per call of each part of one step, on `model_dir`'s models in fp32 on the CPU."""
    from peft import LoraConfig

    from helpers.sd.lora_targets import inject_lora, unet_target_modules
    from helpers.sd.models import load_base

    pipe = load_base(model_dir).pipe
    unet, vae, te, tok = pipe.unet.float(), pipe.vae.float(), pipe.text_encoder.float(), pipe.tokenizer
    for m in (unet, vae, te):
        m.requires_grad_(False)
    inject_lora(unet, LoraConfig(r=rank, lora_alpha=rank, target_modules=unet_target_modules(unet, "attention")))
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    pixels = torch.rand(batch, 3, resolution, resolution, generator=gen) * 2 - 1
    ids = tok(["a sks flower on a navy background"] * batch, padding="max_length", truncation=True,
              max_length=tok.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.sample(gen) * vae.config.scaling_factor
        hidden = te(ids)[0]

    def encode() -> None:
        with torch.no_grad():
            vae.encode(pixels).latent_dist.sample(gen)

    def text() -> None:
        with torch.no_grad():
            te(ids)

    def unet_step() -> None:
        t = torch.randint(0, 1000, (batch,), generator=gen)
        noise = torch.randn(latents.shape, generator=gen)
        loss = torch.nn.functional.mse_loss(unet(latents + noise, t, hidden).sample, noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return {"VAE encode": _seconds(encode, repeats), "text encoder": _seconds(text, repeats),
            "UNet forward + backward + AdamW": _seconds(unet_step, repeats)}


def format_table(times: dict[str, float]) -> str:
    total = sum(times.values())
    lines = ["| part | s per step | share |", "|---|---|---|"]
    lines += [f"| {name} | {s:.4f} | {s / total:.0%} |" for name, s in times.items()]
    lines.append(f"| all (the example's step: it runs every part) | {total:.4f} | 100% |")
    return "\n".join(lines)


def main(argv=None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="the tiny test model, 2 repeats: a smoke run")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            from helpers.toy.tiny import build_tiny_sd15, write_clip_tokenizer

            model = Path(tmp) / "tiny"
            build_tiny_sd15(write_clip_tokenizer(Path(tmp) / "tok")).save_pretrained(str(model))
            times = parts(str(model), batch=2, resolution=32, rank=4, repeats=2)
        else:
            from helpers.toy.pretrain import SHIPPED_DIR

            times = parts(str(SHIPPED_DIR), repeats=args.repeats)
    print(format_table(times))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    return times


if __name__ == "__main__":
    main()
