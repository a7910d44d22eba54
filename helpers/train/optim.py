"""Optimizers (AdamW, 8-bit AdamW, Prodigy) and learning-rate schedules with warmup."""

from __future__ import annotations

import warnings
from typing import Any, Iterable

import torch

_warned_8bit = False


def _bnb_adamw8bit():
    """bitsandbytes' AdamW8bit class, or None with the reason when it can't run here."""
    try:
        import bitsandbytes as bnb  # noqa: F401  (GPU library: imported lazily, never at module import)
    except Exception as e:  # ImportError, or a broken CUDA setup raising at import
        return None, f"bitsandbytes could not be imported ({type(e).__name__}: {e})"
    return bnb.optim.AdamW8bit, ""


def build_optimizer(name: str, param_groups: list[dict[str, Any]], *, lr: float, weight_decay: float = 1e-2,
                    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.Optimizer:
    """Create the optimizer `name` ("adamw" | "adamw8bit" | "prodigy") over param groups with their own lr.

    8-bit AdamW falls back to torch AdamW with one warning when bitsandbytes is missing.
    Prodigy estimates the step size itself: its groups' lr are multipliers (1.0 is usual).
    """
    global _warned_8bit
    groups = [g for g in param_groups if any(p.requires_grad for p in g["params"])]
    if not groups:
        raise ValueError("no trainable parameters: check the LoRA targets and train_text_encoder")
    if name == "adamw8bit":
        cls, why = _bnb_adamw8bit()
        if cls is not None:
            return cls(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        if not _warned_8bit:
            warnings.warn(f"optimizer 'adamw8bit' is not available: {why}. Falling back to torch AdamW "
                          "(same maths, 4x more optimizer memory). Install bitsandbytes on a CUDA machine "
                          "to use it.", RuntimeWarning, stacklevel=2)
            _warned_8bit = True
        name = "adamw"
    if name == "adamw":
        on_cuda = all(p.is_cuda for g in groups for p in g["params"])
        kwargs = {"fused": True} if on_cuda else {"foreach": True}
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kwargs)
    if name == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise ImportError("optimizer 'prodigy' needs the prodigyopt package: pip install prodigyopt") from None
        return Prodigy(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                       decouple=True, use_bias_correction=True, safeguard_warmup=True)
    raise ValueError(f"optimizer must be 'adamw', 'adamw8bit' or 'prodigy', got {name!r}")


def optimizer_kind(optimizer: torch.optim.Optimizer) -> str:
    """What actually runs: 'adamw8bit', 'adamw' or 'prodigy' (after any fallback)."""
    mod = type(optimizer).__module__
    if mod.startswith("bitsandbytes"):
        return "adamw8bit"
    if mod.startswith("prodigyopt"):
        return "prodigy"
    return "adamw"


def build_scheduler(name: str, optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int,
                    num_cycles: int = 1, power: float = 1.0) -> torch.optim.lr_scheduler.LRScheduler:
    """LR schedule `name` ("constant" | "cosine" | "cosine_with_restarts" | "linear" | "polynomial"),
    each with linear warmup over `warmup_steps` optimizer steps."""
    from diffusers.optimization import get_scheduler

    if name == "constant":
        name = "constant_with_warmup"
    kwargs: dict[str, Any] = {"num_warmup_steps": warmup_steps, "num_training_steps": total_steps}
    if name == "cosine_with_restarts":
        kwargs["num_cycles"] = num_cycles
    elif name == "polynomial":
        kwargs["power"] = power
    elif name not in ("constant_with_warmup", "cosine", "linear"):
        raise ValueError(f"lr_scheduler must be constant, cosine, cosine_with_restarts, linear or polynomial, got {name!r}")
    return get_scheduler(name, optimizer=optimizer, **kwargs)


def trainable(params: Iterable[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    return [p for p in params if p.requires_grad]
