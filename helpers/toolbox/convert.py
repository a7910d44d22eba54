"""Convert a LoRA between the kohya/sd-scripts layout (A1111, ComfyUI) and the diffusers/peft layout, both
ways, every alpha kept. Reading matches each key to a module of the base model, so the model's structure is
needed, not its weights: it is built on the meta device from the model's config (a diffusers folder or hub
id), which costs no memory.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

TARGETS = ("kohya", "diffusers")


def model_skeleton(model: str, *, local_files_only: bool | None = None) -> SimpleNamespace:
    """The base model's UNet and text encoder(s) with meta-device weights (structure only), from its configs."""
    import os

    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    offline = local_files_only if local_files_only is not None else os.environ.get("HF_HUB_OFFLINE") == "1"
    kwargs = {"local_files_only": offline}
    unet_cfg = UNet2DConditionModel.load_config(model, subfolder="unet", **kwargs)
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(unet_cfg)
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(model, subfolder="text_encoder", **kwargs))
        te2 = None
        if unet_cfg.get("addition_embed_type") == "text_time":
            te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(model, subfolder="text_encoder_2",
                                                                             **kwargs))
    return SimpleNamespace(unet=unet, text_encoder=te, text_encoder_2=te2)


def convert_lora(src: str | Path, dst: str | Path, *, to: str, model: str,
                 dtype: torch.dtype | None = None) -> Path:
    """Write `src` (any layout `helpers` reads) as `to` ("kohya": one .safetensors; "diffusers": a folder) for
    the base `model`; the sd-scripts metadata goes along, tensors keep their dtype unless `dtype` is given."""
    from ..files import load_safetensors
    from ..formats.lora import load_lora, save_lora
    from ..sd.models import detect_family

    if to not in TARGETS:
        raise ValueError(f"to must be one of {', '.join(TARGETS)}, got {to!r}")
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise ValueError("convert writes a new file: give an output path other than the input")
    skeleton = model_skeleton(model)
    weights, meta = load_lora(src, skeleton)
    if dtype is None:
        file = src if src.is_file() else next(src.glob("*.safetensors"))
        first = next(iter(load_safetensors(file, "LoRA file")[0].values()))
        dtype = first.dtype
    keep = {k: v for k, v in meta.items() if k.startswith(("ss_", "modelspec."))}
    return save_lora(dst, weights, family=detect_family(skeleton.unet.config), unet_config=skeleton.unet.config,
                     format=to, metadata=keep, dtype=dtype)
