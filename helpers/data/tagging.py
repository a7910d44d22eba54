"""Automatic captions for a training set: BLIP and Florence-2 sentences, WD14 (Danbooru) tags.

Every backend is a `Captioner` made by `load_captioner(kind, model)` from a Hub id or a local folder;
`caption_folder` runs one over a folder in batches and writes the captions through
`helpers.data.captions.write_captions`, so one `captions.undo(folder)` puts the previous captions back.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

from ..sd.models import ModelLoadError

logger = logging.getLogger(__name__)

KINDS = ("blip", "florence2", "wd14", "qwen2_5_vl", "joycaption")
DEFAULT_MODELS = {
    "blip": "Salesforce/blip-image-captioning-large",
    "florence2": "florence-community/Florence-2-base",  # native transformers format (not microsoft/, remote code)
    "wd14": "SmilingWolf/wd-vit-tagger-v3",
}
FLORENCE_TASKS = ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>")
MODES = ("skip", "overwrite", "append", "prepend")

# selected_tags.csv categories of the WD taggers
CATEGORY_GENERAL, CATEGORY_CHARACTER, CATEGORY_RATING = 0, 4, 9
WD14_MODEL_FILE, WD14_TAGS_FILE = "model.onnx", "selected_tags.csv"

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


class CaptionerLoadError(ModelLoadError):
    """A captioner could not be loaded (missing package, offline, wrong files); the message says what to do."""


@runtime_checkable
class Captioner(Protocol):
    """Anything that turns a batch of RGB images into one caption each (same order)."""

    name: str

    def caption(self, images: list[Image.Image]) -> list[str]:
        ...


# =============================================================================================
# Devices, dtypes and where a model comes from
# =============================================================================================

def resolve_device(device: str = "auto") -> str:
    """"auto" -> "cuda" when a CUDA GPU is visible, else "cpu"; an explicit CUDA device must exist."""
    device = str(device or "auto").strip().lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise CaptionerLoadError(f"device={device!r} but no CUDA GPU is visible. On Colab: Runtime > Change runtime "
                                 "type > T4 GPU; elsewhere use device='cpu' (or 'auto').")
    return device


_DTYPES = {"fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
           "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}


def resolve_dtype(dtype: torch.dtype | str | None, device: str) -> torch.dtype:
    """None -> fp16 on CUDA, fp32 elsewhere (fp16 matmuls are slow or missing on CPU); names like "bf16" accepted."""
    if dtype is None:
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).strip().lower()]
    except KeyError:
        raise ValueError(f"dtype={dtype!r} is not one of {sorted(_DTYPES)} (or a torch.dtype)") from None


def _offline() -> bool:
    """Whether the Hub must not be contacted (HF_HUB_OFFLINE=1 or no network): same rule as base models."""
    from ..sd.models import use_local_files_only

    return use_local_files_only(None)


def _offline_error(kind: str, repo_id: str, files: str) -> CaptionerLoadError:
    return CaptionerLoadError(
        f"Cannot load the {kind} captioner {repo_id!r}: the Hugging Face Hub is offline here (no network, or "
        f"HF_HUB_OFFLINE=1) and it is not in the local Hugging Face cache. Download it on a machine with network "
        f"(`hf download {repo_id} --local-dir <folder>`, which fetches {files}), copy that folder here and pass "
        f"its path as the model, e.g. load_captioner({kind!r}, "
        f"'/content/drive/MyDrive/models/{repo_id.split('/')[-1]}').")


def hub_file(kind: str, repo_id: str, filename: str, files: str) -> Path:
    """Download (or find in the cache) one file of a Hub repo; Hub failures become CaptionerLoadError."""
    from ..sd.models import download_hub_file

    return download_hub_file(repo_id, filename, offline=_offline(), error_cls=CaptionerLoadError,
                             offline_error=lambda: _offline_error(kind, repo_id, files),
                             missing=f"{repo_id!r} has no {filename}: it is not a {kind} model repo "
                                     f"(expected {files}).")


def model_source(kind: str, model: str | os.PathLike | None, default: str | None = None) -> tuple[str, bool]:
    """(model, is_local): a local folder/file if it exists, else a Hub id; anything else is a clear error.
    `default` (else DEFAULT_MODELS[kind]) is used when `model` is None."""
    default = default or DEFAULT_MODELS[kind]
    model = str(model) if model is not None else default
    path = Path(model).expanduser()
    if path.exists():
        return str(path), True
    if _HUB_ID.match(model):
        return model, False
    raise CaptionerLoadError(f"{model!r} does not exist. Pass a Hugging Face Hub id (default for {kind}: "
                             f"{default!r}) or a local folder (on Colab: is Google Drive mounted and "
                             "the path right?)")


def _pop_options(kind: str, options: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(f"unknown option(s) for the {kind} captioner: {', '.join(unknown)}. "
                         f"Options: {', '.join(sorted(defaults))}")
    return {**defaults, **options}


# =============================================================================================
# BLIP and Florence-2 (transformers)
# =============================================================================================

def transformers_config(kind: str, source: str, local: bool) -> dict:
    """config.json of a transformers model (folder or Hub); also where offline and wrong-repo errors surface."""
    files = "config.json, the weights (*.safetensors) and the processor/tokenizer files"
    path = Path(source) / "config.json" if local else hub_file(kind, source, "config.json", files)
    if not path.is_file():
        raise CaptionerLoadError(f"{source!r} is not a transformers model folder (no config.json). It should hold "
                                 f"what `hf download {DEFAULT_MODELS[kind]}` fetches.")
    return json.loads(path.read_text(encoding="utf-8"))


def load_pretrained(kind: str, cls, source: str, local: bool, **kwargs):
    """`cls.from_pretrained(source)`, offline when the source is local or the Hub is off; failures say what to do."""
    offline = True if local else _offline()
    try:
        return cls.from_pretrained(source, local_files_only=offline, **kwargs)
    except OSError as e:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        if offline and not local:
            raise CaptionerLoadError(f"{source!r} is only partly in the local Hugging Face cache ({first}). "
                                     + str(_offline_error(kind, source, "all its files"))) from None
        raise CaptionerLoadError(f"Cannot load {cls.__name__} from {source!r}: {first}") from e


class _TransformersCaptioner:
    """Shared part of the BLIP and Florence-2 captioners: model on a device in a dtype, generate settings."""

    name = "transformers"

    def __init__(self, model, processor, *, device: str, dtype: torch.dtype, generate_kwargs: dict[str, Any]):
        self.model = model.to(device=device, dtype=dtype).eval()
        self.processor = processor
        self.device = device
        self.dtype = dtype
        self.generate_kwargs = {k: v for k, v in generate_kwargs.items() if v is not None}

    def _inputs(self, images: list[Image.Image], text) -> Any:
        images = [as_rgb(im) for im in images]
        inputs = self.processor(images=images, text=text, return_tensors="pt")
        return inputs.to(self.device, self.dtype)  # BatchFeature.to casts floating tensors only


class BlipCaptioner(_TransformersCaptioner):
    """BLIP image captioning (BlipForConditionalGeneration); with `prompt`, captions continue that text."""

    def __init__(self, model, processor, *, name: str, device: str, dtype: torch.dtype, prompt: str = "",
                 generate_kwargs: dict[str, Any]):
        super().__init__(model, processor, device=device, dtype=dtype, generate_kwargs=generate_kwargs)
        self.name = name
        self.prompt = prompt.strip()

    @torch.inference_mode()
    def caption(self, images: list[Image.Image]) -> list[str]:
        """One sentence per image (the prompt, if any, included), whitespace normalized."""
        if not images:
            return []
        text = [self.prompt] * len(images) if self.prompt else None
        inputs = self._inputs(images, text)
        out = self.model.generate(**inputs, **self.generate_kwargs)
        texts = self.processor.batch_decode(out, skip_special_tokens=True)
        return [" ".join(t.split()) for t in texts]


class Florence2Captioner(_TransformersCaptioner):
    """Florence-2 (transformers' native Florence2ForConditionalGeneration) for one of FLORENCE_TASKS."""

    def __init__(self, model, processor, *, name: str, device: str, dtype: torch.dtype, task: str = "<CAPTION>",
                 generate_kwargs: dict[str, Any]):
        super().__init__(model, processor, device=device, dtype=dtype, generate_kwargs=generate_kwargs)
        self.name = name
        self.task = task

    @torch.inference_mode()
    def caption(self, images: list[Image.Image]) -> list[str]:
        """The task's text answer per image, through the processor's post-processing (markers and padding removed)."""
        if not images:
            return []
        images = [as_rgb(im) for im in images]
        inputs = self._inputs(images, [self.task] * len(images))
        out = self.model.generate(**inputs, **self.generate_kwargs)
        texts = self.processor.batch_decode(out, skip_special_tokens=False)
        pad = self.processor.tokenizer.pad_token
        captions = []
        for text, image in zip(texts, images):
            if pad:  # shorter answers of a batch end in <pad>, which the pure-text post-processing keeps
                text = text.replace(pad, "")
            try:
                parsed = self.processor.post_process_generation(text, task=self.task, image_size=image.size)[self.task]
            except ValueError:  # a processor saved without post_processor_config: strip the markers ourselves
                parsed = text
                for special in self.processor.tokenizer.all_special_tokens:
                    parsed = parsed.replace(special, "")
            captions.append(" ".join(str(parsed).split()))
        return captions


def _load_blip(model, device: str, dtype, options: dict[str, Any]) -> BlipCaptioner:
    from transformers import BlipForConditionalGeneration, BlipProcessor

    opts = _pop_options("blip", options, {"prompt": "", "max_new_tokens": 40, "num_beams": 3, "min_new_tokens": None,
                                          "generate_kwargs": None})
    source, local = model_source("blip", model)
    config = transformers_config("blip", source, local)
    if config.get("model_type") != "blip":
        raise CaptionerLoadError(f"{source!r} is a {config.get('model_type')!r} model, not BLIP (model_type 'blip'), "
                                 f"e.g. {DEFAULT_MODELS['blip']!r} or 'Salesforce/blip-image-captioning-base'.")
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    processor = load_pretrained("blip", BlipProcessor, source, local)
    net = load_pretrained("blip", BlipForConditionalGeneration, source, local, dtype=dtype)
    gen = {"max_new_tokens": int(opts["max_new_tokens"]), "num_beams": int(opts["num_beams"]),
           "min_new_tokens": opts["min_new_tokens"], **(opts["generate_kwargs"] or {})}
    return BlipCaptioner(net, processor, name=f"blip:{source}", device=device, dtype=dtype,
                         prompt=str(opts["prompt"] or ""), generate_kwargs=gen)


def _load_florence2(model, device: str, dtype, options: dict[str, Any]) -> Florence2Captioner:
    from transformers import Florence2ForConditionalGeneration, Florence2Processor

    opts = _pop_options("florence2", options, {"task": "<CAPTION>", "max_new_tokens": 256, "num_beams": 3,
                                               "generate_kwargs": None})
    task = str(opts["task"]).strip()
    if not task.startswith("<"):
        task = f"<{task.upper()}>"
    if task not in FLORENCE_TASKS:
        raise ValueError(f"task={opts['task']!r} is not a Florence-2 caption task: {', '.join(FLORENCE_TASKS)}")
    source, local = model_source("florence2", model)
    config = transformers_config("florence2", source, local)
    vision_type = (config.get("vision_config") or {}).get("model_type")
    if config.get("auto_map") or vision_type == "davit":
        raise CaptionerLoadError(
            f"{source!r} is in the original Florence-2 remote-code format (microsoft/Florence-2-*), which "
            "transformers' built-in Florence2ForConditionalGeneration cannot load. Use the converted checkpoints: "
            "'florence-community/Florence-2-base' or 'florence-community/Florence-2-large' (and their -ft variants).")
    if config.get("model_type") != "florence2":
        raise CaptionerLoadError(f"{source!r} is a {config.get('model_type')!r} model, not Florence-2 "
                                 f"(model_type 'florence2'), e.g. {DEFAULT_MODELS['florence2']!r}.")
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    processor = load_pretrained("florence2", Florence2Processor, source, local)
    net = load_pretrained("florence2", Florence2ForConditionalGeneration, source, local, dtype=dtype)
    gen = {"max_new_tokens": int(opts["max_new_tokens"]), "num_beams": int(opts["num_beams"]),
           **(opts["generate_kwargs"] or {})}
    return Florence2Captioner(net, processor, name=f"florence2:{source}", device=device, dtype=dtype, task=task,
                              generate_kwargs=gen)


# =============================================================================================
# WD14 / WD v3 taggers (ONNX)
# =============================================================================================

@dataclass(frozen=True)
class Tag:
    """One row of selected_tags.csv."""

    name: str
    category: int


def read_selected_tags(path: str | os.PathLike) -> list[Tag]:
    """Rows of a WD tagger's selected_tags.csv (tag_id,name,category,count), in model-output order."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows or [h.strip() for h in rows[0][:3]] != ["tag_id", "name", "category"]:
        raise CaptionerLoadError(f"{path} is not a WD tagger tag list: expected a header 'tag_id,name,category,count', "
                                 f"got {','.join(rows[0]) if rows else 'an empty file'!r}")
    try:
        return [Tag(name=row[1], category=int(row[2])) for row in rows[1:] if row]
    except (IndexError, ValueError) as e:
        raise CaptionerLoadError(f"{path}: bad row in the tag list ({e})") from None


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as e:
        raise CaptionerLoadError(
            "The WD14 tagger runs its ONNX model with onnxruntime, which is not installed. Install it with "
            "`pip install onnxruntime` (CPU) or `pip install onnxruntime-gpu` (CUDA, e.g. on Colab), then restart "
            f"the runtime/kernel. ({e})") from None
    return onnxruntime


def as_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of an image; transparency composited on white (what the taggers and captioners were trained on)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def wd14_preprocess(image: Image.Image, size: int) -> np.ndarray:
    """One image as the WD taggers take it: padded to a square on white (centred), resized to size x size
    (bicubic), BGR channel order, float32 in 0..255, HWC."""
    image = as_rgb(image)
    w, h = image.size
    side = max(w, h)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(image, ((side - w) // 2, (side - h) // 2))
    if side != size:
        square = square.resize((size, size), Image.BICUBIC)
    return np.asarray(square, dtype=np.float32)[:, :, ::-1].copy()


class WD14Tagger:
    """A WD14 / WD v3 Danbooru tagger: tags above their category's threshold, most confident first."""

    def __init__(self, session, tags: list[Tag], *, name: str, general_threshold: float = 0.35,
                 character_threshold: float = 0.85, blacklist=(), replace_underscores: bool = True,
                 include_rating: bool = False):
        from .captions import KAOMOJI

        for what, value in (("general_threshold", general_threshold), ("character_threshold", character_threshold)):
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"{what} must be within 0..1, got {value}")
        self.session = session
        self.name = name
        self.general_threshold = float(general_threshold)
        self.character_threshold = float(character_threshold)
        self.include_rating = bool(include_rating)
        self.replace_underscores = bool(replace_underscores)
        if isinstance(blacklist, str):
            blacklist = blacklist.split(",")
        self.blacklist = {_tag_compare_key(t) for t in blacklist if str(t).strip()}
        self.tags = tags
        self.names = [self._display(t.name, KAOMOJI) for t in tags]
        self.categories = np.array([t.category for t in tags])

        inp = session.get_inputs()[0]
        self.input_name = inp.name
        shape = list(inp.shape)
        if len(shape) != 4 or shape[-1] != 3 or not isinstance(shape[1], int) or shape[1] != shape[2]:
            raise CaptionerLoadError(f"{name}: expected an NHWC image input [batch, size, size, 3] (the WD tagger "
                                     f"layout), got {inp.name} {shape}")
        self.size = int(shape[1])
        self.fixed_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        n_out = session.get_outputs()[0].shape[-1]
        if isinstance(n_out, int) and n_out != len(tags):
            raise CaptionerLoadError(f"{name}: the model scores {n_out} tags but selected_tags.csv lists {len(tags)}: "
                                     "the two files come from different taggers.")

    def _display(self, name: str, kaomoji) -> str:
        if self.replace_underscores and name not in kaomoji:
            return name.replace("_", " ")
        return name

    def scores(self, images: list[Image.Image]) -> np.ndarray:
        """Per-tag probabilities, shape [len(images), n_tags], in selected_tags.csv order."""
        if not images:
            return np.zeros((0, len(self.tags)), dtype=np.float32)
        batch = np.stack([wd14_preprocess(im, self.size) for im in images])
        step = self.fixed_batch or len(batch)
        outs = []
        for start in range(0, len(batch), step):
            chunk = batch[start:start + step]
            n = len(chunk)
            if self.fixed_batch and n < self.fixed_batch:  # a model exported with a fixed batch: pad the last chunk
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.fixed_batch - n, axis=0)])
            outs.append(self.session.run(None, {self.input_name: chunk})[0][:n])
        probs = np.concatenate(outs).astype(np.float32)
        if probs.min() < 0.0 or probs.max() > 1.0:  # logits (SmilingWolf's own ONNX files already end in a sigmoid)
            probs = 1.0 / (1.0 + np.exp(-probs))
        return probs

    def predict(self, images: list[Image.Image]) -> list[list[tuple[str, float]]]:
        """(tag, confidence) pairs kept for each image, most confident first."""
        results = []
        is_char = self.categories == CATEGORY_CHARACTER
        is_rating = self.categories == CATEGORY_RATING
        thresholds = np.where(is_char, self.character_threshold, self.general_threshold)
        for p in self.scores(images):
            keep = (p >= thresholds) & ~is_rating
            picked = [(self.names[i], float(p[i])) for i in np.flatnonzero(keep)]
            picked = [(n, s) for n, s in picked if _tag_compare_key(n) not in self.blacklist]
            picked.sort(key=lambda t: -t[1])  # stable: ties keep the tag-list order
            if self.include_rating and is_rating.any():
                idx = np.flatnonzero(is_rating)
                best = int(idx[np.argmax(p[idx])])
                if _tag_compare_key(self.names[best]) not in self.blacklist:
                    picked.insert(0, (self.names[best], float(p[best])))
            results.append(picked)
        return results

    def caption(self, images: list[Image.Image]) -> list[str]:
        """The kept tags of each image joined by ", " (a Danbooru-style caption)."""
        return [", ".join(name for name, _ in tags) for tags in self.predict(images)]


def _tag_compare_key(tag: str) -> str:
    """Blacklist matching: case-insensitive, "long_hair" == "long hair"."""
    return " ".join(str(tag).replace("_", " ").split()).casefold()


def _providers(ort, device: str) -> list[str]:
    available = ort.get_available_providers()
    device = str(device or "auto").strip().lower()
    if device == "auto":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"] if "CUDAExecutionProvider" in available \
            else ["CPUExecutionProvider"]
    if torch.device(device).type == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise CaptionerLoadError(
                f"device={device!r} but this onnxruntime has no CUDA support (providers: {', '.join(available)}). "
                "`pip uninstall -y onnxruntime && pip install onnxruntime-gpu`, restart, or use device='cpu'.")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _wd14_files(model) -> tuple[Path, Path, str]:
    files = f"{WD14_MODEL_FILE} and {WD14_TAGS_FILE}"
    source, local = model_source("wd14", model)
    if local:
        path = Path(source)
        onnx_path = path if path.is_file() else path / WD14_MODEL_FILE
        tags_path = onnx_path.parent / WD14_TAGS_FILE
        missing = [p.name for p in (onnx_path, tags_path) if not p.is_file()]
        if missing or onnx_path.suffix.lower() != ".onnx":
            raise CaptionerLoadError(f"{source!r} is not a WD tagger: it needs {files} side by side "
                                     f"(missing: {', '.join(missing) or onnx_path.name}). Get them with "
                                     f"`hf download {DEFAULT_MODELS['wd14']} {WD14_MODEL_FILE} {WD14_TAGS_FILE} "
                                     "--local-dir <folder>`.")
        return onnx_path, tags_path, source
    tags_path = hub_file("wd14", source, WD14_TAGS_FILE, files)
    onnx_path = hub_file("wd14", source, WD14_MODEL_FILE, files)
    return onnx_path, tags_path, source


def _load_wd14(model, device: str, dtype, options: dict[str, Any]) -> WD14Tagger:
    opts = _pop_options("wd14", options, {"general_threshold": 0.35, "character_threshold": 0.85, "blacklist": (),
                                          "replace_underscores": True, "include_rating": False})
    ort = _import_onnxruntime()
    onnx_path, tags_path, source = _wd14_files(model)
    tags = read_selected_tags(tags_path)
    providers = _providers(ort, device)
    try:
        session = ort.InferenceSession(str(onnx_path), providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types
        raise CaptionerLoadError(f"onnxruntime cannot load {onnx_path}: {e}") from e
    if providers[0] == "CUDAExecutionProvider" and "CUDAExecutionProvider" not in session.get_providers():
        logger.warning("onnxruntime could not start CUDA (CUDA/cuDNN libraries do not match this onnxruntime-gpu); "
                       "the WD14 tagger runs on the CPU.")
    return WD14Tagger(session, tags, name=f"wd14:{source}", **opts)


# =============================================================================================
# The factory
# =============================================================================================

def load_captioner(kind: str, model: str | os.PathLike | None = None, *, device: str = "auto", dtype=None,
                   **options) -> Captioner:
    """A captioner of `kind` ("blip", "florence2", "wd14", "qwen2_5_vl", "joycaption") from a Hub id or local
    folder (default: DEFAULT_MODELS, or vlm.VLM_MODELS for the two VLMs).

    The VLMs take `vlm.load_vlm_captioner`'s options: quantize, template, prompt, caption, length, trigger,
    class_word, tagger, system, max_side, max_new_tokens, generate_kwargs.

    Options: blip: prompt, max_new_tokens, num_beams, min_new_tokens, generate_kwargs; florence2: task
    (one of FLORENCE_TASKS), max_new_tokens, num_beams, generate_kwargs; wd14: general_threshold,
    character_threshold, blacklist, replace_underscores, include_rating. Device "auto" picks CUDA when
    present; transformers models then run in fp16 unless `dtype` says otherwise (WD14 ignores dtype).
    """
    kind_key = str(kind).strip().lower().replace("-", "").replace("_", "")
    aliases = {"blip": "blip", "florence2": "florence2", "florence": "florence2", "wd14": "wd14", "wd": "wd14",
               "wdtagger": "wd14", "wd14tagger": "wd14", "qwen25vl": "qwen2_5_vl", "qwen2.5vl": "qwen2_5_vl",
               "qwen": "qwen2_5_vl", "qwenvl": "qwen2_5_vl", "joycaption": "joycaption", "joy": "joycaption"}
    if kind_key not in aliases:
        raise ValueError(f"kind={kind!r} is not a captioner: choose one of {', '.join(KINDS)}")
    kind = aliases[kind_key]
    if kind in ("qwen2_5_vl", "joycaption"):
        from .vlm import load_vlm_captioner

        return load_vlm_captioner(kind, model, device=device, dtype=dtype, **options)
    if kind == "wd14":
        return _load_wd14(model, device, dtype, options)
    if kind == "blip":
        return _load_blip(model, device, dtype, options)
    return _load_florence2(model, device, dtype, options)


# =============================================================================================
# Captioning a folder
# =============================================================================================

class CaptionResult(dict):
    """What `caption_folder` wrote ({image: caption}), plus what it did not: `failed` ({image: reason})
    and `skipped` (images that kept their caption); `history` is the undo entry (None if nothing was written)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.failed: dict[str, str] = {}
        self.skipped: list[str] = []
        self.history: Path | None = None


def find_images(folder: str | os.PathLike, *, recursive: bool = True) -> list[str]:
    """Image paths relative to `folder` (POSIX), sorted; hidden files and folders and underscore folders
    (`_dropped/`, `_masks/`, `_report/`) are skipped."""
    from .decode import IMAGE_EXTENSIONS

    folder = Path(folder)
    found: list[str] = []
    for root, dirs, files in os.walk(folder):
        # hidden folders, and a prepared set's own _report/, _masks/ and _dropped/ (underscore folders)
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "_"))) if recursive else []
        rel_root = Path(root).relative_to(folder)
        for name in files:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                found.append((rel_root / name).as_posix())
    return sorted(found)


def _read_existing(path: Path) -> str | None:
    if not path.is_file():
        return None
    return " ".join(path.read_bytes().decode("utf-8-sig").split())


def _combine(old: str | None, new: str, mode: str, separator: str) -> str:
    if not old or mode == "overwrite":
        return new
    if not new:
        return old
    return f"{old}{separator}{new}" if mode == "append" else f"{new}{separator}{old}"


def caption_folder(folder: str | os.PathLike, captioner: Captioner, *, batch_size: int = 8, mode: str = "skip",
                   extension: str = ".txt", progress: bool = True, recursive: bool = True,
                   separator: str = ", ") -> CaptionResult:
    """Caption every image of `folder` with `captioner` and write `<stem><extension>` beside each image.

    mode: "skip" keeps images that already have a non-empty caption file, "overwrite" replaces it,
    "append"/"prepend" add the new caption after/before the old one (joined by `separator`).
    Unreadable images are reported in the result's `failed`, never fatal. Each batch is written as soon as it
    is captioned, so an interrupted run keeps what it finished and a rerun with mode="skip" resumes; the whole
    run is still one undo step.
    """
    from tqdm.auto import tqdm

    from .captions import caption_path, snapshot_captions, write_captions
    from .dataset import load_image

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Image folder not found (or not a folder): {folder}")
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {', '.join(MODES)}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batch_size = int(batch_size)
    images = find_images(folder, recursive=recursive)
    if not images:
        raise ValueError(f"No images in {folder} (hidden files and _dropped/ are skipped).")

    result = CaptionResult()
    existing: dict[str, str | None] = {}
    todo: list[str] = []
    for rel in images:
        try:
            existing[rel] = None if mode == "overwrite" else _read_existing(caption_path(folder, rel, extension))
        except (UnicodeDecodeError, OSError) as e:
            result.failed[rel] = f"its caption file is unreadable ({e}); re-save it as UTF-8 or delete it"
            continue
        if mode == "skip" and existing[rel]:
            result.skipped.append(rel)
        else:
            todo.append(rel)

    name = getattr(captioner, "name", type(captioner).__name__)
    bar = tqdm(total=len(todo), desc=f"captioning ({name})", unit="img", disable=not progress)
    # One snapshot before the first write, then each batch's captions are written as soon as they exist: a run
    # that dies (a Colab disconnect) keeps what it finished, the next run with mode="skip" starts where it
    # stopped, and one `captions.undo(folder)` still takes the whole run back.
    entry: Path | None = None
    try:
        for start in range(0, len(todo), batch_size):
            batch: list[str] = []
            pixels: list[Image.Image] = []
            for rel in todo[start:start + batch_size]:
                try:
                    pixels.append(load_image(folder / rel))
                    batch.append(rel)
                except ValueError as e:
                    result.failed[rel] = str(e)
            if pixels:
                captions = captioner.caption(pixels)
                if len(captions) != len(pixels):
                    raise RuntimeError(f"{name} returned {len(captions)} captions for {len(pixels)} images")
                new = {rel: _combine(existing.get(rel), " ".join(str(text).split()), mode, separator)
                       for rel, text in zip(batch, captions)}
                if entry is None:
                    entry = snapshot_captions(folder, todo, extension=extension,
                                              note=f"caption_folder {name} mode={mode}")
                write_captions(folder, new, extension=extension, history_entry=entry)
                result.update(new)
            bar.update(len(todo[start:start + batch_size]))
    finally:
        bar.close()
        result.history = entry
    for rel, reason in result.failed.items():
        logger.warning("not captioned: %s: %s", rel, reason)
    if result.failed and progress:
        print(f"{len(result.failed)} image(s) not captioned (see result.failed): "
              + "; ".join(f"{k}: {v}" for k, v in list(result.failed.items())[:5]), flush=True)
    return result


# ----------------------------------------------------------------------------------- from a config

@dataclass
class TagRun:
    """What `run_tag_config` did: the captioning result (None without a captioner), the edited captions,
    and the history entry of the save (None when nothing changed; `captions.undo` restores it)."""

    captioned: CaptionResult | None
    captions: Any
    entry: Path | None


def run_tag_config(folder: str | os.PathLike, cfg, *, device: str = "auto", progress: bool = True,
                   note: str = "") -> TagRun:
    """Caption `folder` with cfg.captioner (unless "none"), then apply cfg's edits in order (remove, replace,
    dedupe, trigger/class word, sort, limit) and save the changed captions (undoable)."""
    from . import captions as C

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no such folder: {folder}")
    captioned = None
    if cfg.captioner != "none":
        wd14 = {"general_threshold": cfg.general_threshold, "character_threshold": cfg.character_threshold,
                "blacklist": tuple(cfg.blacklist)}
        options: dict[str, Any] = {}
        if cfg.captioner == "wd14":
            options = wd14
        elif cfg.captioner in ("qwen2_5_vl", "joycaption"):
            options = {"prompt": cfg.prompt or None, "caption": cfg.caption_template, "length": cfg.caption_length,
                       "trigger": cfg.trigger, "class_word": cfg.class_word, "quantize": cfg.quantize,
                       "max_new_tokens": cfg.max_new_tokens,
                       "tagger": load_captioner("wd14", None, device=device, **wd14) if cfg.vlm_tags else None}
        elif cfg.task:
            options = {"task": cfg.task}
        captioner = load_captioner(cfg.captioner, cfg.model, device=device, **options)
        try:
            captioned = caption_folder(folder, captioner, batch_size=cfg.batch_size, mode=cfg.mode,
                                       extension=cfg.extension, progress=progress)
        finally:
            close = getattr(captioner, "close", None)
            if close is not None:   # give the GPU back for training
                close()
    edited = caps = C.load_captions(folder, cfg.extension)
    if cfg.remove:
        edited = C.remove_tags(edited, patterns=cfg.remove)
    if cfg.replace:
        edited = C.replace_tags(edited, cfg.replace_map())
    if cfg.dedupe:
        edited = C.deduplicate_tags(edited)
    if cfg.trigger:
        edited = C.add_trigger(edited, cfg.trigger, class_word=cfg.class_word)
    elif cfg.class_word:
        edited = C.add_class_word(edited, cfg.class_word)
    if cfg.sort:
        edited = C.sort_by_frequency(edited, keep_tokens=cfg.keep_tokens)
    if cfg.max_tags:
        edited = C.limit_tags(edited, cfg.max_tags, keep_tokens=cfg.keep_tokens)
    entry = C.save_captions(edited, folder, note=note or "tag") if edited is not caps else None
    return TagRun(captioned, edited, entry)
