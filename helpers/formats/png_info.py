"""A1111's `parameters` text in PNGs: written the way AUTOMATIC1111 writes it (prompt, negative prompt, steps,
sampler, CFG, seed, size, model, LoRA hashes) and read back from A1111's files and ours."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from ..atomic import atomic_path


def quote_param(value: Any) -> str:
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
    fields = [f"Steps: {steps}", f"Sampler: {quote_param(sampler)}", f"CFG scale: {cfg_scale:g}", f"Seed: {seed}",
              f"Size: {width}x{height}"]
    if model:
        fields.append(f"Model: {quote_param(model)}")
    if clip_skip > 1:
        fields.append(f"Clip skip: {clip_skip}")
    for key, value in (extra or {}).items():
        fields.append(f"{key}: {quote_param(value)}")
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
        from .lora import DIFFUSERS_WEIGHT_NAME

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
