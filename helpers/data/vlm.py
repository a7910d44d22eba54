"""Captions from vision-language models (Qwen2.5-VL, JoyCaption) steered by a prompt template.

A `CaptionTemplate` has two parts: `prompt`, the instruction sent to the model with each image, and `caption`,
how the written caption is put together from the model's answer. Both take the fields {trigger}, {class},
{tags} (the image's WD14 tags, when a tagger is given) and {length}; `caption` also takes {caption}, the answer.
Text in [square brackets] is left out when a field inside it is empty, so one template serves with and without
a trigger word or tags.

The checkpoints (from their model cards and Hub file listings):
  - Qwen/Qwen2.5-VL-3B-Instruct: about 3.8 B parameters, 7.5 GB in bf16; Qwen/Qwen2.5-VL-7B-Instruct: about
    8.3 B, 16.6 GB in bf16. transformers' native Qwen2_5_VLForConditionalGeneration. In fp16 the Qwen2 language
    model overflows on some inputs and answers "!!!!" (transformers #33294, vLLM #13817), so a GPU without
    native bf16 (a T4) runs it 4-bit with fp32 arithmetic.
  - fancyfeast/llama-joycaption-beta-one-hf-llava: Llama 3.1 8B with a SigLIP so400m vision tower, 8.5 B
    parameters, about 17 GB in bf16 (its card); its 4-bit NF4 form is about 6 GB (the files of
    John6666/llama-joycaption-alpha-two-hf-llava-nf4). transformers' LlavaForConditionalGeneration; its prompts
    follow the card ("Write a long descriptive caption for this image in a formal tone.", "... you must refer
    to them as {name}."), with the system turn "You are a helpful image captioner.".
On a T4 (15 GB) both load 4-bit through bitsandbytes (`quantize="auto"` does it when the weights would not
fit), the vision tower left unquantized. `close()` frees the model so training gets the GPU back.
"""

from __future__ import annotations

import json
import logging
import os
import re
import string
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..drawing import fit_size
from ..sd.models import free_memory
from .tagging import (CaptionerLoadError, as_rgb, hub_file, load_pretrained, model_source, resolve_device,
                      resolve_dtype, transformers_config)

logger = logging.getLogger(__name__)

VLM_KINDS = ("qwen2_5_vl", "joycaption")
VLM_MODELS = {"qwen2_5_vl": "Qwen/Qwen2.5-VL-3B-Instruct",
              "joycaption": "fancyfeast/llama-joycaption-beta-one-hf-llava"}
QUANTIZE = ("auto", "none", "4bit", "8bit")
LENGTHS = ("very short", "short", "medium", "long", "very long")
FIELDS = ("trigger", "class", "tags", "length")

# What each family's {length} reads as: JoyCaption was trained on its own length words; Qwen follows sentences.
_LENGTH_WORDS = {
    "joycaption": {"very short": "very short", "short": "short", "medium": "medium-length", "long": "long",
                   "very long": "very long"},
    "qwen2_5_vl": {"very short": "a few words", "short": "one sentence", "medium": "two or three sentences",
                   "long": "one detailed paragraph", "very long": "two detailed paragraphs"},
}
DEFAULT_PROMPTS = {
    "joycaption": ("Write a {length} descriptive caption for this image in a formal tone."
                   "[ If there is a person/character in the image you must refer to them as {trigger}.]"
                   "[ These tags describe it: {tags}.]"),
    "qwen2_5_vl": ("Describe this image in {length}, as a caption for training an image generator: the main "
                   "subject, what it does and wears, the setting, the lighting and the camera angle. Do not start "
                   "with \"The image\" or \"This image\".[ Call the main subject \"{trigger}[ {class}]\".]"
                   "[ These tags describe it: {tags}.]"),
}
DEFAULT_CAPTION = "[{trigger}, ][{class}, ]{caption}"
SYSTEM_PROMPTS = {"joycaption": "You are a helpful image captioner.", "qwen2_5_vl": ""}
_MODEL_TYPES = {"qwen2_5_vl": "qwen2_5_vl", "joycaption": "llava"}
# Modules 4-bit loading leaves in the compute dtype: the vision towers and projectors (small, and quantizing
# them costs the most quality) and the output head.
_QUANT_SKIP = {"qwen2_5_vl": ["visual", "lm_head"], "joycaption": ["vision_tower", "multi_modal_projector", "lm_head"]}


# =============================================================================================
# Templates
# =============================================================================================

_OPTIONAL = re.compile(r"\[([^\[\]]*)\]")


def _fields(text: str) -> set[str]:
    try:
        return {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
    except ValueError as e:
        raise ValueError(f"bad template {text!r}: {e}") from None


def render(text: str, values: dict[str, str]) -> str:
    """Fill a template: {field}s replaced, [optional parts] dropped when a field inside is empty (innermost
    first, so "[{trigger}[ {class}]]" keeps the trigger without a class), whitespace tidied."""
    unknown = _fields(_OPTIONAL.sub(lambda m: m.group(1), text)) - set(values)
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join('{' + u + '}' for u in sorted(unknown))} in template "
                         f"{text!r}; fields: {', '.join('{' + f + '}' for f in sorted(values))}")

    def part(m: re.Match) -> str:
        inner = m.group(1)
        return inner.format_map(values) if all(values.get(f) for f in _fields(inner)) else ""

    previous = None
    while previous != text:
        previous, text = text, _OPTIONAL.sub(part, text)
    return " ".join(text.format_map(values).split())


@dataclass(frozen=True)
class CaptionTemplate:
    """What the model is asked (`prompt`; None: the family's DEFAULT_PROMPTS) and how the written caption is
    put together (`caption`, from {caption}, the model's answer). See the module docstring for the fields."""

    prompt: str | None = None
    caption: str = DEFAULT_CAPTION
    length: str = "medium"

    def __post_init__(self) -> None:
        if self.length not in LENGTHS:
            raise ValueError(f"length must be one of {', '.join(LENGTHS)}, got {self.length!r}")
        if "{caption}" not in self.caption:
            raise ValueError(f"the caption template must contain {{caption}} (the model's answer), got "
                             f"{self.caption!r}")
        for text in (self.prompt or "", self.caption):
            render(text, dict.fromkeys((*FIELDS, "caption"), "x"))  # unknown fields fail here, not mid-run

    def prompt_text(self, family: str) -> str:
        return self.prompt if self.prompt is not None else DEFAULT_PROMPTS[family]

    def values(self, family: str, *, trigger: str = "", class_word: str = "", tags: str = "") -> dict[str, str]:
        return {"trigger": trigger.strip(), "class": class_word.strip(), "tags": tags.strip(),
                "length": _LENGTH_WORDS[family][self.length]}

    def prompt_for(self, family: str, **values: str) -> str:
        """The instruction sent with one image."""
        return render(self.prompt_text(family), self.values(family, **values))

    def caption_for(self, family: str, answer: str, **values: str) -> str:
        """The caption written for one image, from the model's answer."""
        return render(self.caption, {**self.values(family, **values), "caption": clean_answer(answer)})


def clean_answer(text: str) -> str:
    """A model's answer as one caption line: whitespace collapsed, surrounding quotes and a "Caption:" label gone."""
    text = " ".join(str(text).split())
    text = re.sub(r"^(?:caption|description)\s*:\s*", "", text, flags=re.IGNORECASE)
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'“”":
        text = text[1:-1].strip()
    return text.strip("“”\"").strip()


# =============================================================================================
# The captioner
# =============================================================================================

def _fit(image: Image.Image, max_side: int) -> Image.Image:
    image = as_rgb(image)
    size = fit_size(image.size, max_side)
    return image if size == image.size else image.resize(size, Image.Resampling.LANCZOS)


class VLMCaptioner:
    """A vision-language model that captions a batch of images through a `CaptionTemplate`.

    `tagger` (a WD14 `Captioner`, optional) fills {tags} per image. Images are shrunk to `max_side` on the long
    side first (a 24 MP photo would be thousands of image tokens). Use it as a context manager, or call `close()`,
    to free the model afterwards.
    """

    def __init__(self, model, tokenizer, image_processor, *, family: str, name: str, device: str,
                 dtype: torch.dtype, template: CaptionTemplate, trigger: str = "", class_word: str = "",
                 tagger=None, system: str | None = None, max_side: int = 768,
                 generate_kwargs: dict[str, Any] | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.family = family
        self.name = name
        self.device = device
        self.dtype = dtype
        self.template = template
        self.trigger = trigger
        self.class_word = class_word
        self.tagger = tagger
        self.system = SYSTEM_PROMPTS[family] if system is None else system
        self.max_side = int(max_side)
        self.generate_kwargs = {k: v for k, v in (generate_kwargs or {}).items() if v is not None}
        config = model.config
        self.image_token_id = int(config.image_token_id)
        self.image_token = tokenizer.convert_ids_to_tokens(self.image_token_id)
        tokenizer.padding_side = "left"      # generation continues every row from its own last token
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self._content = "list" if family == "qwen2_5_vl" else "string"

    # ------------------------------------------------------------------ prompts

    def _values(self, tags: str) -> dict[str, str]:
        return {"trigger": self.trigger, "class_word": self.class_word, "tags": tags}

    def prompts(self, tags: list[str]) -> list[str]:
        """The instruction for each image (its tags filled in)."""
        return [self.template.prompt_for(self.family, **self._values(t)) for t in tags]

    def _chat(self, prompt: str, content: str) -> str:
        user = prompt if content == "string" else [{"type": "image"}, {"type": "text", "text": prompt}]
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + [
            {"role": "user", "content": user}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def chat_text(self, prompt: str) -> str:
        """The model's whole input text for one image: the chat template around the prompt, one image token in it
        (JoyCaption's template places the image itself; Qwen's takes it as a content part)."""
        for content in (self._content, "list" if self._content == "string" else "string"):
            text = self._chat(prompt, content)
            if text.count(self.image_token) == 1:
                self._content = content
                return text
        raise CaptionerLoadError(f"the chat template of {self.name} places no image token ({self.image_token}) "
                                 "for a string or an image-part message; this model is not a supported captioner")

    # ------------------------------------------------------------------ captions

    def _image_inputs(self, images: list[Image.Image]) -> tuple[dict[str, torch.Tensor], list[int]]:
        feats = self.image_processor(images=images, return_tensors="pt")
        feats = {k: v for k, v in feats.items() if k in ("pixel_values", "image_grid_thw")}
        feats["pixel_values"] = feats["pixel_values"].to(self.device, self.dtype)
        if "image_grid_thw" in feats:   # Qwen: patches merged merge_size x merge_size into one token each
            merge = int(getattr(self.image_processor, "merge_size", 2))
            counts = [int(g.prod()) // (merge * merge) for g in feats["image_grid_thw"]]
            feats["image_grid_thw"] = feats["image_grid_thw"].to(self.device)
        else:
            counts = [int(self.model.config.image_seq_length)] * len(images)
        return feats, counts

    @torch.inference_mode()
    def answers(self, images: list[Image.Image], prompts: list[str]) -> list[str]:
        """The model's raw answer per image to its prompt (greedy unless generate_kwargs say otherwise)."""
        if self.model is None:
            raise RuntimeError(f"{self.name} was closed; load it again to caption more images")
        feats, counts = self._image_inputs(images)
        texts = [self.chat_text(p).replace(self.image_token, self.image_token * n) for p, n in zip(prompts, counts)]
        enc = self.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False).to(self.device)
        out = self.model.generate(**enc, **feats, pad_token_id=self.tokenizer.pad_token_id, **self.generate_kwargs)
        return self.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)

    def caption(self, images: list[Image.Image]) -> list[str]:
        """One caption per image, put together by the template's `caption` part."""
        if not images:
            return []
        images = [_fit(im, self.max_side) for im in images]
        tags = self.tagger.caption(images) if self.tagger is not None else [""] * len(images)
        answers = self.answers(images, self.prompts(tags))
        return [self.template.caption_for(self.family, a, **self._values(t)) for a, t in zip(answers, tags)]

    def close(self) -> None:
        """Free the model (and its GPU memory) for the next notebook step; the captioner cannot caption after."""
        self.model = None
        free_memory()

    def __enter__(self) -> "VLMCaptioner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# =============================================================================================
# Loading
# =============================================================================================

def weights_bytes(source: str, local: bool, kind: str) -> int | None:
    """Bytes of the checkpoint's weights as stored (the safetensors index's total, or the files' sizes); None
    when it cannot be told without downloading the weights."""
    folder = Path(source)
    if local:
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            return int(json.loads(index.read_text())["metadata"]["total_size"])
        files = list(folder.glob("*.safetensors"))
        return sum(f.stat().st_size for f in files) or None
    try:
        index = hub_file(kind, source, "model.safetensors.index.json", "model.safetensors.index.json")
        return int(json.loads(Path(index).read_text())["metadata"]["total_size"])
    except (CaptionerLoadError, KeyError, ValueError, OSError):
        return None


def _stored_bytes_per_param(config: dict) -> int:
    dtype = str(config.get("torch_dtype") or config.get("dtype") or (config.get("text_config") or {}).get("dtype")
                or "bfloat16")
    return 4 if "32" in dtype else 2


def choose_precision(family: str, device: str, dtype, quantize: str, stored_bytes: int | None,
                     bytes_per_param: int = 2) -> tuple[torch.dtype, str | None]:
    """(compute dtype, None | "4bit" | "8bit") for a VLM on `device`.

    dtype None: fp32 on the CPU; bf16 on a GPU with native bf16 (A100, L4); otherwise fp16 for JoyCaption and fp32
    for Qwen2.5-VL (fp16 overflows, see the module docstring). quantize "auto": 4-bit when the weights in that
    dtype plus 1.5 GB for activations would not fit the GPU's memory; never on the CPU (bitsandbytes' 4-bit
    needs CUDA)."""
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE)}, got {quantize!r}")
    cuda = torch.device(device).type == "cuda"
    if dtype is None:
        if not cuda:
            dtype = torch.float32
        elif torch.cuda.is_bf16_supported(including_emulation=False):
            dtype = torch.bfloat16
        else:
            dtype = torch.float16 if family == "joycaption" else torch.float32
    else:
        dtype = resolve_dtype(dtype, device)
    if quantize in ("4bit", "8bit") and not cuda:
        raise CaptionerLoadError(f"quantize={quantize!r} needs a CUDA GPU (bitsandbytes); on the CPU use "
                                 "quantize='none'")
    if quantize == "auto":
        quantize = "none"
        if cuda and stored_bytes:
            need = stored_bytes / bytes_per_param * torch.finfo(dtype).bits / 8 + 1.5e9
            total = torch.cuda.get_device_properties(torch.device(device)).total_memory
            if need > total:
                quantize = "4bit"
    return dtype, None if quantize == "none" else quantize


def load_vlm_captioner(kind: str, model: str | os.PathLike | None = None, *, device: str = "auto", dtype=None,
                       quantize: str = "auto", template: CaptionTemplate | None = None, prompt: str | None = None,
                       caption: str | None = None, length: str | None = None, trigger: str = "",
                       class_word: str = "", tagger=None, system: str | None = None, max_side: int = 768,
                       max_new_tokens: int = 160, generate_kwargs: dict[str, Any] | None = None) -> VLMCaptioner:
    """A Qwen2.5-VL or JoyCaption captioner from a Hub id or local folder (default: VLM_MODELS[kind]).

    `prompt` / `caption` / `length` override the template's parts. Generation is greedy (the same caption on
    every run) with `max_new_tokens`; pass generate_kwargs={"do_sample": True, "temperature": 0.6, "top_p": 0.9}
    for JoyCaption's sampled captions.
    """
    from transformers import AutoImageProcessor, AutoTokenizer

    if kind not in VLM_KINDS:
        raise ValueError(f"kind={kind!r} is not a VLM captioner: {', '.join(VLM_KINDS)}")
    template = template or CaptionTemplate()
    overrides = {k: v for k, v in (("prompt", prompt), ("caption", caption), ("length", length)) if v is not None}
    template = replace(template, **overrides) if overrides else template
    source, local = model_source(kind, model, VLM_MODELS[kind])
    config = transformers_config(kind, source, local)
    expected = _MODEL_TYPES[kind]
    if config.get("model_type") != expected:
        raise CaptionerLoadError(f"{source!r} is a {config.get('model_type')!r} model, not {kind} (model_type "
                                 f"{expected!r}), e.g. {VLM_MODELS[kind]!r}.")
    device = resolve_device(device)
    dtype, quant = choose_precision(kind, device, dtype, quantize, weights_bytes(source, local, kind),
                                    _stored_bytes_per_param(config))
    if kind == "qwen2_5_vl":
        from transformers import Qwen2_5_VLForConditionalGeneration as cls
    else:
        from transformers import LlavaForConditionalGeneration as cls
    kwargs: dict[str, Any] = {"dtype": dtype}
    if quant is not None:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=_QUANT_SKIP[kind])
            if quant == "4bit" else BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=_QUANT_SKIP[kind]))
        kwargs["device_map"] = {"": device}
    tokenizer = load_pretrained(kind, AutoTokenizer, source, local)
    if not getattr(tokenizer, "chat_template", None):
        raise CaptionerLoadError(f"{source!r} has no chat template (tokenizer_config.json or chat_template.jinja); "
                                 "the VLM captioners need the instruct/chat checkpoint")
    image_processor = load_pretrained(kind, AutoImageProcessor, source, local)
    net = load_pretrained(kind, cls, source, local, **kwargs)
    if quant is None:
        net = net.to(device)
    gen = {"max_new_tokens": int(max_new_tokens), "do_sample": False, **(generate_kwargs or {})}
    logger.info("loaded %s on %s in %s%s", source, device, dtype, f", {quant}" if quant else "")
    return VLMCaptioner(net, tokenizer, image_processor, family=kind, name=f"{kind}:{source}", device=device,
                        dtype=dtype, template=template, trigger=trigger, class_word=class_word, tagger=tagger,
                        system=system, max_side=max_side, generate_kwargs=gen)
