"""Warnings a process gives once (a notebook that loads ten models hears about a fallback one time), and the
stack's log lines that are not a user's business, dropped by their exact text."""

from __future__ import annotations

import logging
import warnings

WARNED: set[str] = set()


def warn_once(key: str, message: str, stacklevel: int = 3) -> None:
    """Emit `message` as a UserWarning the first time `key` is seen in this process."""
    if key in WARNED:
        return
    WARNED.add(key)
    warnings.warn(message, UserWarning, stacklevel=stacklevel + 1)


# Log lines from the stack that say nothing a user of this package can act on, by logger and exact text:
# bitsandbytes' optional 4-bit CPU kernels (we never run 4-bit matmuls on the CPU) and transformers'
# switch to the PIL image processors when torchvision is absent (the PIL ones are what we use).
KNOWN_NOISE = {
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
    "transformers.utils.import_utils": "requires torchvision (not installed); falling back to",
}


class _DropText(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_known_noise() -> None:
    """Drop the KNOWN_NOISE log lines (once per process; every other message of those loggers stays)."""
    for name, text in KNOWN_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropText) and f.text == text for f in logger.filters):
            logger.addFilter(_DropText(text))
