"""The toy world's judge: a small CNN that names the shape, colour and background of a 32x32 image.

It is the toy stand-in for CLIP/DINO metrics: `score` compares what prompts asked for with what the
judge sees. Trained on renders softened like generated samples are (blur, noise, colour jitter and,
given a VAE, encode->decode round trips), since a judge trained on sharp renders under-counts them.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import world
from .looks import concept_look_rate

DEFAULT_PATH = Path(__file__).with_name("judge.safetensors")
FORMAT = "toy-judge-v1"
HEADS = ("shape", "colour", "background")
EVAL_BLUR_SIGMA = 1.0      # the "blurred renders" of the report: a gaussian blur of this sigma (pixels)
_MAX_SIGMA = 1.6           # strongest training blur; kernels have radius ceil(3 * sigma)


def _block(cin: int, cout: int, stride: int) -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
                               torch.nn.BatchNorm2d(cout), torch.nn.ReLU(inplace=True))


class Judge(torch.nn.Module):
    """Small CNN with three heads; forward(x: (B,3,32,32) in [0,1]) -> {"shape"|"colour"|"background": logits}."""

    def __init__(self, width: int = 16, shapes: Sequence[str] = world.ALL_SHAPES,
                 colours: Sequence[str] = world.ALL_COLOURS, backgrounds: Sequence[str] = world.ALL_BACKGROUNDS):
        super().__init__()
        self.width = int(width)
        self.classes: dict[str, tuple[str, ...]] = {"shape": tuple(shapes), "colour": tuple(colours),
                                                    "background": tuple(backgrounds)}
        c = self.width
        self.features = torch.nn.Sequential(
            _block(3, c, 1),                                 # 32x32
            _block(c, 2 * c, 2), _block(2 * c, 2 * c, 1),    # 16x16
            _block(2 * c, 4 * c, 2), _block(4 * c, 4 * c, 1),  # 8x8
        )
        self.heads = torch.nn.ModuleDict({h: torch.nn.Linear(8 * c, len(names)) for h, names in self.classes.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x * 2 - 1)
        pooled = torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)
        return {h: head(pooled) for h, head in self.heads.items()}


# ----------------------------------------------------------------------------------------------- data

def _to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images -> (B,3,32,32) float in [0,1] (other sizes are resized, other modes converted to RGB)."""
    arrays = []
    for im in images:
        im = im.convert("RGB")
        if im.size != (world.IMAGE_SIZE, world.IMAGE_SIZE):
            im = im.resize((world.IMAGE_SIZE, world.IMAGE_SIZE), Image.LANCZOS)
        arrays.append(np.asarray(im, dtype=np.uint8))
    if not arrays:
        return torch.zeros(0, 3, world.IMAGE_SIZE, world.IMAGE_SIZE)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255)


def _scene_batch(rng: random.Random, n: int, judge: Judge, balanced: bool = False):
    """Render `n` random scenes (every shape, the concept included) -> images and label indices."""
    shapes = judge.classes["shape"]
    scenes = [world.random_scene(rng, shape=shapes[i % len(shapes)] if balanced else rng.choice(shapes))
              for i in range(n)]
    images = _to_tensor([world.render(s) for s in scenes])
    labels = {h: torch.tensor([judge.classes[h].index(getattr(s, h)) for s in scenes]) for h in HEADS}
    return images, labels


def _to_pil(x: torch.Tensor) -> list[Image.Image]:
    """(B,3,H,W) in [0,1] -> PIL images."""
    arr = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """Blur each image of (B,C,H,W) `x` with its own gaussian sigma (pixels; 0 leaves it unchanged)."""
    b, c, h, w = x.shape
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(b)
    radius = max(1, math.ceil(3 * float(sigma.max())))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t[None] / sigma.clamp_min(1e-3)[:, None]) ** 2)
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)          # (B*C, 2r+1)
    y = F.pad(x.reshape(1, b * c, h, w), (radius, radius, radius, radius), mode="replicate")
    y = F.conv2d(y, k[:, None, None, :], groups=b * c)
    y = F.conv2d(y, k[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


@torch.no_grad()
def _vae_roundtrip(vae, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pass [0,1] images through a diffusers AutoencoderKL (encode -> decode), as generated samples are."""
    p = next(vae.parameters())
    latent = vae.encode((x * 2 - 1).to(p.device, p.dtype)).latent_dist
    z = latent.sample(generator=generator) if generator is not None else latent.mode()
    out = vae.decode(z).sample
    return ((out.float().to(x.device) + 1) / 2).clamp(0, 1)


def _warp(x: torch.Tensor, amount: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Bend each image by a random affine map plus a smooth elastic field (`amount` ~ displacement, in
    half-widths): generated shapes have wobbly edges and imperfect proportions."""
    b, _, h, w = x.shape
    a = amount[:, None, None]
    theta = torch.eye(2, 3).expand(b, 2, 3) + (torch.rand(b, 2, 3, generator=g) - 0.5) * a
    field = (torch.rand(b, 2, 4, 4, generator=g) - 0.5) * a[..., None]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    grid = grid + F.interpolate(field, size=(h, w), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random flips/quarter turns, warps, object colour shifts, blur of random strength, slight colour
    jitter and noise: renders made as soft and imperfect as generated samples (labels unchanged)."""
    b = x.shape[0]
    u = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    flip_h, flip_v, transpose = u(b) < 0.5, u(b) < 0.5, u(b) < 0.5
    x = torch.where(flip_h[:, None, None, None], x.flip(3), x)
    x = torch.where(flip_v[:, None, None, None], x.flip(2), x)
    x = torch.where(transpose[:, None, None, None], x.transpose(2, 3), x)
    # the object's colour drifts a little (+-0.08 per channel); the corner pixel is always background
    obj = ((x - x[:, :, :1, :1]).abs().sum(1, keepdim=True) / 0.3).clamp(0, 1)
    x = x + obj * (u(b, 3, 1, 1) - 0.5) * 0.16
    x = _warp(x, torch.where(u(b) < 0.5, u(b) * 0.25, torch.zeros(b)), g)
    sigma = torch.where(u(b) < 0.75, 0.2 + u(b) * (_MAX_SIGMA - 0.2), torch.zeros(b))
    x = gaussian_blur(x, sigma)
    gain = 1 + (u(b, 1, 1, 1) - 0.5) * 0.16 + (u(b, 3, 1, 1) - 0.5) * 0.08     # brightness +-8%, channel +-4%
    offset = (u(b, 3, 1, 1) - 0.5) * 0.06                                         # +-0.03
    x = x * gain + offset
    noise_std = u(b, 1, 1, 1) * 0.05
    x = x + torch.randn(x.shape, generator=g) * noise_std
    return x.clamp(0, 1)


# ---------------------------------------------------------------------------------------------- train

def _accuracy(judge: Judge, images: torch.Tensor, labels: dict[str, torch.Tensor], device) -> dict[str, float]:
    judge.eval()
    with torch.no_grad():
        preds = {h: [] for h in HEADS}
        for i in range(0, len(images), 256):
            logits = judge(images[i:i + 256].to(device))
            for h in HEADS:
                preds[h].append(logits[h].argmax(1).cpu())
    return {h: round(float((torch.cat(preds[h]) == labels[h]).float().mean()), 4) for h in HEADS}


def train_judge(*, seed: int = 0, steps: int = 1200, batch_size: int = 128, vae=None, device: str = "cpu",
                progress: bool = True, n_eval: int = 750, vae_share: float = 0.3, lr: float = 3e-3,
                threads: int | None = None) -> tuple[Judge, dict]:
    """Train a judge on freshly rendered, softened scenes; deterministic for a seed on CPU.

    With `vae` (a diffusers AutoencoderKL), `vae_share` of each batch goes through encode -> decode first.
    Returns the judge (eval mode) and a report with held-out accuracy per head on sharp renders, blurred
    renders (sigma EVAL_BLUR_SIGMA) and, with a VAE, VAE reconstructions (`n_eval` images, its own seed).
    `threads` sets torch's CPU threads for the call (on a shared 2-core machine 1 is fastest)."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _train(seed=seed, steps=steps, batch_size=batch_size, vae=vae, device=device, progress=progress,
                      n_eval=n_eval, vae_share=vae_share, lr=lr)
    finally:
        torch.set_num_threads(before)


def _train(*, seed, steps, batch_size, vae, device, progress, n_eval, vae_share, lr) -> tuple[Judge, dict]:
    from tqdm.auto import tqdm

    if steps < 1 or batch_size < 2:
        raise ValueError(f"train_judge needs steps >= 1 and batch_size >= 2, got steps={steps}, "
                         f"batch_size={batch_size}")
    if not 0 <= vae_share <= 1:
        raise ValueError(f"vae_share is a fraction in [0, 1], got {vae_share}")
    with torch.random.fork_rng(devices=[]):   # seeded init without touching the caller's global RNG
        torch.manual_seed(seed)
        judge = Judge()
    judge = judge.to(device).to(memory_format=torch.channels_last)   # ~20% faster convs on CPU
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    vae_g = torch.Generator().manual_seed(seed + 1)
    if vae is not None:
        vae.eval().requires_grad_(False)
    n_vae = round(batch_size * vae_share) if vae is not None else 0

    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    log: list[dict] = []
    start = time.perf_counter()
    running = None
    bar = tqdm(range(steps), desc="judge", disable=not progress)
    for step in bar:
        judge.train()
        images, labels = _scene_batch(rng, batch_size, judge)
        if n_vae:
            images[:n_vae] = _vae_roundtrip(vae, images[:n_vae], vae_g)
        x = _augment(images, g).to(device).contiguous(memory_format=torch.channels_last)
        logits = judge(x)
        loss = sum(F.cross_entropy(logits[h], labels[h].to(device), label_smoothing=0.05) for h in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_value = float(loss.detach())
        running = loss_value if running is None else 0.95 * running + 0.05 * loss_value
        if progress and step % 10 == 0:
            bar.set_postfix(loss=f"{running:.3f}")
        if step % 50 == 0 or step == steps - 1:
            log.append({"step": step, "loss": round(loss_value, 5), "lr": opt.param_groups[0]["lr"],
                        "seconds": round(time.perf_counter() - start, 2)})
    train_seconds = time.perf_counter() - start
    judge = judge.to(memory_format=torch.contiguous_format).eval()

    eval_rng = random.Random(f"toy-judge-eval:{seed}")
    images, labels = _scene_batch(eval_rng, n_eval, judge, balanced=True)
    report = {
        "format": FORMAT, "seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr,
        "vae": vae is not None, "vae_share": vae_share if vae is not None else 0.0,
        "params": sum(p.numel() for p in judge.parameters()),
        "train_seconds": round(train_seconds, 1), "torch_threads": torch.get_num_threads(),
        "n_eval": n_eval, "eval_blur_sigma": EVAL_BLUR_SIGMA,
        "sharp": _accuracy(judge, images, labels, device),
        "blurred": _accuracy(judge, gaussian_blur(images, EVAL_BLUR_SIGMA), labels, device),
    }
    if vae is not None:
        recon = torch.cat([_vae_roundtrip(vae, images[i:i + 64]) for i in range(0, len(images), 64)])
        report["vae_recon"] = _accuracy(judge, recon, labels, device)
    # the pixel check beside the judge: concept renders pass it, world renders do not (sharp, blurred, VAE)
    flower = labels["shape"] == judge.classes["shape"].index(world.CONCEPT_SHAPE)
    views = {"sharp": images, "blurred": gaussian_blur(images, EVAL_BLUR_SIGMA)}
    if vae is not None:
        views["vae_recon"] = recon
    report["pixel_check"] = {
        name: {"concept": concept_look_rate(_to_pil(x[flower])), "world": concept_look_rate(_to_pil(x[~flower]))}
        for name, x in views.items()}
    report["log"] = log
    return judge, report


# ------------------------------------------------------------------------------------------- files

def save_judge(judge: Judge, path: str | Path = DEFAULT_PATH) -> Path:
    """Write the judge's weights (fp32) and class names to a .safetensors file, atomically."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"the judge is saved as .safetensors, got {path.name!r}")
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in judge.state_dict().items()
               if not k.endswith("num_batches_tracked")}
    meta = {"format": FORMAT, "width": str(judge.width),
            **{f"{h}_classes": json.dumps(list(names)) for h, names in judge.classes.items()}}
    from ..atomic import save_safetensors

    return save_safetensors(tensors, path, metadata=meta)


def load_judge(path: str | Path | None = None, device: str = "cpu") -> Judge:
    """Load a judge written by save_judge (default: the shipped helpers/toy/judge.safetensors), in eval mode."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path) if path is not None else DEFAULT_PATH
    if not path.is_file():
        raise FileNotFoundError(f"no toy judge at {path}; make one with: python -m helpers.toy judge "
                                f"(about 3 minutes on CPU; add --vae <toy base folder> once the toy base exists)")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a toy judge file (format {meta.get('format')!r}, expected {FORMAT!r}); "
                         f"make one with: python -m helpers.toy judge")
    judge = Judge(width=int(meta["width"]), **{f"{h}s": json.loads(meta[f"{h}_classes"]) for h in HEADS})
    state = load_file(str(path))
    missing, unexpected = judge.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"{path} does not match the judge's layout (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}); retrain it with: python -m helpers.toy judge")
    return judge.to(device).eval()


def report_path(judge_path: str | Path = DEFAULT_PATH) -> Path:
    """Where a judge's JSON report lives: beside it, `<stem>_report.json` (judge_report.json by default)."""
    judge_path = Path(judge_path)
    return judge_path.with_name(judge_path.stem + "_report.json")


def save_report(report: dict, path: str | Path) -> Path:
    """Write a training report as JSON, atomically."""
    from ..atomic import write_text

    return write_text(path, json.dumps(report, indent=1) + "\n")


# ------------------------------------------------------------------------------------------ judging

def classify(judge: Judge, images: Sequence[Image.Image]) -> list[dict]:
    """What the judge sees in each image: {"shape", "colour", "background", "probs": {head: {class: p}}}."""
    device = next(judge.parameters()).device
    judge.eval()
    out: list[dict] = []
    with torch.no_grad():
        for i in range(0, len(images), 256):
            logits = judge(_to_tensor(images[i:i + 256]).to(device))
            probs = {h: logits[h].float().softmax(1).cpu() for h in HEADS}
            for j in range(len(probs["shape"])):
                item: dict = {}
                for h in HEADS:
                    p = probs[h][j]
                    item[h] = judge.classes[h][int(p.argmax())]
                item["probs"] = {h: {name: round(float(v), 5) for name, v in zip(judge.classes[h], probs[h][j])}
                                 for h in HEADS}
                out.append(item)
    return out


def score(judge: Judge, images: Sequence[Image.Image], prompts: Sequence[str]) -> dict:
    """How often the judge sees what each prompt asked for (world.parse_caption); a field counts only
    where the prompt names it (accuracy None when no prompt does). concept_rate: share judged a flower;
    concept_look_rate: share that is a violet five-petal flower by its pixels (looks.py), which no training
    of the judge can make lenient."""
    if len(images) != len(prompts):
        raise ValueError(f"score needs one prompt per image, got {len(images)} images and {len(prompts)} prompts")
    seen = classify(judge, images)
    hits = {k: 0 for k in (*HEADS, "shape_and_colour")}
    counts = dict.fromkeys(hits, 0)
    per_image = []
    for prompt, s in zip(prompts, seen):
        asked = world.parse_caption(prompt)
        correct = {h: s[h] == asked[h] for h in HEADS if h in asked}
        if "shape" in asked and "colour" in asked:
            correct["shape_and_colour"] = correct["shape"] and correct["colour"]
        for k, ok in correct.items():
            counts[k] += 1
            hits[k] += int(ok)
        per_image.append({"prompt": prompt, "asked": asked, "seen": {h: s[h] for h in HEADS}, "correct": correct})
    n = len(seen)
    result: dict = {"n": n}
    for k in hits:
        result[f"{k}_acc"] = hits[k] / counts[k] if counts[k] else None
    result["concept_rate"] = sum(s["shape"] == world.CONCEPT_SHAPE for s in seen) / n if n else None
    result["concept_look_rate"] = concept_look_rate(images)
    result.update({f"n_{k}": counts[k] for k in hits})
    result["per_image"] = per_image
    return result
