"""resize: a LoRA's rank reduced by SVD, exact where the rank allows, the norm kept reported per module."""

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers.toolbox.resize import keep_rank, resize_lora, resize_state_dict


def _effective(sd, name):
    down, up = sd[f"{name}.lora_down.weight"].double(), sd[f"{name}.lora_up.weight"].double()
    r = down.shape[0]
    return (up.reshape(up.shape[0], -1) @ down.reshape(r, -1)) * float(sd[f"{name}.alpha"]) / r


def _lora(rank=8, true_rank=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(64, true_rank, generator=g), torch.randn(true_rank, 32, generator=g)
    up = torch.cat([a, torch.zeros(64, rank - true_rank)], 1)        # a rank-8 file holding a rank-3 weight
    down = torch.cat([b, torch.randn(rank - true_rank, 32, generator=g)], 0)
    conv_down = torch.randn(rank, 4, 3, 3, generator=g)
    conv_up = torch.randn(16, rank, 1, 1, generator=g)
    return {"lora_unet_a.lora_down.weight": down, "lora_unet_a.lora_up.weight": up,
            "lora_unet_a.alpha": torch.tensor(4.0),
            "lora_unet_c.lora_down.weight": conv_down, "lora_unet_c.lora_up.weight": conv_up,
            "lora_unet_c.alpha": torch.tensor(8.0)}


def test_a_rank_that_holds_the_weight_reproduces_it_and_alpha_keeps_its_ratio():
    sd = _lora()
    out, report = resize_state_dict(sd, 3, conv_rank=8)
    assert out["lora_unet_a.lora_down.weight"].shape == (3, 32) and float(out["lora_unet_a.alpha"]) == 1.5
    assert torch.allclose(_effective(out, "lora_unet_a"), _effective(sd, "lora_unet_a"), atol=1e-4)
    assert out["lora_unet_c.lora_down.weight"].shape == (8, 4, 3, 3)   # conv kept at 8: exact too
    assert torch.allclose(_effective(out, "lora_unet_c"), _effective(sd, "lora_unet_c"), atol=1e-4)
    a = next(r for r in report if r.name == "lora_unet_a")
    assert (a.old_rank, a.new_rank) == (8, 3) and a.fro_retained == pytest.approx(1.0, abs=1e-6)


def test_a_lower_rank_keeps_the_top_singular_directions_and_reports_their_share():
    sd = _lora()
    out, report = resize_state_dict(sd, 1)
    w = _effective(sd, "lora_unet_a")
    s = torch.linalg.svdvals(w)
    best = torch.linalg.svd(w)
    rank1 = best.U[:, :1] * s[:1] @ best.Vh[:1]
    assert torch.allclose(_effective(out, "lora_unet_a"), rank1, atol=1e-4)       # Eckart-Young's best rank 1
    a = next(r for r in report if r.name == "lora_unet_a")
    assert a.fro_retained == pytest.approx(float(s[0] / s.norm()), rel=1e-6)


def test_dynamic_methods_choose_the_rank_by_their_definitions():
    s = torch.tensor([8.0, 4.0, 2.0, 1.0])
    assert keep_rank(s, 4, "sv_ratio", 4.0) == 3                  # 8, 4, 2 >= 8 / 4
    assert keep_rank(s, 4, "sv_cumulative", 12 / 15) == 2         # (8 + 4) / 15 reaches 0.8
    assert keep_rank(s, 4, "sv_fro", math.sqrt(80 / 85)) == 2     # sqrt((64 + 16) / 85)
    assert keep_rank(s, 2, "sv_ratio", 100.0) == 2                # capped at the rank asked for
    assert keep_rank(s, 4) == 4
    with pytest.raises(ValueError, match="dynamic method must be one of"):
        keep_rank(s, 4, "svd", 1.0)


def test_the_file_round_trip_and_the_cli(tmp_path, capsys):
    from helpers.__main__ import main

    src = tmp_path / "in.safetensors"
    save_file(_lora(), str(src), metadata={"ss_network_dim": "8", "ss_network_alpha": "4.0",
                                           "sshs_model_hash": "stale", "ss_training_comment": "mine"})
    report = resize_lora(src, tmp_path / "out.safetensors", 2)
    assert {r.new_rank for r in report} == {2}
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == "1.0" and "sshs_model_hash" not in meta
    assert meta["ss_training_comment"].startswith("dimension is resized from 8 to 2; mine")
    assert main(["resize", str(src), str(tmp_path / "d.safetensors"), "--rank", "6", "--dynamic-method", "sv_fro",
                 "--dynamic-param", "0.999", "--verbose"]) == 0
    out = capsys.readouterr().out
    assert "lora_unet_a" in out and "rank   8 -> 3" in out and "fro retained" in out
    assert load_file(tmp_path / "d.safetensors")["lora_unet_a.lora_down.weight"].shape[0] == 3
    assert main(["resize", str(src), str(src), "--rank", "2"]) == 2
    assert "output path other than the input" in capsys.readouterr().err
