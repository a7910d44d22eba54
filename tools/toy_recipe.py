"""Try a change to the toy recipe: train the demo's LoRA with some settings changed, then score it as the demo
does (violet five-petal share by pixels, the judge's concept rate, the world's shape and colour without the
trigger), with the share of samples per lobe count so a shape failure shows what it is.

    python tools/toy_recipe.py                                          # the toy preset as it is
    python tools/toy_recipe.py --set network=locon conv_dim=16          # TrainConfig fields, as TOML values
    python tools/toy_recipe.py --set method=dreambooth learning_rate=2e-4 save_format=diffusers
    python tools/toy_recipe.py --images 72 --samples 64 --cfg 3         # concept images (the demo: 48); sampling
    python tools/toy_recipe.py --lora run/toy_concept.safetensors --cfg 3 5   # score a trained file only

Each result is printed as one JSON line and appended to --log. 32 samples give about +-8 points of binomial
noise on a rate near 65%; decide between recipes at 64 or more.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import tomllib
from collections import Counter
from dataclasses import fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout


def parse_set(pairs: list[str]) -> dict:
    """`key=value` pairs, values read as TOML (numbers, booleans, quoted or bare strings)."""
    out = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set takes key=value, got {pair!r}")
        try:
            out[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = raw
    return out


def score(model_dir: str, lora: Path | None, samples: int, cfgs: list[float]) -> list[dict]:
    """The demo's measures of one trained result at each CFG scale (weight 1), with the lobe counts and the mean
    object size of the samples with the trigger."""
    from helpers.generate.inference import load_loras
    from helpers.sd.models import load_base
    from helpers.toy.demo import score_samples
    from helpers.toy.judge import load_judge
    from helpers.toy.looks import look

    base = load_base(model_dir)
    if lora is not None:
        (adapter,) = load_loras(base.pipe, [(lora, 1.0)])
        base.pipe.set_adapters([adapter], adapter_weights=[1.0])
    base.pipe.set_progress_bar_config(disable=True)
    judge = load_judge()
    rows = []
    for cfg in cfgs:
        scores, images = score_samples(base.pipe, judge, samples, cfg_scale=cfg)
        looks = [look(im) for im in images]
        rows.append({"cfg": cfg, "samples": samples, "violet_five_petal": scores["concept_look_rate"],
                     "violet_five_petal_first32": sum(x.is_concept for x in looks[:32]) / min(32, samples),
                     "judge_concept": scores["concept_rate"],
                     "world_shape_and_colour": scores["world_shape_and_colour_acc"],
                     "lobes": {str(k): n for k, n in sorted(Counter(x.lobes for x in looks).items())},
                     "object_share": round(sum(x.object_share for x in looks) / samples, 3)})
    return rows


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--set", nargs="*", default=[], help="TrainConfig fields to change, key=value")
    p.add_argument("--images", type=int, help="concept images (default: the demo's, world.CONCEPT_IMAGES)")
    p.add_argument("--reg", type=int, help="prior (regularization) images (default: the demo's, demo.REG_IMAGES)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=32, help="samples per measure (the demo: 32)")
    p.add_argument("--cfg", type=float, nargs="*", help="CFG scales to score at (default: the demo's)")
    p.add_argument("--lora", type=Path, help="score this trained LoRA file instead of training")
    p.add_argument("--work", type=Path, default=Path("outputs/toy_recipe"))
    p.add_argument("--log", type=Path, default=Path("outputs/toy_recipe/results.jsonl"))
    args = p.parse_args(argv)

    from helpers.config import TrainConfig
    from helpers.toy import world
    from helpers.toy.demo import EVAL_CFG, REG_IMAGES, demo_config, write_reg_images
    from helpers.toy.pretrain import SHIPPED_DIR

    changes = parse_set(args.set)
    unknown = sorted(set(changes) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise SystemExit(f"not TrainConfig fields: {', '.join(unknown)} (python -m helpers train --help lists them)")
    cfgs = args.cfg or [EVAL_CFG]
    images = world.CONCEPT_IMAGES if args.images is None else args.images
    reg = REG_IMAGES if args.reg is None else args.reg
    record: dict = {"set": changes, "images": images, "reg": reg, "seed": args.seed}
    if args.lora:
        rows = score(str(SHIPPED_DIR), args.lora, args.samples, cfgs)
    else:
        from helpers.train.loop import train

        shutil.rmtree(args.work, ignore_errors=True)
        world.write_concept_dataset(args.work / "dataset", n=images, seed=1234 + args.seed)
        write_reg_images(args.work / "reg", n=reg, seed=4321 + args.seed)
        cfg = demo_config(args.work, None, args.seed).replace(**changes)   # validated, as a config file is
        t0 = time.perf_counter()
        result = train(cfg, progress=False)
        record.update(train_seconds=round(time.perf_counter() - t0, 1), steps=result.steps)
        full = cfg.method == "dreambooth"   # a whole model: score it as the base, no LoRA
        trained = result.ema_path or result.lora_path   # the EMA weights when ema_decay kept them
        rows = score(str(trained) if full else str(SHIPPED_DIR), None if full else trained, args.samples, cfgs)
    out = [dict(record, **row) for row in rows]
    args.log.parent.mkdir(parents=True, exist_ok=True)
    with args.log.open("a", encoding="utf-8") as f:
        for row in out:
            print(json.dumps(row), flush=True)
            f.write(json.dumps(row) + "\n")
    return out


if __name__ == "__main__":
    main()
