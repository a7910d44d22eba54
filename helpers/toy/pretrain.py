"""Pretrain the toy base model: an SD 1.5-architecture pipeline that has learned the toy world.

`python -m helpers.toy pretrain` runs it (about 40 minutes on 2 CPU cores) and writes a diffusers
folder of fp16 safetensors that `helpers.sd.models.load_base` loads like any real model. The result
is a deterministic function of the config (seed, steps, threads): run it again to reproduce the
shipped model.

Stages: render a fixed training set; train the VAE on random colours and shapes spanning the RGB cube
plus part of the world (never the concept), so it decodes any colour as SD's VAE does; fold the latents' mean into the VAE so that
standard SD pipelines (which know no shift) see centred latents, and set scaling_factor = 1/std;
encode the set once (and its mirror image); train UNet and text encoder together on those latents,
keeping an EMA of their weights, which is what ships.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import world

SHIPPED_DIR = Path(__file__).parent / "base"


@dataclass
class PretrainConfig:
    seed: int = 0
    threads: int = 2                 # CPU results depend on the thread count: keep it fixed to reproduce
    n_train: int = 24000             # rendered training images (each also used mirrored)
    n_holdout: int = 512
    # VAE: trained on random colours and shapes over the whole RGB cube plus part of the world, never the concept
    n_gamut: int = 16000
    vae_world: int = 8000
    vae_steps: int = 1500
    vae_batch: int = 64
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    # UNet + text encoder
    steps: int = 3000
    batch: int = 64
    lr: float = 8e-4
    warmup: int = 100
    min_lr_ratio: float = 0.1
    uncond_prob: float = 0.1
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999
    grad_clip: float = 1.0


# --- the architecture -------------------------------------------------------------------------

def build_components(tokenizer_dir: Path, seed: int):
    """Tokenizer, text encoder, VAE, UNet and scheduler of the toy model (random weights)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from .tiny import write_clip_tokenizer

    write_clip_tokenizer(tokenizer_dir, world.WORDS, model_max_length=16)
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=16, projection_dim=128, hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
                        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32,
                        sample_size=world.IMAGE_SIZE)
    # cross-attention only at 8x8 and in the mid block: 1.8x faster than cross-attention in both blocks
    unet = UNet2DConditionModel(sample_size=world.IMAGE_SIZE // 2, in_channels=4, out_channels=4,
                                layers_per_block=1, block_out_channels=(64, 128),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                cross_attention_dim=128, attention_head_dim=8, norm_num_groups=32)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1, prediction_type="epsilon")
    return tokenizer, text_encoder, vae, unet, scheduler


# --- data --------------------------------------------------------------------------------------

def gamut_set(n: int, seed: int) -> torch.Tensor:
    """n world.gamut_image pictures as a (n, 3, 32, 32) tensor in [-1, 1]."""
    rng = random.Random(seed)
    arr = np.stack([np.asarray(world.gamut_image(rng), dtype=np.uint8) for _ in range(n)])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def render_set(n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """n images as a (n, 3, 32, 32) tensor in [-1, 1] with their captions; balanced over the 60 combinations."""
    rng = random.Random(seed)
    combos = [(s, c, b) for s in world.SHAPES for c in world.COLOURS for b in world.BACKGROUNDS]
    scenes = [world.random_scene(rng, shape=s, colour=c, background=b)
              for i in range(n) for s, c, b in [combos[i % len(combos)]]]
    rng.shuffle(scenes)
    arr = np.stack([np.asarray(world.render(sc), dtype=np.uint8) for sc in scenes])
    pixels = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return pixels, [sc.caption for sc in scenes]


def _cosine_lr(step: int, total: int, base: float, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


# --- stage 1: the VAE ----------------------------------------------------------------------------

def train_vae(vae, pixels: torch.Tensor, holdout: torch.Tensor, cfg: PretrainConfig, log) -> float:
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    vae.train()
    for step in tqdm(range(cfg.vae_steps), desc="VAE", unit="step"):
        for g in opt.param_groups:
            g["lr"] = _cosine_lr(step, cfg.vae_steps, cfg.vae_lr, 50, 0.05)
        idx = torch.randint(0, len(pixels), (cfg.vae_batch,), generator=gen)
        x = pixels[idx]
        flip = torch.rand(cfg.vae_batch, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        dist = vae.encode(x).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + cfg.vae_kl_weight * dist.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 200 == 0 or step == cfg.vae_steps - 1:
            log({"stage": "vae", "step": step, "loss": loss.item()})
    vae.eval()
    with torch.no_grad():
        rec = torch.cat([vae.decode(vae.encode(holdout[i:i + 256]).latent_dist.mean).sample
                         for i in range(0, len(holdout), 256)])
    return F.mse_loss(rec, holdout).item()


@torch.no_grad()
def centre_latents(vae, pixels: torch.Tensor) -> tuple[list[float], float]:
    """Fold the latents' per-channel mean into quant_conv / post_quant_conv (exactly: a 1x1 conv
    absorbs a constant shift), then set scaling_factor so scaled latents have unit std."""
    mu = torch.cat([vae.encode(pixels[i:i + 512]).latent_dist.mean for i in range(0, len(pixels), 512)])
    shift = mu.mean(dim=(0, 2, 3))
    c = shift.numel()
    vae.quant_conv.bias[:c] -= shift                      # encoder now outputs mean - shift
    w = vae.post_quant_conv.weight[:, :, 0, 0]            # decoder sees z' + shift: fold W @ shift into the bias
    vae.post_quant_conv.bias += w @ shift
    std = (mu - shift[None, :, None, None]).std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    return shift.tolist(), std


# --- stage 2: UNet + text encoder ----------------------------------------------------------------

def train_unet(unet, text_encoder, tokenizer, scheduler_config, latents: torch.Tensor, captions: list[str],
               cfg: PretrainConfig, log):
    """Joint training on pre-encoded (scaled) latents; returns EMA copies of unet and text encoder."""
    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler.from_config(scheduler_config)
    alphas = noise_sched.alphas_cumprod
    from ..sd.text_encoding import tokenize

    ids_all, empty = tokenize(tokenizer, captions), tokenize(tokenizer, [""])
    n = len(captions)  # latents holds n originals then n mirrors
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
    ema_unet, ema_te = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    ema_params = list(ema_unet.parameters()) + list(ema_te.parameters())
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    unet.train(), text_encoder.train()
    t0, seen = time.perf_counter(), 0
    for step in tqdm(range(cfg.steps), desc="UNet + text encoder", unit="step"):
        lr = _cosine_lr(step, cfg.steps, cfg.lr, cfg.warmup, cfg.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, n, (cfg.batch,), generator=gen)
        mirror = torch.rand(cfg.batch, generator=gen) < 0.5
        x0 = latents[idx + mirror.long() * n]
        ids = ids_all[idx].clone()
        drop = torch.rand(cfg.batch, generator=gen) < cfg.uncond_prob
        ids[drop] = empty
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (cfg.batch,), generator=gen)
        xt = noise_sched.add_noise(x0, noise, t)
        hidden = text_encoder(ids)[0]
        pred = unet(xt, t, encoder_hidden_states=hidden).sample
        snr = alphas[t] / (1 - alphas[t])
        weight = torch.clamp(snr, max=cfg.min_snr_gamma) / snr
        loss = (F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3)) * weight).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        seen += cfg.batch
        if step % 100 == 0 or step == cfg.steps - 1:
            log({"stage": "unet", "step": step, "loss": loss.item(), "lr": lr,
                 "samples_per_s": seen / (time.perf_counter() - t0)})
    return ema_unet, ema_te


# --- the whole run -------------------------------------------------------------------------------

def pretrain(out_dir: str | Path = SHIPPED_DIR, cfg: PretrainConfig | None = None) -> dict:
    """Run every stage and save the pipeline (fp16 safetensors) plus pretrain_config.json and a log.

    It runs with cfg.threads threads and deterministic algorithms, and puts both settings back afterwards,
    so the process that called it computes as before (the tests train in the same process)."""
    cfg = cfg or PretrainConfig()
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return _pretrain(Path(out_dir), cfg)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def _pretrain(out_dir: Path, cfg: PretrainConfig) -> dict:
    from diffusers import StableDiffusionPipeline

    work = out_dir.parent / (out_dir.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    log_path = work / "pretrain_log.jsonl"
    log_path.write_text("")
    t_start = time.perf_counter()

    def log(record: dict) -> None:
        record["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    tokenizer, text_encoder, vae, unet, scheduler = build_components(work / "tokenizer", cfg.seed)
    pixels, captions = render_set(cfg.n_train, cfg.seed)
    holdout, _ = render_set(cfg.n_holdout, cfg.seed + 1000)
    log({"stage": "data", "n_train": len(captions)})

    vae_pixels = torch.cat([gamut_set(cfg.n_gamut, cfg.seed + 11), pixels[:cfg.vae_world]])
    vae_holdout = torch.cat([gamut_set(cfg.n_holdout, cfg.seed + 1011), holdout])
    vae_mse = train_vae(vae, vae_pixels, vae_holdout, cfg, log)
    del vae_pixels
    shift, std = centre_latents(vae, pixels)
    log({"stage": "vae_done", "holdout_mse": vae_mse, "latent_shift": shift, "latent_std": std})
    with torch.no_grad():
        both = torch.cat([pixels, pixels.flip(-1)])
        latents = torch.cat([vae.encode(both[i:i + 512]).latent_dist.mean for i in range(0, len(both), 512)])
        latents = latents * vae.config.scaling_factor
    vae.requires_grad_(False)

    ema_unet, ema_te = train_unet(unet, text_encoder, tokenizer, scheduler.config, latents, captions, cfg, log)
    # tokenize(truncation=True) leaves a truncation setting in the fast tokenizer's state; the shipped
    # tokenizer.json has none, and a re-run must write the same file
    tokenizer.backend_tokenizer.no_truncation()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=ema_te, tokenizer=tokenizer, unet=ema_unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.to(torch.float16)
    tmp = out_dir.parent / (out_dir.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    minutes = (time.perf_counter() - t_start) / 60
    summary = {"config": asdict(cfg), "vae_holdout_mse": vae_mse, "latent_shift": shift, "latent_std": std,
               "minutes": round(minutes, 1), "torch": torch.__version__}
    (tmp / "pretrain_config.json").write_text(json.dumps(summary, indent=2))
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    log({"stage": "saved", "path": str(out_dir), "minutes": minutes})
    return summary
