"""Generate images: samplers by their AUTOMATIC1111 names, LoRAs at chosen weights, seeds that
reproduce, and PNGs that carry A1111's `parameters` text so other tools can read the settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image, PngImagePlugin

from .atomic import atomic_path

# A1111 sampler name -> (diffusers scheduler class name, extra config)
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "DDIM": ("DDIMScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                 "use_karras_sigmas": False}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                        "use_karras_sigmas": True}),
    "DPM++ 2M SDE Karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++",
                                                            "solver_order": 2, "use_karras_sigmas": True}),
    "UniPC": ("UniPCMultistepScheduler", {}),
}


def set_sampler(pipe, name: str) -> None:
    """Swap the pipeline's scheduler for the A1111 sampler `name`, keeping the model's noise schedule."""
    import diffusers

    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")
    cls_name, extra = SAMPLERS[name]
    cls = getattr(diffusers, cls_name)
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **extra)


def _prompt_kwargs(pipe, family: str, prompts: list[str], negative_prompt: str, clip_skip: int) -> dict:
    """Pipeline keyword arguments carrying the prompt with A1111's clip skip.

    diffusers' own `clip_skip` counts layers skipped (A1111 value - 1), and its SD 1.x/2.x path
    crashes with transformers 5 (`CLIPTextModel` lost `.text_model`), so for those we encode here.
    """
    n = len(prompts)
    if clip_skip <= 1:
        return {"prompt": prompts, "negative_prompt": [negative_prompt] * n}
    if family == "sdxl":
        return {"prompt": prompts, "negative_prompt": [negative_prompt] * n, "clip_skip": clip_skip - 1}
    from .text_encoding import encode_prompts

    device = pipe._execution_device
    pos = encode_prompts(family, [pipe.tokenizer], [pipe.text_encoder], prompts, clip_skip=clip_skip,
                         device=device).hidden
    neg = encode_prompts(family, [pipe.tokenizer], [pipe.text_encoder], [negative_prompt] * n,
                         clip_skip=clip_skip, device=device).hidden
    return {"prompt_embeds": pos, "negative_prompt_embeds": neg}


def a1111_parameters(prompt: str, negative_prompt: str, *, steps: int, sampler: str, cfg_scale: float, seed: int,
                     width: int, height: int, model: str | None = None, clip_skip: int = 1,
                     loras: list[tuple[str, float]] | None = None) -> str:
    """The `parameters` text A1111 writes into a PNG (prompt, negative prompt, one settings line).

    LoRAs go into the prompt as `<lora:name:weight>`, as A1111 writes them."""
    for name, weight in loras or []:
        tag = f"<lora:{name}:{weight:g}>"
        if tag not in prompt:
            prompt = f"{prompt} {tag}".strip()
    fields = [f"Steps: {steps}", f"Sampler: {sampler}", f"CFG scale: {cfg_scale:g}", f"Seed: {seed}",
              f"Size: {width}x{height}"]
    if model:
        fields.append(f"Model: {model}")
    if clip_skip > 1:
        fields.append(f"Clip skip: {clip_skip}")
    text = prompt
    if negative_prompt:
        text += f"\nNegative prompt: {negative_prompt}"
    return text + "\n" + ", ".join(fields)


def generate(pipe, prompt: str | list[str], *, negative_prompt: str = "", steps: int = 20, cfg_scale: float = 7.0,
             seed: int = 0, sampler: str | None = "Euler a", width: int | None = None, height: int | None = None,
             num_images: int = 1, clip_skip: int = 1, family: str | None = None, model_name: str | None = None,
             loras: list[tuple[str, float]] | None = None) -> tuple[list[Image.Image], list[str]]:
    """Generate `num_images` images of `prompt`, or one image per prompt of a list; image i uses
    seed `seed + i` (as A1111 does), so any single image can be remade alone. Returns the images and
    their A1111 parameter texts."""
    prompts = list(prompt) if isinstance(prompt, (list, tuple)) else [prompt] * num_images
    num_images = len(prompts)
    if family is None:
        from .models import detect_family

        family = detect_family(pipe)
    if sampler:
        set_sampler(pipe, sampler)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    width, height = width or size, height or size
    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(num_images)]
    kwargs = _prompt_kwargs(pipe, family, prompts, negative_prompt, clip_skip)
    with torch.no_grad():
        images = pipe(**kwargs, num_inference_steps=steps, guidance_scale=cfg_scale, width=width, height=height,
                      generator=generators).images
    params = [a1111_parameters(prompts[i], negative_prompt, steps=steps, sampler=sampler or type(pipe.scheduler).__name__,
                               cfg_scale=cfg_scale, seed=seed + i, width=width, height=height, model=model_name,
                               clip_skip=clip_skip, loras=loras) for i in range(num_images)]
    return images, params


def save_png(image: Image.Image, path: str | Path, parameters: str | None = None) -> Path:
    """Save a PNG with an A1111-style `parameters` text chunk, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return path


def read_png_parameters(path: str | Path) -> str | None:
    """The `parameters` text of a PNG written by A1111 or by us (None if absent)."""
    with Image.open(path) as im:
        return im.info.get("parameters")


def load_loras(pipe, loras: list[tuple[str | Path, float]]) -> list[str]:
    """Load LoRA files into `pipe` and activate them together at their weights.

    Each entry is (path, weight); files may be kohya/A1111 or diffusers layout. Returns the adapter names.
    """
    from .lora_io import apply_lora, load_lora

    names: list[str] = []
    for i, (path, weight) in enumerate(loras):
        weights, _ = load_lora(path, pipe)
        name = f"lora{i}_{Path(path).stem}".replace(".", "_")
        apply_lora(pipe, weights, adapter_name=name, scale=weight)
        names.append(name)
    if names:
        pipe.set_adapters(names, adapter_weights=[float(w) for _, w in loras])
    return names
