"""DoRA (weight-decomposed LoRA, Liu et al. 2024) as A1111 and ComfyUI apply it, in the LyCORIS file layout.

A DoRA module is a LoRA (`lora_down`, `lora_up`, `alpha`) plus `dora_scale`: one magnitude per *input* column of
the weight, [1, in] for a Linear and [1, in, 1, 1] for a Conv2d (LyCORIS' `dora_wd` with its default
`wd_on_out=False`). With V = W + (alpha / r) * up @ down and |V| the norm of each input column of V (over the
output axis and the kernel), a weight w applies
    W' = W + w * (V * dora_scale / |V| - W)
(A1111 network.py `apply_weight_decompose`, ComfyUI weight_adapter/base.py `weight_decompose`). peft's own DoRA
keeps a magnitude per *output* row, which the UIs would read differently, so training and inference use
`InputAxisDora`, a peft LoRA variant computing the same layer: scaling a weight's input columns by s is scaling
the layer's input by s, so with s = dora_scale / |V|
    y = W x + b + w * (W ((s - 1) x) + (alpha / r) up down (s x)).
As in the DoRA paper (section 4.3) |V| is a constant in the backward pass: no full-size weight per layer is kept
for the gradient. The cost is one more product with W per layer and step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Mapping

import torch
import torch.nn.functional as F

from ..sd.lora_targets import plain_module_name

DORA_PART = "dora_scale"


def column_norm(weight: torch.Tensor) -> torch.Tensor:
    """|V| per input column ([in]): the norm over the output axis and the kernel, in the weight's dtype."""
    columns = weight.transpose(0, 1)
    return columns.reshape(columns.shape[0], -1).norm(dim=1)


def file_shape(magnitude: torch.Tensor, weight_dims: int) -> torch.Tensor:
    """A magnitude [in] as LyCORIS writes `dora_scale`: [1, in] (Linear) or [1, in, 1, 1] (Conv2d)."""
    return magnitude.reshape(1, -1, *([1] * (weight_dims - 2)))


def _lora_product(down: torch.Tensor, up: torch.Tensor, shape) -> torch.Tensor:
    """up @ down over flattened kernels, in the weight's shape."""
    return (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(tuple(shape))


@dataclass
class DoraModule:
    """One module's DoRA: a LoRA (down, up, alpha) and its magnitude per input column of the weight."""

    kind: ClassVar[str] = "DoRA"   # the network type, as people name it

    down: torch.Tensor        # [r, in] or [r, in, kh, kw]
    up: torch.Tensor          # [out, r] or [out, r, 1, 1]
    alpha: float
    magnitude: torch.Tensor   # [in] (the file's dora_scale, flattened)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        """V * magnitude / |V| - W for this layer's weight W (float64): what weight 1 adds to it. Unlike a LoRA's,
        a DoRA's change depends on the weight it is applied to."""
        w = weight.detach().double()
        v = w + _lora_product(self.down.double(), self.up.double(), w.shape) * self.scale
        s = self.magnitude.double().to(w.device) / column_norm(v)
        return v * file_shape(s, w.dim()) - w

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"lora_down.weight": self.down, "lora_up.weight": self.up,
                DORA_PART: file_shape(self.magnitude, self.down.dim())}

    def check(self, where: str) -> None:
        """ValueError when down, up and the magnitude do not form one DoRA module."""
        if self.down.shape[0] != self.up.shape[1]:
            raise ValueError(f"{where}: down has rank {self.down.shape[0]} but up has rank {self.up.shape[1]}")
        if self.magnitude.numel() != self.down.shape[1]:
            raise ValueError(f"{where}: dora_scale has {self.magnitude.numel()} values but the layer takes "
                             f"{self.down.shape[1]} inputs (a dora_scale per output row, LyCORIS' wd_on_out, is "
                             "not read)")


# ---------------------------------------------------------------------------------- peft

class InputMagnitude(torch.nn.Module):
    """The trained magnitude of one DoRA layer ([in]); it lives in peft's `lora_magnitude_vector[adapter]`, so
    peft's adapter handling (activate, delete, requires_grad) covers it."""

    def __init__(self, magnitude: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(magnitude.detach().float().clone())


class InputAxisDora:
    """A peft LoRA variant (peft calls these methods for the adapters in a layer's `lora_variant`): DoRA with the
    magnitude per input column, as A1111 and ComfyUI apply it. The adapter's weight w is read back from peft's
    scaling (set_scale: scaling = w * alpha / r), so `set_adapters(..., adapter_weights=...)` works as for LoRA."""

    @staticmethod
    def supports_lora_conversion() -> bool:
        return False

    @staticmethod
    def init(module, adapter_name: str, **kwargs) -> None:
        raise TypeError("InputAxisDora is attached by add_input_dora, not through a peft config")

    @staticmethod
    def scales(module, adapter: str) -> tuple[float, float]:
        """(alpha / r, the adapter's weight w): peft's scaling is w * alpha / r (w is 1 while training)."""
        unit = module.lora_alpha[adapter] / module.r[adapter]
        return unit, module.scaling[adapter] / unit

    @staticmethod
    def lora_delta(module, adapter: str, shape) -> torch.Tensor:
        """(alpha / r) * up @ down in the weight's shape, in float32."""
        unit, _ = InputAxisDora.scales(module, adapter)
        a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        return _lora_product(a.float(), b.float(), shape) * unit

    @staticmethod
    def input_scale(module, adapter: str) -> torch.Tensor:
        """s = magnitude / |V| ([in], float32), |V| without gradient; cached while nothing it reads changes."""
        base = module.get_base_layer()
        a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        key = tuple((t.data_ptr(), t._version) for t in (base.weight, a, b)) + (module.lora_alpha[adapter],
                                                                                 module.r[adapter])
        cache = module.__dict__.setdefault("_input_dora_norms", {})
        hit = cache.get(adapter)
        if hit is not None and hit[0] == key:
            norm = hit[1]
        else:
            with torch.no_grad():
                norm = column_norm(base.weight.float() + InputAxisDora.lora_delta(module, adapter, base.weight.shape))
            cache[adapter] = (key, norm)
        return module.lora_magnitude_vector[adapter].weight / norm

    @staticmethod
    def forward(module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs) -> torch.Tensor:
        base = module.get_base_layer()
        unit, w = InputAxisDora.scales(module, active_adapter)
        s = InputAxisDora.input_scale(module, active_adapter).to(x.dtype)
        conv = isinstance(base, torch.nn.Conv2d)
        s = s.view(-1, 1, 1) if conv else s
        weight = base.weight
        if not torch.is_autocast_enabled(x.device.type):
            weight = weight.to(x.dtype)
        shifted = base._conv_forward(x * (s - 1), weight, None) if conv else F.linear(x * (s - 1), weight)
        lora = module.lora_B[active_adapter](module.lora_A[active_adapter](module.lora_dropout[active_adapter](x * s)))
        return result + (shifted + lora * unit) * w

    @staticmethod
    def merge_safe(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        """W + w * (V * s - W), with s kept for `unmerge`."""
        _, w = InputAxisDora.scales(module, active_adapter)
        weight = orig_weight.detach().float()
        v = weight + InputAxisDora.lora_delta(module, active_adapter, weight.shape).detach()
        s = module.lora_magnitude_vector[active_adapter].weight.detach() / column_norm(v)
        module._cache_store(f"{active_adapter}-input_scale", s)
        return (weight + w * (v * file_shape(s, weight.dim()) - weight)).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data = InputAxisDora.merge_safe(module, active_adapter, orig_weight)

    @staticmethod
    def unmerge(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        """W from W' = W (1 - w + w s) + w s (alpha / r) up down, column by column."""
        _, w = InputAxisDora.scales(module, active_adapter)
        s = file_shape(module._cache_pop(f"{active_adapter}-input_scale"), orig_weight.dim())
        merged = orig_weight.detach().float()
        delta = InputAxisDora.lora_delta(module, active_adapter, merged.shape).detach()
        return ((merged - w * s * delta) / (1 - w + w * s)).to(orig_weight.dtype)


def add_input_dora(model: torch.nn.Module, adapter_name: str = "default",
                   magnitudes: Mapping[str, torch.Tensor] | None = None) -> int:
    """Make `adapter_name`'s LoRA layers in `model` DoRA layers; returns how many. Without `magnitudes` (training)
    every layer starts at its weight's column norms, so the model is unchanged until it trains; with them
    (module name -> [in], inference) only those layers become DoRA and take their trained magnitudes."""
    from peft.tuners.lora import LoraLayer

    wanted = None if magnitudes is None else {n.removeprefix("text_model."): t for n, t in magnitudes.items()}
    count = 0
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or adapter_name not in module.lora_A:
            continue
        short = plain_module_name(name).removeprefix("text_model.")
        if wanted is not None and short not in wanted:
            continue
        weight = module.get_base_layer().weight
        if wanted is None:
            start = column_norm(weight.detach().float())
        else:
            start = wanted.pop(short).reshape(-1)
            if start.numel() != weight.shape[1]:
                raise ValueError(f"DoRA module {short!r}: dora_scale has {start.numel()} values, the layer takes "
                                 f"{weight.shape[1]} inputs")
        magnitude = InputMagnitude(start).to(weight.device)
        magnitude.weight.requires_grad_(module.lora_A[adapter_name].weight.requires_grad)
        module.lora_magnitude_vector[adapter_name] = magnitude
        module.lora_variant[adapter_name] = InputAxisDora()
        count += 1
    if wanted:
        raise ValueError(f"DoRA module(s) {sorted(wanted)[:5]} have no LoRA layer in this {type(model).__name__}")
    return count


def extract_peft_dora(model: torch.nn.Module, adapter_name: str = "default") -> dict[str, DoraModule]:
    """The trained DoRA of a model `add_input_dora` made: module name -> DoraModule (peft's alpha and rank)."""
    from peft.tuners.lora import LoraLayer

    out: dict[str, DoraModule] = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or not isinstance(module.lora_variant.get(adapter_name), InputAxisDora):
            continue
        out[plain_module_name(name)] = DoraModule(
            down=module.lora_A[adapter_name].weight.detach().clone(),
            up=module.lora_B[adapter_name].weight.detach().clone(), alpha=float(module.lora_alpha[adapter_name]),
            magnitude=module.lora_magnitude_vector[adapter_name].weight.detach().clone())
    if not out:
        raise ValueError(f"model has no DoRA layers for adapter {adapter_name!r}")
    return dict(sorted(out.items()))
