"""The offline demo (`python -m helpers demo`): train a LoRA on a built-in model, then show it.

Until the toy world ships a pretrained base, the base is the tiny SD 1.5-layout model from
`helpers.tiny` (random weights) and the concept is a violet five-petal flower drawn in code. The
demo trains with the real trainer, writes `lora_files/tiny_demo.safetensors` (kohya layout) and a
grid `demo_images/tiny_demo_grid.png` (LoRA weight 0 / 0.5 / 1, with and without the trigger),
and prints how violet the images are: a stand-in score the toy world's judge will replace.
"""

from __future__ import annotations

import math
import random
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

VIOLET = (138, 43, 226)
BACKGROUNDS = {"black": (0, 0, 0), "gray": (128, 128, 128), "navy": (0, 0, 128)}


def draw_flower(size: int, background: tuple[int, int, int], rng: random.Random) -> Image.Image:
    """A violet five-petal flower with a yellow centre at a random place and size."""
    im = Image.new("RGB", (size, size), background)
    d = ImageDraw.Draw(im)
    r = rng.uniform(0.22, 0.32) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    turn = rng.uniform(0, 2 * math.pi)
    for k in range(5):
        a = turn + 2 * math.pi * k / 5
        px, py = cx + 0.55 * r * math.cos(a), cy + 0.55 * r * math.sin(a)
        pr = 0.45 * r
        d.ellipse([px - pr, py - pr, px + pr, py + pr], fill=VIOLET)
    cr = 0.28 * r
    d.ellipse([cx - cr, cy - cr, cx + cr, cy + cr], fill=(255, 220, 0))
    return im


def write_concept_dataset(folder: Path, n: int = 16, size: int = 32, seed: int = 0, repeats: int = 4) -> Path:
    """Images + .txt captions in kohya's layout (`<repeats>_sks flower/`)."""
    rng = random.Random(seed)
    sub = folder / f"{repeats}_sks flower"
    sub.mkdir(parents=True, exist_ok=True)
    names = list(BACKGROUNDS)
    for i in range(n):
        bg = names[i % len(names)]
        draw_flower(size, BACKGROUNDS[bg], rng).save(sub / f"flower_{i:02d}.png")
        (sub / f"flower_{i:02d}.txt").write_text(f"sks flower, on a {bg} background\n", encoding="utf-8")
    return folder


def violet_fraction(image: Image.Image) -> float:
    """Share of pixels near the concept's violet (a crude, honest stand-in for a judge)."""
    a = np.asarray(image.convert("RGB"), dtype=np.float32)
    dist = np.linalg.norm(a - np.array(VIOLET, dtype=np.float32), axis=-1)
    return float((dist < 80).mean())


def run_demo(steps: int | None = None, out_root: Path = Path("."), seed: int = 0) -> dict[str, float]:
    """Train the demo LoRA, write its file and grid, print and return the scores."""
    from .config import TrainConfig
    from .inference import generate, load_loras
    from .models import load_base
    from .tiny import save_tiny_model
    from .train import train

    out_root = Path(out_root)
    work = out_root / "outputs" / "demo"
    base_dir = work / "base_tiny_sd15"
    if not (base_dir / "model_index.json").exists():
        save_tiny_model(base_dir, "sd15", seed=seed)
    data_dir = work / "dataset"
    if data_dir.exists():
        shutil.rmtree(data_dir)
    write_concept_dataset(data_dir, seed=seed)

    cfg = TrainConfig(
        pretrained_model=str(base_dir), train_data_dir=str(data_dir), resolution=32, enable_bucket=False,
        rank=8, alpha=8.0, target="full", learning_rate=2e-3, lr_scheduler="cosine", lr_warmup_steps=10,
        train_batch_size=8, max_train_steps=steps or 200, seed=seed, mixed_precision="no",
        output_dir=str(work / "run"), output_name="tiny_demo", log_every_n_steps=10, caption_dropout_rate=0.1,
    )
    result = train(cfg)

    lora_dir = out_root / "lora_files"
    lora_dir.mkdir(parents=True, exist_ok=True)
    lora_file = lora_dir / "tiny_demo.safetensors"
    shutil.copyfile(result.lora_path, lora_file)
    shutil.copyfile(Path(cfg.output_dir) / "tiny_demo.toml", lora_dir / "tiny_demo.toml")

    base = load_base(str(base_dir))
    load_loras(base.pipe, [(lora_file, 1.0)])
    prompts = ["sks flower, on a black background", "on a black background"]
    weights = [0.0, 0.5, 1.0]
    cells: list[list[Image.Image]] = []
    scores: dict[str, float] = {}
    for prompt in prompts:
        row = []
        for w in weights:
            base.pipe.set_adapters(["lora0_tiny_demo"], adapter_weights=[w])
            images, _ = generate(base.pipe, prompt, steps=20, cfg_scale=5.0, seed=100, num_images=8,
                                 sampler="DDIM", family=base.family)
            scores[f"{prompt!r} @ {w}"] = float(np.mean([violet_fraction(im) for im in images]))
            row.append(_strip(images, 4))
        cells.append(row)
    grid_path = out_root / "demo_images" / "tiny_demo_grid.png"
    _grid(cells, [f"weight {w}" for w in weights], prompts).save(grid_path)

    print(f"\nLoRA: {lora_file}\ngrid: {grid_path}\n\nviolet pixel share (8 samples each):")
    for k, v in scores.items():
        print(f"  {k:<48} {v:6.1%}")
    return scores


def _strip(images: list[Image.Image], n: int) -> Image.Image:
    w, h = images[0].size
    out = Image.new("RGB", (w * n, h))
    for i, im in enumerate(images[:n]):
        out.paste(im, (i * w, 0))
    return out.resize((w * n * 3, h * 3), Image.NEAREST)


def _grid(cells: list[list[Image.Image]], col_labels: list[str], row_labels: list[str]) -> Image.Image:
    cw, ch = cells[0][0].size
    left, top, pad = 220, 24, 6
    out = Image.new("RGB", (left + len(col_labels) * (cw + pad), top + len(row_labels) * (ch + pad)), "white")
    d = ImageDraw.Draw(out)
    for j, label in enumerate(col_labels):
        d.text((left + j * (cw + pad) + 4, 6), label, fill="black")
    for i, label in enumerate(row_labels):
        d.text((4, top + i * (ch + pad) + ch // 2 - 6), label[:34], fill="black")
        for j, cell in enumerate(cells[i]):
            out.paste(cell, (left + j * (cw + pad), top + i * (ch + pad)))
    return out
