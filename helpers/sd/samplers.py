"""Samplers by their AUTOMATIC1111 names: the table of diffusers schedulers and settings that match A1111's,
and swapping a pipeline's sampler while keeping the model's own noise schedule."""

from __future__ import annotations

import importlib.util
import inspect
from typing import Any

# Noise-schedule keys taken from the model's own scheduler config; everything else comes from the
# sampler, so switching samplers never carries one sampler's settings (e.g. Karras sigmas) into the next.
_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                  "prediction_type", "rescale_betas_zero_snr")


_KDIFF = {"timestep_spacing": "linspace"}  # k-diffusion (A1111's samplers) spaces sigmas over the full range


_KARRAS = {**_KDIFF, "use_karras_sigmas": True}


_NOT_KARRAS = {**_KDIFF, "use_karras_sigmas": False}


# A1111's DDIM/PLMS (CompVis samplers): "uniform" discretization = steps 1, 1+c, 1+2c, ... and the
# last step's alpha is alphas_cumprod[0] (set_alpha_to_one=False), no sample clipping.
_COMPVIS = {"timestep_spacing": "leading", "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False}


# A1111 sampler name -> (diffusers scheduler class name, config), after diffusers' "A1111/k-diffusion
# -> Diffusers" scheduler table. "DPM++ SDE" is k-diffusion's sample_dpmpp_sde, which diffusers ports as
# DPMSolverSDEScheduler (torchsde Brownian tree, like A1111); UniPC uses A1111's default settings
# (variant bh1, order 3, lower order final). Karras names set use_karras_sigmas, SDE ones
# algorithm_type="sde-dpmsolver++".
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "Euler": ("EulerDiscreteScheduler", _NOT_KARRAS),
    "Euler a": ("EulerAncestralDiscreteScheduler", _KDIFF),
    "LMS": ("LMSDiscreteScheduler", _NOT_KARRAS),
    "LMS Karras": ("LMSDiscreteScheduler", _KARRAS),
    "Heun": ("HeunDiscreteScheduler", _NOT_KARRAS),
    "DPM2": ("KDPM2DiscreteScheduler", _NOT_KARRAS),
    "DPM2 Karras": ("KDPM2DiscreteScheduler", _KARRAS),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", _NOT_KARRAS),
    "DPM2 a Karras": ("KDPM2AncestralDiscreteScheduler", _KARRAS),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {**_NOT_KARRAS, "algorithm_type": "dpmsolver++", "solver_order": 2}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {**_KARRAS, "algorithm_type": "dpmsolver++", "solver_order": 2}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {**_NOT_KARRAS, "algorithm_type": "sde-dpmsolver++",
                                                     "solver_order": 2}),
    "DPM++ 2M SDE Karras": ("DPMSolverMultistepScheduler", {**_KARRAS, "algorithm_type": "sde-dpmsolver++",
                                                            "solver_order": 2}),
    "DPM++ SDE": ("DPMSolverSDEScheduler", _NOT_KARRAS),
    "DPM++ SDE Karras": ("DPMSolverSDEScheduler", _KARRAS),
    "DDIM": ("DDIMScheduler", _COMPVIS),
    "PLMS": ("PNDMScheduler", {**_COMPVIS, "skip_prk_steps": True}),
    # bh1 ending at sigma 0 gives NaN images in diffusers 0.42; A1111's UniPC stops at t = 1/N too.
    "UniPC": ("UniPCMultistepScheduler", {**_NOT_KARRAS, "solver_type": "bh1", "solver_order": 3,
                                          "lower_order_final": True, "final_sigmas_type": "sigma_min"}),
}


# Schedulers that need a package diffusers does not require.
SAMPLER_PACKAGES: dict[str, str] = {"DPMSolverSDEScheduler": "torchsde", "LMSDiscreteScheduler": "scipy"}


_BASE_CONFIG_ATTR = "_helpers_model_scheduler_config"


class MissingPackageError(ImportError, ValueError):
    """A feature needs a pip package that is not installed (also a ValueError, so the CLI prints it)."""


def package_available(name: str) -> bool:
    """Whether `name` can be imported here (without importing it)."""
    return importlib.util.find_spec(name) is not None


def _require(package: str, what: str) -> None:
    if not package_available(package):
        raise MissingPackageError(f"{what} needs the `{package}` package: pip install {package}")


def make_scheduler(name: str, model_config: dict):
    """A diffusers scheduler for the A1111 sampler `name`, on the noise schedule of `model_config`
    (the model's own scheduler config: betas, prediction type)."""
    import diffusers

    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")
    cls_name, extra = SAMPLERS[name]
    if cls_name in SAMPLER_PACKAGES:
        _require(SAMPLER_PACKAGES[cls_name], f"the {name!r} sampler ({cls_name})")
    cls = getattr(diffusers, cls_name)
    accepted = inspect.signature(cls.__init__).parameters
    config = {k: model_config[k] for k in _SCHEDULE_KEYS if k in model_config}
    config.update(extra)
    return cls.from_config({k: v for k, v in config.items() if k in accepted})


def set_sampler(pipe, name: str) -> None:
    """Swap the pipeline's scheduler for the A1111 sampler `name`, keeping the model's noise schedule."""
    base = getattr(pipe, _BASE_CONFIG_ATTR, None)
    if base is None:
        base = dict(pipe.scheduler.config)
        setattr(pipe, _BASE_CONFIG_ATTR, base)
    pipe.scheduler = make_scheduler(name, base)
