"""What is inside a LoRA file, readably: the family it was made for, its network type, rank and alpha per
block, the trained components, the training settings from its sd-scripts metadata, tag frequency and hashes.

Reads kohya/sd-scripts files (plain LoRA, LoCon, and the LyCORIS LoHa/LoKr/DoRA keys) and diffusers/peft
files; it only reads the file, it loads no model.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# the settings shown, in order: (metadata key, label)
SETTINGS = [
    ("ss_sd_model_name", "base model"), ("ss_base_model_version", "base model version"),
    ("ss_network_module", "network module"), ("ss_network_dim", "rank"), ("ss_network_alpha", "alpha"),
    ("ss_network_args", "network args"), ("ss_resolution", "resolution"),
    ("ss_num_train_images", "training images (with repeats)"), ("ss_num_reg_images", "class images"),
    ("ss_steps", "steps"), ("ss_epoch", "epochs"), ("ss_learning_rate", "learning rate"),
    ("ss_unet_lr", "UNet learning rate"), ("ss_text_encoder_lr", "text encoder learning rate"),
    ("ss_optimizer", "optimizer"), ("ss_lr_scheduler", "LR scheduler"), ("ss_mixed_precision", "precision"),
    ("ss_clip_skip", "clip skip"), ("ss_max_token_length", "max token length"), ("ss_min_snr_gamma", "min SNR gamma"),
    ("ss_noise_offset", "noise offset"), ("ss_prior_loss_weight", "prior loss weight"), ("ss_seed", "seed"),
    ("ss_training_finished_at", "finished at (unix time)"), ("ss_output_name", "output name"),
]
_FAMILY_LABELS = {"sd_v1": "SD 1.x", "sd_v2": "SD 2.x", "sdxl_base_v1-0": "SDXL"}


@dataclass
class Block:
    """The modules of one UNet block or text-encoder layer: how many, their ranks and alphas."""

    name: str
    modules: int
    ranks: list[int]
    alphas: list[float]


@dataclass
class LoraInfo:
    """Everything `inspect_lora` found in a file."""

    path: Path
    layout: str                      # kohya | diffusers
    network: str                     # lora | locon | loha | lokr | dora (+ lora/locon), ...
    family: str                      # "SD 1.x", "SDXL", ... or "unknown"
    family_reason: str
    components: dict[str, int]       # unet / text_encoder / text_encoder_2 -> modules
    blocks: list[Block]
    settings: list[tuple[str, str]]  # (label, value) from the ss_* metadata
    tags: list[tuple[str, int]]      # the most frequent training tags
    embeddings: list[str]            # bundled embeddings (bundle_emb.<name>.*)
    hashes: dict[str, str]
    tensors: int
    params: int
    metadata: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["path"] = str(self.path)
        d["blocks"] = [b.__dict__ for b in self.blocks]
        return d


def _component(key: str) -> str:
    if key.startswith(("lora_te2_", "text_encoder_2.")):
        return "text_encoder_2"
    if key.startswith(("lora_te_", "lora_te1_", "text_encoder.")):
        return "text_encoder"
    if key.startswith("bundle_emb."):
        return "embeddings"
    return "unet"


def _module_and_part(key: str) -> tuple[str, str]:
    """("module key", "part") of a tensor key, for every layout this reads."""
    for suffix in (".lora_down.weight", ".lora_up.weight", ".lora_mid.weight", ".alpha", ".dora_scale",
                   ".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2",
                   ".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2",
                   ".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector", ".diff", ".diff_b"):
        if key.endswith(suffix):
            return key[: -len(suffix)], suffix.lstrip(".")
    return key, ""


def _block_of(module: str) -> str:
    """"down_blocks_1", "mid_block", "input_blocks_4", "te layer 3", ... of a module key."""
    name = re.sub(r"^(lora_unet_|lora_te[12]?_|unet\.|text_encoder(_2)?\.)", "", module).replace(".", "_")
    m = re.match(r"(down_blocks_\d+|up_blocks_\d+|mid_block|input_blocks_\d+|output_blocks_\d+|middle_block)", name)
    if m:
        return m.group(1)
    m = re.search(r"layers_(\d+)", name)
    prefix = {"text_encoder_2": "te2", "text_encoder": "te"}.get(_component(module), "")
    if m:
        return f"{prefix} layer {int(m.group(1)):02d}".strip()
    return name.split("_")[0] or module


def _network(parts: set[str], has_conv3: bool, meta: dict[str, str]) -> str:
    args = meta.get("ss_network_args", "")
    if any(p.startswith("hada_") for p in parts):
        kind = "loha"
    elif any(p.startswith("lokr_") for p in parts):
        kind = "lokr"
    elif has_conv3:
        kind = "locon"
    else:
        kind = "lora"
    if "dora_scale" in parts or "lora_magnitude_vector" in parts:
        kind = f"dora ({kind})"
    if '"algo"' in args:
        try:
            algo = json.loads(args).get("algo")
            if algo and algo not in kind:
                kind = f"{kind} (metadata says algo={algo})"
        except ValueError:
            pass
    return kind


def _hashes(path: Path) -> dict[str, str]:
    """sha256 of the whole file (what Civitai lists) and of the tensor data after the header (sd-scripts'
    sshs_model_hash, what A1111 shows as the LoRA's hash), with the first 10 characters A1111 prints."""
    whole, data = hashlib.sha256(), hashlib.sha256()
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little")
        header = f.read(n)
        whole.update(head + header)
        while chunk := f.read(1 << 20):
            whole.update(chunk)
            data.update(chunk)
    out = {"sha256": whole.hexdigest(), "tensor_data_sha256": data.hexdigest()}
    out["a1111_short"] = out["tensor_data_sha256"][:12]
    return out


def inspect_lora(path: str | Path, top_tags: int = 20) -> LoraInfo:
    """Read a LoRA file's header and tensors and describe them (ValueError for a file that is no LoRA)."""
    from ..files import load_safetensors
    from ..formats.lora import family_label, guess_file_family

    path = Path(path)
    tensors, meta = load_safetensors(path, "LoRA file")
    meta = dict(meta)
    modules: dict[str, dict[str, Any]] = {}
    embeddings = sorted({k.split(".")[1] for k in tensors if k.startswith("bundle_emb.")})
    for key, t in tensors.items():
        if key.startswith("bundle_emb."):
            continue
        mod, part = _module_and_part(key)
        if part:   # a key named like no LoRA part is not a module
            modules.setdefault(mod, {})[part] = t
    if not modules:
        raise ValueError(f"{path} holds no LoRA modules ({len(tensors)} tensors, none named like a LoRA's)")
    parts = {p for m in modules.values() for p in m}
    has_conv3 = any(t.ndim == 4 and t.shape[-1] > 1 for m in modules.values() for t in m.values())
    layout = "kohya" if any(k.startswith("lora_") for k in modules) else "diffusers"

    version = meta.get("ss_base_model_version", "")
    family, reason = next(((label, "its ss_base_model_version metadata") for key, label in _FAMILY_LABELS.items()
                           if version.startswith(key)), ("", ""))
    if not family:
        entries = {k: {("down" if "down" in p or p.startswith("lora_A") else p): v for p, v in m.items()}
                   for k, m in modules.items()}
        fams, reason = guess_file_family(entries)
        family = family_label(fams) if fams else "unknown"

    blocks: dict[str, dict[str, list]] = {}
    for mod, m in sorted(modules.items()):
        down = m.get("lora_down.weight", m.get("lora_A.weight"))
        rank = int(down.shape[0]) if down is not None else int(
            next((t.shape[1] for p, t in m.items() if p in ("hada_w1_a", "lokr_w1_a")), 0) or 0)
        alpha = float(m["alpha"].item()) if "alpha" in m else float(rank)
        b = blocks.setdefault(_block_of(mod), {"n": 0, "ranks": [], "alphas": []})
        b["n"] += 1
        b["ranks"].append(rank)
        b["alphas"].append(alpha)
    block_list = [Block(name, b["n"], sorted(set(b["ranks"])), sorted(set(b["alphas"])))
                  for name, b in sorted(blocks.items(), key=lambda kv: _block_order(kv[0]))]

    tags: Counter = Counter()
    try:
        for folder in json.loads(meta.get("ss_tag_frequency", "{}") or "{}").values():
            tags.update({k: int(v) for k, v in folder.items()})
    except (ValueError, AttributeError):
        pass
    return LoraInfo(
        path=path, layout=layout, network=_network(parts, has_conv3, meta), family=family, family_reason=reason,
        components=dict(Counter(_component(m) for m in modules)), blocks=block_list,
        settings=[(label, meta[key]) for key, label in SETTINGS if key in meta and meta[key] not in ("", "None")],
        tags=tags.most_common(top_tags), embeddings=embeddings, hashes=_hashes(path), tensors=len(tensors),
        params=sum(int(t.numel()) for t in tensors.values()), metadata=meta)


def _block_order(name: str) -> tuple:
    order = ["te", "te2", "down_blocks", "input_blocks", "mid_block", "middle_block", "up_blocks", "output_blocks"]
    head = name.split(" ")[0] if " " in name else re.sub(r"_\d+$", "", name)
    num = re.findall(r"\d+", name)
    return (order.index(head) if head in order else len(order), int(num[0]) if num else 0, name)


def format_info(info: LoraInfo) -> str:
    """The report as text: one screen for a typical LoRA."""
    lines = [f"{info.path.name}: {info.network} LoRA for {info.family}"
             + (f" ({info.family_reason})" if info.family_reason else ""),
             f"  layout {info.layout}; {info.tensors} tensors, {info.params:,} parameters; trained: "
             + ", ".join(f"{c} ({n} modules)" for c, n in info.components.items())]
    if info.embeddings:
        lines.append(f"  bundled embeddings: {', '.join(info.embeddings)}")
    lines.append("  rank / alpha per block:")
    for b in info.blocks:
        ranks = "/".join(map(str, b.ranks))
        alphas = "/".join(f"{a:g}" for a in b.alphas)
        lines.append(f"    {b.name:<18} {b.modules:>4} modules   rank {ranks:<8} alpha {alphas}")
    if info.settings:
        lines.append("  training settings:")
        lines += [f"    {label}: {value}" for label, value in info.settings]
    if info.tags:
        lines.append("  most frequent training tags: " + ", ".join(f"{t} ({n})" for t, n in info.tags[:12]))
    lines.append(f"  hashes: sha256 {info.hashes['sha256'][:16]}..., A1111 {info.hashes['a1111_short']} "
                 f"(tensor data sha256 {info.hashes['tensor_data_sha256'][:16]}...)")
    return "\n".join(lines)
