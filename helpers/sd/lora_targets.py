"""Which modules of a UNet / CLIP text encoder get LoRA, by preset.

`full` reproduces kohya sd-scripts' default selection (networks/lora.py): every Linear and 1x1
Conv2d inside the UNet's Transformer2DModel blocks and inside the text encoder's CLIPAttention /
CLIPMLP, so our LoRAs have the module set A1111/ComfyUI users know. `attention` keeps only the
attention projections. LoCon (sd-scripts' `conv_dim`) adds every Linear and Conv2d inside the ResNet blocks
and the down/upsamplers (`unet_resnet_target_modules`), the 3x3 convolutions among them at their own rank.
Names are full module names, as peft's `LoraConfig(target_modules=...)` matches them exactly.
"""

from __future__ import annotations

import torch

PRESETS = ("attention", "full")

# Container classes sd-scripts searches (by class name, as it does) for LoRA targets.
UNET_CONTAINERS = ("Transformer2DModel",)
UNET_RESNET_CONTAINERS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")   # sd-scripts' ..._CONV2D_3X3 set
TEXT_ENCODER_CONTAINERS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")
TEXT_ATTENTION_CONTAINERS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2")

UNET_ATTENTION_LEAVES = tuple(f"{attn}.{leaf}" for attn in ("attn1", "attn2")
                              for leaf in ("to_q", "to_k", "to_v", "to_out.0"))
TEXT_ATTENTION_LEAVES = ("q_proj", "k_proj", "v_proj", "out_proj")

# Sub-module names peft adds around a wrapped layer; they are not model modules.
_PEFT_PARTS = frozenset({"base_layer", "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B",
                         "lora_dropout", "lora_magnitude_vector", "lora_variant"})


def _check_preset(preset: str) -> None:
    if preset not in PRESETS:
        raise ValueError(f"LoRA preset must be one of {PRESETS}, got {preset!r}")


def base_layer(module: torch.nn.Module) -> torch.nn.Module:
    """The wrapped layer if `module` is a peft LoRA wrapper, else the module itself."""
    get_base = getattr(module, "get_base_layer", None)
    return get_base() if callable(get_base) else module


def is_lora_target_layer(module: torch.nn.Module) -> bool:
    """True for the layer types sd-scripts gives LoRA by default: Linear and 1x1 Conv2d."""
    module = base_layer(module)
    if isinstance(module, torch.nn.Linear):
        return True
    return isinstance(module, torch.nn.Conv2d) and tuple(module.kernel_size) == (1, 1)


def plain_module_name(name: str) -> str:
    """A module's name in the plain model: PeftModel (get_peft_model) nests the model as base_model.model
    (diffusers' add_adapter does not), torch.compile wraps it as _orig_mod."""
    return name.removeprefix("base_model.model.").replace("_orig_mod.", "")


def model_module_names(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """named_modules() without peft's wrapper internals (`.base_layer`, `.lora_A.<adapter>`, ...)."""
    return {name: mod for name, mod in model.named_modules()
            if not _PEFT_PARTS.intersection(name.split("."))}


def is_conv_target_layer(module: torch.nn.Module) -> bool:
    """True for a Conv2d with a kernel larger than 1x1 (LoCon's extra layers)."""
    module = base_layer(module)
    return isinstance(module, torch.nn.Conv2d) and tuple(module.kernel_size) != (1, 1)


def _targets_in(model: torch.nn.Module, containers: tuple[str, ...],
                leaves: tuple[str, ...] | None, convs: bool = False) -> list[str]:
    modules = model_module_names(model)
    found: set[str] = set()
    for name, module in modules.items():
        if type(module).__name__ not in containers:
            continue
        prefix = f"{name}." if name else ""
        for child_name, child in modules.items():
            if not child_name.startswith(prefix) or child_name == name:
                continue
            rel = child_name[len(prefix):]
            if not (is_lora_target_layer(child) or (convs and is_conv_target_layer(child))):
                continue
            if leaves is not None and not any(rel == leaf or rel.endswith("." + leaf) for leaf in leaves):
                continue
            found.add(child_name)
    return sorted(found)


def unet_target_modules(unet: torch.nn.Module, preset: str) -> list[str]:
    """Sorted full names of the UNet modules that get LoRA under `preset` ("attention" or "full")."""
    _check_preset(preset)
    if preset == "full":
        return _targets_in(unet, UNET_CONTAINERS, None)
    return _targets_in(unet, UNET_CONTAINERS, UNET_ATTENTION_LEAVES)


def unet_resnet_target_modules(unet: torch.nn.Module) -> tuple[list[str], list[str]]:
    """LoCon's extra UNet modules: (Linear and 1x1 convolutions, larger convolutions) inside the ResNet blocks and
    the down/upsamplers, as sd-scripts' networks/lora.py selects them with conv_dim (time_emb_proj,
    conv_shortcut; conv1, conv2 and the samplers' conv)."""
    names = _targets_in(unet, UNET_RESNET_CONTAINERS, None, convs=True)
    modules = model_module_names(unet)
    convs = [n for n in names if is_conv_target_layer(modules[n])]
    return [n for n in names if n not in set(convs)], convs


def text_encoder_target_modules(text_encoder: torch.nn.Module, preset: str) -> list[str]:
    """Sorted full names of the CLIP text-encoder modules that get LoRA under `preset`."""
    _check_preset(preset)
    if preset == "full":
        return _targets_in(text_encoder, TEXT_ENCODER_CONTAINERS, None)
    return _targets_in(text_encoder, TEXT_ATTENTION_CONTAINERS, TEXT_ATTENTION_LEAVES)


def inject_lora(model: torch.nn.Module, config, adapter_name: str = "default",
                weights: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
    """Add LoRA layers to `model` with peft itself, and optionally fill them (`weights`: module name ->
    (down, up)); the adapter is recorded where diffusers' pipeline methods look for it (`set_adapters`,
    `get_list_adapters`, `delete_adapters`, `unload_lora_weights`).

    peft is called directly rather than through transformers' or diffusers' `add_adapter`/`load_adapter`:
    those wrappers check peft's version against their own minimum (transformers 5.24 wants a peft that
    is not released), which ties every text-encoder LoRA to their release cycle.
    """
    import warnings

    from peft import inject_adapter_in_model

    configs = dict(getattr(model, "peft_config", None) or {})
    if adapter_name in configs:
        raise ValueError(f"adapter name {adapter_name!r} is already on this model")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # intended: several adapters
        inject_adapter_in_model(config, model, adapter_name=adapter_name)
    configs[adapter_name] = config
    model.peft_config = configs
    model._hf_peft_config_loaded = True
    if weights is None:
        return
    by_short_name = {name.removeprefix("text_model."): name for name in model_module_names(model)}
    with torch.no_grad():
        for name, (down, up) in weights.items():
            full = by_short_name.get(name.removeprefix("text_model."))
            layer = model.get_submodule(full) if full else None
            if layer is None or adapter_name not in getattr(layer, "lora_A", {}):
                raise ValueError(f"LoRA module {name!r} has no layer in this {type(model).__name__}")
            a, b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
            if a.shape != down.shape or b.shape != up.shape:
                raise ValueError(f"LoRA module {name!r}: expected down {list(a.shape)} and up {list(b.shape)}, "
                                 f"got {list(down.shape)} and {list(up.shape)}")
            a.copy_(down)
            b.copy_(up)
