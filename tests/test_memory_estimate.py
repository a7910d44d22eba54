"""benchmarks/memory.py: the fake-tensor memory estimate of our real training step, run on the tiny models (its
smallest CPU mode; not timed) so it cannot rot, checked against the numbers that are known exactly; and the
presets' memory figures come from its committed table."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def memory():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("memory_benchmark", ROOT / "benchmarks" / "memory.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def tiny(memory, tmp_path_factory):
    from train_step import tiny_specs

    from helpers.toy.tiny import write_clip_tokenizer

    return tiny_specs(write_clip_tokenizer(tmp_path_factory.mktemp("tok")))


def _weights_bytes(memory, spec, values) -> tuple[int, int, int]:
    """(bytes of every weight the step keeps on the GPU, trained parameters, trained tensors), counted here from
    the models themselves."""
    from helpers.train.setup import attach_methods, trainable_params

    cfg, dtype = memory.preset_config(values)
    unet, tes, _ = memory._models(spec, dtype, False)
    methods = attach_methods(cfg, unet, tes, spec.tokenizers, torch.device("meta"))
    kept = [unet] + ([] if cfg.cache_text_encoder_outputs else tes)
    total = sum(t.numel() * t.element_size() for m in kept for t in [*m.parameters(), *m.buffers()])
    trained = trainable_params(methods)
    return total, sum(p.numel() for p in trained), len(trained)


def test_tiny_estimate_counts_what_is_known_exactly(memory, tiny):
    from helpers.notebook.presets import PRESETS

    adamw, eight_bit = PRESETS["SD 1.5 · A100/H100"], PRESETS["SDXL · T4"]
    row = memory.estimate(adamw.name, tiny["sd1"], adamw.values)
    weights, n, tensors = _weights_bytes(memory, tiny["sd1"], adamw.values)
    gb = memory.GB
    assert row.weights_gb * gb == weights                     # every weight once, in its dtype
    assert row.trained_params == n
    assert row.optimizer_state_gb * gb == 8 * n + 4 * tensors  # AdamW: two fp32 moments and a step per tensor
    assert row.peak_gb == pytest.approx(row.tracked_peak_gb + memory.CUDA_CONTEXT_GB)
    assert row.tracked_peak_gb >= row.weights_gb + row.optimizer_state_gb

    row8 = memory.estimate(eight_bit.name, tiny["sdxl"], eight_bit.values)
    weights8, n8, _ = _weights_bytes(memory, tiny["sdxl"], eight_bit.values)
    assert row8.weights_gb * gb == weights8                   # cached text: the encoders are not counted
    assert row8.optimizer_state_gb * gb == 2 * n8 + 8 * math.ceil(n8 / memory.BNB_BLOCK)
    assert "8-bit AdamW state" in row8.analytic and "CUDA context" in row8.analytic


def test_gradient_checkpointing_lowers_the_estimated_activations(memory, tiny):
    from helpers.notebook.presets import PRESETS

    values = dict(PRESETS["SD 1.5 · A100/H100"].values, train_batch_size=4)
    plain = memory.estimate("no checkpointing", tiny["sd1"], dict(values, gradient_checkpointing=False))
    ckpt = memory.estimate("checkpointing", tiny["sd1"], dict(values, gradient_checkpointing=True))
    assert ckpt.activations_gb < 0.7 * plain.activations_gb
    assert ckpt.weights_gb == plain.weights_gb


def test_the_presets_memory_figures_are_the_estimates_with_the_margin(memory):
    from helpers.notebook.presets import MARGIN, PRESETS

    table = json.loads(memory.TABLE.read_text())
    gpu = [p for p in PRESETS.values() if p.family != "toy"]
    assert sorted(table) == sorted(p.name for p in gpu)
    for p in gpu:
        assert p.gpu_gb == round(table[p.name] * (1 + MARGIN), 1), p.name
    assert table["SD 1.5 · T4"] <= 6.0 and table["SDXL · T4"] <= 14.5    # a 15 GiB T4 runs both


def test_the_published_reference_runs_trains_what_that_run_trained(memory, tiny):
    """The references (a peak others measured) are estimated with our trainer as that run was set up: DreamBooth
    trains every UNet and text-encoder weight as an fp32 master, and the VAE stays on the GPU (no latent cache)."""
    ref = memory.REFERENCES[0]
    row = memory.estimate(ref.name, tiny[ref.family], ref.values)
    cfg, dtype = memory.preset_config(ref.values)
    unet, tes, vae = memory._models(tiny[ref.family], dtype, True)
    everything = sum(p.numel() for m in [unet, *tes] for p in m.parameters())
    assert row.trained_params == everything
    fp32_masters = 4 * everything
    frozen_vae = sum(p.numel() * p.element_size() for p in vae.parameters())
    assert row.weights_gb * memory.GB >= fp32_masters + frozen_vae
    assert row.optimizer_state_gb * memory.GB == 2 * everything + 8 * math.ceil(everything / memory.BNB_BLOCK)
    assert all(r.source.startswith("https://") and r.published_gib > 0 for r in memory.REFERENCES)
