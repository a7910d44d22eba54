"""Merge LoRAs: into the base model's weights (a single-file checkpoint A1111/ComfyUI load, and/or a diffusers
folder), or into one LoRA, either exactly (their ranks concatenated) or at a lower rank (then resized by SVD).

Every LoRA module adds weight * (alpha / rank) * up @ down to its layer; a merge computes exactly that sum.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..formats.lora import LoraModule, LoraWeights


def concat_loras(loras: list[tuple[LoraWeights, float]]) -> LoraWeights:
    """One LoRA whose every module equals the weighted sum of the inputs' (exact): ranks concatenated,
    each input's weight * alpha / rank folded into its up factor, alpha = the new rank (scale 1)."""
    out: dict[str, dict[str, list[tuple[LoraModule, float]]]] = {}
    for weights, w in loras:
        for comp, modules in weights.items():
            for name, m in modules.items():
                out.setdefault(comp, {}).setdefault(name, []).append((m, w))
    merged: LoraWeights = {}
    for comp, modules in out.items():
        for name, parts in modules.items():
            if any(not isinstance(m, LoraModule) for m, _ in parts):
                kind = next(m.kind for m, _ in parts if not isinstance(m, LoraModule))
                raise ValueError(f"{comp}.{name}: {kind} modules do not concatenate into one LoRA; merge them into "
                                 "the model (merge_to_checkpoint) instead")
            shapes = {tuple(m.down.shape[1:]) for m, _ in parts}
            if len(shapes) > 1:
                raise ValueError(f"{comp}.{name}: the LoRAs' down weights have different shapes {sorted(shapes)}; "
                                 "they were made for different models")
            down = torch.cat([m.down.float() for m, _ in parts], 0)
            up = torch.cat([m.up.float() * (w * m.scale) for m, w in parts], 1)
            merged.setdefault(comp, {})[name] = LoraModule(down=down, up=up, alpha=float(down.shape[0]))
    return merged


def merge_into_model(pipe, loras: list[tuple[LoraWeights, float]]) -> int:
    """Add the LoRAs' weighted changes to the pipeline's own weights, in place; returns the layers changed."""
    from ..formats.lora import pipe_components
    from ..sd.lora_targets import base_layer, model_module_names

    changed = 0
    parts = pipe_components(pipe)
    with torch.no_grad():
        for weights, w in loras:
            for comp, modules in weights.items():
                names = model_module_names(parts[comp])
                for name, m in modules.items():
                    layer = base_layer(names[name])
                    # each module type knows its own change: scale * up @ down, LoHa's, LoKr's, DoRA's (which
                    # depends on the weight it changes)
                    delta = m.delta(layer.weight).double() * w
                    layer.weight.copy_((layer.weight.double() + delta).to(layer.weight.dtype))
                    changed += 1
    return changed


def merge_to_checkpoint(model: str, loras: list[tuple[str | Path, float]], *, single_file: str | Path | None = None,
                        diffusers_dir: str | Path | None = None, dtype: torch.dtype = torch.float16) -> list[Path]:
    """The base `model` with the LoRAs (path, weight) merged in, written as a single-file checkpoint and/or a
    diffusers folder. The merge is computed in fp32 (fp64 for the sums) and cast to `dtype` once at the end."""
    from ..formats.checkpoint import save_single_file
    from ..formats.lora import load_lora
    from ..sd.models import load_base

    if single_file is None and diffusers_dir is None:
        raise ValueError("merge into a model writes a single-file checkpoint, a diffusers folder, or both: "
                         "give at least one output")
    base = load_base(model, dtype=torch.float32)
    read = [(load_lora(path, base.pipe)[0], float(w)) for path, w in loras]
    merge_into_model(base.pipe, read)
    written = []
    meta = {"helpers_merged_loras": ", ".join(f"{Path(p).name}:{w:g}" for p, w in loras)}
    if single_file is not None:
        written.append(save_single_file(base.pipe, single_file, base.family, dtype=dtype, metadata=meta))
    if diffusers_dir is not None:
        from ..atomic import atomic_dir

        with atomic_dir(Path(diffusers_dir)) as tmp:
            base.pipe.to(dtype).save_pretrained(str(tmp), safe_serialization=True)
        written.append(Path(diffusers_dir))
    return written


def merge_loras(loras: list[tuple[str | Path, float]], dst: str | Path, *, model: str, rank: int | None = None
                ) -> Path:
    """The LoRAs (path, weight) as one kohya LoRA: exact (concatenated ranks), or at `rank` by SVD. `model` is
    the base (only its configs are read, as `convert` does)."""
    from ..formats.lora import load_lora, save_lora
    from ..sd.models import detect_family
    from .convert import model_skeleton

    skeleton = model_skeleton(model)
    merged = concat_loras([(load_lora(p, skeleton)[0], float(w)) for p, w in loras])
    family = detect_family(skeleton.unet.config)
    meta = {"ss_training_comment": "merged from " + ", ".join(f"{Path(p).name} x {w:g}" for p, w in loras)}
    if rank is None:
        return save_lora(dst, merged, family=family, unet_config=skeleton.unet.config, metadata=meta,
                         dtype=torch.float32)
    from ..formats.lora import to_kohya_state_dict
    from .resize import resize_state_dict

    tensors = to_kohya_state_dict(merged, family, skeleton.unet.config, torch.float32)
    small, _ = resize_state_dict(tensors, rank)
    from ..atomic import save_safetensors

    meta.update({"ss_network_dim": str(rank), "ss_network_module": "networks.lora"})
    return save_safetensors({k: v.contiguous() for k, v in small.items()}, Path(dst), metadata=meta)
