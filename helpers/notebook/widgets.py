"""ipywidgets forms built from the config dataclasses: one widget per field, grouped, with presets,
live validation (the config's own error messages) and TOML save/load.

The form holds no settings logic of its own: it turns widget values into the dataclass, and the
dataclass validates. So a setting means the same thing in a notebook, a TOML file and the CLI.

    form = train_form(preset="SD 1.5 · T4", train_data_dir="data/prepared")
    form.show()                 # in a notebook
    cfg = form.save("configs/train.toml")   # validated TrainConfig, written as TOML
"""

from __future__ import annotations

import dataclasses
import html
import io
import re
from pathlib import Path
from typing import Any, Callable, get_type_hints

from ..config import (
    ConfigError, EvalConfig, GenerateConfig, TagConfig, TrainConfig, allowed_types, field_help, list_item_type,
    load_config, save_config
)

# The groups a form shows open, in order; fields not named here go into "Advanced".
TRAIN_GROUPS: dict[str, list[str]] = {
    "Model": ["pretrained_model", "family", "vae", "model_config", "prediction_type", "clip_skip",
              "max_token_length"],
    "Data": ["train_data_dir", "reg_data_dir", "resolution", "enable_bucket", "repeats", "flip_aug",
             "shuffle_caption", "keep_tokens", "caption_dropout_rate", "cache_latents",
             "cache_text_encoder_outputs", "masked_loss", "alpha_mask", "mask_dir"],
    "Method": ["method", "token_string", "init_word", "num_vectors_per_token", "class_prompt", "num_class_images",
               "prior_loss_weight"],
    "LoRA": ["network", "rank", "alpha", "conv_dim", "conv_alpha", "factor", "target", "train_text_encoder",
             "lora_dropout", "loraplus_lr_ratio", "block_dims", "block_alphas", "layer_filter", "layer_filter_regex"],
    "Training": ["max_train_steps", "train_batch_size", "gradient_accumulation_steps", "optimizer", "learning_rate",
                 "text_encoder_lr", "embedding_lr", "lr_scheduler", "lr_warmup_steps", "min_snr_gamma",
                 "noise_offset", "ema_decay", "ema_warmup", "seed"],
    "Noise, timesteps and loss": ["loss_type", "huber_schedule", "huber_c", "huber_scale", "min_timestep",
                                  "max_timestep", "multires_noise_iterations", "multires_noise_discount",
                                  "ip_noise_gamma", "ip_noise_gamma_random_strength", "noise_offset_random_strength",
                                  "debiased_estimation_loss", "scale_v_pred_loss_like_noise_pred",
                                  "zero_terminal_snr"],
    "Memory and precision": ["mixed_precision", "gradient_checkpointing", "attention"],
    "Output": ["output_dir", "output_name", "save_every_n_steps", "save_format", "save_precision",
               "save_state_every_n_steps", "save_state_last_n", "log_with", "logging_dir"],
    "Samples during training": ["sample_every_n_steps", "sample_prompts", "sample_sampler", "sample_steps",
                                "sample_cfg", "sample_seed"],
    "Validation": ["validation_split", "validation_data_dir", "validation_every_n_steps", "validation_images"],
}
GENERATE_GROUPS: dict[str, list[str]] = {
    "Model": ["model", "loras", "embeddings"],
    "Prompts": ["prompts", "negative_prompt", "weighting"],
    "Sampling": ["sampler", "steps", "cfg_scale", "seed", "num_images", "width", "height", "clip_skip"],
    "Grid": ["grid_weights"],
}
EVAL_GROUPS: dict[str, list[str]] = {
    "Models": ["model", "loras", "weights"],
    "Prompts": ["trigger", "prompts", "context_prompts", "prior_prompts", "negative_prompt"],
    "References and metrics": ["reference_dir", "clip_model", "dino_model", "fid_kid", "inception_weights"],
    "Sampling": ["num_seeds", "steps", "sampler", "cfg_scale", "clip_skip", "batch_size"],
}


def _choices(cls: type, name: str) -> tuple[str, ...] | None:
    if name == "sampler" or name == "sample_sampler":
        from ..sd.samplers import SAMPLERS

        return tuple(SAMPLERS)
    return getattr(cls, "CHOICES", {}).get(name)


class _Field:
    """One field: its widget, and the conversion between the widget's value and the field's."""

    def __init__(self, cls: type, f: dataclasses.Field, hint: Any, help_text: str):
        import ipywidgets as W

        self.name = f.name
        allowed = allowed_types(hint)
        self.optional = type(None) in allowed
        self.item = list_item_type(hint)
        self.kind = ("list" if self.item else "bool" if bool in allowed else "int" if int in allowed
                     else "float" if float in allowed else "str")
        choices = _choices(cls, f.name)
        style = {"description_width": "200px"}
        layout = W.Layout(width="560px")
        common = dict(description=f.name, style=style, layout=layout, tooltip=help_text)
        if choices:
            self.kind = "choice"
            self.widget = W.Dropdown(options=list(choices), **common)
        elif self.kind == "bool":
            self.widget = W.Checkbox(indent=False, description=f.name, tooltip=help_text,
                                     layout=W.Layout(width="560px"))
        elif self.kind == "list" and self.item is str:
            self.widget = W.Textarea(placeholder="one per line", rows=3, **common)
        elif self.optional or self.kind in ("list", "str"):
            self.widget = W.Text(placeholder="unset" if self.optional else "", **common)
        elif self.kind == "int":
            self.widget = W.IntText(**common)
        else:
            self.widget = W.FloatText(**common)
        self.help = W.HTML(f"<span style='color:#666;font-size:90%'>{_escape(help_text)}</span>") if help_text else None

    def row(self):
        import ipywidgets as W

        return W.HBox([self.widget, self.help]) if self.help else self.widget

    def set(self, value: Any) -> None:
        if self.kind == "list":
            sep = "\n" if self.item is str else ", "
            self.widget.value = sep.join(f"{v:g}" if isinstance(v, float) else str(v) for v in (value or []))
        elif isinstance(self.widget.value, str) and not isinstance(value, str):
            self.widget.value = "" if value is None else (f"{value:g}" if isinstance(value, float) else str(value))
        else:
            self.widget.value = value

    def get(self) -> Any:
        """The field's value from the widget; ConfigError naming the field when the text is not a value."""
        value = self.widget.value
        if self.kind == "list":
            parts = [p.strip() for p in re.split(r"\n" if self.item is str else r"[,\n]", value) if p.strip()]
            if self.item is str:
                return parts
            try:
                return [self.item(p) for p in parts]
            except ValueError:
                raise ConfigError(f"{self.name} must be a comma-separated list of numbers, got {value!r}") from None
        if not isinstance(value, str) or self.kind in ("str", "choice"):
            return None if self.optional and value == "" else value
        value = value.strip()  # an optional number typed as text
        if value == "":
            return None
        try:
            return int(value) if self.kind == "int" else float(value)
        except ValueError:
            word = "an integer" if self.kind == "int" else "a number"
            raise ConfigError(f"{self.name} must be {word} or empty (unset), got {value!r}") from None


CUSTOM = "custom"   # the preset picker's label when the values match no preset


def _escape(text: str) -> str:
    return html.escape(text, quote=False)


class ConfigForm:
    """A form for config dataclass `cls`: `.show()`, `.value()` (the validated dataclass), `.save(path)`."""

    def __init__(self, cls: type, value: Any = None, *, groups: dict[str, list[str]] | None = None,
                 presets: dict[str, Callable[[], dict[str, Any]]] | None = None, preset: str | None = None,
                 title: str = "", **overrides: Any):
        import ipywidgets as W

        self.cls = cls
        hints = get_type_hints(cls)
        helps = field_help(cls)
        self.fields = {f.name: _Field(cls, f, hints[f.name], helps.get(f.name, "")) for f in dataclasses.fields(cls)}
        self.presets = presets or {}
        self.status = W.HTML()
        self.saved_to = W.HTML()
        groups = dict(groups or {})
        placed = {n for names in groups.values() for n in names}
        rest = [n for n in self.fields if n not in placed]
        if rest:
            groups["Advanced"] = rest
        boxes = [W.VBox([self.fields[n].row() for n in names if n in self.fields]) for names in groups.values()]
        self.accordion = W.Accordion(children=boxes, titles=tuple(groups))
        self.accordion.selected_index = 0
        header = [W.HTML(f"<b>{_escape(title)}</b>")] if title else []
        self.preset_picker = None
        self._applying = False
        if self.presets:
            self.preset_picker = W.Dropdown(options=[*self.presets, CUSTOM], value=CUSTOM, description="preset",
                                            style={"description_width": "200px"}, layout=W.Layout(width="560px"))
            self.preset_picker.observe(self._picked, names="value")
            header.append(self.preset_picker)
        self.widget = W.VBox(header + [self.accordion, self.status, self.saved_to])
        self.set_value(value)
        if preset:
            self.apply_preset(preset)
        if overrides:
            self.set_value(overrides)
        for fld in self.fields.values():
            fld.widget.observe(lambda change: self._changed(), names="value")
        self._changed()

    # -- presets -----------------------------------------------------------------------------
    def _picked(self, change: dict) -> None:
        if change["new"] != CUSTOM and not self._applying:
            self.apply_preset(change["new"])

    def _changed(self) -> None:
        self.check()
        if self.preset_picker is not None and not self._applying:
            self._applying = True   # relabelling the picker must not apply a preset
            try:
                self.preset_picker.value = self.matching_preset()
            finally:
                self._applying = False

    def matching_preset(self) -> str:
        """The preset whose values the form holds now (the picked one first), or "custom" when none does:
        the picker never names a preset whose values are not the ones below it."""
        try:
            raw = self.raw()
        except ConfigError:
            return CUSTOM
        picked = self.preset_picker.value if self.preset_picker is not None else CUSTOM
        for name in sorted(self.presets, key=lambda n: n != picked):
            if all(raw.get(k) == v for k, v in self.presets[name]().items()):
                return name
        return CUSTOM

    # -- values ------------------------------------------------------------------------------
    def set_value(self, value: Any) -> None:
        """Fill the widgets from a config object, a dict of some fields, or None (the dataclass defaults)."""
        if value is None:
            value = self.cls()  # every config class has valid defaults
        if dataclasses.is_dataclass(value):
            value = dataclasses.asdict(value)
        unknown = sorted(set(value) - set(self.fields))
        if unknown:
            raise ConfigError(f"{self.cls.__name__} has no setting(s): {', '.join(unknown)}")
        for name, v in value.items():
            self.fields[name].set(v)

    def apply_preset(self, name: str) -> None:
        """Set the preset's fields (the others keep their values)."""
        if name not in self.presets:
            raise KeyError(f"no preset {name!r}; presets: {', '.join(self.presets)}")
        self._applying = True
        try:
            self.set_value(self.presets[name]())
            if self.preset_picker is not None:
                self.preset_picker.value = name
        finally:
            self._applying = False
        self.check()

    def raw(self) -> dict[str, Any]:
        """The widgets' values as field values (not validated)."""
        return {name: fld.get() for name, fld in self.fields.items()}

    def value(self) -> Any:
        """The config dataclass; ConfigError (naming the field) when a value is bad."""
        return self.cls(**self.raw())

    def check(self) -> Any | None:
        """Validate and show the result under the form: the config, or None with the error shown."""
        try:
            cfg = self.value()
        except ConfigError as e:
            self.status.value = f"<span style='color:#b00020'>&#10007; {_escape(str(e))}</span>"
            return None
        self.status.value = "<span style='color:#1b7f3b'>&#10003; settings are valid</span>"
        return cfg

    # -- files -------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Any:
        """Validate, write the settings as TOML (the CLI's `--config` reads it) and return the config."""
        cfg = self.value()
        written = save_config(cfg, path)
        self.saved_to.value = f"saved to <code>{_escape(str(written))}</code>"
        return cfg

    def load(self, path: str | Path) -> Any:
        """Fill the form from a TOML file written by `save` (or by a training run)."""
        cfg = load_config(path, self.cls)
        self.set_value(cfg)
        return cfg

    def summary(self) -> str:
        """The settings as plain text: the preset and every value that differs from the dataclass default."""
        try:
            raw = self.raw()
        except ConfigError as e:
            return f"settings not valid: {e}"
        defaults = dataclasses.asdict(self.cls())
        lines = [f"preset: {self.preset_picker.value}"] if self.preset_picker is not None else []
        lines += [f"{k} = {v!r}" for k, v in raw.items() if v != defaults.get(k)]
        return "\n".join(lines) or "all settings at their defaults"

    def show(self) -> None:
        """Display the form, and under it its settings as text (what a page read offline still shows)."""
        from IPython.display import display

        display(self.widget)
        print(self.summary())

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)


# --- the forms the notebooks use ---------------------------------------------------------------

def train_presets() -> dict[str, Callable[[], dict[str, Any]]]:
    from .presets import PRESETS, preset_values

    return {name: (lambda name=name: preset_values(name)) for name in PRESETS}


def train_form(value: TrainConfig | None = None, *, preset: str | None = None, **overrides: Any) -> ConfigForm:
    """The training settings (03_train_lora): presets for SD 1.5 / SDXL on a T4 or A100, and the toy model."""
    return ConfigForm(TrainConfig, value, groups=TRAIN_GROUPS, presets=train_presets(), preset=preset,
                      title="Training settings", **overrides)


PREPARE_PRESETS: dict[str, dict[str, Any]] = {
    "SD 1.5 (512)": {"resolution": 512, "min_bucket_reso": 256, "max_bucket_reso": 1024, "bucket_reso_steps": 64},
    "SDXL (1024)": {"resolution": 1024, "min_bucket_reso": 512, "max_bucket_reso": 2048, "bucket_reso_steps": 64},
    "Toy (32 px)": {"resolution": 32, "min_bucket_reso": 16, "max_bucket_reso": 64, "bucket_reso_steps": 8},
}


def prepare_form(value=None, *, preset: str | None = None, **overrides: Any) -> ConfigForm:
    """The dataset preparation settings (01_dataset)."""
    from ..config import PrepareConfig

    groups = {"Folders": ["source", "output_dir"],
              "Size and crop": ["resolution", "crop", "min_size", "allow_upscale", "background"],
              "Faces and masks": ["detect_faces", "face_margin", "min_face_coverage", "masks", "mask_prompt",
                                  "mask_model", "mask_threshold"],
              "Duplicates": ["near_dup_threshold", "clip_model", "clip_threshold"],
              "Buckets": ["min_bucket_reso", "max_bucket_reso", "bucket_reso_steps"]}
    presets = {name: (lambda v=v: dict(v)) for name, v in PREPARE_PRESETS.items()}
    return ConfigForm(PrepareConfig, value, groups=groups, presets=presets, preset=preset,
                      title="Dataset preparation", **overrides)


def tag_form(value: TagConfig | None = None, *, preset: str | None = None, **overrides: Any) -> ConfigForm:
    """The captioning and tag-editing settings (02_tagging)."""
    groups = {"Captioner": ["captioner", "model", "mode", "task", "batch_size"],
              "VLM prompt (Qwen2.5-VL, JoyCaption)": ["prompt", "caption_template", "caption_length", "vlm_tags",
                                                      "quantize", "max_new_tokens"],
              "WD14": ["general_threshold", "character_threshold", "blacklist"],
              "Edits": ["trigger", "class_word", "remove", "replace", "dedupe", "sort", "max_tags", "keep_tokens"]}
    presets = {"photos: JoyCaption (4-bit on a T4)": lambda: {"captioner": "joycaption", "task": None},
               "photos: Qwen2.5-VL 3B": lambda: {"captioner": "qwen2_5_vl", "task": None},
               "photos: Florence-2 sentences": lambda: {"captioner": "florence2", "task": "<DETAILED_CAPTION>"},
               "photos: BLIP sentences": lambda: {"captioner": "blip", "task": None},
               "anime/illustration: WD14 tags": lambda: {"captioner": "wd14", "task": None, "dedupe": True},
               "keep my captions": lambda: {"captioner": "none", "task": None}}
    return ConfigForm(TagConfig, value, groups=groups, presets=presets, preset=preset, title="Captions and tags",
                      **overrides)


def generate_form(value: GenerateConfig | None = None, **overrides: Any) -> ConfigForm:
    """The generation settings (04_inference)."""
    return ConfigForm(GenerateConfig, value, groups=GENERATE_GROUPS, title="Generation settings", **overrides)


def eval_form(value: EvalConfig | None = None, **overrides: Any) -> ConfigForm:
    """The evaluation settings (05_eval)."""
    return ConfigForm(EvalConfig, value, groups=EVAL_GROUPS, title="Evaluation settings", **overrides)


# --- the caption editor (02_tagging) --------------------------------------------------------------

class CaptionEditor:
    """Edit captions image by image: a page of thumbnails, each with its caption in a text box, a filter
    (show captions containing a text), and Save, which writes the changed captions through
    `captions.write_captions` (so `captions.undo(folder)` restores the previous ones)."""

    def __init__(self, folder: str | Path, *, extension: str = ".txt", page_size: int = 12, thumb: int = 128):
        import ipywidgets as W

        from ..data.captions import load_captions

        self.folder = Path(folder)
        self.extension = extension
        self.page_size = page_size
        self.thumb = thumb
        self.captions = load_captions(self.folder, extension).texts()
        self.edited: dict[str, str] = {}
        self.page = 0
        self.filter = W.Text(description="filter", placeholder="show captions containing…",
                             layout=W.Layout(width="360px"))
        self.prev_button = W.Button(description="◀ previous", layout=W.Layout(width="110px"))
        self.next_button = W.Button(description="next ▶", layout=W.Layout(width="110px"))
        self.save_button = W.Button(description="save captions", button_style="primary", icon="save")
        self.status = W.HTML()
        self.grid = W.VBox()
        self.prev_button.on_click(lambda _b: self.turn(-1))
        self.next_button.on_click(lambda _b: self.turn(1))
        self.save_button.on_click(lambda _b: self.save())
        self.filter.observe(lambda _c: self.turn(0, reset=True), names="value")
        self.widget = W.VBox([W.HBox([self.filter, self.prev_button, self.next_button, self.save_button]),
                              self.status, self.grid])
        self.render()

    def visible(self) -> list[str]:
        """The images whose (edited) caption contains the filter text."""
        needle = self.filter.value.strip().lower()
        return [n for n in self.captions if needle in self.text(n).lower()]

    def text(self, name: str) -> str:
        return self.edited.get(name, self.captions[name])

    def set_caption(self, name: str, text: str) -> None:
        """Change one caption (kept until `save`)."""
        if name not in self.captions:
            raise KeyError(f"no image {name!r} in {self.folder}")
        if text.strip() == self.captions[name]:
            self.edited.pop(name, None)
        else:
            self.edited[name] = text.strip()
        self._update_status()

    def turn(self, delta: int, reset: bool = False) -> None:
        pages = max(1, -(-len(self.visible()) // self.page_size))
        self.page = 0 if reset else min(max(0, self.page + delta), pages - 1)
        self.render()

    def _thumb_png(self, name: str) -> bytes:
        from PIL import Image

        from ..drawing import fit_thumbnail

        with Image.open(self.folder / name) as im:
            buf = io.BytesIO()
            fit_thumbnail(im.convert("RGB"), self.thumb).save(buf, format="PNG")
        return buf.getvalue()

    def render(self) -> None:
        import ipywidgets as W

        names = self.visible()[self.page * self.page_size:(self.page + 1) * self.page_size]
        rows = []
        for name in names:
            box = W.Textarea(value=self.text(name), layout=W.Layout(width="520px", height="80px"))
            box.observe(lambda change, name=name: self.set_caption(name, change["new"]), names="value")
            rows.append(W.HBox([W.Image(value=self._thumb_png(name), format="png",
                                        layout=W.Layout(width=f"{self.thumb}px")),
                                W.VBox([W.HTML(f"<code>{_escape(name)}</code>"), box])]))
        self.grid.children = rows
        self._update_status()

    def _update_status(self) -> None:
        self.status.value = f"{self.counts()} &middot; <b>{len(self.edited)}</b> unsaved edit(s)"

    def counts(self) -> str:
        """What the page shows: 'images 1-12 of 24 · page 1 of 2' (with a filter: 'of 20 matching "x" (24 in all)')."""
        n = len(self.visible())
        pages = max(1, -(-n // self.page_size))
        first = self.page * self.page_size
        shown = f"images {first + 1}–{min(n, first + self.page_size)} of {n}" if n else "no images"
        needle = self.filter.value.strip()
        if needle:
            shown += f" matching {_escape(repr(needle))} ({len(self.captions)} in all)"
        return f"{shown} &middot; page {self.page + 1} of {pages}"

    def save(self) -> Path | None:
        """Write the edited captions (undoable); returns the history entry, or None when nothing changed."""
        from ..data.captions import write_captions

        if not self.edited:
            self.status.value += " &middot; nothing to save"
            return None
        entry = write_captions(self.folder, dict(self.edited), extension=self.extension, note="caption editor")
        self.captions.update(self.edited)
        self.edited.clear()
        self._update_status()
        self.status.value += f" &middot; saved (undo: <code>captions.undo({str(self.folder)!r})</code>)"
        return entry

    def show(self) -> None:
        from IPython.display import display

        display(self.widget)


def caption_editor(folder: str | Path, **options: Any) -> CaptionEditor:
    """The caption editor for a prepared folder (02_tagging)."""
    return CaptionEditor(folder, **options)
