"""The evaluation protocol on the toy world: toy prompt groups, the toy judge as an extra scorer, and an
EvalConfig for the shipped toy model and concept LoRA (what 05_eval runs in toy mode and CI checks)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from ..evaluate.protocol import run_protocol
from ..evaluate.report import ProtocolResult
from . import world

TOY_LORA = Path(__file__).resolve().parents[2] / "lora_files" / "toy_concept.safetensors"


def toy_prompts(n: int = 4) -> dict[str, list[str]]:
    """The three prompt groups on the toy world, each prompt once: the concept on its backgrounds (at most
    three), recoloured (new contexts), and ordinary world scenes (the prior)."""
    from . import world
    from .demo import trigger_prompts, world_prompts

    colours, bgs = list(world.COLOURS), list(world.BACKGROUNDS)
    context = [f"a {colours[i % len(colours)]} {world.TRIGGER} {world.CONCEPT_SHAPE} on a {bgs[(i + 1) % len(bgs)]} "
               "background" for i in range(n)]
    # every prompt once: the concept has three natural prompts (one per background), the prior n distinct scenes
    natural = list(dict.fromkeys(trigger_prompts(n)))
    prior = list(dict.fromkeys(world_prompts(4 * n)))[:n]
    return {"natural": natural, "new_context": list(dict.fromkeys(context)), "prior": prior}


def toy_judge_scorer(judge_path: str | Path | None = None) -> Callable[[list[Image.Image], list[str], str], dict]:
    """An extra_scorer from the toy judge: concept rate and shape/colour/background accuracy per group."""
    from .judge import DEFAULT_PATH, load_judge, score

    judge = load_judge(judge_path or DEFAULT_PATH)
    keys = ("concept_rate", "shape_acc", "colour_acc", "shape_and_colour_acc", "background_acc")

    def toy_judge(images: list[Image.Image], prompts: list[str], group: str) -> dict[str, float | None]:
        s = score(judge, images, prompts)
        out = {f"judge_{k}": s[k] for k in keys}
        # violet five-petal flowers by their pixels; a new context asks for other colours, so not there
        out["looks_concept_rate"] = s["concept_look_rate"] if group != "new_context" else None
        return out

    return toy_judge


def run_toy_protocol(out_dir: str | Path = "outputs/toy_eval", loras: Sequence[str] | None = None,
                     weights: Sequence[float] = (0.5, 1.0), *, n_prompts: int = 4, seeds: int | Sequence[int] = 4,
                     steps: int = 25, cfg_scale: float = 5.0, sampler: str = "DDIM",
                     n_reference: int = world.CONCEPT_IMAGES,
                     clip_model: Any = None, dino_model: Any = None, fid_kid: bool = False,
                     **kwargs: Any) -> ProtocolResult:
    """The protocol on the toy world (`toy_eval_config`): toy base model, the shipped concept LoRA, toy
    prompts, the concept's training images as references and the toy judge as extra scorer. CLIP/DINO/FID
    are off by default (32x32 shapes; pass tiny or real metric models to turn them on)."""
    import dataclasses

    from ..config import EvalConfig

    settings = {k: kwargs.pop(k) for k in list(kwargs) if k in {f.name for f in dataclasses.fields(EvalConfig)}}
    live = {}  # a loaded metric model is used as it is; an id, a folder or None goes into the config
    for key, value in (("clip", clip_model), ("dino", dino_model)):
        if value is None or isinstance(value, (str, Path)):
            settings[f"{key}_model"] = None if value is None else str(value)
        else:
            live[key] = value
    cfg = toy_eval_config(loras, out_dir, n_prompts=n_prompts, n_reference=n_reference,
                          weights=[float(w) for w in weights], steps=steps, cfg_scale=cfg_scale, sampler=sampler,
                          fid_kid=fid_kid, **settings)
    kwargs.setdefault("extra_scorer", toy_judge_scorer())
    return run_protocol(cfg, seeds=seeds, **live, **kwargs)


def toy_eval_config(loras: Sequence[str] | None = None, out_dir: str | Path = "outputs/toy_eval", *,
                    reference_dir: str | Path | None = None, n_prompts: int = 4,
                    n_reference: int = world.CONCEPT_IMAGES,
                    **changes: Any):
    """An EvalConfig for the toy world (what 05_eval uses in toy mode): the toy base model, its prompt
    groups, the concept's images as references; CLIP/DINO/FID off (32x32 shapes; the toy judge scores
    instead, pass `extra_scorer=toy_judge_scorer()`)."""
    from ..config import EvalConfig
    from . import world
    from .pretrain import SHIPPED_DIR

    prompts = toy_prompts(n_prompts)
    if reference_dir is None:  # the demo's training images (seed 1234): what the LoRA learned
        reference_dir = world.write_concept_dataset(Path(out_dir) / "reference", n=n_reference, seed=1234)
    values = dict(model=str(SHIPPED_DIR), loras=[str(p) for p in (loras if loras is not None else [TOY_LORA])],
                  weights=[0.5, 1.0], prompts=prompts["natural"], context_prompts=prompts["new_context"],
                  prior_prompts=prompts["prior"], trigger=world.TRIGGER, reference_dir=str(reference_dir),
                  steps=25, sampler="DDIM", cfg_scale=5.0, clip_model=None, dino_model=None, fid_kid=False,
                  out_dir=str(out_dir))
    values.update(changes)
    return EvalConfig(**values)
