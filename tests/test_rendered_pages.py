"""The rendered notebook pages (docs/notebooks/*.html, written by tools/run_notebooks.py's `to_html`) draw
their ipywidgets from the widget state they carry with the widget manager vendored in
docs/notebooks/widgets/, not a CDN with a version wildcard: they render offline, and stay as they are."""

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs" / "notebooks").glob("*.html"))
STATE = "application/vnd.jupyter.widget-state+json"
VIEW = "application/vnd.jupyter.widget-view+json"


def _run_notebooks():
    spec = importlib.util.spec_from_file_location("run_notebooks", ROOT / "tools" / "run_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _scripts_loaded(html: str) -> list[str]:
    """Every script a page loads: <script src=...> and the widget manager the page appends itself."""
    return (re.findall(r"<script[^>]*\bsrc=\"([^\"]*)\"", html)
            + re.findall(r"var widgetRendererSrc = '([^']*)';", html))


def _assert_offline_widget_manager(html: str, folder: Path):
    assert STATE in html, "the page carries no widget state"
    loaded = _scripts_loaded(html)
    renderer = re.findall(r"var widgetRendererSrc = '([^']*)';", html)
    assert renderer and set(renderer) == {"widgets/embed.js"}, renderer
    for src in loaded:
        assert not re.search(r"jsdelivr|unpkg|jupyter-widgets|require(\.min)?\.js|@\*", src), src
    assert "@*" not in html and "cdn.jsdelivr.net" not in html and "unpkg.com" not in html
    for src in renderer:
        assert (folder / src).is_file(), f"{src} is not beside the page in {folder}"


def _widget_notebook():
    """A notebook with an IntSlider, a progress bar and a Button with an icon displayed, and their widget
    state in its metadata, as an executed one has them (made with ipywidgets.embed; no kernel)."""
    import ipywidgets as w
    import nbformat
    from ipywidgets.embed import embed_data
    from nbformat.v4 import new_code_cell, new_notebook, new_output

    views = [w.IntSlider(value=7, description="steps"), w.FloatProgress(value=0.5, description="work"),
             w.Button(description="Save", icon="save")]
    data = embed_data(views=views)
    cell = new_code_cell("...", outputs=[new_output("display_data", data={VIEW: spec, "text/plain": "widget"})
                                         for spec in data["view_specs"]])
    nb = new_notebook(cells=[cell], metadata={"widgets": {STATE: data["manager_state"]}})
    nbformat.validate(nb)
    return nb


def test_to_html_points_the_page_at_the_vendored_widget_manager_beside_it(tmp_path):
    pytest.importorskip("nbconvert")
    pytest.importorskip("ipywidgets")
    run = _run_notebooks()
    page = run.to_html(_widget_notebook(), tmp_path / "site" / "tiny.html", "tiny")
    html = page.read_text(encoding="utf-8")
    _assert_offline_widget_manager(html, page.parent)
    for name in run.WIDGET_FILES:   # the vendored files, and their copies beside a page rendered elsewhere
        assert (run.WIDGETS_DIR / name).is_file(), name
        assert (page.parent / "widgets" / name).read_bytes() == (run.WIDGETS_DIR / name).read_bytes()
    assert run.offline_widgets(html) == html


def test_the_committed_pages_load_the_vendored_widget_manager():
    run = _run_notebooks()
    assert PAGES
    for page in PAGES:
        html = page.read_text(encoding="utf-8")
        _assert_offline_widget_manager(html, page.parent)
        assert run.offline_widgets(html) == html, f"{page.name}: re-render it with tools/run_notebooks.py --html"
    readme = (run.WIDGETS_DIR / "README.md").read_text(encoding="utf-8")
    assert "html-manager` 1.0.15" in readme and (run.WIDGETS_DIR / "LICENSE").is_file()


def test_offline_widgets_rewrites_a_page_rendered_with_the_cdn():
    run = _run_notebooks()
    old = ('<title>x</title><script src="https://cdnjs.cloudflare.com/ajax/libs/require.js/2.1.10/require.min.js">'
           "</script><script>\n    var widgetRendererSrc = 'https://unpkg.com/@jupyter-widgets/html-manager@*/dist/"
           "embed-amd.js';\n        var widgetRendererSrc = 'https://unpkg.com/@jupyter-js-widgets@*/dist/embed.js';"
           "\n</script>")
    new = run.offline_widgets(old)
    assert "require" not in new and "unpkg" not in new and new.count("'widgets/embed.js'") == 2


@pytest.fixture(scope="module")
def executed():
    """A tiny notebook (an IntSlider, a tqdm.auto bar, a Button with an icon) run by nbclient."""
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("tqdm")
    from nbclient import NotebookClient
    from nbformat.v4 import new_code_cell, new_notebook

    nb = new_notebook(cells=[
        new_code_cell("import ipywidgets as w\nw.IntSlider(value=7, description='steps')"),
        new_code_cell("from tqdm.auto import tqdm\nfor _ in tqdm(range(3), desc='work'):\n    pass"),
        new_code_cell("w.Button(description='Save', icon='save')")])
    nb.metadata.kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
    NotebookClient(nb, timeout=60, kernel_name="python3").execute()
    return nb


def test_an_executed_notebook_keeps_its_widget_state_and_its_page_carries_it(executed, tmp_path):
    state = executed.metadata["widgets"][STATE]["state"]   # nbclient's store_widget_state=True
    models = {m["model_name"] for m in state.values()}
    assert {"IntSliderModel", "FloatProgressModel", "ButtonModel"} <= models, models
    page = _run_notebooks().to_html(executed, tmp_path / "tiny.html", "tiny")
    html = page.read_text(encoding="utf-8")
    _assert_offline_widget_manager(html, page.parent)
    carried = json.loads(re.search(rf'<script type="{re.escape(STATE)}">\s*(.*?)\s*</script>', html, re.DOTALL)[1])
    assert carried["state"].keys() == state.keys()


def _chromium():
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome",
                                                "google-chrome-stable"))), None)


def _dom_offline(page: Path, profile: Path) -> str:
    """The page's DOM after 10 s of virtual time in headless chromium with the network off."""
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
           f"--user-data-dir={profile}", "--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND",
           "--virtual-time-budget=10000", "--dump-dom", page.as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90, check=True).stdout


@pytest.mark.skipif(_chromium() is None, reason="needs headless chromium (apt-get install chromium); "
                                                 "CI has none")
def test_a_rendered_page_shows_its_widgets_offline_in_chromium(executed, tmp_path):
    page = _run_notebooks().to_html(executed, tmp_path / "site" / "tiny.html", "tiny")
    dom = _dom_offline(page, tmp_path / "profile")
    classes = [c.split() for c in re.findall(r'class="([^"]*)"', dom)]
    for widget in ("widget-slider", "widget-hprogress", "widget-button"):
        assert any(widget in c for c in classes), f"no {widget} in the page offline"
    views = page.read_text(encoding="utf-8").count(f'<script type="{VIEW}">')
    assert views == 3 and dom.count('class="widget-subarea"') == views   # every view drawn
    assert "fa-save" in dom
