"""Extract a LoRA (or LoCon) from a fine-tuned or DreamBooth model: its difference to the base model, layer by
layer, factored by SVD to a rank, with the factors' outliers clamped at a quantile as sd-scripts does (a few
extreme values otherwise dominate the fp16 file).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..formats.lora import LoraModule, LoraWeights


@dataclass
class Extracted:
    """One layer: the rank written and the share of the difference's Frobenius norm it keeps."""

    component: str
    name: str
    rank: int
    fro_retained: float


def factor_difference(diff: torch.Tensor, rank: int, clamp_quantile: float = 0.99) -> tuple[LoraModule, float]:
    """`diff` (Linear [out, in] or Conv [out, in, kh, kw]) as a rank-`rank` LoraModule (alpha = rank, scale 1)
    and the share of its norm kept; the factors are clamped to their `clamp_quantile` absolute value."""
    out_ch = diff.shape[0]
    flat = diff.reshape(out_ch, -1).double()
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
    k = max(1, min(rank, len(s)))
    up, down = u[:, :k] * s[:k], vh[:k]
    if clamp_quantile < 1.0:
        values = torch.cat([up.flatten(), down.flatten()]).abs().float()
        if values.numel() > 16_000_000:   # torch.quantile's limit: a strided sample estimates it
            values = values[:: values.numel() // 16_000_000 + 1]
        hi = float(torch.quantile(values, clamp_quantile))
        up, down = up.clamp(-hi, hi), down.clamp(-hi, hi)
    total = float((s ** 2).sum())
    kept = (float((s[:k] ** 2).sum()) / total) ** 0.5 if total > 0 else 1.0
    down = down.reshape(k, *diff.shape[1:]).float()
    up = up.reshape(out_ch, k, *([1] * (diff.ndim - 2))).float()
    return LoraModule(down=down.contiguous(), up=up.contiguous(), alpha=float(k)), kept


def extract_weights(base_pipe, tuned_pipe, rank: int, *, conv_rank: int | None = None, clamp_quantile: float = 0.99,
                    min_diff: float = 1e-6, text_encoder: bool = True) -> tuple[LoraWeights, list[Extracted]]:
    """The LoRA of `tuned_pipe` - `base_pipe` over every Linear and 1x1 conv (and 3x3 conv with `conv_rank`: a
    LoCon) of the UNet and, with `text_encoder`, the text encoders; layers that differ by less than `min_diff`
    everywhere are left out."""
    from ..formats.lora import pipe_components
    from ..sd.lora_targets import model_module_names

    weights: LoraWeights = {}
    report: list[Extracted] = []
    base_parts, tuned_parts = pipe_components(base_pipe), pipe_components(tuned_pipe)
    for comp, base_model in base_parts.items():
        if comp != "unet" and not text_encoder:
            continue
        tuned_names = model_module_names(tuned_parts[comp])
        for name, layer in model_module_names(base_model).items():
            if not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            wide = isinstance(layer, torch.nn.Conv2d) and layer.kernel_size != (1, 1)
            if wide and not conv_rank:
                continue
            other = tuned_names.get(name)
            if other is None or other.weight.shape != layer.weight.shape:
                raise ValueError(f"{comp}.{name}: the two models differ in structure; extract needs the fine-tuned "
                                 "model and the base it was trained from")
            diff = other.weight.detach().double() - layer.weight.detach().double()
            if float(diff.abs().max()) < min_diff:
                continue
            module, kept = factor_difference(diff, conv_rank if wide else rank, clamp_quantile)
            weights.setdefault(comp, {})[name] = module
            report.append(Extracted(comp, name, module.rank, kept))
    if not weights:
        raise ValueError(f"the two models are the same (no layer differs by {min_diff:g} or more): nothing to "
                         "extract")
    return weights, report


def extract_lora(base: str, tuned: str, dst: str | Path, rank: int, *, conv_rank: int | None = None,
                 clamp_quantile: float = 0.99, min_diff: float = 1e-6, text_encoder: bool = True,
                 dtype: torch.dtype = torch.float16) -> tuple[Path, list[Extracted]]:
    """Write the LoRA of model `tuned` minus model `base` (hub ids, diffusers folders or single files) to `dst`
    (kohya layout)."""
    from ..formats.lora import kohya_metadata, save_lora
    from ..sd.models import load_base

    if not 0.0 < clamp_quantile <= 1.0:
        raise ValueError(f"clamp_quantile is a quantile in (0, 1], got {clamp_quantile}")
    b, t = load_base(base, dtype=torch.float32), load_base(tuned, dtype=torch.float32)
    if b.family != t.family:
        raise ValueError(f"the base is {b.family} and the fine-tuned model {t.family}: extract needs the same family")
    weights, report = extract_weights(b.pipe, t.pipe, rank, conv_rank=conv_rank, clamp_quantile=clamp_quantile,
                                      min_diff=min_diff, text_encoder=text_encoder)
    meta = kohya_metadata(family=b.family, rank=rank, alpha=float(rank), output_name=Path(dst).stem,
                          resolution=b.pipe.unet.config.sample_size * b.pipe.vae_scale_factor, clip_skip=None,
                          num_train_images=0, tag_frequency={}, steps=0, epoch=0,
                          prediction_type=b.prediction_type,
                          extra={"ss_training_comment": f"extracted from {Path(tuned).name} minus {Path(base).name}"
                                                        f", rank {rank}"
                                                        + (f", conv rank {conv_rank}" if conv_rank else ""),
                                 **({"ss_network_args": json.dumps({"conv_dim": str(conv_rank),
                                                                    "conv_alpha": str(conv_rank)})}
                                    if conv_rank else {})})
    return save_lora(dst, weights, family=b.family, unet_config=b.pipe.unet.config, metadata=meta,
                     dtype=dtype), report
