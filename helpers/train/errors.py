"""Errors that stop a training run, with advice a user can act on (NaN loss, out of memory)."""

from __future__ import annotations

from pathlib import Path


class TrainingError(RuntimeError):
    """A run stopped; the message says why and what to change. Saved LoRAs and states are kept."""


def _kept(last_saved: Path | None) -> str:
    if last_saved is None:
        return "Nothing had been saved yet in this run."
    return f"The last good save is kept: {last_saved}."


def nan_message(step: int, *, precision: str, learning_rate: float, optimizer: str, family: str,
                vae: str | None, last_saved: Path | None, skipped: int = 0) -> str:
    """Why the loss may have become NaN/inf and what to change, most likely cause first."""
    causes = []
    if precision == "fp16":
        vae_fix = (" For SDXL also use an fp16-safe VAE (vae='madebyollin/sdxl-vae-fp16-fix')."
                   if family == "sdxl" and not vae else "")
        causes.append("fp16 overflow: this run computes in fp16, whose range ends at 65504. Use "
                      "mixed_precision='bf16' on a GPU that has it (A100, L4, RTX 30xx/40xx), or 'no' (fp32)."
                      + vae_fix)
    causes.append(f"learning rate too high ({learning_rate:g}): halve it, or add warmup (lr_warmup_steps)"
                  + (" (Prodigy: lower d_coef)" if optimizer == "prodigy" else "") + ".")
    if precision != "fp16":
        causes.append("a damaged image or caption file in the dataset (re-run the dataset check).")
    lines = [f"The loss became NaN or infinite at step {step}"
             + (f" ({skipped} bad steps in a row were skipped)" if skipped else "") + ". Likely causes and fixes:"]
    lines += [f"  {i}. {c}" for i, c in enumerate(causes, 1)]
    lines.append(f"{_kept(last_saved)} Start again with the changed settings (a new output_name), or, for a "
                 f"one-off spike, set nan_policy='skip' to skip such steps.")
    return "\n".join(lines)


def oom_advice(cfg, *, step: int, last_saved: Path | None, device: str = "cuda") -> str:
    """What to change (`step` = steps completed before the failing one) after an out-of-memory error, in the order that costs least quality first."""
    steps = []
    if cfg.train_batch_size > 1:
        half = max(1, cfg.train_batch_size // 2)
        accum = cfg.gradient_accumulation_steps * (cfg.train_batch_size // half)
        steps.append(f"train_batch_size {cfg.train_batch_size} -> {half}, with gradient_accumulation_steps "
                     f"{cfg.gradient_accumulation_steps} -> {accum} to keep the same effective batch")
    if not cfg.gradient_checkpointing:
        steps.append("gradient_checkpointing=True (about 30% slower, much less activation memory)")
    if cfg.optimizer != "adamw8bit":
        steps.append(f"optimizer='adamw8bit' instead of {cfg.optimizer!r} (8-bit optimizer states)")
    if not cfg.cache_latents:
        steps.append("cache_latents=True (the VAE encoder no longer runs during training)")
    if cfg.train_text_encoder:
        steps.append("train_text_encoder=False")
    lower = {1024: 768, 768: 640, 640: 512, 512: 448}.get(cfg.resolution) or max(8, cfg.resolution * 3 // 4 // 8 * 8)
    steps.append(f"resolution {cfg.resolution} -> {lower}")
    lines = [f"Out of {device.upper()} memory at step {step + 1}. Change, in this order, until it fits:"]
    lines += [f"  {i}. {s}" for i, s in enumerate(steps, 1)]
    lines.append(f"{_kept(last_saved)} gradient_checkpointing and cache_latents can be changed and the run "
                 f"resumed (resume='latest'); the other changes need a new run.")
    return "\n".join(lines)
