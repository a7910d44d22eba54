"""Save and load LoRA weights in the formats users expect (kohya/A1111/ComfyUI and diffusers).

One in-memory form (`LoraWeights`: component -> module name -> `LoraModule`) sits between the
trainer (peft layers), the files (kohya `.safetensors`, diffusers folders, other tools' files)
and inference (diffusers' multi-adapter API), so every path converts through the same names.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import re
import time
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar
from pathlib import Path

import torch

from .. import __version__
from ..atomic import atomic_dir, save_safetensors
from ..files import load_safetensors
from ..sd.lora_targets import base_layer, inject_lora, model_module_names, plain_module_name
from .dora import DORA_PART, DoraModule, add_input_dora
from .lycoris import (HADA_PARTS, LOKR_PARTS, UNSUPPORTED_HADA, UNSUPPORTED_LOKR, LokrModule, inject_loha,
                      inject_lokr, loha_from_parts, lokr_from_parts)

FAMILIES = ("sd1", "sd2", "sdxl")
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
FORMATS = ("kohya", "diffusers")

KOHYA_UNET_PREFIX = "lora_unet"
# kohya text-encoder prefixes per family (sd-scripts: lora_te for one encoder, lora_te1/2 for SDXL).
KOHYA_TE_PREFIXES = {
    "sd1": {"text_encoder": "lora_te"},
    "sd2": {"text_encoder": "lora_te"},
    "sdxl": {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
}
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY

# sd-scripts' model-version strings and ModelSpec ids (library/sai_model_spec.py, model_util.py).
SAI_MODEL_SPEC_VERSION = "1.0.1"
_IMPL_DIFFUSERS = "diffusers"
_IMPL_SGM = "https://github.com/Stability-AI/generative-models"


@dataclass
class LoraModule:
    """One module's LoRA: W' = W + (alpha / rank) * up @ down (conv: over flattened kernels)."""

    kind: ClassVar[str] = "LoRA"   # the network type, as people name it

    down: torch.Tensor  # [r, in] (Linear) or [r, in, kh, kw] (Conv2d)
    up: torch.Tensor  # [out, r] or [out, r, 1, 1]
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        """scale * up @ down in the layer's weight shape (float64: a merge adds it to the weight exactly once)."""
        r = self.rank
        d = self.up.reshape(self.up.shape[0], r).double() @ self.down.reshape(r, -1).double() * self.scale
        return d.reshape(tuple(weight.shape))


LoraWeights = dict[str, dict[str, LoraModule]]   # LoraModule, a LyCORIS module (formats/lycoris.py) or DoraModule


# ------------------------------------------------------------------------------------ checks

def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")


def _check_components(weights: Mapping, family: str | None = None) -> None:
    allowed = COMPONENTS if family in (None, "sdxl") else ("unet", "text_encoder")
    bad = [c for c in weights if c not in allowed]
    if bad:
        raise ValueError(f"LoRA weights have component(s) {bad}; a {family or 'LoRA'} model has {list(allowed)}")
    for comp, modules in weights.items():
        for name, m in modules.items():
            if not isinstance(m, LoraModule):
                m.check(f"{comp}.{name}")   # a LyCORIS module checks its own factors
            elif m.down.shape[0] != m.up.shape[1]:
                raise ValueError(f"{comp}.{name}: down has rank {m.down.shape[0]} but up has rank {m.up.shape[1]}")


# ---------------------------------------------------------------------------- peft -> ours

def extract_peft_lora(model: torch.nn.Module, adapter_name: str = "default") -> dict[str, LoraModule]:
    """Read a trained LoRA out of a peft-injected model (diffusers/transformers `add_adapter`):
    module name (as in the plain model) -> LoraModule with the adapter's true alpha."""
    from peft.tuners.lora import LoraLayer

    out: dict[str, LoraModule] = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or adapter_name not in module.lora_A:
            continue
        if module.use_dora.get(adapter_name, False) or adapter_name in module.lora_variant:
            raise NotImplementedError(f"{name}: a DoRA (or other LoRA variant) adapter is not a plain LoRA; "
                                      "formats.dora.extract_peft_dora reads the DoRA that helpers trains")
        if getattr(module.lora_B[adapter_name], "bias", None) is not None:
            raise NotImplementedError(f"{name}: LoRA with lora_bias=True cannot be written as a plain LoRA")
        down = module.lora_A[adapter_name].weight.detach().clone()
        up = module.lora_B[adapter_name].weight.detach().clone()
        rank = int(module.r[adapter_name])
        alpha = float(module.lora_alpha[adapter_name])
        if module.use_rslora.get(adapter_name, False):
            alpha = alpha * math.sqrt(rank)  # rsLoRA scale alpha/sqrt(r) == alpha*sqrt(r)/r
        out[plain_module_name(name)] = LoraModule(down=down, up=up, alpha=alpha)
    if not out:
        raise ValueError(f"model has no LoRA layers for adapter {adapter_name!r}")
    return dict(sorted(out.items()))


# ------------------------------------------------------------------------------------- kohya

def _te_name_with_text_model(name: str) -> str:
    """transformers 5 CLIPTextModel has no `text_model.` level; kohya keys always carry it."""
    return name if name.startswith("text_model.") else "text_model." + name


def kohya_module_names(component: str, names, family: str, unet_config: Mapping | None = None) -> dict[str, str]:
    """module name -> kohya LoRA name (no `.lora_down.weight` suffix) for one component, as
    sd-scripts names them: SD 1.x/2.x UNet diffusers names, SDXL UNet original (SGM) names."""
    _check_family(family)
    names = list(names)
    if component == "unet":
        if family == "sdxl":
            if unet_config is None:
                raise ValueError("SDXL kohya keys use the original UNet layout: pass unet_config (unet.config)")
            from .checkpoint import unet_module_map

            sgm = unet_module_map(unet_config)
            missing = [n for n in names if n not in sgm]
            if missing:
                raise ValueError(f"{len(missing)} UNet module(s) have no original-layout (SGM) name, "
                                 f"e.g. {missing[:5]}; is unet_config the config of the trained UNet?")
            mapped = {n: sgm[n] for n in names}
        else:
            mapped = {n: n for n in names}
        out = {n: f"{KOHYA_UNET_PREFIX}_{m.replace('.', '_')}" for n, m in mapped.items()}
    else:
        prefixes = KOHYA_TE_PREFIXES[family]
        if component not in prefixes:
            raise ValueError(f"a {family} model has no {component}; its text encoders are {list(prefixes)}")
        out = {n: f"{prefixes[component]}_{_te_name_with_text_model(n).replace('.', '_')}" for n in names}
    dupes = [k for k, c in Counter(out.values()).items() if c > 1]
    if dupes:
        raise ValueError(f"kohya names collide for {component}: {dupes[:5]}")
    return out


def to_kohya_state_dict(weights: LoraWeights, family: str, unet_config: Mapping | None = None,
                        dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """sd-scripts layout: `<lora name>.lora_down.weight` / `.lora_up.weight` (cast to `dtype`) and
    `.alpha` (0-dim float32 tensor holding the true alpha, so any alpha survives exactly)."""
    _check_family(family)
    _check_components(weights, family)
    sd: dict[str, torch.Tensor] = {}
    for comp in COMPONENTS:
        modules = weights.get(comp) or {}
        if not modules:
            continue
        names = kohya_module_names(comp, modules.keys(), family, unet_config)
        for name, m in modules.items():
            key = names[name]
            if isinstance(m, LoraModule):
                sd[f"{key}.lora_down.weight"] = m.down.detach().to(dtype=dtype).contiguous()
                sd[f"{key}.lora_up.weight"] = m.up.detach().to(dtype=dtype).contiguous()
            else:   # LoHa / LoKr / DoRA: their own tensors under their own names (formats/lycoris.py, dora.py)
                for part, t in m.tensors().items():
                    sd[f"{key}.{part}"] = t.detach().to(dtype=dtype).contiguous()
            sd[f"{key}.alpha"] = torch.tensor(float(m.alpha), dtype=torch.float32)
    return sd


def model_name_for_metadata(source: str | None) -> str:
    """What a file's metadata may say of the base model: a hub id as it is, a local file or folder by its
    base name only (as sd-scripts writes `ss_sd_model_name`), so no user's folder path travels with a LoRA."""
    if not source:
        return ""
    text = str(source).rstrip("/\\")
    looks_local = Path(text).exists() or Path(text).is_absolute() or text.startswith((".", "~")) or "\\" in text \
        or text.count("/") != 1
    return re.split(r"[/\\]", text)[-1] if looks_local else text


def kohya_metadata(*, family: str, rank: int, alpha: float, output_name: str,
                   resolution: tuple[int, int] | int, clip_skip: int | None, num_train_images: int,
                   tag_frequency: dict, steps: int, epoch: int, extra: dict | None = None,
                   prediction_type: str = "epsilon", title: str | None = None,
                   timestamp: float | None = None) -> dict[str, str]:
    """The `ss_*` and `modelspec.*` metadata sd-scripts writes into a LoRA, as strings, so
    A1111 (version filter, hashes), ComfyUI and LoRA browsers read our files like theirs.

    resolution is (width, height) or one int; prediction_type "epsilon" or "v_prediction";
    tag_frequency is sd-scripts' shape {"dataset folder": {"tag": count}}.
    """
    _check_family(family)
    if prediction_type not in ("epsilon", "v_prediction", "v"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    v_pred = prediction_type != "epsilon"
    if isinstance(resolution, int):
        reso = (resolution, resolution)
    else:
        reso = tuple(int(r) for r in resolution)
        if len(reso) == 1:
            reso = (reso[0], reso[0])
        if len(reso) != 2:
            raise ValueError(f"resolution must be an int or (width, height), got {resolution!r}")
    if not isinstance(tag_frequency, Mapping) or not all(
            isinstance(v, Mapping) and all(isinstance(c, int) for c in v.values()) for v in tag_frequency.values()):
        raise ValueError('tag_frequency must look like {"dataset folder": {"tag": count}} (sd-scripts\' shape)')

    if family == "sdxl":
        version, arch, impl = "sdxl_base_v1-0", "stable-diffusion-xl-v1-base", _IMPL_SGM
    elif family == "sd2":
        version = "sd_v2" + ("_v" if v_pred else "")
        arch, impl = ("stable-diffusion-v2-768-v" if v_pred else "stable-diffusion-v2-512"), _IMPL_DIFFUSERS
    else:
        version, arch, impl = "sd_v1" + ("_v" if v_pred else ""), "stable-diffusion-v1", _IMPL_DIFFUSERS
    ts = time.time() if timestamp is None else timestamp

    meta: dict[str, str] = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(int(rank)),
        "ss_network_alpha": str(float(alpha)),
        "ss_base_model_version": version,
        "ss_v2": str(family == "sd2"),  # A1111 detects SD 2.x LoRAs by ss_v2 == "True"
        "ss_output_name": str(output_name),
        "ss_resolution": str(reso),  # sd-scripts writes str((w, h)) -> "(512, 512)"
        "ss_clip_skip": str(clip_skip),  # "None" when unset, as sd-scripts writes it
        "ss_num_train_images": str(int(num_train_images)),
        "ss_tag_frequency": json.dumps(tag_frequency),
        "ss_steps": str(int(steps)),
        "ss_epoch": str(int(epoch)),
        "ss_training_finished_at": str(ts),
        "modelspec.sai_model_spec": SAI_MODEL_SPEC_VERSION,
        "modelspec.architecture": f"{arch}/lora",
        "modelspec.implementation": impl,
        "modelspec.title": str(title if title is not None else output_name),
        "modelspec.resolution": f"{reso[0]}x{reso[1]}",
        "modelspec.date": datetime.datetime.fromtimestamp(int(ts)).isoformat(),
        "modelspec.prediction_type": "v" if v_pred else "epsilon",
        "modelspec.implementation_version": f"sd-lora-helpers/{__version__}",
    }
    if clip_skip is not None:
        meta["modelspec.encoder_layer"] = str(clip_skip)
    for k, v in (extra or {}).items():
        meta[str(k)] = v if isinstance(v, str) else json.dumps(v) if isinstance(v, (dict, list, tuple)) else str(v)
    return meta


def _addnet_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """sd-scripts' `sshs_model_hash` (sha256 of the tensor data, what A1111 shows as the LoRA hash)
    and `sshs_legacy_hash`, computed as train_util.precalculate_safetensors_hashes does."""
    import safetensors.torch

    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    blob = safetensors.torch.save(tensors, ss_only)
    header_len = int.from_bytes(blob[:8], "little")
    model_hash = hashlib.sha256(blob[8 + header_len:]).hexdigest()
    legacy_hash = hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash


# ---------------------------------------------------------------------------------- diffusers

def to_diffusers_state_dict(weights: LoraWeights) -> dict[str, torch.Tensor]:
    """peft/diffusers layout: `<component>.<module>.lora_A.weight` / `.lora_B.weight`. Text-encoder
    names carry `text_model.` (what older transformers, diffusers and ComfyUI expect; diffusers 0.42
    strips it again for transformers 5's CLIPTextModel)."""
    _check_components(weights)
    sd: dict[str, torch.Tensor] = {}
    for comp in COMPONENTS:
        for name, m in (weights.get(comp) or {}).items():
            if not isinstance(m, LoraModule):
                raise ValueError(f"{comp}.{name} is a {m.kind} module: the diffusers/peft LoRA layout holds "
                                 "plain LoRA only; save LoHa, LoKr and DoRA in the kohya layout (save_format = "
                                 "\"kohya\"), which A1111, ComfyUI and helpers read")
            key = name if comp == "unet" else _te_name_with_text_model(name)
            sd[f"{comp}.{key}.lora_A.weight"] = m.down.detach().contiguous()
            sd[f"{comp}.{key}.lora_B.weight"] = m.up.detach().contiguous()
    return sd


def _most_common(values):
    # Ties go to the largest value so the choice does not depend on module order.
    counts = Counter(values)
    best = max(counts.values())
    return max(v for v, c in counts.items() if c == best)


def peft_adapter_config(modules: Mapping[str, LoraModule], text_encoder: bool = False) -> dict:
    """LoraConfig kwargs (r, lora_alpha, target_modules, rank/alpha patterns) that reproduce each
    module's rank and alpha; the adapter metadata diffusers stores next to a LoRA."""
    def key(name: str) -> str:
        # Text-encoder names without `text_model.`: peft matches a target as a whole name or a
        # dotted suffix, so one name fits CLIPTextModel with or without that level.
        return name.removeprefix("text_model.") if text_encoder else name

    r = int(_most_common(m.rank for m in modules.values()))
    alpha = float(_most_common(float(m.alpha) for m in modules.values()))
    return {
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(key(n) for n in modules),
        "rank_pattern": {key(n): m.rank for n, m in sorted(modules.items()) if m.rank != r},
        "alpha_pattern": {key(n): float(m.alpha) for n, m in sorted(modules.items()) if float(m.alpha) != alpha},
        "use_dora": False,
        "lora_bias": False,
    }


def _pipeline_class(family: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline


def _check_str_metadata(metadata: Mapping | None) -> dict[str, str]:
    bad = [k for k, v in (metadata or {}).items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise TypeError(f"safetensors metadata values must be strings; not strings: {bad[:5]}")
    return dict(metadata or {})


def save_lora(path, weights: LoraWeights, *, family: str, unet_config: Mapping | None = None,
              format: str = "kohya", metadata: dict[str, str] | None = None,
              dtype: torch.dtype = torch.float16, extra_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a LoRA atomically. "kohya": one `.safetensors` file in sd-scripts' layout (A1111,
    ComfyUI, diffusers, sd-scripts) with `metadata` plus sd-scripts' sshs_* hashes, and `extra_tensors` as they
    are (bundled embeddings). "diffusers": a
    folder from the pipeline's `save_lora_weights`, adapter metadata keeping every alpha (only
    diffusers reads that metadata: ComfyUI/A1111 take alpha from `.alpha` keys, so give them the
    kohya file)."""
    import safetensors.torch

    _check_family(family)
    _check_components(weights, family)
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if not any(weights.values()):
        raise ValueError("LoRA weights are empty: nothing to save")
    meta = _check_str_metadata(metadata)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    if format == "kohya":
        if path.suffix != ".safetensors":
            raise ValueError(f"a kohya LoRA is one .safetensors file; got {path.name!r}")
        tensors = {k: v.cpu() for k, v in to_kohya_state_dict(weights, family, unet_config, dtype).items()}
        tensors.update({k: v.detach().cpu().contiguous() for k, v in (extra_tensors or {}).items()})
        meta["sshs_model_hash"], meta["sshs_legacy_hash"] = _addnet_hashes(tensors, meta)
        return save_safetensors(tensors, path, metadata=meta)

    # diffusers: save_lora_weights into a temp folder, then swap it in.
    layers, adapter_meta = {}, {}
    for comp in COMPONENTS:
        modules = weights.get(comp) or {}
        if not modules:
            continue
        sd = to_diffusers_state_dict({comp: modules})
        layers[f"{comp}_lora_layers"] = {k.removeprefix(f"{comp}."): v.to(dtype=dtype).cpu() for k, v in sd.items()}
        adapter_meta[f"{comp}_lora_adapter_metadata"] = peft_adapter_config(modules, text_encoder=comp != "unet")
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a folder; a diffusers LoRA is written as a folder")
    with atomic_dir(path) as tmp:
        _pipeline_class(family).save_lora_weights(str(tmp), safe_serialization=True, **layers, **adapter_meta)
        file = tmp / DIFFUSERS_WEIGHT_NAME
        if meta:  # add our (ss_/modelspec.) metadata beside diffusers' own keys
            with safetensors.safe_open(str(file), framework="pt") as f:
                file_meta = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            safetensors.torch.save_file(tensors, str(file), metadata={**meta, **file_meta})
    return path


# ---------------------------------------------------------------------------------- reading

def _read_state_dict(path_or_state_dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if isinstance(path_or_state_dict, Mapping):
        return dict(path_or_state_dict), {}
    path = Path(path_or_state_dict)
    if path.is_dir():
        preferred = path / DIFFUSERS_WEIGHT_NAME
        files = [preferred] if preferred.exists() else sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise ValueError(f"{path} should hold one LoRA .safetensors file "
                             f"({DIFFUSERS_WEIGHT_NAME}); found {[f.name for f in files]}")
        path = files[0]
    if not path.exists():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    if path.suffix != ".safetensors":
        raise ValueError(f"{path.name}: only .safetensors LoRA files are read (pickled .pt/.bin/.ckpt files "
                         "can run code when loaded); convert it to safetensors first")
    tensors, metadata = load_safetensors(path, "LoRA file")
    return tensors, dict(metadata)


_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
_KOHYA_SUFFIXES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha",
                   **{f".{p}": p for p in (*HADA_PARTS, *UNSUPPORTED_HADA, *LOKR_PARTS, *UNSUPPORTED_LOKR, DORA_PART)}}
# peft/diffusers suffixes, newest first: (suffix, part)
_PEFT_SUFFIXES = (
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    ("_lora.down.weight", "down"), ("_lora.up.weight", "up"),  # attn-procs: to_q_lora.down.weight
    (".alpha", "alpha"),
)
_UNSUPPORTED_PARTS = ("lora_mid", "lora_magnitude_vector")
_UNSUPPORTED_ENDINGS = (".diff", ".diff_b", "lora_B.bias")


def _split_entries(sd: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """Group keys by module: ({raw module key: {"down"|"up"|"alpha": tensor}}, unparsed keys).
    kohya keys keep their `lora_unet_...` name; peft/diffusers keys their dotted name."""
    odd = [k for k in sd if any(p in k for p in _UNSUPPORTED_PARTS) or k.endswith(_UNSUPPORTED_ENDINGS)]
    if odd:
        raise ValueError(f"this file holds a LoRA variant we cannot load (peft's DoRA with a magnitude per output "
                         f"row, LoCon mid weights or full diffs), e.g. {odd[:5]}; plain LoRA, LoCon, LoHa, LoKr and "
                         f"LyCORIS' DoRA (dora_scale) are read")
    entries: dict[str, dict[str, torch.Tensor]] = {}
    unparsed: list[str] = []
    for k, v in sd.items():
        part = mod = None
        if k.startswith(_KOHYA_PREFIXES):
            for suffix, p in _KOHYA_SUFFIXES.items():
                if k.endswith(suffix):
                    part, mod = p, k[: -len(suffix)]
                    break
        else:
            for suffix, p in _PEFT_SUFFIXES:
                if k.endswith(suffix):
                    part, mod = p, k[: -len(suffix)]
                    break
            if part is not None:
                # attn-procs names: `attn1.processor.to_q_lora` -> `attn1.to_q`, to_out -> to_out.0
                mod = mod.replace(".processor.", ".")
                if k.endswith(("_lora.down.weight", "_lora.up.weight")) and mod.endswith(".to_out"):
                    mod += ".0"
        if part is None:
            unparsed.append(k)
            continue
        entries.setdefault(mod, {})[part] = v
    return entries, unparsed


def load_bundled_embeddings(path_or_state_dict) -> dict[str, dict[str, torch.Tensor]]:
    """{token: vectors} of the embeddings bundled in a LoRA file (A1111's bundle_emb.* keys); {} when none."""
    from .embedding import split_bundled

    sd, _ = _read_state_dict(path_or_state_dict)
    return split_bundled(sd)[1]


def pipeline_family(pipe) -> str:
    """The family of a loaded pipeline ("sd1" | "sd2" | "sdxl"), from its UNet's structure."""
    from ..sd.models import detect_family

    return detect_family(pipe)


def pipe_components(pipe) -> dict[str, torch.nn.Module]:
    """{component name: module} of the pipeline parts a LoRA can touch."""
    return {c: getattr(pipe, c) for c in COMPONENTS if getattr(pipe, c, None) is not None}


def _layer_names(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    out = {}
    for name, m in model_module_names(model).items():
        base = base_layer(m)
        if isinstance(base, (torch.nn.Linear, torch.nn.Conv2d)):
            out[name] = base
    return out


def _kohya_lookup(pipe, layers: dict[str, dict[str, torch.nn.Module]]) -> dict[str, tuple[str, str]]:
    """kohya LoRA name -> (component, module name) for every Linear/Conv2d of the pipeline,
    accepting the spellings tools write: UNet diffusers or original (SGM) names; text-encoder
    names with or without `text_model_`; `lora_te1_` for a single-encoder model."""
    lookup: dict[str, tuple[str, str]] = {}
    unet_names = layers.get("unet", {})
    for n in unet_names:
        lookup[f"{KOHYA_UNET_PREFIX}_{n.replace('.', '_')}"] = ("unet", n)
    try:
        from .checkpoint import unet_module_map

        for n, sgm in unet_module_map(pipe.unet.config).items():
            if n in unet_names:
                lookup.setdefault(f"{KOHYA_UNET_PREFIX}_{sgm.replace('.', '_')}", ("unet", n))
    except (ValueError, KeyError):
        pass  # a UNet without an original layout: diffusers names only
    if "text_encoder_2" in layers:
        te_prefixes = {"text_encoder": ("lora_te1",), "text_encoder_2": ("lora_te2",)}
    else:
        te_prefixes = {"text_encoder": ("lora_te", "lora_te1")}
    for comp, prefixes in te_prefixes.items():
        for n in layers.get(comp, {}):
            bare = n.removeprefix("text_model.")
            for p in prefixes:
                lookup[f"{p}_text_model_{bare.replace('.', '_')}"] = (comp, n)
                lookup.setdefault(f"{p}_{bare.replace('.', '_')}", (comp, n))
    return lookup


def _peft_resolve(raw: str, layers: dict[str, dict[str, torch.nn.Module]]) -> tuple[str, str] | None:
    comp, _, name = raw.partition(".")
    if comp not in COMPONENTS:
        comp, name = "unet", raw  # UNet-only files (unet.save_lora_adapter) have no prefix
    names = layers.get(comp)
    if names is None:
        return None
    for cand in (name, "text_model." + name, name.removeprefix("text_model.")):
        if cand in names:
            return comp, cand
    return None


def _pattern_value(patterns: Mapping, names: tuple[str, ...], default):
    """peft's rank/alpha_pattern lookup: a key matches a whole name or a dotted suffix of it
    (a key starting with `^` only from the start)."""
    for key, value in patterns.items():
        regex = rf"{key}$" if key.startswith("^") else rf"(.*\.)?({key})$"
        if any(re.match(regex, n) for n in names):
            return value
    return default


def _peft_alphas(file_meta: Mapping[str, str]) -> dict[str, dict]:
    """Per-component LoraConfig kwargs from diffusers' `lora_adapter_metadata` JSON, if any."""
    raw = file_meta.get(DIFFUSERS_METADATA_KEY)
    if not raw:
        return {}
    data = json.loads(raw)
    out: dict[str, dict] = {}
    for k, v in data.items():
        comp, _, field = k.partition(".")
        if comp in COMPONENTS and field:
            out.setdefault(comp, {})[field] = v
    return out


_SD12 = frozenset({"sd1", "sd2"})


def guess_file_family(entries: Mapping[str, Mapping[str, torch.Tensor]]) -> tuple[frozenset, str]:
    """Which families a LoRA file looks made for, and why (key prefixes, UNet layout, widths);
    an empty set when nothing tells."""
    keys = list(entries)
    if any(k.startswith(("lora_te2_", "text_encoder_2.")) for k in keys):
        return frozenset({"sdxl"}), "it has second-text-encoder keys (lora_te2_ / text_encoder_2.)"
    for k, parts in entries.items():
        if ("attn2_to_k" in k or "attn2.to_k" in k) and "down" in parts:
            width = int(parts["down"].shape[1])
            fam = {2048: "sdxl", 1024: "sd2", 768: "sd1"}.get(width)
            if fam:
                return frozenset({fam}), f"its cross-attention keys take {width}-wide text features"
    if any(re.search(r"transformer_blocks[._][1-9]", k) for k in keys):
        return frozenset({"sdxl"}), "its UNet transformers are deeper than one block"
    if any(re.search(r"down_blocks[._]0[._]attentions|input_blocks_1_1_", k) for k in keys):
        return _SD12, "its first UNet block has attention"
    if any(k.startswith("lora_te_") for k in keys):
        return _SD12, "it has single-text-encoder keys (lora_te_)"
    return frozenset(), ""


_FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}


def family_label(families: frozenset) -> str:
    """A family set as people name it: "SD 1.x", "SDXL", "SD 1.x/2.x"."""
    return "SD 1.x/2.x" if families == _SD12 else "/".join(_FAMILY_NAMES[f] for f in sorted(families))


def load_lora(path_or_state_dict, pipe) -> tuple[LoraWeights, dict[str, str]]:
    """Read a LoRA (our kohya/diffusers files, sd-scripts and other tools' kohya files with diffusers
    or SGM UNet names, peft/diffusers files, old attn-procs files) for `pipe`, matching every key
    to a module of the pipeline. Returns the weights and the file's metadata."""
    from .embedding import split_bundled

    sd, file_meta = _read_state_dict(path_or_state_dict)
    sd, _ = split_bundled(sd)   # bundled embeddings: read by load_bundled_embeddings
    if not sd:
        raise ValueError("the LoRA file holds no tensors")
    entries, unparsed = _split_entries(sd)
    layers = {c: _layer_names(m) for c, m in pipe_components(pipe).items()}
    model_family = pipeline_family(pipe)

    resolved: dict[str, tuple[str, str]] = {}
    unknown: list[str] = list(unparsed)
    lookup = _kohya_lookup(pipe, layers) if any(r.startswith(_KOHYA_PREFIXES) for r in entries) else {}
    for raw in entries:
        hit = lookup.get(raw) if raw.startswith(_KOHYA_PREFIXES) else _peft_resolve(raw, layers)
        if hit is None:
            unknown.append(raw)
        else:
            resolved[raw] = hit

    configs = _peft_alphas(file_meta)
    lokr_factor = _network_arg(file_meta, "factor", -1)
    weights: LoraWeights = {}
    problems: list[str] = []
    for raw, (comp, name) in resolved.items():
        parts = entries[raw]
        layer = layers[comp][name]
        if any(p.startswith(("hada_", "lokr_")) for p in parts):   # LyCORIS LoHa / LoKr
            if DORA_PART in parts:
                problems.append(f"{raw}: DoRA on a LoHa or LoKr (dora_scale beside hada_/lokr_) is not read; "
                                "DoRA on LoRA and LoCon is")
                continue
            try:
                if any(p.startswith("lokr_") for p in parts):
                    module = lokr_from_parts(parts, raw)
                    module.factor = lokr_factor
                else:
                    module = loha_from_parts(parts, raw)
            except ValueError as e:
                problems.append(str(e))
                continue
            err = module.fits(layer)
            if err:
                problems.append(f"{comp}.{name}: {err}")
            elif name in weights.get(comp, {}):
                problems.append(f"{comp}.{name}: given twice in the file")
            else:
                weights.setdefault(comp, {})[name] = module
            continue
        if "down" not in parts or "up" not in parts:
            problems.append(f"{raw}: has {sorted(parts)} but needs both down and up weights")
            continue
        down, up = parts["down"], parts["up"]
        down, up, err = _fit_shapes(layer, down, up)
        if err:
            problems.append(f"{comp}.{name}: {err}")
            continue
        rank = int(down.shape[0])
        if "alpha" in parts:
            alpha = float(parts["alpha"].float().item())
        elif comp in configs and not raw.startswith(_KOHYA_PREFIXES):
            cfg = configs[comp]
            file_name = raw.partition(".")[2] if raw.startswith(comp + ".") else raw
            alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, (name, file_name),
                                         cfg.get("lora_alpha", 8)))  # 8: peft's LoraConfig default
            if cfg.get("use_rslora"):
                alpha *= math.sqrt(rank)
        else:
            alpha = float(rank)  # no alpha stored: scale 1 (the diffusers/peft convention)
        if comp in weights and name in weights[comp]:
            problems.append(f"{comp}.{name}: given twice in the file")
            continue
        module = LoraModule(down=down, up=up, alpha=alpha)
        if DORA_PART in parts:   # LyCORIS' DoRA: a magnitude per input column of the weight
            module = DoraModule(down=down, up=up, alpha=alpha, magnitude=parts[DORA_PART].reshape(-1))
            try:
                module.check(f"{comp}.{name}")
            except ValueError as e:
                problems.append(str(e))
                continue
        weights.setdefault(comp, {})[name] = module

    if unknown or problems:
        guess, why = guess_file_family(entries)
        if guess and model_family not in guess:
            label = family_label(guess)
            raise ValueError(f"this LoRA looks made for {label} ({why}), but the model is "
                             f"{_FAMILY_NAMES[model_family]}; load it with a {label} base model")
        if unknown:
            raise ValueError(f"{len(unknown)} LoRA key(s) match no module of this {_FAMILY_NAMES[model_family]} "
                             f"model, e.g. {sorted(unknown)[:5]}")
        raise ValueError(f"LoRA shapes do not fit this {_FAMILY_NAMES[model_family]} model: "
                         + "; ".join(problems[:5]))
    return {c: dict(sorted(m.items())) for c, m in weights.items()}, file_meta


def _network_arg(meta: Mapping[str, str], name: str, default: int) -> int:
    """An integer of the file's ss_network_args (LyCORIS writes its settings there), or `default`."""
    try:
        return int(json.loads(meta.get("ss_network_args") or "{}").get(name, default))
    except (ValueError, TypeError, AttributeError):
        return default


def _fit_shapes(layer: torch.nn.Module, down: torch.Tensor, up: torch.Tensor):
    """Check (and, for 1x1 conv <-> linear spellings, reshape) down/up against the layer."""
    if isinstance(layer, torch.nn.Conv2d):
        kh, kw = layer.kernel_size
        if down.dim() == 2 and (kh, kw) == (1, 1):
            down = down[:, :, None, None]
        if up.dim() == 2:
            up = up[:, :, None, None]
        want_down = (down.shape[0], layer.in_channels // layer.groups, kh, kw)
        want_up = (layer.out_channels, down.shape[0], 1, 1)
    else:
        if down.dim() == 4 and tuple(down.shape[2:]) == (1, 1):
            down = down[:, :, 0, 0]
        if up.dim() == 4 and tuple(up.shape[2:]) == (1, 1):
            up = up[:, :, 0, 0]
        want_down = (down.shape[0], layer.in_features)
        want_up = (layer.out_features, down.shape[0])
    if tuple(down.shape) != want_down or tuple(up.shape) != want_up:
        return down, up, (f"expected down {list(want_down)} and up {list(want_up)}, "
                          f"got down {list(down.shape)} and up {list(up.shape)}")
    return down, up, None


# ---------------------------------------------------------------------------------- applying

def apply_lora(pipe, weights: LoraWeights, adapter_name: str, scale: float = 1.0) -> None:
    """Inject `weights` into `pipe` as peft adapter `adapter_name` (true alphas kept), active
    alongside the adapters already active, at weight `scale`. Combine adapters afterwards with
    `pipe.set_adapters([...], adapter_weights=[...])`."""
    comps = pipe_components(pipe)
    missing = [c for c in weights if weights[c] and c not in comps]
    if missing:
        raise ValueError(f"LoRA has weights for {missing}, which this pipeline does not have "
                         f"(it has {list(comps)})")
    existing = {a for names in pipe.get_list_adapters().values() for a in names}
    if adapter_name in existing:
        raise ValueError(f"adapter name {adapter_name!r} is already loaded; pick another or "
                         "pipe.delete_adapters(name) first")
    previously_active = [a for a in pipe.get_active_adapters() if a != adapter_name] if existing else []

    # pipe.load_lora_weights(<dict>) cannot carry adapter metadata in diffusers 0.42 (a peft dict
    # would load with alpha = rank), so call the per-component loaders it uses, with metadata.
    cls = type(pipe)
    for comp in COMPONENTS:
        modules = weights.get(comp) or {}
        if not modules:
            continue
        kinds = {type(m) for m in modules.values()}
        dora = {n: m.magnitude for n, m in modules.items() if isinstance(m, DoraModule)}
        if dora:   # DoRA: its LoRA injected as any LoRA, then its layers made DoRA (formats/dora.py)
            modules = {n: LoraModule(m.down, m.up, m.alpha) if isinstance(m, DoraModule) else m
                       for n, m in modules.items()}
            kinds = {type(m) for m in modules.values()}
        if kinds != {LoraModule}:
            if len(kinds) > 1:
                raise ValueError(f"{comp}: this file mixes {sorted(k.__name__ for k in kinds)} modules; one adapter "
                                 "holds one network type")
            inject = inject_lokr if kinds == {LokrModule} else inject_loha
            inject(comps[comp], modules, adapter_name, text_encoder=comp != "unet")
            continue
        cfg = peft_adapter_config(modules, text_encoder=comp != "unet")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # intended: many adapters
            if comp == "unet":
                cls.load_lora_into_unet(to_diffusers_state_dict({comp: modules}), network_alphas=None,
                                        unet=comps[comp], adapter_name=adapter_name,
                                        metadata={f"{comp}.{k}": v for k, v in cfg.items()}, _pipeline=pipe)
            else:  # peft directly: no transformers version coupling (see lora_targets.inject_lora)
                from peft import LoraConfig

                te = comps[comp]
                inject_lora(te, LoraConfig(**cfg), adapter_name, {n: (m.down, m.up) for n, m in modules.items()})
                te.to(device=te.device, dtype=te.dtype)
        if dora:
            add_input_dora(comps[comp], adapter_name, dora)
    _activate(pipe, previously_active + [adapter_name], adapter_name, scale)


def _activate(pipe, names: list[str], new_adapter: str, scale: float) -> None:
    """Make `names` the active adapters in every component without touching the weights of the
    adapters already there; the new adapter gets `scale`."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for model in pipe_components(pipe).values():
        for module in model.modules():
            if isinstance(module, BaseTunerLayer) and hasattr(module, "scaling"):
                module.set_adapter([n for n in names if n in module.scaling])
                module.set_scale(new_adapter, scale)
