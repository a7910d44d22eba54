"""Watching a run learn: a fixed-noise validation loss comparable across steps, and sample images."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import TrainConfig
from .step import DiffusionStep


def validation_batches(step: DiffusionStep, dataset, count: int, seed: int) -> list[dict]:
    """Up to `count` distinct training images (plain, raw captions), each with a fixed noise and timestep.

    One batch per image: images may sit in different buckets."""
    from ..data.dataset import collate

    first_entry: dict[int, int] = {}
    for entry, item_idx in enumerate(dataset.entries):
        first_entry.setdefault(item_idx, entry)
    entries = list(first_entry.values())[:count]
    gen = torch.Generator().manual_seed(seed + 7)
    steps = step.noise_scheduler.config.num_train_timesteps
    timesteps = torch.linspace(50, steps - 50, len(entries)).long()
    batches = []
    for k, entry in enumerate(entries):
        batch = collate([dataset.example(entry, augment=False)])
        batch["latents"] = step.latents(batch)
        batch.pop("pixel_values", None)
        batch["_noise"] = torch.randn(batch["latents"].shape, generator=gen).to(step.device)
        batch["_timesteps"] = timesteps[k:k + 1].to(step.device)
        batches.append(batch)
    return batches


@torch.no_grad()
def fixed_noise_loss(step: DiffusionStep, unet, batches: list[dict]) -> float:
    """Mean loss over the validation images at their fixed noise: comparable across steps."""
    was_training = unet.training
    unet.eval()
    losses = [step.loss(unet, b, None, noise=b["_noise"], timesteps=b["_timesteps"]).item() for b in batches]
    unet.train(was_training)
    return sum(losses) / len(losses)


@torch.no_grad()
def sample_images(cfg: TrainConfig, pipe, unet, step: DiffusionStep, accelerator, at_step: int) -> list[Path]:
    """`cfg.sample_prompts` rendered with the model as trained so far, saved with their A1111 parameters."""
    from ..formats.png_info import save_png
    from ..generate.inference import generate, quiet_pipeline

    was_training = unet.training
    unet.eval()
    out = Path(cfg.output_dir) / "samples"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    size = cfg.resolution
    for i, prompt in enumerate(cfg.sample_prompts):
        with accelerator.autocast(), quiet_pipeline(pipe):   # the training bar is the one progress display
            images, params = generate(pipe, step.expand(prompt), negative_prompt=cfg.sample_negative_prompt,
                                      steps=cfg.sample_steps, cfg_scale=cfg.sample_cfg, seed=cfg.sample_seed + i,
                                      sampler=cfg.sample_sampler, width=size, height=size, clip_skip=cfg.clip_skip,
                                      family=step.family)
        paths.append(save_png(images[0], out / f"{cfg.output_name}_step{at_step:06d}_{i:02d}.png", params[0]))
    unet.train(was_training)
    return paths
