"""Inference: LoRAs at weights equal a hand merge, samplers by A1111 name, Textual Inversion files,
A1111 prompt weighting, memory options, grids and PNG parameters that read back. Tiny models, CPU."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from helpers.generate.grids import (
    grid_prompt_x_checkpoint, grid_prompt_x_weight, grid_sampler_x_steps, image_grid, save_grid
)
from helpers.sd import samplers
from helpers.sd.samplers import SAMPLERS, MissingPackageError, set_sampler
from helpers.formats.png_info import (
    a1111_parameters, lora_hash, parse_a1111_parameters, read_png_parameters, save_png
)
from helpers.generate.inference import generate, load_embeddings, load_loras, memory_options
from helpers.formats.lora import LoraModule, save_lora
from helpers.sd.lora_targets import text_encoder_target_modules, unet_target_modules
from helpers.sd.models import load_base
from helpers.sd.prompt_weighting import encode_weighted, parse_prompt_attention, weighted_chunks
from helpers.sd.text_encoding import encode_prompts


# numpy 2 deprecation noise from diffusers' k-diffusion schedulers, and torchsde's float-rounding notice
pytestmark = pytest.mark.filterwarnings("ignore:__array.*:DeprecationWarning", "ignore:Should have ta>=t0:UserWarning")


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def fresh(model_dir):
    pipe = load_base(str(model_dir)).pipe
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd15(tiny_sd15_dir):
    """A shared tiny SD 1.5 pipeline; tests that add LoRAs or tokens use their own."""
    return fresh(tiny_sd15_dir)


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_dir):
    return fresh(tiny_sdxl_dir)


def arr(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def random_lora(pipe, rank: int, alpha: float, seed: int, scale: float = 0.3) -> dict[str, dict[str, LoraModule]]:
    """A LoRA on every attention projection of the UNet and text encoder(s), with trained-looking values."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    comps = ["unet", "text_encoder"] + (["text_encoder_2"] if getattr(pipe, "text_encoder_2", None) else [])
    for comp in comps:
        model = getattr(pipe, comp)
        names = unet_target_modules(model, "attention") if comp == "unet" else \
            text_encoder_target_modules(model, "attention")
        mods = {}
        for name in names:
            layer = model.get_submodule(name)
            if isinstance(layer, torch.nn.Conv2d):
                down = torch.randn(rank, layer.in_channels, 1, 1, generator=gen) * scale
                up = torch.randn(layer.out_channels, rank, 1, 1, generator=gen) * scale
            else:
                down = torch.randn(rank, layer.in_features, generator=gen) * scale
                up = torch.randn(layer.out_features, rank, generator=gen) * scale
            mods[name] = LoraModule(down=down, up=up, alpha=alpha)
        out[comp] = mods
    return out


@pytest.fixture(scope="module")
def lora_files(sd15, tmp_path_factory):
    """Two SD 1.5 LoRAs (kohya file, rank 4 alpha 2; diffusers folder, rank 2 alpha 4), fp32."""
    folder = tmp_path_factory.mktemp("loras")
    w1, w2 = random_lora(sd15, 4, 2.0, seed=1), random_lora(sd15, 2, 4.0, seed=2)
    f1 = save_lora(folder / "style_a.safetensors", w1, family="sd1", dtype=torch.float32)
    f2 = save_lora(folder / "style_b", w2, family="sd1", format="diffusers", dtype=torch.float32)
    return (f1, w1), (f2, w2)


# ------------------------------------------------------------------------------------ LoRAs

def merge_by_hand(pipe, loras: list[tuple[dict, float]]) -> None:
    """W <- W + sum_k weight_k * (alpha_k / rank_k) * up_k @ down_k, into the base weights."""
    with torch.no_grad():
        for weights, w in loras:
            for comp, mods in weights.items():
                model = getattr(pipe, comp)
                for name, m in mods.items():
                    layer = model.get_submodule(name)
                    delta = (m.up.flatten(1) @ m.down.flatten(1)).reshape(layer.weight.shape)
                    layer.weight += w * m.scale * delta


def test_two_loras_at_weights_equal_a_hand_merge(tiny_sd15_dir, lora_files):
    (f1, w1), (f2, w2) = lora_files
    kw = {"steps": 3, "seed": 11, "sampler": "DDIM", "cfg_scale": 5.0}
    base_pipe = fresh(tiny_sd15_dir)
    base = generate(base_pipe, "a red circle on a blue background", **kw)[0][0]

    pipe = fresh(tiny_sd15_dir)
    names = load_loras(pipe, [(f1, 0.7), (f2, -0.4)])
    assert len(names) == 2 and sorted(pipe.get_active_adapters()) == sorted(names)
    got = generate(pipe, "a red circle on a blue background", **kw)[0][0]
    got_f = pipe("a red circle on a blue background", num_inference_steps=3, guidance_scale=5.0,
                 generator=torch.Generator().manual_seed(11), output_type="np").images[0]

    merged = fresh(tiny_sd15_dir)
    merge_by_hand(merged, [(w1, 0.7), (w2, -0.4)])
    want = generate(merged, "a red circle on a blue background", **kw)[0][0]
    set_sampler(merged, "DDIM")
    want_f = merged("a red circle on a blue background", num_inference_steps=3, guidance_scale=5.0,
                    generator=torch.Generator().manual_seed(11), output_type="np").images[0]

    assert np.abs(got_f - want_f).max() < 1e-4  # float images: equal up to float rounding
    assert np.abs(arr(got) - arr(want)).max() <= 1  # 8-bit images: at most one level apart
    assert np.abs(arr(got) - arr(base)).mean() > 5  # and the LoRAs do change the image

    wrong = fresh(tiny_sd15_dir)  # weights swapped: a hand merge that must not match
    merge_by_hand(wrong, [(w1, -0.4), (w2, 0.7)])
    set_sampler(wrong, "DDIM")
    wrong_f = wrong("a red circle on a blue background", num_inference_steps=3, guidance_scale=5.0,
                    generator=torch.Generator().manual_seed(11), output_type="np").images[0]
    assert np.abs(got_f - wrong_f).max() > 1e-2


def test_lora_weights_zero_is_the_base_model_and_back(tiny_sd15_dir, lora_files):
    from helpers.generate.inference import set_lora_weights

    (f1, _), (f2, _) = lora_files
    kw = {"steps": 3, "seed": 11, "sampler": "DDIM", "cfg_scale": 5.0}
    base = generate(fresh(tiny_sd15_dir), "a red circle on a blue background", **kw)[0][0]
    pipe = fresh(tiny_sd15_dir)
    names = load_loras(pipe, [(f1, 0.7), (f2, -0.4)])
    on = generate(pipe, "a red circle on a blue background", **kw)[0][0]
    set_lora_weights(pipe, names, [0.0, 0.0])       # switched off: exactly the base model
    assert np.array_equal(arr(generate(pipe, "a red circle on a blue background", **kw)[0][0]), arr(base))
    set_lora_weights(pipe, names, [0.7, -0.4])      # and on again at the weights asked for
    assert np.array_equal(arr(generate(pipe, "a red circle on a blue background", **kw)[0][0]), arr(on))
    assert np.abs(arr(on) - arr(base)).mean() > 5


def test_seeds_per_image_draw_several_prompts_in_one_batch(sd15):
    kw = {"steps": 3, "sampler": "Euler a", "cfg_scale": 5.0}
    batch, params = generate(sd15, ["a cat", "a cat", "a dog"], seeds=[5, 6, 5], **kw)
    cats, _ = generate(sd15, "a cat", seed=5, num_images=2, **kw)
    dog, _ = generate(sd15, "a dog", seed=5, **kw)
    for got, want in zip(batch, cats + dog):
        assert np.abs(arr(got) - arr(want)).max() <= 1
    assert ["Seed: 5," in params[0], "Seed: 6," in params[1], "Seed: 5," in params[2]] == [True] * 3
    with pytest.raises(ValueError, match="give one seed per image \\(3\\), got 2"):
        generate(sd15, ["a", "b", "c"], seeds=[1, 2], **kw)


def test_sdxl_lora_on_sd15_fails_clearly_through_generate(tiny_sd15_dir, sdxl, tmp_path, capsys):
    from helpers.__main__ import main

    path = save_lora(tmp_path / "xl_style.safetensors", random_lora(sdxl, 2, 2.0, seed=3), family="sdxl",
                     unet_config=sdxl.unet.config, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"xl_style.*made for SDXL.*model is SD 1\.x"):
        load_loras(fresh(tiny_sd15_dir), [(path, 1.0)])
    rc = main(["generate", "--model", str(tiny_sd15_dir), "--lora", f"{path}:0.8", "--prompt", "a circle",
               "--steps", "1", "--device", "cpu", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "made for SDXL" in err and "SD 1.x" in err, err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ PNG parameters

def test_png_parameters_round_trip(tmp_path):
    fields = {"steps": 28, "sampler": "DPM++ 2M Karras", "cfg_scale": 6.5, "seed": 4_000_000_123, "width": 512,
              "height": 768, "model": "my_model_v2", "clip_skip": 2}
    prompt = "a photo of (sks:1.2) dog, Negative-looking: words"
    negative = "blurry, lowres"
    loras = [("style_a", 0.7), ("style_b", -0.4)]
    extra = {"Lora hashes": "style_a: 0123456789ab, style_b: ba9876543210", "Hires upscaler": "Latent"}
    text = a1111_parameters(prompt, negative, loras=loras, extra=extra, **fields)
    path = save_png(Image.new("RGB", (8, 8), "red"), tmp_path / "a.png", text)
    read = read_png_parameters(path)
    assert read == text
    p = parse_a1111_parameters(read)
    assert p["prompt"] == prompt + " <lora:style_a:0.7> <lora:style_b:-0.4>"
    assert p["negative_prompt"] == negative
    assert {k: p[k] for k in fields} == fields
    assert p["loras"] == loras
    assert p["lora_hashes"] == {"style_a": "0123456789ab", "style_b": "ba9876543210"}
    assert p["extra"] == {"Hires upscaler": "Latent"}
    # and written again from what was read, the text is the same
    again = a1111_parameters(p["prompt"], p["negative_prompt"], loras=p["loras"], extra={
        "Lora hashes": ", ".join(f"{k}: {v}" for k, v in p["lora_hashes"].items()), **p["extra"]},
        **{k: p[k] for k in fields})
    assert again == text


def test_parse_a1111_text_as_a1111_writes_it():
    text = ('masterpiece, (sks person:1.1), smiling <lora:sks_v3:0.8> <lora:detail>\n'
            'Negative prompt: bad hands,\nextra fingers\n'
            'Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 123, Size: 640x512, '
            'Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.45, Clip skip: 2, '
            'Lora hashes: "sks_v3: 0a1b2c3d4e5f, detail: 112233445566", Version: v1.10.1')
    p = parse_a1111_parameters(text)
    assert p["prompt"] == "masterpiece, (sks person:1.1), smiling <lora:sks_v3:0.8> <lora:detail>"
    assert p["negative_prompt"] == "bad hands,\nextra fingers"
    assert (p["steps"], p["sampler"], p["schedule_type"], p["cfg_scale"], p["seed"]) == \
        (30, "DPM++ 2M", "Karras", 7.0, 123)
    assert (p["width"], p["height"], p["model"], p["model_hash"]) == (640, 512, "v1-5-pruned-emaonly", "6ce0161689")
    assert (p["denoising_strength"], p["clip_skip"]) == (0.45, 2)
    assert p["loras"] == [("sks_v3", 0.8), ("detail", 1.0)]
    assert p["lora_hashes"] == {"sks_v3": "0a1b2c3d4e5f", "detail": "112233445566"}
    assert p["extra"] == {"Version": "v1.10.1"}
    # a text without a settings line is all prompt
    assert parse_a1111_parameters("just a prompt")["prompt"] == "just a prompt"


# ------------------------------------------------------------------------------------ samplers

@pytest.mark.parametrize("name", list(SAMPLERS))
def test_each_sampler_builds_and_generates(name, sd15):
    cls_name, extra = SAMPLERS[name]
    package = samplers.SAMPLER_PACKAGES.get(cls_name)
    if package and not samplers.package_available(package):
        with pytest.raises(MissingPackageError, match=f"pip install {package}"):
            set_sampler(sd15, name)
        return
    images, params = generate(sd15, "a green square", steps=2, seed=3, sampler=name)
    sched = sd15.scheduler
    assert type(sched).__name__ == cls_name
    for key in ("use_karras_sigmas", "algorithm_type", "solver_type", "timestep_spacing"):
        if key in extra:
            assert sched.config[key] == extra[key], key
    assert (sched.config.beta_schedule, sched.config.beta_start) == ("scaled_linear", 0.00085)  # the model's
    a = arr(images[0])
    assert a.std() > 1, "flat image (NaN latents?)"
    assert f"Sampler: {name}," in params[0] and "Steps: 2," in params[0]


def test_sampler_settings_do_not_leak_and_karras_is_explicit(sd15):
    set_sampler(sd15, "DPM++ 2M SDE Karras")
    assert sd15.scheduler.config.use_karras_sigmas and sd15.scheduler.config.algorithm_type == "sde-dpmsolver++"
    set_sampler(sd15, "DPM++ 2M")
    assert not sd15.scheduler.config.use_karras_sigmas and sd15.scheduler.config.algorithm_type == "dpmsolver++"
    set_sampler(sd15, "Euler")
    assert not sd15.scheduler.config.use_karras_sigmas
    set_sampler(sd15, "DDIM")  # A1111's DDIM: steps 1, 1+c, ... and alphas_cumprod[0] as the final alpha
    cfg = sd15.scheduler.config
    assert (cfg.timestep_spacing, cfg.steps_offset, cfg.set_alpha_to_one) == ("leading", 1, False)
    with pytest.raises(ValueError, match="unknown sampler 'Euler b'"):
        set_sampler(sd15, "Euler b")


@pytest.mark.parametrize("name", ["Euler a", "DPM++ SDE Karras"])
def test_stochastic_samplers_reproduce_per_image_seed(name, sd15):
    if name.startswith("DPM++ SDE") and not samplers.package_available("torchsde"):
        pytest.skip("torchsde not installed")
    batch, _ = generate(sd15, "a cat", steps=3, seed=20, num_images=2, sampler=name)
    again, _ = generate(sd15, "a cat", steps=3, seed=20, num_images=2, sampler=name)
    alone, params = generate(sd15, "a cat", steps=3, seed=21, sampler=name)
    assert np.array_equal(arr(batch[0]), arr(again[0])) and np.array_equal(arr(batch[1]), arr(again[1]))
    assert np.abs(arr(batch[1]) - arr(alone[0])).max() <= 1  # image 2 of a batch = seed + 1 alone
    assert np.abs(arr(batch[0]) - arr(batch[1])).mean() > 1
    assert "Seed: 21," in params[0]


def test_missing_sampler_package_names_the_pip_package(sd15, monkeypatch):
    monkeypatch.setattr(samplers, "package_available", lambda name: name not in ("torchsde", "scipy"))
    with pytest.raises(MissingPackageError, match="pip install torchsde") as e:
        set_sampler(sd15, "DPM++ SDE Karras")
    assert isinstance(e.value, ImportError) and isinstance(e.value, ValueError)
    with pytest.raises(MissingPackageError, match="pip install scipy"):
        set_sampler(sd15, "LMS")


# --------------------------------------------------------------------------- Textual Inversion

def token_rows(pipe, token: str, tokenizer=None, encoder=None) -> torch.Tensor:
    tok, te = tokenizer or pipe.tokenizer, encoder or pipe.text_encoder
    text = pipe.maybe_convert_prompt(f"a photo of {token}", tok)
    ids = tok(text).input_ids
    vocab = tok.get_vocab()
    added = [i for i in ids if i >= len(vocab) - 10 and tok.convert_ids_to_tokens(i).startswith(token)]
    return te.get_input_embeddings().weight[added].detach()


def test_a1111_embedding_loads_and_its_token_works(tiny_sd15_dir, sd15, tmp_path):
    vec = torch.randn(2, 32, generator=torch.Generator().manual_seed(5))
    path = tmp_path / "Shiny-Style.safetensors"
    safetensors.torch.save_file({"emb_params": vec}, str(path))
    pipe = fresh(tiny_sd15_dir)
    assert load_embeddings(pipe, [path]) == ["Shiny-Style"]
    # a 2-vector embedding: the prompt's one token expands to Shiny-Style Shiny-Style_1, rows = the file's
    assert pipe.maybe_convert_prompt("a Shiny-Style cat", pipe.tokenizer) == "a Shiny-Style Shiny-Style_1 cat"
    assert torch.equal(token_rows(pipe, "Shiny-Style"), vec)
    with_emb = generate(pipe, "a photo of Shiny-Style", steps=2, seed=1, sampler="DDIM")[0][0]
    plain = generate(sd15, "a photo of Shiny-Style", steps=2, seed=1, sampler="DDIM")[0][0]
    assert np.abs(arr(with_emb) - arr(plain)).mean() > 0.5  # the token now means the vectors
    with pytest.raises(ValueError, match="already in the tokenizer"):
        load_embeddings(pipe, [path])


class NotData:
    """An arbitrary object in a .pt file: torch.load(weights_only=True) refuses it, and so do we."""


def test_other_embedding_formats(tiny_sd15_dir, tmp_path):
    pipe = fresh(tiny_sd15_dir)
    a1111_pt = torch.randn(1, 32)
    torch.save({"string_to_param": {"*": torch.nn.Parameter(a1111_pt)}, "string_to_token": {"*": 265},
                "name": "oldstyle", "step": 500, "sd_checkpoint_name": "v1-5"}, tmp_path / "oldstyle.pt")
    diffusers_vec = torch.randn(32)
    safetensors.torch.save_file({"<cat-toy>": diffusers_vec}, str(tmp_path / "learned_embeds.safetensors"))
    tokens = load_embeddings(pipe, [tmp_path / "oldstyle.pt", tmp_path / "learned_embeds.safetensors",
                                    (tmp_path / "oldstyle.pt", "renamed")])
    assert tokens == ["oldstyle", "<cat-toy>", "renamed"]
    assert torch.equal(token_rows(pipe, "oldstyle"), a1111_pt)
    assert torch.equal(token_rows(pipe, "<cat-toy>"), diffusers_vec[None])

    torch.save({"emb_params": torch.randn(1, 32), "x": NotData()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="cannot be read safely.*safetensors"):
        load_embeddings(pipe, [tmp_path / "evil.pt"])


def test_sdxl_embedding_and_wrong_family_errors(tiny_sd15_dir, tiny_sdxl_dir, tmp_path):
    pipe = fresh(tiny_sdxl_dir)
    l_vec, g_vec = torch.randn(1, 16), torch.randn(1, 48)
    safetensors.torch.save_file({"clip_l": l_vec, "clip_g": g_vec}, str(tmp_path / "xlemb.safetensors"))
    assert load_embeddings(pipe, [tmp_path / "xlemb.safetensors"]) == ["xlemb"]
    assert torch.equal(token_rows(pipe, "xlemb"), l_vec)
    assert torch.equal(token_rows(pipe, "xlemb", pipe.tokenizer_2, pipe.text_encoder_2), g_vec)
    images, _ = generate(pipe, "a (xlemb:1.2) circle", steps=2, weighting=True, sampler="Euler")
    assert arr(images[0]).std() > 1

    sd1_file = tmp_path / "sd1emb.safetensors"
    safetensors.torch.save_file({"emb_params": torch.randn(1, 32)}, str(sd1_file))
    with pytest.raises(ValueError, match="one text encoder only; an SDXL model needs"):
        load_embeddings(pipe, [sd1_file])

    sd15 = fresh(tiny_sd15_dir)
    safetensors.torch.save_file({"clip_l": torch.randn(1, 768), "clip_g": torch.randn(1, 1280)},
                                str(tmp_path / "real_xl.safetensors"))
    with pytest.raises(ValueError, match=r"for SDXL \(clip_l \+ clip_g\), but the model is SD 1\.x"):
        load_embeddings(sd15, [tmp_path / "real_xl.safetensors"])
    safetensors.torch.save_file({"emb_params": torch.randn(1, 1024)}, str(tmp_path / "sd2emb.safetensors"))
    with pytest.raises(ValueError, match=r"for SD 2\.x .*1024-wide.*but the model is SD 1\.x"):
        load_embeddings(sd15, [tmp_path / "sd2emb.safetensors"])
    safetensors.torch.save_file({"clip_g": torch.randn(1, 1280)}, str(tmp_path / "half.safetensors"))
    with pytest.raises(ValueError, match="needs both clip_l and clip_g"):
        load_embeddings(sd15, [tmp_path / "half.safetensors"])


# ----------------------------------------------------------------------------- prompt weighting

def test_parse_prompt_attention_matches_a1111():
    assert parse_prompt_attention("normal text") == [("normal text", 1.0)]
    assert parse_prompt_attention("an (important) word") == [("an ", 1.0), ("important", 1.1), (" word", 1.0)]
    assert parse_prompt_attention("(unbalanced") == [("unbalanced", 1.1)]
    assert parse_prompt_attention(r"\(literal\]") == [("(literal]", 1.0)]
    assert parse_prompt_attention("(unnecessary)(parens)") == [("unnecessaryparens", 1.1)]
    assert parse_prompt_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).") == [
        ("a ", 1.0), ("house", 1.3 * 1.1 * 1.1), (" ", 1.1), ("on", 1 / 1.1 * 1.1), (" a ", 1.1),
        ("hill", 0.5 * 1.1), (", sun, ", 1.1), ("sky", 1.1 * 1.1 * 1.1 * 1.1), (".", 1.1)]
    assert parse_prompt_attention("[[dim]] (a: 1.5 ) b") == [("dim", 1 / 1.1 / 1.1), (" ", 1.0), ("a", 1.5),
                                                              (" b", 1.0)]
    assert parse_prompt_attention("cat BREAK dog") == [("cat", 1.0), ("BREAK", -1.0), ("dog", 1.0)]
    assert parse_prompt_attention("") == [("", 1.0)]
    assert parse_prompt_attention("ratio 16:9") == [("ratio 16:9", 1.0)]


def test_weighted_tokens_and_embeddings(sd15):
    import copy

    tok = sd15.tokenizer
    # A1111 rescales a weighted chunk to the mean the unweighted chunk had. The tiny encoder ends in a
    # LayerNorm, so its mean is rounding noise around zero and that rule would compare noise with noise:
    # shift the LayerNorm's bias so the mean is far from zero and the rescale is well conditioned.
    te = copy.deepcopy(sd15.text_encoder)
    with torch.no_grad():
        te.final_layer_norm.bias.add_(0.5)
    chunks = weighted_chunks(tok, "a (red:1.5) [dog]")
    assert chunks == [(tok("a red dog", add_special_tokens=False).input_ids, [1.0, 1.5, 1 / 1.1])]
    with torch.no_grad():
        plain = encode_prompts("sd1", [tok], [te], ["a red dog"]).hidden
        raw = encode_weighted("sd1", [tok], [te], ["a (red:1.5) [dog]"], restore_mean=False).hidden
        restored = encode_weighted("sd1", [tok], [te], ["a (red:1.5) [dog]"]).hidden
    assert plain.mean().item() > 0.4  # far from zero: the checks below are well conditioned
    w = torch.ones(77)
    w[2], w[3] = 1.5, 1 / 1.1  # BOS, a, red, dog, EOS...
    assert torch.equal(raw, plain * w[None, :, None])  # only the weighted tokens change, by their weight
    assert torch.equal(raw[:, [0, 1] + list(range(4, 77))], plain[:, [0, 1] + list(range(4, 77))])
    # then the chunk is scaled by old mean / new mean, computed here by hand in float64
    factor = plain.double().mean() / raw.double().mean()
    assert abs(factor.item() - 1) > 1e-3  # the weights moved the mean, so the rescale does something
    assert torch.allclose(restored.double(), raw.double() * factor, rtol=1e-5, atol=1e-6)
    assert math.isclose(restored.double().mean().item(), plain.double().mean().item(), rel_tol=1e-5)


def test_unweighted_prompts_encode_exactly_as_without_weighting(sd15, sdxl):
    prompts = ["a photo of a red circle", "a dog"]
    with torch.no_grad():
        for clip_skip in (1, 2):
            a = encode_prompts("sd1", [sd15.tokenizer], [sd15.text_encoder], prompts, clip_skip=clip_skip)
            b = encode_weighted("sd1", [sd15.tokenizer], [sd15.text_encoder], prompts, clip_skip=clip_skip)
            assert torch.equal(a.hidden, b.hidden)
        toks, tes = [sdxl.tokenizer, sdxl.tokenizer_2], [sdxl.text_encoder, sdxl.text_encoder_2]
        a = encode_prompts("sdxl", toks, tes, prompts)
        b = encode_weighted("sdxl", toks, tes, prompts)
        assert torch.equal(a.hidden, b.hidden) and torch.equal(a.pooled, b.pooled)
        long = " ".join(["red circle"] * 50)  # 100 tokens: two chunks, as A1111 encodes long prompts
        c = encode_weighted("sd1", [sd15.tokenizer], [sd15.text_encoder], [long, "dog"])
        first = encode_weighted("sd1", [sd15.tokenizer], [sd15.text_encoder], [" ".join(["red circle"] * 37) + " red"])
        assert c.hidden.shape == (2, 154, 32) and torch.equal(c.hidden[:1, :77], first.hidden)
    for pipe in (sd15, sdxl):  # and the images are the same
        on = generate(pipe, "a red circle", steps=2, seed=4, sampler="Euler", weighting=True)[0][0]
        off = generate(pipe, "a red circle", steps=2, seed=4, sampler="Euler")[0][0]
        assert np.abs(arr(on) - arr(off)).max() <= 1
    weighted = generate(sd15, "a (red:1.6) circle", steps=2, seed=4, sampler="Euler", weighting=True)[0][0]
    plain = generate(sd15, "a red circle", steps=2, seed=4, sampler="Euler", weighting=True)[0][0]
    assert np.abs(arr(weighted) - arr(plain)).mean() > 0.1  # the weight reaches the image


# ------------------------------------------------------------------------------------- memory

def test_memory_options_on_cpu(tiny_sd15_dir):
    pipe = fresh(tiny_sd15_dir)
    before = generate(pipe, ["a dog", "a cat"], steps=2, seed=2, sampler="DDIM")[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        applied = memory_options(pipe, attention_slicing=True, vae_slicing=True, vae_tiling=True, cpu_offload=True,
                                 fp16=True)
    messages = " | ".join(str(w.message) for w in caught)
    if not torch.cuda.is_available():
        assert applied == {"attention_slicing": True, "vae_slicing": True, "vae_tiling": True, "cpu_offload": False,
                           "fp16": False}
        assert "CPU offload needs a CUDA GPU" in messages and "fp16 needs a CUDA GPU" in messages
    assert pipe.vae.use_slicing and pipe.vae.use_tiling
    from diffusers.models.attention_processor import SlicedAttnProcessor

    assert all(isinstance(p, SlicedAttnProcessor) for p in pipe.unet.attn_processors.values())
    after = generate(pipe, ["a dog", "a cat"], steps=2, seed=2, sampler="DDIM")[0]
    for x, y in zip(before, after):  # the same images, with less memory
        assert np.abs(arr(x) - arr(y)).max() <= 1


# --------------------------------------------------------------------------------------- grids

def test_image_grid_layout_and_labels():
    rng = np.random.default_rng(0)
    cells = [[Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)) for _ in range(3)] for _ in range(2)]
    g = image_grid(cells, ["row one", "row two"], ["c1", "c2", "c3"], label_width=50, label_height=14, pad=2)
    assert g.size == (50 + 3 * (30 + 2), 14 + 2 * (20 + 2))
    a = np.asarray(g)
    for i in range(2):
        for j in range(3):
            x, y = 50 + j * 32, 14 + i * 22
            assert np.array_equal(a[y:y + 20, x:x + 30], np.asarray(cells[i][j]))
    for j in range(3):  # each column label is drawn above its column
        assert (a[:14, 50 + j * 32:50 + j * 32 + 30] < 128).any()
    for i in range(2):
        assert (a[14 + i * 22:14 + i * 22 + 20, :50] < 128).any()

    auto = image_grid(cells, ["a much longer row label here", "b"], ["c1", "c2", "c3"], title="My grid", zoom=2)
    w, h = auto.size
    a = np.asarray(auto)
    big = np.asarray(cells[1][2].resize((60, 40), Image.NEAREST))
    assert np.array_equal(a[h - 4 - 40:h - 4, w - 4 - 60:w - 4], big)  # last cell at bottom right (pad 4)
    assert (w - 3 * (60 + 4)) > auto.size[0] * 0.1  # room for the row labels
    with pytest.raises(ValueError, match="2 rows x 3 columns need 2 row labels"):
        image_grid(cells, ["x"], ["c1", "c2", "c3"])


def test_grid_prompt_x_weight(tiny_sd15_dir, lora_files, tmp_path):
    (f1, _), _ = lora_files
    pipe = fresh(tiny_sd15_dir)
    prompts = ["a red circle", "a blue square"]
    layout = {"label_width": 40, "label_height": 12, "pad": 2}
    kw = {"steps": 2, "sampler": "DDIM", "cfg_scale": 5.0}
    grid, cells, texts = grid_prompt_x_weight(pipe, prompts, f1, [0.0, 1.0], seed=[5, 9], layout=layout, **kw)
    assert grid.size == (40 + 2 * (32 + 2), 12 + 2 * (32 + 2))
    assert len(cells) == 2 and all(len(r) == 2 for r in cells)  # rows: weights, columns: prompts
    for i, w in enumerate([0.0, 1.0]):
        for j, seed in enumerate([5, 9]):
            p = parse_a1111_parameters(texts[i][j][0])
            assert p["seed"] == seed and p["loras"] == [("style_a", w)] and p["prompt"].startswith(prompts[j])
            assert p["lora_hashes"] == {"style_a": lora_hash(f1)}
            x, y = 40 + j * 34, 12 + i * 34
            assert np.array_equal(np.asarray(grid)[y:y + 32, x:x + 32], np.asarray(cells[i][j][0]))
    # weight 0 is the base model at the column's seed; weight 1 differs
    base = generate(fresh(tiny_sd15_dir), prompts[1], seed=9, **kw)[0][0]
    assert np.abs(arr(cells[0][1][0]) - arr(base)).max() <= 1
    assert np.abs(arr(cells[1][1][0]) - arr(base)).mean() > 2
    assert not any(pipe.get_list_adapters().values())  # the grid's LoRA is gone again
    gp = parse_a1111_parameters(grid.info["parameters"])
    assert gp["extra"]["X Type"] == "Prompt" and gp["extra"]["Y Type"] == "LoRA weight"
    assert gp["extra"]["X Values"] == "a red circle,a blue square" and gp["extra"]["Y Values"] == "0,1"

    paths = save_grid((grid, cells, texts), tmp_path / "grid.png")
    assert len(paths) == 5 and read_png_parameters(paths[0]) == grid.info["parameters"]
    assert read_png_parameters(tmp_path / "grid_cells" / "r01_c00_0.png") == texts[1][0][0]


def test_grid_prompt_x_checkpoint_keeps_other_loras(tiny_sd15_dir, lora_files):
    (f1, _), (f2, _) = lora_files
    pipe = fresh(tiny_sd15_dir)
    (kept,) = load_loras(pipe, [(f2, 0.5)])
    grid, cells, texts = grid_prompt_x_checkpoint(pipe, ["a cat"], [f1, f2], 0.8, seed=3, steps=2, sampler="DDIM",
                                                  images_per_cell=2)
    assert [parse_a1111_parameters(t)["seed"] for t in texts[0][0]] == [3, 4]  # two images per cell
    assert parse_a1111_parameters(texts[0][0][0])["loras"] == [("style_a", 0.8)]
    assert parse_a1111_parameters(texts[1][0][1])["loras"] == [("style_b", 0.8)]
    assert parse_a1111_parameters(texts[1][0][1])["lora_hashes"] == {"style_b": lora_hash(f2)}
    assert np.abs(arr(cells[0][0][0]) - arr(cells[1][0][0])).mean() > 1
    assert grid.size[1] > 2 * 32 and grid.size[0] > 2 * 32  # a cell is two images wide
    assert pipe.get_active_adapters() == [kept]  # the user's LoRA is active again, the grid's are gone
    assert set(pipe.get_list_adapters()["unet"]) == {kept}


def test_grid_sampler_x_steps(sd15):
    grid, cells, texts = grid_sampler_x_steps(sd15, "a dog", ["Euler", "DDIM"], [1, 3], seed=[1, 1])
    for i, steps in enumerate([1, 3]):
        for j, name in enumerate(["Euler", "DDIM"]):
            p = parse_a1111_parameters(texts[i][j][0])
            assert (p["sampler"], p["steps"], p["seed"]) == (name, steps, 1)
    assert np.abs(arr(cells[0][0][0]) - arr(cells[1][0][0])).mean() > 1
    gp = parse_a1111_parameters(grid.info["parameters"])
    assert (gp["extra"]["X Values"], gp["extra"]["Y Values"]) == ("Euler,DDIM", "1,3")


# ------------------------------------------------------------------------------------------ CLI

def test_generate_command_with_embedding_weighting_and_memory_options(tiny_sd15_dir, lora_files, tmp_path):
    from helpers.__main__ import main

    (f1, _), _ = lora_files
    emb = tmp_path / "shiny.safetensors"
    safetensors.torch.save_file({"emb_params": torch.randn(1, 32)}, str(emb))
    rc = main(["generate", "--model", str(tiny_sd15_dir), "--lora", f"{f1}:0.6", "--embedding", f"{emb}=glow",
               "--prompt", "a (glow:1.2) circle", "--weighting", "--attention-slicing", "--vae-slicing",
               "--sampler", "DPM++ 2M Karras", "--steps", "2", "--seed", "7", "--device", "cpu",
               "--out", str(tmp_path / "out")])
    assert rc == 0
    p = parse_a1111_parameters(read_png_parameters(tmp_path / "out" / "000_7.png"))
    assert p["prompt"] == "a (glow:1.2) circle <lora:style_a:0.6>"
    assert (p["sampler"], p["steps"], p["seed"]) == ("DPM++ 2M Karras", 2, 7)
    assert p["lora_hashes"] == {"style_a": lora_hash(f1)}
