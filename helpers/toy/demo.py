"""The offline demo (`python -m helpers demo`): teach the toy base model a concept it has never seen.

On the shipped toy base (an SD 1.5-architecture model pretrained on a world of coloured shapes)
and the held-out concept (48 images of a violet five-petal flower, "a sks flower on a ... background"),
it trains a LoRA with the project's trainer, on CPU, then:
- writes `lora_files/toy_concept.safetensors` (kohya layout, with metadata) and its config TOML,
- writes `demo_images/toy_concept_grid.png`: prompts with and without the trigger, at LoRA weights 0 / 0.5 / 1
  (the trigger rows at weights 0 and 1: samples of the measurement below),
- measures samples and prints: how many are violet five-petal flowers by their pixels (helpers.toy.looks) and
  the toy judge's concept rate, with the trigger (base model vs LoRA), and the base-world accuracy without it
  (is the prior kept?), also saved as `demo_images/toy_concept_scores.json`.

The recipe is the toy preset (helpers.notebook.presets), the one 03_train_lora uses in toy mode: 48 concept
images and 16 ordinary world images as the prior set, rank 16 on every UNet layer, 400 steps of batch 32 with
min-SNR loss weighting (gamma 5) and LoRA+ (the B matrices at twice the learning rate), a tenth of the captions
dropped. Without caption dropout the LoRA's unconditional prediction knows no flower, CFG
pushes each sample away from it, and the flowers come out too large, with a sixth petal (object share 0.35 of the
frame at CFG 5 against 0.21 in the training images).
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..drawing import GRID_LEFT, GRID_PAD, GRID_TOP, GRID_ZOOM, labelled_grid  # noqa: F401 (the demo grid's layout)
from . import world

EVAL_SAMPLER, EVAL_STEPS, EVAL_CFG = "DDIM", 25, 5.0


@dataclass
class DemoResult:
    lora_path: Path
    grid_path: Path
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    train_seconds: float = 0.0


def demo_config(work: Path, steps: int | None = None, seed: int = 0):
    """The demo's training settings: the toy preset (the one toy recipe, also 03_train_lora's in toy mode)
    on the demo's folders."""
    from ..config import TrainConfig
    from ..notebook.presets import toy_preset_values

    values = toy_preset_values()
    if steps:
        values["max_train_steps"] = steps
    try:   # run from a checkout (make demo): the saved settings name the model as the checkout does
        values["pretrained_model"] = Path(values["pretrained_model"]).relative_to(Path.cwd()).as_posix()
    except ValueError:
        pass
    return TrainConfig(**values, train_data_dir=str(work / "dataset"), reg_data_dir=str(work / "reg"), seed=seed,
                       output_dir=str(work / "run"), output_name="toy_concept")


REG_IMAGES = 16   # the prior set beside the 48 concept images: a quarter of the samples, two full batches of 32


def write_reg_images(folder: Path, n: int = REG_IMAGES, seed: int = 4321) -> Path:
    """Ordinary world images with their true captions: the regularization (prior) set of the toy recipe."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (image, scene) in enumerate(world.sample_world(n, seed)):
        image.save(folder / f"world_{i:03d}.png")
        (folder / f"world_{i:03d}.txt").write_text(scene.caption + "\n", encoding="utf-8")
    return folder


def trigger_prompts(n: int) -> list[str]:
    """The concept on every background, cycled to n prompts."""
    bgs = list(world.BACKGROUNDS)
    return [f"a {world.TRIGGER} {world.CONCEPT_SHAPE} on a {bgs[i % len(bgs)]} background" for i in range(n)]


def world_prompts(n: int, seed: int = 99) -> list[str]:
    """Ordinary base-world prompts (no trigger), balanced over shapes."""
    rng = random.Random(seed)
    return [world.random_scene(rng, shape=world.SHAPES[i % len(world.SHAPES)]).caption for i in range(n)]


def score_samples(pipe, judge, n: int = 32, seed: int = 1000, cfg_scale: float = EVAL_CFG
                  ) -> tuple[dict[str, float], list]:
    """Judge n samples with and n without the trigger as the pipe stands (its LoRA weights set): the scores and
    the samples with the trigger."""
    from ..generate.inference import generate
    from .judge import score

    row: dict[str, float] = {}
    for kind, prompts in (("trigger", trigger_prompts(n)), ("world", world_prompts(n))):
        images, _ = generate(pipe, prompts, steps=EVAL_STEPS, cfg_scale=cfg_scale, seed=seed,
                             sampler=EVAL_SAMPLER, family="sd1")
        s = score(judge, images, prompts)
        if kind == "trigger":
            row["concept_rate"] = s["concept_rate"]
            row["concept_look_rate"] = s["concept_look_rate"]
            row["concept_background_acc"] = s["background_acc"]
            with_trigger = images
        else:
            row.update({"world_shape_acc": s["shape_acc"], "world_colour_acc": s["colour_acc"],
                        "world_shape_and_colour_acc": s["shape_and_colour_acc"],
                        "world_concept_rate": s["concept_rate"],
                        "world_concept_look_rate": s["concept_look_rate"]})
    return row, with_trigger


def evaluate_lora(pipe, adapter: str | None, judge, weights: list[float], n: int = 32, seed: int = 1000
                  ) -> dict[str, dict[str, float]]:
    """Judge n samples with and n without the trigger at each LoRA weight."""
    return measure(pipe, adapter, judge, weights, n, seed)[0]


Drawn = dict[tuple[str, int, float], Image.Image]   # (prompt, seed, LoRA weight) -> the sample drawn


def measure(pipe, adapter: str | None, judge, weights: list[float], n: int = 32, seed: int = 1000
            ) -> tuple[dict[str, dict[str, float]], Drawn]:
    """evaluate_lora's scores, with the samples drawn with the trigger (the trigger prompt i at seed seed + i),
    so a grid can show the measured samples instead of drawing them again."""
    from ..generate.inference import set_lora_weights

    scores: dict[str, dict[str, float]] = {}
    drawn: Drawn = {}
    prompts = trigger_prompts(n)
    for w in weights:
        if adapter:
            set_lora_weights(pipe, [adapter], [w])
        scores[f"{w:g}"], images = score_samples(pipe, judge, n, seed)
        drawn.update({(p, seed + i, w): im for i, (p, im) in enumerate(zip(prompts, images))})
    return scores, drawn


def grid_seeds(prompts: list[str], drawn: Drawn, images: int = 4, seed: int = 7) -> list[list[int]]:
    """Each grid prompt's `images` seeds: the seeds it was measured at where it was (the grid then shows measured
    samples), topped up with seed, seed + 1, ... ; the same seeds at every weight, so a row shows the weight's
    effect on the same starting noise."""
    out = []
    for p in prompts:
        measured = sorted({s for q, s, _ in drawn if q == p})[:images]
        out.append(measured + [seed + i for i in range(images - len(measured))])
    return out


def draw_grid(pipe, adapter: str, prompts: list[str], weights: list[float], seeds: list[list[int]],
              drawn: Drawn | None = None) -> list[list[list]]:
    """The demo grid's cells [prompt][weight]: each prompt's samples at `seeds[prompt]` at each LoRA weight, taken
    from `drawn` where that sample is there, the rest of one weight drawn in one batch."""
    from ..generate.inference import generate, set_lora_weights

    drawn = dict(drawn or {})
    for w in weights:
        missing = [(p, s) for p, ss in zip(prompts, seeds) for s in ss if (p, s, w) not in drawn]
        if not missing:
            continue
        set_lora_weights(pipe, [adapter], [w])
        batch, _ = generate(pipe, [p for p, _ in missing], steps=EVAL_STEPS, cfg_scale=EVAL_CFG,
                            seeds=[s for _, s in missing], sampler=EVAL_SAMPLER, family="sd1")
        drawn.update({(p, s, w): im for (p, s), im in zip(missing, batch)})
    return [[[drawn[(p, s, w)] for s in ss] for w in weights] for p, ss in zip(prompts, seeds)]


def run_demo(steps: int | None = None, out_root: Path = Path("."), samples: int = 32, seed: int = 0,
             progress: bool = True, grid_images: int = 4) -> DemoResult:
    """Train the toy concept LoRA, write its file, grid (`grid_images` seeds per cell) and scores, print the
    table."""
    import time

    from ..generate.inference import load_loras
    from ..sd.models import load_base
    from .judge import load_judge
    from .pretrain import SHIPPED_DIR
    from ..train.loop import train

    if not (SHIPPED_DIR / "model_index.json").exists():
        raise FileNotFoundError(f"the toy base model is missing at {SHIPPED_DIR}; "
                                "make it with `python -m helpers.toy pretrain`")
    out_root = Path(out_root)
    work = out_root / "outputs" / "toy_demo"
    for sub in ("dataset", "reg", "run"):
        shutil.rmtree(work / sub, ignore_errors=True)
    world.write_concept_dataset(work / "dataset", seed=1234 + seed)
    write_reg_images(work / "reg", seed=4321 + seed)

    cfg = demo_config(work, steps, seed)
    t0 = time.perf_counter()
    result = train(cfg, progress=progress)
    train_seconds = time.perf_counter() - t0

    lora_dir = out_root / "lora_files"
    lora_dir.mkdir(parents=True, exist_ok=True)
    lora_file = lora_dir / "toy_concept.safetensors"
    shutil.copyfile(result.lora_path, lora_file)
    shutil.copyfile(Path(cfg.output_dir) / "toy_concept.toml", lora_dir / "toy_concept.toml")

    base = load_base(str(SHIPPED_DIR))
    (adapter,) = load_loras(base.pipe, [(lora_file, 1.0)])
    base.pipe.set_progress_bar_config(disable=True)
    judge = load_judge()
    scores, drawn = measure(base.pipe, adapter, judge, [0.0, 1.0], n=samples)

    grid_prompts = trigger_prompts(3) + world_prompts(2)
    weights = [0.0, 0.5, 1.0]
    seeds = grid_seeds(grid_prompts, drawn, grid_images)
    cells = draw_grid(base.pipe, adapter, grid_prompts, weights, seeds, drawn)
    grid_path = out_root / "demo_images" / "toy_concept_grid.png"
    grid_path.parent.mkdir(parents=True, exist_ok=True)
    labelled_grid(cells, [f"LoRA weight {w:g}" for w in weights], grid_prompts).save(grid_path)
    (grid_path.parent / "toy_concept_scores.json").write_text(json.dumps(
        {"samples_per_cell": samples, "train_seconds": round(train_seconds, 1), "steps": result.steps,
         "sampler": EVAL_SAMPLER, "sampling_steps": EVAL_STEPS, "cfg": EVAL_CFG, "scores": scores,
         "grid": {"prompts": grid_prompts, "weights": weights, "seeds": seeds}}, indent=2))

    print(f"\nLoRA: {lora_file}  ({result.steps} steps, {train_seconds:.0f} s)\ngrid: {grid_path}\n")
    print(format_table(scores, samples))
    return DemoResult(lora_file, grid_path, scores, train_seconds)


def format_table(scores: dict[str, dict[str, float]], n: int) -> str:
    lines = [f"{n} samples per cell                   base model (weight 0)   LoRA (weight 1)",
             "-" * 74]
    rows = [("violet five-petal flowers, trigger", "concept_look_rate"),
            ("judge: concept rate, with trigger", "concept_rate"),
            ("world shape accuracy, no trigger", "world_shape_acc"),
            ("world colour accuracy, no trigger", "world_colour_acc"),
            ("world shape and colour, no trigger", "world_shape_and_colour_acc")]
    for label, key in rows:
        lines.append(f"{label:<36}{scores['0'][key]:>14.0%}{scores['1'][key]:>18.0%}")
    lines.append("(violet five-petal: measured from the pixels, helpers/toy/looks.py; the rest: the toy judge)")
    return "\n".join(lines)
