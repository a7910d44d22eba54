"""Network types beyond plain LoRA: LoCon (LoRA on the ResNet blocks' 3x3 convolutions too, sd-scripts' conv_dim)
and LoHa (LyCORIS' Hadamard product of two low-rank products).

Trained on the tiny SD 1.5 / SDXL models through the real loop, written in the kohya layout, read back into a fresh
pipeline; and named and shaped on the full-size models (meta device) as sd-scripts, A1111 and ComfyUI expect.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers.config import ConfigError, TrainConfig
from helpers.formats.lora import LoraModule, to_kohya_state_dict
from helpers.sd.lora_targets import unet_resnet_target_modules, unet_target_modules
from helpers.train.loop import train
from test_lora_conformance import SD15_UNET, SDXL_UNET


def make_cfg(base_dir, data_dir, out_dir, **overrides) -> TrainConfig:
    settings = dict(pretrained_model=str(base_dir), train_data_dir=str(data_dir), resolution=32,
                    enable_bucket=False, rank=4, alpha=2.0, target="full", learning_rate=5e-3, train_batch_size=4,
                    max_train_steps=30, mixed_precision="no", output_dir=str(out_dir), output_name="n",
                    log_every_n_steps=10, save_precision="float", seed=3, network="locon", conv_dim=2,
                    conv_alpha=1.0)
    settings.update(overrides)
    return TrainConfig(**settings)


def _pixels(pipe) -> np.ndarray:
    """The pipeline's float output (no uint8 rounding) for a fixed prompt and seed."""
    out = pipe("sks flower, on a black background", num_inference_steps=3, guidance_scale=4.0, height=32, width=32,
               generator=torch.Generator().manual_seed(5), output_type="np")
    return np.asarray(out.images, dtype=np.float64)


@pytest.mark.parametrize("network", ["locon", "loha", "lokr", "dora"])
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_network_trains_saves_and_reloads_exactly(family, network, tiny_sd15_dir, tiny_sdxl_dir, concept_dir,
                                                  tmp_path):
    from safetensors import safe_open

    from helpers.generate.inference import load_loras
    from helpers.sd.models import load_base
    from helpers.train.log import read_log

    base_dir = tiny_sd15_dir if family == "sd15" else tiny_sdxl_dir
    trained = load_base(str(base_dir))
    steps = 40 if family == "sd15" else 60
    cfg = make_cfg(base_dir, concept_dir, tmp_path, network=network, max_train_steps=steps,
                   validation_every_n_steps=steps, train_text_encoder=network != "locon")
    result = train(cfg, base=trained, progress=False)
    before, after = [r["val_loss"] for r in read_log(result.log_path) if "val_loss" in r]
    assert after < before, (before, after)

    with safe_open(str(result.lora_path), "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in keys}
    args = json.loads(meta["ss_network_args"])
    assert args["conv_dim"] == "2" and args["conv_alpha"] == "1"
    modules = {k.partition(".")[0] for k in keys}
    convs = {m for m in modules if m.endswith(("_conv1", "_conv2", "_op", "_conv")) and "_attentions_" not in m}
    assert convs, "no 3x3 convolution was trained"
    if network == "locon":
        assert meta["ss_network_module"] == "networks.lora"
        for m in convs:
            down, up = tensors[f"{m}.lora_down.weight"], tensors[f"{m}.lora_up.weight"]
            assert down.shape[0] == 2 and down.shape[2:] == (3, 3) and tuple(up.shape[1:]) == (2, 1, 1)
            assert tensors[f"{m}.alpha"].item() == 1.0                         # conv_dim, conv_alpha
    elif network == "dora":   # LoCon + DoRA: every module's LoRA with its magnitude per input column
        assert meta["ss_network_module"] == "lycoris.kohya" and args["algo"] == "locon" and args["dora_wd"] == "True"
        assert any(k.startswith("lora_te") for k in keys)
        for m in modules:
            down, scale = tensors[f"{m}.lora_down.weight"], tensors[f"{m}.dora_scale"]
            assert tuple(scale.shape) == (1, down.shape[1], *([1] * (down.dim() - 2))), m     # [1, in(, 1, 1)]
            assert not torch.equal(scale, torch.zeros_like(scale))
        for m in convs:
            assert tensors[f"{m}.lora_down.weight"].shape[2:] == (3, 3) and tensors[f"{m}.alpha"].item() == 1.0
        from helpers.toolbox.inspect import inspect_lora

        assert inspect_lora(result.lora_path).network == "dora (locon)"
    elif network == "lokr":
        assert meta["ss_network_module"] == "lycoris.kohya" and args["algo"] == "lokr" and args["factor"] == "-1"
        assert any(k.startswith("lora_te") for k in keys) and not any("lora_down" in k for k in keys)
        for m in convs:   # conv_dim 2 is small: w2 is decomposed, [out_k, 2] @ [2, in_n * 3 * 3]
            w1, w2a, w2b = (tensors[f"{m}.lokr_{p}"] for p in ("w1", "w2_a", "w2_b"))
            assert w2a.shape[1] == 2 and w2b.shape[0] == 2 and w2b.shape[1] % 9 == 0
            assert w1.dim() == 2 and tensors[f"{m}.alpha"].item() == 1.0
        full = [k for k in keys if k.endswith(".lokr_w2")]
        assert full, "the rank-4 modules of a 32-wide model split into full factors"
    else:
        assert meta["ss_network_module"] == "lycoris.kohya" and args["algo"] == "loha"
        assert any(k.startswith("lora_te") for k in keys)                   # the text encoder's LoHa too
        for m in convs:
            w1a, w1b = tensors[f"{m}.hada_w1_a"], tensors[f"{m}.hada_w1_b"]
            assert w1a.dim() == 2 and w1b.shape[0] == 2 and w1b.shape[1] % 9 == 0   # [r, in * 3 * 3]
            assert tensors[f"{m}.hada_w2_b"].shape == w1b.shape and tensors[f"{m}.alpha"].item() == 1.0
        assert not any("lora_down" in k for k in keys)

    for m in (trained.unet, *trained.text_encoders):
        m.eval()
    want = _pixels(trained.pipe)
    plain = _pixels(load_base(str(base_dir)).pipe)
    assert np.abs(want - plain).max() > 1e-3                      # the network changes the output
    fresh = load_base(str(base_dir))
    names = load_loras(fresh.pipe, [(result.lora_path, 1.0)])
    assert np.abs(_pixels(fresh.pipe) - want).max() < 1e-5
    fresh.pipe.set_adapters(names, adapter_weights=[0.0])
    assert np.array_equal(_pixels(fresh.pipe), plain)             # weight 0 is the base model


def test_network_settings_are_checked():
    with pytest.raises(ConfigError, match="conv_dim and conv_alpha size the 3x3 convolutions of network locon"):
        TrainConfig(conv_dim=4)
    with pytest.raises(ConfigError, match="loha files exist in the kohya/LyCORIS layout only"):
        TrainConfig(network="loha", save_format="both")
    with pytest.raises(ConfigError, match="lokr has none"):
        TrainConfig(network="lokr", loraplus_lr_ratio=4.0)
    with pytest.raises(ConfigError, match="factor splits the weights of network lokr"):
        TrainConfig(factor=8)
    with pytest.raises(ConfigError, match="loha \\(peft's\\) has no such dropout"):
        TrainConfig(network="loha", lora_dropout=0.1)
    with pytest.raises(ConfigError, match="conv_dim must be a whole number >= 1"):
        TrainConfig(network="locon", conv_dim=0)
    with pytest.raises(ConfigError, match="network='locon' is a kind of LoRA"):
        TrainConfig(network="locon", method="dreambooth")


# ----------------------------------------------------------------- full-size naming and shapes (meta device)

@pytest.fixture(scope="module")
def unets():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return {"sd1": UNet2DConditionModel(**SD15_UNET), "sdxl": UNet2DConditionModel(**SDXL_UNET)}


def sd_scripts_conv_rule(unet) -> tuple[set[str], set[str]]:
    """sd-scripts' conv_dim selection, re-stated: inside every ResnetBlock2D, Downsample2D and Upsample2D, each
    Linear and Conv2d; (Linear and 1x1, larger kernels), as diffusers module names."""
    small, large = set(), set()
    for name, module in unet.named_modules():
        if type(module).__name__ not in ("ResnetBlock2D", "Downsample2D", "Upsample2D"):
            continue
        for child_name, child in module.named_modules():
            if isinstance(child, torch.nn.Linear) or (isinstance(child, torch.nn.Conv2d)
                                                      and child.kernel_size == (1, 1)):
                small.add(f"{name}.{child_name}")
            elif isinstance(child, torch.nn.Conv2d):
                large.add(f"{name}.{child_name}")
    return small, large


def locon_file(family: str, unet, rank: int = 4, conv_rank: int = 2) -> dict[str, dict[str, tuple]]:
    """What our exporter writes for a LoCon of `unet`: kohya module -> {suffix: shape}."""
    modules = dict(unet.named_modules())
    linear, convs = unet_resnet_target_modules(unet)
    weights = {}
    for n in unet_target_modules(unet, "full") + linear + convs:
        m = modules[n]
        r = conv_rank if n in convs else rank
        if isinstance(m, torch.nn.Conv2d):
            down = torch.empty(r, m.in_channels, *m.kernel_size, device="meta")
            up = torch.empty(m.out_channels, r, 1, 1, device="meta")
        else:
            down, up = torch.empty(r, m.in_features, device="meta"), torch.empty(m.out_features, r, device="meta")
        weights[n] = LoraModule(down, up, 1.0)
    sd = to_kohya_state_dict({"unet": weights}, family, dict(unet.config))
    out: dict[str, dict[str, tuple]] = {}
    for k, v in sd.items():
        mod, _, suffix = k.partition(".")
        out.setdefault(mod, {})[suffix] = tuple(v.shape)
    return out


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_locon_selects_what_sd_scripts_selects(unets, family):
    small, large = sd_scripts_conv_rule(unets[family])
    linear, convs = unet_resnet_target_modules(unets[family])
    assert set(linear) == small and set(convs) == large
    resnets = sum(1 for m in unets[family].modules() if type(m).__name__ == "ResnetBlock2D")
    samplers = sum(1 for m in unets[family].modules() if type(m).__name__ in ("Downsample2D", "Upsample2D"))
    assert (resnets, samplers) == ({"sd1": 22, "sdxl": 17}[family], {"sd1": 6, "sdxl": 4}[family])
    assert len(convs) == 2 * resnets + samplers                  # conv1 and conv2 of each block, one per sampler
    assert sum(n.endswith("time_emb_proj") for n in linear) == resnets


def test_sd1_locon_keys_are_diffusers_names_of_original_modules(unets):
    """SD 1.x: sd-scripts names ResNet modules by their diffusers path; each lands on an original LDM module
    (A1111 renames down_blocks.i.resnets.j.conv1 -> input_blocks.(3i+j+1).0.in_layers.2, ...), with the
    shapes LyCORIS writes: down [r, in, 3, 3], up [out, r, 1, 1]; Linear [r, in] / [out, r]."""
    from helpers.formats.checkpoint import unet_module_map

    unet = unets["sd1"]
    mods = locon_file("sd1", unet)
    original = unet_module_map(SD15_UNET)
    modules = dict(unet.named_modules())
    linear, convs = unet_resnet_target_modules(unet)
    for n in linear + convs:
        key = "lora_unet_" + n.replace(".", "_")
        assert key in mods and n in original, n
        m = modules[n]
        shapes = mods[key]
        if n in convs:
            assert shapes["lora_down.weight"] == (2, m.in_channels, 3, 3)
            assert shapes["lora_up.weight"] == (m.out_channels, 2, 1, 1)
        elif isinstance(m, torch.nn.Linear):
            assert shapes["lora_down.weight"] == (4, m.in_features) and shapes["lora_up.weight"] == (m.out_features, 4)
        else:
            assert shapes["lora_down.weight"] == (4, m.in_channels, 1, 1)
        assert shapes["alpha"] == ()
    assert original["down_blocks.0.resnets.0.conv1"] == "input_blocks.1.0.in_layers.2"
    assert original["down_blocks.0.downsamplers.0.conv"] == "input_blocks.3.0.op"
    assert original["up_blocks.0.upsamplers.0.conv"] == "output_blocks.2.1.conv"


def test_sdxl_locon_keys_are_sgm_names(unets):
    """SDXL: sd-scripts trains on the SGM-layout UNet, so its ResNet keys are SGM names (input_blocks.1.0.in_layers.2,
    ..., input_blocks.3.0.op, output_blocks.2.2.conv): every key names an original module with a weight."""
    from helpers.formats.checkpoint import unet_key_map

    mods = locon_file("sdxl", unets["sdxl"])
    weights = {k.rsplit(".", 1)[0].replace(".", "_") for k in unet_key_map(SDXL_UNET).values() if k.endswith(".weight")}
    unet_keys = {k[len("lora_unet_"):] for k in mods}
    assert unet_keys <= weights
    for key in ("input_blocks_1_0_in_layers_2", "input_blocks_1_0_out_layers_3", "input_blocks_1_0_emb_layers_1",
                "input_blocks_3_0_op", "input_blocks_4_0_skip_connection", "middle_block_0_in_layers_2",
                "output_blocks_2_2_conv"):
        assert key in unet_keys, key
    assert mods["lora_unet_input_blocks_3_0_op"]["lora_down.weight"] == (2, 320, 3, 3)
    assert mods["lora_unet_input_blocks_4_0_skip_connection"]["lora_down.weight"] == (4, 320, 1, 1)
    assert mods["lora_unet_output_blocks_2_2_conv"]["lora_up.weight"] == (1280, 2, 1, 1)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_loha_keys_and_shapes_are_what_lycoris_writes(family):
    """peft's LoHa on the full-size UNet (meta device), written by our exporter: the same module names as LoRA
    and LoCon, and per module hada_w1_a / hada_w2_a [out, r], hada_w1_b / hada_w2_b [r, in * kh * kw], alpha."""
    import re

    from diffusers import UNet2DConditionModel

    from helpers.formats.lycoris import extract_peft_loha, loha_config
    from helpers.sd.lora_targets import inject_lora

    with torch.device("meta"):
        unet = UNet2DConditionModel(**(SD15_UNET if family == "sd1" else SDXL_UNET))
    plain = dict(unet.named_modules())
    linear, convs = unet_resnet_target_modules(unet)
    targets = sorted(unet_target_modules(unet, "full") + linear + convs)
    inject_lora(unet, loha_config(4, 2.0, targets, {f"^{re.escape(n)}": 2 for n in convs},
                                  {f"^{re.escape(n)}": 1.0 for n in convs}))
    modules = extract_peft_loha(unet)
    assert sorted(modules) == targets
    sd = to_kohya_state_dict({"unet": modules}, family, dict(unet.config))
    lora_names = set(locon_file(family, plain_unet(family)))
    by_module: dict[str, dict[str, tuple]] = {}
    for k, v in sd.items():
        mod, _, part = k.partition(".")
        by_module.setdefault(mod, {})[part] = tuple(v.shape)
    assert set(by_module) == lora_names                          # LoHa names its modules as LoRA / LoCon do
    from helpers.formats.lora import kohya_module_names

    names = kohya_module_names("unet", targets, family, dict(unet.config))
    for n in targets:
        shapes, weight = by_module[names[n]], plain[n].weight
        r = 2 if n in convs else 4
        out, rest = weight.shape[0], weight[0].numel()
        assert shapes == {"hada_w1_a": (out, r), "hada_w1_b": (r, rest), "hada_w2_a": (out, r),
                          "hada_w2_b": (r, rest), "alpha": ()}, n


def plain_unet(family):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**(SD15_UNET if family == "sd1" else SDXL_UNET))


def test_a_loha_merges_into_the_model_as_its_hadamard_product(tiny_sd15_dir):
    from helpers.formats.lycoris import LohaModule
    from helpers.sd.lora_targets import base_layer, model_module_names
    from helpers.sd.models import load_base
    from helpers.toolbox.merge import concat_loras, merge_into_model

    base = load_base(str(tiny_sd15_dir))
    names = model_module_names(base.unet)
    linear = unet_target_modules(base.unet, "full")[0]
    conv = unet_resnet_target_modules(base.unet)[1][0]
    g = torch.Generator().manual_seed(0)
    weights, before = {}, {}
    for n in (linear, conv):
        w = base_layer(names[n]).weight
        out, rest = w.shape[0], w[0].numel()
        weights[n] = LohaModule(*(torch.randn(s, generator=g) for s in ((out, 2), (2, rest), (out, 2), (2, rest))),
                                alpha=1.0)
        before[n] = w.detach().double().clone()
    assert merge_into_model(base.pipe, [({"unet": weights}, 0.7)]) == 2
    for n, m in weights.items():
        by_hand = (m.w1_a.double() @ m.w1_b.double()) * (m.w2_a.double() @ m.w2_b.double()) * (1.0 / 2) * 0.7
        got = base_layer(names[n]).weight.detach().double() - before[n]
        assert torch.allclose(got, by_hand.reshape(got.shape), atol=1e-5)
    with pytest.raises(ValueError, match="LoHa modules do not concatenate"):
        concat_loras([({"unet": weights}, 1.0)])


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_lokr_keys_and_shapes_are_what_lycoris_writes(family):
    """peft's LoKr on the full-size UNet (meta device), written by our exporter: LoRA's module names, and per module
    lokr_w1 [out_l, in_m] with lokr_w2 [out_k, in_n(, kh, kw)] or lokr_w2_a [out_k, r] / lokr_w2_b
    [r, in_n * kh * kw], so that kron(w1, w2) has the layer's weight's size, as LyCORIS' factorization splits it."""
    import re

    from peft.tuners.lokr.layer import factorization

    from helpers.formats.lora import kohya_module_names
    from helpers.formats.lycoris import extract_peft_lokr, lokr_config
    from helpers.sd.lora_targets import inject_lora

    unet = plain_unet(family)
    plain = dict(unet.named_modules())
    linear, convs = unet_resnet_target_modules(unet)
    targets = sorted(unet_target_modules(unet, "full") + linear + convs)
    inject_lora(unet, lokr_config(4, 2.0, targets, {f"^{re.escape(n)}": 2 for n in convs},
                                  {f"^{re.escape(n)}": 1.0 for n in convs}))
    modules = extract_peft_lokr(unet)
    assert sorted(modules) == targets
    sd = to_kohya_state_dict({"unet": modules}, family, dict(unet.config))
    parts: dict[str, dict[str, tuple]] = {}
    for k, v in sd.items():
        mod, _, part = k.partition(".")
        parts.setdefault(mod, {})[part] = tuple(v.shape)
    assert set(parts) == set(locon_file(family, plain_unet(family)))
    names = kohya_module_names("unet", targets, family, dict(unet.config))
    for n in targets:
        weight, got = plain[n].weight, parts[names[n]]
        out_l, out_k = factorization(weight.shape[0], -1)
        in_m, in_n = factorization(weight.shape[1], -1)
        assert got["lokr_w1"] == (out_l, in_m), n
        kernel = tuple(weight.shape[2:]) if weight.dim() == 4 else ()
        r = 2 if n in convs else 4
        if "lokr_w2" in got:
            assert got["lokr_w2"] == (out_k, in_n, *kernel) and r >= max(out_k, in_n) / 2, n
        else:
            size = in_n * (kernel[0] * kernel[1] if kernel else 1)
            assert (got["lokr_w2_a"], got["lokr_w2_b"]) == ((out_k, r), (r, size)), n
        assert got["alpha"] == ()


# ----------------------------------------------------------------------------------------- DoRA

def a1111_dora_weight(weight, down, up, alpha, dora_scale, multiplier):
    """A1111's network.py for a DoRA module, re-stated: updown = up @ down * alpha / r, then
    apply_weight_decompose (norm of W + updown per input column, times dora_scale), times the multiplier."""
    w = weight.double()
    updown = (up.reshape(up.shape[0], -1).double() @ down.reshape(down.shape[0], -1).double()).reshape(w.shape)
    updown = updown * (alpha / down.shape[0])
    merged = updown + w
    dims = w.dim() - 1
    norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True) \
        .reshape(merged.shape[1], *[1] * dims).transpose(0, 1)
    return w + (merged * (dora_scale.double() / norm) - w) * multiplier


@pytest.mark.parametrize("kind", ["linear", "conv3x3"])
def test_dora_layer_computes_the_weight_a1111_and_comfyui_apply(kind):
    """A DoRA layer (peft LoRA + InputAxisDora) at weight 0.6 gives the output of the plain layer whose weight is
    what A1111 computes from the same file tensors; DoraModule.delta (merges) is the same change; merging and
    unmerging through peft restores the weight; the magnitude and both LoRA factors get gradients."""
    from peft import LoraConfig

    from helpers.formats.dora import add_input_dora, extract_peft_dora
    from helpers.sd.lora_targets import inject_lora

    g = torch.Generator().manual_seed(1)
    layer = torch.nn.Linear(12, 10) if kind == "linear" else torch.nn.Conv2d(6, 8, 3, padding=1)
    model = torch.nn.Sequential()
    model.add_module("layer", layer)
    plain_weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    inject_lora(model, LoraConfig(r=3, lora_alpha=1.5, target_modules=["layer"], init_lora_weights=True))
    assert add_input_dora(model) == 1
    peft_layer = model.layer
    x = torch.randn(4, 12, generator=g) if kind == "linear" else torch.randn(2, 6, 5, 5, generator=g)
    before = model(x)
    assert torch.allclose(before, peft_layer.base_layer(x), atol=1e-6)   # it starts as the base layer
    with torch.no_grad():
        peft_layer.lora_A["default"].weight.normal_(generator=g)
        peft_layer.lora_B["default"].weight.normal_(generator=g)
        peft_layer.lora_magnitude_vector["default"].weight.mul_(1 + 0.3 * torch.rand(
            peft_layer.lora_magnitude_vector["default"].weight.shape, generator=g))
    m = extract_peft_dora(model)["layer"]
    scale = m.tensors()["dora_scale"]
    assert tuple(scale.shape) == ((1, 12) if kind == "linear" else (1, 6, 1, 1))
    by_hand = a1111_dora_weight(plain_weight, m.down, m.up, 1.5, scale, 0.6).float()
    peft_layer.set_scale("default", 0.6)
    fn = torch.nn.functional.linear if kind == "linear" else \
        (lambda t, w, b: torch.nn.functional.conv2d(t, w, b, padding=1))
    assert torch.allclose(model(x), fn(x, by_hand, bias), atol=1e-5)
    assert torch.allclose(plain_weight.double() + 0.6 * m.delta(plain_weight), by_hand.double(), atol=1e-5)
    peft_layer.merge()
    assert torch.allclose(peft_layer.base_layer.weight, by_hand, atol=1e-5)
    peft_layer.unmerge()
    assert torch.allclose(peft_layer.base_layer.weight, plain_weight, atol=1e-5)

    peft_layer.set_scale("default", 1.0)
    model(x).square().sum().backward()
    for p in (peft_layer.lora_magnitude_vector["default"].weight, peft_layer.lora_A["default"].weight,
              peft_layer.lora_B["default"].weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert layer.weight.grad is None


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_dora_keys_and_shapes_are_what_lycoris_writes(family):
    """LoCon + DoRA on the full-size UNet (meta device), written by our exporter: LoCon's module names, and per
    module lora_down, lora_up, alpha and dora_scale [1, in] (Linear) or [1, in, 1, 1] (Conv2d), as LyCORIS'
    dora_wd writes it and A1111's apply_weight_decompose reads it."""
    import re

    from peft import LoraConfig

    from helpers.formats.dora import add_input_dora, extract_peft_dora
    from helpers.formats.lora import kohya_module_names
    from helpers.sd.lora_targets import inject_lora

    unet = plain_unet(family)
    plain = dict(unet.named_modules())
    linear, convs = unet_resnet_target_modules(unet)
    targets = sorted(unet_target_modules(unet, "full") + linear + convs)
    inject_lora(unet, LoraConfig(r=4, lora_alpha=2.0, target_modules=targets,
                                 rank_pattern={f"^{re.escape(n)}": 2 for n in convs}))
    add_input_dora(unet)
    modules = extract_peft_dora(unet)
    assert sorted(modules) == targets
    sd = to_kohya_state_dict({"unet": modules}, family, dict(unet.config))
    parts: dict[str, dict[str, tuple]] = {}
    for k, v in sd.items():
        mod, _, part = k.partition(".")
        parts.setdefault(mod, {})[part] = tuple(v.shape)
    locon = locon_file(family, plain_unet(family))
    assert set(parts) == set(locon)
    names = kohya_module_names("unet", targets, family, dict(unet.config))
    for n in targets:
        weight, got = plain[n].weight, parts[names[n]]
        assert {p: s for p, s in got.items() if p != "dora_scale"} == {**locon[names[n]], "alpha": ()}, n
        assert got["dora_scale"] == (1, weight.shape[1], *([1] * (weight.dim() - 2))), n


def test_dora_files_are_checked_when_read(tiny_sd15_dir, tmp_path):
    from safetensors.torch import save_file

    from helpers.formats.lora import load_lora
    from helpers.sd.models import load_base

    base = load_base(str(tiny_sd15_dir))
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    width = base.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.in_features
    lora = {f"{name}.lora_down.weight": torch.zeros(2, width), f"{name}.lora_up.weight": torch.zeros(width, 2),
            f"{name}.alpha": torch.tensor(2.0)}
    save_file({**lora, f"{name}.dora_scale": torch.ones(width + 1, 1)}, str(tmp_path / "out_axis.safetensors"))
    with pytest.raises(ValueError, match="dora_scale has 33 values but the layer takes 32 inputs"):
        load_lora(tmp_path / "out_axis.safetensors", base.pipe)
    hada = {f"{name}.hada_{p}": torch.zeros(s) for p, s in (("w1_a", (width, 2)), ("w1_b", (2, width)),
                                                              ("w2_a", (width, 2)), ("w2_b", (2, width)))}
    save_file({**hada, f"{name}.alpha": torch.tensor(2.0), f"{name}.dora_scale": torch.ones(1, width)},
              str(tmp_path / "loha_dora.safetensors"))
    with pytest.raises(ValueError, match="DoRA on a LoHa or LoKr"):
        load_lora(tmp_path / "loha_dora.safetensors", base.pipe)
    with pytest.raises(ConfigError, match="dora files exist in the kohya/LyCORIS layout only"):
        TrainConfig(network="dora", save_format="diffusers")


def test_conv_block_dims_size_the_convolutions_per_block(tiny_sd15_dir):
    """kohya's conv_block_dims / conv_block_alphas: each block's 3x3 convolutions at its own rank and alpha, 0
    leaving them out; the linear modules keep the rank, and the file's network_args carry both lists."""
    from peft.tuners.lora import LoraLayer

    from helpers.sd.models import load_base
    from helpers.train.blocks import block_names, block_of
    from helpers.train.methods import LoraLayers, network_args

    base = load_base(str(tiny_sd15_dir))
    names = block_names(base.unet.config)
    dims = [0 if i == 1 else 3 for i in range(len(names))]
    alphas = [1.5] * len(names)
    cfg = TrainConfig(network="locon", rank=4, alpha=2.0, conv_dim=2, target="full", conv_block_dims=dims,
                      conv_block_alphas=alphas)
    LoraLayers(cfg).attach(base.unet, [], [], torch.device("cpu"))
    where = block_of(base.unet.config)
    convs = set(unet_resnet_target_modules(load_base(str(tiny_sd15_dir)).unet)[1])
    seen = {}
    for name, m in base.unet.named_modules():
        plain = name.replace(".base_layer", "")
        if isinstance(m, LoraLayer) and plain in convs:
            seen[plain] = (m.r["default"], m.lora_alpha["default"])
    assert seen and all(where[n] != names[1] for n in seen)                 # block IN01's convolutions left out
    assert any(where[n] == names[1] for n in convs)
    assert set(seen.values()) == {(3, 1.5)}
    args = network_args(cfg)
    assert args["conv_block_dims"] == ",".join(map(str, dims)) and args["conv_block_alphas"].startswith("1.5,")
    with pytest.raises(ConfigError, match="conv_block_dims and conv_block_alphas size the 3x3 convolutions"):
        TrainConfig(conv_block_dims=dims)
    bad = cfg.replace(conv_block_dims=[2, 2])
    with pytest.raises(ConfigError, match=f"conv_block_dims needs {len(names)} values"):
        LoraLayers(bad).attach(load_base(str(tiny_sd15_dir)).unet, [], [], torch.device("cpu"))
