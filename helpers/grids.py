"""Comparison grids with labelled axes: prompt x LoRA weight, prompt x LoRA checkpoint, sampler x steps.

Columns are the first named axis and rows the second (A1111's X/Y plot: X = columns), and every
cell in a column uses the same seed(s), so going down a column only the row's setting changes.
Each grid comes with its cells' images and A1111 parameter texts; saved grids carry a `parameters`
chunk describing the grid (the first cell's settings plus X/Y Type and Values fields).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from PIL import Image, ImageDraw, ImageFont

# The demo grid's layout (helpers.demo): label margins, gap between cells, pixel zoom.
GRID_LEFT, GRID_TOP, GRID_PAD, GRID_ZOOM = 250, 26, 8, 3

Cell = Image.Image | list[Image.Image]


class GridResult(NamedTuple):
    """A grid image (its `info["parameters"]` describes the grid), and per cell [row][col] the
    images and their A1111 parameter texts."""

    image: Image.Image
    cells: list[list[list[Image.Image]]]
    parameters: list[list[list[str]]]


# --------------------------------------------------------------------------------- drawing

def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    """Greedy word wrap to `width` pixels (a word longer than the width gets its own line)."""
    lines: list[str] = []
    for para in str(text).split("\n"):
        line = ""
        for word in para.split(" "):
            trial = f"{line} {word}" if line else word
            if line and draw.textlength(trial, font=font) > width:
                lines.append(line)
                line = word
            else:
                line = trial
        lines.append(line)
    return lines


def _strip(cell: Cell) -> Image.Image:
    images = cell if isinstance(cell, (list, tuple)) else [cell]
    if not images:
        raise ValueError("a grid cell has no images")
    w, h = images[0].size
    if any(im.size != (w, h) for im in images):
        raise ValueError("all images of a grid cell must have the same size")
    if len(images) == 1:
        return images[0].convert("RGB")
    out = Image.new("RGB", (w * len(images), h))
    for k, im in enumerate(images):
        out.paste(im.convert("RGB"), (k * w, 0))
    return out


def image_grid(rows_of_images: list[list[Cell]], row_labels: list[str], col_labels: list[str],
               title: str | None = None, *, pad: int = 4, label_width: int | None = None,
               label_height: int | None = None, zoom: int = 1, font_size: int | None = None) -> Image.Image:
    """A labelled grid: cell [i][j] (an image, or a list of images shown side by side) at
    x = label_width + j * (cell_w + pad), y = title_h + label_height + i * (cell_h + pad), scaled by `zoom`
    (nearest neighbour). Width = label_width + cols * (cell_w + pad). Label margins default to what the
    labels need (wrapped to the cell width); font_size defaults to 1/16 of the cell (at least 10 px)."""
    rows = len(rows_of_images)
    cols = len(rows_of_images[0]) if rows else 0
    if rows == 0 or cols == 0:
        raise ValueError("a grid needs at least one row and one column")
    if any(len(r) != cols for r in rows_of_images):
        raise ValueError("every grid row must have the same number of cells")
    if len(row_labels) != rows or len(col_labels) != cols:
        raise ValueError(f"{rows} rows x {cols} columns need {rows} row labels and {cols} column labels, "
                         f"got {len(row_labels)} and {len(col_labels)}")
    strips = [[_strip(c) for c in r] for r in rows_of_images]
    sw, sh = strips[0][0].size
    if any(s.size != (sw, sh) for r in strips for s in r):
        raise ValueError("all grid cells must have the same size (and number of images)")
    cw, ch = sw * zoom, sh * zoom
    font = _font(font_size or max(10, min(cw, ch) // 16))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = int(probe.textbbox((0, 0), "Ag", font=font)[3]) + 2

    col_lines = [_wrap(probe, t, font, max(cw - 2 * pad, 8)) for t in col_labels]
    if label_height is None:
        label_height = max(len(x) for x in col_lines) * line_h + 2 * pad
    if label_width is None:
        widest = max((probe.textlength(t, font=font) for t in row_labels), default=0)
        label_width = int(min(widest, max(cw, 160))) + 2 * pad if any(row_labels) else 0
    row_lines = [_wrap(probe, t, font, max(label_width - 2 * pad, 8)) for t in row_labels]
    title_lines = _wrap(probe, title, font, label_width + cols * (cw + pad) - 2 * pad) if title else []
    title_h = len(title_lines) * line_h + 2 * pad if title else 0

    top = title_h + label_height
    out = Image.new("RGB", (label_width + cols * (cw + pad), top + rows * (ch + pad)), "white")
    d = ImageDraw.Draw(out)
    for k, line in enumerate(title_lines):
        d.text((pad, pad + k * line_h), line, fill="black", font=font)
    for j, lines in enumerate(col_lines):
        for k, line in enumerate(lines):
            d.text((label_width + j * (cw + pad) + pad, title_h + pad + k * line_h), line, fill="black", font=font)
    for i, lines in enumerate(row_lines):
        y0 = top + i * (ch + pad) + max(0, (ch - len(lines) * line_h) // 2)
        for k, line in enumerate(lines):
            d.text((pad, y0 + k * line_h), line, fill="black", font=font)
        for j, strip in enumerate(strips[i]):
            if zoom != 1:
                strip = strip.resize((cw, ch), Image.NEAREST)
            out.paste(strip, (label_width + j * (cw + pad), top + i * (ch + pad)))
    return out


def labelled_grid(cells: list[list[list[Image.Image]]], col_labels: list[str], row_labels: list[str],
                  zoom: int = GRID_ZOOM) -> Image.Image:
    """The demo's grid: strips of images per cell, fixed margins (GRID_LEFT, GRID_TOP, GRID_PAD), zoomed."""
    return image_grid(cells, row_labels, col_labels, pad=GRID_PAD, label_width=GRID_LEFT, label_height=GRID_TOP,
                      zoom=zoom, font_size=10)


# ------------------------------------------------------------------------------ generating

def _column_seeds(seed: int | list[int], cols: int) -> list[int]:
    if isinstance(seed, (list, tuple)):
        if len(seed) != cols:
            raise ValueError(f"give one seed per column ({cols}), got {len(seed)}")
        return [int(s) for s in seed]
    return [int(seed)] * cols


def _grid_text(first_cell: str, x_type: str, x_values: list, y_type: str, y_values: list) -> str:
    """The grid PNG's parameters: the first cell's text with A1111 X/Y plot fields added."""
    from .inference import _quote, csv_values

    fields = {"X Type": x_type, "X Values": csv_values(x_values), "Y Type": y_type, "Y Values": csv_values(y_values)}
    return first_cell + "".join(f", {k}: {_quote(v)}" for k, v in fields.items())


def _active_adapters(pipe) -> list[str]:
    try:
        return list(pipe.get_active_adapters())
    except (ValueError, AttributeError):  # no PEFT layers yet
        return []


def _set_active(pipe, names: list[str], scales: dict[str, float] | None = None) -> None:
    """Activate exactly `names` in every LoRA layer, leaving other adapters' weights as they are;
    `scales` sets the weight of the named adapters."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from .lora_io import _pipe_components

    for model in _pipe_components(pipe).values():
        for module in model.modules():
            if isinstance(module, BaseTunerLayer) and hasattr(module, "scaling"):
                module.set_adapter([n for n in names if n in module.scaling])
                for name, scale in (scales or {}).items():
                    if name in module.scaling:
                        module.set_scale(name, scale)


def _load_grid_loras(pipe, paths: list[str | Path]) -> list[str]:
    """Load each LoRA file as its own adapter (inactive); adapters already active stay active."""
    from .lora_io import apply_lora, load_lora

    before = _active_adapters(pipe)
    taken = {a for names in pipe.get_list_adapters().values() for a in names}
    names = []
    for k, path in enumerate(paths):
        try:
            weights, _ = load_lora(path, pipe)
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
              gen: dict[str, Any]) -> tuple[list[list[list[Image.Image]]], list[list[list[str]]]]:
    from .inference import generate

    cells, texts = [], []
    for i, row in enumerate(row_values):
        row_cells, row_texts = [], []
        for j, col in enumerate(col_values):
            kwargs = {**gen, **cell_fn(i, row, j, col)}
            images, params = generate(pipe, kwargs.pop("prompt"), seed=seeds[j], num_images=images_per_cell,
                                      **kwargs)
            row_cells.append(images)
            row_texts.append(params)
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
    from .inference import lora_hashes_field, lora_name

    seeds = _column_seeds(seed, len(prompts))
    before = _active_adapters(pipe)
    (adapter,) = _load_grid_loras(pipe, [lora_path])
    name = lora_name(lora_path)
    extra = {**generate_kwargs.pop("extra", {}), **lora_hashes_field([(lora_path, 1.0)])}
    try:
        def cell(i, w, j, prompt):
            _set_active(pipe, before + [adapter], {adapter: float(w)})
            return {"prompt": prompt, "loras": [(name, float(w))], "extra": extra}

        cells, texts = _run_grid(pipe, prompts, weights, cell, seeds, images_per_cell, generate_kwargs)
    finally:
        _unload(pipe, [adapter], before)
    return _finish(cells, texts, prompts, [f"{name} weight {w:g}" for w in weights], title, layout or {},
                   "Prompt", prompts, "LoRA weight", [float(w) for w in weights])


def grid_prompt_x_checkpoint(pipe, prompts: list[str], lora_paths: list[str | Path], weight: float = 1.0, *,
                             seed: int | list[int] = 0, images_per_cell: int = 1, title: str | None = None,
                             layout: dict[str, Any] | None = None, **generate_kwargs: Any) -> GridResult:
    """Columns: prompts; rows: LoRA files (e.g. the checkpoints of one training run), each at `weight`."""
    from .inference import lora_hashes_field, lora_name

    seeds = _column_seeds(seed, len(prompts))
    before = _active_adapters(pipe)
    adapters = _load_grid_loras(pipe, lora_paths)
    extra = generate_kwargs.pop("extra", {})
    try:
        def cell(i, path, j, prompt):
            _set_active(pipe, before + [adapters[i]], {adapters[i]: float(weight)})
            return {"prompt": prompt, "loras": [(lora_name(path), float(weight))],
                    "extra": {**extra, **lora_hashes_field([(path, weight)])}}

        cells, texts = _run_grid(pipe, prompts, lora_paths, cell, seeds, images_per_cell, generate_kwargs)
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
    from .evaluation import has_trigger, remove_trigger
    from .inference import lora_hashes_field, lora_name

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

        cells, texts = _run_grid(pipe, prompts, rows, cell, seeds, images_per_cell, generate_kwargs)
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

    cells, texts = _run_grid(pipe, samplers, steps_list, cell, seeds, images_per_cell, generate_kwargs)
    return _finish(cells, texts, samplers, [f"{s} steps" for s in steps_list], title, layout or {},
                   "Sampler", samplers, "Steps", [int(s) for s in steps_list])


# ---------------------------------------------------------------------------------- saving

def save_grid(result: GridResult | tuple, path: str | Path, *, save_cells: bool = True) -> list[Path]:
    """Write the grid PNG (with its parameters chunk) and, if `save_cells`, every cell image with its
    own parameters into `<grid stem>_cells/r{row}_c{col}_{k}.png`. Returns the paths written."""
    from .inference import save_png

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
