"""Exact and near duplicates: pixel hashes, perceptual hashes with a colour check, optional CLIP
similarity, and groups with the image to keep first."""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from typing import Any, Sequence

import numpy as np
from PIL import Image

from .records import DuplicateGroup, FileRecord


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    x = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * x + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    m[0] /= math.sqrt(2.0)
    return m


_DCT32 = _dct_matrix(32)


def perceptual_hash(image: Image.Image) -> int:
    """64-bit pHash: 8x8 lowest frequencies of the 2-D DCT of a 32x32 greyscale thumbnail, above their median."""
    factor = min(image.size) // 128
    small = image.reduce(factor) if factor > 1 else image  # a fast box pre-shrink of big photos
    a = np.asarray(small.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    low = (_DCT32 @ a @ _DCT32.T)[:8, :8]
    bits = (low > np.median(low)).ravel()
    return int(sum(1 << i for i, b in enumerate(bits) if b))


def color_signature(image: Image.Image) -> bytes:
    """A 4x4 RGB thumbnail (48 bytes): the pHash sees only luminance structure, this adds colour."""
    return image.convert("RGB").resize((4, 4), Image.Resampling.BOX, reducing_gap=2.0).tobytes()


#: Mean absolute difference (0-255) of colour signatures up to which a pHash match counts as near duplicate.
NEAR_DUP_MAX_COLOR_DIFF = 20.0


def hamming(a: int, b: int) -> int:
    """Number of differing bits of two hashes."""
    return int(a ^ b).bit_count()


def pixel_digest(image: Image.Image) -> str:
    """SHA-256 of the decoded pixels (size, mode, bytes): equal for byte-different files of one image."""
    h = hashlib.sha256(f"{image.width}x{image.height}:{image.mode}:".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def _union_groups(n: int, pairs: Sequence[tuple[int, int]]) -> list[list[int]]:
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs:
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    groups: dict[int, list[int]] = defaultdict(list)
    for i in range(n):
        groups[find(i)].append(i)
    return [g for g in groups.values() if len(g) > 1]


def _keeper_order(records: Sequence[FileRecord], idx: Sequence[int]) -> list[int]:
    """Indices sorted biggest original first (pixels), then captioned before uncaptioned, then file size, then
    the shorter name ("IMG_1.png" before its "IMG_1 (copy).png"), then by name: the first is the keeper."""
    def key(i: int) -> tuple:
        r = records[i]
        return (-(r.original_size[0] * r.original_size[1]) if r.original_size else 0, not r.caption,
                -r.file_bytes, len(r.name), r.name)
    return sorted(idx, key=key)


def find_duplicates(records: list[FileRecord], near_threshold: int | None = 10,
                    embeddings: np.ndarray | None = None, clip_threshold: float = 0.95) -> list[DuplicateGroup]:
    """Group prepared records: exact (same decoded pixels), near (pHash within `near_threshold` bits and
    colour signatures within NEAR_DUP_MAX_COLOR_DIFF: the same picture resized or recompressed; a
    greyscale copy of a colour photo is not near; None or -1 turns it off) and, given L2-normalised
    `embeddings` (one row per record), clip (cosine >= `clip_threshold`).

    Near and clip groups are formed between one representative per exact group; pairs already in a
    near group are not repeated as clip pairs. Each non-keeper member gets a flag naming its keeper.
    """
    groups: list[DuplicateGroup] = []
    by_pixels: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        by_pixels[r.pixel_sha256 or f"unique:{i}"].append(i)
    reps: list[int] = []
    for idx in by_pixels.values():
        ordered = _keeper_order(records, idx)
        reps.append(ordered[0])
        if len(ordered) > 1:
            keeper = records[ordered[0]]
            groups.append(DuplicateGroup("exact", [records[i].name for i in ordered],
                                         {records[i].name: 0.0 for i in ordered[1:]}))
            for i in ordered[1:]:
                records[i].flags.append(f"duplicate_of:{keeper.name}")
                if records[i].sha256 != keeper.sha256:
                    records[i].flags.append("same_pixels_different_file")
    reps.sort()
    pos = {i: k for k, i in enumerate(reps)}

    def add_groups(kind: str, matrix: np.ndarray, pairs: list[tuple[int, int]], flag: str, digits: int) -> None:
        for comp in _union_groups(len(reps), pairs):
            ordered = _keeper_order(records, [reps[k] for k in comp])
            keeper = records[ordered[0]]
            scores = {records[i].name: round(float(matrix[pos[ordered[0]], pos[i]]), digits) for i in ordered[1:]}
            groups.append(DuplicateGroup(kind, [records[i].name for i in ordered], scores))
            for i in ordered[1:]:
                records[i].flags.append(f"{flag}:{keeper.name}")

    near_pairs: set[tuple[int, int]] = set()
    if near_threshold is not None and near_threshold >= 0 and len(reps) > 1:
        hashes = np.array([int(records[i].phash, 16) for i in reps], dtype=np.uint64)
        dist = np.bitwise_count(hashes[:, None] ^ hashes[None, :]).astype(np.int64)
        close = dist <= near_threshold
        if all(records[i].color_sig for i in reps):
            sigs = np.array([np.frombuffer(bytes.fromhex(records[i].color_sig), np.uint8) for i in reps], np.float64)
            close &= np.abs(sigs[:, None, :] - sigs[None, :, :]).mean(-1) <= NEAR_DUP_MAX_COLOR_DIFF
        ii, jj = np.nonzero(np.triu(close, k=1))
        pairs = list(zip(ii.tolist(), jj.tolist()))
        add_groups("near", dist, pairs, "near_duplicate_of", 0)
        for comp in _union_groups(len(reps), pairs):
            near_pairs.update((a, b) for a in comp for b in comp if a < b)

    if embeddings is not None and len(reps) > 1:
        e = np.asarray(embeddings, dtype=np.float64)[reps]
        sim = e @ e.T
        ii, jj = np.nonzero(np.triu(sim >= clip_threshold, k=1))
        pairs = [(a, b) for a, b in zip(ii.tolist(), jj.tolist()) if (a, b) not in near_pairs]
        add_groups("clip", sim, pairs, "clip_similar_to", 4)
    return groups


def load_clip(model: str, device: str | None = None) -> tuple[Any, Any]:
    """(CLIPModel, CLIPImageProcessor) from a hub id or a local folder, in eval mode on `device` (auto)."""
    import torch
    from transformers import CLIPImageProcessor, CLIPModel

    try:
        processor = CLIPImageProcessor.from_pretrained(model)
        clip = CLIPModel.from_pretrained(model)
    except OSError as e:
        raise OSError(f"Could not load the CLIP model {model!r}: {e}. Give a hub id such as "
                      f"'openai/clip-vit-base-patch32' (needs network or a cached copy) or a local folder "
                      f"holding config.json, the weights and preprocessor_config.json.") from e
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    clip = clip.to(device).eval()
    if device.startswith("cuda"):
        clip = clip.half()
    return clip, processor


def clip_embeddings(images: Sequence[Image.Image], model: Any, processor: Any, batch_size: int = 16) -> np.ndarray:
    """L2-normalised CLIP image embeddings, one row per image (float32)."""
    import torch

    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    rows = []
    for start in range(0, len(images), batch_size):
        batch = processor(images=list(images[start:start + batch_size]), return_tensors="pt")
        with torch.inference_mode():
            out = model.get_image_features(pixel_values=batch["pixel_values"].to(device, dtype))
        feats = out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers 5 returns an output object
        feats = torch.nn.functional.normalize(feats.float(), dim=-1)
        rows.append(feats.cpu().numpy())
    if not rows:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(rows).astype(np.float32)
