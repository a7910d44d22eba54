"""`inspect`: what a LoRA file holds, read from the file alone."""

import json

import pytest
import torch
from safetensors.torch import save_file

from helpers.toolbox.inspect import format_info, inspect_lora


def _kohya_file(path, *, conv=False, te=True, meta=None):
    t = {}
    for blk, rank in (("down_blocks_0", 4), ("up_blocks_1", 8)):
        name = f"lora_unet_{blk}_attentions_0_transformer_blocks_0_attn2_to_k"
        t[f"{name}.lora_down.weight"] = torch.zeros(rank, 768)
        t[f"{name}.lora_up.weight"] = torch.zeros(320, rank)
        t[f"{name}.alpha"] = torch.tensor(float(rank) / 2)
    if conv:
        t["lora_unet_down_blocks_1_resnets_0_conv1.lora_down.weight"] = torch.zeros(4, 320, 3, 3)
        t["lora_unet_down_blocks_1_resnets_0_conv1.lora_up.weight"] = torch.zeros(640, 4, 1, 1)
    if te:
        t["lora_te_text_model_encoder_layers_3_mlp_fc1.lora_down.weight"] = torch.zeros(4, 768)
        t["lora_te_text_model_encoder_layers_3_mlp_fc1.lora_up.weight"] = torch.zeros(3072, 4)
    save_file(t, str(path), metadata=meta or {})
    return path


def test_a_kohya_lora_is_described_block_by_block(tmp_path):
    meta = {"ss_base_model_version": "sd_v1", "ss_network_module": "networks.lora", "ss_network_dim": "8",
            "ss_learning_rate": "0.0001", "ss_optimizer": "AdamW8bit", "ss_steps": "1500",
            "ss_tag_frequency": json.dumps({"10_sks": {"sks": 20, "red": 5}, "5_other": {"sks": 4}}),
            "ss_clip_skip": "None"}
    info = inspect_lora(_kohya_file(tmp_path / "a.safetensors", meta=meta))
    assert (info.layout, info.network, info.family) == ("kohya", "lora", "SD 1.x")
    assert info.components == {"unet": 2, "text_encoder": 1}
    by_name = {b.name: b for b in info.blocks}
    assert by_name["down_blocks_0"].ranks == [4] and by_name["down_blocks_0"].alphas == [2.0]
    assert by_name["up_blocks_1"].ranks == [8] and by_name["te layer 03"].ranks == [4]
    assert [b.name for b in info.blocks] == ["te layer 03", "down_blocks_0", "up_blocks_1"]
    settings = dict(info.settings)
    assert settings["learning rate"] == "0.0001" and settings["optimizer"] == "AdamW8bit"
    assert "clip skip" not in settings                        # "None" is not shown
    assert info.tags[:2] == [("sks", 24), ("red", 5)]
    assert len(info.hashes["sha256"]) == 64 and info.hashes["a1111_short"] == info.hashes["tensor_data_sha256"][:12]
    text = format_info(info)
    assert text.startswith("a.safetensors: lora LoRA for SD 1.x (its ss_base_model_version metadata)")
    assert "up_blocks_1" in text and "sks (24)" in text


def test_network_types_and_families_from_the_keys(tmp_path):
    locon = inspect_lora(_kohya_file(tmp_path / "c.safetensors", conv=True, te=False))
    assert locon.network == "locon" and locon.family == "SD 1.x"   # 768-wide cross-attention keys
    loha = {"lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": torch.zeros(320, 4),
            "lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_b": torch.zeros(4, 320),
            "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0)}
    save_file(loha, str(tmp_path / "h.safetensors"))
    assert inspect_lora(tmp_path / "h.safetensors").network == "loha"
    peft = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": torch.zeros(4, 2048),
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": torch.zeros(320, 4)}
    save_file(peft, str(tmp_path / "p.safetensors"))
    info = inspect_lora(tmp_path / "p.safetensors")
    assert (info.layout, info.family, info.blocks[0].ranks) == ("diffusers", "SDXL", [4])


def test_the_cli_prints_the_report_and_refuses_what_is_no_lora(tmp_path, capsys):
    from helpers.__main__ import main

    path = _kohya_file(tmp_path / "x.safetensors", meta={"ss_base_model_version": "sdxl_base_v1-0"})
    assert main(["inspect", str(path)]) == 0
    assert "x.safetensors: lora LoRA for SDXL" in capsys.readouterr().out
    assert main(["inspect", "--json", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["family"] == "SDXL"
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "no.safetensors"))
    assert main(["inspect", str(tmp_path / "no.safetensors")]) == 2
    assert "holds no LoRA modules" in capsys.readouterr().err
    with pytest.raises(ValueError, match="holds no LoRA modules"):
        inspect_lora(tmp_path / "no.safetensors")
