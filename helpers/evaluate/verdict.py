"""The evaluation's verdict in plain words, computed from the table: did the LoRA learn the concept, is the
prior kept, is the concept tied to its trigger, and which metrics were off and why.

Rates (shares of samples, 0-1) and similarities (cosines) are judged differently: a rate says "X% of
samples", a cosine only "closer than the base model by so much".
"""

from __future__ import annotations

from typing import Any, Sequence

# (column, what it measures, kind): the first column the table has numbers for is the one the verdict uses
CONCEPT_METRICS = [
    ("looks_concept_rate", "look like the concept by their pixels", "rate"),
    ("judge_concept_rate", "are judged the concept", "rate"),
    ("dino", "DINO similarity to your images", "cosine"),
    ("clip_i", "CLIP image similarity to your images", "cosine"),
]
PRIOR_METRICS = [
    ("judge_shape_and_colour_acc", "are drawn as their prompt asks", "rate"),
    ("base_dino", "DINO similarity to the base model's image for the same prompt and seed", "cosine"),
    ("base_clip_i", "CLIP similarity to the base model's image for the same prompt and seed", "cosine"),
]
LEARNED_RATE, LEARNED_GAIN = 0.5, 0.3     # a rate counts as learned at >= 50% and >= 30 points over the base
LEARNED_COSINE_GAIN = 0.05
PRIOR_RATE_LOSS = 0.1                      # the prior is kept while the rate falls by at most 10 points
PRIOR_COSINE_KEPT = 0.7
TOY_REASON = ("the toy world's 32 px shapes are nothing CLIP, DINO or Inception were trained on; the toy judge "
              "and the pixel check score them instead")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


def _row(rows: Sequence[dict], variant: str, group: str) -> dict:
    return next((r for r in rows if r["variant"] == variant and r["group"] == group), {})


def _pick(metrics, *rows: dict):
    for column, words, kind in metrics:
        if all(_number(r.get(column)) for r in rows):
            return column, words, kind
    return None


def _fmt(v: float, kind: str) -> str:
    return f"{v:.0%}" if kind == "rate" else f"{v:.3f}"


def strongest_variant(rows: Sequence[dict]) -> str | None:
    """The LoRA variant the verdict speaks of: the first LoRA at its highest weight."""
    loras = [r for r in rows if r.get("lora")]
    if not loras:
        return None
    first = loras[0]["lora"]
    return max((r for r in loras if r["lora"] == first), key=lambda r: r["weight"])["variant"]


def verdict(rows: Sequence[dict], settings: dict[str, Any]) -> list[str]:
    """Sentences, most important first: concept learned?, prior kept?, tied to the trigger?, metrics off."""
    out: list[str] = []
    variant = strongest_variant(rows)
    if variant is None:
        return ["No LoRA was evaluated: the table shows the base model only."]
    base_nat, lora_nat = _row(rows, "base", "natural"), _row(rows, variant, "natural")
    pick = _pick(CONCEPT_METRICS, base_nat, lora_nat)
    if pick is None:
        out.append("No metric that measures the concept was on (CLIP, DINO or a judge): the verdict cannot say "
                   "whether the LoRA learned it; look at the grids.")
    else:
        column, words, kind = pick
        b, v = base_nat[column], lora_nat[column]
        if kind == "rate":
            learned = v >= LEARNED_RATE and v - b >= LEARNED_GAIN
            partly = v - b >= 0.1
            what = f"{_fmt(v, kind)} of its samples with the trigger {words}, against {_fmt(b, kind)} for the base model"
        else:
            learned = v - b >= LEARNED_COSINE_GAIN
            partly = v - b > 0
            what = f"{words} {_fmt(v, kind)}, against {_fmt(b, kind)} for the base model"
        head = ("The LoRA learned the concept" if learned else
                "The LoRA learned the concept only partly" if partly else "The LoRA did not learn the concept")
        out.append(f"{head}: at {variant}, {what} (`{column}`).")
    base_prior, lora_prior = _row(rows, "base", "prior"), _row(rows, variant, "prior")
    pick = _pick(PRIOR_METRICS, lora_prior) if lora_prior else None
    if pick is not None:
        column, words, kind = pick
        v = lora_prior[column]
        if kind == "rate" and _number(base_prior.get(column)):
            b = base_prior[column]
            kept = v >= b - PRIOR_RATE_LOSS
            out.append(f"The prior is {'kept' if kept else 'damaged'}: without the concept, {_fmt(v, kind)} of "
                       f"its samples {words}, against {_fmt(b, kind)} for the base model (`{column}`).")
        elif kind == "cosine":
            kept = v >= PRIOR_COSINE_KEPT
            out.append(f"The prior is {'kept' if kept else 'changed'}: on prompts without the concept, {words} is "
                       f"{_fmt(v, kind)} (1 = unchanged; `{column}`).")
    no_trigger = _row(rows, variant, "no_trigger")
    pick = _pick(CONCEPT_METRICS, lora_nat, no_trigger) if no_trigger else None
    if pick is not None:
        column, _, kind = pick
        w, wo = lora_nat[column], no_trigger[column]
        tied = (w - wo >= LEARNED_GAIN) if kind == "rate" else (w - wo >= LEARNED_COSINE_GAIN)
        out.append(f"The concept is {'tied to' if tied else 'not tied to'} the trigger: {_fmt(w, kind)} with it, "
                   f"{_fmt(wo, kind)} without it (`{column}`).")
    off = [name for name, key in (("CLIP-T and CLIP-I", "clip_model"), ("DINO", "dino_model"))
           if not settings.get(key)]
    if not settings.get("fid_kid_features"):
        off.append("KID/FID")
    if off:
        why = (TOY_REASON if settings.get("extra_scorer") == "toy_judge" else
               "switched off in the settings: give clip_model, dino_model or fid_kid to turn them on")
        out.append(f"Off: {', '.join(off)} ({why}).")
    return out
