"""What an evaluation writes: the metric table (CSV, Markdown), plots per variant and weight, image grids,
and the report (Markdown and HTML) with the trigger-word test."""

from __future__ import annotations

import csv
import html
import io
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ..atomic import atomic_path, write_bytes, write_text
from .verdict import verdict

GROUPS = ("natural", "new_context", "prior", "no_trigger")


GROUP_TITLES = {"natural": "concept, natural setting", "new_context": "concept, new contexts",
                "prior": "no concept (prior)", "no_trigger": "natural prompts without the trigger"}


BASE_COLUMNS = ["variant", "lora", "weight", "group", "n", "clip_t", "clip_t_100", "clip_i", "dino",
                "base_clip_i", "base_dino", "kid_mean", "kid_std", "kid_subset", "fid"]


PLOT_METRICS = ["clip_t", "clip_i", "dino", "base_dino", "kid_mean"]


@dataclass
class Variant:
    """One column of the evaluation: the base model, or one LoRA at one weight."""

    label: str
    slug: str
    lora: str | None = None
    weight: float = 0.0
    adapter: str | None = None


@dataclass
class ProtocolResult:
    """What run_protocol wrote: the table rows and the paths of every output (all under out_dir)."""

    out_dir: Path
    columns: list[str]
    rows: list[dict[str, Any]]
    csv_path: Path
    markdown_path: Path
    report_path: Path
    html_path: Path
    json_path: Path
    manifest_path: Path
    plot_paths: list[Path] = field(default_factory=list)
    grid_paths: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    verdict: list[str] = field(default_factory=list)   # the report's verdict, sentence by sentence

    def row(self, variant: str, group: str) -> dict[str, Any]:
        """The table row of `variant` ("base", "name @ 1") and `group` ("natural", "prior", ...)."""
        for r in self.rows:
            if r["variant"] == variant and r["group"] == group:
                return r
        raise KeyError(f"no row for {variant!r} / {group!r}")


def table_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The standard columns, then extra-scorer columns in order of first appearance."""
    extra: list[str] = []
    for r in rows:
        extra += [k for k in r if k not in BASE_COLUMNS and k not in extra]
    return BASE_COLUMNS + extra


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _csv_cell(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _md_cell(v: Any, column: str) -> str:
    if v is None or v == "" or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        if column == "weight":
            return f"{v:g}"
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"
    return str(v).replace("|", "\\|")


def table_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([_csv_cell(r.get(c)) for c in columns])
    return buf.getvalue()


def table_markdown(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A markdown table; a column empty in every row (a metric that was turned off) is left out
    (metrics.csv keeps every column)."""
    columns = [c for c in columns if any(r.get(c) not in (None, "") for r in rows)] or list(columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_md_cell(r.get(c), c) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _metric_columns(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> list[str]:
    extra = [c for c in columns if c not in BASE_COLUMNS]
    return [c for c in PLOT_METRICS + extra if any(_is_number(r.get(c)) for r in rows)]


def _save_figure(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return write_bytes(path, buf.getvalue())


def plot_variants(rows: Sequence[dict[str, Any]], columns: Sequence[str], path: str | Path) -> Path | None:
    """Bars: each metric per variant (base, each LoRA/checkpoint at each weight), one bar per group."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metrics = _metric_columns(rows, columns)
    if not metrics:
        return None
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    groups = list(dict.fromkeys(r["group"] for r in rows))
    ncol = min(2, len(metrics))
    nrow = math.ceil(len(metrics) / ncol)
    fig = Figure(figsize=(max(5.5, 1.1 * len(variants) * ncol + 2), 3.2 * nrow))
    FigureCanvasAgg(fig)
    width = 0.8 / len(groups)
    for i, metric in enumerate(metrics):
        ax = fig.add_subplot(nrow, ncol, i + 1)
        for j, g in enumerate(groups):
            xs, ys, err = [], [], []
            for k, v in enumerate(variants):
                r = next((r for r in rows if r["variant"] == v and r["group"] == g), {})
                if _is_number(r.get(metric)):
                    xs.append(k - 0.4 + width * (j + 0.5))
                    ys.append(r[metric])
                    err.append(r.get("kid_std", 0.0) if metric == "kid_mean" and _is_number(r.get("kid_std")) else 0.0)
            if xs:
                ax.bar(xs, ys, width, yerr=err if any(err) else None, label=g)
        ax.set_xticks(range(len(variants)), variants, rotation=20, ha="right", fontsize=8)
        ax.set_title(metric, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return _save_figure(fig, Path(path))


def plot_weights(rows: Sequence[dict[str, Any]], columns: Sequence[str], path: str | Path) -> Path | None:
    """Lines: each metric against LoRA weight (0 = the base model), one line per LoRA and group."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metrics = _metric_columns(rows, columns)
    loras = list(dict.fromkeys(r["lora"] for r in rows if r["lora"]))
    if not metrics or not loras:
        return None
    groups = list(dict.fromkeys(r["group"] for r in rows))
    ncol = min(2, len(metrics))
    nrow = math.ceil(len(metrics) / ncol)
    fig = Figure(figsize=(6 * ncol, 3.2 * nrow))
    FigureCanvasAgg(fig)
    styles = ["-", "--", ":", "-."]
    for i, metric in enumerate(metrics):
        ax = fig.add_subplot(nrow, ncol, i + 1)
        for li, lora in enumerate(loras):
            for gi, g in enumerate(groups):
                if metric.startswith("base_"):   # the base model compared with itself
                    pts = [(0.0, 1.0)] if any(not r["lora"] and r["group"] == g for r in rows) else []
                else:
                    pts = [(0.0, r[metric]) for r in rows
                           if not r["lora"] and r["group"] == g and _is_number(r.get(metric))]
                pts += sorted((r["weight"], r[metric]) for r in rows
                              if r["lora"] == lora and r["group"] == g and _is_number(r.get(metric)))
                if len(pts) >= 1:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], linestyle=styles[li % len(styles)],
                            marker="o", color=f"C{gi}", label=f"{lora} / {g}" if len(loras) > 1 else g)
        ax.set_xlabel("LoRA weight (0 = base)", fontsize=8)
        ax.set_title(metric, fontsize=10)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return _save_figure(fig, Path(path))


def _thumb(im: Image.Image, size: int) -> Image.Image:
    scale = size / max(im.size)
    new = (max(1, round(im.size[0] * scale)), max(1, round(im.size[1] * scale)))
    return im.resize(new, Image.NEAREST if scale > 1 else Image.LANCZOS)


def _write_grid(out: Path, name: str, manifest: list[dict], columns: list[tuple[str, str, str]],
                row_prompts: list[tuple[int, str]], seeds: list[int], thumb: int) -> Path | None:
    """A labelled grid: rows = prompts, columns = (label, variant, group), cells = a strip of seeds."""
    from ..drawing import labelled_grid

    index = {(e["variant"], e["group"], e["prompt_index"], e["seed"]): e["path"] for e in manifest}
    cells = []
    for pi, _ in row_prompts:
        row = []
        for _, variant, group in columns:
            strip = []
            for s in seeds:
                path = index.get((variant, group, pi, s))
                if path is None:
                    return None
                with Image.open(out / path) as im:
                    strip.append(_thumb(im.convert("RGB"), thumb))
            row.append(strip)
        cells.append(row)
    if not cells:
        return None
    grid = labelled_grid(cells, [c[0] for c in columns], [p for _, p in row_prompts], zoom=1)   # labels wrap
    path = out / "grids" / f"{name}.png"
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")
    return path


def write_outputs(out: Path, rows: list[dict[str, Any]], settings: dict[str, Any], manifest: list[dict],
                  variants: list[Variant], groups: dict[str, list[str]], notes: list[str], manifest_path: Path, *,
                  grid_prompts: int = 4, grid_seeds: int = 4, thumb: int = 128) -> ProtocolResult:
    """Table (CSV, Markdown, JSON), plots, grids and the report (Markdown and HTML, relative links)."""
    columns = table_columns(rows)
    csv_path = write_text(out / "metrics.csv", table_csv(rows, columns))
    md_path = write_text(out / "metrics.md", table_markdown(rows, columns))
    # one LoRA at several weights: the lines against weight say all the bars would; several LoRAs at one
    # weight: only bars; otherwise both
    loras = {r["lora"] for r in rows if r["lora"]}
    weights = {r["weight"] for r in rows if r["lora"]}
    plots = [p for p in ((plot_variants(rows, columns, out / "plots" / "variants.png")
                          if len(loras) != 1 or len(weights) < 2 else None),
                         (plot_weights(rows, columns, out / "plots" / "weights.png") if len(weights) >= 2 else None))
             if p is not None]
    seeds = sorted({e["seed"] for e in manifest})[:grid_seeds]
    grids: list[Path] = []
    for g, prompts in groups.items():
        cols = [(v.label, v.label, g) for v in variants]
        p = _write_grid(out, g, manifest, cols, list(enumerate(prompts))[:grid_prompts], seeds, thumb)
        if p is not None:
            grids.append(p)
    if "no_trigger" in groups:
        cols = [c for v in variants for c in ((f"{v.label} +trigger", v.label, "natural"),
                                              (f"{v.label} -trigger", v.label, "no_trigger"))]
        p = _write_grid(out, "trigger", manifest, cols, list(enumerate(groups["natural"]))[:grid_prompts], seeds, thumb)
        if p is not None:
            grids.append(p)
    json_path = write_text(out / "results.json", json.dumps(
        {"settings": settings, "columns": columns, "rows": rows, "notes": notes}, indent=1, default=str) + "\n")
    def rel(p: Path) -> str:
        return p.relative_to(out).as_posix()

    trigger_table = _trigger_summary(rows, columns)
    said = verdict(rows, settings)
    report = _report_markdown(settings, rows, columns, trigger_table, notes, [rel(p) for p in plots],
                              [rel(p) for p in grids], groups, said)
    report_path = write_text(out / "report.md", report)
    html_path = write_text(out / "report.html", _report_html(settings, rows, columns, trigger_table, notes,
                                                             [rel(p) for p in plots], [rel(p) for p in grids], groups,
                                                             said))
    return ProtocolResult(out, columns, rows, csv_path, md_path, report_path, html_path, json_path, manifest_path,
                          plots, grids, notes, said)


def _trigger_summary(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> list[dict[str, Any]]:
    """Per variant and metric: the natural prompts with the trigger, without it, and the difference."""
    out = []
    metrics = [c for c in ("clip_i", "dino") + tuple(c for c in columns if c not in BASE_COLUMNS)]
    for r in rows:
        if r["group"] != "natural":
            continue
        other = next((o for o in rows if o["variant"] == r["variant"] and o["group"] == "no_trigger"), None)
        if other is None:
            continue
        for m in metrics:
            if _is_number(r.get(m)) and _is_number(other.get(m)):
                out.append({"variant": r["variant"], "metric": m, "with_trigger": r[m], "without_trigger": other[m],
                            "difference": r[m] - other[m]})
    return out


METRIC_NOTES = [
    ("clip_t", "mean cosine between each image and its prompt in CLIP space, the trigger word removed (CLIP does "
               "not know it); raw cosine, -1..1"),
    ("clip_t_100", "the same on torchmetrics' CLIPScore scale: 100 x max(mean cosine, 0)"),
    ("clip_i", "mean cosine over all (generated, training image) pairs of CLIP image embeddings"),
    ("dino", "the same with DINO ViT CLS embeddings (sensitive to the subject's identity, less to the prompt)"),
    ("base_clip_i / base_dino", "mean cosine between each image and the base model's image for the same prompt "
                                "and seed: near 1 on prior prompts means the prior is kept"),
    ("kid_mean / kid_std", "KID to the training images (InceptionV3 features, polynomial kernel), mean and "
                           "std over random subsets of kid_subset images; lower is closer"),
    ("fid", "FID to the training images; strongly biased below 2,048 images: compare only at equal counts"),
]


def _report_markdown(settings, rows, columns, trigger_table, notes, plots, grids, groups, said) -> str:
    s = settings
    lines = ["# Evaluation report", "", "## Verdict", ""] + [f"- {v}" for v in said] + [
             "", "## Settings", "",
             f"- model: `{s['model']}`", f"- LoRAs: {', '.join(f'`{p}`' for p in s['loras']) or 'none'}",
             f"- LoRA weights: {', '.join(f'{w:g}' for w in s['weights'])}",
             f"- sampler {s['sampler']}, {s['steps']} steps, CFG {s['cfg_scale']:g}, seeds {s['seeds']}"
             + (f", clip skip {s['clip_skip']}" if s['clip_skip'] > 1 else ""),
             f"- trigger: `{s['trigger']}`" if s["trigger"] else "- trigger: none (no trigger-word test)",
             f"- reference (training) images: {s['n_reference_images']}",
             f"- CLIP: `{s['clip_model'] or 'off'}`, DINO: `{s['dino_model'] or 'off'}`, "
             f"FID/KID features: {s['fid_kid_features'] or 'off'}",
             ""]
    lines += ["## Prompt groups", ""]
    for g, prompts in groups.items():
        lines.append(f"- **{g}** ({GROUP_TITLES[g]}): " + "; ".join(f"`{p}`" for p in prompts))
    lines += ["", "## Metrics", "", table_markdown(rows, columns), "Columns:", ""]
    lines += [f"- `{name}`: {text}" for name, text in METRIC_NOTES]
    if any(c not in BASE_COLUMNS for c in columns):
        lines.append(f"- {', '.join(f'`{c}`' for c in columns if c not in BASE_COLUMNS)}: from the extra scorer "
                     f"({s['extra_scorer']})")
    if trigger_table:
        lines += ["", "## Trigger-word test", "",
                  "Natural prompts with and without the trigger, same seeds. A concept that shows up without its "
                  "trigger has leaked into the class word.", "",
                  table_markdown(trigger_table, ["variant", "metric", "with_trigger", "without_trigger", "difference"])]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    if grids:
        lines += ["", "## Grids", "", "Rows: prompts; columns: base model and LoRAs; each cell: the first seeds.", ""]
        lines += [f"### {Path(p).stem}\n\n![{p}]({p})\n" for p in grids]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    lines += ["", "Files: [metrics.csv](metrics.csv), [metrics.md](metrics.md), [results.json](results.json), "
                  "[manifest.json](manifest.json) (every image with its prompt and seed; PNGs carry A1111 "
                  "parameters)."]
    return "\n".join(lines) + "\n"


def _md_inline(text: str) -> str:
    """Escape for HTML, with Markdown's `code` spans as <code>."""
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(text))


def _html_table(rows, columns) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_md_cell(r.get(c), c))}</td>" for c in columns) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _report_html(settings, rows, columns, trigger_table, notes, plots, grids, groups, said) -> str:
    e = html.escape
    s = settings
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>Evaluation report</title><style>"
             "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}img{max-width:100%}</style></head><body>",
             "<h1>Evaluation report</h1><h2>Verdict</h2><ul>",
             *[f"<li>{_md_inline(v)}</li>" for v in said],
             "</ul><h2>Settings</h2><ul>",
             f"<li>model: <code>{e(s['model'])}</code></li>",
             f"<li>LoRAs: {e(', '.join(s['loras']) or 'none')}; weights {e(', '.join(f'{w:g}' for w in s['weights']))}</li>",
             f"<li>sampler {e(s['sampler'])}, {s['steps']} steps, CFG {s['cfg_scale']:g}, seeds {e(str(s['seeds']))}</li>",
             f"<li>trigger: <code>{e(s['trigger'] or 'none')}</code>; reference images: {s['n_reference_images']}</li>",
             f"<li>CLIP: <code>{e(s['clip_model'] or 'off')}</code>, DINO: <code>{e(s['dino_model'] or 'off')}</code>, "
             f"FID/KID features: {e(s['fid_kid_features'] or 'off')}</li></ul><h2>Prompt groups</h2><ul>"]
    parts += [f"<li><b>{e(g)}</b> ({e(GROUP_TITLES[g])}): {e('; '.join(p))}</li>" for g, p in groups.items()]
    parts += ["</ul><h2>Metrics</h2>", _html_table(rows, columns), "<ul>"]
    parts += [f"<li><code>{e(n)}</code>: {e(t)}</li>" for n, t in METRIC_NOTES]
    parts.append("</ul>")
    if trigger_table:
        parts += ["<h2>Trigger-word test</h2>",
                  _html_table(trigger_table, ["variant", "metric", "with_trigger", "without_trigger", "difference"])]
    if plots:
        parts += ["<h2>Plots</h2>"] + [f"<p><img src='{e(p)}' alt='{e(p)}'></p>" for p in plots]
    if grids:
        parts += ["<h2>Grids</h2>"] + [f"<h3>{e(Path(p).stem)}</h3><p><img src='{e(p)}' alt='{e(p)}'></p>" for p in grids]
    if notes:
        parts += ["<h2>Notes</h2><ul>"] + [f"<li>{e(n)}</li>" for n in notes] + ["</ul>"]
    parts.append("<p>Files: <a href='metrics.csv'>metrics.csv</a>, <a href='metrics.md'>metrics.md</a>, "
                 "<a href='results.json'>results.json</a>, <a href='manifest.json'>manifest.json</a></p></body></html>")
    return "\n".join(parts) + "\n"
