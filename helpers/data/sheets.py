"""What a user looks at after preparing: contact sheets of the prepared images, duplicate groups side by
side, and the bucket chart."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from PIL import Image

from ..atomic import atomic_path
from ..drawing import thumbnail_sheet
from .records import DuplicateGroup, FileRecord


def _save_png(image: Image.Image, path: Path, fsync: bool = True) -> Path:
    with atomic_path(path, fsync=fsync) as tmp:
        image.save(tmp, format="PNG")
    return path


def plot_buckets(table: Sequence[tuple[tuple[int, int], int]], path: str | Path, resolution: int,
                 fsync: bool = True) -> Path:
    """Bar chart of images per bucket as a PNG (matplotlib's Agg canvas: no pyplot, no backend switch)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = [f"{w}x{h}" for (w, h), _ in table] or ["(none)"]
    counts = [n for _, n in table] or [0]
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(max(5.0, 0.55 * len(labels) + 1.5), 3.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    bars = ax.bar(range(len(labels)), counts, color="#4c72b0")
    ax.bar_label(bars, fontsize=8)
    ax.margins(y=0.12)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_xlabel("bucket (width x height)", fontsize=9)
    ax.set_ylabel("images")
    ax.set_title(f"images per bucket, resolution {resolution} ({sum(counts)} images)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path, fsync=fsync) as tmp:
        fig.savefig(tmp, format="png")
    return path


def write_contact_sheets(folder: Path, items: Sequence[FileRecord], thumbs: dict[str, Image.Image], report_dir: Path,
                         fsync: bool, per_page: int = 100) -> list[Path]:
    """Contact-sheet PNGs of the kept images, `per_page` thumbnails each; old sheets are replaced."""
    for old in report_dir.glob("contact_sheet_*.png"):
        old.unlink()
    paths = []
    pages = max(1, math.ceil(len(items) / per_page)) if items else 0
    for p in range(pages):
        chunk = items[p * per_page:(p + 1) * per_page]
        cells = []
        for r in chunk:
            img = thumbs.get(r.name)
            if img is None:
                img = _thumb_from_file(folder / r.prepared)
            size = f"{r.prepared_size[0]}x{r.prepared_size[1]}" if r.prepared_size else ""
            if r.face_box and r.prepared_size:
                img = mark_face(img, r.face_box, r.prepared_size)
                size += f", face {r.face_coverage:.0%}" if r.face_coverage is not None else ""
            cells.append((img, [r.name, size]))
        title = f"prepared set: {len(items)} images" + (f" (page {p + 1} of {pages})" if pages > 1 else "")
        sheet_path = report_dir / f"contact_sheet_{p + 1:02d}.png"
        paths.append(_save_png(thumbnail_sheet(cells, title=title), sheet_path, fsync))
    return paths


def mark_face(thumb: Image.Image, box: Sequence[float], prepared_size: Sequence[int]) -> Image.Image:
    """A copy of a thumbnail with the detected face's box (in prepared-image pixels) drawn on it in red."""
    from PIL import ImageDraw

    s = thumb.width / float(prepared_size[0])
    out = thumb.convert("RGB")  # a new image: the cached thumbnail stays clean for the duplicate sheets
    x0, y0, x1, y1 = (v * s for v in box)
    ImageDraw.Draw(out).rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=(230, 20, 20),
                                  width=max(1, round(thumb.width / 80)))
    return out


def open_rgb(path: Path) -> Image.Image:
    """An image file as an RGB image, read fully (the file is closed)."""
    with Image.open(path) as im:
        return im.convert("RGB")


def _thumb_from_file(path: Path, cell: int = 160) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.thumbnail((cell, cell))
            return im.convert("RGB")
    except Exception:
        return Image.new("RGB", (cell, cell), (200, 0, 0))


def write_duplicate_sheets(groups: Sequence[DuplicateGroup], by_name: dict[str, FileRecord], thumbs: dict[str, Image.Image],
                           folder: Path, report_dir: Path, final_report_dir: Path, fsync: bool) -> None:
    """One sheet per duplicate group: which image was kept and which were dropped."""
    dup_dir = report_dir / "duplicates"
    for k, g in enumerate(groups, start=1):
        cells = []
        for j, name in enumerate(g.members[:12]):
            r = by_name[name]
            img = thumbs.get(name) or _thumb_from_file(folder / r.prepared)
            size = f"{r.original_size[0]}x{r.original_size[1]}, {r.file_bytes / 1e6:.2f} MB" if r.original_size else ""
            if j == 0:
                score = "keep (suggested)"
            elif g.kind == "near":
                score = f"distance {g.scores[name]:g} bits"
            elif g.kind == "clip":
                score = f"cosine {g.scores[name]:.4f}"
            else:
                score = "identical pixels"
            cells.append((img, [name, size, score]))
        more = f" (+{len(g.members) - 12} more)" if len(g.members) > 12 else ""
        sheet = thumbnail_sheet(cells, columns=len(cells), cell=200, title=f"{g.kind} duplicates, group {k}{more}")
        fname = f"{k:03d}_{g.kind}.png"
        _save_png(sheet, dup_dir / fname, fsync)
        g.sheet = final_report_dir / "duplicates" / fname
