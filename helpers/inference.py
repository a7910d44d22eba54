"""Generate images: samplers by their AUTOMATIC1111 names, LoRAs at chosen weights, Textual Inversion
embeddings, A1111 prompt weighting, seeds that reproduce, memory options for small GPUs, and PNGs that
carry A1111's `parameters` text (written and read back) so other tools can read the settings."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import inspect
import io
import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from PIL import Image, PngImagePlugin

from .atomic import atomic_path

# ----------------------------------------------------------------------------------- samplers

# Noise-schedule keys taken from the model's own scheduler config; everything else comes from the
# sampler, so switching samplers never carries one sampler's settings (e.g. Karras sigmas) into the next.
_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                  "prediction_type", "rescale_betas_zero_snr")
_KDIFF = {"timestep_spacing": "linspace"}  # k-diffusion (A1111's samplers) spaces sigmas over the full range
_KARRAS = {**_KDIFF, "use_karras_sigmas": True}
_NOT_KARRAS = {**_KDIFF, "use_karras_sigmas": False}
# A1111's DDIM/PLMS (CompVis samplers): "uniform" discretization = steps 1, 1+c, 1+2c, ... and the
# last step's alpha is alphas_cumprod[0] (set_alpha_to_one=False), no sample clipping.
_COMPVIS = {"timestep_spacing": "leading", "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False}

# A1111 sampler name -> (diffusers scheduler class name, config), after diffusers' "A1111/k-diffusion
# -> Diffusers" scheduler table. "DPM++ SDE" is k-diffusion's sample_dpmpp_sde, which diffusers ports as
# DPMSolverSDEScheduler (torchsde Brownian tree, like A1111); UniPC uses A1111's default settings
# (variant bh1, order 3, lower order final). Karras names set use_karras_sigmas, SDE ones
# algorithm_type="sde-dpmsolver++".
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "Euler": ("EulerDiscreteScheduler", _NOT_KARRAS),
    "Euler a": ("EulerAncestralDiscreteScheduler", _KDIFF),
    "LMS": ("LMSDiscreteScheduler", _NOT_KARRAS),
    "LMS Karras": ("LMSDiscreteScheduler", _KARRAS),
    "Heun": ("HeunDiscreteScheduler", _NOT_KARRAS),
    "DPM2": ("KDPM2DiscreteScheduler", _NOT_KARRAS),
    "DPM2 Karras": ("KDPM2DiscreteScheduler", _KARRAS),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", _NOT_KARRAS),
    "DPM2 a Karras": ("KDPM2AncestralDiscreteScheduler", _KARRAS),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {**_NOT_KARRAS, "algorithm_type": "dpmsolver++", "solver_order": 2}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {**_KARRAS, "algorithm_type": "dpmsolver++", "solver_order": 2}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {**_NOT_KARRAS, "algorithm_type": "sde-dpmsolver++",
                                                     "solver_order": 2}),
    "DPM++ 2M SDE Karras": ("DPMSolverMultistepScheduler", {**_KARRAS, "algorithm_type": "sde-dpmsolver++",
                                                            "solver_order": 2}),
    "DPM++ SDE": ("DPMSolverSDEScheduler", _NOT_KARRAS),
    "DPM++ SDE Karras": ("DPMSolverSDEScheduler", _KARRAS),
    "DDIM": ("DDIMScheduler", _COMPVIS),
    "PLMS": ("PNDMScheduler", {**_COMPVIS, "skip_prk_steps": True}),
    # bh1 ending at sigma 0 gives NaN images in diffusers 0.42; A1111's UniPC stops at t = 1/N too.
    "UniPC": ("UniPCMultistepScheduler", {**_NOT_KARRAS, "solver_type": "bh1", "solver_order": 3,
                                          "lower_order_final": True, "final_sigmas_type": "sigma_min"}),
}
# Schedulers that need a package diffusers does not require.
SAMPLER_PACKAGES: dict[str, str] = {"DPMSolverSDEScheduler": "torchsde", "LMSDiscreteScheduler": "scipy"}
_BASE_CONFIG_ATTR = "_helpers_model_scheduler_config"


class MissingPackageError(ImportError, ValueError):
    """A feature needs a pip package that is not installed (also a ValueError, so the CLI prints it)."""


def _package_available(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _require(package: str, what: str) -> None:
    if not _package_available(package):
        raise MissingPackageError(f"{what} needs the `{package}` package: pip install {package}")


def make_scheduler(name: str, model_config: dict):
    """A diffusers scheduler for the A1111 sampler `name`, on the noise schedule of `model_config`
    (the model's own scheduler config: betas, prediction type)."""
    import diffusers

    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")
    cls_name, extra = SAMPLERS[name]
    if cls_name in SAMPLER_PACKAGES:
        _require(SAMPLER_PACKAGES[cls_name], f"the {name!r} sampler ({cls_name})")
    cls = getattr(diffusers, cls_name)
    accepted = inspect.signature(cls.__init__).parameters
    config = {k: model_config[k] for k in _SCHEDULE_KEYS if k in model_config}
    config.update(extra)
    return cls.from_config({k: v for k, v in config.items() if k in accepted})


def set_sampler(pipe, name: str) -> None:
    """Swap the pipeline's scheduler for the A1111 sampler `name`, keeping the model's noise schedule."""
    base = getattr(pipe, _BASE_CONFIG_ATTR, None)
    if base is None:
        base = dict(pipe.scheduler.config)
        setattr(pipe, _BASE_CONFIG_ATTR, base)
    pipe.scheduler = make_scheduler(name, base)


# ----------------------------------------------------------------------------------- prompts

def _sdxl_zero_negative(pipe, negative_prompt: str) -> bool:
    # A1111 and diffusers (force_zeros_for_empty_prompt, set for SDXL base) condition SDXL on zeros, not
    # on the encoded "", for an empty negative prompt.
    return not negative_prompt and bool(getattr(pipe.config, "force_zeros_for_empty_prompt", True))


def _convert_ti(pipe, prompts: list[str], tokenizer) -> list[str]:
    """Expand multi-vector Textual Inversion tokens (`name` -> `name name_1 ...`) as the pipeline does."""
    convert = getattr(pipe, "maybe_convert_prompt", None)
    return convert(prompts, tokenizer) if convert else prompts


def _prompt_kwargs(pipe, family: str, prompts: list[str], negative_prompt: str, clip_skip: int,
                   weighting: bool = False) -> dict:
    """Pipeline keyword arguments carrying the prompt with A1111's clip skip (and weighting).

    diffusers' own `clip_skip` counts layers skipped (A1111 value - 1), and its SD 1.x/2.x path
    crashes with transformers 5 (`CLIPTextModel` lost `.text_model`), so for those we encode here.
    """
    from .prompt_weighting import strip_extra_networks

    n = len(prompts)
    prompts = [strip_extra_networks(p) for p in prompts]
    negative_prompt = strip_extra_networks(negative_prompt)
    sdxl = family == "sdxl"
    if weighting:
        return _weighted_kwargs(pipe, family, prompts, negative_prompt, clip_skip)
    if sdxl:
        kwargs = {"prompt": prompts, "negative_prompt": None if _sdxl_zero_negative(pipe, negative_prompt)
                  else [negative_prompt] * n}
        if clip_skip > 1:
            kwargs["clip_skip"] = clip_skip - 1
        return kwargs
    if clip_skip <= 1:
        return {"prompt": prompts, "negative_prompt": [negative_prompt] * n}
    from .text_encoding import encode_prompts

    device = pipe._execution_device
    tok, te = pipe.tokenizer, pipe.text_encoder
    pos = encode_prompts(family, [tok], [te], _convert_ti(pipe, prompts, tok), clip_skip=clip_skip,
                         device=device).hidden
    neg = encode_prompts(family, [tok], [te], _convert_ti(pipe, [negative_prompt] * n, tok),
                         clip_skip=clip_skip, device=device).hidden
    return {"prompt_embeds": pos, "negative_prompt_embeds": neg}


def _weighted_kwargs(pipe, family: str, prompts: list[str], negative_prompt: str, clip_skip: int) -> dict:
    from .prompt_weighting import count_chunks, encode_weighted

    n = len(prompts)
    sdxl = family == "sdxl"
    tokenizers = [pipe.tokenizer, pipe.tokenizer_2] if sdxl else [pipe.tokenizer]
    encoders = [pipe.text_encoder, pipe.text_encoder_2] if sdxl else [pipe.text_encoder]
    pos_text = _convert_ti(pipe, prompts, tokenizers[0])
    neg_text = _convert_ti(pipe, [negative_prompt] * n, tokenizers[0])
    chunks = max(count_chunks(tokenizers[0], p) for p in pos_text + neg_text)  # cond and uncond: same length
    device = pipe._execution_device
    with torch.no_grad():
        pos = encode_weighted(family, tokenizers, encoders, pos_text, clip_skip=clip_skip, min_chunks=chunks,
                              device=device)
        if sdxl and _sdxl_zero_negative(pipe, negative_prompt):
            neg = type(pos)(torch.zeros_like(pos.hidden), torch.zeros_like(pos.pooled))
        else:
            neg = encode_weighted(family, tokenizers, encoders, neg_text, clip_skip=clip_skip, min_chunks=chunks,
                                  device=device)
    kwargs = {"prompt_embeds": pos.hidden, "negative_prompt_embeds": neg.hidden}
    if sdxl:
        kwargs.update(pooled_prompt_embeds=pos.pooled, negative_pooled_prompt_embeds=neg.pooled)
    return kwargs


# ------------------------------------------------------------------------------ PNG parameters

def _quote(value: Any) -> str:
    """A1111's infotext quoting: values holding a comma, colon or newline are written as JSON strings."""
    text = str(value)
    if "," not in text and ":" not in text and "\n" not in text and not text.startswith('"'):
        return text
    return json.dumps(text, ensure_ascii=False)


def a1111_parameters(prompt: str, negative_prompt: str, *, steps: int, sampler: str, cfg_scale: float, seed: int,
                     width: int, height: int, model: str | None = None, clip_skip: int = 1,
                     loras: list[tuple[str, float]] | None = None, extra: dict[str, Any] | None = None) -> str:
    """The `parameters` text A1111 writes into a PNG (prompt, negative prompt, one settings line).

    LoRAs go into the prompt as `<lora:name:weight>`, as A1111 writes them; `extra` adds settings-line
    fields (e.g. {"Lora hashes": "name: 0123456789ab"}), quoted as A1111 quotes them."""
    for name, weight in loras or []:
        tag = f"<lora:{name}:{weight:g}>"
        if tag not in prompt:
            prompt = f"{prompt} {tag}".strip()
    fields = [f"Steps: {steps}", f"Sampler: {_quote(sampler)}", f"CFG scale: {cfg_scale:g}", f"Seed: {seed}",
              f"Size: {width}x{height}"]
    if model:
        fields.append(f"Model: {_quote(model)}")
    if clip_skip > 1:
        fields.append(f"Clip skip: {clip_skip}")
    for key, value in (extra or {}).items():
        fields.append(f"{key}: {_quote(value)}")
    text = prompt
    if negative_prompt:
        text += f"\nNegative prompt: {negative_prompt}"
    return text + "\n" + ", ".join(fields)


# `Key: value` pairs of the settings line; a value is a JSON string or runs to the next comma.
_FIELD = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([^:>]*))?(?::[^>]*)?>")
_TYPED = {"Steps": ("steps", int), "Sampler": ("sampler", str), "CFG scale": ("cfg_scale", float),
          "Seed": ("seed", int), "Model": ("model", str), "Model hash": ("model_hash", str),
          "Clip skip": ("clip_skip", int), "Schedule type": ("schedule_type", str),
          "Denoising strength": ("denoising_strength", float), "Batch size": ("batch_size", int)}


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _name_value_list(text: str) -> dict[str, str]:
    """A1111's "name: hash, name2: hash2" lists (Lora hashes, TI hashes)."""
    out = {}
    for part in text.split(","):
        name, sep, value = part.rpartition(":")
        if sep and name.strip():
            out[name.strip()] = value.strip()
    return out


def parse_a1111_parameters(text: str) -> dict[str, Any]:
    """Read an A1111 `parameters` text back: prompt, negative_prompt, typed settings (steps, sampler,
    cfg_scale, seed, width, height, model, clip_skip, ...), `loras` [(name, weight)] from the prompt's
    `<lora:name:w>` tags, `lora_hashes` {name: hash}, and any other field as a string in `extra`."""
    lines = text.strip().split("\n")
    settings = lines[-1].strip() if lines else ""
    found = _FIELD.findall(settings)
    if len(found) < 3:  # A1111's rule: a settings line has at least three fields
        found = []
    else:
        lines = lines[:-1]
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in lines:
        if line.strip().startswith("Negative prompt:"):
            in_negative = True
            line = line.strip()[len("Negative prompt:"):].strip()
        (negative_lines if in_negative else prompt_lines).append(line)
    prompt = "\n".join(prompt_lines).strip()
    result: dict[str, Any] = {"prompt": prompt, "negative_prompt": "\n".join(negative_lines).strip(),
                              "clip_skip": 1, "loras": [], "lora_hashes": {}, "extra": {}}
    for key, raw in found:
        key, value = key.strip(), _unquote(raw)
        if key == "Size":
            w, _, h = value.partition("x")
            result["width"], result["height"] = int(w), int(h)
        elif key == "Lora hashes":
            result["lora_hashes"] = _name_value_list(value)
        elif key in _TYPED:
            name, kind = _TYPED[key]
            try:
                result[name] = kind(value)
            except ValueError:
                result["extra"][key] = value
        else:
            result["extra"][key] = value
    for name, weight in _LORA_TAG.findall(prompt):
        try:
            result["loras"].append((name, float(weight) if weight else 1.0))
        except ValueError:
            pass
    return result


def csv_values(values: list[Any]) -> str:
    """Axis values as A1111's X/Y/Z plot writes them (one CSV line)."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="").writerow([f"{v:g}" if isinstance(v, float) else str(v) for v in values])
    return buf.getvalue()


def lora_hash(path: str | Path) -> str:
    """The short LoRA hash A1111 writes in "Lora hashes": the first 12 hex digits of the sha256 of a
    .safetensors file's tensor data (after the header), sd-scripts' `sshs_model_hash`."""
    path = Path(path)
    if path.is_dir():
        from .lora_io import DIFFUSERS_WEIGHT_NAME

        path = path / DIFFUSERS_WEIGHT_NAME
    h = hashlib.sha256()
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        f.seek(8 + n)
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:12]


def lora_hashes_field(loras: list[tuple[str | Path, float]]) -> dict[str, str]:
    """{"Lora hashes": "name: hash, ..."} for the settings line (empty when there are no LoRAs)."""
    if not loras:
        return {}
    return {"Lora hashes": ", ".join(f"{lora_name(p)}: {lora_hash(p)}" for p, _ in loras)}


def lora_name(path: str | Path) -> str:
    """The name A1111 gives a LoRA file (its stem), as used in `<lora:name:w>`."""
    return Path(path).stem


# ----------------------------------------------------------------------------------- generate

def generate(pipe, prompt: str | list[str], *, negative_prompt: str = "", steps: int = 20, cfg_scale: float = 7.0,
             seed: int = 0, sampler: str | None = "Euler a", width: int | None = None, height: int | None = None,
             num_images: int = 1, clip_skip: int = 1, family: str | None = None, model_name: str | None = None,
             loras: list[tuple[str, float]] | None = None, weighting: bool = False,
             extra: dict[str, Any] | None = None) -> tuple[list[Image.Image], list[str]]:
    """Generate `num_images` images of `prompt`, or one image per prompt of a list; image i uses
    seed `seed + i` (as A1111 does), so any single image can be remade alone. `weighting`: A1111's
    `(word:1.3)` emphasis and prompts over 75 tokens. `loras` (name, weight) and `extra` fields only go
    into the parameter texts. Returns the images and their A1111 parameter texts."""
    prompts = list(prompt) if isinstance(prompt, (list, tuple)) else [prompt] * num_images
    num_images = len(prompts)
    if num_images < 1:
        raise ValueError("nothing to generate: give a prompt and num_images >= 1")
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if family is None:
        from .models import detect_family

        family = detect_family(pipe)
    if sampler:
        set_sampler(pipe, sampler)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    width, height = width or size, height or size
    seeds = [seed + i for i in range(num_images)]
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    if hasattr(pipe.scheduler, "noise_sampler_seed"):  # DPM++ SDE: a Brownian tree per image, seeded like it
        pipe.scheduler.noise_sampler_seed = seeds
    kwargs = _prompt_kwargs(pipe, family, prompts, negative_prompt, clip_skip, weighting)
    with torch.no_grad():
        images = pipe(**kwargs, num_inference_steps=steps, guidance_scale=cfg_scale, width=width, height=height,
                      generator=generators).images
    name = sampler or type(pipe.scheduler).__name__
    params = [a1111_parameters(prompts[i], negative_prompt, steps=steps, sampler=name, cfg_scale=cfg_scale,
                               seed=seeds[i], width=width, height=height, model=model_name, clip_skip=clip_skip,
                               loras=loras, extra=extra) for i in range(num_images)]
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


# -------------------------------------------------------------------------------------- LoRAs

def load_loras(pipe, loras: list[tuple[str | Path, float]]) -> list[str]:
    """Load LoRA files into `pipe` and activate them together at their weights.

    Each entry is (path, weight); files may be kohya/A1111 or diffusers layout. A LoRA made for another
    family (an SDXL LoRA on SD 1.5) or with keys the model lacks raises a ValueError saying so.
    Returns the adapter names."""
    from .lora_io import apply_lora, load_lora

    names: list[str] = []
    for i, (path, weight) in enumerate(loras):
        try:
            weights, _ = load_lora(path, pipe)
        except ValueError as e:
            raise ValueError(f"LoRA {Path(path).name}: {e}") from None
        name = f"lora{i}_{Path(path).stem}".replace(".", "_")
        apply_lora(pipe, weights, adapter_name=name, scale=weight)
        names.append(name)
    if names:
        pipe.set_adapters(names, adapter_weights=[float(w) for _, w in loras])
    return names


# -------------------------------------------------------------------------- Textual Inversion

_WIDTH_FAMILY = {768: "SD 1.x (CLIP ViT-L)", 1024: "SD 2.x (OpenCLIP ViT-H)", 1280: "SDXL (OpenCLIP ViT-bigG)"}
_FAMILY_LABEL = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}


def read_embedding(path: str | Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """Read a Textual Inversion file into {"single": [n, d]} (one text encoder) or {"clip_l", "clip_g"}
    (SDXL), plus the token the file itself names (diffusers format), if any.

    Formats: A1111/sd-scripts `emb_params`, SDXL `clip_l`/`clip_g`, A1111 `string_to_param` and diffusers
    `{token: vector}`; `.safetensors`, or `.pt`/`.bin` read with torch.load(weights_only=True) only."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"embedding file not found: {path}")
    if path.suffix == ".safetensors":
        import safetensors.torch

        data: Any = safetensors.torch.load_file(str(path))
    elif path.suffix in (".pt", ".bin"):
        try:
            data = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 (UnpicklingError for refused objects, or a damaged file)
            raise ValueError(f"{path.name} cannot be read safely: it holds more than tensors and plain data, and "
                             "unpickling it could run code; convert it to .safetensors (emb_params) first "
                             f"({type(e).__name__})") from None
    else:
        raise ValueError(f"{path.name}: embeddings are read from .safetensors (or .pt/.bin with plain tensors); "
                         "A1111 embeddings hidden in PNG/WebP images are not supported")
    return _embedding_vectors(data, path.name)


def _embedding_vectors(data: Any, name: str) -> tuple[dict[str, torch.Tensor], str | None]:
    if not isinstance(data, dict):
        raise ValueError(f"{name} is not an embedding file (expected a dict of tensors)")
    if "clip_l" in data or "clip_g" in data:
        if not ("clip_l" in data and "clip_g" in data):
            raise ValueError(f"{name}: an SDXL embedding needs both clip_l and clip_g vectors; "
                             f"found {sorted(k for k in data if isinstance(data[k], torch.Tensor))}")
        l, g = (_as_2d(data[k], name) for k in ("clip_l", "clip_g"))
        if l.shape[0] != g.shape[0]:
            raise ValueError(f"{name}: clip_l has {l.shape[0]} vectors but clip_g has {g.shape[0]}")
        return {"clip_l": l, "clip_g": g}, None
    if "emb_params" in data:
        return {"single": _as_2d(data["emb_params"], name)}, None
    if "string_to_param" in data:
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)
        if not isinstance(params, dict) or not params:
            raise ValueError(f"{name}: string_to_param holds no vectors")
        return {"single": _as_2d(next(iter(params.values())), name)}, None
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if len(tensors) == 1:  # diffusers learned_embeds: {token: vector(s)}
        token, vec = next(iter(tensors.items()))
        return {"single": _as_2d(vec, name)}, token
    raise ValueError(f"{name} is not a Textual Inversion embedding we know (expected emb_params, clip_l/clip_g, "
                     f"string_to_param or one token's vector); it has keys {sorted(data)[:8]}")


def _as_2d(t: Any, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: embedding vectors must be tensors, got {type(t).__name__}")
    t = t.detach().float()
    if t.dim() == 1:
        t = t[None]
    if t.dim() != 2 or t.shape[0] < 1:
        raise ValueError(f"{name}: embedding vectors must be [n_vectors, width], got {list(t.shape)}")
    return t


def _file_family(vectors: dict[str, torch.Tensor]) -> str:
    if "clip_g" in vectors:
        return "SDXL (clip_l + clip_g)"
    width = int(vectors["single"].shape[1])
    return _WIDTH_FAMILY.get(width, f"a model whose text encoder is {width} wide")


def load_embeddings(pipe, embeddings: list[str | Path | tuple[str | Path, str]]) -> list[str]:
    """Load Textual Inversion embeddings into `pipe`; each entry is a path or (path, token). The token
    defaults to the file's stem (A1111's rule; a diffusers `learned_embeds` file uses the token inside
    it). An n-vector embedding adds tokens `tok`, `tok_1`, ... and the prompt keeps just `tok`.
    An embedding for another family raises a ValueError naming both. Returns the tokens."""
    from .models import detect_family

    family = detect_family(pipe)
    tokens = []
    for entry in embeddings:
        path, token = (entry if isinstance(entry, tuple) else (entry, None))
        vectors, file_token = read_embedding(path)
        token = token or (file_token if file_token and Path(path).stem.startswith("learned_embeds")
                          else Path(path).stem)
        _add_embedding(pipe, family, Path(path).name, token, vectors)
        tokens.append(token)
    return tokens


def _add_embedding(pipe, family: str, name: str, token: str, vectors: dict[str, torch.Tensor]) -> None:
    model = _FAMILY_LABEL[family]
    targets = [(pipe.tokenizer, pipe.text_encoder)]
    if family == "sdxl":
        targets.append((pipe.tokenizer_2, pipe.text_encoder_2))
        if "clip_g" not in vectors:
            raise ValueError(f"{name} is an embedding for {_file_family(vectors)}, one text encoder only; an SDXL "
                             "model needs an SDXL embedding (clip_l and clip_g vectors)")
        per_encoder = [vectors["clip_l"], vectors["clip_g"]]
    else:
        if "clip_g" in vectors:
            raise ValueError(f"{name} is an embedding for SDXL (clip_l + clip_g), but the model is {model}; "
                             f"use an embedding trained on {model}")
        per_encoder = [vectors["single"]]
    for (tok, te), vec in zip(targets, per_encoder):
        width = te.get_input_embeddings().weight.shape[1]
        if vec.shape[1] != width:
            raise ValueError(f"{name} is an embedding for {_file_family(vectors)} ({vec.shape[1]}-wide vectors), "
                             f"but the model is {model}, whose text encoder takes {width}-wide vectors; use an "
                             f"embedding trained on {model}")
    n = int(per_encoder[0].shape[0])
    names = [token] + [f"{token}_{i}" for i in range(1, n)]
    for tok, _ in targets:
        taken = [t for t in names if t in tok.get_vocab()]
        if taken:
            raise ValueError(f"token {taken[0]!r} is already in the tokenizer's vocabulary; load the embedding "
                             "under another token: load_embeddings(pipe, [(path, 'my-token')])")
    from transformers import AddedToken

    for (tok, te), vec in zip(targets, per_encoder):
        # not normalized: matched in the raw prompt, so a mixed-case name survives CLIP's lowercasing
        tok.add_tokens([AddedToken(t, normalized=False) for t in names])
        ids = tok.convert_tokens_to_ids(names)
        te.resize_token_embeddings(len(tok))
        emb = te.get_input_embeddings().weight
        with torch.no_grad():
            emb[ids] = vec.to(device=emb.device, dtype=emb.dtype)


# -------------------------------------------------------------------------------------- memory

def memory_options(pipe, *, attention_slicing: bool = False, vae_slicing: bool = False, vae_tiling: bool = False,
                   cpu_offload: bool = False, fp16: bool = False) -> dict[str, bool]:
    """Turn on the memory savers a 16 GB T4 needs for SDXL (or big batches): attention slicing, VAE
    slicing (one image decoded at a time) and tiling (large images), model CPU offload (needs
    accelerate and a CUDA GPU) and fp16 weights (CUDA only). Options a machine cannot use are
    skipped with a warning. Returns which options are now on."""
    cuda = torch.cuda.is_available()
    applied = {"attention_slicing": False, "vae_slicing": False, "vae_tiling": False, "cpu_offload": False,
               "fp16": False}
    if fp16:
        if cuda:
            pipe.to(dtype=torch.float16)
            applied["fp16"] = True
        else:
            warnings.warn("fp16 needs a CUDA GPU: on CPU half precision is slow or unsupported; keeping the "
                          "current dtype", stacklevel=2)
    if attention_slicing:
        pipe.enable_attention_slicing("auto")
        applied["attention_slicing"] = True
    if vae_slicing:
        pipe.vae.enable_slicing()
        applied["vae_slicing"] = True
    if vae_tiling:
        pipe.vae.enable_tiling()
        applied["vae_tiling"] = True
    if cpu_offload:
        if not _package_available("accelerate"):
            warnings.warn("model CPU offload needs the `accelerate` package (pip install accelerate); skipped",
                          stacklevel=2)
        elif not cuda:
            warnings.warn("model CPU offload needs a CUDA GPU (it moves each model to the GPU only while it runs); "
                          "no GPU here, skipped", stacklevel=2)
        else:
            pipe.enable_model_cpu_offload()
            applied["cpu_offload"] = True
    return applied


# ----------------------------------------------------------------------------------- from a config

def apply_generate_config(base, cfg, *, memory: dict[str, bool] | None = None) -> dict[str, Any]:
    """Load `cfg`'s LoRAs (at their weights) and embeddings into `base.pipe` and set the memory options.
    Returns {"adapters": [...], "tokens": [...]} (the LoRA adapter names and the embeddings' tokens)."""
    adapters = load_loras(base.pipe, cfg.lora_weights())
    embeddings = []  # PATH or PATH=TOKEN (the token defaults to the file's stem, as in A1111)
    for text in cfg.embeddings:
        path, sep, token = text.rpartition("=")
        embeddings.append((path, token) if sep and path and token else text)
    tokens = load_embeddings(base.pipe, embeddings)
    if memory:
        memory_options(base.pipe, **memory)
    return {"adapters": adapters, "tokens": tokens}


def generate_to_folder(base, cfg, *, memory: dict[str, bool] | None = None, log=None) -> list[Path]:
    """Everything a GenerateConfig asks for: load its LoRAs/embeddings, generate `num_images` per prompt
    and save PNGs with A1111 parameters as `out_dir/<prompt index>_<seed>.png`. Returns the paths.
    The LoRAs are unloaded afterwards, so `base.pipe` is the base model again (grids load their own)."""
    loaded = apply_generate_config(base, cfg, memory=memory)
    if loaded["tokens"] and log:
        log("embeddings: " + ", ".join(loaded["tokens"]))
    loras = cfg.lora_weights()
    names = [(lora_name(p), w) for p, w in loras]
    out = Path(cfg.out_dir)
    paths = []
    for pi, prompt in enumerate(cfg.prompts):
        images, params = generate(base.pipe, prompt, negative_prompt=cfg.negative_prompt, steps=cfg.steps,
                                  cfg_scale=cfg.cfg_scale, seed=cfg.seed, sampler=cfg.sampler, width=cfg.width,
                                  height=cfg.height, num_images=cfg.num_images, clip_skip=cfg.clip_skip,
                                  family=base.family, model_name=Path(cfg.model).name, loras=names,
                                  weighting=cfg.weighting, extra=lora_hashes_field(loras))
        for i, (image, text) in enumerate(zip(images, params)):
            paths.append(save_png(image, out / f"{pi:03d}_{cfg.seed + i}.png", text))
    if loaded["adapters"]:
        base.pipe.delete_adapters(loaded["adapters"])
    return paths
