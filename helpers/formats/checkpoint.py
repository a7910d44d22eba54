"""Names in the original checkpoint layout (CompVis LDM for SD 1.x/2.x, Stability SGM for SDXL).

A1111, ComfyUI, kohya sd-scripts and single-file `.safetensors` checkpoints use these names;
diffusers uses its own. This module maps diffusers names to original ones and converts whole
state dicts, so we can write LoRA keys and single-file checkpoints those tools load.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from pathlib import Path

import torch

UNET_PREFIX = "model.diffusion_model."

# Module renames inside a UNet ResnetBlock2D (diffusers -> original ResBlock).
_UNET_RESNET_RENAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}

# Modules outside the blocks (diffusers -> original).
_UNET_TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL text_time conditioning
    "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding.linear_1": "label_emb.0.0",  # timestep/projection class embeddings
    "class_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}

_DOWN_TYPES = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
_UP_TYPES = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}


def _plain_config(unet_config: Mapping) -> dict:
    """A JSON-able copy of a UNet config (dict, FrozenDict or `unet.config`)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(unet_config).items()}


def _per_block(value, n: int, field: str) -> list[int]:
    if isinstance(value, int):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise ValueError(f"UNet config {field}={value} must have one entry per block ({n})")
    return [int(v) for v in value]


def unet_block_map(unet_config: Mapping) -> dict[str, tuple[str, str]]:
    """Map each diffusers UNet block prefix to (original prefix, kind).

    kind is "resnet" (its sub-modules are renamed), or "same" (sub-names pass through:
    attention transformers, down/up-sampler convs, embeddings). Prefixes are module names,
    e.g. "down_blocks.1.attentions.0" -> ("input_blocks.4.1", "same").
    """
    cfg = _plain_config(unet_config)
    down_types = list(cfg["down_block_types"])
    up_types = list(cfg["up_block_types"])
    n = len(down_types)
    if len(up_types) != n:
        raise ValueError(f"UNet config has {n} down blocks but {len(up_types)} up blocks")
    for t in down_types:
        if t not in _DOWN_TYPES:
            raise ValueError(f"UNet down block type {t!r} has no original-layout equivalent; "
                             f"supported: {sorted(_DOWN_TYPES)}")
    for t in up_types:
        if t not in _UP_TYPES:
            raise ValueError(f"UNet up block type {t!r} has no original-layout equivalent; "
                             f"supported: {sorted(_UP_TYPES)}")
    mid_type = cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn") or "UNetMidBlock2DCrossAttn"
    if mid_type != "UNetMidBlock2DCrossAttn":
        raise ValueError(f"UNet mid block type {mid_type!r} is not supported; SD 1.x/2.x/SDXL use "
                         "'UNetMidBlock2DCrossAttn'")
    layers = _per_block(cfg.get("layers_per_block", 2), n, "layers_per_block")

    out: dict[str, tuple[str, str]] = {k: (v, "same") for k, v in _UNET_TOP_LEVEL.items()}

    # input_blocks: 0 is conv_in; then per down block, one entry per layer (resnet [+ attention])
    # and, except after the last block, one entry holding the downsampler (`.0.op`).
    idx = 1
    for b, t in enumerate(down_types):
        for j in range(layers[b]):
            out[f"down_blocks.{b}.resnets.{j}"] = (f"input_blocks.{idx}.0", "resnet")
            if _DOWN_TYPES[t]:
                out[f"down_blocks.{b}.attentions.{j}"] = (f"input_blocks.{idx}.1", "same")
            idx += 1
        if b < n - 1:
            out[f"down_blocks.{b}.downsamplers.0.conv"] = (f"input_blocks.{idx}.0.op", "same")
            idx += 1

    # middle_block: resnet, transformer, resnet.
    out["mid_block.resnets.0"] = ("middle_block.0", "resnet")
    out["mid_block.attentions.0"] = ("middle_block.1", "same")
    out["mid_block.resnets.1"] = ("middle_block.2", "resnet")

    # output_blocks: per up block, layers+1 entries (resnet [+ attention]); the last entry of
    # each block but the final one also holds the upsampler, after the attention if any.
    up_layers = list(reversed(layers))
    idx = 0
    for b, t in enumerate(up_types):
        has_attn = _UP_TYPES[t]
        for j in range(up_layers[b] + 1):
            out[f"up_blocks.{b}.resnets.{j}"] = (f"output_blocks.{idx}.0", "resnet")
            if has_attn:
                out[f"up_blocks.{b}.attentions.{j}"] = (f"output_blocks.{idx}.1", "same")
            if b < n - 1 and j == up_layers[b]:
                out[f"up_blocks.{b}.upsamplers.0.conv"] = (f"output_blocks.{idx}.{2 if has_attn else 1}.conv",
                                                           "same")
            idx += 1
    return out


@functools.lru_cache(maxsize=16)
def _block_map_cached(cfg_json: str) -> dict[str, tuple[str, str]]:
    return unet_block_map(json.loads(cfg_json))


def _cfg_key(unet_config: Mapping) -> str:
    return json.dumps(_plain_config(unet_config), sort_keys=True, default=str)


def _to_original(name: str, blocks: Mapping[str, tuple[str, str]]) -> str:
    parts = name.split(".")
    for cut in range(min(len(parts), 5), 0, -1):
        hit = blocks.get(".".join(parts[:cut]))
        if hit is None:
            continue
        orig, kind = hit
        rest = parts[cut:]
        if kind == "resnet":
            if not rest or rest[0] not in _UNET_RESNET_RENAMES:
                raise KeyError(f"{name!r}: unknown resnet sub-module; expected one of {sorted(_UNET_RESNET_RENAMES)}")
            rest = _UNET_RESNET_RENAMES[rest[0]].split(".") + rest[1:]
        return ".".join([orig] + rest)
    raise KeyError(f"{name!r} is not a UNet name with an original-layout equivalent")


def unet_name_to_original(name: str, unet_config: Mapping) -> str:
    """Convert one diffusers UNet module or parameter name to its original-layout name
    (without the `model.diffusion_model.` prefix). Anything below a mapped block passes through,
    so PEFT names (`...to_q.lora_A.default.weight`) convert too. KeyError for unknown names."""
    return _to_original(name, _block_map_cached(_cfg_key(unet_config)))


@functools.lru_cache(maxsize=8)
def _meta_unet_names(cfg_json: str) -> tuple[tuple[str, ...], tuple[tuple[str, tuple[int, ...]], ...]]:
    """(module names that own parameters, (param name, shape) pairs) of a UNet built on meta."""
    from diffusers import UNet2DConditionModel

    cfg = {k: v for k, v in json.loads(cfg_json).items() if not k.startswith("_")}
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg)
    modules = tuple(n for n, m in unet.named_modules() if next(m.parameters(recurse=False), None) is not None)
    params = tuple((n, tuple(p.shape)) for n, p in unet.state_dict().items())
    return modules, params


def unet_module_map(unet_config: Mapping) -> dict[str, str]:
    """diffusers UNet module name -> original module name (no `model.diffusion_model.` prefix),
    for every module that owns parameters. Built from the config alone (meta-device UNet)."""
    key = _cfg_key(unet_config)
    modules, _ = _meta_unet_names(key)
    blocks = _block_map_cached(key)
    return {m: _to_original(m, blocks) for m in modules}


def unet_key_map(unet_config: Mapping) -> dict[str, str]:
    """diffusers UNet state-dict key -> original key (no prefix), for every parameter/buffer."""
    key = _cfg_key(unet_config)
    _, params = _meta_unet_names(key)
    blocks = _block_map_cached(key)
    return {p: _to_original(p, blocks) for p, _ in params}


def unet_shapes(unet_config: Mapping) -> dict[str, tuple[int, ...]]:
    """diffusers UNet state-dict key -> tensor shape, from the config alone."""
    _, params = _meta_unet_names(_cfg_key(unet_config))
    return dict(params)


def unet_to_original(state_dict: Mapping[str, torch.Tensor], unet_config: Mapping) -> dict[str, torch.Tensor]:
    """Rename a diffusers UNet state dict to the original layout, keys prefixed
    `model.diffusion_model.`. Tensors are passed through unchanged (same shapes)."""
    blocks = _block_map_cached(_cfg_key(unet_config))
    return {UNET_PREFIX + _to_original(k, blocks): v for k, v in state_dict.items()}


# ---------------------------------------------------------------------------------------- VAE

VAE_PREFIX = "first_stage_model."

_VAE_RESNET_RENAMES = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                       "conv_shortcut": "nin_shortcut"}
_VAE_ATTN_RENAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_SAME = {"conv_in", "conv_out", "quant_conv", "post_quant_conv"}


def _vae_name_to_original(key: str, num_up_blocks: int) -> tuple[str, bool]:
    """(original key without prefix, whether it is an attention linear weight to make 1x1 conv)."""
    parts = key.split(".")
    if parts[0] in _VAE_SAME:
        return key, False
    side, rest = parts[0], parts[1:]
    if side not in ("encoder", "decoder") or not rest:
        raise KeyError(f"{key!r} is not an AutoencoderKL key with an original-layout equivalent")
    head = rest[0]
    if head in ("conv_in", "conv_out"):
        return key, False
    if head == "conv_norm_out":
        return ".".join([side, "norm_out"] + rest[1:]), False
    if head in ("down_blocks", "up_blocks") and len(rest) >= 4:
        i = int(rest[1])
        stage, idx = ("down", i) if head == "down_blocks" else ("up", num_up_blocks - 1 - i)
        if rest[2] == "resnets" and rest[4] in _VAE_RESNET_RENAMES:
            return ".".join([side, stage, str(idx), "block", rest[3], _VAE_RESNET_RENAMES[rest[4]]] + rest[5:]), False
        if rest[2] in ("downsamplers", "upsamplers") and rest[3] == "0":
            sampler = "downsample" if stage == "down" else "upsample"
            return ".".join([side, stage, str(idx), sampler] + rest[4:]), False
    if head == "mid_block" and len(rest) >= 4:
        if rest[1] == "resnets" and rest[3] in _VAE_RESNET_RENAMES:
            return ".".join([side, "mid", f"block_{int(rest[2]) + 1}", _VAE_RESNET_RENAMES[rest[3]]] + rest[4:]), False
        if rest[1] == "attentions" and rest[2] == "0":
            sub = ".".join(rest[3:-1])
            if sub in _VAE_ATTN_RENAMES:
                is_linear = sub != "group_norm" and rest[-1] == "weight"
                return ".".join([side, "mid", "attn_1", _VAE_ATTN_RENAMES[sub], rest[-1]]), is_linear
    raise KeyError(f"{key!r} is not an AutoencoderKL key with an original-layout equivalent")


def vae_to_original(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert a diffusers AutoencoderKL state dict to the LDM layout, keys prefixed
    `first_stage_model.`; mid-block attention q/k/v/proj_out become 1x1 conv weights [c, c, 1, 1]."""
    ups = {int(k.split(".")[2]) for k in state_dict if k.startswith("decoder.up_blocks.")}
    num_up = max(ups) + 1 if ups else 0
    out: dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        name, to_conv = _vae_name_to_original(k, num_up)
        if to_conv and v.dim() == 2:
            v = v.reshape(*v.shape, 1, 1)
        out[VAE_PREFIX + name] = v
    return out


# ------------------------------------------------------------------------------- text encoders

# Where each family's text encoders live in the original checkpoint:
# ("hf", prefix): transformers CLIP names under `prefix + "text_model."` (OpenAI CLIP-L);
# ("openclip", prefix): OpenCLIP names under `prefix` (OpenCLIP ViT-H / ViT-bigG).
TEXT_ENCODER_LAYOUTS: dict[str, tuple[tuple[str, str], ...]] = {
    "sd1": (("hf", "cond_stage_model.transformer."),),
    "sd2": (("openclip", "cond_stage_model.model."),),
    "sdxl": (("hf", "conditioner.embedders.0.transformer."), ("openclip", "conditioner.embedders.1.model.")),
}

_OPENCLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_OPENCLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def _check_family(family: str) -> None:
    if family not in TEXT_ENCODER_LAYOUTS:
        raise ValueError(f"family must be one of {sorted(TEXT_ENCODER_LAYOUTS)}, got {family!r}")


def _to_openclip(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, v in state_dict.items():
        k = key.removeprefix("text_model.")
        if k == "text_projection.weight":
            out[prefix + "text_projection"] = v.t().contiguous()  # OpenCLIP computes x @ text_projection
            continue
        if k.endswith("position_ids"):
            continue
        if k in _OPENCLIP_TOP:
            out[prefix + _OPENCLIP_TOP[k]] = v
            continue
        parts = k.split(".")
        if parts[:2] != ["encoder", "layers"] or len(parts) < 5:
            raise KeyError(f"{key!r} is not a CLIP text-model key with an OpenCLIP equivalent")
        layer, sub, leaf = parts[2], ".".join(parts[3:-1]), parts[-1]
        block = f"{prefix}transformer.resblocks.{layer}."
        if sub in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv.setdefault((block, leaf), {})[sub[-6]] = v
        elif sub in _OPENCLIP_LAYER:
            out[block + _OPENCLIP_LAYER[sub] + "." + leaf] = v
        else:
            raise KeyError(f"{key!r} is not a CLIP text-model key with an OpenCLIP equivalent")
    for (block, leaf), parts_ in qkv.items():
        if set(parts_) != {"q", "k", "v"}:
            raise KeyError(f"{block}: attention {leaf} needs q, k and v projections, got {sorted(parts_)}")
        out[f"{block}attn.in_proj_{leaf}"] = torch.cat([parts_["q"], parts_["k"], parts_["v"]], dim=0)
    return out


def text_encoder_to_original(state_dict: Mapping[str, torch.Tensor], family: str,
                             index: int = 0) -> dict[str, torch.Tensor]:
    """Convert a transformers CLIP text-encoder state dict (with or without the `text_model.`
    level) to the original layout of `family` ("sd1", "sd2", "sdxl"); `index` picks SDXL's encoder."""
    _check_family(family)
    layouts = TEXT_ENCODER_LAYOUTS[family]
    if not 0 <= index < len(layouts):
        raise ValueError(f"family {family!r} has {len(layouts)} text encoder(s); index {index} is out of range")
    kind, prefix = layouts[index]
    if kind == "openclip":
        return _to_openclip(state_dict, prefix)
    out = {}
    for key, v in state_dict.items():
        if key == "text_projection.weight":
            raise KeyError(f"{family} text encoder {index} is a plain CLIPTextModel in the original layout; "
                           "its state dict must not carry text_projection.weight")
        k = key if key.startswith("text_model.") else "text_model." + key
        out[prefix + k] = v
    # Original checkpoints carry the position_ids buffer (transformers 5 no longer saves it);
    # writing it keeps loaders that expect it (strict loads, older tools) happy.
    pos = out.get(prefix + "text_model.embeddings.position_embedding.weight")
    ids_key = prefix + "text_model.embeddings.position_ids"
    if pos is not None and ids_key not in out:
        out[ids_key] = torch.arange(pos.shape[0], dtype=torch.int64).unsqueeze(0)
    return out


# ------------------------------------------------------------------------------ whole pipeline

def pipeline_to_original(pipe, family: str) -> dict[str, torch.Tensor]:
    """The state dict of a single-file checkpoint (UNet, VAE, text encoders) for a diffusers
    StableDiffusion(XL)Pipeline, in the layout A1111, ComfyUI and `from_single_file` read."""
    _check_family(family)
    out = unet_to_original(pipe.unet.state_dict(), pipe.unet.config)
    out.update(vae_to_original(pipe.vae.state_dict()))
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    for i, te in enumerate(encoders):
        if te is None:
            raise ValueError(f"pipeline has no text encoder {i + 1}, which a {family} checkpoint needs")
        out.update(text_encoder_to_original(te.state_dict(), family, i))
    return out


def save_single_file(pipe, path, family: str, dtype: torch.dtype = torch.float16,
                     metadata: dict | None = None) -> Path:
    """Write `pipe` as one original-layout `.safetensors` checkpoint (floats cast to `dtype`),
    atomically (helpers.atomic). Returns the path."""

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"single-file checkpoints are written as .safetensors, got {path.name!r}")
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    tensors = {}
    for k, v in pipeline_to_original(pipe, family).items():
        v = v.detach()
        if v.is_floating_point():
            v = v.to(dtype)
        tensors[k] = v.contiguous().cpu()
    from ..atomic import save_safetensors

    return save_safetensors(tensors, path, metadata=meta or None)
