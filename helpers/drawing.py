"""Drawing labelled image grids: fonts, wrapped labels, image strips, mosaics with row and column labels, and
thumbnail sheets. The comparison grids, the demo, the evaluation report, the dataset sheets and the notebooks'
image views all draw with these."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

# The labelled grid's layout (the demo's and the evaluation report's): label margins, gap between cells, zoom.
GRID_LEFT, GRID_TOP, GRID_PAD, GRID_ZOOM = 250, 26, 8, 3

Cell = Image.Image | list[Image.Image]


def fit_size(size: tuple[int, int], max_side: int | None) -> tuple[int, int]:
    """(width, height) scaled down, never up, so the long side is at most `max_side` (None: unchanged)."""
    w, h = size
    if not max_side or max(w, h) <= max_side:
        return w, h
    s = max_side / max(w, h)
    return max(1, round(w * s)), max(1, round(h * s))


def load_font(size: int) -> ImageFont.ImageFont:
    """Pillow's default font at `size` px (the fixed bitmap font where FreeType is missing)."""
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
    font = load_font(font_size or max(10, min(cw, ch) // 16))
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


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength("…" + text, font=font) > width:
        text = text[1:]
    return "…" + text


def thumbnail_sheet(thumbs: Sequence[tuple[Image.Image, Sequence[str]]], columns: int = 10, cell: int = 160,
                    title: str = "") -> Image.Image:
    """A grid of thumbnails, each with its lines of text underneath (file name first). Each image is fitted to
    its `cell` square as `fit_thumbnail` does: a larger one shrunk smoothly, a smaller one enlarged by the largest
    whole factor that fits, with hard pixels."""
    font = load_font(12)
    n_lines = max((len(lines) for _, lines in thumbs), default=1)
    line_h = 15
    cols = max(1, min(columns, len(thumbs)))
    rows = max(1, math.ceil(len(thumbs) / cols))
    pad = 6
    title_h = 24 if title else 0
    cw, ch = cell + 2 * pad, cell + 2 * pad + n_lines * line_h
    sheet = Image.new("RGB", (cols * cw, title_h + rows * ch), (250, 250, 250))
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((pad, 5), title, fill=(0, 0, 0), font=load_font(14))
    for k, (img, lines) in enumerate(thumbs):
        x0, y0 = (k % cols) * cw, title_h + (k // cols) * ch
        t = fit_thumbnail(img, cell)
        sheet.paste(t, (x0 + pad + (cell - t.width) // 2, y0 + pad + (cell - t.height) // 2))
        for j, line in enumerate(lines):
            draw.text((x0 + pad, y0 + pad + cell + 2 + j * line_h), _fit_text(draw, line, font, cell),
                      fill=(0, 0, 0) if j == 0 else (90, 90, 90), font=font)
    return sheet


def fit_thumbnail(image: Any, cell: int):
    """`image` scaled to fit a `cell` square: a larger one shrunk smoothly (LANCZOS); a smaller one enlarged by
    the largest whole factor that fits, nearest neighbour, so every source pixel becomes a k x k block of the same
    value (a 32x32 image in a 100 px cell becomes 96x96); one more than half the cell wide stays as it is (k = 1)."""
    side = max(image.size)
    if side > cell:
        image = image.copy()
        image.thumbnail((cell, cell), Image.Resampling.LANCZOS)
    elif side > 0 and cell // side >= 2:
        k = cell // side
        image = image.resize((image.width * k, image.height * k), Image.Resampling.NEAREST)
    return image


def contact_grid(images: Sequence[Any], labels: Sequence[str] | None = None, *, columns: int = 6,
                 cell: int = 160):
    """A PIL image: `images` (PIL images or paths) as thumbnails in rows of `columns`, each labelled
    (by default with its file name, wrapped to the cell's width); drawn as the prepare report's sheets are."""
    pics = [p.convert("RGB") if isinstance(p, Image.Image) else Image.open(p).convert("RGB") for p in images]
    if not pics:
        raise ValueError("no images to show")
    if labels is None:
        labels = ["" if isinstance(p, Image.Image) else Path(p).name for p in images]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    font = load_font(12)   # thumbnail_sheet's label font: a long label (a prompt) wraps instead of being cut
    return thumbnail_sheet([(im, _wrap(probe, label, font, cell)) for im, label in zip(pics, labels)],
                           columns=columns, cell=cell)
