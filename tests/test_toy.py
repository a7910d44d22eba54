"""The toy world: a deterministic renderer, a pretraining run that reproduces, the shipped base model
that follows its prompts, and the demo: a LoRA that learns the held-out concept and keeps the prior."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.toy import world
from helpers.toy.pretrain import SHIPPED_DIR, PretrainConfig, pretrain

# the demo's look rate at 130 steps, 16 samples: measured 69% (base model 0%); the bound leaves room for the
# thread count's rounding (a sample is 6 points)
LOOK_AT_130 = 0.4

needs_base = pytest.mark.skipif(not (SHIPPED_DIR / "model_index.json").exists(),
                                reason="toy base not built: python -m helpers.toy pretrain")


def test_world_is_deterministic_and_captions_are_true():
    a = world.sample_world(8, seed=5)
    b = world.sample_world(8, seed=5)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) and s == t for (x, s), (y, t) in zip(a, b))
    for image, scene in a:
        assert image.size == (32, 32)
        assert world.parse_caption(scene.caption) == {"shape": scene.shape, "colour": scene.colour,
                                                      "background": scene.background}
        corner = np.asarray(image)[0, 0]
        assert np.abs(corner.astype(int) - world.BACKGROUNDS[scene.background]).max() <= 2


def test_concept_dataset_is_a_users_folder_and_never_in_the_base_world(tmp_path):
    folder = world.write_concept_dataset(tmp_path / "c", n=6)
    pngs = sorted(folder.glob("*.png"))
    assert len(pngs) == 6 and all(p.with_suffix(".txt").exists() for p in pngs)
    caps = [p.with_suffix(".txt").read_text().strip() for p in pngs]
    assert caps[0] == "a sks flower on a black background"
    assert {world.parse_caption(c)["background"] for c in caps} == set(world.BACKGROUNDS)
    seen = {world.random_scene(random.Random(i)).shape for i in range(300)}
    assert world.CONCEPT_SHAPE not in seen and world.CONCEPT_SHAPE not in world.SHAPES


def test_pretraining_is_reproducible(tmp_path):
    """Same config and seed, twice: identical weights (a short run; the shipped one uses the defaults)."""
    cfg = PretrainConfig(n_train=256, n_holdout=32, n_gamut=64, vae_world=128, vae_steps=4, vae_batch=16, steps=4,
                         batch=16, warmup=2)
    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    pretrain(tmp_path / "a", cfg)
    pretrain(tmp_path / "b", cfg)
    # the process computes as before: a later training run in it gives the same numbers as in a fresh one
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == before
    from safetensors.torch import load_file

    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.safetensors"))
    assert {f.parts[0] for f in files} == {"unet", "vae", "text_encoder"}
    for f in files:
        fa, fb = load_file(tmp_path / "a" / f), load_file(tmp_path / "b" / f)
        assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa), f


def test_the_shipped_vae_decodes_colours_it_never_saw():
    """The toy VAE learned from random colours over the whole RGB cube (never the concept): the violet petals
    come back violet (measured: in (150, 60, 220), out (149, 64, 220); mean abs error 11.5 of 255)."""
    import importlib.util

    from diffusers import AutoencoderKL

    spec = importlib.util.spec_from_file_location("vae_colour_check", Path(__file__).parents[1] / "tools" /
                                                  "vae_colour_check.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tool.check(AutoencoderKL.from_pretrained(str(SHIPPED_DIR), subfolder="vae").float().eval())
    petals = out["violet petals out"]
    assert 255 <= petals["hue_deg"] <= 300 and petals["saturation"] >= 0.6, out
    assert out["violet petals mean abs error (0-255)"] <= 20, out
    assert out["concept (violet flowers)"]["psnr_db"] >= 25 and out["random colours and shapes"]["psnr_db"] >= 23
    assert out["base world"]["psnr_db"] >= 30, out


def test_latent_centring_is_exact():
    """Folding the latent mean into the VAE's 1x1 convs changes no reconstruction."""
    from diffusers import AutoencoderKL

    from helpers.toy.pretrain import centre_latents

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(32,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=32)
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        before = vae.decode(vae.encode(x).latent_dist.mean).sample
        shift, std = centre_latents(vae, x)
        mean_after = vae.encode(x).latent_dist.mean.mean(dim=(0, 2, 3))
        after = vae.decode(vae.encode(x).latent_dist.mean).sample
    assert torch.allclose(before, after, atol=1e-5)
    assert mean_after.abs().max() < 1e-5 and abs(vae.config.scaling_factor - 1 / std) < 1e-9


@needs_base
def test_shipped_base_loads_through_helpers_and_follows_prompts():
    from helpers.toy.demo import EVAL_CFG, EVAL_SAMPLER, EVAL_STEPS, world_prompts
    from helpers.generate.inference import generate
    from helpers.sd.models import load_base
    from helpers.toy.judge import load_judge, score

    base = load_base(str(SHIPPED_DIR))
    assert base.family == "sd1" and base.prediction_type == "epsilon"
    base.pipe.set_progress_bar_config(disable=True)
    prompts = world_prompts(24, seed=7)
    images, _ = generate(base.pipe, prompts, steps=EVAL_STEPS, cfg_scale=EVAL_CFG, seed=0, sampler=EVAL_SAMPLER)
    s = score(load_judge(), images, prompts)
    # chance: shape 25%, colour 20%, background 33%; the shipped model is measured at 200 samples in its README
    assert s["shape_acc"] >= 0.6 and s["colour_acc"] >= 0.75 and s["background_acc"] >= 0.9, s
    assert s["concept_rate"] <= 0.1


def test_the_demo_grid_shows_the_measured_samples_and_draws_only_the_rest():
    """Grid cells the measurement drew are taken from it (same prompt, seed and weight); a prompt it did not draw,
    or drew too few times, gets seeds 7, 8, ... at every weight."""
    from helpers.toy.demo import draw_grid, grid_seeds, trigger_prompts

    measured = trigger_prompts(7)   # background k at indices k, k + 3, k + 6
    drawn = {(p, 1000 + i, w): Image.new("RGB", (2, 2), (i, int(w), 0)) for i, p in enumerate(measured)
             for w in (0.0, 1.0)}
    prompts = measured[:2] + ["a red circle on a black background"]
    seeds = grid_seeds(prompts, drawn, images=3)
    assert seeds == [[1000, 1003, 1006], [1001, 1004, 7], [7, 8, 9]]
    cells = draw_grid(None, "a", prompts[:1], [0.0, 1.0], seeds[:1], drawn)   # nothing left to draw: no pipe used
    assert [[im.getpixel((0, 0)) for im in cell] for cell in cells[0]] == [[(0, 0, 0), (3, 0, 0), (6, 0, 0)],
                                                                          [(0, 1, 0), (3, 1, 0), (6, 1, 0)]]


@pytest.mark.slow
@needs_base
def test_demo_lora_learns_the_concept_and_keeps_the_prior(tmp_path):
    """A shorter demo run (130 of 400 steps, 16 samples a cell, one image per grid cell): the concept appears
    with the trigger only.
    Measured at 130 steps: violet five-petal flowers 69%, judge concept 100% (base 0% and 0%), world shape and
    colour 100%, no flower without the trigger (the full demo: demo_images/toy_concept_scores.json)."""
    from helpers.toy.demo import run_demo

    grid_images = 1
    result = run_demo(steps=130, out_root=tmp_path, samples=16, progress=False, grid_images=grid_images)
    base, lora = result.scores["0"], result.scores["1"]
    assert lora["concept_rate"] >= 0.5, result.scores
    assert base["concept_rate"] <= 0.15, result.scores
    # violet five-petal flowers by their pixels: the LoRA draws them, the base model never does
    assert lora["concept_look_rate"] >= LOOK_AT_130, result.scores
    assert base["concept_look_rate"] == 0 and lora["world_concept_look_rate"] == 0, result.scores
    assert lora["world_shape_and_colour_acc"] >= base["world_shape_and_colour_acc"] - 0.2, result.scores
    assert lora["world_concept_rate"] <= 0.15, result.scores  # no flowers without the trigger
    assert (tmp_path / "lora_files" / "toy_concept.safetensors").exists()
    assert (tmp_path / "lora_files" / "toy_concept.toml").exists()

    # The written files, loaded fresh through helpers, redraw the demo's grid: alone, one image in its own batch
    # (the grid shows the measured sample, drawn in a batch of 16, and kernels may round a batch differently).
    from helpers.toy.demo import (
        EVAL_CFG, EVAL_SAMPLER, EVAL_STEPS, GRID_LEFT, GRID_PAD, GRID_TOP, GRID_ZOOM, trigger_prompts
    )
    from helpers.generate.inference import generate, load_loras
    from helpers.sd.models import load_base

    fresh = load_base(str(SHIPPED_DIR))
    load_loras(fresh.pipe, [(tmp_path / "lora_files" / "toy_concept.safetensors", 1.0)])
    grid = json.loads((tmp_path / "demo_images" / "toy_concept_scores.json").read_text())["grid"]
    assert grid["prompts"][0] == trigger_prompts(1)[0]
    assert grid["seeds"][0] == [1000]   # the grid shows the measured sample (the measurement's seeds: 1000 + i)
    images, _ = generate(fresh.pipe, trigger_prompts(1)[0], steps=EVAL_STEPS, cfg_scale=EVAL_CFG,
                         seed=grid["seeds"][0][0], num_images=grid_images, sampler=EVAL_SAMPLER)
    grid = np.asarray(Image.open(result.grid_path).convert("RGB"))
    strip = np.concatenate([np.asarray(im) for im in images], axis=1).repeat(GRID_ZOOM, 0).repeat(GRID_ZOOM, 1)
    cw = strip.shape[1]
    x = GRID_LEFT + 2 * (cw + GRID_PAD)  # first row, third column: weight 1
    diff = np.abs(grid[GRID_TOP:GRID_TOP + strip.shape[0], x:x + cw].astype(int) - strip.astype(int))
    assert diff.max() <= 8 and (diff > 2).mean() < 0.01, (diff.max(), (diff > 2).mean())
