"""Comparison grids with labelled axes: prompt x LoRA weight, prompt x LoRA checkpoint, sampler x steps.

Columns are the first named axis and rows the second (A1111's X/Y plot: X = columns), and every
cell in a column uses the same seed(s), so going down a column only the row's setting changes.
Each grid comes with its cells' images and A1111 parameter texts; saved grids carry a `parameters`
chunk describing the grid (the first cell's settings plus X/Y Type and Values fields).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from PIL import Image

from ..drawing import image_grid


class GridResult(NamedTuple):
    """A grid image (its `info["parameters"]` describes the grid), and per cell [row][col] the
    images and their A1111 parameter texts."""

    image: Image.Image
    cells: list[list[list[Image.Image]]]
    parameters: list[list[list[str]]]


# ------------------------------------------------------------------------------ generating

def _column_seeds(seed: int | list[int], cols: int) -> list[int]:
    if isinstance(seed, (list, tuple)):
        if len(seed) != cols:
            raise ValueError(f"give one seed per column ({cols}), got {len(seed)}")
        return [int(s) for s in seed]
    return [int(seed)] * cols


def _grid_text(first_cell: str, x_type: str, x_values: list, y_type: str, y_values: list) -> str:
    """The grid PNG's parameters: the first cell's text with A1111 X/Y plot fields added."""
    from ..formats.png_info import quote_param, csv_values

    fields = {"X Type": x_type, "X Values": csv_values(x_values), "Y Type": y_type, "Y Values": csv_values(y_values)}
    return first_cell + "".join(f", {k}: {quote_param(v)}" for k, v in fields.items())


def _active_adapters(pipe) -> list[str]:
    try:
        return list(pipe.get_active_adapters())
    except (ValueError, AttributeError):  # no PEFT layers yet
        return []


def _set_active(pipe, names: list[str], scales: dict[str, float] | None = None) -> None:
    """Activate exactly `names` in every LoRA layer, leaving other adapters' weights as they are;
    `scales` sets the weight of the named adapters."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from ..formats.lora import pipe_components

    for model in pipe_components(pipe).values():
        for module in model.modules():
            if isinstance(module, BaseTunerLayer) and hasattr(module, "scaling"):
                module.set_adapter([n for n in names if n in module.scaling])
                for name, scale in (scales or {}).items():
                    if name in module.scaling:
                        module.set_scale(name, scale)


def _load_grid_loras(pipe, paths: list[str | Path]) -> list[str]:
    """Load each LoRA file as its own adapter (inactive); adapters already active stay active."""
    from ..files import BadFileError
    from ..formats.lora import apply_lora, load_lora

    before = _active_adapters(pipe)
    taken = {a for names in pipe.get_list_adapters().values() for a in names}
    names = []
    for k, path in enumerate(paths):
        try:
            weights, _ = load_lora(path, pipe)
        except BadFileError:
            raise  # it names the file already
        except ValueError as e:
            raise ValueError(f"LoRA {Path(path).name}: {e}") from None
        name = f"grid{k}_{Path(path).stem}".replace(".", "_")
        while name in taken:
            name += "_"
        apply_lora(pipe, weights, adapter_name=name, scale=0.0)
        names.append(name)
        taken.add(name)
    _set_active(pipe, before)
    return names


def _has_lora(pipe) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in pipe.unet.modules())


def _unload(pipe, names: list[str], before: list[str]) -> None:
    pipe.delete_adapters(names)
    if _has_lora(pipe):
        _set_active(pipe, before)


def _run_grid(pipe, col_values: list, row_values: list, cell_fn, seeds: list[int], images_per_cell: int,
              gen: dict[str, Any], desc: str) -> tuple[list[list[list[Image.Image]]], list[list[list[str]]]]:
    """Every cell of a grid, with one progress bar for the grid (`desc`) instead of one per image."""
    from tqdm.auto import tqdm

    from .inference import generate, quiet_pipeline

    cells, texts = [], []
    with quiet_pipeline(pipe), tqdm(total=len(row_values) * len(col_values), desc=desc, unit="cell") as bar:
        for i, row in enumerate(row_values):
            row_cells, row_texts = [], []
            for j, col in enumerate(col_values):
                kwargs = {**gen, **cell_fn(i, row, j, col)}
                images, params = generate(pipe, kwargs.pop("prompt"), seed=seeds[j], num_images=images_per_cell,
                                          **kwargs)
                row_cells.append(images)
                row_texts.append(params)
                bar.update(1)
            cells.append(row_cells)
            texts.append(row_texts)
    return cells, texts


def _finish(cells, texts, col_labels, row_labels, title, layout: dict[str, Any], x_type, x_values, y_type,
            y_values) -> GridResult:
    image = image_grid(cells, row_labels, col_labels, title, **layout)
    image.info["parameters"] = _grid_text(texts[0][0][0], x_type, x_values, y_type, y_values)
    return GridResult(image, cells, texts)


def grid_prompt_x_weight(pipe, prompts: list[str], lora_path: str | Path, weights: list[float], *,
                         seed: int | list[int] = 0, images_per_cell: int = 1, title: str | None = None,
                         layout: dict[str, Any] | None = None, **generate_kwargs: Any) -> GridResult:
    """Columns: prompts; rows: the LoRA at each weight (0 = the base model). `seed`: one for all
    columns or one per column. generate_kwargs go to `inference.generate` (steps, sampler, cfg_scale,
    negative_prompt, width, height, clip_skip, weighting, model_name...); layout to `image_grid`."""
    from ..formats.png_info import lora_hashes_field, lora_name

    seeds = _column_seeds(seed, len(prompts))
    before = _active_adapters(pipe)
    (adapter,) = _load_grid_loras(pipe, [lora_path])
    name = lora_name(lora_path)
    extra = {**generate_kwargs.pop("extra", {}), **lora_hashes_field([(lora_path, 1.0)])}
    try:
        def cell(i, w, j, prompt):
            _set_active(pipe, before + [adapter], {adapter: float(w)})
            return {"prompt": prompt, "loras": [(name, float(w))], "extra": extra}

        cells, texts = _run_grid(pipe, prompts, weights, cell, seeds, images_per_cell, generate_kwargs,
                                 "grid: prompt x LoRA weight")
    finally:
        _unload(pipe, [adapter], before)
    return _finish(cells, texts, prompts, [f"{name} weight {w:g}" for w in weights], title, layout or {},
                   "Prompt", prompts, "LoRA weight", [float(w) for w in weights])


def grid_prompt_x_checkpoint(pipe, prompts: list[str], lora_paths: list[str | Path], weight: float = 1.0, *,
                             seed: int | list[int] = 0, images_per_cell: int = 1, title: str | None = None,
                             layout: dict[str, Any] | None = None, **generate_kwargs: Any) -> GridResult:
    """Columns: prompts; rows: LoRA files (e.g. the checkpoints of one training run), each at `weight`."""
    from ..formats.png_info import lora_hashes_field, lora_name

    seeds = _column_seeds(seed, len(prompts))
    before = _active_adapters(pipe)
    adapters = _load_grid_loras(pipe, lora_paths)
    extra = generate_kwargs.pop("extra", {})
    try:
        def cell(i, path, j, prompt):
            _set_active(pipe, before + [adapters[i]], {adapters[i]: float(weight)})
            return {"prompt": prompt, "loras": [(lora_name(path), float(weight))],
                    "extra": {**extra, **lora_hashes_field([(path, weight)])}}

        cells, texts = _run_grid(pipe, prompts, lora_paths, cell, seeds, images_per_cell, generate_kwargs,
                                 "grid: prompt x checkpoint")
    finally:
        _unload(pipe, adapters, before)
    names = [lora_name(p) for p in lora_paths]
    return _finish(cells, texts, prompts, names, title, layout or {}, "Prompt", prompts, "LoRA", names)


def grid_trigger_test(pipe, prompts: list[str], trigger: str, lora_path: str | Path, weight: float = 1.0, *,
                      seed: int | list[int] = 0, images_per_cell: int = 1, title: str | None = None,
                      layout: dict[str, Any] | None = None, **generate_kwargs: Any) -> GridResult:
    """The trigger-word test. Columns: prompts (each with the trigger); rows: the LoRA with the trigger,
    the LoRA with the trigger removed from the prompt, and the base model with the trigger. A LoRA that
    learned its trigger shows the concept in the first row only."""
    from ..formats.png_info import lora_hashes_field, lora_name
    from ..sd.prompts import has_trigger, remove_trigger

    missing = [p for p in prompts if not has_trigger(p, trigger)]
    if missing:
        raise ValueError(f"the trigger-word test needs the trigger {trigger!r} in every prompt; missing in: "
                         + "; ".join(missing))
    seeds = _column_seeds(seed, len(prompts))
    before = _active_adapters(pipe)
    (adapter,) = _load_grid_loras(pipe, [lora_path])
    name = lora_name(lora_path)
    extra = {**generate_kwargs.pop("extra", {}), **lora_hashes_field([(lora_path, weight)])}
    rows = [("LoRA, with trigger", weight, True), ("LoRA, trigger removed", weight, False),
            ("base model, with trigger", 0.0, True)]
    try:
        def cell(i, row, j, prompt):
            _, w, keep = row
            _set_active(pipe, before + [adapter], {adapter: float(w)})
            return {"prompt": prompt if keep else remove_trigger(prompt, trigger), "loras": [(name, float(w))],
                    "extra": extra}

        cells, texts = _run_grid(pipe, prompts, rows, cell, seeds, images_per_cell, generate_kwargs,
                                 "grid: trigger test")
    finally:
        _unload(pipe, [adapter], before)
    labels = [f"{label} ({name} {w:g})" if w else label for label, w, _ in rows]
    return _finish(cells, texts, prompts, labels, title, layout or {}, "Prompt", prompts, "Trigger test",
                   [label for label, _, _ in rows])


def grid_sampler_x_steps(pipe, prompt: str, samplers: list[str], steps_list: list[int], *,
                         seed: int | list[int] = 0, images_per_cell: int = 1, title: str | None = None,
                         layout: dict[str, Any] | None = None, **generate_kwargs: Any) -> GridResult:
    """Columns: A1111 samplers; rows: step counts; one prompt."""
    seeds = _column_seeds(seed, len(samplers))

    def cell(i, steps, j, sampler):
        return {"prompt": prompt, "sampler": sampler, "steps": int(steps)}

    cells, texts = _run_grid(pipe, samplers, steps_list, cell, seeds, images_per_cell, generate_kwargs,
                             "grid: sampler x steps")
    return _finish(cells, texts, samplers, [f"{s} steps" for s in steps_list], title, layout or {},
                   "Sampler", samplers, "Steps", [int(s) for s in steps_list])


# ---------------------------------------------------------------------------------- saving

def save_grid(result: GridResult | tuple, path: str | Path, *, save_cells: bool = True) -> list[Path]:
    """Write the grid PNG (with its parameters chunk) and, if `save_cells`, every cell image with its
    own parameters into `<grid stem>_cells/r{row}_c{col}_{k}.png`. Returns the paths written."""
    from ..formats.png_info import save_png

    grid, cells, parameters = result
    path = Path(path)
    written = [save_png(grid, path, grid.info.get("parameters"))]
    if save_cells:
        folder = path.parent / f"{path.stem}_cells"
        for i, row in enumerate(cells):
            for j, images in enumerate(row):
                for k, image in enumerate(images):
                    written.append(save_png(image, folder / f"r{i:02d}_c{j:02d}_{k}.png", parameters[i][j][k]))
    return written
