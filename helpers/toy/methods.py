"""LoRA, DreamBooth and Textual Inversion on the same toy concept, judged the same way.

`python -m helpers.toy methods` trains each method with the project's trainer on the held-out concept
(the violet five-petal flower), then judges samples of the trained pipeline: the concept rate with the
trigger and the base-world shape-and-colour accuracy without it (is the prior kept?). It writes
`demo_images/toy_methods.json` and `.md`.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from . import world

TI_TOKEN = "<sks>"  # Textual Inversion learns a new word; LoRA and DreamBooth re-purpose the rare "sks"


def method_configs(work: Path, seed: int = 0) -> dict:
    """Settings per method, tuned on the toy world (CPU budget: a few minutes each)."""
    from .demo import demo_config

    lora = demo_config(work, seed=seed)
    # LoRA+ speeds up LoRA's B matrices: the other methods have none; Textual Inversion changes what the text
    # encoder outputs, so they cannot be cached
    whole = lora.replace(loraplus_lr_ratio=None)
    ti = whole.replace(cache_text_encoder_outputs=False)
    return {
        "lora": lora,
        # the whole UNet moves: a lower learning rate than the LoRA's keeps the prior
        "dreambooth": whole.replace(method="dreambooth", learning_rate=5e-4, lr_warmup_steps=20, max_train_steps=600,
                                    output_name="toy_dreambooth", save_precision="float"),
        # "circle" is a word the base model was trained on (the "flower" row never was): a start that means a
        # round shape; tools/ti_reach.py measures how far conditioning alone can move the frozen toy UNet. No
        # caption dropout: a caption without the token teaches the token nothing
        "textual_inversion": ti.replace(method="textual_inversion", train_data_dir=str(work / "dataset_ti"),
                                        reg_data_dir=None, token_string=TI_TOKEN, init_word="circle",
                                        num_vectors_per_token=4, learning_rate=2e-2, max_train_steps=800,
                                        caption_dropout_rate=0.0, output_name="toy_ti"),
        # the same trainer on a concept the base model can draw: a yellow cross named only by the new token
        "textual_inversion_in_world": ti.replace(
            method="textual_inversion", train_data_dir=str(work / "dataset_ti_in_world"), reg_data_dir=None,
            token_string=TI_TOKEN, init_word="circle", num_vectors_per_token=2, learning_rate=2e-2,
            max_train_steps=500, caption_dropout_rate=0.0, output_name="toy_ti_in_world"),
    }


IN_WORLD_SHAPE, IN_WORLD_COLOUR = "cross", "yellow"


def write_in_world_dataset(folder: Path, n: int = 24, seed: int = 7) -> Path:
    """24 yellow crosses on the three backgrounds, captioned "a <sks> on a <background> background"."""
    import random

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    bgs = list(world.BACKGROUNDS)
    for i in range(n):
        scene = world.random_scene(rng, shape=IN_WORLD_SHAPE, colour=IN_WORLD_COLOUR, background=bgs[i % len(bgs)])
        world.render(scene).save(folder / f"c{i:02d}.png")
        (folder / f"c{i:02d}.txt").write_text(f"a {TI_TOKEN} on a {scene.background} background\n", encoding="utf-8")
    return folder


def judge_in_world(pipe, judge, n: int, seed: int = 1000) -> dict[str, float]:
    """How often "a <sks> on a <bg> background" is judged a yellow cross; world accuracy as in judge_pipeline."""
    bgs = list(world.BACKGROUNDS)
    prompts = [f"a {TI_TOKEN} on a {bgs[i % len(bgs)]} background" for i in range(n)]
    truth = [f"a {IN_WORLD_COLOUR} {IN_WORLD_SHAPE} on a {bgs[i % len(bgs)]} background" for i in range(n)]
    return {"concept_rate": _judged(pipe, judge, prompts, truth, seed)["shape_and_colour_acc"],
            **_world_scores(pipe, judge, n, seed)}


def _judged(pipe, judge, prompts: list[str], truth: list[str], seed: int) -> dict:
    """Sample `prompts` as the demo evaluates (its sampler, steps, CFG; seeds seed+i) and score the images
    against what `truth` asks for."""
    from .demo import EVAL_CFG, EVAL_SAMPLER, EVAL_STEPS
    from ..generate.inference import generate
    from .judge import score

    images, _ = generate(pipe, prompts, steps=EVAL_STEPS, cfg_scale=EVAL_CFG, seed=seed, sampler=EVAL_SAMPLER,
                         family="sd1")
    return score(judge, images, truth)


def _world_scores(pipe, judge, n: int, seed: int) -> dict[str, float]:
    """Shape-and-colour accuracy and concept rate on n ordinary world prompts (is the prior kept?)."""
    from .demo import world_prompts

    prompts = world_prompts(n)
    s = _judged(pipe, judge, prompts, prompts, seed)
    return {"world_shape_and_colour_acc": s["shape_and_colour_acc"], "world_concept_rate": s["concept_rate"]}


def judge_pipeline(pipe, judge, trigger: str, n: int, seed: int = 1000, expand=None) -> dict[str, float]:
    """Concept rate for n trigger prompts; shape/colour accuracy for n world prompts (same seeds as the demo)."""
    from .demo import trigger_prompts

    prompts = [p.replace(world.TRIGGER, trigger, 1) for p in trigger_prompts(n)]
    shown = [expand(p) for p in prompts] if expand else prompts
    s = _judged(pipe, judge, shown, trigger_prompts(n), seed)
    return {"concept_rate": s["concept_rate"], "concept_look_rate": s["concept_look_rate"],
            **_world_scores(pipe, judge, n, seed)}


def compare_methods(out_root: Path = Path("."), methods: tuple[str, ...] = ("lora", "dreambooth", "textual_inversion"),
                    samples: int = 32, seed: int = 0, progress: bool = True) -> dict:
    """Train and judge each method; write and return the table."""
    from .demo import write_reg_images
    from ..generate.inference import load_loras
    from ..sd.models import load_base
    from ..train.loop import train
    from .judge import load_judge
    from .pretrain import SHIPPED_DIR

    out_root = Path(out_root)
    work = out_root / "outputs" / "toy_methods"
    shutil.rmtree(work, ignore_errors=True)
    world.write_concept_dataset(work / "dataset", seed=1234 + seed)
    shutil.copytree(work / "dataset", work / "dataset_ti")
    for txt in (work / "dataset_ti").rglob("*.txt"):
        txt.write_text(txt.read_text().replace(world.TRIGGER, TI_TOKEN))
    write_reg_images(work / "reg", seed=4321 + seed)
    write_in_world_dataset(work / "dataset_ti_in_world", seed=7 + seed)
    judge = load_judge()
    configs = method_configs(work, seed)

    base = load_base(str(SHIPPED_DIR))
    base.pipe.set_progress_bar_config(disable=True)
    table = {"base model": {**judge_pipeline(base.pipe, judge, world.TRIGGER, samples), "train_seconds": 0.0}}
    for method in methods:
        cfg = configs[method].replace(output_dir=str(work / method))
        base = load_base(str(SHIPPED_DIR))
        t0 = time.perf_counter()
        result = train(cfg, base=base, progress=progress)
        seconds = round(time.perf_counter() - t0, 1)
        pipe = base.pipe
        pipe.set_progress_bar_config(disable=True)
        if method == "lora":  # judge the saved file on a fresh base, as a user would load it
            pipe = load_base(str(SHIPPED_DIR)).pipe
            pipe.set_progress_bar_config(disable=True)
            load_loras(pipe, [(result.lora_path, 1.0)])
        # diffusers' pipelines write a multi-vector token out as all its tokens themselves (maybe_convert_prompt)
        if method == "textual_inversion_in_world":  # its concept: judged a yellow cross
            row = judge_in_world(pipe, judge, samples)
        else:
            trigger = TI_TOKEN if method == "textual_inversion" else world.TRIGGER
            row = judge_pipeline(pipe, judge, trigger, samples)
        row.update({"train_seconds": seconds, "steps": result.steps})
        table[method] = row
        print(f"{method}: {row}")
    report = {"samples": samples, "seed": seed, "table": table,
              "settings": {m: {k: getattr(configs[m], k) for k in ("method", "learning_rate", "max_train_steps",
                                                                    "train_batch_size", "rank", "token_string",
                                                                    "num_vectors_per_token")}
                           for m in methods}}
    from ..atomic import write_text

    images = out_root / "demo_images"
    write_text(images / "toy_methods.json", json.dumps(report, indent=2) + "\n")
    described = {m: describe_settings(configs[m]) for m in methods}
    page = format_methods_table(table, samples, described)
    write_text(images / "toy_methods.md", page + "\n")
    print(page)
    return report


METHOD_NAMES = {"lora": "LoRA", "dreambooth": "DreamBooth", "textual_inversion": "Textual Inversion",
                "textual_inversion_in_world": "Textual Inversion, a concept the base can draw"}


def describe_settings(cfg) -> str:
    """A method's settings in a table cell: what it trains, learning rate (and LoRA+), loss weighting, steps,
    batch, prior set."""
    if cfg.method == "textual_inversion":
        what = f"{cfg.num_vectors_per_token} vectors from \"{cfg.init_word}\""
    elif cfg.method == "dreambooth":
        what = "whole UNet"
    else:
        what = f"rank {cfg.rank}, {cfg.target}"
    prior = f", prior: {Path(cfg.reg_data_dir).name}/" if cfg.reg_data_dir else ""
    plus = f" (LoRA+ x{cfg.loraplus_lr_ratio:g})" if cfg.loraplus_lr_ratio else ""
    snr = f", min-SNR {cfg.min_snr_gamma:g}" if cfg.min_snr_gamma else ""
    return (f"{what}, lr {cfg.learning_rate:g}{plus}{snr}, {cfg.max_train_steps} steps, batch {cfg.train_batch_size}"
            f"{prior}")


def format_methods_table(table: dict, samples: int, settings: dict | None = None) -> str:
    """The methods page (Markdown): the table, how it was measured, and what it shows, all from the run."""
    settings = settings or {}
    lines = ["# LoRA, DreamBooth and Textual Inversion on the toy concept", "",
             f"Each method trained by the same loop on the {world.CONCEPT_IMAGES} violet five-petal flowers, then "
             f"{samples} samples (DDIM 25 steps, CFG 5, seeds 1000+i) of \"a sks flower on a <background> "
             "background\" (Textual "
             "Inversion: its token) and 32 ordinary scene prompts without it. *Violet five-petal*: the share of "
             "samples that are one by their pixels (`helpers/toy/looks.py`); *judge*: the toy judge's concept "
             "rate" + (" (for the in-world concept: a yellow cross)" if "textual_inversion_in_world" in table else "")
             + "; *prior*: ordinary prompts drawn with the shape and colour they ask for.", "",
             "| method | settings | violet five-petal, with trigger | judge: concept, with trigger "
             "| prior: shape+colour, no trigger | concept without trigger | train time |",
             "|---|---|---|---|---|---|---|"]
    for name, row in table.items():
        look = row.get("concept_look_rate")
        seconds = f"{row['train_seconds']:.0f} s" if row["train_seconds"] else "-"
        lines.append(f"| {METHOD_NAMES.get(name, name)} | {settings.get(name, '-')} | "
                     f"{'-' if look is None else f'{look:.0%}'} | {row['concept_rate']:.0%} | "
                     f"{row['world_shape_and_colour_acc']:.0%} | {row['world_concept_rate']:.0%} | {seconds} |")
    in_world = " (the in-world row)" if "textual_inversion_in_world" in table else ""
    lines += ["", "LoRA and DreamBooth change the UNet, so they can teach a shape the base model never drew. "
              "Textual Inversion only finds a new input word for the frozen model: it reaches concepts the base "
              f"model can already draw{in_world}, and a new one only as far as the text encoder can steer the "
              "UNet (the toy text encoder is 3 layers trained on about 20 words)."]
    return "\n".join(lines)
