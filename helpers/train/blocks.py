"""Where the ranks go: kohya's per-block ranks and alphas (`block_dims` / `block_alphas`, one value per UNet
block: IN00..IN11, MID, OUT00..OUT11 for SD 1.5's 25; SDXL has 9 + 1 + 9) and a layer filter that keeps
only the modules whose names match (as OneTrainer's layer filter)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence


def block_names(unet_config: Mapping) -> list[str]:
    """The UNet's blocks in kohya's order: IN00.., MID, OUT00.. (from the model's original layout)."""
    from ..formats.checkpoint import unet_module_map

    originals = set(unet_module_map(unet_config).values())
    ins = sorted({int(m.split(".")[1]) for m in originals if m.startswith("input_blocks.")})
    outs = sorted({int(m.split(".")[1]) for m in originals if m.startswith("output_blocks.")})
    n_in, n_out = (max(ins) + 1 if ins else 0), (max(outs) + 1 if outs else 0)
    return [f"IN{i:02d}" for i in range(n_in)] + ["MID"] + [f"OUT{i:02d}" for i in range(n_out)]


def block_of(unet_config: Mapping) -> dict[str, str]:
    """diffusers UNet module name -> its block ("IN04", "MID", "OUT10"); modules outside the blocks are absent."""
    from ..formats.checkpoint import unet_module_map

    out = {}
    for name, original in unet_module_map(unet_config).items():
        parts = original.split(".")
        if parts[0] == "input_blocks":
            out[name] = f"IN{int(parts[1]):02d}"
        elif parts[0] == "output_blocks":
            out[name] = f"OUT{int(parts[1]):02d}"
        elif parts[0] == "middle_block":
            out[name] = "MID"
    return out


def per_block(values: Sequence[float] | None, names: list[str], what: str) -> dict[str, float] | None:
    """{block: value} from a list with one value per block (ValueError naming the count it needs)."""
    if not values:
        return None
    if len(values) != len(names):
        raise ValueError(f"{what} needs {len(names)} values for this UNet ({names[0]}..{names[-1]}), got "
                         f"{len(values)}")
    return dict(zip(names, values))


def filter_layers(names: list[str], patterns: Sequence[str], regex: bool = False, *,
                  required: bool = True) -> list[str]:
    """The module names that match any pattern: a substring, or with `regex` a regular expression searched in
    the name. No patterns: every name. When none match: ValueError, or (not `required`) every name."""
    if not patterns:
        return list(names)
    if regex:
        compiled = []
        for p in patterns:
            try:
                compiled.append(re.compile(p))
            except re.error as e:
                raise ValueError(f"layer_filter: {p!r} is not a regular expression ({e})") from None
        kept = [n for n in names if any(c.search(n) for c in compiled)]
    else:
        kept = [n for n in names if any(p in n for p in patterns)]
    if not kept and not required:
        return list(names)
    if not kept:
        raise ValueError(f"layer_filter {list(patterns)} keeps none of the {len(names)} target modules, e.g. "
                         f"{names[:2]}")
    return kept


def module_values(modules: list[str], unet_config: Mapping, rank: int, alpha: float, dims: Sequence[int] | None,
                  alphas: Sequence[float] | None, what: str) -> dict[str, tuple[int, float]]:
    """{module: (rank, alpha)}: its block's value from the per-block lists `dims` / `alphas` (named `what` and
    `what` with alphas in errors), `rank` / `alpha` where a list is empty or the module is outside the blocks."""
    names = block_names(unet_config)
    d = per_block(dims, names, what)
    a = per_block(alphas, names, what.replace("dims", "alphas"))
    where = block_of(unet_config)
    out = {}
    for m in modules:
        block = where.get(m)
        out[m] = (int(d[block]) if d is not None and block is not None else rank,
                  float(a[block]) if a is not None and block is not None else alpha)
    return out


def module_pattern(name: str) -> str:
    """peft's rank_pattern / alpha_pattern key that matches exactly the module `name`."""
    return f"^{re.escape(name)}"


def rank_plan(targets: list[str], unet_config: Mapping, rank: int, alpha: float, dims: Sequence[int] | None,
              alphas: Sequence[float] | None) -> tuple[list[str], dict[str, int], dict[str, float]]:
    """(targets kept, rank_pattern, alpha_pattern) for peft: each module's block value; a block dim of 0 leaves
    the block out (as sd-scripts)."""
    if not dims and not alphas:
        return targets, {}, {}
    values = module_values(targets, unet_config, rank, alpha, dims, alphas, "block_dims")
    kept = [t for t in targets if values[t][0] != 0]
    if not kept:
        raise ValueError("block_dims leaves every target module out (all 0)")
    return (kept, {module_pattern(t): values[t][0] for t in kept},
            {module_pattern(t): values[t][1] for t in kept})


def conv_plan(convs: list[str], unet_config: Mapping, rank: int, alpha: float, dims: Sequence[int] | None,
              alphas: Sequence[float] | None) -> dict[str, tuple[int, float]]:
    """{3x3 convolution: (rank, alpha)} from kohya's `conv_block_dims` / `conv_block_alphas` (one value per block,
    block_dims' order), the conv_dim / conv_alpha elsewhere; rank 0 leaves the convolution out."""
    return module_values(convs, unet_config, rank, alpha, dims, alphas, "conv_block_dims")
