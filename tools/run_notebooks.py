"""Execute the five notebooks top to bottom on the toy model (HELPERS_TOY=1), headless, in one shared
project folder; optionally write each executed notebook as HTML.

    python tools/run_notebooks.py --html docs/notebooks     # the rendered copies in the repository
    python tools/run_notebooks.py --projects /tmp/p          # just run them (what the tests do)

The pages render their ipywidgets (forms, progress bars) from the widget state saved in the notebook,
with a pinned @jupyter-widgets/html-manager vendored in docs/notebooks/widgets/ (see its README.md), not
a CDN: they work offline, and a new major version upstream can't break them.

The rendered copies run in /content/projects/my_lora, the folder a Colab session without Drive uses, from
a checkout at /content/sd-lora-helpers (where the notebooks' setup cell clones it on Colab), so the pages
show the paths a user sees there:

    cp -r . /content/sd-lora-helpers && cd /content/sd-lora-helpers && \
        python tools/run_notebooks.py --html /path/to/checkout/docs/notebooks

A cell that raises stops the run with the notebook's name and the cell's error.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ["01_dataset", "02_tagging", "03_train_lora", "04_inference", "05_eval"]
RENDER_PROJECTS = Path("/content/projects")
WIDGETS_DIR = ROOT / "docs" / "notebooks" / "widgets"
# @jupyter-widgets/html-manager 1.0.15 (the build that goes with ipywidgets 8.1.8/8.1.9): its non-AMD
# dist/embed.js renders @jupyter-widgets/base, controls and output widgets and needs no require.js, plus
# the one Font Awesome font it loads (the solid icons, e.g. a Button's icon="save"). Beside the page.
WIDGET_RENDERER = "widgets/embed.js"
WIDGET_FILES = ("embed.js", "embed.js.LICENSE.txt", "1551f4f60c37af51121f.woff2", "LICENSE", "README.md")


def execute(name: str, projects_dir: Path, *, timeout: int = 600, kernel: str = "python3"):
    """Run one notebook in a kernel started in notebooks/ with the toy switch on, its project under
    `projects_dir`; returns the executed notebook. Raises nbclient's CellExecutionError (with the cell's
    traceback) if a cell fails."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    env = {"HELPERS_TOY": "1", "HELPERS_PROJECTS_DIR": str(projects_dir), "HF_HUB_OFFLINE": "1",
           "MPLBACKEND": "Agg", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        client = NotebookClient(nb, timeout=timeout, kernel_name=kernel,
                                resources={"metadata": {"path": str(ROOT / "notebooks")}})
        client.execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb


def offline_widgets(html: str) -> str:
    """`html` (a page nbconvert's lab template wrote) loading the widget manager from WIDGET_RENDERER,
    next to the page, instead of a CDN, with a version wildcard (`html-manager@*`); and without require.js,
    which only the AMD build of the manager needed. Idempotent."""
    import re

    html = re.sub(r"(var widgetRendererSrc = )'[^']*';", rf"\1'{WIDGET_RENDERER}';", html)
    return re.sub(r'<script src="(?:[^"]*/require(?:\.min)?\.js)?"></script>', "", html)


def copy_widgets(folder: Path) -> None:
    """Put the vendored widget manager in `folder`/widgets (a page's WIDGET_RENDERER is relative)."""
    import shutil

    dest = folder / "widgets"
    if dest.resolve() == WIDGETS_DIR.resolve():
        return
    dest.mkdir(parents=True, exist_ok=True)
    for name in WIDGET_FILES:
        shutil.copyfile(WIDGETS_DIR / name, dest / name)


def to_html(nb, path: Path, title: str) -> Path:
    """The executed notebook as an HTML page (images and widget state embedded). The template's ~260 KB
    of CSS goes once into `style.css` beside the pages instead of into each of them, and the widget
    manager is the vendored one in `widgets/` beside them (copied there if the folder isn't
    docs/notebooks), so the widgets render offline."""
    import re

    from nbconvert import HTMLExporter

    exporter = HTMLExporter(template_name="lab", widget_renderer_url=WIDGET_RENDERER, require_js_url="")
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": title}})
    body = offline_widgets(body)
    styles = re.findall(r"<style[^>]*>.*?</style>", body, flags=re.S)
    css = "\n".join(re.sub(r"^<style[^>]*>|</style>$", "", s) for s in styles)
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.parent / "style.css").write_text(css, encoding="utf-8")
    copy_widgets(path.parent)
    for s in styles:
        body = body.replace(s, "", 1)
    body = body.replace("</head>", '<link rel="stylesheet" href="style.css">\n</head>', 1)
    path.write_text(body, encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--projects", help="folder that holds the project (default: a temporary one; with --html "
                                      "/content/projects, as on Colab without Drive)")
    p.add_argument("--html", help="write <name>.html of each executed notebook into this folder")
    p.add_argument("--only", nargs="+", choices=NOTEBOOKS, help="run only these (they need the earlier ones' files)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        projects = Path(args.projects or (RENDER_PROJECTS if args.html else Path(tmp))).resolve()
        if args.html and not args.only and (projects / "my_lora").exists():
            import shutil

            shutil.rmtree(projects / "my_lora")  # the pages show one fresh run
        for name in args.only or NOTEBOOKS:
            t0 = time.perf_counter()
            nb = execute(name, projects)
            print(f"{name}: ran in {time.perf_counter() - t0:.1f} s")
            if args.html:
                print("  ", to_html(nb, Path(args.html) / f"{name}.html", name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
