"""LoRA files round-trip exactly (kohya and diffusers layouts), other tools' spellings load, and
bad files fail with errors a user can act on. Tiny SD 1.5 / SDXL pipelines, CPU, fp32 saves."""

from __future__ import annotations

import ast
import datetime
import hashlib
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch

import helpers
from helpers.formats.lora import (
    LoraModule, apply_lora, extract_peft_lora, kohya_metadata, kohya_module_names, load_lora,
    model_name_for_metadata, save_lora, to_diffusers_state_dict, to_kohya_state_dict
)
from helpers.sd.lora_targets import inject_lora, text_encoder_target_modules, unet_target_modules
from helpers.toy.tiny import build_tiny_sd15, build_tiny_sdxl, write_clip_tokenizer

BUILDERS = {"sd1": build_tiny_sd15, "sdxl": build_tiny_sdxl}
RANK, ALPHA = 4, 2.0  # alpha != rank, so a lost alpha shows up as a different image


def generate(pipe) -> np.ndarray:
    return pipe("a photo of sks dog", num_inference_steps=2, guidance_scale=5.0, height=32, width=32,
                generator=torch.Generator().manual_seed(0), output_type="np").images[0]


def components(family: str) -> list[str]:
    return ["unet", "text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread():
    # Tiny models: threads only add sync overhead, and on a shared 2-core machine oversubscribed
    # OpenMP threads made these tests ~8x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return write_clip_tokenizer(tmp_path_factory.mktemp("tok"))


_TRAINED: dict[str, SimpleNamespace] = {}


def trained_lora(family: str, tok_dir) -> SimpleNamespace:
    """A tiny pipeline with a peft LoRA (preset full, rank 4, alpha 2) on UNet and text encoders,
    set to random non-zero values as after training; its images with and without the LoRA."""
    if family in _TRAINED:
        return _TRAINED[family]
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer

    build = BUILDERS[family]
    pipe = build(tok_dir)
    base = generate(pipe)
    gen = torch.Generator().manual_seed(1)
    injected = {}
    for comp in components(family):
        model = getattr(pipe, comp)
        names = unet_target_modules(model, "full") if comp == "unet" else text_encoder_target_modules(model, "full")
        inject_lora(model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=names))  # as the trainer does
        injected[comp] = (names, sorted(n for n, m in model.named_modules() if isinstance(m, LoraLayer)))
        for n, p in model.named_parameters():
            if ".lora_" in n:  # lora_B starts at zero: give every factor trained-looking values
                p.data = torch.randn(p.shape, generator=gen) * 0.1
    image = generate(pipe)
    weights = {comp: extract_peft_lora(getattr(pipe, comp)) for comp in components(family)}
    _TRAINED[family] = SimpleNamespace(family=family, pipe=pipe, base=base, image=image, weights=weights,
                                       injected=injected, build=lambda: build(tok_dir))
    return _TRAINED[family]


def assert_same_weights(a, b):
    assert set(a) == set(b)
    for comp in a:
        assert set(a[comp]) == set(b[comp]), comp
        for name in a[comp]:
            x, y = a[comp][name], b[comp][name]
            assert torch.equal(x.down, y.down) and torch.equal(x.up, y.up), f"{comp}.{name}"
            assert x.alpha == y.alpha, f"{comp}.{name}: alpha {x.alpha} != {y.alpha}"


def max_diff(a, b) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


# ------------------------------------------------------------------------- training side

@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_peft_injection_and_extraction(family, tok_dir):
    t = trained_lora(family, tok_dir)
    for comp, (names, wrapped) in t.injected.items():
        assert wrapped == names, comp  # LoraConfig(target_modules=<full names>) wraps exactly those
        assert sorted(t.weights[comp]) == names  # extracted under the plain model's names
    m = t.weights["unet"][t.injected["unet"][0][0]]
    assert (m.rank, m.alpha, m.scale) == (RANK, ALPHA, ALPHA / RANK)
    assert all(float(x.up.abs().sum()) > 0 for w in t.weights.values() for x in w.values())
    assert max_diff(t.image, t.base) > 1e-3  # the LoRA changes the image


# ------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_round_trip_gives_the_same_image(family, fmt, tok_dir, tmp_path):
    t = trained_lora(family, tok_dir)
    path = tmp_path / ("lora.safetensors" if fmt == "kohya" else "lora_folder")
    save_lora(path, t.weights, family=family, unet_config=t.pipe.unet.config, format=fmt, dtype=torch.float32,
              metadata={"ss_output_name": "roundtrip"})
    assert not list(tmp_path.glob("*.tmp")), "temp file left behind"

    fresh = t.build()
    weights, meta = load_lora(path, fresh)
    assert_same_weights(weights, t.weights)  # exact tensors, alpha 2 everywhere
    assert meta["ss_output_name"] == "roundtrip"

    apply_lora(fresh, weights, "roundtrip_lora")
    assert max_diff(generate(fresh), t.image) < 1e-5
    for comp in components(family):  # the adapter in the pipeline carries the true alpha
        assert getattr(fresh, comp).peft_config["roundtrip_lora"].lora_alpha == ALPHA
        assert_same_weights({comp: extract_peft_lora(getattr(fresh, comp), "roundtrip_lora")},
                            {comp: t.weights[comp]})

    fresh.set_adapters(["roundtrip_lora"], adapter_weights=[0.0])
    assert max_diff(generate(fresh), t.base) < 1e-6


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_diffusers_own_loader_reads_our_files(family, tok_dir, tmp_path):
    """diffusers' `load_lora_weights` (its kohya converter, like ComfyUI's key mapping) reads our
    kohya file, text-encoder keys with `text_model_` included: diffusers 0.42 strips `text_model.`
    itself when transformers 5's CLIPTextModel lacks that level. It reads our diffusers folder too."""
    t = trained_lora(family, tok_dir)
    kohya = save_lora(tmp_path / "k.safetensors", t.weights, family=family, unet_config=t.pipe.unet.config,
                      dtype=torch.float32)
    folder = save_lora(tmp_path / "d", t.weights, family=family, unet_config=t.pipe.unet.config,
                       format="diffusers", dtype=torch.float32)
    for path in (kohya, folder):
        pipe = t.build()
        pipe.load_lora_weights(str(path), adapter_name="their_loader")
        assert pipe.unet.peft_config["their_loader"].lora_alpha == ALPHA
        assert max_diff(generate(pipe), t.image) < 1e-5, path.name


# ------------------------------------------------------------------------- file contents

def test_kohya_keys_and_metadata_sd1(tok_dir, tmp_path):
    t = trained_lora("sd1", tok_dir)
    meta = kohya_metadata(family="sd1", rank=RANK, alpha=ALPHA, output_name="sks_dog", resolution=512,
                          clip_skip=None, num_train_images=12, tag_frequency={"10_sks dog": {"sks": 12, "dog": 7}},
                          steps=300, epoch=3, extra={"ss_learning_rate": 1e-4, "ss_datasets": [{"n": 1}]},
                          timestamp=1_700_000_000.0)
    path = save_lora(tmp_path / "sd1.safetensors", t.weights, family="sd1", dtype=torch.float16, metadata=meta)
    sd = safetensors.torch.load_file(str(path))
    with safetensors.safe_open(str(path), framework="pt") as f:
        file_meta = f.metadata()
    for key in ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight",
                "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight",
                "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight",
                "lora_unet_up_blocks_3_attentions_1_transformer_blocks_0_ff_net_0_proj.alpha",
                "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha",
                "lora_te_text_model_encoder_layers_1_self_attn_out_proj.lora_up.weight"):
        assert key in sd, key
    assert len(sd) == 3 * (120 + 12)
    assert not any(k.startswith(("lora_te1_", "lora_te2_")) for k in sd)
    assert sd["lora_te_text_model_encoder_layers_0_mlp_fc1.alpha"].item() == ALPHA
    assert sd["lora_te_text_model_encoder_layers_0_mlp_fc1.alpha"].shape == ()
    assert sd["lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"].dtype == torch.float16
    assert sd["lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"].dim() == 4  # 1x1 conv in SD 1.x

    assert all(isinstance(v, str) for v in file_meta.values())
    assert file_meta["ss_network_module"] == "networks.lora"
    assert (file_meta["ss_network_dim"], file_meta["ss_network_alpha"]) == ("4", "2.0")
    assert file_meta["ss_base_model_version"] == "sd_v1" and file_meta["ss_v2"] == "False"
    assert ast.literal_eval(file_meta["ss_resolution"]) == (512, 512)
    assert file_meta["ss_clip_skip"] == "None" and "modelspec.encoder_layer" not in file_meta
    assert json.loads(file_meta["ss_tag_frequency"]) == {"10_sks dog": {"sks": 12, "dog": 7}}
    assert (file_meta["ss_steps"], file_meta["ss_epoch"], file_meta["ss_num_train_images"]) == ("300", "3", "12")
    assert float(file_meta["ss_learning_rate"]) == 1e-4 and json.loads(file_meta["ss_datasets"]) == [{"n": 1}]
    assert file_meta["modelspec.sai_model_spec"] == "1.0.1"
    assert file_meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert file_meta["modelspec.implementation"] == "diffusers"
    assert file_meta["modelspec.implementation_version"] == f"sd-lora-helpers/{helpers.__version__}"
    assert file_meta["modelspec.title"] == "sks_dog" and file_meta["modelspec.resolution"] == "512x512"
    assert file_meta["modelspec.prediction_type"] == "epsilon"
    assert datetime.datetime.fromisoformat(file_meta["modelspec.date"]) == \
        datetime.datetime.fromtimestamp(1_700_000_000)
    # sshs_model_hash is the sha256 of the tensor data (what A1111 shows as the LoRA's hash).
    raw = path.read_bytes()
    header = int.from_bytes(raw[:8], "little")
    assert file_meta["sshs_model_hash"] == hashlib.sha256(raw[8 + header:]).hexdigest()
    assert len(file_meta["sshs_legacy_hash"]) == 8


def test_kohya_keys_and_metadata_sdxl(tok_dir, tmp_path):
    t = trained_lora("sdxl", tok_dir)
    sd = to_kohya_state_dict(t.weights, "sdxl", t.pipe.unet.config, dtype=torch.float32)
    for key in ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight",
                "lora_unet_input_blocks_7_1_transformer_blocks_1_ff_net_2.lora_up.weight",
                "lora_unet_middle_block_1_proj_out.alpha",
                "lora_unet_output_blocks_0_1_transformer_blocks_1_attn1_to_out_0.lora_down.weight",
                "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
                "lora_te2_text_model_encoder_layers_1_self_attn_out_proj.lora_up.weight",
                "lora_te2_text_model_encoder_layers_1_self_attn_out_proj.alpha"):
        assert key in sd, key
    assert not any("down_blocks" in k or "up_blocks" in k or "mid_block_" in k or k.startswith("lora_te_")
                   for k in sd)
    m = t.weights["unet"]["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"]
    assert torch.equal(sd["lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight"], m.down)

    meta = kohya_metadata(family="sdxl", rank=8, alpha=4, output_name="x", resolution=(1024, 768), clip_skip=2,
                          num_train_images=3, tag_frequency={}, steps=10, epoch=1, title="My LoRA")
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert meta["modelspec.resolution"] == "1024x768" and meta["ss_resolution"] == "(1024, 768)"
    assert (meta["ss_clip_skip"], meta["modelspec.encoder_layer"]) == ("2", "2")
    assert meta["modelspec.title"] == "My LoRA" and meta["ss_network_alpha"] == "4.0"


def test_metadata_sd2_v_prediction_and_bad_values():
    meta = kohya_metadata(family="sd2", rank=4, alpha=1, output_name="x", resolution=768, clip_skip=None,
                          num_train_images=1, tag_frequency={}, steps=1, epoch=1, prediction_type="v_prediction")
    assert meta["ss_base_model_version"] == "sd_v2_v" and meta["ss_v2"] == "True"
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert meta["modelspec.prediction_type"] == "v"
    with pytest.raises(ValueError, match="tag_frequency"):
        kohya_metadata(family="sd1", rank=4, alpha=1, output_name="x", resolution=512, clip_skip=None,
                       num_train_images=1, tag_frequency={"sks": 3}, steps=1, epoch=1)
    with pytest.raises(ValueError, match="family"):
        kohya_metadata(family="sd15", rank=4, alpha=1, output_name="x", resolution=512, clip_skip=None,
                       num_train_images=1, tag_frequency={}, steps=1, epoch=1)


def test_save_checks_and_overwrite(tok_dir, tmp_path):
    t = trained_lora("sd1", tok_dir)
    with pytest.raises(ValueError, match=".safetensors"):
        save_lora(tmp_path / "lora.pt", t.weights, family="sd1")
    with pytest.raises(TypeError, match="ss_steps"):
        save_lora(tmp_path / "a.safetensors", t.weights, family="sd1", metadata={"ss_steps": 10})
    with pytest.raises(ValueError, match="text_encoder_2"):
        save_lora(tmp_path / "a.safetensors", {"text_encoder_2": t.weights["text_encoder"]}, family="sd1")
    folder = tmp_path / "d"
    save_lora(folder, t.weights, family="sd1", format="diffusers", dtype=torch.float32)
    half = {c: {n: LoraModule(m.down, m.up * 0.5, m.alpha) for n, m in w.items()} for c, w in t.weights.items()}
    save_lora(folder, half, family="sd1", format="diffusers", dtype=torch.float32)  # replaces the folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    assert_same_weights(load_lora(folder, t.build())[0], half)


# ------------------------------------------------------------------------- per-module rank/alpha

def test_per_module_rank_and_alpha_survive_diffusers_format(tok_dir, tmp_path):
    t = trained_lora("sdxl", tok_dir)
    weights = {c: dict(w) for c, w in t.weights.items()}
    q = "down_blocks.2.attentions.0.transformer_blocks.1.attn1.to_q"
    fc1 = "text_model.encoder.layers.1.mlp.fc1"
    weights["unet"][q] = LoraModule(weights["unet"][q].down[:2].clone(), weights["unet"][q].up[:, :2].clone(), 7.0)
    te2 = weights["text_encoder_2"][fc1]
    weights["text_encoder_2"][fc1] = LoraModule(te2.down, te2.up, 3.0)
    folder = save_lora(tmp_path / "d", weights, family="sdxl", format="diffusers", dtype=torch.float32)
    fresh = t.build()
    loaded, _ = load_lora(folder, fresh)
    assert_same_weights(loaded, weights)
    apply_lora(fresh, loaded, "patterned")
    for comp, name, r, alpha in (("unet", q, 2, 7.0), ("text_encoder_2", fc1, 4, 3.0),
                                 ("unet", "down_blocks.1.attentions.0.proj_in", 4, ALPHA)):
        layer = dict(getattr(fresh, comp).named_modules())[name]
        assert layer.r["patterned"] == r and layer.scaling["patterned"] == pytest.approx(alpha / r)


# ------------------------------------------------------------------------- other tools' files

def _rename_modules(sd: dict, rename: dict) -> dict:
    """A kohya state dict with its module names (the part before the first '.') renamed."""
    out = {}
    for k, v in sd.items():
        mod, _, suffix = k.partition(".")
        out[f"{rename.get(mod, mod)}.{suffix}"] = v
    return out


def test_sdxl_kohya_file_with_diffusers_unet_names(tok_dir):
    t = trained_lora("sdxl", tok_dir)
    sd = to_kohya_state_dict(t.weights, "sdxl", t.pipe.unet.config, dtype=torch.float32)
    names = list(t.weights["unet"])
    sgm = kohya_module_names("unet", names, "sdxl", t.pipe.unet.config)
    diffusers_style = kohya_module_names("unet", names, "sd1")  # lora_unet_down_blocks_1_...
    rename = {sgm[n]: diffusers_style[n] for n in names}
    renamed = _rename_modules(sd, rename)
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight" in renamed
    weights, meta = load_lora(renamed, t.build())
    assert meta == {}
    assert_same_weights(weights, t.weights)


def test_sd1_kohya_file_with_original_unet_names(tok_dir):
    t = trained_lora("sd1", tok_dir)
    sd = to_kohya_state_dict(t.weights, "sd1", dtype=torch.float32)
    names = list(t.weights["unet"])
    ldm = kohya_module_names("unet", names, "sdxl", t.pipe.unet.config)  # original-layout UNet names
    plain = kohya_module_names("unet", names, "sd1")
    rename = {plain[n]: ldm[n] for n in names}
    renamed = _rename_modules(sd, rename)
    assert "lora_unet_input_blocks_1_1_proj_in.lora_down.weight" in renamed
    assert_same_weights(load_lora(renamed, t.build())[0], t.weights)


def test_diffusers_convert_state_dict_to_kohya_output_loads(tok_dir):
    """diffusers' own exporter writes `lora_te1_` for SD 1.x, no `text_model_` with transformers 5
    and alpha = rank whatever the real alpha: we read its keys, and its (wrong) alpha as stored."""
    from diffusers.utils import convert_state_dict_to_kohya

    t = trained_lora("sd1", tok_dir)
    peft_sd = {}
    for comp, modules in t.weights.items():
        for name, m in modules.items():
            peft_sd[f"{comp}.{name}.lora_A.weight"] = m.down
            peft_sd[f"{comp}.{name}.lora_B.weight"] = m.up
    kohya = convert_state_dict_to_kohya(peft_sd)
    assert "lora_te1_encoder_layers_0_self_attn_q_proj.lora_down.weight" in kohya
    weights, _ = load_lora(kohya, t.build())
    expected = {c: {n: LoraModule(m.down, m.up, float(RANK)) for n, m in w.items()} for c, w in t.weights.items()}
    assert_same_weights(weights, expected)


def test_peft_and_attn_procs_files_from_other_tools(tok_dir):
    t = trained_lora("sd1", tok_dir)
    # peft keys without adapter metadata: diffusers' convention is alpha = rank (scale 1).
    plain = {k.replace("text_encoder.text_model.", "text_encoder."): v
             for k, v in to_diffusers_state_dict(t.weights).items()}
    weights, _ = load_lora(plain, t.build())
    assert_same_weights(weights, {c: {n: LoraModule(m.down, m.up, float(RANK)) for n, m in w.items()}
                                  for c, w in t.weights.items()})
    # Old attn-procs layout: `attn1.processor.to_q_lora.down.weight`, text encoder `lora_linear_layer`.
    old = {}
    for name, m in t.weights["unet"].items():
        if ".attn1." in name or ".attn2." in name:
            mod = name.replace(".attn1.", ".attn1.processor.").replace(".attn2.", ".attn2.processor.")
            mod = mod.removesuffix(".0") + "_lora"
            old[f"unet.{mod}.down.weight"], old[f"unet.{mod}.up.weight"] = m.down, m.up
    for name, m in t.weights["text_encoder"].items():
        mod = f"text_encoder.text_model.{name}.lora_linear_layer"
        old[f"{mod}.down.weight"], old[f"{mod}.up.weight"] = m.down, m.up
    weights, _ = load_lora(old, t.build())
    assert len(weights["unet"]) == 80 and len(weights["text_encoder"]) == 12
    q = "up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_out.0"
    assert torch.equal(weights["unet"][q].up, t.weights["unet"][q].up)


# ------------------------------------------------------------------------- errors users can read

def test_sdxl_lora_on_sd15_says_which_family(tok_dir):
    sdxl, sd1 = trained_lora("sdxl", tok_dir), trained_lora("sd1", tok_dir)
    sd = to_kohya_state_dict(sdxl.weights, "sdxl", sdxl.pipe.unet.config, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"looks made for SDXL .*lora_te2.* model is SD 1\.x"):
        load_lora(sd, sd1.build())
    unet_only = {k: v for k, v in sd.items() if k.startswith("lora_unet_")}
    with pytest.raises(ValueError, match=r"looks made for SDXL .* model is SD 1\.x"):
        load_lora(unet_only, sd1.build())
    sd15_file = to_kohya_state_dict(sd1.weights, "sd1", dtype=torch.float32)
    with pytest.raises(ValueError, match=r"looks made for SD 1\.x/2\.x .* model is SDXL"):
        load_lora(sd15_file, sdxl.build())


def test_unknown_keys_and_shape_mismatch_are_listed(tok_dir, tmp_path):
    t = trained_lora("sd1", tok_dir)
    sd = to_kohya_state_dict(t.weights, "sd1", dtype=torch.float32)
    bad = dict(sd)
    bad["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn3_to_q.lora_down.weight"] = torch.zeros(4, 32)
    bad["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn3_to_q.lora_up.weight"] = torch.zeros(32, 4)
    bad["some_other_tensor"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"2 LoRA key\(s\) match no module.*attn3_to_q.*some_other_tensor"):
        load_lora(bad, t.build())
    wrong = dict(sd)
    key = "lora_te_text_model_encoder_layers_0_mlp_fc2.lora_down.weight"
    wrong[key] = torch.zeros(4, 99)
    with pytest.raises(ValueError, match=r"text_encoder\.encoder\.layers\.0\.mlp\.fc2: expected down \[4, 64\].*"
                                         r"got down \[4, 99\]"):
        load_lora(wrong, t.build())
    peft_dora = {"unet.down_blocks.0.attentions.0.proj_in.lora_magnitude_vector": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"a LoRA variant we cannot load \(peft's DoRA with a magnitude per output"):
        load_lora(peft_dora, t.build())
    half_loha = {"lora_te_text_model_encoder_layers_0_mlp_fc2.hada_w1_a": torch.zeros(64, 2),
                 "lora_te_text_model_encoder_layers_0_mlp_fc2.hada_w1_b": torch.zeros(2, 64)}
    with pytest.raises(ValueError, match="a LoHa needs hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b; missing "
                                         "hada_w2_a, hada_w2_b"):
        load_lora(half_loha, t.build())
    pickle = tmp_path / "lora.pt"
    pickle.write_bytes(b"not read")
    with pytest.raises(ValueError, match="only .safetensors"):
        load_lora(pickle, t.build())


# ------------------------------------------------------------------------- multi-adapter inference

def test_adapters_combine_with_set_adapters(tok_dir):
    t = trained_lora("sd1", tok_dir)
    pipe = t.build()
    apply_lora(pipe, t.weights, "style_one")
    apply_lora(pipe, t.weights, "style_two", scale=0.5)
    assert sorted(pipe.get_active_adapters()) == ["style_one", "style_two"]  # the first stays active
    # Two identical LoRAs at 0.5 each are the LoRA at 1.0.
    pipe.set_adapters(["style_one", "style_two"], adapter_weights=[0.5, 0.5])
    assert max_diff(generate(pipe), t.image) < 1e-5
    # apply_lora(scale=s) is set_adapters weight s.
    half = t.build()
    apply_lora(half, t.weights, "style_half", scale=0.5)
    pipe.set_adapters(["style_one"], adapter_weights=[0.5])
    assert max_diff(generate(half), generate(pipe)) < 1e-6
    assert max_diff(generate(half), t.image) > 1e-4
    with pytest.raises(ValueError, match="already loaded"):
        apply_lora(pipe, t.weights, "style_one")


def test_the_version_in_files_is_the_package_version_even_from_a_checkout():
    """A Colab checkout runs without `pip install -e .`: the version comes from the package, not from pip."""
    pyproject = (Path(helpers.__file__).parents[1] / "pyproject.toml").read_text(encoding="utf-8")
    assert 'version = { attr = "helpers.__version__" }' in pyproject
    assert re.fullmatch(r"\d+\.\d+\.\d+", helpers.__version__)
    meta = kohya_metadata(family="sd1", rank=4, alpha=2, output_name="x", resolution=512, clip_skip=None,
                          num_train_images=1, tag_frequency={}, steps=1, epoch=1)
    assert meta["modelspec.implementation_version"] == f"sd-lora-helpers/{helpers.__version__}"


@pytest.mark.parametrize("source, name", [
    ("stable-diffusion-v1-5/stable-diffusion-v1-5", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
    ("/content/drive/MyDrive/models/dreamshaper_8.safetensors", "dreamshaper_8.safetensors"),
    ("/content/drive/MyDrive/models/sd15-diffusers/", "sd15-diffusers"),
    ("C:\\Users\\ana\\models\\anything-v5.safetensors", "anything-v5.safetensors"),
    ("./models/sd15", "sd15"),
    ("model.safetensors", "model.safetensors"),
])
def test_metadata_names_a_local_base_model_by_its_base_name(source, name):
    assert model_name_for_metadata(source) == name
