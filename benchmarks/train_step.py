"""Speed and memory of one LoRA training step: our trainer's step against the diffusers example's step.

Builds full-size SD 1.5 (512x512) and SDXL (1024x1024) UNets and CLIP text encoders from their configs with
random weights (speed does not depend on weight values; nothing is downloaded), then times, for each LoRA
preset and each user setting, our step (built by `helpers.train.setup` and run as the loop body of
`helpers.train.loop.train`) and a reference step written the way diffusers' `train_text_to_image_lora.py` does it.
Model FLOPs per step are counted once per shape on the meta device. `--tiny` runs the tiny test models on
CPU: a smoke check of the whole path, not a measurement.

    python benchmarks/train_step.py --json bench.json                 # on a GPU
    python benchmarks/train_step.py --tiny --steps 2 --json smoke.json  # CPU smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import re
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

# ---------------------------------------------------------------------------------------------------------
# Model configs (diffusers UNet2DConditionModel / transformers CLIPTextConfig values of the released models)
# ---------------------------------------------------------------------------------------------------------

SD15_UNET: dict[str, Any] = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, act_fn="silu",
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True,
    freq_shift=0, downsample_padding=1, mid_block_scale_factor=1, center_input_sample=False,
)

SDXL_UNET: dict[str, Any] = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, act_fn="silu",
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0,
    downsample_padding=1, mid_block_scale_factor=1, center_input_sample=False,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)

CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu", projection_dim=768)          # SD 1.5's encoder, SDXL's first
CLIP_BIG_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                  hidden_act="gelu", projection_dim=1280)           # SDXL's second (with projection)
# the SD 1.x / SDXL VAE (diffusers AutoencoderKL; SDXL's has the same layers)
SD_VAE: dict[str, Any] = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                              block_out_channels=(128, 256, 512, 512))

# Dense fp16/bf16 tensor-core peaks in TFLOP/s (vendor data sheets, without sparsity).
PEAK_TFLOPS: dict[str, float] = {"T4": 65.0, "A100": 312.0, "L4": 121.0, "H100": 989.0, "H200": 989.0}
PEAK_TFLOPS_H100_PCIE = 756.0  # the PCIe card is slower than the SXM one the table gives

CAPTION = "a photo of sks dog on a red background, painting style"
PRESETS = ("attention", "full", "dreambooth")  # LoRA target presets; dreambooth: the whole UNet trained


@dataclass(frozen=True)
class Setting:
    """A user's training settings; what both steps run with."""

    name: str
    precision: str                       # fp16 | bf16 (resolved per device as the trainer does)
    batch: int
    gradient_checkpointing: bool | None  # None: on for SDXL only (batch 8 at 1024 px does not fit otherwise)
    optimizer: str                       # adamw8bit | adamw
    user: str

    def describe(self) -> str:
        ckpt = {True: "on", False: "off", None: "SDXL only"}[self.gradient_checkpointing]
        optim = {"adamw8bit": "8-bit AdamW", "adamw": "AdamW"}[self.optimizer]
        return (f"{self.user}: {self.precision}, batch {self.batch}, gradient checkpointing {ckpt}, {optim}, "
                f"cached latents (random latents; the VAE is not in the step)")


SETTINGS: dict[str, Setting] = {
    "t4": Setting("t4", "fp16", 1, True, "adamw8bit", "T4 user"),
    "a100": Setting("a100", "bf16", 8, None, "adamw", "A100/H100 user"),
}


@dataclass
class ModelSpec:
    """What to build for one model family: UNet config, text-encoder classes + configs, tokenizers."""

    family: str                 # "sd1" | "sdxl" (the project's family names)
    label: str
    resolution: int
    unet_config: dict[str, Any]
    text_encoders: list[tuple[type, Any]]
    tokenizers: list[Any]

    @property
    def latent_size(self) -> int:
        """Latent height/width: the UNet's sample size (resolution / 8 for the real VAEs, / 2 for the tiny one)."""
        return int(self.unet_config["sample_size"])


def _text_config(tokenizer, **sizes):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **sizes)


def full_size_specs(tok_dir: Path) -> dict[str, ModelSpec]:
    """SD 1.5 at 512 px and SDXL at 1024 px with their real layer sizes (random weights; a stand-in tokenizer)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from helpers.toy.tiny import load_tiny_tokenizer

    tok = load_tiny_tokenizer(tok_dir)
    return {
        "sd1": ModelSpec("sd1", "SD 1.5", 512, SD15_UNET, [(CLIPTextModel, _text_config(tok, **CLIP_L))], [tok]),
        "sdxl": ModelSpec("sdxl", "SDXL", 1024, SDXL_UNET,
                          [(CLIPTextModel, _text_config(tok, **CLIP_L)),
                           (CLIPTextModelWithProjection, _text_config(tok, **CLIP_BIG_G))], [tok, tok]),
    }


def tiny_specs(tok_dir: Path) -> dict[str, ModelSpec]:
    """The tiny test models of `helpers.toy.tiny` (32 px images, 16x16 latents), as configs."""
    from helpers.toy.tiny import build_tiny_sd15, build_tiny_sdxl

    sd = build_tiny_sd15(tok_dir)
    xl = build_tiny_sdxl(tok_dir)
    return {
        "sd1": ModelSpec("sd1", "tiny SD 1.5", 32, dict(sd.unet.config),
                         [(type(sd.text_encoder), sd.text_encoder.config)], [sd.tokenizer]),
        "sdxl": ModelSpec("sdxl", "tiny SDXL", 32, dict(xl.unet.config),
                          [(type(xl.text_encoder), xl.text_encoder.config),
                           (type(xl.text_encoder_2), xl.text_encoder_2.config)], [xl.tokenizer, xl.tokenizer_2]),
    }


def build_models(spec: ModelSpec, device: torch.device | str, dtype: torch.dtype):
    """The UNet and text encoders of `spec`, initialised randomly directly on `device` in `dtype`
    (no fp32 copy first: an SDXL UNet in fp32 would not fit next to its fp16 copy on a 16 GB T4)."""
    from diffusers import UNet2DConditionModel

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            unet = UNet2DConditionModel.from_config(spec.unet_config)
            text_encoders = [cls(cfg) for cls, cfg in spec.text_encoders]
    finally:
        torch.set_default_dtype(old)
    for te in text_encoders:
        te.eval()  # as from_pretrained leaves them
    return unet, text_encoders


def noise_scheduler():
    """SD 1.5's and SDXL's training schedule (DDPM, scaled-linear betas, epsilon prediction)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000, prediction_type="epsilon")


# ---------------------------------------------------------------------------------------------------------
# FLOPs (meta device) and the GPU's peak
# ---------------------------------------------------------------------------------------------------------

def count_step_flops(spec: ModelSpec, preset: str, rank: int, batch: int, encode_text: bool = True) -> int:
    """Model FLOPs of one LoRA training step: text encoding (when done per step), UNet forward, loss and
    backward with a frozen base, counted on the meta device (CPU tensors count nothing for SDPA).
    Gradient-checkpoint recomputation is not counted: MFU uses model FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    from helpers.sd.text_encoding import encode_prompts
    from helpers.train.setup import attach_methods

    cfg = _config(SETTINGS["a100"], preset, rank, spec.family).replace(gradient_checkpointing=False)
    unet, tes = build_models(spec, "meta", torch.float32)
    attach_methods(cfg, unet, tes, spec.tokenizers, torch.device("meta"))  # LoRA layers, or the whole UNet
    size = spec.latent_size
    latents = torch.zeros(batch, unet.config.in_channels, size, size, device="meta")
    timesteps = torch.zeros(batch, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter:
        if encode_text:
            with torch.no_grad():
                emb = encode_prompts(spec.family, spec.tokenizers, tes, [CAPTION] * batch, device="meta")
            hidden, pooled = emb.hidden, emb.pooled
        else:
            width = unet.config.cross_attention_dim
            hidden = torch.zeros(batch, 77, width, device="meta")
            pooled = torch.zeros(batch, tes[-1].config.projection_dim, device="meta")
        kwargs: dict[str, Any] = {"encoder_hidden_states": hidden}
        if spec.family == "sdxl":
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": torch.zeros(batch, 6, device="meta")}
        pred = unet(latents, timesteps, **kwargs).sample
        F.mse_loss(pred.float(), latents.float()).backward()
    return int(counter.get_total_flops())


def peak_tflops(device_name: str) -> float | None:
    """Dense fp16/bf16 peak of a GPU recognised by name (`torch.cuda.get_device_name`), else None."""
    name = device_name.upper()
    if re.search(r"\bH100\b", name) and "PCIE" in name:
        return PEAK_TFLOPS_H100_PCIE
    for key, value in PEAK_TFLOPS.items():
        if re.search(rf"\b{key}\b", name):
            return value
    return None


# ---------------------------------------------------------------------------------------------------------
# The two steps
# ---------------------------------------------------------------------------------------------------------

@dataclass
class StepOptions:
    """Options of our step (the reference always runs as the diffusers example does)."""

    channels_last: bool = False
    adamw_impl: str = "auto"      # auto (build_optimizer's choice: fused on CUDA) | fused | foreach | forloop
    compile: bool = False
    cached_text: bool = False
    step_syncs: bool = True       # the reference's per-step loss read-back for logging (ours has none)


@dataclass
class Prepared:
    """A ready-to-time step: `step()` returns the detached loss (a device tensor; nothing is read back)."""

    step: Callable[[], torch.Tensor]
    accelerator: Any
    info: dict[str, Any] = field(default_factory=dict)
    counters: Callable[[], dict[str, Any]] = dict  # read once, after timing


def _config(setting: Setting, preset: str, rank: int, family: str, opts: StepOptions | None = None):
    """The TrainConfig a user with `setting` would write for this preset (what our step runs with)."""
    from helpers.config import TrainConfig

    opts = opts or StepOptions()
    dreambooth = preset == "dreambooth"
    return TrainConfig(pretrained_model="benchmark", train_data_dir="benchmark", rank=rank, alpha=float(rank),
                       method="dreambooth" if dreambooth else "lora", target="full" if dreambooth else preset,
                       optimizer=setting.optimizer, train_batch_size=setting.batch, mixed_precision=setting.precision,
                       gradient_checkpointing=_gradient_checkpointing(setting, family), attention="sdpa",
                       channels_last=opts.channels_last, torch_compile=opts.compile)


def _accelerator(cfg, device: torch.device):
    """The trainer's accelerator for `cfg` (a fresh precision setting per row)."""
    from helpers.train.setup import make_accelerator

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # fp16 -> fp32 on CPU; the row records what ran
        return make_accelerator(cfg, device.type)


def _batch(spec: ModelSpec, batch: int, device: torch.device, dtype: torch.dtype = torch.float32) -> dict:
    """A batch as the trainer's loader hands it over with cached latents (already on the device)."""
    size = spec.latent_size
    gen = torch.Generator().manual_seed(0)
    res = spec.resolution
    return {
        "latents": torch.randn(batch, 4, size, size, generator=gen).to(device, dtype),
        "captions": [CAPTION] * batch,
        "original_size": torch.tensor([[res, res]] * batch, device=device),
        "crop_top_left": torch.tensor([[0, 0]] * batch, device=device),
        "target_size": torch.tensor([[res, res]] * batch, device=device),
        "is_class": torch.zeros(batch, dtype=torch.bool, device=device),
    }


def _gradient_checkpointing(setting: Setting, family: str) -> bool:
    return setting.gradient_checkpointing if setting.gradient_checkpointing is not None else family == "sdxl"


def prepare_ours(spec: ModelSpec, setting: Setting, preset: str, rank: int, device: torch.device,
                 opts: StepOptions) -> Prepared:
    """Our step, built by the trainer's own code: `helpers.train.setup` (accelerator, `attach_methods`: frozen
    base in the compute dtype, peft LoRA or the whole UNet in fp32, checkpointing, channels-last, compile;
    `param_groups`, `make_step`, `make_update`) and the loop body of `helpers.train.loop.train`: the
    `DiffusionStep` loss, the `NanWatch` note, the `OptimizerStep` update."""
    from helpers.sd.models import set_attention
    from helpers.train.optim import build_optimizer, build_scheduler, optimizer_kind
    from helpers.train.progress import NanWatch
    from helpers.train.setup import attach_methods, make_step, make_update, param_groups

    cfg = _config(setting, preset, rank, spec.family, opts)
    acc, weight_dtype = _accelerator(cfg, device)
    unet, tes = build_models(spec, acc.device, weight_dtype)
    attention = set_attention(unet, cfg.attention)
    methods = attach_methods(cfg, unet, tes, spec.tokenizers, acc.device)
    groups = param_groups(cfg, methods)
    if opts.adamw_impl != "auto" and cfg.optimizer == "adamw":
        impl = {"fused": {"fused": True}, "foreach": {"foreach": True}, "forloop": {"foreach": False}}[opts.adamw_impl]
        optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                      eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay, **impl)
    else:
        optimizer = build_optimizer(cfg.optimizer, groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                    betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
    kind = optimizer_kind(optimizer)
    if kind == "adamw":
        d = optimizer.defaults
        kind += " (fused)" if d.get("fused") else " (foreach)" if d.get("foreach") in (True, None) else " (for-loop)"
    lr_scheduler = build_scheduler(cfg.lr_scheduler, optimizer, warmup_steps=0, total_steps=cfg.max_train_steps)
    unet, optimizer, lr_scheduler = acc.prepare(unet, optimizer, lr_scheduler)
    unet.train()
    batch = _batch(spec, setting.batch, acc.device)
    loss_of = make_step(cfg, methods, spec.family, noise_scheduler(), spec.tokenizers, tes, acc.device, weight_dtype)
    if opts.cached_text:  # text embeddings computed once (the trainer encodes every step)
        with torch.no_grad():
            cached = loss_of.condition(batch)
        loss_of.condition = lambda batch: cached
    update = make_update(cfg, methods, acc, optimizer, lr_scheduler)
    watch = NanWatch(cfg.nan_policy, acc)  # "stop": a bad loss is noted on the device, never read per step
    gen = torch.Generator(device=acc.device).manual_seed(cfg.seed)

    nonfinite = torch.zeros((), dtype=torch.long, device=acc.device)  # the harness's own count, read after timing

    def step() -> torch.Tensor:
        nonlocal nonfinite
        with acc.accumulate(unet):
            loss = loss_of.loss(unet, batch, gen)
            nonfinite += (~torch.isfinite(loss.detach())).long()
            if watch.finite(loss, 1, None):
                update(loss)
            else:
                update.discard()
        return loss.detach()

    params = update.params
    info = {"precision": acc.mixed_precision, "gradient_checkpointing": cfg.gradient_checkpointing,
            "optimizer": kind, "attention": attention, "trainable_params": sum(p.numel() for p in params),
            "lora_params_dtype": str(params[0].dtype).removeprefix("torch."),
            "channels_last": opts.channels_last, "compile": opts.compile, "cached_text": opts.cached_text}
    return Prepared(step, acc, info, lambda: {"nonfinite_steps": int(nonfinite)})


def prepare_reference(spec: ModelSpec, setting: Setting, preset: str, rank: int, device: torch.device,
                      opts: StepOptions) -> Prepared:
    """The step of diffusers' `train_text_to_image_lora.py` (and `_sdxl.py`) with the same settings and LoRA
    targets: token ids from the loader, text encoded every step, noise + timesteps, UNet, MSE, the logged loss
    gathered and read back, backward, clip, step. LoRA params are cast to fp32 only for fp16, as there."""
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    from helpers.sd.lora_targets import inject_lora, unet_target_modules
    from helpers.sd.text_encoding import tokenize

    cfg = _config(setting, preset, rank, spec.family)
    acc, weight_dtype = _accelerator(cfg, device)
    ckpt = cfg.gradient_checkpointing
    unet, tes = build_models(spec, acc.device, weight_dtype)
    for m in [unet, *tes]:
        m.requires_grad_(False)
    inject_lora(unet, LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=unet_target_modules(unet, preset)))
    if acc.mixed_precision == "fp16":
        cast_training_params(unet, dtype=torch.float32)
    if ckpt:
        unet.enable_gradient_checkpointing()
    lora_params = [p for p in unet.parameters() if p.requires_grad]
    lr, betas, wd, eps = 1e-4, (0.9, 0.999), 1e-2, 1e-8
    if setting.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(lora_params, lr=lr, betas=betas, weight_decay=wd, eps=eps)
    else:
        optimizer = torch.optim.AdamW(lora_params, lr=lr, betas=betas, weight_decay=wd, eps=eps)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0, num_training_steps=1600)
    unet, optimizer, lr_scheduler = acc.prepare(unet, optimizer, lr_scheduler)
    unet.train()
    sched = noise_scheduler()
    bsz = setting.batch
    latents = _batch(spec, bsz, acc.device, weight_dtype)["latents"]  # as the VAE hands them over
    input_ids = [tokenize(tok, [CAPTION] * bsz).to(acc.device) for tok in spec.tokenizers]  # from the loader
    res = spec.resolution
    logged = {"train_loss": 0.0}

    def encode() -> dict[str, Any]:
        if spec.family != "sdxl":
            return {"encoder_hidden_states": tes[0](input_ids[0], return_dict=False)[0]}
        hidden, pooled = [], None
        for te, ids in zip(tes, input_ids):
            out = te(ids, output_hidden_states=True, return_dict=False)
            pooled = out[0]               # the second encoder's projected pooled output wins
            hidden.append(out[-1][-2])    # penultimate layer
        time_ids = torch.cat([torch.tensor([[res, res, 0, 0, res, res]]) for _ in range(bsz)])
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1),
                "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids.to(acc.device, weight_dtype)}}

    def step() -> torch.Tensor:
        with acc.accumulate(unet):
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, sched.config.num_train_timesteps, (bsz,), device=latents.device).long()
            noisy = sched.add_noise(latents, noise, timesteps)
            cond = encode()
            target = noise
            pred = unet(noisy, timesteps, cond.pop("encoder_hidden_states"), return_dict=False, **cond)[0]
            loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
            if opts.step_syncs:
                logged["train_loss"] += acc.gather(loss.repeat(bsz)).mean().item()
            acc.backward(loss)
            if acc.sync_gradients:
                acc.clip_grad_norm_(lora_params, 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
        return loss.detach()

    info = {"precision": acc.mixed_precision, "gradient_checkpointing": ckpt,
            "optimizer": "adamw8bit" if setting.optimizer == "adamw8bit" else "adamw (torch default)",
            "attention": "sdpa", "trainable_params": sum(p.numel() for p in lora_params),
            "lora_params_dtype": str(lora_params[0].dtype).removeprefix("torch."),
            "channels_last": False, "compile": False, "cached_text": False}
    return Prepared(step, acc, info, dict)


# ---------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------

def time_step(prepared: Prepared, warmup: int, steps: int) -> dict[str, Any]:
    """Warm up (first step timed alone: it holds compilation), then time `steps` steps with CUDA events
    (wall clock on CPU). The harness reads nothing back inside the timed loop; the loss comes back at the end."""
    device = prepared.accelerator.device
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    scaler = getattr(prepared.accelerator, "scaler", None)
    t0 = time.perf_counter()
    loss = prepared.step()
    sync()
    first_step_s = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        loss = prepared.step()
    sync()
    if not math.isfinite(loss.float().item()):
        raise FloatingPointError("loss is NaN/inf after warm-up: the random weights overflow in this precision")
    scale_before = scaler.get_scale() if scaler is not None else None
    total = torch.zeros((), device=device)
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    sync()
    t0 = time.perf_counter()
    if cuda:
        start.record()
    for _ in range(steps):
        total += prepared.step().float()
    if cuda:
        end.record()
    sync()
    wall = time.perf_counter() - t0
    elapsed = start.elapsed_time(end) / 1e3 if cuda else wall
    out: dict[str, Any] = {"seconds": elapsed, "wall_seconds": wall, "first_step_s": first_step_s,
                           "loss": (total / steps).item()}
    if scale_before is not None:  # fp16: each overflow halves the scale and skips that optimizer step
        out["scaler_skipped_steps"] = max(0, round(math.log2(scale_before / scaler.get_scale())))
    return out


def count_syncs(prepared: Prepared, steps: int = 3) -> float | None:
    """Host-device synchronisations per step, counted by CUDA's sync debug mode over `steps` more steps
    (None on CPU). fp16 has GradScaler's inf check in it; ours should have nothing else."""
    if prepared.accelerator.device.type != "cuda":
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                prepared.step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    return sum("synchroniz" in str(w.message) for w in caught) / steps


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------

def _free(device: torch.device) -> None:
    """Give the last row's GPU memory back and restart the peak counters (a no-op on CPU: gc.collect over
    diffusers' and transformers' object graph costs ~0.2 s a call, and CPU memory is not measured)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def run_row(spec: ModelSpec, setting: Setting, preset: str, impl: str, args, device: torch.device,
            flops_cache: dict, peak: float | None) -> dict[str, Any]:
    """Build, warm up and time one (model, setting, preset, impl) combination; errors become the row's status."""
    opts = StepOptions(channels_last=args.channels_last, adamw_impl=args.adamw, compile=args.compile,
                       cached_text=args.cached_text, step_syncs=not args.no_step_syncs)
    row: dict[str, Any] = {"model": spec.label, "family": spec.family, "resolution": spec.resolution,
                           "setting": setting.name, "preset": preset, "rank": args.rank, "impl": impl,
                           "batch": setting.batch, "cached_latents": True, "step_syncs": opts.step_syncs,
                           "steps": args.steps, "warmup": args.warmup}
    if device.type == "cuda" and setting.precision == "bf16" and torch.cuda.get_device_capability(device)[0] < 8:
        row["status"] = "skipped: bf16 needs an Ampere or newer GPU"
        return row
    encode_text = not (impl == "ours" and opts.cached_text)
    key = (spec.family, preset, args.rank, encode_text)
    if key not in flops_cache:  # FLOPs are linear in the batch (tests check it): count one sample
        flops_cache[key] = count_step_flops(spec, preset, args.rank, 1, encode_text)
    row["flops_per_step"] = setting.batch * flops_cache[key]
    _free(device)
    prepared = None
    try:
        builder = prepare_ours if impl == "ours" else prepare_reference
        prepared = builder(spec, setting, preset, args.rank, device, opts)
        row.update(prepared.info)
        timing = time_step(prepared, args.warmup, args.steps)
        row["syncs_per_step"] = count_syncs(prepared)
        row.update(prepared.counters())
        sec = timing["seconds"] / args.steps
        row.update({
            "status": "ok",
            "ms_per_step": sec * 1e3,
            "images_per_s": setting.batch / sec,
            "tflops_per_s": row["flops_per_step"] / sec / 1e12,
            "mfu": (row["flops_per_step"] / sec / (peak * 1e12)) if peak and row["precision"] != "no" else None,
            "first_step_s": timing["first_step_s"],
            "compile_s": max(0.0, timing["first_step_s"] - sec) if row.get("compile") else None,
            "loss": timing["loss"],
        })
        if "scaler_skipped_steps" in timing:
            row["scaler_skipped_steps"] = timing["scaler_skipped_steps"]
        if device.type == "cuda":
            row["peak_mem_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            row["peak_mem_reserved_gb"] = torch.cuda.max_memory_reserved(device) / 2**30
        else:
            row["peak_mem_allocated_gb"] = row["peak_mem_reserved_gb"] = None
    except torch.OutOfMemoryError:
        row["status"] = "out of memory"
    except Exception as e:  # one failing row should not lose the others; the traceback goes to stderr
        traceback.print_exc()
        row["status"] = f"error: {type(e).__name__}: {e}"
    finally:
        if prepared is not None and device.type == "cuda":
            prepared.accelerator.free_memory()  # drops accelerate's references to the models and optimizer
        del prepared
        if opts.compile:
            torch._dynamo.reset()
        _free(device)
    return row


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """`ratio` = ours images/s over the reference's for the same model, setting and preset (1.0 on reference
    rows; None where either side did not run)."""
    ref = {(r["family"], r["setting"], r["preset"]): r for r in rows if r["impl"] == "reference"}
    for r in rows:
        other = ref.get((r["family"], r["setting"], r["preset"]))
        ok = r.get("status") == "ok" and other is not None and other.get("status") == "ok"
        r["ratio"] = r["images_per_s"] / other["images_per_s"] if ok else None


def _fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return format(value, spec) if spec else str(value)


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width text table of the rows."""
    cols = [("model", "model", ""), ("setting", "setting", ""), ("preset", "preset", ""), ("impl", "impl", ""),
            ("prec", "precision", ""), ("bs", "batch", ""), ("ckpt", "gradient_checkpointing", ""),
            ("optim", "optimizer", ""), ("img/s", "images_per_s", ".2f"), ("ms/step", "ms_per_step", ".1f"),
            ("alloc GB", "peak_mem_allocated_gb", ".2f"), ("resv GB", "peak_mem_reserved_gb", ".2f"),
            ("GFLOP/step", "flops_per_step", ""), ("TFLOP/s", "tflops_per_s", ".1f"), ("MFU", "mfu", ".1%"),
            ("ours/ref", "ratio", ".2f"), ("syncs", "syncs_per_step", ".1f"), ("status", "status", "")]
    cells = []
    for r in rows:
        line = []
        for _, key, spec in cols:
            v = r.get(key)
            if key == "flops_per_step" and v is not None:
                v = v / 1e9
                spec = ",.0f" if v >= 100 else ".3g"
            line.append(_fmt(v, spec))
        cells.append(line)
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, (h, _, _) in enumerate(cols)]
    out = ["  ".join(h.ljust(w) for (h, _, _), w in zip(cols, widths))]
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in cells]
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny test models (CPU smoke check; numbers mean nothing)")
    p.add_argument("--families", default="sd1,sdxl", help="comma list of sd1, sdxl")
    p.add_argument("--settings", default="t4,a100", help="comma list of " + ", ".join(SETTINGS))
    p.add_argument("--presets", default="attention,full",
                   help="comma list of LoRA presets, and/or dreambooth (full UNet; no reference step)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=10, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; 1 with --tiny)")
    p.add_argument("--a100-batch", type=int, default=8, help="batch size of the a100 setting")
    p.add_argument("--a100-grad-ckpt", choices=("auto", "on", "off"), default="auto",
                   help="gradient checkpointing in the a100 setting (auto: SDXL only)")
    p.add_argument("--channels-last", action="store_true", help="ours: UNet in channels-last memory format")
    p.add_argument("--adamw", choices=("auto", "fused", "foreach", "forloop"), default="auto",
                   help="ours, AdamW settings: implementation (auto = helpers.train.optim's choice, fused on CUDA)")
    p.add_argument("--compile", action="store_true", help="ours: torch.compile the UNet (compile time reported)")
    p.add_argument("--cached-text", action="store_true", help="ours: text embeddings computed once, not per step")
    p.add_argument("--no-step-syncs", action="store_true",
                   help="drop the reference's per-step loss read-back (ours reads nothing back per step)")
    p.add_argument("--no-reference", action="store_true", help="time our step only")
    p.add_argument("--peak-tflops", type=float, default=None, help="GPU peak for MFU when the name is not known")
    p.add_argument("--json", type=Path, default=None, help="write the rows and run info here")
    args = p.parse_args(argv)
    if args.warmup is None:
        args.warmup = 1 if args.tiny else 5
    for name, allowed in (("families", ("sd1", "sdxl")), ("settings", tuple(SETTINGS)), ("presets", PRESETS)):
        values = [v.strip() for v in getattr(args, name).split(",") if v.strip()]
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            p.error(f"--{name}: {bad or 'nothing'} not in {allowed}")
        setattr(args, name, values)
    if args.steps < 1 or args.warmup < 1:
        p.error("--steps and --warmup must be at least 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print the table; return (and with --json write) the results."""
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.tiny:
        print("no CUDA GPU: full-size models on CPU would take hours; use --tiny for a smoke run", file=sys.stderr)
        raise SystemExit(2)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or (peak_tflops(device_name) if device.type == "cuda" else None)
    settings = {}
    for name in args.settings:
        s = SETTINGS[name]
        if name == "a100":
            s = replace(s, batch=args.a100_batch,
                        gradient_checkpointing={"auto": None, "on": True, "off": False}[args.a100_grad_ckpt])
        settings[name] = s
    with tempfile.TemporaryDirectory() as tmp:
        from helpers.toy.tiny import write_clip_tokenizer

        tok_dir = write_clip_tokenizer(Path(tmp) / "tokenizer")
        specs = (tiny_specs if args.tiny else full_size_specs)(tok_dir)
        impls = ["ours"] if args.no_reference else ["ours", "reference"]
        rows, flops_cache = [], {}
        for family in args.families:
            for setting in settings.values():
                for preset in args.presets:
                    for impl in (["ours"] if preset == "dreambooth" else impls):
                        row = run_row(specs[family], setting, preset, impl, args, device, flops_cache, peak)
                        rows.append(row)
                        print(f"{row['model']} {setting.name} {preset} {impl}: {row.get('status')}"
                              + (f", {row['images_per_s']:.2f} img/s" if row.get("status") == "ok" else ""),
                              file=sys.stderr, flush=True)
    add_ratios(rows)
    import diffusers
    import peft

    result = {
        "device": device_name, "peak_tflops": peak, "tiny": args.tiny,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__},
        "settings": {name: s.describe() for name, s in settings.items()},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "rows": rows,
    }
    print(f"device: {device_name}; peak {peak or '-'} TFLOP/s dense fp16/bf16; "
          f"{args.steps} timed steps after {args.warmup} warm-up")
    for name, s in settings.items():
        print(f"  {name}: {s.describe()}")
    print(format_table(rows))
    if args.tiny:
        print("(--tiny: tiny models on CPU, a smoke check; the timings mean nothing)")
    if args.json:
        from helpers.atomic import write_text

        write_text(args.json, json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
