"""Named starting points for a training run: SD 1.5 and SDXL on a T4 or an A100/H100, and the toy model.

A preset is a set of TrainConfig fields; the notebooks' forms and `gpu_report` use them. A preset's memory
figure is the peak of its training step as benchmarks/memory.py estimates it without a GPU (the trainer's own
step on full-size models as fake tensors, stored in memory_table.json), plus MARGIN for the allocator's
reserved-but-free memory; benchmarks/train_step.py measures the real peak on a GPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..sd.precision import native_bf16, normalize_precision

SD15_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SDXL_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
SDXL_FP16_VAE = "madebyollin/sdxl-vae-fp16-fix"  # the SDXL VAE overflows in fp16; this one does not

MARGIN = 0.15   # over the estimated peak: PyTorch's caching allocator reserves more than it has allocated
_ESTIMATES: dict[str, float] = json.loads((Path(__file__).with_name("memory_table.json")).read_text())


def needs_gb(name: str) -> float:
    """GiB a GPU preset needs: its estimated peak (benchmarks/memory.py) plus MARGIN, to 0.1 GiB."""
    if name not in _ESTIMATES:
        raise KeyError(f"preset {name!r} has no memory estimate: run python benchmarks/memory.py --write-table")
    return round(_ESTIMATES[name] * (1 + MARGIN), 1)


@dataclass(frozen=True)
class Preset:
    """A named set of TrainConfig values and the GPU memory it is meant to fit in."""

    name: str
    family: str                 # sd1 | sdxl | toy
    gpu_gb: float               # GiB of GPU memory the preset needs (0: runs on a CPU), from needs_gb
    about: str
    values: dict[str, Any] = field(default_factory=dict)


_SD15_COMMON = dict(pretrained_model=SD15_MODEL, vae=None, family="sd1", resolution=512, min_bucket_reso=256,
                    max_bucket_reso=1024, rank=16, alpha=8.0, target="full", learning_rate=1e-4,
                    lr_scheduler="cosine", lr_warmup_steps=50, max_train_steps=1500, min_snr_gamma=5.0,
                    cache_latents=True, enable_bucket=True)
_SDXL_COMMON = dict(pretrained_model=SDXL_MODEL, vae=SDXL_FP16_VAE, family="sdxl", resolution=1024,
                    min_bucket_reso=512, max_bucket_reso=2048, rank=16, alpha=8.0, target="attention",
                    learning_rate=1e-4, lr_scheduler="cosine", lr_warmup_steps=50, max_train_steps=1500,
                    min_snr_gamma=5.0, cache_latents=True, enable_bucket=True)

PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("SD 1.5 · T4", "sd1", needs_gb("SD 1.5 · T4"),
           "fp16, batch 1, gradient checkpointing, 8-bit AdamW, cached latents: fits a 16 GB T4 with room",
           dict(_SD15_COMMON, mixed_precision="fp16", train_batch_size=1, gradient_accumulation_steps=2,
                gradient_checkpointing=True, optimizer="adamw8bit")),
    Preset("SD 1.5 · A100/H100", "sd1", needs_gb("SD 1.5 · A100/H100"), "bf16, batch 8, no checkpointing: speed first",
           dict(_SD15_COMMON, mixed_precision="bf16", train_batch_size=8, gradient_accumulation_steps=1,
                gradient_checkpointing=False, optimizer="adamw", learning_rate=2e-4, max_train_steps=800)),
    Preset("SDXL · T4", "sdxl", needs_gb("SDXL · T4"),
           "fp16 with the fp16-safe VAE, batch 1, gradient checkpointing, 8-bit AdamW, cached latents and "
           "cached text embeddings: the frozen text encoders and the VAE leave the GPU during the steps. Needs "
           "fixed tags (no tag shuffle or tag dropout)",
           dict(_SDXL_COMMON, mixed_precision="fp16", train_batch_size=1, gradient_accumulation_steps=2,
                gradient_checkpointing=True, optimizer="adamw8bit", cache_text_encoder_outputs=True)),
    Preset("SDXL · A100/H100", "sdxl", needs_gb("SDXL · A100/H100"), "bf16, batch 4, gradient checkpointing",
           dict(_SDXL_COMMON, vae=None, mixed_precision="bf16", train_batch_size=4, gradient_accumulation_steps=1,
                gradient_checkpointing=True, optimizer="adamw", learning_rate=2e-4, max_train_steps=1000)),
    Preset("Toy (CPU, offline)", "toy", 0.0,
           "the shipped toy model (32x32 shapes): a LoRA in about 3 minutes on a 2-core CPU; what the demo and "
           "the notebooks' toy mode train",
           dict(family="sd1", vae=None, resolution=32, enable_bucket=False, flip_aug=True, rank=16, alpha=16.0,
                target="full", learning_rate=1.6e-3, loraplus_lr_ratio=2.0, lr_scheduler="cosine", lr_warmup_steps=20,
                train_batch_size=32, max_train_steps=400, mixed_precision="no", optimizer="adamw",
                gradient_checkpointing=False, min_snr_gamma=5.0, cache_latents=True, cache_text_encoder_outputs=True,
                caption_dropout_rate=0.1, log_every_n_steps=25)),
)}


def toy_preset_values() -> dict[str, Any]:
    """The toy preset with the shipped toy model's path filled in."""
    from ..toy.pretrain import SHIPPED_DIR

    return dict(PRESETS["Toy (CPU, offline)"].values, pretrained_model=str(SHIPPED_DIR))


def preset_values(name: str) -> dict[str, Any]:
    """The TrainConfig values of preset `name` (KeyError lists the names)."""
    if name not in PRESETS:
        raise KeyError(f"no preset {name!r}; presets: {', '.join(PRESETS)}")
    return toy_preset_values() if PRESETS[name].family == "toy" else dict(PRESETS[name].values)


def runs_natively(preset: Preset, capability: tuple[int, int] | None) -> bool:
    """Whether the GPU of `capability` computes in the preset's precision in hardware (bf16 needs sm80+)."""
    precision = normalize_precision(preset.values.get("mixed_precision", "auto"))
    return precision != "bf16" or capability is None or native_bf16(capability)


def presets_that_fit(gpu_gb: float | None, capability: tuple[int, int] | None = None) -> list[Preset]:
    """Presets whose memory figure (estimated peak + MARGIN) fits a GPU of `gpu_gb` GiB (None: no GPU, only the
    toy preset) and, when the GPU's compute capability is given, whose precision it runs natively (no bf16 on a
    T4/V100)."""
    if not gpu_gb:
        return [p for p in PRESETS.values() if p.gpu_gb == 0]
    return [p for p in PRESETS.values() if p.gpu_gb <= gpu_gb * 0.95 and runs_natively(p, capability)]


def default_preset(gpu_gb: float | None, family: str = "sd1", capability: tuple[int, int] | None = None) -> str:
    """The preset a notebook starts from: the largest one of `family` that fits, else the toy one."""
    fits = [p for p in presets_that_fit(gpu_gb, capability) if p.family == family]
    if not fits:
        return "Toy (CPU, offline)"
    return max(fits, key=lambda p: p.gpu_gb).name
