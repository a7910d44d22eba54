"""Tests for helpers.sd.models: loading base models (folders, single files, hub ids offline), family
detection, dtype choice and attention. Tiny models only; offline; CPU."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from helpers.sd import models, notices  # noqa: E402
from helpers.sd.models import (
    FAMILIES, BaseModel, ModelLoadError, detect_family, detect_family_from_checkpoint, load_base, pick_dtype,
    read_safetensors_header, set_attention, vae_dtype_for
)
from helpers.toy.tiny import save_tiny_model  # noqa: E402

ldm_layout = pytest.importorskip("helpers.formats.checkpoint")


# ------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    return {"sd15": save_tiny_model(root / "sd15", "sd15"), "sdxl": save_tiny_model(root / "sdxl", "sdxl"),
            "sd15_seed1": save_tiny_model(root / "sd15_seed1", "sd15", seed=1)}


def _build_tiny_sd2(folder: Path) -> Path:
    """A tiny SD 2.x-like pipeline: the UNet cross-attends to a 1024-wide text encoder (as
    OpenCLIP-H), linear projections, v-prediction scheduler. Built here because tiny.py has no SD 2."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from helpers.toy.tiny import _tiny_vae, load_tiny_tokenizer, write_clip_tokenizer

    torch.manual_seed(0)
    tok = load_tiny_tokenizer(write_clip_tokenizer(folder.parent / (folder.name + "_tok")))
    te = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=1024, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=8, max_position_embeddings=77,
                                      hidden_act="gelu", bos_token_id=len(tok) - 2, eos_token_id=len(tok) - 1,
                                      pad_token_id=tok.pad_token_id))
    unet = UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 32, 64, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=1024, attention_head_dim=(2, 4, 8, 8), use_linear_projection=True, norm_num_groups=32)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=_tiny_vae(), text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


def _assert_same_weights(a: BaseModel, b: BaseModel) -> None:
    names = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if a.family == "sdxl" else [])
    for name in names:
        sa, sb = getattr(a.pipe, name).state_dict(), getattr(b.pipe, name).state_dict()
        assert sorted(sa) == sorted(sb), name
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{name}.{k} differs"


# ------------------------------------------------------------------------- loading from folders

@pytest.mark.parametrize("fam, family, pipe_cls, n_te", [
    ("sd15", "sd1", "StableDiffusionPipeline", 1), ("sdxl", "sdxl", "StableDiffusionXLPipeline", 2)])
def test_load_folder(tiny_dirs, capsys, fam, family, pipe_cls, n_te):
    m = load_base(str(tiny_dirs[fam]))
    assert m.family == family
    assert type(m.pipe).__name__ == pipe_cls
    assert m.prediction_type == "epsilon"
    assert m.dtype == torch.float32  # auto on CPU
    assert m.unet.dtype == torch.float32 and m.vae.dtype == torch.float32
    assert len(m.text_encoders) == n_te and len(m.tokenizers) == n_te
    assert all(t.dtype == torch.float32 for t in m.text_encoders)
    assert m.unet is m.pipe.unet and m.vae is m.pipe.vae
    assert not any(p.requires_grad for p in m.unet.parameters())
    sched = m.noise_scheduler()
    assert type(sched).__name__ == "DDPMScheduler"
    assert sched.config.prediction_type == "epsilon" and sched.config.num_train_timesteps == 1000
    assert torch.allclose(sched.betas, m.pipe.scheduler.betas)  # same schedule as the model's own
    out = capsys.readouterr().out
    name = {"sd1": "SD 1.x", "sdxl": "SDXL"}[family]
    assert f"Loaded {name} base (epsilon) in fp32 on cpu" in out
    desc = m.describe()
    assert desc.startswith(f"{name} (v-pred: no), unet ") and "fp32" in desc and str(tiny_dirs[fam]) in desc
    n = sum(p.numel() for p in m.unet.parameters())
    assert f"{n / 1e6:.1f}M params" in desc


def test_prediction_type_override(tiny_dirs):
    m = load_base(str(tiny_dirs["sd15"]), prediction_type="v")
    assert m.prediction_type == "v_prediction"
    assert m.noise_scheduler().config.prediction_type == "v_prediction"
    assert m.pipe.scheduler.config.prediction_type == "v_prediction"  # inference matches training
    assert "(v-pred: yes)" in m.describe()
    with pytest.raises(ValueError, match="prediction_type"):
        load_base(str(tiny_dirs["sd15"]), prediction_type="sample")


def test_dtype_and_vae_policy(tiny_dirs, tmp_path, monkeypatch):
    m = load_base(str(tiny_dirs["sdxl"]), dtype="bf16")
    assert m.dtype == torch.bfloat16 and m.unet.dtype == torch.bfloat16
    assert m.pipe.text_encoder_2.dtype == torch.bfloat16 and m.vae.dtype == torch.bfloat16
    assert vae_dtype_for("sdxl", torch.float16, {"force_upcast": True}) == torch.float32
    assert vae_dtype_for("sdxl", torch.float16, {"force_upcast": False}) == torch.float16
    assert vae_dtype_for("sdxl", torch.bfloat16, {"force_upcast": True}) == torch.bfloat16
    assert vae_dtype_for("sd1", torch.float16, {"force_upcast": True}) == torch.float16
    # fp16 as on a T4: the CPU can hold fp16 tensors, so force the resolved dtype and check the wiring.
    monkeypatch.setattr(models, "_resolve_dtype", lambda dtype, device: torch.float16)
    m = load_base(str(tiny_dirs["sdxl"]))
    assert m.dtype == torch.float16 and m.unet.dtype == torch.float16
    assert m.pipe.text_encoder.dtype == torch.float16 and m.pipe.text_encoder_2.dtype == torch.float16
    assert m.vae.dtype == torch.float32  # original SDXL VAE is not fp16-safe
    # an fp16-safe replacement VAE (force_upcast False, like sdxl-vae-fp16-fix) stays in fp16
    from diffusers import AutoencoderKL

    cfg = AutoencoderKL.load_config(str(tiny_dirs["sdxl"] / "vae"))
    AutoencoderKL.from_config({**cfg, "force_upcast": False}).save_pretrained(str(tmp_path / "vae_fix"))
    m = load_base(str(tiny_dirs["sdxl"]), vae=str(tmp_path / "vae_fix"))
    assert m.vae.dtype == torch.float16 and m.vae.config.force_upcast is False


def test_family_argument(tiny_dirs):
    assert load_base(str(tiny_dirs["sd15"]), family="sd15").family == "sd1"  # alias accepted
    with pytest.raises(ModelLoadError, match="family='sdxl' was given"):
        load_base(str(tiny_dirs["sd15"]), family="sdxl")
    with pytest.raises(ValueError, match="family must be one of"):
        load_base(str(tiny_dirs["sd15"]), family="flux")


def test_replacement_vae_folder_and_single_file(tiny_dirs, tmp_path):
    other = load_base(str(tiny_dirs["sd15_seed1"]))
    m = load_base(str(tiny_dirs["sd15"]), vae=str(tiny_dirs["sd15_seed1"] / "vae"))
    for k, v in other.vae.state_dict().items():
        assert torch.equal(m.vae.state_dict()[k], v)
    # a whole pipeline folder also works (its vae/ subfolder is used)
    m = load_base(str(tiny_dirs["sd15"]), vae=str(tiny_dirs["sd15_seed1"]))
    assert torch.equal(m.vae.decoder.conv_out.weight, other.vae.decoder.conv_out.weight)
    # an original-layout VAE single file (as on Civitai) loads offline with the base VAE's config
    vae_file = tmp_path / "vae.safetensors"
    sd = {k.removeprefix(ldm_layout.VAE_PREFIX): v.contiguous()
          for k, v in ldm_layout.vae_to_original(other.vae.state_dict()).items()}
    save_file(sd, str(vae_file))
    m = load_base(str(tiny_dirs["sd15"]), vae=str(vae_file))
    for k, v in other.vae.state_dict().items():
        assert torch.equal(m.vae.state_dict()[k], v), k
    with pytest.raises(ModelLoadError, match="vae="):
        load_base(str(tiny_dirs["sd15"]), vae=str(tmp_path / "nope"))


def test_bad_sources(tiny_dirs, tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_base(str(tmp_path / "missing.safetensors"))
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        load_base(str(tiny_dirs["sd15"] / "unet"))
    with pytest.raises(ModelLoadError, match="no CUDA GPU") if not torch.cuda.is_available() else _nullctx():
        load_base(str(tiny_dirs["sd15"]), device="cuda")


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


# ---------------------------------------------------------------------------------- pick_dtype

def test_pick_dtype_cpu(monkeypatch):
    monkeypatch.setattr(notices, "WARNED", set())
    assert pick_dtype("cpu") == torch.float32
    assert pick_dtype("cpu", "auto") == torch.float32
    assert pick_dtype("cpu", "no") == torch.float32 and pick_dtype("cpu", "fp32") == torch.float32
    assert pick_dtype("cpu", "bf16") == torch.bfloat16
    with pytest.warns(UserWarning, match="fp16' needs a CUDA GPU"):
        assert pick_dtype("cpu", "fp16") == torch.float32
    import warnings

    with warnings.catch_warnings():  # only once
        warnings.simplefilter("error")
        assert pick_dtype("cpu", "fp16") == torch.float32
    with pytest.raises(ValueError, match="mixed_precision"):
        pick_dtype("cpu", "int8")


@pytest.mark.parametrize("capability, auto, explicit_fp16", [((7, 5), torch.float16, torch.float16),
                                                             ((7, 0), torch.float16, torch.float16),
                                                             ((8, 0), torch.bfloat16, torch.float16),
                                                             ((9, 0), torch.bfloat16, torch.float16)])
def test_pick_dtype_cuda(monkeypatch, capability, auto, explicit_fp16):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(notices, "WARNED", set())
    assert pick_dtype("cuda") == auto
    assert pick_dtype(torch.device("cuda:0"), "auto") == auto
    assert pick_dtype("cuda", "fp16") == explicit_fp16
    assert pick_dtype("cuda", "no") == torch.float32
    if capability < (8, 0):
        with pytest.warns(UserWarning, match="emulated"):
            assert pick_dtype("cuda", "bf16") == torch.bfloat16
    else:
        assert pick_dtype("cuda", "bf16") == torch.bfloat16


def test_pick_dtype_cuda_missing(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(notices, "WARNED", set())
    with pytest.warns(UserWarning, match="no CUDA GPU"):
        assert pick_dtype("cuda") == torch.float32


# ------------------------------------------------------------------------------ detect_family

SD15_UNET = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD21_UNET = {
    **SD15_UNET, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024, "dual_cross_attention": False,
    "num_class_embeds": None, "only_cross_attention": False, "sample_size": 96, "upcast_attention": True,
    "use_linear_projection": True,
}
SDXL_UNET = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280], "center_input_sample": False, "class_embed_type": None,
    "cross_attention_dim": 2048, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "in_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816, "sample_size": 128, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "use_linear_projection": True,
}


def test_detect_family_full_size_configs(tmp_path):
    assert detect_family(SD15_UNET) == "sd1"
    assert detect_family(SD21_UNET) == "sd2"
    assert detect_family(SDXL_UNET) == "sdxl"
    # SD 1.5 inpainting (9 input channels) is still SD 1.x
    assert detect_family({**SD15_UNET, "in_channels": 9}) == "sd1"
    # from a diffusers folder layout on disk, as a path
    (tmp_path / "m" / "unet").mkdir(parents=True)
    (tmp_path / "m" / "unet" / "config.json").write_text(json.dumps(SDXL_UNET))
    assert detect_family(tmp_path / "m") == "sdxl"
    assert detect_family(str(tmp_path / "m" / "unet" / "config.json")) == "sdxl"
    with pytest.raises(ModelLoadError, match="not a Stable Diffusion UNet"):
        detect_family({"_class_name": "SD3Transformer2DModel", "joint_attention_dim": 4096})
    assert set(FAMILIES) == {"sd1", "sd2", "sdxl"}


def test_detect_family_tiny(tiny_dirs):
    from diffusers import UNet2DConditionModel

    assert detect_family(tiny_dirs["sd15"]) == "sd1"
    assert detect_family(tiny_dirs["sdxl"]) == "sdxl"
    unet = UNet2DConditionModel.from_pretrained(str(tiny_dirs["sdxl"] / "unet"))
    assert detect_family(unet) == "sdxl" and detect_family(unet.config) == "sdxl"


# ---------------------------------------------------------------------- checkpoint key detection

def _fake_file(path: Path, keys: dict[str, tuple[int, ...]], metadata: dict | None = None) -> Path:
    save_file({k: torch.zeros(shape) for k, shape in keys.items()}, str(path), metadata=metadata)
    return path


UNET_KEY = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


@pytest.mark.parametrize("keys, family", [
    ({"cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (4, 2), UNET_KEY: (4, 8)}, "sd1"),
    ({"cond_stage_model.model.token_embedding.weight": (4, 2), "cond_stage_model.model.text_projection": (2, 2),
      UNET_KEY: (4, 16)}, "sd2"),
    ({"conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (4, 2),
      "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight": (6, 2),
      "model.diffusion_model.label_emb.0.0.weight": (2, 2)}, "sdxl"),
    # UNet-only files: decided by structure (SDXL label_emb, SD 2 cross-attention width 1024)
    ({"model.diffusion_model.label_emb.0.0.weight": (2, 2), UNET_KEY: (4, 4)}, "sdxl"),
    ({UNET_KEY: (320, 1024)}, "sd2"),
    ({UNET_KEY: (320, 768)}, "sd1"),
])
def test_detect_family_from_checkpoint(tmp_path, keys, family):
    assert detect_family_from_checkpoint(_fake_file(tmp_path / "m.safetensors", keys)) == family


def test_detect_family_from_checkpoint_reads_header_only(tmp_path):
    f = _fake_file(tmp_path / "big.safetensors", {"conditioner.embedders.1.model.positional_embedding": (77, 64),
                                                  "model.diffusion_model.out.2.weight": (4, 64)})
    data = f.read_bytes()
    (n,) = __import__("struct").unpack("<Q", data[:8])
    f.write_bytes(data[: 8 + n + 10])  # cut the tensor data: a full load would fail
    assert detect_family_from_checkpoint(f) == "sdxl"
    index, meta = read_safetensors_header(f)
    assert index["model.diffusion_model.out.2.weight"]["shape"] == [4, 64] and meta == {}


@pytest.mark.parametrize("keys, message", [
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 8),
      "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": (8, 4),
      "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": ()}, "is a LoRA file, not a base model"),
    ({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": (4, 8)}, "is a LoRA file"),
    ({"emb_params": (2, 768)}, "Textual Inversion"),
    ({"clip_l": (2, 768), "clip_g": (2, 1280)}, "Textual Inversion"),
    ({"encoder.down.0.block.0.conv1.weight": (4, 4)}, "is a VAE"),
    ({"down_blocks.0.resnets.0.conv1.weight": (4, 4), "conv_in.weight": (4, 4)}, "diffusers-format component"),
    ({"conditioner.embedders.0.model.positional_embedding": (77, 8)}, "SDXL refiner"),
    ({"some.other.weight": (2, 2)}, "not a recognised"),
])
def test_detect_family_from_checkpoint_rejects(tmp_path, keys, message):
    with pytest.raises(ModelLoadError, match=message):
        detect_family_from_checkpoint(_fake_file(tmp_path / "x.safetensors", keys))


def test_detect_family_from_checkpoint_bad_files(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ModelLoadError, match="not a valid safetensors"):
        detect_family_from_checkpoint(tmp_path / "junk.safetensors")
    with pytest.raises(ModelLoadError, match="not found"):
        detect_family_from_checkpoint(tmp_path / "none.safetensors")


class _Evil:
    """Unpickling this runs code: the weights-only loader must refuse it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickle_checkpoints_weights_only(tmp_path):
    good = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.ones(2),
                               "global_step": torch.tensor(5)}}, str(good))
    assert detect_family_from_checkpoint(good) == "sd1"
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    with open(evil, "wb") as f:
        pickle.dump({"state_dict": {"x": _Evil(str(marker))}}, f, protocol=2)
    with pytest.raises(ModelLoadError, match="safetensors"):
        detect_family_from_checkpoint(evil)
    with pytest.raises(ModelLoadError, match="weights_only=True"):
        load_base(str(evil))
    assert not marker.exists()


# ------------------------------------------------------------------------------------ offline hub

def test_hub_id_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.monotonic()
    with pytest.raises(ModelLoadError) as err:
        load_base("nobody-here-xyz/no-such-model-123")
    assert time.monotonic() - t0 < 5
    msg = str(err.value)
    assert "offline" in msg and "local diffusers folder" in msg and ".safetensors" in msg
    assert "hf download nobody-here-xyz/no-such-model-123" in msg
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no raw traceback chain


def test_hub_id_without_network_fails_fast(monkeypatch):
    """No HF_HUB_OFFLINE, but the Hub is unreachable: still a fast, clear error (no 30 s hang)."""
    import huggingface_hub.constants as hc

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)
    t0 = time.monotonic()
    with pytest.raises(ModelLoadError, match="offline"):
        load_base("nobody-here-xyz/no-such-model-123")
    assert time.monotonic() - t0 < 5


def test_hub_probe_never_hangs(monkeypatch):
    import urllib.request

    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: time.sleep(30))
    t0 = time.monotonic()
    assert models._hub_reachable(timeout=0.3) is False
    assert time.monotonic() - t0 < 3


# ------------------------------------------------------------------------------------ single files

@pytest.mark.parametrize("fam, family", [("sd15", "sd1"), ("sdxl", "sdxl")])
def test_single_file_round_trip(tiny_dirs, tmp_path, fam, family):
    ref = load_base(str(tiny_dirs[fam]))
    f = ldm_layout.save_single_file(ref.pipe, tmp_path / f"{fam}.safetensors", family, torch.float32)
    assert detect_family_from_checkpoint(f) == family
    m = load_base(str(f), config=str(tiny_dirs[fam]))
    assert m.family == family and type(m.pipe) is type(ref.pipe) and m.prediction_type == "epsilon"
    _assert_same_weights(ref, m)
    # fp16 file loaded in bf16: weights are the (rounded) originals
    f16 = ldm_layout.save_single_file(ref.pipe, tmp_path / f"{fam}_fp16.safetensors", family, torch.float16)
    m16 = load_base(str(f16), config=str(tiny_dirs[fam]), dtype="bf16")
    assert m16.unet.dtype == torch.bfloat16
    w_ref = ref.unet.conv_in.weight.to(torch.float16).to(torch.bfloat16)
    assert torch.equal(m16.unet.conv_in.weight, w_ref)


def test_single_file_missing_tensor_is_an_error(tiny_dirs, tmp_path):
    """diffusers leaves weights a file lacks on the meta device; load_base must say so, not crash later."""
    from safetensors.torch import load_file

    ref = load_base(str(tiny_dirs["sdxl"]))
    f = ldm_layout.save_single_file(ref.pipe, tmp_path / "full.safetensors", "sdxl", torch.float32)
    sd = load_file(str(f))
    del sd["conditioner.embedders.1.model.text_projection"]
    save_file(sd, str(tmp_path / "cut.safetensors"))
    with pytest.raises(ModelLoadError, match="missing weights for the text_encoder_2"):
        load_base(str(tmp_path / "cut.safetensors"), config=str(tiny_dirs["sdxl"]))


def test_single_file_offline_needs_config(tiny_dirs, tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))  # nothing cached
    ref = load_base(str(tiny_dirs["sd15"]))
    f = ldm_layout.save_single_file(ref.pipe, tmp_path / "m.safetensors", "sd1", torch.float32)
    t0 = time.monotonic()
    with pytest.raises(ModelLoadError, match="offline needs config= a local diffusers folder"):
        load_base(str(f))
    assert time.monotonic() - t0 < 10
    with pytest.raises(ModelLoadError, match="is a SDXL model but m.safetensors is SD 1.x"):
        load_base(str(f), config=str(tiny_dirs["sdxl"]))
    with pytest.raises(ModelLoadError, match="family='sdxl' was given"):
        load_base(str(f), config=str(tiny_dirs["sd15"]), family="sdxl")


def test_single_file_prediction_hint_from_metadata(tiny_dirs, tmp_path):
    ref = load_base(str(tiny_dirs["sd15"]))
    f = ldm_layout.save_single_file(ref.pipe, tmp_path / "v.safetensors", "sd1", torch.float32,
                                    metadata={"modelspec.prediction_type": "v"})
    m = load_base(str(f), config=str(tiny_dirs["sd15"]))
    assert m.prediction_type == "v_prediction" and m.pipe.scheduler.config.prediction_type == "v_prediction"
    # an explicit argument wins over the file
    assert load_base(str(f), config=str(tiny_dirs["sd15"]), prediction_type="epsilon").prediction_type == "epsilon"


def test_sd2_folder_and_single_file_hint(tmp_path, capsys):
    folder = _build_tiny_sd2(tmp_path / "sd2")
    ref = load_base(str(folder))
    assert ref.family == "sd2" and ref.prediction_type == "v_prediction"
    f = ldm_layout.save_single_file(ref.pipe, tmp_path / "sd2.safetensors", "sd2", torch.float32)
    assert detect_family_from_checkpoint(f) == "sd2"
    capsys.readouterr()
    m = load_base(str(f), config=str(folder))
    assert m.family == "sd2" and m.prediction_type == "v_prediction"
    out = capsys.readouterr().out
    assert "768-v (v_prediction) or 512-base (epsilon)" in out and "prediction_type='epsilon'" in out
    _assert_same_weights(ref, m)
    m = load_base(str(f), config=str(folder), prediction_type="epsilon")
    assert m.prediction_type == "epsilon" and "768-v" not in capsys.readouterr().out


def test_pickle_single_file_loads_with_weights_only(tiny_dirs, tmp_path):
    ref = load_base(str(tiny_dirs["sd15"]))
    sd = {k: v.contiguous() for k, v in ldm_layout.pipeline_to_original(ref.pipe, "sd1").items()}
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": sd, "global_step": 10}, str(ckpt))
    m = load_base(str(ckpt), config=str(tiny_dirs["sd15"]))
    assert m.family == "sd1"
    _assert_same_weights(ref, m)


# -------------------------------------------------------------------------------------- attention

def test_set_attention(tiny_dirs, monkeypatch):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    m = load_base(str(tiny_dirs["sd15"]))
    m.unet.set_attn_processor(AttnProcessor())
    assert set_attention(m.unet) == "sdpa"
    procs = m.unet.attn_processors
    assert procs and all(isinstance(p, AttnProcessor2_0) for p in procs.values())
    monkeypatch.setattr(notices, "WARNED", set())
    if not torch.cuda.is_available():
        with pytest.warns(UserWarning, match="using PyTorch SDPA attention instead"):
            assert set_attention(m.unet, "xformers") == "sdpa"
        assert all(isinstance(p, AttnProcessor2_0) for p in m.unet.attn_processors.values())
    with pytest.raises(ValueError, match="attention backend"):
        set_attention(m.unet, "flash3")


def test_import_is_light():
    code = ("import sys, helpers.sd.models; "
            "print(sorted(m for m in ('xformers', 'bitsandbytes', 'diffusers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=str(Path(__file__).resolve().parents[1]))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
