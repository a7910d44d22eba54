"""Opening the weight files the product reads (LoRAs, embeddings, checkpoints, training states) in one way:
a truncated, empty, wrong-type or foreign file gives one line naming the file, what is wrong with it and
what to do, as a `BadFileError` (a ValueError: the command line prints it and exits 2)."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

MAX_HEADER = 200 * 1024 * 1024


class BadFileError(ValueError):
    """A file the product reads is missing, damaged or of the wrong kind; the message says which and what to do."""


DOWNLOAD = "fetch it again"


def _what(path: Path, kind: str) -> str:
    return f"{kind} {path}" if kind else str(path)


def safetensors_header(path: str | os.PathLike, kind: str = "", *, complete: bool = True, remedy: str = DOWNLOAD
                       ) -> tuple[dict[str, dict], dict[str, str]]:
    """The tensor index ({key: {"dtype", "shape", "data_offsets"}}) and string metadata of a .safetensors
    file, from its JSON header alone. With `complete`, the file must hold every byte the header promises (a
    cut-off download fails here, not deep inside a loader). `kind` names the file in messages ("LoRA file"),
    `remedy` says what to do about a damaged one (a download: fetch it again)."""
    path = Path(path)
    what = _what(path, kind)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found")
    if path.is_dir():
        raise BadFileError(f"{what} is a folder, not a .safetensors file")
    size = path.stat().st_size
    if size == 0:
        raise BadFileError(f"{what} is empty (0 bytes): the download or copy did not finish; {remedy}")
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise BadFileError(f"{what} is not a safetensors file ({size} bytes): {remedy}")
        (n,) = struct.unpack("<Q", raw)
        if n < 2 or n > min(size - 8, MAX_HEADER):
            text = all(32 <= b < 127 or b in (9, 10, 13) for b in raw)
            hint = (" it starts with text, so it is likely a web page saved under this name (a download link "
                    "that returned an HTML or error page)" if text else " it was cut off or damaged")
            raise BadFileError(f"{what} is not a valid safetensors file (bad header length):{hint}; {remedy}")
        header = f.read(n)
    try:
        index: dict[str, Any] = json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BadFileError(f"{what} is not a valid safetensors file (unreadable header); {remedy}") from None
    if not isinstance(index, dict):
        raise BadFileError(f"{what} is not a valid safetensors file (its header is not a table of tensors)")
    metadata = index.pop("__metadata__", None) or {}
    end = max((int(v.get("data_offsets", (0, 0))[1]) for v in index.values() if isinstance(v, dict)), default=0)
    if complete and 8 + n + end > size:
        raise BadFileError(f"{what} is cut off: its header promises {8 + n + end:,} bytes, the file has {size:,} "
                           f"(a download or copy that did not finish); {remedy}")
    return index, metadata


def load_safetensors(path: str | os.PathLike, kind: str = "", *, remedy: str = DOWNLOAD
                     ) -> tuple[dict[str, Any], dict[str, str]]:
    """{key: tensor} and the string metadata of a .safetensors file, checked first (`safetensors_header`)."""
    import safetensors.torch

    _, metadata = safetensors_header(path, kind, remedy=remedy)
    try:
        return safetensors.torch.load_file(str(path)), metadata
    except Exception as e:  # SafetensorError: a damaged body the header check could not see
        raise BadFileError(f"{_what(Path(path), kind)} cannot be read ({str(e)[:160]}): the file is damaged; "
                           f"{remedy}") from None
