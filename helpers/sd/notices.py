"""Warnings a process gives once: a notebook that loads ten models hears about a fallback one time."""

from __future__ import annotations

import warnings

WARNED: set[str] = set()


def warn_once(key: str, message: str, stacklevel: int = 3) -> None:
    """Emit `message` as a UserWarning the first time `key` is seen in this process."""
    if key in WARNED:
        return
    WARNED.add(key)
    warnings.warn(message, UserWarning, stacklevel=stacklevel + 1)
