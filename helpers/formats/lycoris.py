"""LyCORIS network types in the kohya layout that A1111's built-in LyCORIS support and ComfyUI read: LoHa.

LoHa (Hadamard product of two low-rank products, LyCORIS' `loha`): per module `<kohya name>.hada_w1_a`
[out, r], `.hada_w1_b` [r, in * kh * kw], `.hada_w2_a`, `.hada_w2_b` and `.alpha`, with
    delta W = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / r
reshaped to the layer's weight (A1111 network_hada.py, ComfyUI weight_adapter/loha.py; both take r from
hada_w1_b's first dimension). Convolutions use the flattened form (no `hada_t1`/`hada_t2`), as LyCORIS writes
them without `use_tucker`. peft's LoHa (`LoHaConfig`, use_effective_conv2d=False) trains exactly this product
with the same scale, so its four matrices are written as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

HADA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
UNSUPPORTED_HADA = ("hada_t1", "hada_t2")


@dataclass
class LohaModule:
    """One module's LoHa: delta W = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank, reshaped to the weight."""

    w1_a: torch.Tensor   # [out, r]
    w1_b: torch.Tensor   # [r, in * kh * kw]
    w2_a: torch.Tensor   # [out, r]
    w2_b: torch.Tensor   # [r, in * kh * kw]
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.w1_b.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        """delta W in the layer's weight shape (float32)."""
        a = self.w1_a.float() @ self.w1_b.float()
        b = self.w2_a.float() @ self.w2_b.float()
        return (a * b * self.scale).reshape(tuple(shape))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {p: getattr(self, p.removeprefix("hada_")) for p in HADA_PARTS}

    def check(self, where: str) -> None:
        """ValueError when the four matrices do not form one LoHa (ranks or sides disagree)."""
        r1, r2 = self.w1_b.shape[0], self.w2_b.shape[0]
        if self.w1_a.shape[1] != r1 or self.w2_a.shape[1] != r2 or r1 != r2:
            raise ValueError(f"{where}: LoHa ranks disagree (hada_w1_a {list(self.w1_a.shape)}, hada_w1_b "
                             f"{list(self.w1_b.shape)}, hada_w2_a {list(self.w2_a.shape)}, hada_w2_b "
                             f"{list(self.w2_b.shape)})")
        if self.w1_a.shape[0] != self.w2_a.shape[0] or self.w1_b.shape[1] != self.w2_b.shape[1]:
            raise ValueError(f"{where}: the two LoHa products have different shapes")

    def fits(self, layer: torch.nn.Module) -> str | None:
        """None when this LoHa fits the layer's weight, else what is wrong."""
        weight = layer.weight
        out, rest = int(weight.shape[0]), int(weight[0].numel())
        if self.w1_a.shape[0] != out or self.w1_b.shape[1] != rest:
            return (f"a LoHa of [{self.w1_a.shape[0]}, {self.w1_b.shape[1]}] does not fit the layer's weight "
                    f"{list(weight.shape)}")
        return None


def loha_from_parts(parts: Mapping[str, torch.Tensor], where: str) -> LohaModule:
    """A LohaModule from a file's `hada_*` (and `alpha`) tensors of one module; no alpha means scale 1."""
    tucker = [p for p in UNSUPPORTED_HADA if p in parts]
    if tucker:
        raise ValueError(f"{where}: LoHa with Tucker convolution factors ({', '.join(tucker)}, LyCORIS' "
                         "use_tucker) is not supported; retrain without use_tucker")
    missing = [p for p in HADA_PARTS if p not in parts]
    if missing:
        raise ValueError(f"{where}: a LoHa needs {', '.join(HADA_PARTS)}; missing {', '.join(missing)}")
    w = {p: parts[p].reshape(parts[p].shape[0], -1) for p in HADA_PARTS}
    rank = int(w["hada_w1_b"].shape[0])
    alpha = float(parts["alpha"].float().item()) if "alpha" in parts else float(rank)
    module = LohaModule(w["hada_w1_a"], w["hada_w1_b"], w["hada_w2_a"], w["hada_w2_b"], alpha)
    module.check(where)
    return module


# ---------------------------------------------------------------------------------- peft

def extract_peft_loha(model: torch.nn.Module, adapter_name: str = "default") -> dict[str, LohaModule]:
    """The trained LoHa of a peft-injected model: module name -> LohaModule (peft's alpha and rank)."""
    from peft.tuners.loha import LoHaLayer

    out: dict[str, LohaModule] = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoHaLayer) or adapter_name not in module.hada_w1_a:
            continue
        if adapter_name in getattr(module, "hada_t1", {}):
            raise NotImplementedError(f"{name}: LoHa with effective conv2d (Tucker) factors is not written")
        w = [getattr(module, p)[adapter_name].detach().clone() for p in HADA_PARTS]
        out[name.removeprefix("base_model.model.").replace("_orig_mod.", "")] = LohaModule(
            *w, alpha=float(module.alpha[adapter_name]))
    if not out:
        raise ValueError(f"model has no LoHa layers for adapter {adapter_name!r}")
    return dict(sorted(out.items()))


def loha_config(r: int, alpha: float, targets: list[str], ranks: Mapping[str, int] | None = None,
                alphas: Mapping[str, float] | None = None, dropout: float = 0.0):
    """peft's LoHaConfig for these targets (flattened convolutions, LyCORIS' plain form; ΔW = 0 at the start)."""
    from peft import LoHaConfig

    return LoHaConfig(r=r, alpha=alpha, target_modules=list(targets), rank_pattern=dict(ranks or {}),
                      alpha_pattern=dict(alphas or {}), module_dropout=float(dropout), rank_dropout=0.0,
                      use_effective_conv2d=False, init_weights=True)


def inject_loha(model: torch.nn.Module, modules: Mapping[str, LohaModule], adapter_name: str,
                text_encoder: bool = False) -> None:
    """Add `modules` to `model` as peft LoHa adapter `adapter_name`, their matrices copied in."""
    from collections import Counter

    from ..sd.lora_targets import inject_lora, model_module_names

    def key(name: str) -> str:
        return name.removeprefix("text_model.") if text_encoder else name

    r = Counter(m.rank for m in modules.values()).most_common(1)[0][0]
    alpha = Counter(m.alpha for m in modules.values()).most_common(1)[0][0]
    config = loha_config(r, alpha, sorted(key(n) for n in modules),
                         {key(n): m.rank for n, m in modules.items() if m.rank != r},
                         {key(n): m.alpha for n, m in modules.items() if m.alpha != alpha})
    inject_lora(model, config, adapter_name)
    by_short = {n.removeprefix("text_model."): n for n in model_module_names(model)}
    with torch.no_grad():
        for name, m in modules.items():
            full = by_short.get(name.removeprefix("text_model."))
            layer = model.get_submodule(full) if full else None
            if layer is None or adapter_name not in getattr(layer, "hada_w1_a", {}):
                raise ValueError(f"LoHa module {name!r} has no layer in this {type(model).__name__}")
            weight = layer.get_base_layer().weight   # inference: the adapter in the layer's own device and dtype
            for part, tensor in m.tensors().items():
                param = getattr(layer, part)[adapter_name]
                if tuple(param.shape) != tuple(tensor.shape):
                    raise ValueError(f"LoHa module {name!r}: {part} should be {list(param.shape)}, got "
                                     f"{list(tensor.shape)}")
                param.data = tensor.detach().to(device=weight.device, dtype=weight.dtype).clone()
