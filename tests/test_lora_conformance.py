"""Our LoRA module selection and kohya key names match what sd-scripts trains and A1111/ComfyUI map,
checked on full-size SD 1.5, SD 2.x and SDXL models built on the meta device (no weights).

The expected names are derived here independently of helpers/: from sd-scripts' selection rule
(every Linear / 1x1 Conv2d inside Transformer2DModel, CLIPAttention and CLIPMLP, named
`prefix.module.child` with dots -> underscores) and from the original LDM/SGM block layouts.
"""

from __future__ import annotations

import re

import pytest
import torch

from helpers.formats.lora import LoraModule, to_kohya_state_dict
from helpers.sd.lora_targets import PRESETS, inject_lora, text_encoder_target_modules, unet_target_modules

# Real configs (diffusers unet/config.json, transformers text_encoder*/config.json of the hub models).
SD15_UNET = dict(
    act_fn="silu", attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280], center_input_sample=False,
    cross_attention_dim=768,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
    mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32, out_channels=4, sample_size=64,
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
)
SD21_UNET = dict(SD15_UNET, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, sample_size=96,
                 use_linear_projection=True)
SDXL_UNET = dict(
    act_fn="silu", addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], downsample_padding=1,
    flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2, mid_block_scale_factor=1,
    norm_eps=1e-5, norm_num_groups=32, out_channels=4, projection_class_embeddings_input_dim=2816,
    sample_size=128, transformer_layers_per_block=[1, 2, 10],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], use_linear_projection=True,
)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
OPENCLIP_H = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                  num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512)
OPENCLIP_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                     num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)

CLIP_LEAVES = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")
TRANSFORMER_LEAVES = [f"attn{a}_{p}" for a in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out_0")] + \
                     ["ff_net_0_proj", "ff_net_2"]


@pytest.fixture(scope="module")
def models():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        return {
            "sd1": {"unet": UNet2DConditionModel(**SD15_UNET),
                    "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L))},
            "sd2": {"unet": UNet2DConditionModel(**SD21_UNET),
                    "text_encoder": CLIPTextModel(CLIPTextConfig(**OPENCLIP_H))},
            "sdxl": {"unet": UNet2DConditionModel(**SDXL_UNET),
                     "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L)),
                     "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**OPENCLIP_BIGG))},
        }


UNET_CFG = {"sd1": SD15_UNET, "sd2": SD21_UNET, "sdxl": SDXL_UNET}


def targets(comp: str, model, preset: str = "full") -> list[str]:
    return unet_target_modules(model, preset) if comp == "unet" else text_encoder_target_modules(model, preset)


def meta_weights(model, names, rank=4, alpha=2.0) -> dict[str, LoraModule]:
    """LoRA modules with meta tensors of the right shapes (kohya layout: conv down keeps the kernel)."""
    mods = dict(model.named_modules())
    out = {}
    for n in names:
        m = mods[n]
        m = m.get_base_layer() if hasattr(m, "get_base_layer") else m  # peft wrapper -> the layer
        if isinstance(m, torch.nn.Conv2d):
            down = torch.empty(rank, m.in_channels, *m.kernel_size, device="meta")
            up = torch.empty(m.out_channels, rank, 1, 1, device="meta")
        else:
            down = torch.empty(rank, m.in_features, device="meta")
            up = torch.empty(m.out_features, rank, device="meta")
        out[n] = LoraModule(down, up, alpha)
    return out


def kohya_modules(family: str, models, preset: str = "full") -> dict[str, dict[str, tuple]]:
    """kohya module name -> {suffix: shape} of what our exporter writes for `preset`."""
    weights = {c: meta_weights(m, targets(c, m, preset)) for c, m in models[family].items()}
    sd = to_kohya_state_dict(weights, family, UNET_CFG[family])
    out: dict[str, dict[str, tuple]] = {}
    for k, v in sd.items():
        mod, _, suffix = k.partition(".")
        out.setdefault(mod, {})[suffix] = tuple(v.shape)
    return out


def sd_scripts_rule(root, prefix: str, containers: tuple[str, ...], add_text_model: bool = False) -> set[str]:
    """sd-scripts' default selection, re-stated: for each module whose class name is a container,
    every descendant Linear or 1x1 Conv2d, named prefix_<module>_<child> with '.' -> '_'.
    sd-scripts ran on transformers 4, whose CLIPTextModel had a `text_model` level; transformers 5's
    has not, so it is added back (`add_text_model`) to get sd-scripts' names."""
    names = set()
    for name, module in root.named_modules():
        if type(module).__name__ not in containers:
            continue
        for child_name, child in module.named_modules():
            cls = type(child).__name__
            if cls == "Linear" or (cls == "Conv2d" and tuple(child.kernel_size) == (1, 1)):
                full = f"{name}.{child_name}"
                if add_text_model and not full.startswith("text_model."):
                    full = "text_model." + full
                names.add(f"{prefix}.{full}".replace(".", "_"))
    return names


# ----------------------------------------------------------------- expected names, from layouts

def sd1_unet_expected() -> set[str]:
    """sd-scripts' SD 1.x/2.x UNet keys use diffusers names: 16 transformers of depth 1."""
    blocks = [f"down_blocks_{i}_attentions_{j}" for i in range(3) for j in range(2)]
    blocks += ["mid_block_attentions_0"]
    blocks += [f"up_blocks_{i}_attentions_{j}" for i in range(1, 4) for j in range(3)]
    out = set()
    for b in blocks:
        out |= {f"lora_unet_{b}_proj_in", f"lora_unet_{b}_proj_out"}
        out |= {f"lora_unet_{b}_transformer_blocks_0_{leaf}" for leaf in TRANSFORMER_LEAVES}
    return out


def sdxl_unet_expected() -> set[str]:
    """sd-scripts trains SDXL on its SGM-layout UNet: transformers at input_blocks 4,5 (depth 2),
    7,8 (depth 10), middle_block.1 (10), output_blocks 0-2 (10) and 3-5 (2)."""
    blocks = {"input_blocks_4_1": 2, "input_blocks_5_1": 2, "input_blocks_7_1": 10, "input_blocks_8_1": 10,
              "middle_block_1": 10}
    blocks.update({f"output_blocks_{i}_1": 10 for i in range(3)})
    blocks.update({f"output_blocks_{i}_1": 2 for i in range(3, 6)})
    out = set()
    for b, depth in blocks.items():
        out |= {f"lora_unet_{b}_proj_in", f"lora_unet_{b}_proj_out"}
        out |= {f"lora_unet_{b}_transformer_blocks_{d}_{leaf}" for d in range(depth) for leaf in TRANSFORMER_LEAVES}
    return out


def te_expected(prefix: str, layers: int) -> set[str]:
    return {f"{prefix}_text_model_encoder_layers_{i}_{leaf}" for i in range(layers) for leaf in CLIP_LEAVES}


# ----------------------------------------------------------------------------------- tests

def test_unknown_preset_names_the_allowed_values(models):
    unet = models["sd1"]["unet"]
    with pytest.raises(ValueError, match=r"attention.*full"):
        unet_target_modules(unet, "everything")
    with pytest.raises(ValueError, match=r"attention.*full"):
        text_encoder_target_modules(models["sd1"]["text_encoder"], "attn")
    assert PRESETS == ("attention", "full")


@pytest.mark.parametrize("family,counts", [
    ("sd1", {"unet": 192, "text_encoder": 72}),
    ("sd2", {"unet": 192, "text_encoder": 138}),
    ("sdxl", {"unet": 722, "text_encoder": 72, "text_encoder_2": 192}),
])
def test_full_preset_counts_match_sd_scripts(models, family, counts):
    # sd-scripts logs "create LoRA for U-Net: 192 modules" / "Text Encoder: 72" for SD 1.5 and
    # 722 / 72 + 192 for SDXL; SD 2.x's 23-layer OpenCLIP-H text encoder gives 23 * 6 = 138.
    got = {c: len(targets(c, m)) for c, m in models[family].items()}
    assert got == counts


@pytest.mark.parametrize("family,counts", [
    ("sd1", {"unet": 128, "text_encoder": 48}),
    ("sdxl", {"unet": 560, "text_encoder": 48, "text_encoder_2": 128}),
])
def test_attention_preset_is_the_attention_projections(models, family, counts):
    for comp, model in models[family].items():
        names = targets(comp, model, "attention")
        assert len(names) == counts[comp]
        leaf = r"(attn[12]\.(to_q|to_k|to_v|to_out\.0))" if comp == "unet" else r"(self_attn\.(q|k|v|out)_proj)"
        assert all(re.search(leaf + "$", n) for n in names), names[:3]
        assert set(names) <= set(targets(comp, model, "full"))


def test_sd1_kohya_keys_are_sd_scripts_keys(models):
    mods = kohya_modules("sd1", models)
    expected = sd1_unet_expected() | te_expected("lora_te", 12)
    assert set(mods) == expected
    # ... and exactly what sd-scripts' class-name rule selects on the same models.
    rule = sd_scripts_rule(models["sd1"]["unet"], "lora_unet", ("Transformer2DModel",))
    rule |= sd_scripts_rule(models["sd1"]["text_encoder"], "lora_te", ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"),
                            add_text_model=True)
    assert set(mods) == rule
    for m in mods.values():
        assert set(m) == {"lora_down.weight", "lora_up.weight", "alpha"}
    # SD 1.x proj_in/out are 1x1 convs: kohya stores 4-D conv weights for them.
    assert mods["lora_unet_down_blocks_0_attentions_0_proj_in"]["lora_down.weight"] == (4, 320, 1, 1)
    assert mods["lora_unet_down_blocks_0_attentions_0_proj_in"]["lora_up.weight"] == (320, 4, 1, 1)
    assert mods["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k"]["lora_down.weight"] == (4, 768)
    assert mods["lora_te_text_model_encoder_layers_11_mlp_fc1"]["lora_up.weight"] == (3072, 4)
    assert mods["lora_te_text_model_encoder_layers_0_self_attn_q_proj"]["alpha"] == ()


def test_sd1_unet_keys_map_to_original_modules_as_a1111_does(models):
    """A1111 renames SD 1.x diffusers-style keys to the LDM layout (down_blocks.i.attentions.j ->
    input_blocks.(3i+j+1).1, mid_block.attentions.0 -> middle_block.1, up_blocks.i.attentions.j ->
    output_blocks.(3i+j).1); each renamed module must exist in the original UNet."""
    from helpers.formats.checkpoint import unet_key_map

    original = {k.rsplit(".", 1)[0].replace(".", "_") for k in unet_key_map(SD15_UNET).values()}
    for key in kohya_modules("sd1", models):
        if not key.startswith("lora_unet_"):
            continue
        name = key[len("lora_unet_"):]
        m = re.match(r"down_blocks_(\d)_attentions_(\d)_(.*)", name)
        if m:
            ldm = f"input_blocks_{3 * int(m[1]) + int(m[2]) + 1}_1_{m[3]}"
        elif name.startswith("mid_block_attentions_0_"):
            ldm = "middle_block_1_" + name[len("mid_block_attentions_0_"):]
        else:
            m = re.match(r"up_blocks_(\d)_attentions_(\d)_(.*)", name)
            assert m, key
            ldm = f"output_blocks_{3 * int(m[1]) + int(m[2])}_1_{m[3]}"
        assert ldm in original, f"{key} -> {ldm} is not an original SD 1.x module"


def test_sd2_kohya_keys(models):
    mods = kohya_modules("sd2", models)
    assert set(mods) == sd1_unet_expected() | te_expected("lora_te", 23)
    # SD 2.x uses linear proj_in/out and 1024-wide cross-attention.
    assert mods["lora_unet_down_blocks_0_attentions_0_proj_in"]["lora_down.weight"] == (4, 320)
    assert mods["lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_v"]["lora_down.weight"] == (4, 1024)


def test_sdxl_kohya_keys_are_sd_scripts_sgm_keys(models):
    from helpers.formats.checkpoint import unet_key_map

    mods = kohya_modules("sdxl", models)
    unet_keys = {k for k in mods if k.startswith("lora_unet_")}
    assert unet_keys == sdxl_unet_expected()
    assert {k for k in mods if k.startswith("lora_te1_")} == te_expected("lora_te1", 12)
    assert {k for k in mods if k.startswith("lora_te2_")} == te_expected("lora_te2", 32)
    assert len(mods) == 722 + 72 + 192
    # Every UNet key names a module of the original SGM UNet (weights `<module>.weight` exist there).
    original = {k.rsplit(".", 1)[0].replace(".", "_")
                for k in unet_key_map(SDXL_UNET).values() if k.endswith(".weight")}
    assert {k[len("lora_unet_"):] for k in unet_keys} <= original
    # The same set as sd-scripts' class-name rule, once diffusers names are given their SGM names.
    rule = sd_scripts_rule(models["sdxl"]["text_encoder"], "lora_te1", ("CLIPAttention", "CLIPMLP"),
                           add_text_model=True)
    rule |= sd_scripts_rule(models["sdxl"]["text_encoder_2"], "lora_te2", ("CLIPAttention", "CLIPMLP"))
    assert {k for k in mods if not k.startswith("lora_unet_")} == rule
    assert len(sd_scripts_rule(models["sdxl"]["unet"], "lora_unet", ("Transformer2DModel",))) == len(unet_keys)
    # Shapes: linear proj_in, 2048-wide cross-attention, bigG MLP.
    assert mods["lora_unet_input_blocks_4_1_proj_in"]["lora_down.weight"] == (4, 640)
    assert mods["lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"]["lora_down.weight"] == (4, 2048)
    assert mods["lora_unet_middle_block_1_transformer_blocks_9_ff_net_0_proj"]["lora_up.weight"] == (10240, 4)
    assert mods["lora_te2_text_model_encoder_layers_31_mlp_fc1"]["lora_up.weight"] == (5120, 4)
    assert mods["lora_te1_text_model_encoder_layers_0_self_attn_out_proj"]["lora_down.weight"] == (4, 768)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_peft_injects_exactly_the_target_lists(models, family):
    """The trainer passes these lists to LoraConfig(target_modules=...): peft (through inject_lora, as the
    trainer calls it) must wrap exactly those modules, on the full-size layouts."""
    from diffusers.utils.peft_utils import recurse_remove_peft_layers
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer

    for comp, model in models[family].items():
        names = targets(comp, model)
        inject_lora(model, LoraConfig(r=4, lora_alpha=2, target_modules=names), adapter_name="conformance")
        try:
            wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, LoraLayer))
            assert wrapped == names, comp
            # Our target listing sees through peft's wrappers (same names on an injected model).
            assert targets(comp, model) == names
        finally:
            recurse_remove_peft_layers(model)  # the shared models go back to plain layers for the other tests
            model.__dict__.pop("peft_config", None)
            model._hf_peft_config_loaded = False
