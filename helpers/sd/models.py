"""Load a Stable Diffusion base model the way Colab users bring one, and choose dtypes and attention.

A base model can be a Hugging Face Hub id, a local diffusers folder (with `model_index.json`) or a
single checkpoint file as shared on Civitai (`.safetensors`; pickled `.ckpt` files only through
`torch.load(weights_only=True)`). Single files are read with diffusers' `from_single_file`, which
needs the diffusers configs of the same architecture: online it downloads them from the Hub;
offline pass `config=` a local diffusers folder of the same family (e.g. the SD 1.5 or SDXL base you
saved earlier). Family ("sd1", "sd2", "sdxl") is read from structure, never from names.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch

from .notices import warn_once
from .precision import decide_precision, normalize_precision, precision_dtype

if TYPE_CHECKING:  # heavy imports stay lazy: importing this module must be cheap and GPU-free
    from diffusers import DDPMScheduler, DiffusionPipeline

FAMILIES = ("sd1", "sd2", "sdxl")
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
PREDICTION_TYPES = ("epsilon", "v_prediction")
SINGLE_FILE_SAFE = (".safetensors",)
SINGLE_FILE_PICKLE = (".ckpt", ".pt", ".pth", ".bin")

_FAMILY_ALIASES = {
    "sd1": "sd1", "sd15": "sd1", "sd1.5": "sd1", "sd1x": "sd1", "sd_v1": "sd1", "v1": "sd1",
    "sd2": "sd2", "sd21": "sd2", "sd2.1": "sd2", "sd2x": "sd2", "sd_v2": "sd2", "v2": "sd2",
    "sdxl": "sdxl", "xl": "sdxl", "sdxl1.0": "sdxl",
}
_PREDICTION_ALIASES = {"epsilon": "epsilon", "eps": "epsilon", "v_prediction": "v_prediction",
                       "v": "v_prediction", "v-prediction": "v_prediction", "vpred": "v_prediction",
                       "v_pred": "v_prediction"}
_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")

class ModelLoadError(RuntimeError):
    """A base model could not be loaded; the message says what to do about it."""


def free_memory() -> None:
    """Collect the Python objects a dropped model left and give CUDA's cached memory back, so the next step (a
    captioner after a tagger, training after captioning, the OOM advice) has the GPU."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _say(message: str) -> None:
    """One line for the user (Colab shows prints, not INFO logs)."""
    print(message, flush=True)


# ----------------------------------------------------------------------------------------- dtypes

def normalize_family(family: str) -> str:
    """Map "sd15", "SD1.5", "sd21", "xl"... to one of FAMILIES; ValueError otherwise."""
    key = str(family).strip().lower().replace(" ", "").replace("-", "").replace("_", "")
    for alias, name in _FAMILY_ALIASES.items():
        if key == alias.replace("_", ""):
            return name
    raise ValueError(f"family must be one of {FAMILIES} (or an alias like 'sd15'), got {family!r}")


def normalize_prediction_type(prediction_type: str) -> str:
    """Map "v", "eps", "v_prediction"... to "epsilon" or "v_prediction"; ValueError otherwise."""
    key = str(prediction_type).strip().lower()
    if key not in _PREDICTION_ALIASES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    return _PREDICTION_ALIASES[key]


def pick_dtype(device: str | torch.device, mixed_precision: str | torch.dtype = "auto") -> torch.dtype:
    """The dtype for frozen weights on `device`, as `helpers.sd.precision.decide_precision` decides it:
    "auto" is bf16 on Ampere+ GPUs, fp16 on older GPUs (T4, V100) and fp32 on CPU/MPS."""
    return precision_dtype(decide_precision(mixed_precision, device))


def _resolve_dtype(dtype: torch.dtype | str | None, device: str) -> torch.dtype:
    if dtype is None:
        return torch.float32
    normalize_precision(dtype)  # a clear error for anything but float16, bfloat16, float32 and their names
    return pick_dtype(device, dtype)


# ---------------------------------------------------------------------------------------- family

def _unet_config_of(obj: Any) -> Mapping[str, Any]:
    """A UNet config mapping from a pipeline, a UNet, a config dict or a diffusers folder/json path."""
    if isinstance(obj, (str, os.PathLike)):
        p = Path(obj)
        for candidate in (p / "unet" / "config.json", p / "config.json", p):
            if candidate.is_file() and candidate.suffix == ".json":
                return json.loads(candidate.read_text(encoding="utf-8"))
        raise ModelLoadError(f"no UNet config found at {str(p)!r} (looked for unet/config.json and config.json)")
    if hasattr(obj, "unet") and getattr(obj, "unet") is not None:
        obj = obj.unet
    if hasattr(obj, "config") and not isinstance(obj, Mapping):
        obj = obj.config
    if isinstance(obj, Mapping):
        return obj
    raise TypeError(f"detect_family needs a pipeline, a UNet, a UNet config dict or a folder; got {type(obj).__name__}")


def detect_family(pipe_or_unet_config: Any) -> str:
    """Family of a UNet from its structure: SDXL has text-time added conditioning (two text
    encoders), SD 2.x cross-attends to 1024-wide OpenCLIP-H states, everything else is SD 1.x."""
    cfg = _unet_config_of(pipe_or_unet_config)
    if "cross_attention_dim" not in cfg:
        name = cfg.get("_class_name", "this model")
        raise ModelLoadError(f"{name} is not a Stable Diffusion UNet (no cross_attention_dim); only SD 1.x, "
                             "SD 2.x and SDXL base models are supported")
    if cfg.get("addition_embed_type") == "text_time":
        return "sdxl"
    cross = cfg["cross_attention_dim"]
    if isinstance(cross, (list, tuple)):
        cross = cross[0]
    if int(cross) == 1024:
        return "sd2"
    return "sd1"


# ----------------------------------------------------------------------------- single-file header

def read_safetensors_header(path: str | os.PathLike, *, complete: bool = False
                            ) -> tuple[dict[str, dict], dict[str, str]]:
    """The tensor index ({key: {"dtype", "shape", ...}}) and the string metadata of a .safetensors
    file, read from its JSON header only (no tensor data is touched). `complete`: the file must also hold
    every byte the header promises (before a load; detecting the family needs no more than the header)."""
    from ..files import BadFileError, safetensors_header

    try:
        return safetensors_header(path, "checkpoint", complete=complete)
    except BadFileError as e:
        raise ModelLoadError(str(e)) from None


def _checkpoint_index(path: Path, *, complete: bool = False) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """{key: shape} and metadata of a single-file checkpoint, without loading safetensors data."""
    if path.suffix.lower() in SINGLE_FILE_SAFE:
        index, metadata = read_safetensors_header(path, complete=complete)
        return {k: tuple(v.get("shape", ())) for k, v in index.items()}, metadata
    if path.suffix.lower() in SINGLE_FILE_PICKLE:
        sd = _load_pickle_weights_only(path)
        return {k: tuple(v.shape) for k, v in sd.items() if hasattr(v, "shape")}, {}
    raise ModelLoadError(f"{path.name}: unknown checkpoint type {path.suffix!r}; expected a .safetensors file "
                         "(or a .ckpt/.pt/.bin file that loads with torch.load(weights_only=True))")


def _load_pickle_weights_only(path: Path) -> dict:
    """A pickled checkpoint's state dict through torch's weights-only unpickler (no code runs)."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except Exception as e:  # UnpicklingError for anything beyond plain tensors and containers
        raise ModelLoadError(_pickle_refused_message(path, e)) from None
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ModelLoadError(f"{path.name} does not hold a state dict")
    return obj


def _is_zip(path: Path) -> bool:
    import zipfile

    return zipfile.is_zipfile(path)


def _pickle_refused_message(path: Path, err: BaseException) -> str:
    return (f"{path.name} is a pickled checkpoint that torch.load(weights_only=True) refuses "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}). Pickle files can run "
            "code, so they are never fully unpickled here. Use the .safetensors version of this model (most "
            "model pages offer one), or convert it on a machine you trust.")


def _family_from_keys(keys: Mapping[str, tuple[int, ...]], name: str) -> str:
    """Family from original-layout (LDM/SGM) key names; clear errors for files that are not base models."""
    ks = list(keys)
    if not ks:
        raise ModelLoadError(f"{name} holds no tensors")
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) or ".lora_down." in k
           or ".lora_A." in k or ".lora_B." in k or k.startswith("lycoris_") for k in ks):
        raise ModelLoadError(f"{name} is a LoRA file, not a base model. Load a base model (SD 1.5, SD 2.x or "
                             "SDXL checkpoint, folder or hub id) and apply this LoRA on top of it.")
    if set(ks) <= {"emb_params", "clip_l", "clip_g", "string_to_param", "string_to_token", "name", "step"}:
        raise ModelLoadError(f"{name} is a Textual Inversion embedding, not a base model; load it on top of a "
                             "base model.")
    if any(k.startswith("conditioner.embedders.1.model.") for k in ks):
        return "sdxl"
    if any(k.startswith("conditioner.embedders.0.model.") for k in ks):
        raise ModelLoadError(f"{name} looks like an SDXL refiner (one OpenCLIP-G text encoder); use the SDXL "
                             "base model (or a fine-tune of it) as the base.")
    if any(k.startswith("cond_stage_model.model.") for k in ks):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in ks):
        return "sd1"
    unet = [k for k in ks if k.startswith("model.diffusion_model.")]
    if unet:  # UNet-only file: read the structure
        if "model.diffusion_model.label_emb.0.0.weight" in keys:
            return "sdxl"
        for k in unet:
            if k.endswith("attn2.to_k.weight") and len(keys[k]) == 2:
                return "sd2" if keys[k][1] == 1024 else "sd1"
    if any(k.startswith(("encoder.down.", "first_stage_model.encoder.", "encoder.down_blocks.")) for k in ks) \
            and not unet:
        raise ModelLoadError(f"{name} is a VAE, not a base model; pass it as vae= together with a base model.")
    if any(k.startswith(("down_blocks.", "mid_block.", "conv_in.")) for k in ks):
        raise ModelLoadError(f"{name} is a diffusers-format component file; pass the diffusers folder that "
                             "holds model_index.json instead.")
    sample = ", ".join(ks[:5])
    raise ModelLoadError(f"{name} is not a recognised SD 1.x / SD 2.x / SDXL checkpoint (first keys: {sample})")


def detect_family_from_checkpoint(path: str | os.PathLike) -> str:
    """Family of a single-file (original layout) checkpoint from its key names: SDXL has
    conditioner.embedders.1.model.*, SD 2.x cond_stage_model.model.* (OpenCLIP), SD 1.x
    cond_stage_model.transformer.*. Reads only the safetensors header."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"checkpoint file not found: {str(path)!r}")
    keys, _ = _checkpoint_index(path)
    return _family_from_keys(keys, path.name)


def _prediction_hint_from_file(keys: Mapping[str, Any], metadata: Mapping[str, str]) -> str | None:
    """The prediction type a checkpoint declares about itself, if any (a `v_pred` marker key as
    ComfyUI/NoobAI write it, or sd-scripts' `modelspec.prediction_type`/architecture metadata)."""
    if "v_pred" in keys:
        return "v_prediction"
    mp = str(metadata.get("modelspec.prediction_type", "")).lower()
    if mp in ("v", "v_prediction", "v-prediction"):
        return "v_prediction"
    if mp in ("epsilon", "eps"):
        return "epsilon"
    arch = str(metadata.get("modelspec.architecture", "")).lower()
    if arch.startswith("stable-diffusion-v2-768-v"):
        return "v_prediction"
    if arch.startswith("stable-diffusion-v2-512"):
        return "epsilon"
    return None


# -------------------------------------------------------------------------------------- network

def offline_by_env() -> bool:
    """Whether HF_HUB_OFFLINE (or huggingface_hub's setting) says to stay offline."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    return env or bool(constants.HF_HUB_OFFLINE)


def url_reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether `url`'s host answers within `timeout` seconds. The probe runs in a daemon thread
    so a stuck DNS lookup cannot hang the caller."""
    result: list[bool] = []

    def probe() -> None:
        import urllib.error
        import urllib.request

        try:
            req = urllib.request.Request(url, method="HEAD")
            urllib.request.urlopen(req, timeout=timeout).close()
            result.append(True)
        except urllib.error.HTTPError:
            result.append(True)  # it answered
        except Exception:
            result.append(False)

    t = threading.Thread(target=probe, daemon=True, name="url-probe")
    t.start()
    t.join(timeout + 1.0)
    return bool(result and result[0])


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub endpoint answers within `timeout` seconds."""
    from huggingface_hub import constants

    return url_reachable(constants.ENDPOINT, timeout)


def use_local_files_only(local_files_only: bool | None) -> bool:
    """True when the Hub must not be contacted: asked for, HF_HUB_OFFLINE=1, or no network."""
    if local_files_only:
        return True
    if offline_by_env():
        return True
    return not _hub_reachable()


def _offline_hub_error(repo_id: str, what: str = "model") -> ModelLoadError:
    return ModelLoadError(
        f"Cannot load the {what} {repo_id!r} from the Hugging Face Hub: this machine is offline (no network, or "
        "HF_HUB_OFFLINE=1) and it is not in the local Hugging Face cache. Either download it on a machine with "
        f"network (`hf download {repo_id} --local-dir <folder>`) and pass that folder, or pass a local diffusers "
        "folder (with model_index.json) or a single .safetensors checkpoint file instead.")


# ------------------------------------------------------------------------------------- the model

@dataclass
class BaseModel:
    """A loaded base model: the diffusers pipeline plus what the trainer needs to know about it."""

    pipe: "DiffusionPipeline"
    family: str
    prediction_type: str
    dtype: torch.dtype
    source: str

    @property
    def unet(self) -> torch.nn.Module:
        return self.pipe.unet

    @property
    def vae(self) -> torch.nn.Module:
        return self.pipe.vae

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        """[text_encoder] for SD 1.x/2.x, [text_encoder, text_encoder_2] for SDXL."""
        tes = [self.pipe.text_encoder]
        if self.family == "sdxl":
            tes.append(self.pipe.text_encoder_2)
        return tes

    @property
    def tokenizers(self) -> list:
        toks = [self.pipe.tokenizer]
        if self.family == "sdxl":
            toks.append(self.pipe.tokenizer_2)
        return toks

    def noise_scheduler(self) -> "DDPMScheduler":
        """The training noise schedule: a DDPMScheduler with the model's betas and prediction type."""
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(self.pipe.scheduler.config, prediction_type=self.prediction_type)

    def describe(self) -> str:
        """One line, e.g. "SDXL (v-pred: no), unet 2.6B params, fp16, from stabilityai/..."."""
        n = sum(p.numel() for p in self.unet.parameters())
        vpred = "yes" if self.prediction_type == "v_prediction" else "no"
        return (f"{FAMILY_NAMES[self.family]} (v-pred: {vpred}), unet {_human_count(n)} params, "
                f"{_DTYPE_NAMES.get(self.dtype, str(self.dtype))}, from {self.source}")


def _human_count(n: int) -> str:
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.1f}{suffix}"
    return str(n)


# --------------------------------------------------------------------------------------- loading

def _pipeline_class(family: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline


def _extra_kwargs(family: str) -> dict:
    # Training and A1111-style inference never use the safety checker; skipping it saves 1.2 GB.
    if family == "sdxl":
        return {}
    return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


def _family_from_model_index(index: Mapping[str, Any], where: str) -> str | None:
    """"sdxl" or "sd1/sd2 (decided later)" from the components a model_index.json lists."""
    if "unet" not in index or "text_encoder" not in index or "vae" not in index:
        if "text_encoder_2" in index and "unet" in index:
            raise ModelLoadError(f"{where} looks like an SDXL refiner (no first text encoder); use the SDXL base "
                                 "model or a fine-tune of it.")
        raise ModelLoadError(f"{where} ({index.get('_class_name', 'unknown pipeline')}) is not a Stable Diffusion "
                             "1.x / 2.x / SDXL model (it lacks a unet, vae or text_encoder)")
    return "sdxl" if "text_encoder_2" in index else None


def _classify_source(source: str) -> str:
    """"folder", "safetensors", "pickle", "url" or "hub"; ModelLoadError for a path that is not there."""
    s = str(source)
    p = Path(s).expanduser()
    if p.is_dir():
        return "folder"
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix in SINGLE_FILE_SAFE:
            return "safetensors"
        if suffix in SINGLE_FILE_PICKLE:
            return "pickle"
        raise ModelLoadError(f"{p.name}: not a model file (expected .safetensors, or a diffusers folder)")
    if s.startswith(("http://", "https://")):
        return "url"
    if _HUB_ID.match(s) and not s.lower().endswith(SINGLE_FILE_SAFE + SINGLE_FILE_PICKLE):
        return "hub"
    raise ModelLoadError(f"{s!r} does not exist. Pass a Hugging Face Hub id like "
                         "'stable-diffusion-v1-5/stable-diffusion-v1-5', a local diffusers folder, or a path to a "
                         ".safetensors file (on Colab, is Google Drive mounted and the path right?)")


def _check_device(device: str) -> None:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device={device!r} but no CUDA GPU is visible. On Colab: Runtime > Change runtime "
                             "type > T4 GPU; elsewhere use device='cpu'.")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ModelLoadError(f"device={device!r} but MPS is not available on this machine")


def _load_folder(folder: Path, dtype: torch.dtype, variant: str | None):
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        files = sorted(folder.glob("*.safetensors"))
        hint = f" It holds {files[0].name}: pass that file's path instead." if files else ""
        raise ModelLoadError(f"{str(folder)!r} is not a diffusers model folder (no model_index.json).{hint}")
    index = json.loads(index_path.read_text(encoding="utf-8"))
    fam = _family_from_model_index(index, str(folder)) or detect_family(folder)
    _check_component_files(folder, index)
    cls = _pipeline_class(fam)
    pipe = cls.from_pretrained(str(folder), dtype=dtype, variant=variant, local_files_only=True,
                               **_extra_kwargs(fam))
    return pipe


def _check_component_files(folder: Path, index: dict) -> None:
    """Every weight file of the pipeline's components is whole (a cut-off copy fails here, named)."""
    from ..files import BadFileError, safetensors_header

    for component in index:
        sub = folder / component
        if component.startswith("_") or not sub.is_dir():
            continue
        for file in sorted(sub.glob("*.safetensors")):
            try:
                safetensors_header(file, f"{component} weights")
            except BadFileError as e:
                raise ModelLoadError(f"{e} (in the model folder {folder})") from None


def download_hub_file(repo_id: str, filename: str, *, offline: bool, offline_error: Callable[[], Exception],
                      missing: str, error_cls: type[Exception] = ModelLoadError) -> Path:
    """One file of a Hub repo (or its cached copy when `offline`); Hub failures become `error_cls` with a
    message a user can act on: `offline_error()` when it is not cached offline, `missing` when the repo lacks it."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)

    try:
        return Path(hf_hub_download(repo_id, filename, local_files_only=offline))
    except LocalEntryNotFoundError:  # subclasses EntryNotFoundError: catch it first
        raise offline_error() from None
    except GatedRepoError:
        raise error_cls(f"{repo_id!r} is gated: accept its licence on huggingface.co and log in "
                        "(`from huggingface_hub import notebook_login; notebook_login()`).") from None
    except RepositoryNotFoundError:
        raise error_cls(f"{repo_id!r} is not a model on the Hugging Face Hub (check the spelling; private "
                        "repos need a login).") from None
    except EntryNotFoundError:
        raise error_cls(missing) from None
    except OSError:
        if offline:
            raise offline_error() from None
        raise


def _load_hub(repo_id: str, dtype: torch.dtype, variant: str | None, local_files_only: bool | None):
    offline = use_local_files_only(local_files_only)
    index_file = download_hub_file(
        repo_id, "model_index.json", offline=offline,
        offline_error=lambda: _offline_hub_error(repo_id),
        missing=f"{repo_id!r} has no model_index.json: it is not a diffusers pipeline repo. If it "
                "ships a single .safetensors file, download that file and pass its path.")
    index = json.loads(Path(index_file).read_text(encoding="utf-8"))
    fam = _family_from_model_index(index, repo_id) or "sd1"  # sd1 vs sd2 share a pipeline class
    cls = _pipeline_class(fam)
    try:
        return cls.from_pretrained(repo_id, dtype=dtype, variant=variant, local_files_only=offline,
                                   **_extra_kwargs(fam))
    except (OSError, ValueError) as e:
        if offline:
            raise ModelLoadError(f"{repo_id!r} is only partly in the local Hugging Face cache "
                                 f"({str(e).splitlines()[0][:200]}). " + str(_offline_hub_error(repo_id))) from None
        raise


def _default_config_repo(keys: Mapping[str, tuple[int, ...]]) -> str:
    """The Hub repo whose configs diffusers would use for this checkpoint (decided from shapes only)."""
    from diffusers.loaders.single_file_utils import fetch_diffusers_config

    meta = {k: torch.empty(shape, device="meta") for k, shape in keys.items()}
    return fetch_diffusers_config(meta)["pretrained_model_name_or_path"]


def _resolve_single_file_config(path: Path, keys, family: str, config: str | None,
                                offline: bool) -> str | None:
    """A local folder or hub id with the diffusers configs for `path`, or None to let diffusers fetch it."""
    if config is not None:
        cpath = Path(config).expanduser()
        if cpath.is_dir():
            if not (cpath / "model_index.json").is_file():
                raise ModelLoadError(f"config={config!r} is not a diffusers model folder (no model_index.json)")
            cfam = detect_family(cpath)
            if cfam != family:
                raise ModelLoadError(f"config={config!r} is a {FAMILY_NAMES[cfam]} model but {path.name} is "
                                     f"{FAMILY_NAMES[family]}; pass a config folder of the same architecture.")
            return str(cpath)
        if not _HUB_ID.match(str(config)):
            raise ModelLoadError(f"config={config!r} is neither a local diffusers folder nor a Hub id")
        repo = str(config)
    else:
        repo = _default_config_repo(keys)
        if not offline:
            return None
    if not offline:
        return repo
    from huggingface_hub import snapshot_download

    try:  # offline: the configs may still be in the Hugging Face cache
        return snapshot_download(repo, local_files_only=True,
                                 allow_patterns=["**/*.json", "*.json", "*.txt", "**/*.txt", "**/*.model"])
    except Exception:
        raise ModelLoadError(
            f"Loading the single file {path.name} offline needs config= a local diffusers folder of the same "
            f"architecture ({FAMILY_NAMES[family]}), e.g. load_base({path.name!r}, config='/path/to/"
            f"{'sdxl-base' if family == 'sdxl' else 'sd15'}-diffusers-folder'). diffusers reads the component "
            f"configs (and tokenizers) from there; online it would fetch them from {repo!r}.") from None


def _load_single_file(path: Path, kind: str, family_arg: str | None, dtype: torch.dtype, config: str | None,
                      local_files_only: bool | None):
    # For pickles this is a weights-only torch.load: a refused file gets a clear message here instead
    # of diffusers' "Unable to locate the file" (diffusers itself also loads with weights_only=True).
    keys, metadata = _checkpoint_index(path, complete=True)  # the whole file must be there before diffusers reads it
    family = _family_from_keys(keys, path.name)
    if family_arg is not None and family_arg != family:
        raise ModelLoadError(f"family={family_arg!r} was given but {path.name} is {FAMILY_NAMES[family]} "
                             f"({family!r}) by its keys")
    offline = use_local_files_only(local_files_only) if config is None or not Path(config).is_dir() else True
    cfg = _resolve_single_file_config(path, keys, family, config, offline)
    cls = _pipeline_class(family)
    kwargs = dict(dtype=dtype, local_files_only=offline, **_extra_kwargs(family))
    if cfg is not None:
        kwargs["config"] = cfg
    try:
        pipe = cls.from_single_file(str(path), **kwargs)
    except Exception as e:
        if kind == "pickle" and "weights_only" in str(e).lower():
            raise ModelLoadError(_pickle_refused_message(path, e)) from None
        raise
    _check_no_meta(pipe, path.name)
    return pipe, family, _prediction_hint_from_file(keys, metadata)


def _check_no_meta(pipe, name: str) -> None:
    """Fail loudly when a checkpoint left weights uninitialised (diffusers leaves them on 'meta')."""
    for comp in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, comp, None)
        if module is None:
            continue
        empty = [k for k, v in [*module.named_parameters(), *module.named_buffers()] if v.is_meta]
        if empty:
            raise ModelLoadError(f"{name} is missing weights for the {comp} ({len(empty)} tensors, e.g. "
                                 f"{empty[0]}); the file is incomplete or does not match its config.")


def load_vae(vae: str, *, base_pipe=None, dtype: torch.dtype = torch.float32, local_files_only: bool | None = None):
    """An AutoencoderKL from a VAE folder, a pipeline folder with `vae/`, a Hub id, or a single
    .safetensors file (that one needs `base_pipe`, whose VAE config describes its architecture)."""
    from diffusers import AutoencoderKL

    p = Path(vae).expanduser()
    if p.is_dir():
        if (p / "config.json").is_file():
            return AutoencoderKL.from_pretrained(str(p), dtype=dtype, local_files_only=True)
        if (p / "vae" / "config.json").is_file():
            return AutoencoderKL.from_pretrained(str(p), subfolder="vae", dtype=dtype, local_files_only=True)
        raise ModelLoadError(f"vae={vae!r}: no config.json (or vae/config.json) in that folder")
    if p.is_file():
        if p.suffix.lower() not in SINGLE_FILE_SAFE:
            raise ModelLoadError(f"vae={vae!r}: only .safetensors VAE files are loaded (pickles can run code)")
        if base_pipe is None:
            raise ModelLoadError(f"vae={vae!r}: a single-file VAE needs the base model it belongs to; "
                                 "pass it as load_base(..., vae=...)")
        from ..files import BadFileError, safetensors_header

        try:
            index, _ = safetensors_header(p, "VAE file")  # the whole file: it is loaded next
        except BadFileError as e:
            raise ModelLoadError(str(e)) from None
        with tempfile.TemporaryDirectory() as tmp:
            base_pipe.vae.save_config(tmp)  # same architecture as the base: its config fits, offline too
            if any(k.startswith("encoder.down_blocks.") for k in index):  # diffusers layout in one file
                from safetensors.torch import load_file

                model = AutoencoderKL.from_config(AutoencoderKL.load_config(tmp))
                missing, unexpected = model.load_state_dict(load_file(str(p)), strict=False)
                if missing or unexpected:
                    raise ModelLoadError(f"vae={vae!r} does not fit this base model's VAE "
                                         f"(missing {len(missing)}, unexpected {len(unexpected)} keys)")
                return model.to(dtype)
            return AutoencoderKL.from_single_file(str(p), config=tmp, dtype=dtype, local_files_only=True)
    if _HUB_ID.match(str(vae)):
        offline = use_local_files_only(local_files_only)
        try:
            return AutoencoderKL.from_pretrained(str(vae), dtype=dtype, local_files_only=offline)
        except OSError:
            if offline:
                raise _offline_hub_error(str(vae), "VAE") from None
            raise
    raise ModelLoadError(f"vae={vae!r} does not exist (expected a folder, a .safetensors file or a Hub id)")


def vae_dtype_for(family: str, weight_dtype: torch.dtype, vae_config: Mapping[str, Any]) -> torch.dtype:
    """The VAE's dtype: fp32 for SDXL under fp16 (its original VAE overflows to NaN in fp16) unless
    the VAE is fp16-safe (config force_upcast False, e.g. madebyollin/sdxl-vae-fp16-fix); else `weight_dtype`."""
    force_upcast = bool(vae_config.get("force_upcast", True))
    if family == "sdxl" and weight_dtype == torch.float16 and force_upcast:
        return torch.float32
    return weight_dtype


def load_base(source: str, *, device: str = "cpu", dtype: torch.dtype | str | None = "auto",
              vae: str | None = None, config: str | None = None, family: str | None = None,
              prediction_type: str | None = None, variant: str | None = None,
              local_files_only: bool | None = None) -> BaseModel:
    """Load an SD 1.x / 2.x / SDXL base model from a Hub id, a diffusers folder or a single
    checkpoint file, with weights in `dtype` ("auto": see pick_dtype) on `device`.

    config: for single files, a local diffusers folder (or Hub id) of the same architecture whose
    component configs and tokenizers are used; required offline unless they are in the HF cache.
    family: optional check ("sd1", "sd2", "sdxl"); a mismatch with the detected family is an error.
    prediction_type: overrides the scheduler's ("epsilon" or "v_prediction"), e.g. for SD 2.x 768-v.
    vae: a replacement VAE (folder, Hub id or single .safetensors file).
    variant: diffusers weight variant for folders/Hub ids, e.g. "fp16".
    local_files_only: None = automatic (offline when HF_HUB_OFFLINE=1 or the Hub is unreachable).
    The SDXL VAE stays fp32 under fp16 unless it is fp16-safe (config.force_upcast False).
    """
    source = str(source)
    family_arg = normalize_family(family) if family is not None else None
    pred_arg = normalize_prediction_type(prediction_type) if prediction_type is not None else None
    _check_device(device)
    wdtype = _resolve_dtype(dtype, device)
    kind = _classify_source(source)

    file_hint = None
    if kind in ("safetensors", "pickle"):
        path = Path(source).expanduser()
        pipe, key_family, file_hint = _load_single_file(path, kind, family_arg, wdtype, config, local_files_only)
    elif kind == "url":
        raise ModelLoadError("URLs are not loaded directly: download the checkpoint first (e.g. `hf download "
                             "<repo> <file>.safetensors` or wget) and pass the local .safetensors path.")
    else:
        if config is not None:
            warn_once("config-ignored", "config= is only used for single-file checkpoints; ignored for "
                                        f"{source!r}", stacklevel=2)
        if kind == "folder":
            pipe = _load_folder(Path(source).expanduser(), wdtype, variant)
        else:
            pipe = _load_hub(source, wdtype, variant, local_files_only)

    fam = detect_family(pipe)
    if fam == "sdxl" and getattr(pipe, "text_encoder", None) is None:
        raise ModelLoadError(f"{source} has no first text encoder (an SDXL refiner?); use an SDXL base model")
    if family_arg is not None and family_arg != fam:
        raise ModelLoadError(f"family={family_arg!r} was given but {source} is {FAMILY_NAMES[fam]} ({fam!r})")

    sched_pred = pipe.scheduler.config.get("prediction_type", "epsilon") or "epsilon"
    pred = pred_arg or file_hint or normalize_prediction_type(sched_pred)
    if pred_arg is None and file_hint is None and fam == "sd2" and kind in ("safetensors", "pickle"):
        _say(f"Hint: SD 2.x single files do not say whether they are 768-v (v_prediction) or 512-base (epsilon); "
             f"using {pred!r} from the config. If samples come out as noise or flat grey, pass "
             f"prediction_type='{'epsilon' if pred == 'v_prediction' else 'v_prediction'}'.")
    if pred != sched_pred:  # keep inference consistent with training
        pipe.scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config, prediction_type=pred)

    if vae is not None:
        pipe.register_modules(vae=load_vae(vae, base_pipe=pipe, dtype=wdtype, local_files_only=local_files_only))
    vdtype = vae_dtype_for(fam, wdtype, pipe.vae.config)
    if pipe.vae.dtype != vdtype:
        pipe.vae.to(dtype=vdtype)
    pipe.to(device)
    for m in [pipe.unet, pipe.vae, *[t for t in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if t]]:
        m.requires_grad_(False)
        m.eval()

    model = BaseModel(pipe=pipe, family=fam, prediction_type=pred, dtype=wdtype, source=source)
    vae_note = "" if pipe.vae.dtype == wdtype else f", VAE {_DTYPE_NAMES.get(pipe.vae.dtype)}"
    _say(f"Loaded {FAMILY_NAMES[fam]} base ({pred}) in {_DTYPE_NAMES[wdtype]}{vae_note} on {device} from {source}")
    return model


# ------------------------------------------------------------------------------------- attention

ATTENTION_BACKENDS = ("sdpa", "xformers")


def set_attention(unet: torch.nn.Module, backend: str = "sdpa") -> str:
    """Set the UNet's attention: "sdpa" (PyTorch scaled_dot_product_attention) or "xformers"
    (falls back to sdpa with a warning when xformers or CUDA is missing). Returns the one used."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    b = str(backend).strip().lower()
    if b not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    if b == "xformers":
        reason = None
        if importlib.util.find_spec("xformers") is None:
            reason = "xformers is not installed"
        elif not torch.cuda.is_available():
            reason = "xformers needs a CUDA GPU"
        else:
            try:
                unet.enable_xformers_memory_efficient_attention()
                return "xformers"
            except Exception as e:  # wrong build for this torch/CUDA, unsupported GPU...
                reason = f"xformers failed to start ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})"
        warn_once(f"xformers-fallback:{reason}", f"{reason}; using PyTorch SDPA attention instead "
                                                 "(about as fast on torch 2.x).", stacklevel=2)
    unet.set_attn_processor(AttnProcessor2_0())
    return "sdpa"
