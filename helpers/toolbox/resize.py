"""Resize a LoRA to a lower rank by SVD: to a fixed rank, or per module by how much of it to keep
(`sv_ratio`, `sv_cumulative`, `sv_fro`, the dynamic methods of sd-scripts' resize_lora).

Each module's effective weight, up @ down * alpha / rank, is factored exactly through QR of both factors and
an SVD of the small rank x rank core; the kept singular directions become the new up/down, and the new alpha
keeps the old alpha / rank ratio, so what the file adds to the model changes only by the dropped directions.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

DYNAMIC_METHODS = ("sv_ratio", "sv_cumulative", "sv_fro")


@dataclass
class Resized:
    """One module: its rank before and after, and the share of its Frobenius norm the new rank keeps."""

    name: str
    old_rank: int
    new_rank: int
    fro_retained: float


def keep_rank(s: torch.Tensor, max_rank: int, method: str | None = None, param: float | None = None) -> int:
    """How many singular values `s` (descending) to keep: `max_rank`, or fewer by the dynamic method
    (sv_ratio: those >= s_max / param; sv_cumulative: the fewest whose sum reaches param of the total;
    sv_fro: the fewest whose root sum of squares reaches param of the norm). At least 1."""
    if method is None:
        k = max_rank
    elif method == "sv_ratio":
        k = int((s >= s[0] / param).sum())
    elif method == "sv_cumulative":
        k = int((torch.cumsum(s, 0) / s.sum() < param - 1e-12).sum()) + 1
    elif method == "sv_fro":
        k = int((torch.sqrt(torch.cumsum(s ** 2, 0) / (s ** 2).sum()) < param - 1e-12).sum()) + 1
    else:
        raise ValueError(f"dynamic method must be one of {', '.join(DYNAMIC_METHODS)}, got {method!r}")
    return max(1, min(k, max_rank, len(s)))


def _factor(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, Vh of up @ down (out x in, rank r) without forming it: QR of both factors, SVD of the r x r core."""
    qu, ru = torch.linalg.qr(up)                 # up = qu ru
    qd, rd = torch.linalg.qr(down.T)             # down = rd^T qd^T
    um, s, vmh = torch.linalg.svd(ru @ rd.T)
    return qu @ um, s, vmh @ qd.T


def resize_state_dict(tensors: dict[str, torch.Tensor], rank: int, *, method: str | None = None,
                      param: float | None = None, conv_rank: int | None = None
                      ) -> tuple[dict[str, torch.Tensor], list[Resized]]:
    """The resized kohya state dict and a report per module. `rank` is the new rank (the cap of a dynamic
    method); `conv_rank` the one of 3x3 convolutions (default: `rank`)."""
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    if method is not None and (param is None or not param > 0):
        raise ValueError(f"{method} needs a positive dynamic parameter, got {param!r}")
    lycoris = [k for k in tensors if any(p in k for p in ("hada_", "lokr_", "dora_scale", "lora_mid"))]
    if lycoris:
        raise ValueError(f"resize reads LoRA and LoCon files (lora_down/lora_up); this one holds LyCORIS keys, "
                         f"e.g. {lycoris[0]}")
    out: dict[str, torch.Tensor] = {}
    report: list[Resized] = []
    downs = sorted(k for k in tensors if k.endswith(".lora_down.weight"))
    if not downs:
        raise ValueError("no lora_down/lora_up pairs to resize (is this a kohya-layout LoRA file?)")
    for key in downs:
        name = key[: -len(".lora_down.weight")]
        down, up = tensors[key], tensors.get(f"{name}.lora_up.weight")
        if up is None:
            raise ValueError(f"{name} has a lora_down but no lora_up")
        old = down.shape[0]
        alpha = float(tensors[f"{name}.alpha"]) if f"{name}.alpha" in tensors else float(old)
        conv = down.ndim == 4 and down.shape[-1] > 1
        cap = (conv_rank or rank) if conv else rank
        d2, u2 = down.reshape(old, -1).double(), up.reshape(up.shape[0], -1).double()
        u, s, vh = _factor(u2, d2)
        k = keep_rank(s, min(cap, old), method, param)
        fro = math.sqrt(float((s[:k] ** 2).sum() / (s ** 2).sum())) if float(s.abs().sum()) > 0 else 1.0
        new_up, new_down = u[:, :k] * s[:k], vh[:k]
        out[f"{name}.lora_down.weight"] = new_down.reshape(k, *down.shape[1:]).to(down.dtype).contiguous()
        out[f"{name}.lora_up.weight"] = new_up.reshape(up.shape[0], k, *up.shape[2:]).to(up.dtype).contiguous()
        out[f"{name}.alpha"] = torch.tensor(alpha / old * k, dtype=torch.float32)
        report.append(Resized(name, old, k, fro))
    kept = {f"{r.name}.{p}" for r in report for p in ("lora_down.weight", "lora_up.weight", "alpha")}
    out.update({k: v for k, v in tensors.items() if k not in kept})   # embeddings, anything else: unchanged
    return out, report


def resize_lora(src: str | Path, dst: str | Path, rank: int, *, method: str | None = None,
                param: float | None = None, conv_rank: int | None = None) -> list[Resized]:
    """Write `src` resized to `dst` (kohya layout, metadata kept and updated as sd-scripts does)."""
    from ..atomic import save_safetensors
    from ..files import load_safetensors

    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise ValueError("resize writes a new file: give an output path other than the input")
    tensors, meta = load_safetensors(src, "LoRA file")
    resized, report = resize_state_dict(tensors, rank, method=method, param=param, conv_rank=conv_rank)
    meta = {k: v for k, v in dict(meta).items() if not k.startswith("sshs_")}   # the hashes no longer hold
    old = max(r.old_rank for r in report)
    how = f"{method}={param:g}, at most {rank}" if method else str(rank)
    meta["ss_training_comment"] = f"dimension is resized from {old} to {how}; {meta.get('ss_training_comment', '')}"
    if method:
        meta["ss_network_dim"] = meta["ss_network_alpha"] = "Dynamic"
    else:
        meta["ss_network_dim"] = str(rank)
        first = next(iter(report))
        meta["ss_network_alpha"] = str(float(resized[f"{first.name}.alpha"]))
    meta["helpers_resize"] = json.dumps({"from": old, "rank": rank, "method": method, "param": param})
    save_safetensors(resized, dst, metadata=meta)
    return report


def format_report(report: list[Resized]) -> str:
    """Per module: rank kept and Frobenius norm retained; then the mean and the worst module."""
    lines = [f"{r.name:<70} rank {r.old_rank:>3} -> {r.new_rank:<3} fro retained {r.fro_retained:6.1%}"
             for r in report]
    mean = sum(r.fro_retained for r in report) / len(report)
    worst = min(report, key=lambda r: r.fro_retained)
    lines.append(f"{len(report)} modules; fro retained: mean {mean:.1%}, lowest {worst.fro_retained:.1%} "
                 f"({worst.name})")
    return "\n".join(lines)
