"""One precision decision: fp16 on a T4/V100, bf16 on Ampere and newer, fp32 on CPU, in every place that decides."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from helpers.notebook import display as notebook
from helpers.notebook.presets import default_preset, presets_that_fit
from helpers.sd import notices, precision
from helpers.sd.models import pick_dtype
from helpers.sd.precision import decide_precision
from helpers.train.setup import resolve_mixed_precision


def _simulate_gpu(monkeypatch, name: str, capability: tuple[int, int], gib: float) -> None:
    """A CUDA GPU as torch reports it; `is_bf16_supported()` says True as it does on a real T4 (emulation)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    props = SimpleNamespace(name=name, total_memory=int(gib * 2**30), major=capability[0], minor=capability[1])
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    monkeypatch.setattr(notices, "WARNED", set())


def test_auto_on_a_t4_is_fp16_in_every_place_that_decides(monkeypatch):
    _simulate_gpu(monkeypatch, "Tesla T4", (7, 5), 15.0)
    assert decide_precision("auto", "cuda") == "fp16"
    assert pick_dtype("cuda") == torch.float16                      # the model loader
    assert resolve_mixed_precision("auto", "cuda") == "fp16"        # the trainer (accelerate's value)
    info = notebook.gpu_info()                                      # the GPU report
    assert info.bf16 is False and info.capability == (7, 5)
    report = notebook.gpu_report(info)
    assert "precision: fp16" in report and "A100" not in report
    assert default_preset(info.total_gb, "sd1", info.capability) == "SD 1.5 · T4"   # the presets
    assert notebook.preset_for_gpu("sd1") == "SD 1.5 · T4"                           # 03_train_lora's start
    assert default_preset(info.total_gb, "sdxl", info.capability) == "SDXL · T4"


def test_a_large_pre_ampere_gpu_gets_no_bf16_preset(monkeypatch):
    """A 32 GB V100 has the memory of the A100 presets but no bf16 in hardware."""
    _simulate_gpu(monkeypatch, "Tesla V100-SXM2-32GB", (7, 0), 32.0)
    fits = {p.name for p in presets_that_fit(32.0, (7, 0))}
    assert "SD 1.5 · A100/H100" not in fits and "SD 1.5 · T4" in fits
    assert all(p.values["mixed_precision"] != "bf16" for p in presets_that_fit(32.0, (7, 0)))
    assert default_preset(32.0, "sd1", (7, 0)) == "SD 1.5 · T4"
    with pytest.warns(UserWarning, match="emulated"):
        assert decide_precision("bf16", "cuda") == "bf16"       # an explicit choice is kept, with a warning


def test_auto_on_an_a100_is_bf16_everywhere(monkeypatch):
    _simulate_gpu(monkeypatch, "NVIDIA A100-SXM4-80GB", (8, 0), 79.2)
    assert decide_precision("auto", "cuda") == "bf16"
    assert pick_dtype("cuda") == torch.bfloat16
    assert resolve_mixed_precision("auto", "cuda") == "bf16"
    info = notebook.gpu_info()
    assert info.bf16 is True
    assert "precision: bf16" in notebook.gpu_report(info)
    assert default_preset(info.total_gb, "sd1", info.capability) == "SD 1.5 · A100/H100"
    assert notebook.preset_for_gpu("sdxl") == "SDXL · A100/H100"
    assert decide_precision("fp16", "cuda") == "fp16"


def test_auto_on_cpu_is_fp32_everywhere(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(notices, "WARNED", set())
    assert decide_precision("auto", "cpu") == "fp32"
    assert pick_dtype("cpu") == torch.float32
    assert resolve_mixed_precision("auto", "cpu") == "no"
    assert notebook.gpu_info() is None
    assert default_preset(None) == "Toy (CPU, offline)"
    assert decide_precision("bf16", "cpu") == "bf16"
    with pytest.warns(UserWarning, match="needs a CUDA GPU"):
        assert decide_precision("fp16", "cpu") == "fp32"


def test_precision_names_users_write_and_a_clear_error():
    assert [precision.normalize_precision(x) for x in ("no", "float16", "BF16", torch.float32)] == [
        "fp32", "fp16", "bf16", "fp32"]
    with pytest.raises(ValueError, match="mixed_precision must be 'auto', 'fp16', 'bf16'"):
        precision.normalize_precision("int8")
