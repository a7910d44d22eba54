"""Cached text-encoder outputs: with frozen text encoders every caption is encoded once before training,
then the encoders leave the GPU (they come back only to draw samples). Optionally kept on disk for the
next run (`output_dir/text_cache/`), checked against the model and encoding settings it was made with."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..config import TrainConfig

CACHE_FORMAT = "helpers-text-cache-v1"


def dataset_captions(dataset) -> list[str]:
    """Every caption the run can encode from `dataset`: as trained (the fixed caption processing, and the empty
    caption when whole captions are dropped) and as the validation batches read it (unprocessed)."""
    from ..data.dataset import CaptionProcessor

    plain = CaptionProcessor()
    out = []
    for item in dataset.items:
        out.extend(dataset.caption_processor.outcomes(item.caption))
        out.extend(plain.outcomes(item.caption))
    return out


def _key(cfg: TrainConfig, family: str) -> str:
    text = json.dumps([cfg.pretrained_model, family, cfg.clip_skip, cfg.max_token_length], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@torch.no_grad()
def encode_all(step, captions: list[str], batch_size: int = 16) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """{caption: (hidden (T, D), pooled (D2) or None)} on the CPU, each unique caption encoded once."""
    from ..sd.text_encoding import encode_prompts

    unique = list(dict.fromkeys(captions))
    out: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    for i in range(0, len(unique), batch_size):
        chunk = unique[i:i + batch_size]
        emb = encode_prompts(step.family, step.tokenizers, step.text_encoders, chunk, clip_skip=step.clip_skip,
                             max_token_length=step.max_token_length, device=step.device)
        for j, c in enumerate(chunk):
            out[c] = (emb.hidden[j].cpu(), emb.pooled[j].cpu() if emb.pooled is not None else None)
    return out


def load_or_encode(cfg: TrainConfig, step, family: str, captions: list[str]) -> dict:
    """The cache for `captions`: read from disk when `cache_text_encoder_outputs_to_disk` and it was made with
    this model and these settings, else encoded now (and written when asked)."""
    from safetensors.torch import load_file, save_file

    path = Path(cfg.output_dir) / "text_cache" / f"{_key(cfg, family)}.safetensors"
    wanted = list(dict.fromkeys(captions))
    if cfg.cache_text_encoder_outputs_to_disk and path.exists():
        tensors = load_file(str(path))
        names = json.loads((path.with_suffix(".json")).read_text(encoding="utf-8"))
        cache = {c: (tensors[f"{k}.hidden"], tensors.get(f"{k}.pooled")) for k, c in enumerate(names)}
        missing = [c for c in wanted if c not in cache]
        if not missing:
            return cache
        cache.update(encode_all(step, missing))
    else:
        cache = encode_all(step, wanted)
    if cfg.cache_text_encoder_outputs_to_disk:
        from ..atomic import atomic_path, write_text

        names = list(cache)
        tensors = {f"{k}.hidden": cache[c][0].contiguous() for k, c in enumerate(names)}
        tensors.update({f"{k}.pooled": cache[c][1].contiguous() for k, c in enumerate(names) if cache[c][1] is not None})
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"format": CACHE_FORMAT})
        write_text(path.with_suffix(".json"), json.dumps(names))
    return cache
