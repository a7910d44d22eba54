"""The notebook suite: committed without outputs, equal to what tools/build_notebooks.py writes, and every
notebook runs top to bottom on the toy model (HELPERS_TOY=1), headless, offline."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["01_dataset", "02_tagging", "03_train_lora", "04_inference", "05_eval"]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cells(name):
    return json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text())["cells"]


def test_notebooks_are_committed_without_outputs():
    for name in NAMES:
        for cell in _cells(name):
            if cell["cell_type"] == "code":
                assert cell["outputs"] == [] and cell["execution_count"] is None, f"{name}: a cell has outputs"


def test_notebooks_equal_what_the_builder_writes():
    pytest.importorskip("nbformat")
    build = _tool("build_notebooks")
    for name in NAMES:
        assert (ROOT / "notebooks" / f"{name}.ipynb").read_text(encoding="utf-8") == build.text_of(name), \
            f"{name}.ipynb differs from tools/build_notebooks.py: run `python tools/build_notebooks.py`"


def test_each_notebook_opens_with_title_badge_setup_and_parameters():
    for name in NAMES:
        cells = _cells(name)
        title = "".join(cells[0]["source"])
        assert title.startswith("# ") and "colab.research.google.com/assets/colab-badge.svg" in title
        assert f"notebooks/{name}.ipynb" in title and "**What it needs.**" in title
        setup = "".join(cells[1]["source"])
        assert "nb.setup(drive=USE_DRIVE)" in setup
        assert cells[2]["metadata"].get("tags") == ["parameters"] and "nb.toy_mode()" in "".join(cells[2]["source"])
        # thin notebooks: the logic lives in helpers
        for cell in cells:
            if cell["cell_type"] == "code":
                assert len("".join(cell["source"]).splitlines()) <= 16, f"{name}: a code cell is long"


def test_setup_never_replaces_torch(monkeypatch):
    from helpers.notebook import display as nb

    import torch

    assert nb.setup().startswith("not on Colab")
    assert f"torch=={torch.__version__}" in nb.torch_constraints()


def test_project_folders_and_the_env_override(tmp_path, monkeypatch):
    from helpers.notebook import display as nb

    monkeypatch.setenv(nb.PROJECTS_ENV, str(tmp_path / "p"))
    project = nb.project("anything")
    assert project.root == (tmp_path / "p" / "anything").resolve() and project.prepared.is_dir()
    assert project.name == "anything"  # outputs are named after the project, wherever it lives
    assert project.config("train") == project.root / "configs" / "train.toml"
    monkeypatch.delenv(nb.PROJECTS_ENV)
    monkeypatch.chdir(tmp_path)
    assert nb.project("mine").root == (tmp_path / "projects" / "mine").resolve()
    with pytest.raises(ValueError, match="plain folder name"):
        nb.project("../x")


def test_gpu_report_names_the_gpu_and_the_presets_that_fit():
    from helpers.notebook import display as nb

    t4 = nb.GpuInfo("Tesla T4", 14.7, False, (7, 5))
    text = nb.gpu_report(t4)
    assert "Tesla T4, 14.7 GiB" in text and "no bf16" in text
    from helpers.notebook.presets import needs_gb

    assert f"SD 1.5 · T4 (~{needs_gb('SD 1.5 · T4'):g} GiB)" in text and "A100" not in text
    assert f"SDXL · T4 (~{needs_gb('SDXL · T4'):g} GiB)" in text
    assert "No CUDA GPU" in nb.gpu_report(None)


def test_train_monitor_reports_progress_time_left_and_plots(monkeypatch):
    from helpers.notebook import display as nb

    clock = iter([0.0, 0.0, 10.0, 10.0, 20.0, 20.0, 20.0, 20.0, 20.0])
    monkeypatch.setattr(nb.time, "perf_counter", lambda: next(clock, 20.0))
    monitor = nb.TrainMonitor(every_s=0)
    monitor("start", {"max_steps": 100, "start_step": 0})
    monitor("log", {"step": 10, "loss": 0.3, "lr": 1e-4})
    monitor("log", {"step": 20, "loss": 0.2, "lr": 1e-4, "peak_mem_gb": 5.25})
    assert monitor.step == 20 and monitor.peak_memory_gb() == 5.25
    assert monitor.seconds_left() == pytest.approx(80.0)   # 20 s for 20 steps, 80 steps to go
    status = monitor.status_html()
    assert "step <b>20</b> / 100" in status and "1m 20s" in status and "5.25 GiB" in status
    assert monitor.figure_png().startswith(b"\x89PNG")


def test_download_gives_a_link_relative_to_the_notebooks_folder(tmp_path):
    from helpers.notebook import display as nb

    f = tmp_path / "x.safetensors"
    f.write_bytes(b"0" * 1024)
    links = nb.download([f])
    assert "x.safetensors" in links and "download" in links
    with pytest.raises(FileNotFoundError, match="nothing to download"):
        nb.download([tmp_path / "missing.safetensors"])


@pytest.mark.slow
def test_the_five_notebooks_run_top_to_bottom_on_the_toy_model(tmp_path, monkeypatch):
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    from safetensors.torch import load_file

    from helpers.config import EvalConfig, GenerateConfig, TagConfig, TrainConfig, load_config
    from helpers.config import PrepareConfig

    monkeypatch.setenv("HELPERS_TOY_STEPS", "30")   # the toy recipe's steps cut to a handful
    run = _tool("run_notebooks")
    project = tmp_path / "projects" / "my_lora"  # the notebooks' PROJECT
    texts = {}
    for name in NAMES:
        nb = run.execute(name, project.parent)   # raises CellExecutionError naming the cell if one fails
        outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
        assert not [o for o in outputs if o.output_type == "error"]
        texts[name] = "\n".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    # each notebook did its job, and its settings were saved for the next one and the CLI
    # the toy source's copy and re-saved JPEG are found and dropped, its broken file and thumbnail rejected; the
    # perceptual hash also groups two of its flowers with a third (same background, near-identical at 32 px)
    from helpers.toy.world import CONCEPT_IMAGES

    assert f"Prepared {CONCEPT_IMAGES + 2} images" in texts["01_dataset"] and "rejected (2):" in texts["01_dataset"]
    dropped = ("dropped: ['sks_flower_00 (copy).png', 'sks_flower_34.png', 'sks_flower_46.png', "
               "'sks_flower_01_resaved.png']")
    assert dropped in texts["01_dataset"]
    assert len(list((project / "prepared").glob("*.png"))) == CONCEPT_IMAGES - 2
    assert (project / "prepared" / "manifest.json").is_file()
    assert load_config(project / "configs" / "prepare.toml", PrepareConfig).resolution == 32
    assert load_config(project / "configs" / "tag.toml", TagConfig).captioner == "none"
    assert "done: 30 steps" in texts["03_train_lora"]
    lora = load_file(project / "lora_files" / "my_lora.safetensors")
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in lora)
    assert load_config(project / "configs" / "train.toml", TrainConfig).max_train_steps == 30
    assert len(list((project / "samples").glob("000_*.png"))) == 2
    for grid in ("grid_prompt_x_weight", "grid_trigger_test", "grid_prompt_x_checkpoint"):
        assert (project / "samples" / f"{grid}.png").is_file()
    assert load_config(project / "configs" / "generate.toml", GenerateConfig).sampler == "DDIM"
    assert (project / "reports" / "eval" / "report.html").is_file()
    assert load_config(project / "configs" / "eval.toml", EvalConfig).loras == [
        str(project / "lora_files" / "my_lora.safetensors")]


def test_use_your_lora_names_the_file_the_family_the_trigger_and_the_folders(tmp_path):
    import torch
    from safetensors.torch import save_file

    from helpers.notebook import display as nb

    path = tmp_path / "my_style.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata={"ss_base_model_version": "sdxl_base_v1-0",
                                                          "ss_clip_skip": "2",
                                                          "ss_sd_model_name": "sd_xl_base_1.0.safetensors"})
    text = nb.use_your_lora(path, trigger="zkx", weight=0.7)
    assert "**SDXL**" in text and "SD 1.5 LoRA on SDXL" in text
    assert "`zkx <lora:my_style:0.7>`" in text and "clip skip 2" in text
    assert "models/Lora/" in text and "ComfyUI/models/loras/" in text and "LoraLoader" in text
    assert f'pipe.load_lora_weights("{path}", adapter_name="my_style")' in text
    toy = nb.use_your_lora(nb.repo_root() / "lora_files" / "toy_concept.safetensors", trigger="sks")
    assert "**SD 1.x**" in toy and "toy model only" in toy
