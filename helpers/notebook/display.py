"""What the notebooks need around the library: Colab setup, the shared project folder, the GPU check,
a live training monitor, image display and download links. Nothing here trains or scores anything.

Every function also works headless (nbclient in CI, a terminal): displays fall back to text.
"""

from __future__ import annotations

import html
import io
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

TOY_ENV = "HELPERS_TOY"              # "1": the notebooks run on the shipped toy model (what CI does)
PROJECTS_ENV = "HELPERS_PROJECTS_DIR"  # the folder that holds the projects (tests and the rendered pages set it)
DRIVE_ROOT = Path("/content/drive/MyDrive")


# --- where we are -------------------------------------------------------------------------------

def repo_root() -> Path:
    """The folder that holds `helpers/` (and demo_images/, lora_files/ of the repository)."""
    return Path(__file__).resolve().parents[2]


def in_colab() -> bool:
    """True inside Google Colab."""
    return "google.colab" in sys.modules


def toy_mode() -> bool:
    """True when the notebooks should use the shipped toy model and a handful of steps (HELPERS_TOY=1)."""
    return os.environ.get(TOY_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def toy_steps(default: int = 30) -> int:
    """Training steps in toy mode: $HELPERS_TOY_STEPS, else `default` (CI: a handful; the rendered copies: more)."""
    value = os.environ.get("HELPERS_TOY_STEPS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else default


def toy_quick() -> bool:
    """Whether the toy run is the short one CI makes ($HELPERS_TOY_STEPS set): fewer samples in 04 and 05."""
    return bool(os.environ.get("HELPERS_TOY_STEPS", "").strip())


def torch_constraints() -> list[str]:
    """`pkg==version` lines pinning the installed torch family, so pip never replaces Colab's CUDA torch."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for pkg in ("torch", "torchvision", "torchaudio"):
        try:
            pins.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            pass
    return pins


# The notebook host's own packages: the lock's [notebook] section also pins the IPython kernel stack it was
# tested with, but on Colab the kernel is Colab's and must stay; only the widget packages are installed.
COLAB_NOTEBOOK_PACKAGES = ("ipywidgets", "widgetsnbextension", "jupyterlab-widgets")


def lock_sections(lock: str | Path) -> dict[str, list[str]]:
    """{section: ["name==version", ...]} of requirements.lock (sections `# [runtime]`, `# [notebook]`, `# [test]`)."""
    import re

    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in Path(lock).read_text(encoding="utf-8").splitlines():
        head = re.fullmatch(r"# \[(\w+)\]", line.strip())
        if head:
            current = sections.setdefault(head.group(1), [])
        elif line.strip() and not line.startswith("#") and current is not None:
            current.append(line.strip())
    return sections


def colab_requirements(lock: str | Path) -> list[str]:
    """The pins the Colab setup installs: the lock's [runtime] section and the widget packages, never the
    torch family (Colab's CUDA build stays) nor the Jupyter kernel stack."""
    sections = lock_sections(lock)
    if "runtime" not in sections:
        raise ValueError(f"{lock} has no '# [runtime]' section: it was not written by tools/lock.py")
    keep = set(COLAB_NOTEBOOK_PACKAGES)  # the lock never holds the torch family (tools/lock.py leaves it out)
    return list(sections["runtime"]) + [p for p in sections.get("notebook", []) if p.split("==")[0] in keep]


def setup(*, drive: bool = False, lock: str | Path = "requirements.lock", quiet: bool = True) -> str:
    """On Colab: install the tested versions (`colab_requirements` of the lock) with the installed torch pinned,
    and mount Google Drive if `drive`. Elsewhere: nothing (README's `make demo` sets up a venv). Returns what
    was done."""
    if not in_colab():
        return "not on Colab: nothing installed (README: `make demo` or `make test` set up a local venv)"
    pins = Path("/tmp/helpers_colab_requirements.txt")
    pins.write_text("\n".join(colab_requirements(lock)) + "\n")
    constraints = Path("/tmp/helpers_torch_constraints.txt")
    constraints.write_text("\n".join(torch_constraints()) + "\n")
    cmd = [sys.executable, "-m", "pip", "install", "-r", str(pins), "-c", str(constraints)]
    if quiet:
        cmd.append("-q")
    subprocess.run(cmd, check=True)
    done = f"installed {lock}'s tested versions (torch kept: {', '.join(torch_constraints()) or 'none'})"
    if drive:
        from google.colab import drive as gdrive  # type: ignore[import-not-found]

        gdrive.mount("/content/drive")
        done += "; Google Drive mounted at /content/drive"
    return done


# --- the project folder that all five notebooks share -------------------------------------------

@dataclass(frozen=True)
class Project:
    """One LoRA project's folders. 01 reads `images` and writes `prepared`; 02 edits captions in
    `prepared`; 03 writes `outputs` (runs, states, samples during training) and copies the LoRA into
    `lora_files`; 04 writes `samples`; 05 writes `reports`. Settings go to `configs/<job>.toml`."""

    root: Path

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def prepared(self) -> Path:
        return self.root / "prepared"

    @property
    def class_images(self) -> Path:
        return self.root / "class_images"

    @property
    def outputs(self) -> Path:
        return self.root / "outputs"

    @property
    def lora_files(self) -> Path:
        return self.root / "lora_files"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def configs(self) -> Path:
        return self.root / "configs"

    def config(self, job: str) -> Path:
        """The TOML of one job's settings: prepare, train, generate or eval."""
        return self.configs / f"{job}.toml"

    def make(self) -> "Project":
        for folder in (self.images, self.prepared, self.outputs, self.lora_files, self.samples, self.reports,
                       self.configs):
            folder.mkdir(parents=True, exist_ok=True)
        return self

    def describe(self) -> str:
        rows = [("project", self.root), ("your images", self.images), ("prepared set", self.prepared),
                ("training runs", self.outputs), ("LoRA files", self.lora_files), ("samples", self.samples),
                ("reports", self.reports), ("settings", self.configs)]
        return "\n".join(f"{k:>14}: {v}" for k, v in rows)


def project(name: str = "my_lora", *, on_drive: bool | None = None) -> Project:
    """The project folder `<name>`: under $HELPERS_PROJECTS_DIR if set; on Colab with Drive mounted,
    MyDrive/sd-lora/<name> (survives a disconnect); else ./projects/<name>. Created if missing."""
    if not name or any(c in name for c in '/\\:*?"<>|'):
        raise ValueError(f"project name must be a plain folder name, got {name!r}")
    if os.environ.get(PROJECTS_ENV):
        root = Path(os.environ[PROJECTS_ENV]) / name
    elif (on_drive is None or on_drive) and in_colab() and DRIVE_ROOT.is_dir():
        root = DRIVE_ROOT / "sd-lora" / name
    else:
        if on_drive:
            raise FileNotFoundError("Google Drive is not mounted: run the setup cell with USE_DRIVE = True")
        root = Path("projects") / name
    return Project(root.resolve()).make()


# --- the GPU check -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class GpuInfo:
    name: str
    total_gb: float
    bf16: bool                  # bf16 in hardware (compute capability >= 8.0), not emulated
    capability: tuple[int, int]


def gpu_info() -> GpuInfo | None:
    """The first CUDA GPU, or None."""
    import torch

    if not torch.cuda.is_available():
        return None
    from ..sd.precision import native_bf16

    props = torch.cuda.get_device_properties(0)
    capability = (props.major, props.minor)
    return GpuInfo(props.name, props.total_memory / 2**30, native_bf16(capability), capability)


def preset_for_gpu(family: str = "sd1", info: GpuInfo | None | str = "detect") -> str:
    """The preset a notebook starts from on this GPU: the largest of `family` that fits its memory and runs
    in its native precision (`presets.default_preset`); the toy preset without a GPU."""
    from .presets import default_preset

    if info == "detect":
        info = gpu_info()
    return default_preset(info.total_gb if info else None, family, info.capability if info else None)


def gpu_report(info: GpuInfo | None | str = "detect") -> str:
    """Which GPU, how much memory, which precision, and which training presets fit it."""
    from ..sd.precision import auto_precision
    from .presets import presets_that_fit

    if info == "detect":
        info = gpu_info()
    if info is None:
        fits = presets_that_fit(None)
        return ("No CUDA GPU. Training SD 1.5 or SDXL on a CPU is far too slow; on Colab choose "
                "Runtime > Change runtime type > T4 GPU.\nPresets that run here: " + ", ".join(p.name for p in fits))
    auto = auto_precision(info.capability)
    lines = [f"GPU: {info.name}, {info.total_gb:.1f} GiB, compute capability {info.capability[0]}.{info.capability[1]}",
             f"precision: {auto} (mixed_precision='auto'); " + (
                 "fp16 works too" if auto == "bf16" else "no bf16 in hardware on this GPU (emulated, slow): use fp16 presets")]
    fits = presets_that_fit(info.total_gb, info.capability)
    lines.append("presets that fit: " + ", ".join(f"{p.name} (~{p.gpu_gb:g} GiB)" for p in fits if p.gpu_gb))
    return "\n".join(lines)


# --- display -----------------------------------------------------------------------------------------

def _display(obj: Any, display_id: Any = None):
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:
        display = None
    if display is None or get_ipython() is None:
        print(obj if isinstance(obj, str) else repr(obj))
        return None
    if display_id is not None:
        display_id.update(obj)
        return display_id
    return display(obj, display_id=True)


def _html(text: str):
    try:
        from IPython.display import HTML

        return HTML(text)
    except ImportError:
        return text


def show_images(images: Sequence[Any], labels: Sequence[str] | None = None, *, columns: int = 6,
                cell: int = 160, limit: int = 48) -> None:
    """Show up to `limit` images (PIL or paths) as a labelled thumbnail grid (`contact_grid` returns it)."""
    from ..drawing import contact_grid

    images = list(images)[:limit]
    _display(contact_grid(images, labels[:limit] if labels is not None else None, columns=columns, cell=cell))


def show_generated(paths: Sequence[str | Path], *, columns: int = 4, zoom: int = 1) -> None:
    """Generated PNGs labelled by their prompt (read from the A1111 parameters they carry), then the first
    one's parameters in full: what AUTOMATIC1111's PNG Info tab shows for it."""
    from PIL import Image

    from ..formats.png_info import read_png_parameters

    paths = [Path(p) for p in paths]
    if not paths:
        print("no images")
        return
    infos = [read_png_parameters(p) or "" for p in paths]
    labels = [(info.split("\n")[0] or p.name) for p, info in zip(paths, infos)]
    images = []
    for p in paths:
        with Image.open(p) as im:
            images.append(im.convert("RGB").resize((im.width * zoom, im.height * zoom), Image.NEAREST))
    show_images(images, labels, columns=columns, cell=max(160, max(i.width for i in images)))
    print(f"PNG info of {paths[0].name}:\n{infos[0] or '(none)'}")


def show_tensorboard(logdir: str | Path) -> None:
    """TensorBoard inline (Colab and Jupyter: the `%tensorboard` magic), or the command that starts it."""
    try:
        from IPython import get_ipython
    except ImportError:
        get_ipython = None  # noqa: N806
    ip = get_ipython() if get_ipython else None
    if ip is None:
        print(f"TensorBoard: tensorboard --logdir {logdir}")
        return
    ip.run_line_magic("load_ext", "tensorboard")
    ip.run_line_magic("tensorboard", f"--logdir {logdir}")


def show_link(path: str | Path, text: str) -> None:
    """A link to a file the notebook wrote (relative to the notebook, so it also works in a rendered page)."""
    _display(_html(f"<a href='{html.escape(_relative_link(Path(path)))}' target='_blank'>{html.escape(text)}</a> "
                   f"<span style='color:#666'>({html.escape(Path(path).name)})</span>"))


def show_file(path: str | Path, width: int | None = None) -> None:
    """Show an image file (a contact sheet, a plot, a grid), scaled down to `width` if wider."""
    from PIL import Image

    image = Image.open(path)
    if width and image.width > width:
        image = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
    _display(image)


def use_your_lora(path: str | Path, *, trigger: str = "", weight: float = 0.8) -> str:
    """How to use a LoRA file in AUTOMATIC1111, ComfyUI and diffusers, as Markdown with its real name, trigger
    word, clip skip and base-model family (read from the file's sd-scripts metadata)."""
    from ..files import safetensors_header

    path = Path(path)
    _, meta = safetensors_header(path, "LoRA file")
    version = meta.get("ss_base_model_version", "")
    family = "SDXL" if version.startswith("sdxl") else "SD 2.x" if version.startswith("sd_v2") else "SD 1.x"
    examples = {"SDXL": "SDXL 1.0 or an SDXL fine-tune (Pony, Juggernaut XL)",
                "SD 2.x": "SD 2.1 or a fine-tune of it",
                "SD 1.x": "SD 1.5 or an SD 1.5 fine-tune (Realistic Vision, DreamShaper, Anything)"}[family]
    clip_skip = meta.get("ss_clip_skip") if meta.get("ss_clip_skip") not in (None, "None") else "1"
    name, word = path.stem, f"{trigger} " if trigger else ""
    calls = f" (the trigger word `{trigger}` calls the concept)" if trigger else ""
    subject = f"`{trigger}`" if trigger else "your concept"
    base = Path(meta.get("ss_sd_model_name", "") or ".")
    toy = base.name == "base" and meta.get("modelspec.resolution") == "32x32"  # the shipped toy model
    fits = ("the package's toy model only (a demonstration: its layers are smaller than SD 1.5's). A LoRA "
            f"trained on a real {family} base is used as below" if toy else f"{examples}. A LoRA for one family "
            "does not load into another (an SD 1.5 LoRA on SDXL gives errors or no effect)")
    return f"""### Use your LoRA: `{path.name}`
It was trained on an **{family}** base: use it with {fits}.

- **AUTOMATIC1111 / Forge**: copy `{path.name}` into `stable-diffusion-webui/models/Lora/`, then write
  `{word}<lora:{name}:{weight:g}>` in the prompt{calls}. It was trained with clip skip {clip_skip}: set the same
  under Settings > Stable Diffusion > Clip skip.
- **ComfyUI**: copy it into `ComfyUI/models/loras/`, add a *LoraLoader* node between the checkpoint loader
  and the sampler, choose `{path.name}`, strength_model and strength_clip {weight:g}, and put {subject} in
  the prompt.
- **diffusers**: `pipe.load_lora_weights("{path}", adapter_name="{name}")`, then
  `pipe.set_adapters(["{name}"], adapter_weights=[{weight:g}])`.
- Weights from 0.6 to 1.0 usually work: lower it if images look overcooked, and compare weights with the grids
  of `04_inference`."""


def show_markdown(text: str):
    try:
        from IPython.display import Markdown

        _display(Markdown(text))
    except ImportError:
        print(text)


def download(paths: Iterable[str | Path]) -> str | None:
    """On Colab a button per file that downloads it to your computer; elsewhere a link per file (the
    links' HTML is returned for scripts; notebooks show it)."""
    paths = [Path(p) for p in paths]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError("nothing to download at: " + ", ".join(missing))
    if in_colab():
        import ipywidgets as W
        from google.colab import files  # type: ignore[import-not-found]

        buttons = []
        for p in paths:
            b = W.Button(description=f"download {p.name}", icon="download", layout=W.Layout(width="auto"))
            b.on_click(lambda _b, p=p: files.download(str(p)))
            buttons.append(b)
        _display(W.VBox(buttons))
        return None
    links = "<br>".join(f"<a href='{html.escape(_relative_link(p))}' download>{html.escape(p.name)}</a> "
                        f"<span style='color:#666'>({p.stat().st_size / 2**20:.2f} MiB, {html.escape(str(p))})</span>"
                        for p in paths)
    _display(_html(links))
    return links


def _relative_link(path: Path) -> str:
    """A link Jupyter resolves: relative to notebooks/ (where the notebook's page is), not the kernel's cwd."""
    try:
        return os.path.relpath(path.resolve(), repo_root() / "notebooks")
    except ValueError:
        return str(path)


# --- the live training monitor ---------------------------------------------------------------------

def _fmt_seconds(s: float) -> str:
    s = max(0, int(round(s)))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h {m:02d}m" if h else f"{m}m {sec:02d}s" if m else f"{sec}s"


class TrainMonitor:
    """`on_event` callback for `helpers.train.loop.train`: a live loss curve, the latest samples, steps done,
    time remaining and peak GPU memory, redrawn at most every `every_s` seconds (and at the end)."""

    def __init__(self, every_s: float = 2.0, smoothing: int = 10):
        self.every_s = every_s
        self.smoothing = smoothing
        self.records: list[dict[str, Any]] = []
        self.samples: list[Path] = []
        self.saved: list[Path] = []
        self.max_steps = 0
        self.start_step = 0
        self.t0 = time.perf_counter()
        self._last_draw = 0.0
        self._status = self._plot = self._images = None

    # what train() calls
    def __call__(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "start":
            self.max_steps, self.start_step = data["max_steps"], data["start_step"]
            self.t0 = time.perf_counter()
            self._status = _display(_html(self.status_html()))
        elif kind == "log":
            self.records.append(dict(data))
            if time.perf_counter() - self._last_draw >= self.every_s or data.get("step") == self.max_steps:
                self.draw()
        elif kind == "sample":
            self.samples = [Path(p) for p in data["paths"]]
            labels = [f"step {data['step']}: {p.stem}" for p in self.samples]
            from ..drawing import contact_grid

            grid = contact_grid(self.samples, labels, columns=min(4, len(self.samples)), cell=192)
            self._images = _display(grid, self._images)
        elif kind == "save":
            self.saved += [Path(p) for p in data["paths"]]
        elif kind == "end":
            self.draw()

    @property
    def step(self) -> int:
        steps = [r["step"] for r in self.records if "step" in r]
        return max(steps) if steps else self.start_step

    def seconds_left(self) -> float | None:
        done = self.step - self.start_step
        if done <= 0 or not self.max_steps:
            return None
        return (time.perf_counter() - self.t0) / done * (self.max_steps - self.step)

    def peak_memory_gb(self) -> float | None:
        peaks = [r["peak_mem_gb"] for r in self.records if r.get("peak_mem_gb") is not None]
        if peaks:
            return max(peaks)
        try:
            import torch

            if torch.cuda.is_available():
                return torch.cuda.max_memory_allocated() / 2**30
        except ImportError:
            pass
        return None

    def status_html(self) -> str:
        losses = [r["loss"] for r in self.records if r.get("loss") is not None]
        parts = [f"step <b>{self.step}</b> / {self.max_steps or '?'}"]
        if losses:
            parts.append(f"loss {losses[-1]:.4f}")
        left = self.seconds_left()
        if self.max_steps and self.step >= self.max_steps:
            parts.append(f"finished in {_fmt_seconds(time.perf_counter() - self.t0)}")
        else:
            parts.append(f"elapsed {_fmt_seconds(time.perf_counter() - self.t0)}")
            if left is not None:
                parts.append(f"about <b>{_fmt_seconds(left)}</b> left")
        peak = self.peak_memory_gb()
        parts.append(f"peak GPU memory {peak:.2f} GiB" if peak is not None else "no GPU")
        return " &middot; ".join(parts)

    def figure_png(self) -> bytes:
        """The loss curve (raw and smoothed) and the learning rate, as PNG bytes."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        rows = [r for r in self.records if r.get("loss") is not None]
        steps = [r["step"] for r in rows]
        loss = [r["loss"] for r in rows]
        fig, ax = plt.subplots(1, 2, figsize=(9, 3), dpi=80)
        ax[0].plot(steps, loss, color="#9ab", lw=1, label="loss")
        k = max(1, min(self.smoothing, len(loss) // 3 or 1))
        if len(loss) >= 2 * k and k > 1:
            smooth = [sum(loss[i - k + 1:i + 1]) / k for i in range(k - 1, len(loss))]
            ax[0].plot(steps[k - 1:], smooth, color="#d33", lw=2, label=f"mean of {k}")
        val = [(r["step"], r["val_loss"]) for r in self.records if r.get("val_loss") is not None]
        if val:
            ax[0].plot(*zip(*val), "o-", color="#273", label="validation (fixed noise)")
            best = min(val, key=lambda sv: sv[1])
            ax[0].plot(*best, "*", color="#e80", ms=14, label=f"lowest: step {best[0]}")
        ax[0].set_xlabel("step")
        ax[0].set_title("loss")
        ax[0].legend(fontsize=8)
        ax[1].plot(steps, [r.get("lr") for r in rows], color="#36c")
        ax[1].set_xlabel("step")
        ax[1].set_title("learning rate")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        return buf.getvalue()

    def draw(self) -> None:
        self._last_draw = time.perf_counter()
        self._status = _display(_html(self.status_html()), self._status)
        if any(r.get("loss") is not None for r in self.records):
            try:
                from IPython.display import Image as IPImage

                figure = IPImage(data=self.figure_png(), format="png")
            except ImportError:
                return
            self._plot = _display(figure, self._plot)
