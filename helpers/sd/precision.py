"""The one precision decision: fp16, bf16 or fp32 for a device, from what its hardware does natively.

T4 and V100 (compute capability below 8.0) get fp16: `torch.cuda.is_bf16_supported()` says True on a T4
because bf16 is emulated there, slowly, and cuDNN has no bf16 convolution below sm80. Ampere and newer get
bf16; a CPU gets fp32 (fp16 autocast is a no-op there). The trainer, the model loader, the GPU report and
the presets all ask this module.
"""

from __future__ import annotations


import torch

from .notices import warn_once

PRECISIONS = ("fp16", "bf16", "fp32")
_ALIASES = {"auto": "auto", "fp16": "fp16", "float16": "fp16", "half": "fp16", "bf16": "bf16",
            "bfloat16": "bf16", "fp32": "fp32", "float32": "fp32", "float": "fp32", "full": "fp32",
            "no": "fp32", "none": "fp32"}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_NAMES = {v: k for k, v in DTYPES.items()}


def native_bf16(capability: tuple[int, int]) -> bool:
    """Whether a CUDA GPU of this compute capability runs bf16 in hardware (Ampere, sm80, and newer)."""
    return tuple(capability) >= (8, 0)


def auto_precision(capability: tuple[int, int] | None) -> str:
    """What "auto" means on a CUDA GPU of `capability` (None: no CUDA GPU)."""
    if capability is None:
        return "fp32"
    return "bf16" if native_bf16(capability) else "fp16"


def cuda_capability(device: str | torch.device = "cuda") -> tuple[int, int] | None:
    """The compute capability of `device`, or None when it is not a visible CUDA GPU."""
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return None
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return int(major), int(minor)


def normalize_precision(requested: str | torch.dtype) -> str:
    """'auto' | 'fp16' | 'bf16' | 'fp32' from the spellings users write ("no", "float16", a torch dtype...)."""
    if isinstance(requested, torch.dtype):
        if requested not in _NAMES:
            raise ValueError(f"dtype must be float16, bfloat16 or float32, got {requested}")
        return _NAMES[requested]
    key = str(requested).strip().lower()
    if key not in _ALIASES:
        raise ValueError(f"mixed_precision must be 'auto', 'fp16', 'bf16' or 'no'/'fp32', got {requested!r}")
    return _ALIASES[key]


def decide_precision(requested: str | torch.dtype = "auto", device: str | torch.device = "cpu") -> str:
    """The precision to compute in on `device`: 'fp16', 'bf16' or 'fp32'.

    "auto": fp16 below compute capability 8.0 (T4, V100), bf16 from 8.0 (A100, L4, H100), fp32 on CPU.
    An explicit "fp16" on a machine without CUDA (or MPS) gives fp32 with a warning; an explicit "bf16"
    on a pre-Ampere GPU is kept, with a warning that it is emulated.
    """
    want = normalize_precision(requested)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        warn_once("cuda-missing", f"device {str(device)!r} asked for, but no CUDA GPU is visible; choosing the "
                                   "precision as for CPU (on Colab: Runtime > Change runtime type > GPU).")
        dev = torch.device("cpu")
    capability = cuda_capability(dev)
    if want == "auto":
        return auto_precision(capability)
    if want == "bf16" and capability is not None and not native_bf16(capability):
        warn_once("bf16-emulated", "bf16 on a GPU older than Ampere (compute capability < 8.0, e.g. T4/V100) "
                                    "is emulated and slow; mixed_precision='fp16' is the usual choice there.")
    if want == "fp16" and capability is None and dev.type != "mps":
        warn_once("fp16-cpu", "mixed_precision='fp16' needs a CUDA GPU; on this device the run uses fp32 "
                               "instead (use 'bf16' for reduced precision on CPU).")
        return "fp32"
    return want


def precision_dtype(precision: str) -> torch.dtype:
    """torch dtype of a decided precision ('fp16' | 'bf16' | 'fp32')."""
    return DTYPES[normalize_precision(precision)]


def accelerate_precision(precision: str) -> str:
    """accelerate's mixed_precision value ('no' | 'fp16' | 'bf16') for a decided precision."""
    p = normalize_precision(precision)
    return "no" if p == "fp32" else p
