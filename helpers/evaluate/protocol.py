"""Evaluate a LoRA the way DreamBooth-style theses do, with one call, and write the evidence.

Metrics: CLIP-T (prompt-image cosine), CLIP-I and DINO (mean pairwise cosine between generated and
training images), KID and FID (feature-distribution distances, InceptionV3 by default). The protocol
(`run_protocol`) samples the concept in its natural setting, in new contexts, prompts without the concept
(is the prior kept?) and the trigger-word test (same prompt and seed without the trigger), for the base model
and every LoRA at every weight, then writes a table (CSV, Markdown), plots, grids and a report.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..atomic import write_text
from ..config import EvalConfig
from ..sd.models import BaseModel
from ..sd.prompts import has_trigger, remove_trigger
from .metrics import (
    FID_MIN_IMAGES,
    ClipModel,
    DinoModel,
    EvaluationError,
    FIDSampleSizeWarning,
    fid_from_features,
    fid_warning_text,
    image_features,
    kid_from_features,
    load_clip,
    load_dino,
    load_images,
    load_inception,
    mean_pairwise_cosine,
    paired_cosine,
)
from .report import ProtocolResult, Variant, write_outputs

# ------------------------------------------------------------------------------------ the protocol


def _variants(loras: Sequence[str], weights: Sequence[float]) -> list[Variant]:
    out = [Variant("base", "base")]
    stems: dict[str, int] = {}
    for path in loras:
        stem = Path(path).stem
        stems[stem] = stems.get(stem, 0) + 1
        name = stem if stems[stem] == 1 else f"{stem}_{stems[stem]}"
        for w in weights:
            if float(w) == 0.0:
                continue   # weight 0 is the base model
            slug = re.sub(r"[^\w.-]+", "_", f"{name}_w{float(w):g}")
            out.append(Variant(f"{name} @ {float(w):g}", slug, str(path), float(w)))
    return out


def _seed_runs(seeds: Sequence[int], batch: int) -> list[tuple[int, int]]:
    """Consecutive seeds as (start, count) runs of at most `batch` (generate uses seed + i for image i)."""
    runs: list[tuple[int, int]] = []
    for s in seeds:
        if runs and runs[-1][0] + runs[-1][1] == s and runs[-1][1] < batch:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((s, 1))
    return runs


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _source_of(m: Any) -> str | None:
    """The id or folder a metric model came from (for the report)."""
    if m is None or isinstance(m, str):
        return m
    return str(getattr(m, "source", type(m).__name__))


def run_protocol(cfg: EvalConfig, *, base: BaseModel | None = None, seeds: int | Sequence[int] | None = None,
                 clip: ClipModel | None = None, dino: DinoModel | None = None, feature_extractor: Callable | None = None,
                 extra_scorer: Callable[[list[Image.Image], list[str], str], dict[str, float | None]] | None = None,
                 device: str = "auto", dtype: str = "auto", thumb: int = 128, progress: bool = True) -> ProtocolResult:
    """Sample the evaluation protocol `cfg` describes for the base model and each LoRA at each weight, score
    it and write the report (see the module docstring), as `train(cfg)` trains what its config says.

    Groups: natural (`cfg.prompts`, with the trigger), new_context, prior (no concept), no_trigger (the
    natural prompts with the trigger removed; same seeds). `cfg.reference_dir` (the training images) is needed
    for CLIP-I, DINO, KID and FID. Live objects replace what the config would load: `base` (a loaded
    BaseModel), `clip`/`dino` (loaded metric models), `feature_extractor` (for KID/FID). `seeds` (a count or
    explicit seeds) replaces `cfg.num_seeds`. extra_scorer(images, prompts, group) returns extra columns
    (the toy judge: `helpers.toy.eval.toy_judge_scorer()`).
    """
    groups = prompt_groups(cfg)
    seeds = cfg.num_seeds if seeds is None else seeds
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list:
        raise EvaluationError("seeds is empty")
    for p in cfg.loras:
        if not Path(p).is_file():
            raise FileNotFoundError(f"LoRA file {p} does not exist")
    if base is None and not cfg.model:
        raise EvaluationError("model is empty: give the base model the LoRAs were trained on")
    dev = _resolve_device(device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # metric models first (on the CPU): a missing or offline model fails before minutes of sampling
    refs = load_images(cfg.reference_dir) if cfg.reference_dir is not None else None
    clip = clip if clip is not None else load_clip(cfg.clip_model) if cfg.clip_model else None
    dino = dino if dino is not None else load_dino(cfg.dino_model) if cfg.dino_model else None
    extractor = None
    if cfg.fid_kid and refs is not None:
        extractor = feature_extractor if feature_extractor is not None else load_inception(cfg.inception_weights)

    variants = _variants(cfg.loras, cfg.weights)
    manifest, manifest_path = _sample(cfg, base, groups, seed_list, variants, out, dev, dtype, progress)

    for m in (clip, dino):
        if m is not None:
            m.to(dev)
    if extractor is not None and isinstance(extractor, torch.nn.Module):
        extractor.to(dev)
    rows, notes = _score(out, manifest, variants, groups, cfg.trigger, refs, clip, dino, extractor, extra_scorer,
                         cfg.kid_subset_size, cfg.kid_subsets, progress)
    for m in (clip, dino):
        if m is not None:
            m.to("cpu")

    settings = {"model": str(base.source) if base is not None and not cfg.model else cfg.model,
                "loras": list(cfg.loras), "weights": list(cfg.weights),
                "seeds": seed_list, "steps": cfg.steps, "sampler": cfg.sampler, "cfg_scale": cfg.cfg_scale,
                "negative_prompt": cfg.negative_prompt, "clip_skip": cfg.clip_skip, "trigger": cfg.trigger,
                "prompts": groups, "reference_images": cfg.reference_dir,
                "n_reference_images": len(refs) if refs is not None else 0,
                "clip_model": _source_of(clip), "dino_model": _source_of(dino),
                "fid_kid_features": None if extractor is None else
                ("InceptionV3 (torch-fidelity weights, torchmetrics)" if feature_extractor is None
                 else type(extractor).__name__),
                "kid_subset_size": cfg.kid_subset_size, "kid_subsets": cfg.kid_subsets, "device": dev,
                "dtype": str(dtype), "extra_scorer": getattr(extra_scorer, "__name__", None) if extra_scorer else None}
    return write_outputs(out, rows, settings, manifest, variants, groups, notes, manifest_path,
                         grid_prompts=cfg.grid_prompts, grid_seeds=cfg.grid_seeds, thumb=thumb)


def prompt_groups(cfg: EvalConfig) -> dict[str, list[str]]:
    """The protocol's prompt groups, checked against the trigger before any model is loaded."""
    natural, context, prior = list(cfg.prompts), list(cfg.context_prompts), list(cfg.prior_prompts)
    if not natural:
        raise EvaluationError("prompts is empty: give at least one prompt of the concept in its usual setting")
    if cfg.trigger:
        missing = [p for p in natural + context if not has_trigger(p, cfg.trigger)]
        if missing:
            raise EvaluationError(f"the trigger {cfg.trigger!r} is missing from concept prompt(s) {missing[:3]}: "
                                  "natural and new-context prompts must contain it")
        leaked = [p for p in prior if has_trigger(p, cfg.trigger)]
        if leaked:
            raise EvaluationError(f"prior prompts must not contain the trigger {cfg.trigger!r}: {leaked[:3]}")
    groups = {"natural": natural}
    if context:
        groups["new_context"] = context
    if prior:
        groups["prior"] = prior
    if cfg.trigger:
        groups["no_trigger"] = [remove_trigger(p, cfg.trigger) for p in natural]
    return groups


def _sample(cfg: EvalConfig, base: BaseModel | None, groups: dict[str, list[str]], seed_list: list[int],
            variants: list[Variant], out: Path, dev: str, dtype: str, progress: bool) -> tuple[list[dict], Path]:
    """Generate and save every (variant, group, prompt, seed) image; returns the manifest and its path."""
    from tqdm.auto import tqdm

    from ..formats.png_info import save_png
    from ..generate.inference import generate, load_loras, quiet_pipeline
    from ..sd.models import detect_family, load_base

    own_model = base is None
    if own_model:
        base = load_base(cfg.model, device=dev, dtype=dtype, config=cfg.model_config)
    pipe = base.pipe
    family = base.family if hasattr(base, "family") else detect_family(pipe)
    adapters: list[str] = []
    if cfg.loras:
        adapters = load_loras(pipe, [(p, 1.0) for p in cfg.loras])
        by_path = dict(zip(cfg.loras, adapters))
        for v in variants:
            v.adapter = by_path.get(v.lora) if v.lora else None
    model_name = Path(str(getattr(base, "source", cfg.model))).name
    manifest: list[dict[str, Any]] = []
    total = len(variants) * sum(len(p) for p in groups.values()) * len(seed_list)
    try:  # one bar for the protocol; a live base gets its own progress settings back
        with quiet_pipeline(pipe), tqdm(total=total, desc="sampling", disable=not progress) as bar:
            for v in variants:
                if adapters:   # base = every adapter at weight 0 (exactly the base model)
                    pipe.set_adapters(adapters, adapter_weights=[v.weight if a == v.adapter else 0.0 for a in adapters])
                for g, prompts in groups.items():
                    for pi, prompt in enumerate(prompts):
                        for start, count in _seed_runs(seed_list, cfg.batch_size):
                            images, params = generate(
                                pipe, prompt, negative_prompt=cfg.negative_prompt, steps=cfg.steps,
                                cfg_scale=cfg.cfg_scale, seed=start, sampler=cfg.sampler, num_images=count,
                                clip_skip=cfg.clip_skip, family=family, model_name=model_name,
                                loras=[(Path(v.lora).stem, v.weight)] if v.lora else None)
                            for k, (im, text) in enumerate(zip(images, params)):
                                rel = Path("images") / v.slug / g / f"p{pi:02d}_s{start + k}.png"
                                save_png(im, out / rel, text)
                                manifest.append({"variant": v.label, "lora": v.lora, "weight": v.weight, "group": g,
                                                 "prompt_index": pi, "prompt": prompt, "seed": start + k,
                                                 "path": rel.as_posix()})
                            bar.update(count)
    finally:
        if adapters:
            pipe.delete_adapters(adapters)
    manifest_path = write_text(out / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    if own_model:
        del pipe, base
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return manifest, manifest_path


def _score(out: Path, manifest: list[dict], variants: list[Variant], groups: dict[str, list[str]], trigger: str,
           refs, clip, dino, extractor, extra_scorer, kid_subset_size, kid_subsets, progress: bool
           ) -> tuple[list[dict[str, Any]], list[str]]:
    """One table row per (variant, group), computed from the saved PNGs."""
    from tqdm.auto import tqdm

    notes: list[str] = []
    ref_clip = clip.image_embeds(refs) if clip is not None and refs else None
    ref_dino = dino.image_embeds(refs) if dino is not None and refs else None
    ref_feat = None
    size = None
    if extractor is not None and refs:
        with Image.open(out / manifest[0]["path"]) as first:
            size = first.size
        ref_feat = image_features(extractor, refs, size=size)
    base_emb: dict[tuple, dict[str, torch.Tensor]] = {}
    rows = []
    fid_warned = False
    for v in tqdm(variants, desc="scoring", disable=not progress):
        for g in groups:
            entries = sorted((e for e in manifest if e["variant"] == v.label and e["group"] == g),
                             key=lambda e: (e["prompt_index"], e["seed"]))
            images = []
            for e in entries:
                with Image.open(out / e["path"]) as im:
                    images.append(im.convert("RGB"))
            used = [e["prompt"] for e in entries]
            row: dict[str, Any] = {"variant": v.label, "lora": Path(v.lora).stem if v.lora else "",
                                   "weight": v.weight, "group": g, "n": len(images)}
            keys = [(g, e["prompt_index"], e["seed"]) for e in entries]
            if clip is not None:
                emb = clip.image_embeds(images)
                per = paired_cosine(emb, clip.text_embeds([remove_trigger(p, trigger) for p in used]))
                mean = float(per.mean())
                row["clip_t"], row["clip_t_100"] = mean, max(100.0 * mean, 0.0)
                if ref_clip is not None:
                    row["clip_i"] = mean_pairwise_cosine(emb, ref_clip)
                _vs_base(row, "base_clip_i", v, keys, emb, base_emb, "clip")
            if dino is not None:
                emb = dino.image_embeds(images)
                if ref_dino is not None:
                    row["dino"] = mean_pairwise_cosine(emb, ref_dino)
                _vs_base(row, "base_dino", v, keys, emb, base_emb, "dino")
            if ref_feat is not None:
                feats = image_features(extractor, images, size=size)
                if min(len(feats), len(ref_feat)) >= 2:
                    k = kid_from_features(feats, ref_feat, subset_size=kid_subset_size, subsets=kid_subsets)
                    row.update(kid_mean=k.mean, kid_std=k.std, kid_subset=k.subset_size)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", FIDSampleSizeWarning)
                        row["fid"] = fid_from_features(feats, ref_feat)
                    if min(len(feats), len(ref_feat)) < FID_MIN_IMAGES and not fid_warned:
                        fid_warned = True
                        notes.append(fid_warning_text(len(feats), len(ref_feat)))
                        warnings.warn(notes[-1], FIDSampleSizeWarning, stacklevel=3)
                elif "KID/FID need at least 2 images per set" not in " ".join(notes):
                    notes.append("KID/FID need at least 2 images per set: left empty")
            if extra_scorer is not None:
                for key, value in (extra_scorer(images, used, g) or {}).items():
                    row[str(key)] = None if value is None else float(value)
            rows.append(row)
    if refs is None:
        notes.append("no reference_images: CLIP-I, DINO, KID and FID are empty")
    return rows, notes


def _vs_base(row: dict, column: str, v: Variant, keys: list[tuple], emb: torch.Tensor,
             base_emb: dict[tuple, dict[str, torch.Tensor]], kind: str) -> None:
    """Mean cosine between each image and the base model's image for the same prompt and seed."""
    if v.lora is None:
        for key, e in zip(keys, emb):
            base_emb.setdefault(key, {})[kind] = e
        return
    pairs = [(e, base_emb[key][kind]) for key, e in zip(keys, emb) if kind in base_emb.get(key, {})]
    if pairs:
        row[column] = float(paired_cosine(torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs])).mean())
