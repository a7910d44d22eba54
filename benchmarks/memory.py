"""Peak GPU memory of our real LoRA training step at each preset's settings, estimated without a GPU.

For every GPU preset of `helpers.notebook.presets` it builds the full-size models of that preset's family (SD 1.5
at 512 px, SDXL at 1024 px; configs from benchmarks/train_step.py) as fake tensors (`FakeTensorMode`: shapes,
dtypes and devices, no storage), attaches what the preset trains with the trainer's own `attach_methods`, builds
the trainer's own `DiffusionStep`, and runs two steps (forward, backward, optimizer step, zero_grad) under torch's
`MemTracker`, which counts every tensor by what it is: weights, gradients, optimizer state, activations, temporaries.

What fake tensors cannot run is counted by hand, and each row says so:
- bitsandbytes' 8-bit AdamW keeps 2 bytes of state per trained parameter plus one fp32 absmax per 256-value
  block for each of its two states (`BNB_BLOCK`); the fake run steps no optimizer then.
- The CUDA context and cuBLAS/cuDNN workspaces are not tensors: `CUDA_CONTEXT_GB` (0.5 GiB; nvidia-smi shows about
  0.3-0.6 GB for a fresh PyTorch process on T4/A100) is added to the peak in `peak_gb`.
- Autocast runs as CPU autocast in the preset's dtype: its cast lists are CUDA's for matmuls and convolutions,
  the ops that hold the activations.
- Attention is PyTorch's SDPA with a fused kernel (flash or memory-efficient on CUDA, the fused CPU kernel here):
  no L x L attention matrix is kept, on either.

`--write-table` stores the peaks as data (`helpers/notebook/memory_table.json`); the presets' figures and
`gpu_report`'s "presets that fit" read it, with the margin `MARGIN` for the allocator's fragmentation (reserved
memory above the allocated peak).

    python benchmarks/memory.py                       # the table
    python benchmarks/memory.py --write-table         # and store it for the presets
    python benchmarks/memory.py --tiny                # the tiny test models: a smoke run (the test runs this)
    python benchmarks/memory.py --references          # the estimate beside peaks others measured and published

`--references` checks the estimator where a real peak is known: `REFERENCES` are configs with a measured peak
published by others that our trainer runs as they were run (same model size, resolution, batch, precision,
optimizer, checkpointing, what is trained). A published nvidia-smi figure is reserved memory plus the CUDA
context, so the estimate (allocated peak plus CUDA_CONTEXT_GB) should sit a little under it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a checkout
sys.path.insert(0, str(ROOT / "benchmarks"))

GB = 1024 ** 3
CUDA_CONTEXT_GB = 0.5
BNB_BLOCK = 256           # bitsandbytes' blockwise 8-bit optimizer: one fp32 absmax per 256 values and state
TABLE = ROOT / "helpers" / "notebook" / "memory_table.json"


@dataclass
class Row:
    preset: str
    family: str
    resolution: int
    batch: int
    precision: str
    gradient_checkpointing: bool
    optimizer: str
    trained_params: int
    weights_gb: float = 0.0          # frozen models on the GPU during the steps + trained parameters
    gradients_gb: float = 0.0
    optimizer_state_gb: float = 0.0
    activations_gb: float = 0.0      # activations and temporaries at the peak
    tracked_peak_gb: float = 0.0     # what the tracker saw at once (everything above, at the peak moment)
    peak_gb: float = 0.0             # tracked peak + analytic parts + CUDA context
    analytic: str = ""


@dataclass(frozen=True)
class Reference:
    """A training config with a peak that others measured on a GPU and published, run here by our own trainer."""

    name: str
    family: str
    values: dict[str, Any]
    published_gib: float
    measured_as: str
    source: str


# diffusers PR 2039 (merged January 2023): examples/dreambooth/train_dreambooth.py on SD 1.x at 512 px with
# --mixed_precision fp16 --use_8bit_adam --enable_xformers_memory_efficient_attention --gradient_checkpointing
# --train_text_encoder and gradients set to None, "VRAM usage of 11124MiB" at batch 1 and "11694MiB" at batch 5
# (nvidia-smi, RTX 3060 12 GB). The whole UNet and text encoder train in fp32 under fp16 autocast; the VAE stays
# on the GPU in fp16 and encodes every step (the script has no latent cache). The estimate counts the VAE's
# weights, not its encode: that runs under no_grad before the UNet's forward, and its temporaries are freed first.
_DREAMBOOTH_2039 = dict(family="sd1", resolution=512, method="dreambooth", train_text_encoder=True,
                        mixed_precision="fp16", gradient_checkpointing=True, optimizer="adamw8bit",
                        cache_latents=False, learning_rate=5e-6, enable_bucket=False)
REFERENCES = tuple(
    Reference(f"DreamBooth SD 1.x · 512 · batch {batch} · text encoder trained", "sd1",
              dict(_DREAMBOOTH_2039, train_batch_size=batch), mib / 1024,
              "nvidia-smi, RTX 3060 12 GB", "https://github.com/huggingface/diffusers/pull/2039")
    for batch, mib in ((1, 11124), (5, 11694)))


def _fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)   # the scheduler's tables and generators are real


def _models(spec, dtype: torch.dtype, with_vae: bool):
    """The preset family's UNet, text encoders and (when it stays on the GPU) VAE, built in `dtype` on the meta
    device (no storage; `to_fake` gives them fake CPU tensors once the trainables are attached)."""
    from diffusers import AutoencoderKL
    from train_step import SD_VAE, build_models

    unet, tes = build_models(spec, "meta", dtype)
    vae = None
    if with_vae:
        with torch.device("meta"):
            vae = AutoencoderKL(**SD_VAE).to(dtype)
    return unet, tes, vae


def preset_config(values: dict[str, Any]):
    """(TrainConfig, compute dtype) of a preset's values, with SDPA attention (what both the estimate and the
    measurement run)."""
    from helpers.config import TrainConfig
    from helpers.sd.precision import precision_dtype

    cfg = TrainConfig(**values).replace(attention="sdpa")
    return cfg, precision_dtype(cfg.mixed_precision)


def to_fake(module: torch.nn.Module) -> None:
    """Replace every parameter and buffer of `module` (meta tensors) by a fake CPU tensor of the same shape, dtype
    and requires_grad, in place. Called inside FakeTensorMode: CPU autocast then applies, as CUDA autocast would
    on a GPU (meta tensors see no autocast; `Module.to` cannot swap fake parameters that peft refers to)."""
    for mod in module.modules():
        for key, p in list(mod._parameters.items()):
            if p is not None:
                mod._parameters[key] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="cpu"),
                                                          requires_grad=p.requires_grad)
        for key, b in list(mod._buffers.items()):
            if b is not None:
                mod._buffers[key] = torch.zeros(b.shape, dtype=b.dtype, device="cpu")


def _peak_tracker():
    """torch's MemTracker, keeping the run's peak only: its per-module peaks walk every tracked module at every op,
    which on SDXL (thousands of modules) takes most of an hour; the whole step's peak is what the table needs."""
    from copy import deepcopy

    from torch.distributed._tools import mem_tracker

    class PeakTracker(mem_tracker.MemTracker):
        def _update_peak_stats(self, peak_state) -> None:
            for dev, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < snap[mem_tracker._TOTAL_KEY]:
                    self._peak_mem[dev] = snap[mem_tracker._TOTAL_KEY]
                    self._peak_mem_snap[dev] = deepcopy(snap)

    return PeakTracker()


class _NoHook:
    def remove(self) -> None:
        pass


def _skip_grad_hooks(tracker, models: list[torch.nn.Module]) -> None:
    """MemTracker hooks every parameter's gradient and fails on frozen ones (no gradient to hook): mark the frozen
    parameters as hooked already, so it counts them as weights only."""
    for model in models:
        for p in model.parameters():
            if not p.requires_grad:
                tracker._param_to_grad_hook_handles[p] = (_NoHook(), _NoHook())


def _sizes(snapshot: dict) -> dict[str, int]:
    """The CPU device's MemTracker snapshot (where the fake tensors live) as {kind: bytes}: Parameter, Buffer,
    Gradient, Activation, Temp, Optstate, Other, Total."""
    dev = next(v for d, v in snapshot.items() if torch.device(d).type == "cpu")
    return {str(getattr(k, "value", k)): int(v) for k, v in dev.items()}


def estimate(preset_name: str, spec, values: dict[str, Any], steps: int = 2) -> Row:
    """One preset's row: its config on `spec`'s models, two steps under MemTracker (fake tensors)."""
    from helpers.train.setup import attach_methods, make_step, param_groups, trainable_params
    from train_step import _batch, noise_scheduler

    cfg, dtype = preset_config(values)
    keeps_text = not cfg.cache_text_encoder_outputs
    keeps_vae = not cfg.cache_latents
    eight_bit = cfg.optimizer == "adamw8bit"
    unet, tes, vae = _models(spec, dtype, keeps_vae)
    methods = attach_methods(cfg, unet, tes, spec.tokenizers, torch.device("meta"))
    with _fake_mode():
        for model in [unet, *tes, *([vae] if vae is not None else [])]:
            to_fake(model)
        params = trainable_params(methods)
        optimizer = None if eight_bit else torch.optim.AdamW(param_groups(cfg, methods), lr=cfg.learning_rate,
                                                             fused=True)
        step = make_step(cfg, methods, spec.family, noise_scheduler(), spec.tokenizers, tes, torch.device("cpu"),
                         dtype)
        batch = _batch(spec, cfg.train_batch_size, torch.device("cpu"))
        if not keeps_text:   # cached text embeddings: computed once, the encoders leave the GPU
            with torch.no_grad():
                cached = step.condition(batch)
            step.condition = lambda b: cached
        unet.train()
        on_gpu = [unet, *(tes if keeps_text else []), *([vae] if vae is not None else [])]
        tracker = _peak_tracker()
        _skip_grad_hooks(tracker, on_gpu)
        tracker.track_external(*on_gpu, *([optimizer] if optimizer else []))
        gen = torch.Generator().manual_seed(0)
        with tracker:
            for i in range(steps):
                with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                    loss = step.loss(unet, batch, gen)
                loss.backward()
                if optimizer is not None:
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                else:
                    for p in params:
                        p.grad = None
                if i == 0:
                    tracker.reset_mod_stats()
        peak = _sizes(tracker.get_tracker_snapshot("peak"))
    n = sum(p.numel() for p in params)
    analytic = []
    state = peak.get("Optstate", 0)
    if eight_bit:
        state = 2 * n + 2 * 4 * math.ceil(n / BNB_BLOCK)
        analytic.append(f"8-bit AdamW state {state / GB:.3f} GB by count (2 bytes per parameter + fp32 absmax "
                        f"per {BNB_BLOCK})")
    analytic.append(f"CUDA context {CUDA_CONTEXT_GB} GB")
    weights = peak.get("Parameter", 0) + peak.get("Buffer", 0)
    grads = peak.get("Gradient", 0)
    acts = peak.get("Activation", 0) + peak.get("Temp", 0) + peak.get("Input", 0)
    tracked = peak.get("Total", weights + grads + acts + peak.get("Optstate", 0))
    total = tracked - peak.get("Optstate", 0) + state
    return Row(preset=preset_name, family=spec.family, resolution=spec.resolution, batch=cfg.train_batch_size,
               precision=cfg.mixed_precision, gradient_checkpointing=cfg.gradient_checkpointing,
               optimizer=cfg.optimizer, trained_params=n, weights_gb=weights / GB, gradients_gb=grads / GB,
               optimizer_state_gb=state / GB, activations_gb=acts / GB, tracked_peak_gb=tracked / GB,
               peak_gb=total / GB + CUDA_CONTEXT_GB, analytic="; ".join(analytic))


def measure(preset_name: str, spec, values: dict[str, Any], steps: int = 3) -> dict[str, Any]:
    """On a CUDA GPU: the same step with real (random) weights, the real optimizer (bitsandbytes' 8-bit AdamW too)
    and CUDA autocast; returns the measured peak allocated and reserved GiB, to set beside `estimate`."""
    from helpers.train.optim import build_optimizer
    from helpers.train.setup import attach_methods, make_step, param_groups, trainable_params
    from train_step import _batch, build_models, noise_scheduler

    cfg, dtype = preset_config(values)
    device = torch.device("cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    unet, tes = build_models(spec, device, dtype)
    methods = attach_methods(cfg, unet, tes, spec.tokenizers, device)
    optimizer = build_optimizer(cfg.optimizer, param_groups(cfg, methods), lr=cfg.learning_rate)
    step = make_step(cfg, methods, spec.family, noise_scheduler(), spec.tokenizers, tes, device, dtype)
    batch = _batch(spec, cfg.train_batch_size, device)
    if cfg.cache_text_encoder_outputs:   # as the trainer does: encode once, then the encoders leave the GPU
        with torch.no_grad():
            cached = step.condition(batch)
        step.condition = lambda b: cached
        for te in tes:
            te.to("cpu")
    unet.train()
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    gen = torch.Generator(device=device).manual_seed(0)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            loss = step.loss(unet, batch, gen)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(trainable_params(methods), cfg.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    out = {"preset": preset_name, "measured_allocated_gb": torch.cuda.max_memory_allocated() / GB,
           "measured_reserved_gb": torch.cuda.max_memory_reserved() / GB, "gpu": torch.cuda.get_device_name()}
    del unet, tes, methods, optimizer, step, batch
    torch.cuda.empty_cache()
    return out


def format_table(rows: list[Row]) -> str:
    head = ("| preset | batch | precision | ckpt | optimizer | trained | weights | grads | optim state | "
            "activations | peak (GiB) |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(f"| {r.preset} | {r.batch} | {r.precision} | {'on' if r.gradient_checkpointing else 'off'} | "
                     f"{r.optimizer} | {r.trained_params / 1e6:.1f} M | {r.weights_gb:.2f} | {r.gradients_gb:.2f} | "
                     f"{r.optimizer_state_gb:.2f} | {r.activations_gb:.2f} | {r.peak_gb:.2f} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="*", help="preset names (default: every GPU preset)")
    p.add_argument("--tiny", action="store_true", help="the tiny test models instead of full size (smoke run)")
    p.add_argument("--json", type=Path, help="write the rows here")
    p.add_argument("--write-table", action="store_true", help=f"store the peaks in {TABLE.relative_to(ROOT)}")
    p.add_argument("--references", action="store_true", help="estimate the configs with a published measured peak "
                   "(REFERENCES) and print the estimate beside it")
    p.add_argument("--measure", action="store_true", help="on a CUDA GPU: measure each preset's real peak (random "
                   "weights) and print it beside the stored estimate")
    return p.parse_args(argv)


def main(argv=None) -> list[Row]:
    from helpers.notebook.presets import PRESETS
    from helpers.toy.tiny import write_clip_tokenizer
    from train_step import full_size_specs, tiny_specs

    args = parse_args(argv)
    names = args.presets or [n for n, p in PRESETS.items() if p.family != "toy"]
    rows: list[Row] = []
    measured = []
    with tempfile.TemporaryDirectory() as tmp:
        tok = write_clip_tokenizer(Path(tmp))
        specs = tiny_specs(tok) if args.tiny else full_size_specs(tok)
        if args.measure:   # the stored estimates (a fake run takes minutes of single-threaded Python) vs this GPU
            table = json.loads(TABLE.read_text())
            for name in names:
                m = measure(name, specs[PRESETS[name].family], PRESETS[name].values)
                # allocated tensors on both sides: the CUDA context is in neither
                m["estimated_allocated_gb"] = table[name] - CUDA_CONTEXT_GB
                m["error"] = m["estimated_allocated_gb"] / m["measured_allocated_gb"] - 1
                measured.append(m)
                print(f"{name}: estimated {m['estimated_allocated_gb']:.2f} GiB, measured "
                      f"{m['measured_allocated_gb']:.2f} GiB allocated ({m['measured_reserved_gb']:.2f} reserved) "
                      f"on {m['gpu']}: {100 * m['error']:+.1f}%", flush=True)
        else:   # the presets, or the configs with a published peak
            jobs = ([(r.name, r.family, r.values, r) for r in REFERENCES] if args.references else
                    [(n, PRESETS[n].family, PRESETS[n].values, None) for n in names])
            for name, family, values, ref in jobs:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    rows.append(estimate(name, specs[family], values))
                line = f"{name}: peak {rows[-1].peak_gb:.2f} GiB"
                if ref is not None:
                    line += (f", published {ref.published_gib:.2f} GiB ({ref.measured_as}; {ref.source}): "
                             f"{100 * (rows[-1].peak_gb / ref.published_gib - 1):+.1f}%")
                print(line, flush=True)
            print(format_table(rows))
            print(f"torch {torch.__version__}; " + "; ".join(f"{r.preset}: {r.analytic}" for r in rows))
    if args.json:
        args.json.write_text(json.dumps({"rows": [r.__dict__ for r in rows], "measured": measured}, indent=1))
    if args.write_table and rows and not args.tiny and not args.references:
        TABLE.write_text(json.dumps({r.preset: round(r.peak_gb, 2) for r in rows}, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
