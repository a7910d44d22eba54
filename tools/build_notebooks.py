"""Write notebooks/01_dataset … 05_eval.ipynb from the cell texts below (no outputs).

The notebooks are generated so the five share one setup cell, one parameters cell and one badge
format; edit the cells here and run `python tools/build_notebooks.py`. tests/test_notebooks.py
checks that the committed notebooks equal what this script writes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
GITHUB_REPO = "sd-lora-helpers/sd-lora-helpers"   # owner/name on GitHub: the Colab badges and the setup cell

SETUP = f'''# Setup. On Colab: fetch the code, install what Colab lacks (its torch is kept) and mount Google Drive
# if USE_DRIVE. Elsewhere nothing is installed (README: `make demo` sets up a venv). Re-running is harmless.
USE_DRIVE = True   # keep the project on Drive: it survives a disconnect, and training can resume from it
import os, subprocess, sys
if "google.colab" in sys.modules and not os.path.isdir("helpers"):
    if not os.path.isdir("sd-lora-helpers"):
        subprocess.run(["git", "clone", "--depth", "1", "https://github.com/{GITHUB_REPO}"], check=True)
    os.chdir("sd-lora-helpers")
if not os.path.isdir("helpers") and os.path.isdir("../helpers"):
    os.chdir("..")  # run from the repository root, so every notebook sees the same relative paths
sys.path.insert(0, os.getcwd())
from helpers.notebook import display as nb
print(nb.setup(drive=USE_DRIVE))'''

PARAMETERS = '''# Parameters. PROJECT names the folder all five notebooks share (on Drive when mounted).
# TOY = True runs everything on the shipped toy model, offline, with a few steps (CI sets HELPERS_TOY=1).
PROJECT = "my_lora"
TOY = nb.toy_mode()
project = nb.project(PROJECT)
print(project.describe())'''


def badge(name: str) -> str:
    url = f"https://colab.research.google.com/github/{GITHUB_REPO}/blob/main/notebooks/{name}.ipynb"
    return f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})"


def header(name: str, title: str, body: str) -> list[tuple[str, str]]:
    return [("md", f"# {title}\n\n{badge(name)}\n\n{body.strip()}"),
            ("code", SETUP),
            ("code:parameters", PARAMETERS)]


NB01 = header("01_dataset", "1 · Your images → a clean training set", """
**What it does.** Copies your images into a prepared training set: every format converted to RGB (EXIF rotation
applied, transparency flattened), broken and tiny files rejected with the reason, images cropped or bucketed by
aspect ratio, exact and near duplicates grouped for you to review. Your originals are never changed.

**What it needs.** A folder (or a .zip) of 15–100 images of one subject or style. Captions (`.txt` beside each
image) are kept if you have them. Runs on CPU; no GPU needed.

**Next:** `02_tagging`.""") + [
    ("md", "## 1. Your images\nPut your images in the project's `images` folder (on Colab: the Files panel, or "
           "upload a .zip to Drive and point `SOURCE` at it)."),
    ("code", '''from pathlib import Path
SOURCE = project.images          # a folder (subfolders are kept) or a .zip of your images
if TOY:  # the toy world's new concept: 48 images of a violet five-petal flower, captions included, and
    from helpers.toy import world   # what real folders hold too: a copy, a re-saved JPEG, a broken file, a thumbnail
    world.write_concept_dataset(SOURCE, n=world.CONCEPT_IMAGES, seed=1234)
    world.write_flawed_files(SOURCE)
files = [p for p in Path(SOURCE).rglob("*") if p.is_file()] if Path(SOURCE).is_dir() else [Path(SOURCE)]
print(f"{len(files)} file(s) (images and captions) in {SOURCE}")'''),
    ("md", "## 2. Settings\nPick the resolution of the model you will train (512 for SD 1.5, 1024 for SDXL) and "
           "how to crop: `bucket` keeps each image's aspect ratio (sd-scripts' buckets), `center` and `subject` "
           "crop to a square (`subject` finds the subject first), `pad` letterboxes."),
    ("code", '''from helpers.notebook import widgets
prepare_form = widgets.prepare_form(preset="Toy (32 px)" if TOY else "SD 1.5 (512)", source=str(SOURCE),
                                    output_dir=str(project.prepared))
prepare_form.show()'''),
    ("md", "## 3. Prepare\nRe-running replaces the prepared set (caption edits made in `02_tagging` included)."),
    ("code", '''from helpers.data.prepare import prepare_from_config
prepare_cfg = prepare_form.save(project.config("prepare"))
report = prepare_from_config(prepare_cfg, overwrite=True)
print(report.summary())'''),
    ("md", "## 4. Look at them\nThe contact sheet shows every prepared image with its size and bucket; the bar "
           "chart shows how many images fall in each aspect-ratio bucket."),
    ("code", '''for sheet in report.contact_sheets:
    nb.show_file(sheet, width=1000)
if report.bucket_plot:
    nb.show_file(report.bucket_plot, width=700)'''),
    ("md", "## 5. Duplicates\nEach group shows the suggested keeper first. Nothing is dropped until you list "
           "names in `DROP` (dropped images move to `_dropped/`; `restore_images` brings them back)."),
    ("code", '''from helpers.data.prepare import drop_images
sheets = sorted((report.output_dir / "_report" / "duplicates").glob("*.png"))
for sheet in sheets:
    nb.show_file(sheet, width=800)
print(f"{len(report.duplicate_groups)} duplicate group(s); suggested drops: {report.suggested_drops()}")
DROP = report.suggested_drops() if TOY else []   # e.g. report.suggested_drops()
if DROP:
    print("dropped:", drop_images(project.prepared, DROP))'''),
    ("md", "## 6. Faces, subject coverage and loss masks\nFor a person, the face should fill a good part of each "
           "crop (at least a quarter; close-ups teach a face best). `prepare` finds frontal faces (offline, on the "
           "CPU), draws their box on the contact sheet, gives the share of the crop each face fills and warns about "
           "small ones; `crop=\"face\"` cuts each bucket around the face with `face_margin` of room. For masked "
           "training (`masked_loss` in `03_train_lora`) it writes a mask per image under `_masks/`: from the "
           "photo's transparency (`masks=\"alpha\"`), from the face (`\"face\"`), or from a text prompt with "
           "CLIPSeg (`\"clipseg\"` with `mask_prompt=\"a person\"`). In toy mode this runs on real photographs "
           "that scikit-image ships: a portrait, a cat, a cup, a rocket, a motorcycle and a cut-out."),
    ("code", '''if TOY:
    from helpers.data.prepare import prepare
    from helpers.toy.photos import write_photos
    write_photos(project.root / "photos")
    photos = prepare(project.root / "photos", project.root / "photos_prepared", resolution=128, min_bucket_reso=64,
                     crop="face", face_margin=0.35, masks="alpha", overwrite=True, progress=False)
else:   # your set; masks after the fact: make_masks(project.prepared, "clipseg", prompt="a person")
    photos = report
print("\\n".join(line for line in photos.summary().splitlines() if "face" in line or "mask" in line))
for sheet in photos.contact_sheets if TOY else []:
    nb.show_file(sheet, width=1000)
if photos.mask_sheet:
    nb.show_file(photos.mask_sheet, width=480)'''),
]

NB02 = header("02_tagging", "2 · Captions, trigger word and tags", """
**What it does.** Captions every prepared image (BLIP or Florence-2 sentences, or WD14 tags), puts your trigger
word first, and lets you clean the tags across the whole set: remove, replace, look at their frequency, and edit
any caption by hand. Every change can be undone.

**What it needs.** The prepared set from `01_dataset`. A GPU makes captioning fast but is not required.

**Next:** `03_train_lora`.""") + [
    ("md", "## 1. Settings\n`wd14` writes booru tags (anime, illustration), `blip` and `florence2` write sentences "
           "(photos), `none` keeps the captions your images came with. The trigger is a rare word that will call "
           "up your concept; it goes first in every caption (train with `keep_tokens=1` if you shuffle tags)."),
    ("code", '''from helpers.notebook import widgets
# the toy captions already read "a sks flower on a ... background": keep them, no trigger to add
tag_form = widgets.tag_form(preset="keep my captions" if TOY else "photos: Florence-2 sentences",
                            trigger="" if TOY else "sks", remove=[] if TOY else ["watermark*", "signature"])
tag_form.show()'''),
    ("md", "## 2. Caption and edit\nEvery save keeps the previous captions: `C.undo(project.prepared)` restores them."),
    ("code", '''from helpers.data import captions as C
from helpers.data.tagging import run_tag_config
tag_cfg = tag_form.save(project.config("tag"))
run = run_tag_config(project.prepared, tag_cfg, note="02_tagging")
if run.captioned is not None:
    print(f"captioned {len(run.captioned)}, skipped {len(run.captioned.skipped)}, failed {len(run.captioned.failed)}")
print("captions unchanged" if run.entry is None else "captions saved (undo: C.undo(project.prepared))")
edited = run.captions'''),
    ("md", "## 3. Tag frequency\nTags on nearly every image get tied to the trigger; rare tags stay promptable. "
           "Sentence captions are counted by word and two-word phrase."),
    ("code", '''plot = C.plot_tag_frequency(edited, project.reports / "tag_frequency.png", top_n=30)
nb.show_file(plot, width=800)
for tag, count in C.tag_frequency(edited)[:15]:
    print(f"{count:4d}  {tag}")'''),
    ("md", "## 4. Edit captions by hand\nType in any box, then press **save captions** (undoable)."),
    ("code", '''editor = widgets.caption_editor(project.prepared)
editor.show()'''),
    ("md", "## 5. Check caption lengths\nThe text encoder reads a fixed number of tokens (SD's CLIP: 77, start and "
           "end included); the trainer cuts longer captions. The limit below is the loaded tokenizer's."),
    ("code", '''from transformers import CLIPTokenizer
from helpers.notebook.presets import SD15_MODEL
if TOY:
    from helpers.toy.pretrain import SHIPPED_DIR as MODEL
else:
    MODEL = SD15_MODEL
tokenizer = CLIPTokenizer.from_pretrained(str(MODEL), subfolder="tokenizer")
too_long = C.check_token_lengths(C.load_captions(project.prepared), tokenizer, limit=tokenizer.model_max_length)
print(f"{len(too_long)} caption(s) longer than {tokenizer.model_max_length} tokens", too_long[:10])
# C.undo(project.prepared)   # restores the captions as they were before the last save'''),
    ("md", "## 6. Captions from a vision-language model\n`joycaption` (JoyCaption Beta One: Llama 3.1 8B with a "
           "SigLIP vision tower) and `qwen2_5_vl` (Qwen2.5-VL 3B or 7B Instruct) describe photos best. The form's "
           "*VLM prompt* group sets what the model is asked (`prompt`; empty: the model's own default) and how the "
           "caption is put together (`caption_template`). Both take `{trigger}`, `{class}`, `{tags}` (WD14 tags, "
           "with `vlm_tags`) and `{length}`; text in `[brackets]` is left out when a field in it is empty. On a T4 "
           "they load 4-bit (about 6 GB for JoyCaption, 3 GB for Qwen2.5-VL 3B) and are freed after captioning, so "
           "training gets the GPU. Images that already have a caption are skipped, so a run cut off by a "
           "disconnect resumes where it stopped. Below: what each photo is asked, and the shape of its caption."),
    ("code", '''from helpers.data.vlm import CaptionTemplate
family = tag_cfg.captioner if tag_cfg.captioner in ("qwen2_5_vl", "joycaption") else "joycaption"
template = CaptionTemplate(prompt=tag_cfg.prompt or None, caption=tag_cfg.caption_template,
                           length=tag_cfg.caption_length)
words = dict(trigger=tag_cfg.trigger or "sks", class_word=tag_cfg.class_word or "woman")
print(f"{family} is asked:", template.prompt_for(family, **words))
print("and writes:", template.caption_for(family, "<its answer>", **words))
photo_files = sorted((project.root / ("photos_prepared" if TOY else "prepared")).glob("*.png"))[:6]
if photo_files:
    nb.show_images(photo_files, [p.name for p in photo_files], columns=6)'''),
]

NB03 = header("03_train_lora", "3 · Train a LoRA", """
**What it does.** Trains a LoRA (or DreamBooth, or Textual Inversion) on your prepared set, with a live loss curve,
sample images as it goes, the time left and the peak GPU memory. The LoRA is written in the kohya layout that
AUTOMATIC1111, ComfyUI and diffusers load, with its settings beside it as TOML.

**What it needs.** The captioned set from `02_tagging` and a GPU: a T4 (free Colab) trains SD 1.5 at 512 and SDXL at
1024 with the T4 presets; an A100/H100 uses the faster presets.

**If Colab cuts you off:** reconnect, run the cells again with `RESUME = True`: training continues from the last
saved state (kept on Drive), and the result is the same run.

**Next:** `04_inference`.""") + [
    ("code", '''print(nb.gpu_report())'''),
    ("md", "## 1. Settings\nStart from the preset for your GPU, then change what you like. The form checks every "
           "value; the settings are saved as TOML, so `python -m helpers train --config` can run them too."),
    ("code", '''from helpers.notebook import widgets
PRESET = "Toy (CPU, offline)" if TOY else nb.preset_for_gpu("sd1")
train_form = widgets.train_form(
    preset=PRESET, train_data_dir=str(project.prepared), output_dir=str(project.outputs / "run"),
    output_name=project.name, save_state_every_n_steps=100, save_every_n_steps=250, sample_every_n_steps=250,
    sample_prompts=["a photo of sks"])
if TOY:  # the toy recipe, as `python -m helpers demo` trains it: prior preservation on ordinary world images
    from helpers.toy.demo import write_reg_images
    steps = nb.toy_steps(train_form.value().max_train_steps)
    train_form.set_value(dict(reg_data_dir=str(write_reg_images(project.root / "reg")), max_train_steps=steps,
                              save_every_n_steps=steps // 2, save_state_every_n_steps=steps // 2,
                              sample_every_n_steps=steps // 2, sample_prompts=["a sks flower on a navy background"],
                              sample_steps=25, sample_cfg=5.0, sample_sampler="DDIM"))
train_form.show()'''),
    ("md", "## 2. Train\nThe curve and the samples update as it runs."),
    ("code", '''RESUME = False   # True after a disconnect: continue from the newest saved state in the output folder
from helpers.train.loop import train
train_cfg = train_form.save(project.config("train"))
if train_cfg.log_with == "tensorboard":   # log_with in the form's Output group: TensorBoard here, inline
    nb.show_tensorboard(train_cfg.tensorboard_dir)
monitor = nb.TrainMonitor()
result = train(train_cfg, on_event=monitor, resume=RESUME, progress=False)   # the monitor shows the progress
print(f"done: {result.steps} steps, final loss {result.final_loss:.4f}; file: {result.lora_path}")'''),
    ("md", "## 3. Keep and download the LoRA\nCopied to the project's `lora_files` with its settings; the "
           "checkpoints saved along the way stay in the run folder (`04_inference` compares them)."),
    ("code", '''import shutil
project.lora_files.mkdir(parents=True, exist_ok=True)
lora_file = project.lora_files / result.lora_path.name
shutil.copyfile(result.lora_path, lora_file)
shutil.copyfile(project.config("train"), project.lora_files / f"{train_cfg.output_name}.toml")
nb.download([lora_file]);'''),
    ("md", "## 4. Use your LoRA\nWhere the file goes in AUTOMATIC1111 and ComfyUI, how to call it, and which base "
           "models it fits."),
    ("code", '''nb.show_markdown(nb.use_your_lora(lora_file, trigger="sks"))'''),
]

NB04 = header("04_inference", "4 · Generate with your LoRA", """
**What it does.** Generates images with the LoRA at the weights you choose, with the samplers by their
AUTOMATIC1111 names (`DPM++ 2M Karras`, `Euler a`, …). Every PNG carries A1111's parameters, so the PNG Info tab
reads it back. Then three grids: prompt × LoRA weight, the trigger-word test, and the checkpoints of the run.

**What it needs.** The LoRA from `03_train_lora` (or any kohya/diffusers LoRA file) and its base model. A GPU.

**Next:** `05_eval`.""") + [
    ("md", "## 1. Settings"),
    ("code", '''from helpers.notebook import widgets
from helpers.config import load_config
train_cfg = load_config(project.config("train"))
LORA = str(project.lora_files / f"{train_cfg.output_name}.safetensors")
TRIGGER = "sks"
if TOY:
    prompts = ["a sks flower on a navy background", "a sks flower on a gray background",
               "a red circle on a black background"]
    look = dict(sampler="DDIM", steps=25, cfg_scale=5.0, num_images=2)
else:
    prompts = [f"a photo of {TRIGGER}", f"a painting of {TRIGGER} in a garden"]
    look = dict(sampler="DPM++ 2M Karras", steps=25, cfg_scale=7.0, num_images=2, negative_prompt="lowres, blurry")
gen_form = widgets.generate_form(model=train_cfg.pretrained_model, model_config=train_cfg.model_config,
                                 loras=[f"{LORA}:1.0"], prompts=prompts, out_dir=str(project.samples), **look)
gen_form.show()'''),
    ("md", "## 2. Generate"),
    ("code", '''from helpers.generate.inference import generate_to_folder
from helpers.sd.models import load_base
gen_cfg = gen_form.save(project.config("generate"))
base = load_base(gen_cfg.model, config=gen_cfg.model_config)
paths = generate_to_folder(base, gen_cfg)
nb.show_generated(paths, columns=4, zoom=4 if TOY else 1)   # labelled by prompt; the first one's PNG info below'''),
    ("md", "## 3. Prompt × LoRA weight\nWeight 0 is the base model; too high a weight overcooks the concept."),
    ("code", '''from helpers.generate.grids import (grid_prompt_x_checkpoint, grid_prompt_x_weight, grid_trigger_test,
                                    save_grid)
look = dict(steps=gen_cfg.steps, sampler=gen_cfg.sampler, cfg_scale=gen_cfg.cfg_scale,
            negative_prompt=gen_cfg.negative_prompt, seed=gen_cfg.seed, layout={"zoom": 4 if TOY else 1})
grid = grid_prompt_x_weight(base.pipe, gen_cfg.prompts, LORA, gen_cfg.grid_weights, **look)
save_grid(grid, project.samples / "grid_prompt_x_weight.png")
nb.show_file(project.samples / "grid_prompt_x_weight.png", width=900)'''),
    ("md", "## 4. The trigger-word test\nThe concept should appear with the trigger (first row) and not without "
           "it (second row), nor in the base model (third row)."),
    ("code", '''with_trigger = [p for p in gen_cfg.prompts if TRIGGER in p.split()]
grid = grid_trigger_test(base.pipe, with_trigger, TRIGGER, LORA, 1.0, **look)
save_grid(grid, project.samples / "grid_trigger_test.png")
nb.show_file(project.samples / "grid_trigger_test.png", width=900)'''),
    ("md", "## 5. Checkpoints of the run\nThe files saved every `save_every_n_steps`: pick the step where the "
           "concept is learned but not yet overcooked."),
    ("code", '''from pathlib import Path
run_dir = Path(train_cfg.output_dir)
checkpoints = sorted(run_dir.glob(f"{train_cfg.output_name}-step*.safetensors")) + [Path(LORA)]
grid = grid_prompt_x_checkpoint(base.pipe, with_trigger, checkpoints, 1.0, **look)
save_grid(grid, project.samples / "grid_prompt_x_checkpoint.png")
nb.show_file(project.samples / "grid_prompt_x_checkpoint.png", width=900)'''),
    ("md", "## 6. The LoRA toolbox\nWhat is in the file (family, network type, rank and alpha per block, the "
           "training settings, tags, hashes); a smaller copy by SVD (`resize`, with the share of each module's "
           "norm kept); and the LoRA merged into the base model as one checkpoint file A1111 and ComfyUI load "
           "without the LoRA. The same as `python -m helpers inspect | resize | merge | extract | convert`."),
    ("code", '''from helpers.toolbox.inspect import format_info, inspect_lora
from helpers.toolbox.merge import merge_to_checkpoint
from helpers.toolbox.resize import resize_lora
print(format_info(inspect_lora(LORA)))
small = project.lora_files / f"{Path(LORA).stem}_rank4.safetensors"
report = resize_lora(LORA, small, 4)
kept = sorted(r.fro_retained for r in report)
print(f"\\nresized to rank 4: {small.name}, {small.stat().st_size / 1e3:.0f} kB; Frobenius norm kept per module "
      f"{kept[0]:.1%}-{kept[-1]:.1%} (median {kept[len(kept) // 2]:.1%})")
merged = merge_to_checkpoint(gen_cfg.model, [(LORA, 1.0)], single_file=project.outputs / "merged.safetensors")
print("merged into one checkpoint:", *merged)'''),
]

NB05 = header("05_eval", "5 · Did it work? Metrics and reports", """
**What it does.** Samples the base model and your LoRA (at each weight) on the same prompts and seeds, then
measures: **CLIP-T** (does the image follow the prompt), **CLIP-I** and **DINO** (does it look like your
images), **KID/FID** (distribution distance to your images), and the **trigger-word test** (is the concept tied
to the trigger). It writes a table, plots, grids and an HTML report.

**What it needs.** The LoRA from `03_train_lora`, its base model and your prepared images. A GPU; CLIP, DINO and
the Inception network are downloaded on first use.""") + [
    ("md", "## 1. Settings\n`prompts` show the concept as in your images, `context_prompts` somewhere new, "
           "`prior_prompts` without the concept (is the base model's knowledge kept?)."),
    ("code", '''from helpers.notebook import widgets
from helpers.config import load_config
from helpers.evaluate.protocol import run_protocol
from helpers.toy.eval import toy_eval_config, toy_judge_scorer
train_cfg = load_config(project.config("train"))
LORA = str(project.lora_files / f"{train_cfg.output_name}.safetensors")
if TOY:  # toy prompts, the toy judge instead of CLIP/DINO (32x32 shapes), a few seeds
    quick = dict(num_seeds=2, steps=10) if nb.toy_quick() else dict(num_seeds=4)   # a short run: fewer samples
    start = toy_eval_config([LORA], project.reports / "eval", **quick).to_dict()
else:
    start = dict(model=train_cfg.pretrained_model, model_config=train_cfg.model_config, loras=[LORA],
                 weights=[0.5, 0.75, 1.0], trigger="sks", reference_dir=str(project.prepared),
                 prompts=["a photo of sks"], context_prompts=["a photo of sks on the beach"],
                 prior_prompts=["a photo of a dog"], out_dir=str(project.reports / "eval"))
eval_form = widgets.eval_form(**start)
eval_form.show()'''),
    ("md", "## 2. Run the protocol"),
    ("code", '''eval_cfg = eval_form.save(project.config("eval"))
report = run_protocol(eval_cfg, extra_scorer=toy_judge_scorer() if TOY else None)
nb.show_markdown(report.report_path.read_text().split("\\n## Plots")[0])   # verdict, settings, table
for warning in report.warnings:
    print("note:", warning)'''),
    ("md", "## 3. Plots and grids\nThe HTML report beside them holds everything in one page."),
    ("code", '''for plot in report.plot_paths:
    nb.show_file(plot, width=800)
for grid in report.grid_paths[:3]:
    nb.show_file(grid, width=900)
nb.show_link(report.html_path, "the whole report (HTML)")'''),
    ("md", "## 4. LoRA, DreamBooth and Textual Inversion on the toy concept\nThe three methods trained by the same "
           "loop on the toy world's new concept (measured with `python -m helpers.toy methods`; set "
           "`RUN_METHODS = True` to re-measure, about 20 minutes on a 2-core CPU)."),
    ("code", '''RUN_METHODS = False
from helpers.toy.methods import compare_methods
if RUN_METHODS:
    compare_methods(project.root)
table = (project.root if RUN_METHODS else nb.repo_root()) / "demo_images" / "toy_methods.md"
nb.show_markdown(table.read_text() if table.exists() else f"(no {table}: set RUN_METHODS = True)")'''),
    ("md", "## 5. Use your LoRA\nThe LoRA this report judged, in the tools you generate with."),
    ("code", '''nb.show_markdown(nb.use_your_lora(eval_cfg.loras[0], trigger=eval_cfg.trigger))'''),
]

CPU_NOTEBOOKS = {"01_dataset"}   # needs no GPU: Colab should not ask for one
NOTEBOOKS_CELLS = {"01_dataset": NB01, "02_tagging": NB02, "03_train_lora": NB03, "04_inference": NB04,
                   "05_eval": NB05}


def build(name: str) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                   "language_info": {"name": "python"},
                   "colab": {"provenance": []}}
    if name not in CPU_NOTEBOOKS:   # Colab opens these with a GPU runtime
        nb.metadata["colab"]["gpuType"] = "T4"
        nb.metadata["accelerator"] = "GPU"
    for kind, text in NOTEBOOKS_CELLS[name]:
        if kind == "md":
            cell = nbformat.v4.new_markdown_cell(text)
        else:
            cell = nbformat.v4.new_code_cell(text)
            if kind == "code:parameters":
                cell.metadata["tags"] = ["parameters"]
        nb.cells.append(cell)
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"{name[:2]}-{i:02d}"  # stable ids: rebuilding gives the same file
    return nb


def text_of(name: str) -> str:
    return nbformat.writes(build(name)) + "\n"


def main() -> int:
    NOTEBOOKS.mkdir(exist_ok=True)
    for name in NOTEBOOKS_CELLS:
        path = NOTEBOOKS / f"{name}.ipynb"
        path.write_text(text_of(name), encoding="utf-8")
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
