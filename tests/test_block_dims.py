"""Where the ranks go: per-block ranks and alphas (kohya's block_dims / block_alphas) and a layer filter."""

import pytest

from helpers.config import ConfigError, TrainConfig


def _sd15_unet_config():
    """SD 1.5's real UNet layout (structure only): 4 down blocks, 2 layers each, 12 input / 12 output blocks."""
    return {"_class_name": "UNet2DConditionModel", "sample_size": 64, "in_channels": 4, "out_channels": 4,
            "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "cross_attention_dim": 768,
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "attention_head_dim": 8}


def test_sd15_has_kohyas_25_blocks_and_modules_land_in_them():
    from helpers.train.blocks import block_names, block_of

    names = block_names(_sd15_unet_config())
    assert len(names) == 25 and names[0] == "IN00" and names[12] == "MID" and names[-1] == "OUT11"
    where = block_of(_sd15_unet_config())
    assert where["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"] == "IN01"
    assert where["down_blocks.1.attentions.1.proj_in"] == "IN05"
    assert where["mid_block.attentions.0.proj_out"] == "MID"
    assert where["up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2"] == "OUT11"


def test_a_run_with_block_ranks_and_a_filter_trains_exactly_those(tiny_sd15_dir, concept_dir, tmp_path):
    from safetensors.torch import load_file

    from helpers.train.blocks import block_names, block_of
    from helpers.train.loop import train
    from helpers.sd.models import load_base

    unet_cfg = load_base(str(tiny_sd15_dir)).pipe.unet.config
    names = block_names(unet_cfg)
    dims = [4 if n.startswith("IN") else 0 if n == "MID" else 2 for n in names]
    cfg = TrainConfig(pretrained_model=str(tiny_sd15_dir), train_data_dir=str(concept_dir), resolution=32,
                      max_train_steps=1, train_batch_size=2, rank=8, alpha=8.0, block_dims=dims,
                      block_alphas=[1.0] * len(names), layer_filter=["attn"], mixed_precision="no",
                      output_dir=str(tmp_path), output_name="b")
    sd = load_file(train(cfg, progress=False).lora_path)
    downs = {k: v for k, v in sd.items() if k.endswith(".lora_down.weight")}
    assert downs and all("attn" in k for k in downs)                     # the filter
    assert not any("mid_block" in k for k in downs)                       # MID dim 0: left out
    assert {v.shape[0] for k, v in downs.items() if "down_blocks" in k} == {4}
    assert {v.shape[0] for k, v in downs.items() if "up_blocks" in k} == {2}
    assert {float(v) for k, v in sd.items() if k.endswith(".alpha")} == {1.0}
    assert len(block_of(unet_cfg)) > 0


def test_wrong_counts_and_filters_are_refused_by_name(tiny_sd15_dir, concept_dir, tmp_path):
    from helpers.train.loop import train

    base = dict(pretrained_model=str(tiny_sd15_dir), train_data_dir=str(concept_dir), resolution=32,
                max_train_steps=1, mixed_precision="no", output_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="block_dims needs .* values for this UNet \\(IN00..OUT"):
        train(TrainConfig(**base, block_dims=[4, 4]), progress=False)
    with pytest.raises(ConfigError, match="layer_filter \\['nothing_like_this'\\] keeps none"):
        train(TrainConfig(**base, layer_filter=["nothing_like_this"]), progress=False)
    with pytest.raises(ConfigError, match="use them with method lora"):
        TrainConfig(method="dreambooth", block_dims=[1])
