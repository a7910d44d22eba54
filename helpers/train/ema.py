"""An exponential moving average (EMA) of the trained weights: smoother than the last step's weights, saved
as its own file beside the LoRA (`<name>_ema`), used for the samples during training, carried by resume."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class Ema:
    """fp32 shadow copies of `params` ({"<component>/<name>": parameter}), updated after every optimizer step
    as shadow += (1 - d) (param - shadow); with `warmup`, d = min(decay, (1 + step) / (10 + step)), so the
    first steps do not pin the average to the random start."""

    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float, warmup: bool = True):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        self.params = params
        self.decay, self.warmup = float(decay), bool(warmup)
        self.shadow = {k: p.detach().float().clone() for k, p in params.items()}

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Move the average towards the current weights (call once per optimizer step, `step` counts from 1)."""
        keys = list(self.shadow)
        torch._foreach_lerp_([self.shadow[k] for k in keys], [self.params[k].detach().float() for k in keys],
                             1.0 - self.decay_at(step))

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped(self) -> Iterator[None]:
        """The model holds the averaged weights inside the block, its trained ones again after it."""
        kept = {k: p.detach().clone() for k, p in self.params.items()}
        try:
            for k, p in self.params.items():
                p.copy_(self.shadow[k].to(p.dtype))
            yield
        finally:
            for k, p in self.params.items():
                p.copy_(kept[k])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.shadow.items()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], where: str = "the state") -> None:
        if set(tensors) != set(self.shadow):
            raise ValueError(f"the EMA in {where} does not fit this run's trained parameters "
                             f"({len(set(self.shadow) - set(tensors))} missing, {len(set(tensors) - set(self.shadow))} "
                             "unexpected)")
        for k, v in tensors.items():
            self.shadow[k] = v.to(self.shadow[k].device, torch.float32).clone()


def trained_parameters(modules: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Parameter]:
    """{"<component>/<param name>": parameter} of every parameter that requires grad (the state's naming)."""
    return {f"{comp}/{name}": p for comp, m in modules.items() for name, p in m.named_parameters() if p.requires_grad}
