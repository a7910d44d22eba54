"""Intermediate and final saves of a run: which to keep, and the small pieces every saved file needs."""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path

import torch

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32}


class KeptSaves:
    """The intermediate saves still on disk, oldest first; beyond `keep_last` the oldest are deleted
    (sd-scripts' `save_last_n_steps`). A resumed run continues the list its state recorded."""

    def __init__(self, keep_last: int | None, groups: list[list[str | Path]] | None = None):
        self.keep_last = keep_last
        self.groups: list[list[Path]] = [[Path(p) for p in g] for g in groups or []]

    def add(self, written: list[Path]) -> None:
        if not self.keep_last:
            return
        self.groups.append(written)
        while len(self.groups) > self.keep_last:
            for old in self.groups.pop(0):
                remove_path(old)

    def to_json(self) -> list[list[str]]:
        return [[str(p) for p in g] for g in self.groups]


def remove_path(path: Path) -> None:
    """Delete a saved file or folder (a pruned intermediate save)."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def ss_tag_frequency(items) -> dict[str, dict[str, int]]:
    """sd-scripts' ss_tag_frequency: {folder name: {tag: count}} over comma-separated captions."""
    freq: dict[str, Counter] = {}
    for item in items:
        folder = Path(item.path).parent.name
        tags = [t.strip() for t in item.caption.split(",") if t.strip()]
        freq.setdefault(folder, Counter()).update(tags)
    return {k: dict(v) for k, v in freq.items()}


def build_timestamp() -> float | None:
    """SOURCE_DATE_EPOCH when set (reproducible builds: same seed, byte-identical files), else now."""
    value = os.environ.get("SOURCE_DATE_EPOCH")
    return float(value) if value else None


def cast_safetensors_files(folder: Path, dtype: torch.dtype) -> None:
    """Cast the float tensors of every .safetensors file under `folder` to `dtype` (the save precision)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    for file in folder.rglob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if all(not t.is_floating_point() or t.dtype == dtype for t in tensors.values()):
            continue
        save_file({k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items()}, str(file),
                  metadata=meta)
