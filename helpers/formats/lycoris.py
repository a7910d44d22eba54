"""LyCORIS network types in the kohya layout that A1111's built-in LyCORIS support and ComfyUI read: LoHa, LoKr.

LoHa (Hadamard product of two low-rank products, LyCORIS' `loha`): per module `<kohya name>.hada_w1_a`
[out, r], `.hada_w1_b` [r, in * kh * kw], `.hada_w2_a`, `.hada_w2_b` and `.alpha`, with
    delta W = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / r
reshaped to the layer's weight (A1111 network_hada.py, ComfyUI weight_adapter/loha.py; both take r from
hada_w1_b's first dimension). Convolutions use the flattened form (no `hada_t1`/`hada_t2`), as LyCORIS writes
them without `use_tucker`. peft's LoHa (`LoHaConfig`, use_effective_conv2d=False) trains exactly this product
with the same scale, so its four matrices are written as they are.

LoKr (Kronecker product, LyCORIS' `lokr`): `.lokr_w1` (or `.lokr_w1_a`/`_b`) and `.lokr_w2` (or `.lokr_w2_a`
[out_k, r] / `.lokr_w2_b` [r, in_n * kh * kw]), with delta W = kron(w1, w2) * scale reshaped to the weight
(A1111 network_lokr.py, ComfyUI weight_adapter/lokr.py). The UIs scale by alpha / r only when a factor is
decomposed; peft scales every LoKr by alpha / r, so a module whose factors are both full is written with the
scale folded into w1.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import ClassVar
from typing import Mapping

import torch

from ..sd.lora_targets import plain_module_name

HADA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
UNSUPPORTED_HADA = ("hada_t1", "hada_t2")


@dataclass
class LohaModule:
    """One module's LoHa: delta W = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank, reshaped to the weight."""

    kind: ClassVar[str] = "LoHa"   # the network type, as people name it

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

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        """delta W in the layer's weight shape (float32)."""
        a = self.w1_a.float() @ self.w1_b.float()
        b = self.w2_a.float() @ self.w2_b.float()
        return (a * b * self.scale).reshape(tuple(weight.shape))

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
        out[plain_module_name(name)] = LohaModule(*w, alpha=float(module.alpha[adapter_name]))
    if not out:
        raise ValueError(f"model has no LoHa layers for adapter {adapter_name!r}")
    return dict(sorted(out.items()))


def loha_config(r: int, alpha: float, targets: list[str], ranks: Mapping[str, int] | None = None,
                alphas: Mapping[str, float] | None = None):
    """peft's LoHaConfig for these targets (flattened convolutions, LyCORIS' plain form; ΔW = 0 at the start)."""
    from peft import LoHaConfig

    return LoHaConfig(r=r, alpha=alpha, target_modules=list(targets), rank_pattern=dict(ranks or {}),
                      alpha_pattern=dict(alphas or {}), module_dropout=0.0, rank_dropout=0.0,
                      use_effective_conv2d=False, init_weights=True)


def _common_and_rest(values: Mapping[str, float]) -> tuple[float, dict[str, float]]:
    """The most common value (the largest on a tie) and the names whose value differs from it: a peft config's
    r / alpha and its rank / alpha patterns."""
    counts = Counter(values.values())
    best = max(counts.values())
    common = max(v for v, c in counts.items() if c == best)
    return common, {n: v for n, v in values.items() if v != common}


def _inject(model: torch.nn.Module, modules: Mapping, adapter_name: str, text_encoder: bool, kind: str,
            parts: tuple[str, ...], make_config) -> None:
    """Add `modules` to `model` as the peft adapter `make_config(r, alpha, targets, ranks, alphas)` builds, then
    copy each module's matrices in (in the layer's own device and dtype: this is for inference). peft must make
    the same matrices the file holds; anything else is refused by name."""
    from ..sd.lora_targets import inject_lora, model_module_names

    def key(name: str) -> str:
        return name.removeprefix("text_model.") if text_encoder else name

    ranks = {key(n): r for n, r in _peft_ranks(modules).items()}
    alphas = {key(n): a for n, a in _peft_alphas(modules).items()}
    (r, rank_pattern), (alpha, alpha_pattern) = _common_and_rest(ranks), _common_and_rest(alphas)
    inject_lora(model, make_config(int(r), alpha, sorted(ranks), rank_pattern, alpha_pattern), adapter_name)
    by_short = {n.removeprefix("text_model."): n for n in model_module_names(model)}
    with torch.no_grad():
        for name, m in modules.items():
            full = by_short.get(name.removeprefix("text_model."))
            layer = model.get_submodule(full) if full else None
            if layer is None or adapter_name not in getattr(layer, parts[0], {}):
                raise ValueError(f"{kind} module {name!r} has no layer in this {type(model).__name__}")
            made = {p for p in parts if adapter_name in getattr(layer, p)}
            if made != set(m.tensors()):
                raise ValueError(f"{kind} module {name!r} splits its weight as {sorted(m.tensors())}, peft as "
                                 f"{sorted(made)} (another LyCORIS factor or decomposition?)")
            weight = layer.get_base_layer().weight
            for part, tensor in m.tensors().items():
                param = getattr(layer, part)[adapter_name]
                if tuple(param.shape) != tuple(tensor.shape):
                    raise ValueError(f"{kind} module {name!r}: {part} should be {list(param.shape)}, got "
                                     f"{list(tensor.shape)}")
                param.data = tensor.detach().to(device=weight.device, dtype=weight.dtype).clone()


def _peft_ranks(modules: Mapping) -> dict[str, int]:
    """The r peft needs per module to make the file's matrices: a LoHa's rank; for a LoKr the decomposed
    factor's rank, or with both factors full any r >= max(w2's sides) / 2 (peft's rule; max(w2's sides) is taken)."""
    out = {}
    for n, m in modules.items():
        if isinstance(m, LokrModule) and m.w2 is not None:
            out[n] = max(int(m.w2.shape[0]), int(m.w2.shape[1]))
        else:
            out[n] = m.rank
    return out


def _peft_alphas(modules: Mapping) -> dict[str, float]:
    """The alpha peft needs per module: the file's, except a LoKr with full factors, which the UIs apply at scale 1
    (alpha = r)."""
    ranks = _peft_ranks(modules)
    return {n: float(ranks[n]) if isinstance(m, LokrModule) and m.w2 is not None else float(m.alpha)
            for n, m in modules.items()}


def inject_loha(model: torch.nn.Module, modules: Mapping[str, LohaModule], adapter_name: str,
                text_encoder: bool = False) -> None:
    """Add `modules` to `model` as peft LoHa adapter `adapter_name`, their matrices copied in."""
    _inject(model, modules, adapter_name, text_encoder, "LoHa", HADA_PARTS, loha_config)


# =============================================================================================
# LoKr
# =============================================================================================

LOKR_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
UNSUPPORTED_LOKR = ("lokr_t2",)


@dataclass
class LokrModule:
    """One module's LoKr: delta W = kron(w1, w2) * scale, reshaped to the weight, where w1 is `w1` (or w1_a @
    w1_b) and w2 is `w2` (or w2_a @ w2_b). As A1111 (network_lokr.py) and ComfyUI read it, the scale is
    alpha / r with r the rank of a decomposed factor (w2_b's, else w1_b's), and 1 when both factors are full."""

    kind: ClassVar[str] = "LoKr"   # the network type, as people name it

    w1: torch.Tensor | None = None
    w1_a: torch.Tensor | None = None
    w1_b: torch.Tensor | None = None
    w2: torch.Tensor | None = None      # [out_k, in_n] or, for a convolution, [out_k, in_n, kh, kw]
    w2_a: torch.Tensor | None = None    # [out_k, r]
    w2_b: torch.Tensor | None = None    # [r, in_n * kh * kw]
    alpha: float = 1.0
    factor: int = -1                     # how the weight's sides were split (LyCORIS' factor; -1: most square)

    @property
    def rank(self) -> int | None:
        """The rank the scale divides by; None when both factors are full (scale 1)."""
        if self.w2_b is not None:
            return int(self.w2_b.shape[0])
        return int(self.w1_b.shape[0]) if self.w1_b is not None else None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.rank else 1.0

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        w1 = self.w1.float() if self.w1 is not None else self.w1_a.float() @ self.w1_b.float()
        w2 = self.w2.float() if self.w2 is not None else self.w2_a.float() @ self.w2_b.float()
        return w1, w2

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        """delta W in the layer's weight shape (float32)."""
        w1, w2 = self.factors()
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        return (torch.kron(w1, w2.contiguous()) * self.scale).reshape(tuple(weight.shape))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {p: getattr(self, p.removeprefix("lokr_")) for p in LOKR_PARTS
                if getattr(self, p.removeprefix("lokr_")) is not None}

    def check(self, where: str) -> None:
        if (self.w1 is None) == (self.w1_a is None or self.w1_b is None) or \
                (self.w2 is None) == (self.w2_a is None or self.w2_b is None):
            raise ValueError(f"{where}: a LoKr needs lokr_w1 (or lokr_w1_a and lokr_w1_b) and lokr_w2 (or "
                             "lokr_w2_a and lokr_w2_b), one of each")
        if self.w1 is None and self.w1_a.shape[1] != self.w1_b.shape[0]:
            raise ValueError(f"{where}: lokr_w1_a and lokr_w1_b have different ranks")
        if self.w2 is None and self.w2_a.shape[1] != self.w2_b.shape[0]:
            raise ValueError(f"{where}: lokr_w2_a and lokr_w2_b have different ranks")

    def fits(self, layer: torch.nn.Module) -> str | None:
        w1, w2 = self.factors()
        weight = layer.weight
        out = w1.shape[0] * w2.shape[0]
        if out != weight.shape[0] or w1[0].numel() * w2[0].numel() != weight[0].numel():
            return (f"a LoKr of kron({list(w1.shape)}, {list(w2.shape)}) does not fit the layer's weight "
                    f"{list(weight.shape)}")
        return None


def lokr_from_parts(parts: Mapping[str, torch.Tensor], where: str) -> LokrModule:
    """A LokrModule from a file's `lokr_*` (and `alpha`) tensors of one module."""
    if any(p in parts for p in UNSUPPORTED_LOKR):
        raise ValueError(f"{where}: LoKr with a Tucker convolution factor (lokr_t2, LyCORIS' use_tucker) is not "
                         "supported; retrain without use_tucker")
    module = LokrModule(**{p.removeprefix("lokr_"): parts[p] for p in LOKR_PARTS if p in parts},
                        alpha=float(parts["alpha"].float().item()) if "alpha" in parts else 1.0)
    module.check(where)
    if "alpha" not in parts and module.rank:
        module.alpha = float(module.rank)   # no alpha stored: scale 1
    return module


def extract_peft_lokr(model: torch.nn.Module, adapter_name: str = "default") -> dict[str, LokrModule]:
    """The trained LoKr of a peft-injected model as A1111 and ComfyUI read it: peft scales every LoKr by
    alpha / r, the UIs only a decomposed one, so a module with both factors full has the scale folded into w1."""
    from peft.tuners.lokr import LoKrLayer

    out: dict[str, LokrModule] = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoKrLayer) or (adapter_name not in module.lokr_w1
                                                 and adapter_name not in module.lokr_w1_a):
            continue
        if adapter_name in module.lokr_t2:
            raise NotImplementedError(f"{name}: LoKr with effective conv2d (Tucker) factors is not written")
        parts = {p: getattr(module, p)[adapter_name].detach().clone() for p in LOKR_PARTS
                 if adapter_name in getattr(module, p)}
        scale = float(module.alpha[adapter_name]) / float(module.r[adapter_name])
        m = LokrModule(**{p.removeprefix("lokr_"): t for p, t in parts.items()},
                       alpha=float(module.alpha[adapter_name]))
        if m.rank is None:          # both full: the UIs apply kron(w1, w2) as it is
            m.w1 = m.w1 * scale
            m.alpha = 1.0
        elif m.rank != int(module.r[adapter_name]):
            m.alpha = scale * m.rank   # the decomposed factor's rank is the one the UIs divide by
        out[plain_module_name(name)] = m
    if not out:
        raise ValueError(f"model has no LoKr layers for adapter {adapter_name!r}")
    return dict(sorted(out.items()))


def lokr_config(r: int, alpha: float, targets: list[str], ranks: Mapping[str, int] | None = None,
                alphas: Mapping[str, float] | None = None, factor: int = -1):
    """peft's LoKrConfig for these targets (w1 full, w2 decomposed where the rank is small enough, flattened
    convolutions; ΔW = 0 at the start), `factor` as LyCORIS' factor (-1: the most square split)."""
    from peft import LoKrConfig

    return LoKrConfig(r=r, alpha=alpha, target_modules=list(targets), rank_pattern=dict(ranks or {}),
                      alpha_pattern=dict(alphas or {}), module_dropout=0.0, rank_dropout=0.0,
                      use_effective_conv2d=False, decompose_both=False, decompose_factor=int(factor),
                      init_weights=True)


def inject_lokr(model: torch.nn.Module, modules: Mapping[str, LokrModule], adapter_name: str,
                text_encoder: bool = False) -> None:
    """Add `modules` to `model` as peft LoKr adapter `adapter_name`, their factors copied in. peft must split
    each weight as the file did (its `factor`, a full w1); a file that splits otherwise is refused by name."""
    factor = next(iter(modules.values())).factor
    for n, m in modules.items():
        if m.w1 is None:
            raise ValueError(f"LoKr module {n!r} has a decomposed w1 (LyCORIS decompose_both): not supported")

    def make_config(r, alpha, targets, ranks, alphas):
        return lokr_config(r, alpha, targets, ranks, alphas, factor=factor)

    _inject(model, modules, adapter_name, text_encoder, "LoKr", LOKR_PARTS, make_config)
