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
    return {
        "lora": lora,
        # lr 2e-4 x 400 steps: concept 59%, prior 97%; 5e-4 x 600: concept 94%, prior 94%
        "dreambooth": lora.replace(method="dreambooth", learning_rate=5e-4, lr_warmup_steps=20, max_train_steps=600,
                                   output_name="toy_dreambooth", save_precision="float"),
        # init "flower" (a row the base never trained), lr 1e-2 x 500: concept 0%; init "circle", lr 2e-2 x 800:
        # 3%; 4 vectors lr 3e-3 x 2000 and 8 vectors lr 5e-3 x 2000: 0%. Even 15 free input vectors per
        # background reach only 34% (tools/ti_reach.py): the toy text encoder cannot express the flower
        "textual_inversion": lora.replace(method="textual_inversion", train_data_dir=str(work / "dataset_ti"),
                                          reg_data_dir=None, token_string=TI_TOKEN, init_word="circle",
                                          num_vectors_per_token=4, learning_rate=2e-2, max_train_steps=800,
                                          output_name="toy_ti"),
        # the same trainer on a concept the base model can draw: a yellow cross named only by the new token
        "textual_inversion_in_world": lora.replace(
            method="textual_inversion", train_data_dir=str(work / "dataset_ti_in_world"), reg_data_dir=None,
            token_string=TI_TOKEN, init_word="circle", num_vectors_per_token=2, learning_rate=2e-2,
            max_train_steps=500, output_name="toy_ti_in_world"),
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
    return {"concept_rate": _judged(pipe, judge, shown, trigger_prompts(n), seed)["concept_rate"],
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
    world.write_concept_dataset(work / "dataset", n=24, seed=1234 + seed, repeats=2)
    shutil.copytree(work / "dataset", work / "dataset_ti")
    for txt in (work / "dataset_ti").rglob("*.txt"):
        txt.write_text(txt.read_text().replace(world.TRIGGER, TI_TOKEN))
    write_reg_images(work / "reg", n=24, seed=4321 + seed)
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
    write_text(images / "toy_methods.md", format_methods_table(table, samples) + "\n")
    print(format_methods_table(table, samples))
    return report


def format_methods_table(table: dict, samples: int) -> str:
    lines = [f"| method ({samples} samples each) | concept rate, with trigger | world shape+colour, no trigger "
             f"| concept without trigger | train time |",
             "|---|---|---|---|---|"]
    for name, row in table.items():
        lines.append(f"| {name} | {row['concept_rate']:.0%} | {row['world_shape_and_colour_acc']:.0%} | "
                     f"{row['world_concept_rate']:.0%} | {row['train_seconds']:.0f} s |")
    return "\n".join(lines)
