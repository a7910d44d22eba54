"""benchmarks/train_step.py: the CPU smoke run writes every row with sane fields, and the meta-device FLOP
counter reproduces the published FLOPs of the full-size SD 1.5 / SDXL UNets."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "train_step.py"


@pytest.fixture(scope="module")
def bench():
    """The benchmark script imported as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("train_step_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def full_specs(bench, tmp_path_factory):
    from helpers.toy.tiny import write_clip_tokenizer

    return bench.full_size_specs(write_clip_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.mark.slow
def test_tiny_smoke_run_writes_every_row(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    # --a100-batch 2 (default 8) keeps the bf16 rows quick on a small CPU
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--steps", "2", "--a100-batch", "2",
                           "--json", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ours/ref" in proc.stdout and "GFLOP/step" in proc.stdout  # the table was printed
    data = json.loads(out.read_text())
    assert data["device"] == "cpu" and data["tiny"] is True and data["peak_tflops"] is None
    rows = data["rows"]
    combos = {(r["family"], r["setting"], r["preset"], r["impl"]) for r in rows}
    assert len(rows) == 16 and combos == {(f, s, p, i) for f in ("sd1", "sdxl") for s in ("t4", "a100")
                                          for p in ("attention", "full") for i in ("ours", "reference")}
    by = {(r["family"], r["setting"], r["preset"], r["impl"]): r for r in rows}
    for r in rows:
        assert r["status"] == "ok", r
        assert r["images_per_s"] > 0 and r["ms_per_step"] > 0
        assert math.isclose(r["images_per_s"], r["batch"] * 1000 / r["ms_per_step"], rel_tol=1e-9)
        assert r["flops_per_step"] > 0 and r["tflops_per_s"] > 0
        assert r["mfu"] is None and r["peak_mem_allocated_gb"] is None and r["peak_mem_reserved_gb"] is None
        assert math.isfinite(r["loss"]) and r["loss"] > 0
        assert r["ratio"] > 0
        assert r["attention"] == "sdpa" and r["cached_latents"] is True and r["steps"] == 2
        if r["impl"] == "reference":
            assert r["ratio"] == 1.0
        else:
            ref = by[(r["family"], r["setting"], r["preset"], "reference")]
            assert math.isclose(r["ratio"], r["images_per_s"] / ref["images_per_s"])
            assert r["nonfinite_steps"] == 0
            # same model work: same LoRA targets and rank, text encoded per step on both sides
            assert r["flops_per_step"] == ref["flops_per_step"]
            assert r["trainable_params"] == ref["trainable_params"]
            assert r["lora_params_dtype"] == "float32"  # the trainer keeps LoRA weights in fp32
    for f in ("sd1", "sdxl"):
        for i in ("ours", "reference"):
            t4, a100 = by[(f, "t4", "attention", i)], by[(f, "a100", "attention", i)]
            assert (t4["batch"], a100["batch"]) == (1, 2)
            assert a100["flops_per_step"] == 2 * t4["flops_per_step"]
            # fp16 has no CPU autocast: the trainer's rule falls back to fp32; bf16 runs
            assert (t4["precision"], a100["precision"]) == ("no", "bf16")
            assert t4["optimizer"] == "adamw8bit" and a100["optimizer"].startswith("adamw")
            assert t4["gradient_checkpointing"] is True
            assert a100["gradient_checkpointing"] is (f == "sdxl")
            full = by[(f, "t4", "full", i)]
            assert full["flops_per_step"] > t4["flops_per_step"]
            assert full["trainable_params"] > t4["trainable_params"]


def test_meta_flops_match_published_sd15(bench, full_specs):
    """DESIGN.md: SD 1.5 UNet at 512 px, forward 803 GFLOP; LoRA r16 (attention) forward+backward 1,725."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = UNet2DConditionModel(**bench.SD15_UNET)
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964  # the released SD 1.5 UNet
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(torch.zeros(1, 4, 64, 64, device="meta"), torch.zeros(1, dtype=torch.long, device="meta"),
             encoder_hidden_states=torch.zeros(1, 77, 768, device="meta"))
    assert counter.get_total_flops() == pytest.approx(803e9, rel=0.10)

    lora = bench.count_step_flops(full_specs["sd1"], "attention", 16, 1, encode_text=False)
    assert lora == pytest.approx(1725e9, rel=0.10)
    # text encoding per step adds CLIP-L's forward only (small next to the UNet); FLOPs scale with the batch
    with_text = bench.count_step_flops(full_specs["sd1"], "attention", 16, 1)
    assert lora < with_text < 1.05 * lora
    assert bench.count_step_flops(full_specs["sd1"], "attention", 16, 2) == 2 * with_text
    # DreamBooth: weight gradients everywhere, so forward + backward is about 3 forwards
    dreambooth = bench.count_step_flops(full_specs["sd1"], "dreambooth", 16, 1, encode_text=False)
    assert dreambooth == pytest.approx(3 * 803e9, rel=0.10)


def test_dreambooth_row_trains_the_whole_unet_with_no_reference(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--steps", "1", "--families", "sd1",
                           "--settings", "t4", "--presets", "full,dreambooth", "--json", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {(r["preset"], r["impl"]): r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {("full", "ours"), ("full", "reference"), ("dreambooth", "ours")}
    db, lora = rows[("dreambooth", "ours")], rows[("full", "ours")]
    assert db["status"] == "ok" and db["ratio"] is None
    assert db["trainable_params"] > 5 * lora["trainable_params"]  # the whole tiny UNet (1.6M) vs its LoRA (0.24M)
    assert db["flops_per_step"] > lora["flops_per_step"]


def test_meta_flops_match_published_sdxl(bench):
    """DESIGN.md: SDXL UNet at 1024 px, forward 6,761 GFLOP."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = UNet2DConditionModel(**bench.SDXL_UNET)
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684  # the released SDXL base UNet
    meta = {"device": "meta"}
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(torch.zeros(1, 4, 128, 128, **meta), torch.zeros(1, dtype=torch.long, **meta),
             encoder_hidden_states=torch.zeros(1, 77, 2048, **meta),
             added_cond_kwargs={"text_embeds": torch.zeros(1, 1280, **meta), "time_ids": torch.zeros(1, 6, **meta)})
    assert counter.get_total_flops() == pytest.approx(6761e9, rel=0.10)


@pytest.mark.parametrize("name, peak", [
    ("Tesla T4", 65.0), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100-PCIE-40GB", 312.0), ("NVIDIA L4", 121.0),
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0),
    ("NVIDIA L40S", None), ("NVIDIA A10G", None), ("NVIDIA GeForce RTX 4090", None),
])
def test_peak_tflops_by_device_name(bench, name, peak):
    assert bench.peak_tflops(name) == peak
