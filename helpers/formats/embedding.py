"""Textual Inversion files: A1111's and diffusers' embedding layouts read (SD 1.x, 2.x, SDXL) and written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..sd.embeddings import SDXL_KEYS

_WIDTH_FAMILY = {768: "SD 1.x (CLIP ViT-L)", 1024: "SD 2.x (OpenCLIP ViT-H)", 1280: "SDXL (OpenCLIP ViT-bigG)"}


FAMILY_LABEL = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}


def read_embedding(path: str | Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """Read a Textual Inversion file into {"single": [n, d]} (one text encoder) or {"clip_l", "clip_g"}
    (SDXL), plus the token the file itself names (diffusers format), if any.

    Formats: A1111/sd-scripts `emb_params`, SDXL `clip_l`/`clip_g`, A1111 `string_to_param` and diffusers
    `{token: vector}`; `.safetensors`, or `.pt`/`.bin` read with torch.load(weights_only=True) only."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"embedding file not found: {path}")
    if path.suffix == ".safetensors":
        from ..files import load_safetensors

        data: Any = load_safetensors(path, "embedding file")[0]
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


def file_family(vectors: dict[str, torch.Tensor]) -> str:
    """Which model family an embedding file's vectors were made for, in words."""
    if "clip_g" in vectors:
        return "SDXL (clip_l + clip_g)"
    width = int(vectors["single"].shape[1])
    return _WIDTH_FAMILY.get(width, f"a model whose text encoder is {width} wide")


def save_embedding(path: str | Path, tensors: dict[str, torch.Tensor], *, token: str, family: str,
                   metadata: dict[str, str] | None = None) -> Path:
    """Write an A1111-format embedding (`.safetensors`), atomically."""
    from ..atomic import save_safetensors

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"embeddings are saved as .safetensors, got {path.name!r}")
    expected = set(SDXL_KEYS) if family == "sdxl" else {"emb_params"}
    if set(tensors) != expected:
        raise ValueError(f"a {family} embedding holds {sorted(expected)}, got {sorted(tensors)}")
    meta = {"token": token, "family": family, "vectors": str(next(iter(tensors.values())).shape[0]),
            **(metadata or {})}
    return save_safetensors({k: v.contiguous() for k, v in tensors.items()}, path, metadata=meta)


BUNDLE_PREFIX = "bundle_emb."


def bundle_tensors(token: str, tensors: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """An embedding as A1111 reads it inside a LoRA file: `bundle_emb.<token>.string_to_param.*` (one text
    encoder) or `bundle_emb.<token>.clip_l` / `.clip_g` (SDXL)."""
    if "." in token:
        raise ValueError(f"a bundled embedding's token cannot hold a '.' (A1111 splits the key there): {token!r}")
    if family == "sdxl":
        return {f"{BUNDLE_PREFIX}{token}.{k}": v.contiguous() for k, v in tensors.items()}
    return {f"{BUNDLE_PREFIX}{token}.string_to_param.*": tensors["emb_params"].contiguous()}


def split_bundled(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """(the LoRA's own tensors, {token: embedding vectors as read_embedding gives them}) of a LoRA state dict
    that may carry bundled embeddings."""
    own, bundles = {}, {}
    for k, v in state_dict.items():
        if k.startswith(BUNDLE_PREFIX):
            token, _, rest = k[len(BUNDLE_PREFIX):].partition(".")
            bundles.setdefault(token, {})[rest] = v
        else:
            own[k] = v
    out = {}
    for token, parts in bundles.items():
        if "clip_l" in parts or "clip_g" in parts:
            data: dict = parts
        else:
            data = {"string_to_param": {k.removeprefix("string_to_param."): v for k, v in parts.items()}}
        out[token] = _embedding_vectors(data, f"bundled embedding {token!r}")[0]
    return own, out
