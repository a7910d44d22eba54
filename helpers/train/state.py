"""Training states: everything needed to continue a run exactly where it stopped.

A state is a folder `<output_dir>/states/<output_name>-step<N>/` holding
  trainable.safetensors  the trainable (LoRA) parameters in fp32, by module and parameter name
  ema.safetensors        their EMA, when the run keeps one (ema_decay)
  optimizer.pt           optimizer, LR scheduler and grad-scaler state dicts (read with weights_only=True)
  rng.pt                 every process's RNG states (torch, CUDA, noise generator, VAE sampling, python, numpy)
  state.json             step, epoch, position in the epoch, the config, the LoRA saves kept so far
It is written to a temp folder and renamed (helpers.atomic), so a run killed mid-save leaves the previous
state as the newest complete one. Only rank 0 writes; every rank reads the same folder.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import atomic_dir
from ..config import ConfigError
from ..files import BadFileError, load_safetensors

STATE_FORMAT = "helpers-train-state"
STATE_VERSION = 1
STATES_DIR = "states"
_STATE_NAME = re.compile(r"^(?P<name>.+)-step(?P<step>\d+)$")

# Settings that may differ between the run that saved a state and the run that resumes it: they change
# how long the run goes, what it writes or how it computes, not what one training step does.
RESUME_MAY_CHANGE = frozenset({
    "resume", "max_train_steps", "max_train_epochs", "output_dir", "save_every_n_steps", "save_every_n_epochs",
    "save_last_n", "save_format", "save_precision", "save_state_every_n_steps", "save_state_last_n",
    "log_every_n_steps", "sample_every_n_steps", "sample_prompts", "sample_negative_prompt", "sample_seed",
    "sample_steps", "sample_cfg", "sample_sampler", "validation_every_n_steps", "validation_images",
    "gradient_checkpointing", "attention", "cache_latents", "cache_latents_to_disk", "nan_policy",
    "cache_text_encoder_outputs", "cache_text_encoder_outputs_to_disk",
    "pretrained_model", "model_config",  # the same model may live at another path (Drive vs local copy)
})


@dataclass
class TrainState:
    """A loaded state: where the run continues and the tensors to put back."""

    path: Path
    step: int
    epoch: int                 # the epoch to continue in (0-based)
    batch_in_epoch: int        # micro-batches of that epoch already consumed (per process)
    trainable: dict[str, torch.Tensor]
    optimizer: dict
    lr_scheduler: dict
    scaler: dict | None
    rng: list[dict]            # one per process of the run that saved it
    info: dict[str, Any] = field(default_factory=dict)
    ema: dict[str, torch.Tensor] | None = None   # the EMA of the trained parameters, when the run keeps one


def states_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / STATES_DIR


def state_name(output_name: str, step: int) -> str:
    return f"{output_name}-step{step:06d}"


def list_states(output_dir: str | Path, output_name: str) -> list[Path]:
    """Complete state folders of this run, oldest first (temp folders of interrupted saves are not listed)."""
    folder = states_dir(output_dir)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _STATE_NAME.match(p.name)
        if p.is_dir() and m and m.group("name") == output_name and (p / "state.json").is_file():
            found.append((int(m.group("step")), p))
    return [p for _, p in sorted(found)]


# ------------------------------------------------------------------------------------------------
# RNG states
# ------------------------------------------------------------------------------------------------

def capture_rng(generators: dict[str, torch.Generator | None]) -> dict[str, Any]:
    """This process's RNG states as tensors and plain values (safe for weights_only loading)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
    }
    for name, gen in generators.items():
        state[f"gen_{name}"] = gen.get_state() if gen is not None else None
    return state


def restore_rng(state: dict[str, Any], generators: dict[str, torch.Generator | None]) -> None:
    """Put back what `capture_rng` took."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    for name, gen in generators.items():
        saved = state.get(f"gen_{name}")
        if gen is not None and saved is not None:
            gen.set_state(saved.to(gen.get_state().device) if hasattr(saved, "to") else saved)


# ------------------------------------------------------------------------------------------------
# Trainable parameters
# ------------------------------------------------------------------------------------------------

def trainable_tensors(models: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """{"<component>/<param name>": fp32 CPU copy} of every parameter that requires grad."""
    out = {}
    for comp, model in models.items():
        for name, p in model.named_parameters():
            if p.requires_grad:
                out[f"{comp}/{name}"] = p.detach().to("cpu", torch.float32).contiguous()
    return out


def load_trainable(models: dict[str, torch.nn.Module], tensors: dict[str, torch.Tensor], where: Path) -> None:
    """Copy saved trainable parameters into the models; every name and shape must match."""
    expected = {f"{comp}/{name}": p for comp, model in models.items()
                for name, p in model.named_parameters() if p.requires_grad}
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ConfigError(
            f"the state in {where} does not fit this run's LoRA layers ({len(missing)} missing, {len(extra)} "
            f"unexpected, e.g. {(missing or extra)[0]}): it was saved with other rank/target/train_text_encoder "
            f"settings or another base model. Resume with the same settings, or start a new run.")
    with torch.no_grad():
        for key, p in expected.items():
            t = tensors[key]
            if t.shape != p.shape:
                raise ConfigError(f"the state in {where} has {key} of shape {tuple(t.shape)}, this run "
                                  f"{tuple(p.shape)}: other LoRA settings. Resume with the same settings.")
            p.copy_(t.to(p.device, p.dtype))


# ------------------------------------------------------------------------------------------------
# Saving and loading
# ------------------------------------------------------------------------------------------------

def save_state(folder: Path, *, trainable: dict[str, torch.Tensor], optimizer: dict, lr_scheduler: dict,
               scaler: dict | None, rng: list[dict], info: dict[str, Any],
               ema: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a state folder atomically (rank 0 calls this with every rank's RNG states)."""
    from safetensors.torch import save_file

    with atomic_dir(folder) as tmp:
        save_file(trainable, str(tmp / "trainable.safetensors"), metadata={"format": STATE_FORMAT})
        if ema is not None:
            save_file(ema, str(tmp / "ema.safetensors"), metadata={"format": STATE_FORMAT})
        torch.save({"optimizer": optimizer, "lr_scheduler": lr_scheduler, "scaler": scaler}, tmp / "optimizer.pt")
        torch.save({"ranks": rng}, tmp / "rng.pt")
        record = {"format": STATE_FORMAT, "version": STATE_VERSION, **info}
        (tmp / "state.json").write_text(json.dumps(record, indent=1, default=str), encoding="utf-8")
    return folder


def _load_pt(path: Path) -> Any:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"{path} could not be read safely ({type(e).__name__}: {str(e)[:200]}); "
                          f"this state is damaged or was not written by helpers") from None


def load_state(folder: str | Path) -> TrainState:
    """Read a state folder (weights_only unpickling; safetensors for the parameters)."""
    folder = Path(folder)
    if not (folder / "state.json").is_file():
        raise ConfigError(f"{folder} is not a complete training state (no state.json): choose a folder under "
                          f"{STATES_DIR}/ named <output_name>-step<N>, or resume='latest'")
    info = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    if info.get("format") != STATE_FORMAT:
        raise ConfigError(f"{folder} is not a helpers training state")
    if int(info.get("version", 0)) > STATE_VERSION:
        raise ConfigError(f"{folder} was saved by a newer version of helpers (state version {info['version']}); "
                          f"update helpers to resume it")
    try:
        trainable = load_safetensors(folder / "trainable.safetensors", "training state",
                                     remedy="resume from an older state (resume=<its folder>)")[0]
    except (BadFileError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from None
    ema = None
    if (folder / "ema.safetensors").exists():
        try:
            ema = load_safetensors(folder / "ema.safetensors", "training state's EMA",
                                   remedy="resume from an older state (resume=<its folder>)")[0]
        except BadFileError as e:
            raise ConfigError(str(e)) from None
    opt = _load_pt(folder / "optimizer.pt")
    rng = _load_pt(folder / "rng.pt")
    return TrainState(path=folder, step=int(info["step"]), epoch=int(info["epoch"]),
                      batch_in_epoch=int(info["batch_in_epoch"]), trainable=trainable, optimizer=opt["optimizer"],
                      lr_scheduler=opt["lr_scheduler"], scaler=opt.get("scaler"), rng=rng["ranks"], info=info,
                      ema=ema)


def find_resume_state(resume: str | None, output_dir: str | Path, output_name: str) -> Path | None:
    """The state folder to resume from: "latest" = the newest complete one here (None if there is none
    yet: a fresh start), any other value = that folder, which must exist."""
    if not resume:
        return None
    if resume == "latest":
        found = list_states(output_dir, output_name)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_dir():
        raise ConfigError(f"resume: {resume!r} is not a state folder; use 'latest' or one of "
                          f"{[p.name for p in list_states(output_dir, output_name)] or 'the folders under states/'}")
    return path


def check_config_compatible(saved: dict[str, Any], current: dict[str, Any], where: Path) -> None:
    """Refuse to resume a state under settings that change what a training step does."""
    diffs = [f"{k}: {saved.get(k)!r} in the state, {current.get(k)!r} now" for k in sorted(current)
             if k not in RESUME_MAY_CHANGE and k in saved and saved.get(k) != current.get(k)]
    if diffs:
        raise ConfigError(
            f"the state in {where} was saved by a run with other settings ({'; '.join(diffs)}). Resume with the "
            f"settings it was saved with, or start a new run (another output_name, or resume=None). Only the "
            f"length of the run, what it saves and logs, and memory options may change on resume.")


def prune_states(output_dir: str | Path, output_name: str, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete states; returns the removed folders."""
    import shutil

    found = list_states(output_dir, output_name)
    removed = found[:-keep] if keep > 0 else []
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed
