"""The evaluation verdict: sentences computed from the table's numbers."""

from helpers.evaluate.verdict import strongest_variant, verdict

TOY = {"clip_model": None, "dino_model": None, "fid_kid_features": None, "extra_scorer": "toy_judge"}


def _rows(concept_base, concept_lora, prior_base, prior_lora, no_trigger):
    def row(variant, lora, weight, group, **values):
        return {"variant": variant, "lora": lora, "weight": weight, "group": group, **values}

    return [row("base", None, 0.0, "natural", looks_concept_rate=concept_base, judge_concept_rate=0.1),
            row("base", None, 0.0, "prior", judge_shape_and_colour_acc=prior_base),
            row("mine @ 0.5", "mine", 0.5, "natural", looks_concept_rate=0.4),
            row("mine @ 1", "mine", 1.0, "natural", looks_concept_rate=concept_lora),
            row("mine @ 1", "mine", 1.0, "prior", judge_shape_and_colour_acc=prior_lora),
            row("mine @ 1", "mine", 1.0, "no_trigger", looks_concept_rate=no_trigger)]


def test_a_learned_concept_with_a_kept_prior_reads_as_such():
    rows = _rows(0.0, 0.88, 1.0, 0.97, 0.03)
    assert strongest_variant(rows) == "mine @ 1"
    v = verdict(rows, TOY)
    assert v[0] == ("The LoRA learned the concept: at mine @ 1, 88% of its samples with the trigger look like the "
                    "concept by their pixels, against 0% for the base model (`looks_concept_rate`).")
    assert v[1].startswith("The prior is kept: without the concept, 97% of its samples are drawn as their prompt "
                           "asks, against 100% for the base model")
    assert v[2] == "The concept is tied to the trigger: 88% with it, 3% without it (`looks_concept_rate`)."
    assert v[3].startswith("Off: CLIP-T and CLIP-I, DINO, KID/FID (the toy world's 32 px shapes")


def test_a_weak_lora_a_damaged_prior_and_a_leak_are_said_plainly():
    v = verdict(_rows(0.05, 0.2, 1.0, 0.6, 0.2), {"clip_model": "c", "dino_model": "d", "fid_kid_features": "x"})
    assert v[0].startswith("The LoRA learned the concept only partly: at mine @ 1, 20% ")
    assert v[1].startswith("The prior is damaged: without the concept, 60% ")
    assert v[2].startswith("The concept is not tied to the trigger: 20% with it, 20% without it")
    assert not any(s.startswith("Off:") for s in v)
    assert verdict(_rows(0.1, 0.1, 1, 1, 0.1), TOY)[0].startswith("The LoRA did not learn the concept")


def test_similarities_are_compared_with_the_base_not_called_rates():
    rows = [{"variant": "base", "lora": None, "weight": 0.0, "group": "natural", "dino": 0.41},
            {"variant": "x @ 1", "lora": "x", "weight": 1.0, "group": "natural", "dino": 0.62},
            {"variant": "x @ 1", "lora": "x", "weight": 1.0, "group": "prior", "base_dino": 0.55}]
    v = verdict(rows, {"clip_model": None, "dino_model": "d", "fid_kid_features": None})
    assert v[0] == ("The LoRA learned the concept: at x @ 1, DINO similarity to your images 0.620, against 0.410 "
                    "for the base model (`dino`).")
    assert v[1].startswith("The prior is changed: on prompts without the concept, DINO similarity")
    assert v[-1] == ("Off: CLIP-T and CLIP-I, KID/FID (switched off in the settings: give clip_model, dino_model "
                     "or fid_kid to turn them on).")
    assert verdict(rows[:1], {}) == ["No LoRA was evaluated: the table shows the base model only."]
