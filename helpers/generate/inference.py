"""Generate images: samplers by their AUTOMATIC1111 names, LoRAs at chosen weights, Textual Inversion
embeddings, A1111 prompt weighting, seeds that reproduce, memory options for small GPUs, and PNGs that
carry A1111's `parameters` text (written and read back) so other tools can read the settings."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..formats.embedding import FAMILY_LABEL, file_family, read_embedding
from ..formats.png_info import a1111_parameters, lora_hashes_field, lora_name, save_png
from ..sd.samplers import package_available, set_sampler

# ----------------------------------------------------------------------------------- samplers


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
    from ..sd.prompt_weighting import strip_extra_networks

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
    from ..sd.text_encoding import encode_prompts

    device = pipe._execution_device
    tok, te = pipe.tokenizer, pipe.text_encoder
    pos = encode_prompts(family, [tok], [te], _convert_ti(pipe, prompts, tok), clip_skip=clip_skip,
                         device=device).hidden
    neg = encode_prompts(family, [tok], [te], _convert_ti(pipe, [negative_prompt] * n, tok),
                         clip_skip=clip_skip, device=device).hidden
    return {"prompt_embeds": pos, "negative_prompt_embeds": neg}


def _weighted_kwargs(pipe, family: str, prompts: list[str], negative_prompt: str, clip_skip: int) -> dict:
    from ..sd.prompt_weighting import count_chunks, encode_weighted

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


# ----------------------------------------------------------------------------------- generate

def generate(pipe, prompt: str | list[str], *, negative_prompt: str = "", steps: int = 20, cfg_scale: float = 7.0,
             seed: int = 0, sampler: str | None = "Euler a", width: int | None = None, height: int | None = None,
             num_images: int = 1, clip_skip: int = 1, family: str | None = None, model_name: str | None = None,
             loras: list[tuple[str, float]] | None = None, weighting: bool = False,
             extra: dict[str, Any] | None = None, seeds: list[int] | None = None
             ) -> tuple[list[Image.Image], list[str]]:
    """Generate `num_images` images of `prompt`, or one image per prompt of a list; image i uses
    seed `seed + i` (as A1111 does), or `seeds[i]` when given (several prompts' seed runs drawn in one
    batch), so any single image can be remade alone. `weighting`: A1111's
    `(word:1.3)` emphasis and prompts over 75 tokens. `loras` (name, weight) and `extra` fields only go
    into the parameter texts. Returns the images and their A1111 parameter texts."""
    prompts = list(prompt) if isinstance(prompt, (list, tuple)) else [prompt] * num_images
    num_images = len(prompts)
    if num_images < 1:
        raise ValueError("nothing to generate: give a prompt and num_images >= 1")
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if family is None:
        from ..sd.models import detect_family

        family = detect_family(pipe)
    if sampler:
        set_sampler(pipe, sampler)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    width, height = width or size, height or size
    if seeds is None:
        seeds = [seed + i for i in range(num_images)]
    elif len(seeds) != num_images:
        raise ValueError(f"give one seed per image ({num_images}), got {len(seeds)}")
    seeds = [int(s) for s in seeds]
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


# -------------------------------------------------------------------------------------- LoRAs

def load_loras(pipe, loras: list[tuple[str | Path, float]]) -> list[str]:
    """Load LoRA files into `pipe` and activate them together at their weights.

    Each entry is (path, weight); files may be kohya/A1111 or diffusers layout; embeddings bundled in a file
    (pivotal tuning, A1111's bundle_emb keys) are loaded as their tokens. A LoRA made for another
    family (an SDXL LoRA on SD 1.5) or with keys the model lacks raises a ValueError saying so.
    Returns the adapter names."""
    from ..files import BadFileError
    from ..formats.lora import apply_lora, load_bundled_embeddings, load_lora
    from ..sd.models import detect_family

    names: list[str] = []
    for i, (path, weight) in enumerate(loras):
        try:
            weights, _ = load_lora(path, pipe)
        except BadFileError:
            raise  # it names the file already
        except ValueError as e:
            raise ValueError(f"LoRA {Path(path).name}: {e}") from None
        name = f"lora{i}_{Path(path).stem}".replace(".", "_")
        apply_lora(pipe, weights, adapter_name=name, scale=weight)
        names.append(name)
        for token, vectors in load_bundled_embeddings(path).items():   # pivotal tuning's tokens, as A1111 does
            if token not in pipe.tokenizer.get_vocab():
                _add_embedding(pipe, detect_family(pipe), f"{Path(path).name} ({token})", token, vectors)
    if names:
        pipe.set_adapters(names, adapter_weights=[float(w) for _, w in loras])
    return names


def set_lora_weights(pipe, names: list[str], weights: list[float]) -> None:
    """Set loaded LoRAs' weights. When every weight is 0 the LoRA layers are switched off instead, so the base
    model runs without computing their zero products: the same images, sooner."""
    if all(float(w) == 0.0 for w in weights):
        pipe.disable_lora()
        return
    pipe.enable_lora()
    pipe.set_adapters(list(names), adapter_weights=[float(w) for w in weights])


# -------------------------------------------------------------------------- Textual Inversion


def load_embeddings(pipe, embeddings: list[str | Path | tuple[str | Path, str]]) -> list[str]:
    """Load Textual Inversion embeddings into `pipe`; each entry is a path or (path, token). The token
    defaults to the file's stem (A1111's rule; a diffusers `learned_embeds` file uses the token inside
    it). An n-vector embedding adds tokens `tok`, `tok_1`, ... and the prompt keeps just `tok`.
    An embedding for another family raises a ValueError naming both. Returns the tokens."""
    from ..sd.models import detect_family

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
    model = FAMILY_LABEL[family]
    targets = [(pipe.tokenizer, pipe.text_encoder)]
    if family == "sdxl":
        targets.append((pipe.tokenizer_2, pipe.text_encoder_2))
        if "clip_g" not in vectors:
            raise ValueError(f"{name} is an embedding for {file_family(vectors)}, one text encoder only; an SDXL "
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
            raise ValueError(f"{name} is an embedding for {file_family(vectors)} ({vec.shape[1]}-wide vectors), "
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
        if not package_available("accelerate"):
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


@contextlib.contextmanager
def quiet_pipeline(pipe):
    """The pipeline's own per-call progress bar off for a while (a caller shows one bar for many calls);
    its settings are put back as they were afterwards."""
    had_config = hasattr(pipe, "_progress_bar_config")
    before = dict(getattr(pipe, "_progress_bar_config", {}) or {})
    pipe.set_progress_bar_config(**{**before, "disable": True})
    try:
        yield pipe
    finally:
        if had_config:
            pipe._progress_bar_config = before
        else:
            del pipe._progress_bar_config


def generate_to_folder(base, cfg, *, memory: dict[str, bool] | None = None, log=None) -> list[Path]:
    """Everything a GenerateConfig asks for: load its LoRAs/embeddings, generate `num_images` per prompt
    and save PNGs with A1111 parameters as `out_dir/<prompt index>_<seed>.png`. Returns the paths.
    The LoRAs are unloaded afterwards, so `base.pipe` is the base model again (grids load their own)."""
    loaded = apply_generate_config(base, cfg, memory=memory)
    if loaded["tokens"] and log:
        log("embeddings: " + ", ".join(loaded["tokens"]))
    loras = cfg.lora_weights()
    names = [(lora_name(p), w) for p, w in loras]
    from tqdm.auto import tqdm

    out = Path(cfg.out_dir)
    paths = []
    with quiet_pipeline(base.pipe):
        for pi, prompt in enumerate(tqdm(cfg.prompts, desc=f"generating {cfg.num_images} image(s) per prompt",
                                         unit="prompt")):
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
