"""Settings for every job as dataclasses: validated on construction, saved to and loaded from TOML.

The CLI, the notebook widgets and the notebooks all build these same objects, and the TOML is
written next to every output so a run can be reproduced from it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, get_args, get_origin, get_type_hints

import tomli_w

CONFIG_VERSION = 1


def setting(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = dataclasses.MISSING,
            flag: str | None = None) -> Any:
    """A config field with its help text (the CLI's --help, the forms' tooltips) in the field's metadata.
    `flag` names the CLI flag when it differs from the field (`--lora` for `loras`, repeatable)."""
    metadata = {"help": help} | ({"flag": flag} if flag else {})
    return field(default=default, default_factory=factory, metadata=metadata)


def field_help(cls: type) -> dict[str, str]:
    """{field name: help text} of a config dataclass."""
    return {f.name: f.metadata.get("help", "") for f in fields(cls)}


class ConfigError(ValueError):
    """A setting has a bad value; the message names the field and what is allowed."""


# --- small validators: each raises ConfigError naming the field -----------------------------

def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _non_negative_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")


def _number_in(name: str, value: Any, low: float, high: float, *, low_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise ConfigError(f"{name} must be a number in {bracket}{low}, {high}], got {value!r}")


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}")


def _multiple_of(name: str, value: int, step: int) -> None:
    if value % step:
        raise ConfigError(f"{name} must be a multiple of {step}, got {value}")


FAMILIES = ("auto", "sd1", "sd2", "sdxl")
PREDICTION_TYPES = ("auto", "epsilon", "v_prediction")
METHODS = ("lora", "dreambooth", "textual_inversion")
TARGET_PRESETS = ("attention", "full")
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy")
SCHEDULERS = ("constant", "cosine", "cosine_with_restarts", "linear", "polynomial")
LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
LOG_WITH = ("none", "tensorboard")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
MIXED_PRECISIONS = ("auto", "no", "fp16", "bf16")
SAVE_PRECISIONS = ("fp16", "bf16", "float")
SAVE_FORMATS = ("kohya", "diffusers", "both")
ATTENTION = ("sdpa", "xformers")
NAN_POLICIES = ("stop", "skip")
COMPILE_BACKENDS = ("inductor", "cudagraphs", "aot_eager")  # torch.compile backends (aot_eager: no codegen)
NETWORKS = ("lora", "locon", "loha", "lokr", "dora")   # locon: LoRA on the ResNet blocks' 3x3 convolutions too
# (sd-scripts' conv_dim); loha, lokr: LyCORIS' Hadamard- and Kronecker-product networks; dora: LoRA with a trained
# magnitude per weight column (LyCORIS' dora_wd); loha, lokr and dora train the ResNet blocks too with conv_dim
# The closed choices of each config class, by field: validation and the notebook widgets' dropdowns.
TRAIN_CHOICES: dict[str, tuple[str, ...]] = {
    "family": FAMILIES, "prediction_type": PREDICTION_TYPES, "method": METHODS, "target": TARGET_PRESETS,
    "optimizer": OPTIMIZERS, "lr_scheduler": SCHEDULERS, "mixed_precision": MIXED_PRECISIONS,
    "loss_type": LOSS_TYPES, "huber_schedule": HUBER_SCHEDULES, "log_with": LOG_WITH,
    "save_precision": SAVE_PRECISIONS, "save_format": SAVE_FORMATS, "attention": ATTENTION,
    "nan_policy": NAN_POLICIES, "compile_backend": COMPILE_BACKENDS, "network": NETWORKS,
}


class ConfigBase:
    """What every settings dataclass shares: validated on construction, copied with changes, dumped as a dict.
    Subclasses define `validate()` and may list closed choices per field in CHOICES (the widgets' dropdowns)."""

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {}

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        raise NotImplementedError

    def replace(self, **changes: Any):
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainConfig(ConfigBase):
    """Every setting of a LoRA training run. Field names follow kohya sd-scripts where one exists."""

    # --- base model ---
    pretrained_model: str = setting("", "hub id, local diffusers folder, or a single .safetensors file")
    model_config: str | None = setting(None, "local diffusers folder giving configs for a single-file model (offline)")
    vae: str | None = setting(None, "replacement VAE (e.g. an fp16-safe SDXL VAE)")
    family: str = setting("auto", "auto | sd1 | sd2 | sdxl")
    prediction_type: str = setting("auto", "auto (from the model) | epsilon | v_prediction")
    clip_skip: int = setting(1, "A1111 meaning: 1 = last text-encoder layer, 2 = penultimate")
    max_token_length: int = setting(75, "75 | 150 | 225: caption tokens the text encoder sees, in 75-token "
                                        "chunks as sd-scripts encodes them (long WD14 captions: 225)")

    # --- data ---
    train_data_dir: str = setting("", "images with .txt captions; kohya \"N_name\" subfolders give N repeats")
    caption_extension: str = setting(".txt", "caption files beside the images")
    reg_data_dir: str | None = setting(None,
                                       "regularization (class) images: prior preservation, weighted by "
                                       "prior_loss_weight")
    resolution: int = setting(512, "training size in px: 512 SD 1.5, 768 SD 2, 1024 SDXL")
    enable_bucket: bool = setting(True, "aspect-ratio buckets (no cropping to squares)")
    min_bucket_reso: int = setting(256, "smallest bucket side in px")
    max_bucket_reso: int = setting(1024, "largest bucket side in px")
    bucket_reso_steps: int = setting(64, "bucket sides are multiples of this (64: SDXL-safe)")
    bucket_no_upscale: bool = setting(True, "small images get a smaller bucket instead of being upscaled")
    repeats: int = setting(1, "for images not inside an \"N_name\" folder")
    flip_aug: bool = setting(False,
                             "random horizontal flips (not for asymmetric subjects: text, logos)")
    shuffle_caption: bool = setting(False, "shuffle comma-separated tags each step (after keep_tokens)")
    keep_tokens: int = setting(0, "leading comma-separated tags kept in place (the trigger word)")
    caption_dropout_rate: float = setting(0.0, "whole caption dropped -> unconditional sample")
    caption_tag_dropout_rate: float = setting(0.0, "each tag dropped with this probability (keep_tokens stay)")
    cache_latents: bool = setting(True, "encode every image once with the VAE (faster; flips are cached too)")
    cache_latents_to_disk: bool = setting(False, "keep the latent cache in output_dir/latent_cache for the next run")
    max_data_loader_n_workers: int | None = setting(None, "processes that decode images while the GPU trains "
                                                    "(sd-scripts' name); None: up to 2 on a GPU when images are "
                                                    "decoded every step and an epoch has 8+ batches, else 0")
    masked_loss: bool = setting(False, "the loss counts only the masked pixels (white in the mask; a face or a "
                                       "product without its background)")
    alpha_mask: bool = setting(False, "masks from the images' transparency (alpha channel)")
    mask_dir: str | None = setting(None, "mask images named as the training images (default: "
                                         "<train_data_dir>/_masks)")
    cache_text_encoder_outputs: bool = setting(False, "encode every caption once, then move the frozen text "
                                                      "encoders off the GPU (no tag shuffle or tag dropout; "
                                                      "whole-caption dropout is fine)")
    cache_text_encoder_outputs_to_disk: bool = setting(False, "keep the text cache in output_dir/text_cache")

    # --- method ---
    method: str = setting("lora", "lora | dreambooth (full fine-tune) | textual_inversion")
    token_string: str = setting("", "new token to learn (textual_inversion; with lora: pivotal tuning)")
    embedding_file: bool = setting(False, "pivotal tuning: also write the token's vectors as <name>_emb (they are "
                                          "always inside the LoRA file, where A1111 reads them)")
    init_word: str = setting("", "existing word the new token's vectors start from")
    num_vectors_per_token: int = setting(1, "vectors the new token gets (more: more capacity, needs more steps)")
    embedding_lr: float | None = setting(None, "learning rate of the new token's vectors (defaults to learning_rate)")
    class_prompt: str = setting("", "DreamBooth prior preservation: the class (\"a photo of a flower\")")
    num_class_images: int = setting(0, "generate class images with the base model until reg_data_dir has this many")

    # --- network (lora) ---
    network: str = setting("lora", "lora | locon (also the ResNet blocks: their 3x3 convolutions at conv_dim) | "
                                   "loha (LyCORIS: two rank-r products multiplied) | lokr (LyCORIS: a Kronecker "
                                   "product) | dora (LoRA with a trained magnitude per weight column, LyCORIS' "
                                   "dora_wd); loha, lokr and dora train the ResNet blocks too with conv_dim")
    rank: int = setting(16, "kohya: network_dim")
    alpha: float = setting(16.0, "kohya: network_alpha; the LoRA scale is alpha / rank")
    lora_dropout: float = setting(0.0, "dropout on the LoRA layers' input")
    block_dims: list[int] = setting(factory=list, help="rank per UNet block, kohya's order IN00.., MID, OUT.. (25 "
                                                       "values for SD 1.5, 19 for SDXL; 0 leaves a block out)")
    block_alphas: list[float] = setting(factory=list, help="alpha per UNet block, in block_dims' order")
    conv_block_dims: list[int] = setting(factory=list, help="rank of the 3x3 convolutions per UNet block, in "
                                                         "block_dims' order (kohya's conv_block_dims; 0 leaves a "
                                                         "block's convolutions out)")
    conv_block_alphas: list[float] = setting(factory=list, help="alpha of the 3x3 convolutions per UNet block")
    conv_dim: int | None = setting(None, "locon, loha, lokr, dora: rank of the 3x3 convolutions (kohya: conv_dim); "
                                         "None: rank (locon), no convolutions (the others)")
    conv_alpha: float | None = setting(None, "locon, loha, lokr, dora: their alpha (kohya: conv_alpha); None: alpha")
    factor: int = setting(-1, "lokr: LyCORIS' factor, how each side of a weight is split (-1: as square as "
                              "possible; 8: one factor of 8 or less)")
    layer_filter: list[str] = setting(factory=list, help="train only target modules whose name contains one of "
                                                         "these (e.g. attn2, ff); empty: all")
    layer_filter_regex: bool = setting(False, "layer_filter entries are regular expressions")
    target: str = setting("attention", "attention (q,k,v,out) | full (sd-scripts' default set)")
    train_text_encoder: bool = setting(False,
                                       "LoRA (or DreamBooth weights) on the text encoder(s) too, at text_encoder_lr")

    # --- optimisation ---
    optimizer: str = setting("adamw", "adamw | adamw8bit (bitsandbytes: less memory) | prodigy (its own step size)")
    learning_rate: float = setting(1e-4, "UNet learning rate")
    text_encoder_lr: float | None = setting(None, "defaults to learning_rate")
    weight_decay: float = setting(1e-2, "AdamW weight decay (not on new token vectors)")
    adam_beta1: float = setting(0.9, "Adam's first-moment decay")
    adam_beta2: float = setting(0.999, "Adam's second-moment decay")
    adam_epsilon: float = setting(1e-8, "Adam's denominator epsilon")
    lr_scheduler: str = setting("constant", "the learning rate after the warmup: constant | cosine | "
                                            "cosine_with_restarts | linear | polynomial")
    lr_warmup_steps: int = setting(0, "steps of linear warmup from 0")
    lr_num_cycles: int = setting(1, "cosine_with_restarts")
    lr_power: float = setting(1.0, "polynomial")
    max_grad_norm: float = setting(1.0, "0 disables clipping")
    train_batch_size: int = setting(1, "images per step (per GPU)")
    gradient_accumulation_steps: int = setting(1,
                                               "batches summed into one optimizer step (a larger batch in the same "
                                               "memory)")
    max_train_steps: int = setting(1600, "optimizer steps to train")
    max_train_epochs: int | None = setting(None, "when set, overrides max_train_steps")
    mixed_precision: str = setting("auto", "auto: fp16 on T4-class GPUs, bf16 on Ampere+, no on CPU")
    gradient_checkpointing: bool = setting(False,
                                           "recompute activations in backward: much less memory, about 20% slower")
    attention: str = setting("sdpa", "attention kernel: sdpa (PyTorch) | xformers")
    channels_last: bool = setting(False, "UNet convolutions in channels-last layout (often faster on tensor cores)")
    torch_compile: bool = setting(False, "torch.compile the UNet: a slow first step, then faster (fixed shapes)")
    compile_backend: str = setting("inductor", "torch.compile backend (inductor generates fused kernels)")
    min_snr_gamma: float | None = setting(None, "5.0 is the paper's value")
    noise_offset: float = setting(0.0, "extra per-channel noise (0.05-0.1 helps very dark and very bright images)")
    noise_offset_random_strength: bool = setting(False, "each step's offset drawn in [0, noise_offset)")
    multires_noise_iterations: int = setting(0, "pyramid (multi-resolution) noise levels; 6-10 typical, 0: off")
    multires_noise_discount: float = setting(0.3, "weight of each coarser pyramid level (0.3 typical)")
    ip_noise_gamma: float = setting(0.0, "input perturbation noise (0.1 typical; 0: off)")
    ip_noise_gamma_random_strength: bool = setting(False, "each step's perturbation drawn in [0, ip_noise_gamma)")
    min_timestep: int = setting(0, "lowest timestep trained (0-999)")
    max_timestep: int | None = setting(None, "timesteps below this are trained (None: all, 1000)")
    loss_type: str = setting("l2", "l2 | l1 | huber | smooth_l1 (huber: robust to outlier pixels)")
    huber_schedule: str = setting("snr", "constant | exponential | snr: how huber_c changes with the timestep")
    huber_c: float = setting(0.1, "the huber / smooth_l1 threshold")
    huber_scale: float = setting(1.0, "scale of huber_c in the constant and exponential schedules")
    debiased_estimation_loss: bool = setting(False, "weight the loss by 1/sqrt(SNR) (v-prediction: 1/(SNR+1))")
    scale_v_pred_loss_like_noise_pred: bool = setting(False, "v-prediction: weight by SNR/(SNR+1), as epsilon's")
    zero_terminal_snr: bool = setting(False, "rescale the noise schedule to reach pure noise (needs v-prediction)")
    prior_loss_weight: float = setting(1.0, "loss weight of the class (regularization) images")
    loraplus_lr_ratio: float | None = setting(None, "LoRA+: the B (up) matrices learn this many times faster "
                                                    "(16 is the paper's value; None: off)")
    ema_decay: float | None = setting(None, "keep an EMA of the trained weights (0.999 typical; None: off): saved "
                                            "as <name>_ema beside the LoRA, used for the samples")
    ema_warmup: bool = setting(True, "EMA decay ramps up as (1+step)/(10+step): early steps are not frozen in")
    seed: int = setting(42, "one seed for data order, noise and LoRA init: the same seed gives the same run")

    # --- outputs ---
    output_dir: str = setting("outputs", "where the LoRA, its config, log, samples and states go")
    output_name: str = setting("lora", "file name of the LoRA (and prefix of intermediate saves)")
    save_every_n_steps: int | None = setting(None, "also save the LoRA every N steps (name-stepNNNNNN)")
    save_every_n_epochs: int | None = setting(None, "also save the LoRA every N epochs (name-NNNNNN)")
    save_last_n: int | None = setting(None, "keep only the newest N intermediate saves")
    save_format: str = setting("kohya",
                               "kohya: one .safetensors (LoRA, or DreamBooth single-file checkpoint) | diffusers | "
                               "both")
    save_precision: str = setting("fp16", "dtype of the saved weights: fp16 | bf16 | float")
    log_every_n_steps: int = setting(10, "loss values are logged at these steps (a finite-check syncs every step)")

    # --- resume and failures ---
    save_state_every_n_steps: int | None = setting(None, "full training state (to resume) under output_dir/states/")
    save_state_last_n: int = setting(2, "states kept (older ones deleted)")
    resume: str | None = setting(None,
                                 "\"latest\" = newest state in output_dir (fresh start if none), or a state folder")
    nan_policy: str = setting("stop", "NaN/inf loss: stop with advice, or skip the step (stops after 5 in a row)")

    log_with: str = setting("none", "none | tensorboard: the log's records also go to TensorBoard (the CSV "
                                    "log is always written)")
    logging_dir: str | None = setting(None, "TensorBoard's folder (default: output_dir/logs)")

    # --- samples and validation during training ---
    sample_every_n_steps: int | None = setting(None, "render sample_prompts every N steps into output_dir/samples")
    sample_prompts: list[str] = setting(factory=list, help="prompts of the samples during training")
    sample_negative_prompt: str = setting("", "negative prompt of the samples")
    sample_seed: int = setting(1234, "seed of the first sample prompt (the next ones count up)")
    sample_steps: int = setting(20, "sampler steps of each sample")
    sample_cfg: float = setting(7.0, "CFG scale of the samples")
    sample_sampler: str = setting("Euler a", "A1111 sampler name of the samples")
    validation_every_n_steps: int | None = setting(None, "fixed-noise loss every N steps (with a held-out set: "
                                                         "every log by default)")
    validation_images: int = setting(4, "images the validation loss uses (held-out ones when there are)")
    validation_split: float = setting(0.0, "share of the training images held out for the validation loss, never "
                                           "trained on (0.1 = one in ten)")
    validation_data_dir: str | None = setting(None, "images with captions for the validation loss, never trained on")

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = TRAIN_CHOICES

    def text_cache_refusals(self) -> list[str]:
        """The settings that make a caption's encoding change during the run, so it cannot be cached."""
        out = [name for name in ("shuffle_caption", "caption_tag_dropout_rate", "train_text_encoder")
               if getattr(self, name)]   # a wholly dropped caption is "", cached like any other
        if self.method == "textual_inversion" or self.token_string:
            out.append(f"method={self.method} (new token vectors)")
        return out

    @property
    def tensorboard_dir(self) -> Path:
        """Where TensorBoard's event files go: logging_dir, else output_dir/logs."""
        return Path(self.logging_dir) if self.logging_dir else Path(self.output_dir) / "logs"

    @property
    def trains_convs(self) -> bool:
        """Whether the network trains the ResNet blocks' 3x3 convolutions: locon always; loha, lokr and dora with
        conv_dim."""
        return self.network == "locon" or (self.network in ("loha", "lokr", "dora") and bool(self.conv_dim))

    @property
    def held_out(self) -> bool:
        """Whether the validation loss runs on images the run never trains on."""
        return bool(self.validation_split or self.validation_data_dir)

    @property
    def validation_interval(self) -> int | None:
        """Steps between validation losses: validation_every_n_steps, else with every log when held out."""
        return self.validation_every_n_steps or (self.log_every_n_steps if self.held_out else None)

    # -- validation ------------------------------------------------------------------------
    def validate(self) -> None:
        """Check every field; raise ConfigError naming the first bad one."""
        _check_types(self)
        for name, allowed in self.CHOICES.items():
            _choice(name, getattr(self, name), allowed)
        _number_in("clip_skip", self.clip_skip, 1, 12)
        _positive_int("clip_skip", self.clip_skip)
        if self.max_token_length not in (75, 150, 225):
            raise ConfigError(f"max_token_length must be 75, 150 or 225 (tokens; 1-3 chunks of 75), got "
                              f"{self.max_token_length!r}")
        for name in ("resolution", "min_bucket_reso", "max_bucket_reso"):
            _positive_int(name, getattr(self, name))
        _positive_int("bucket_reso_steps", self.bucket_reso_steps)
        _multiple_of("resolution", self.resolution, 8)
        _multiple_of("bucket_reso_steps", self.bucket_reso_steps, 8)
        if self.min_bucket_reso > self.max_bucket_reso:
            raise ConfigError(f"min_bucket_reso ({self.min_bucket_reso}) must not exceed "
                              f"max_bucket_reso ({self.max_bucket_reso})")
        _positive_int("repeats", self.repeats)
        _non_negative_int("keep_tokens", self.keep_tokens)
        _number_in("caption_dropout_rate", self.caption_dropout_rate, 0.0, 1.0)
        _number_in("caption_tag_dropout_rate", self.caption_tag_dropout_rate, 0.0, 1.0)
        if self.caption_extension and not self.caption_extension.startswith("."):
            raise ConfigError(f"caption_extension must start with '.', got {self.caption_extension!r}")
        _positive_int("num_vectors_per_token", self.num_vectors_per_token)
        _non_negative_int("num_class_images", self.num_class_images)
        if self.embedding_lr is not None:
            _number_in("embedding_lr", self.embedding_lr, 0.0, 10.0, low_open=True)
        if self.token_string and any(c.isspace() for c in self.token_string):
            raise ConfigError(f"token_string must be one word without spaces, got {self.token_string!r}")
        if self.method == "textual_inversion":
            if not self.token_string:
                raise ConfigError("token_string must be set for textual_inversion: the new word to learn, e.g. '<sks>'")
            if self.train_text_encoder:
                raise ConfigError("train_text_encoder must be false for textual_inversion (only the new token's "
                                  "vectors are trained)")
        if self.method == "dreambooth" and self.token_string:
            raise ConfigError("token_string works with method 'textual_inversion' or 'lora' (pivotal tuning); "
                              "DreamBooth learns a rare existing word (e.g. 'sks') instead")
        if self.num_class_images and not self.class_prompt:
            raise ConfigError("class_prompt must be set when num_class_images > 0 (the prompt class images are "
                              "generated from, e.g. 'a photo of a flower')")
        _positive_int("rank", self.rank)
        _number_in("alpha", self.alpha, 0.0, 1e6, low_open=True)
        _number_in("lora_dropout", self.lora_dropout, 0.0, 1.0)
        if self.lora_dropout == 1.0:
            raise ConfigError("lora_dropout must be below 1.0 (1.0 drops every input), got 1.0")
        _number_in("learning_rate", self.learning_rate, 0.0, 10.0, low_open=True)
        if self.text_encoder_lr is not None:
            _number_in("text_encoder_lr", self.text_encoder_lr, 0.0, 10.0)
        _number_in("weight_decay", self.weight_decay, 0.0, 10.0)
        _number_in("adam_beta1", self.adam_beta1, 0.0, 1.0)
        _number_in("adam_beta2", self.adam_beta2, 0.0, 1.0)
        _number_in("adam_epsilon", self.adam_epsilon, 0.0, 1.0, low_open=True)
        _non_negative_int("lr_warmup_steps", self.lr_warmup_steps)
        _positive_int("lr_num_cycles", self.lr_num_cycles)
        _number_in("lr_power", self.lr_power, 0.0, 100.0, low_open=True)
        _number_in("max_grad_norm", self.max_grad_norm, 0.0, 1e6)
        _positive_int("train_batch_size", self.train_batch_size)
        _positive_int("gradient_accumulation_steps", self.gradient_accumulation_steps)
        _positive_int("max_train_steps", self.max_train_steps)
        if self.max_train_epochs is not None:
            _positive_int("max_train_epochs", self.max_train_epochs)
        if self.min_snr_gamma is not None:
            _number_in("min_snr_gamma", self.min_snr_gamma, 0.0, 1000.0, low_open=True)
        _number_in("noise_offset", self.noise_offset, 0.0, 1.0)
        _non_negative_int("multires_noise_iterations", self.multires_noise_iterations)
        _number_in("multires_noise_discount", self.multires_noise_discount, 0.0, 1.0)
        _number_in("ip_noise_gamma", self.ip_noise_gamma, 0.0, 1.0)
        _number_in("min_timestep", self.min_timestep, 0, 999)
        if self.max_timestep is not None:
            _number_in("max_timestep", self.max_timestep, 1, 1000)
            if self.max_timestep <= self.min_timestep:
                raise ConfigError(f"max_timestep ({self.max_timestep}) must be above min_timestep "
                                  f"({self.min_timestep})")
        _number_in("huber_c", self.huber_c, 0.0, 1.0, low_open=True)
        _number_in("huber_scale", self.huber_scale, 0.0, 100.0, low_open=True)
        if self.zero_terminal_snr and self.prediction_type == "epsilon":
            raise ConfigError("zero_terminal_snr needs prediction_type v_prediction: at the last timestep an "
                              "epsilon model sees pure noise and has nothing to predict it from")
        _number_in("prior_loss_weight", self.prior_loss_weight, 0.0, 100.0)
        if any(not isinstance(d, int) or d < 0 for d in self.block_dims):
            raise ConfigError(f"block_dims are ranks (whole numbers >= 0), got {self.block_dims}")
        if (self.block_dims or self.block_alphas or self.layer_filter) and self.method != "lora":
            raise ConfigError("block_dims, block_alphas and layer_filter shape a LoRA: use them with method lora")
        if self.network != "lora" and self.method != "lora":
            raise ConfigError(f"network={self.network!r} is a kind of LoRA: use it with method lora")
        if (self.conv_dim is not None or self.conv_alpha is not None) and self.network == "lora":
            raise ConfigError("conv_dim and conv_alpha size the 3x3 convolutions of network locon, loha, lokr or "
                              "dora; set network = \"locon\" (or leave them unset)")
        if self.factor != -1 and (self.network != "lokr" or self.factor < 1):
            raise ConfigError(f"factor splits the weights of network lokr: -1 or a whole number >= 1, with "
                              f"network = \"lokr\"; got factor={self.factor!r} for network {self.network!r}")
        if self.network in ("loha", "lokr", "dora") and self.save_format != "kohya":
            raise ConfigError(f"{self.network} files exist in the kohya/LyCORIS layout only (A1111, ComfyUI and "
                              "helpers read it): set save_format = \"kohya\"")
        if self.network in ("loha", "lokr"):
            if self.loraplus_lr_ratio:
                raise ConfigError(f"loraplus_lr_ratio speeds up LoRA's B matrices; {self.network} has none: "
                                  "leave loraplus_lr_ratio empty")
            if self.lora_dropout:
                raise ConfigError(f"lora_dropout drops LoRA's inputs; {self.network} (peft's) has no such dropout: "
                                  "set lora_dropout = 0")
        if any(not isinstance(d, int) or d < 0 for d in self.conv_block_dims):
            raise ConfigError(f"conv_block_dims are ranks (whole numbers >= 0), got {self.conv_block_dims}")
        if (self.conv_block_dims or self.conv_block_alphas) and not self.trains_convs:
            raise ConfigError("conv_block_dims and conv_block_alphas size the 3x3 convolutions per block: use them "
                              "with network locon (or loha, lokr, dora with conv_dim)")
        if self.max_data_loader_n_workers is not None and (not isinstance(self.max_data_loader_n_workers, int)
                                                           or self.max_data_loader_n_workers < 0):
            raise ConfigError(f"max_data_loader_n_workers must be a whole number >= 0 (or unset), got "
                              f"{self.max_data_loader_n_workers!r}")
        if self.conv_dim is not None and (not isinstance(self.conv_dim, int) or self.conv_dim < 1):
            raise ConfigError(f"conv_dim must be a whole number >= 1 (or unset: the rank), got {self.conv_dim!r}")
        if self.conv_alpha is not None:
            _number_in("conv_alpha", self.conv_alpha, 0.0, 100000.0, low_open=True)
        if self.loraplus_lr_ratio is not None:
            _number_in("loraplus_lr_ratio", self.loraplus_lr_ratio, 0.0, 1000.0, low_open=True)
            if self.method != "lora":
                raise ConfigError(f"loraplus_lr_ratio is for LoRA training (method lora), not {self.method}: "
                                  "leave loraplus_lr_ratio empty")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be a number in (0, 1), e.g. 0.999, or unset; got {self.ema_decay!r}")
        _non_negative_int("seed", self.seed)
        if not self.output_name or any(c in self.output_name for c in '/\\:*?"<>|'):
            raise ConfigError(f"output_name must be a plain file name (no path separators), got {self.output_name!r}")
        for name in ("save_every_n_steps", "save_every_n_epochs", "save_last_n",
                     "sample_every_n_steps", "validation_every_n_steps"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        _positive_int("log_every_n_steps", self.log_every_n_steps)
        if self.save_state_every_n_steps is not None:
            _positive_int("save_state_every_n_steps", self.save_state_every_n_steps)
        _positive_int("save_state_last_n", self.save_state_last_n)
        if self.resume is not None and not self.resume.strip():
            raise ConfigError("resume must be 'latest', a state folder, or unset; got an empty string")
        _positive_int("sample_steps", self.sample_steps)
        _number_in("sample_cfg", self.sample_cfg, 0.0, 100.0)
        _non_negative_int("sample_seed", self.sample_seed)
        _positive_int("validation_images", self.validation_images)
        _number_in("validation_split", self.validation_split, 0.0, 0.5)
        if self.cache_text_encoder_outputs and self.text_cache_refusals():
            raise ConfigError("cache_text_encoder_outputs needs captions that encode the same every step and "
                              f"frozen text encoders; turn off: {', '.join(self.text_cache_refusals())}")
        if self.validation_split and self.validation_data_dir:
            raise ConfigError("set validation_split or validation_data_dir, not both: the held-out images come "
                              "from one place")
        if self.sample_every_n_steps and not self.sample_prompts:
            raise ConfigError("sample_prompts must list at least one prompt when sample_every_n_steps is set")
        if self.lr_warmup_steps > self.max_train_steps and self.max_train_epochs is None:
            raise ConfigError(f"lr_warmup_steps ({self.lr_warmup_steps}) must not exceed "
                              f"max_train_steps ({self.max_train_steps})")

    # -- convenience -------------------------------------------------------------------------
    @property
    def te_lr(self) -> float:
        """The text encoder's learning rate (falls back to the UNet's)."""
        return self.learning_rate if self.text_encoder_lr is None else self.text_encoder_lr

    @property
    def emb_lr(self) -> float:
        """The new token vectors' learning rate (falls back to the UNet's)."""
        return self.learning_rate if self.embedding_lr is None else self.embedding_lr


def _sampler_names() -> tuple[str, ...]:
    from .sd.samplers import SAMPLERS  # torch only; the sampler table lives beside the code that uses it

    return tuple(SAMPLERS)


def parse_lora_spec(text: str) -> tuple[str, float]:
    """`path` or `path:weight` (the weight defaults to 1.0), the CLI's --lora syntax. A weight that is not a
    number raises ConfigError naming it (unless the whole text is an existing file with a colon in its name)."""
    path, sep, weight = text.rpartition(":")
    if sep and path and not (len(path) == 1 and path.isalpha()):  # keep C:\ paths whole
        try:
            value = float(weight)
        except ValueError:
            if "/" in weight or "\\" in weight or Path(text).exists():
                return text, 1.0  # the colon belongs to the path
            raise ConfigError(f"the LoRA weight in {text!r} is not a number ({weight!r}); write path:weight, "
                              f"e.g. {path}:0.8") from None
        if not math.isfinite(value):
            raise ConfigError(f"the LoRA weight in {text!r} must be a finite number, e.g. {path}:0.8")
        return path, value
    return text, 1.0


CAPTIONERS = ("none", "blip", "florence2", "wd14", "qwen2_5_vl", "joycaption")
CAPTION_LENGTHS = ("very short", "short", "medium", "long", "very long")
QUANTIZE_MODES = ("auto", "none", "4bit", "8bit")
CAPTION_MODES = ("skip", "overwrite", "append", "prepend")


@dataclass
class TagConfig(ConfigBase):
    """Captioning and whole-set caption edits (02_tagging, `python -m helpers tag`), applied in this order:
    caption, remove, replace, dedupe, trigger/class word, sort, limit."""

    captioner: str = setting("none", "none (keep the captions you have) | blip | florence2 | wd14 | "
                                     "qwen2_5_vl | joycaption (VLMs, steered by a prompt template)")
    model: str | None = setting(None, "hub id or local folder of the captioner (None: its standard model)")
    mode: str = setting("skip", "images that already have a caption: skip | overwrite | append | prepend")
    batch_size: int = setting(8, "images per captioner batch")
    task: str | None = setting(None, "Florence-2: <CAPTION> | <DETAILED_CAPTION> | <MORE_DETAILED_CAPTION>")
    general_threshold: float = setting(0.35, "WD14: general tags at or above this confidence")
    character_threshold: float = setting(0.85, "WD14: character tags")
    blacklist: list[str] = setting(factory=list, help="WD14 tags never written")
    prompt: str = setting("", "VLMs: the instruction template ({trigger} {class} {tags} {length}, [optional "
                              "parts]); \"\": the model's own default")
    caption_template: str = setting("[{trigger}, ][{class}, ]{caption}", "VLMs: how the written caption is "
                                    "put together from the answer {caption}")
    caption_length: str = setting("medium", "VLMs: very short | short | medium | long | very long")
    vlm_tags: bool = setting(False, "VLMs: tag each image with WD14 first and give the tags to the prompt's {tags}")
    quantize: str = setting("auto", "VLMs: auto (4-bit when the GPU is too small) | none | 4bit | 8bit")
    max_new_tokens: int = setting(160, "VLMs: the longest answer in tokens")
    extension: str = setting(".txt", "caption file extension")
    remove: list[str] = setting(factory=list, help="tags to remove; globs allowed (\"watermark*\")")
    replace: list[str] = setting(factory=list, help="OLD=NEW: tag OLD becomes NEW", flag="replace")
    dedupe: bool = setting(False, "remove repeated tags within a caption")
    trigger: str = setting("", "put first in every caption (keep_tokens=1 keeps it in place)")
    class_word: str = setting("", "put after the trigger")
    sort: bool = setting(False, "sort tags by frequency across the set")
    max_tags: int = setting(0, "keep at most N tags per caption (0: no limit)")
    keep_tokens: int = setting(1, "leading tags that sort and max_tags leave in place")

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"captioner": CAPTIONERS, "mode": CAPTION_MODES,
                                                     "caption_length": CAPTION_LENGTHS, "quantize": QUANTIZE_MODES}

    def validate(self) -> None:
        """Check every field; raise ConfigError naming the first bad one."""
        _check_types(self)
        for name, allowed in self.CHOICES.items():
            _choice(name, getattr(self, name), allowed)
        _positive_int("batch_size", self.batch_size)
        _positive_int("max_new_tokens", self.max_new_tokens)
        if "{caption}" not in self.caption_template:
            raise ConfigError(f"caption_template must contain {{caption}} (the model's answer), got "
                              f"{self.caption_template!r}")
        _number_in("general_threshold", self.general_threshold, 0.0, 1.0)
        _number_in("character_threshold", self.character_threshold, 0.0, 1.0)
        _non_negative_int("max_tags", self.max_tags)
        _non_negative_int("keep_tokens", self.keep_tokens)
        if not self.extension.startswith("."):
            raise ConfigError(f"extension must start with '.', got {self.extension!r}")
        for rule in self.replace:
            if "=" not in rule or not rule.partition("=")[0].strip():
                raise ConfigError(f"replace entries must read OLD=NEW, got {rule!r}")
        if self.class_word and not self.trigger and "," in self.class_word:
            raise ConfigError(f"class_word must be one tag, got {self.class_word!r}")

    def replace_map(self) -> dict[str, str]:
        return {old.strip(): new.strip() for old, _, new in (r.partition("=") for r in self.replace)}


@dataclass
class GenerateConfig(ConfigBase):
    """Settings of an image generation (04_inference, `python -m helpers generate`)."""

    model: str = setting("", "hub id, local diffusers folder, or a single .safetensors checkpoint")
    model_config: str | None = setting(None, "local diffusers folder giving configs for a single-file model (offline)")
    loras: list[str] = setting(factory=list, help="LoRA files, each \"path\" or \"path:weight\"", flag="lora")
    embeddings: list[str] = setting(factory=list,
                                    help="Textual Inversion files, \"path\" or \"path=token\"", flag="embedding")
    prompts: list[str] = setting(factory=list, help="prompts to generate (each gets num_images images)", flag="prompt")
    negative_prompt: str = setting("", "what the images should not show")
    sampler: str = setting("Euler a", "AUTOMATIC1111 name (\"DPM++ 2M Karras\", \"DDIM\", ...)")
    steps: int = setting(20, "sampler steps")
    cfg_scale: float = setting(7.0, "classifier-free guidance scale")
    seed: int = setting(0, "seed of the first image; image i uses seed + i")
    width: int | None = setting(None, "None: the model's native size (512 SD 1.5, 1024 SDXL)")
    height: int | None = setting(None, "None: the model's native size")
    num_images: int = setting(1, "per prompt; image i uses seed + i")
    clip_skip: int = setting(1, "A1111 meaning: 1 = last text-encoder layer, 2 = penultimate")
    weighting: bool = setting(False, "A1111 prompt syntax: (word:1.3), [word], BREAK, > 75 tokens")
    grid_weights: list[float] = setting(factory=lambda: [0.0, 0.5, 0.75, 1.0], help="prompt x weight grid")
    out_dir: str = setting("outputs/generated", "folder the PNGs (with A1111 parameters) are written to", flag="out")

    def validate(self) -> None:
        """Check every field; raise ConfigError naming the first bad one."""
        _check_types(self)
        _choice("sampler", self.sampler, _sampler_names())
        _positive_int("steps", self.steps)
        _number_in("cfg_scale", self.cfg_scale, 0.0, 100.0)
        _non_negative_int("seed", self.seed)
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None:
                _positive_int(name, value)
                _multiple_of(name, value, 8)
        _positive_int("num_images", self.num_images)
        _positive_int("clip_skip", self.clip_skip)
        if any(not spec.strip() for spec in self.loras):
            raise ConfigError("loras has an empty entry")
        for spec in self.loras:
            parse_lora_spec(spec)  # a weight that is not a number is named here, before any model loads
        for w in self.grid_weights:
            _number_in("grid_weights", w, -10.0, 10.0)

    def lora_weights(self) -> list[tuple[str, float]]:
        """[(path, weight)] from the "path[:weight]" entries (weight 1 when left out)."""
        return [parse_lora_spec(spec) for spec in self.loras]


@dataclass
class EvalConfig(ConfigBase):
    """Settings of the evaluation protocol (05_eval, `python -m helpers evaluate`)."""

    model: str = setting("", "the base model the LoRAs were trained on")
    model_config: str | None = setting(None, "local diffusers folder giving configs for a single-file model (offline)")
    loras: list[str] = setting(factory=list, help="LoRA files to compare (runs, checkpoints)", flag="lora")
    weights: list[float] = setting(factory=lambda: [1.0],
                                   help="LoRA weights to evaluate (0 is the base model, always included)")
    prompts: list[str] = setting(factory=list,
                                 help="the concept in its natural setting, with the trigger", flag="prompt")
    context_prompts: list[str] = setting(factory=list, help="the concept somewhere new", flag="context-prompt")
    prior_prompts: list[str] = setting(factory=list,
                                       help="no concept: is the base model's prior kept?", flag="prior-prompt")
    trigger: str = setting("", "the trigger test removes it from the prompts")
    reference_dir: str | None = setting(None, "the training images (CLIP-I, DINO, KID/FID)")
    num_seeds: int = setting(4, "seeds 0..N-1 per prompt")
    steps: int = setting(25, "sampler steps")
    sampler: str = setting("DDIM", "A1111 sampler name")
    cfg_scale: float = setting(7.0, "classifier-free guidance scale")
    negative_prompt: str = setting("", "negative prompt of every image")
    clip_skip: int = setting(1, "A1111 meaning: 1 = last text-encoder layer, 2 = penultimate")
    clip_model: str | None = setting("openai/clip-vit-large-patch14", "CLIP id or folder for CLIP-T, CLIP-I; none: off")
    dino_model: str | None = setting("facebook/dino-vits16", "DINO id or folder; none: off")
    fid_kid: bool = setting(True, "KID and FID (torch-fidelity's Inception weights, or inception_weights)")
    inception_weights: str | None = setting(None, "local InceptionV3 weights file for KID/FID (offline)")
    kid_subset_size: int | None = setting(None, "images per KID subset; None: the smaller set's size, at most 1000")
    kid_subsets: int = setting(100, "KID is averaged over this many random subsets")
    batch_size: int = setting(8, "images per generation batch")
    grid_prompts: int = setting(4, "the report's grids: this many prompts of each group ...")
    grid_seeds: int = setting(4, "... times this many seeds")
    out_dir: str = setting("outputs/eval", "folder of the images, table, plots and report", flag="out")

    def validate(self) -> None:
        """Check every field; raise ConfigError naming the first bad one."""
        _check_types(self)
        _choice("sampler", self.sampler, _sampler_names())
        _positive_int("num_seeds", self.num_seeds)
        _positive_int("steps", self.steps)
        _number_in("cfg_scale", self.cfg_scale, 0.0, 100.0)
        _positive_int("clip_skip", self.clip_skip)
        _positive_int("batch_size", self.batch_size)
        for name in ("kid_subsets", "grid_prompts", "grid_seeds"):
            _positive_int(name, getattr(self, name))
        if self.kid_subset_size is not None:
            _positive_int("kid_subset_size", self.kid_subset_size)
        if not self.weights:
            raise ConfigError("weights must list at least one LoRA weight, e.g. [1.0]")
        for w in self.weights:
            _number_in("weights", w, -10.0, 10.0)
        if self.trigger and any(c.isspace() for c in self.trigger):
            raise ConfigError(f"trigger must be one word, got {self.trigger!r}")


# --- type checking of values coming from TOML, the CLI or widgets ---------------------------

def allowed_types(tp: Any) -> tuple[type, ...]:
    """The types a field annotation admits: `int | None` -> (int, NoneType); `list[str]` -> (list,)."""
    origin = get_origin(tp)
    if origin is None:
        return (tp,)
    if origin is list:
        return (list,)
    out: list[type] = []
    for arg in get_args(tp):  # unions: X | None
        out.extend(allowed_types(arg))
    return tuple(out)


def list_item_type(tp: Any) -> type | None:
    """The element type of a `list[X]` (or `list[X] | None`) field, else None."""
    if get_origin(tp) is list:
        return get_args(tp)[0]
    for arg in get_args(tp):
        if get_origin(arg) is list:
            return get_args(arg)[0]
    return None


_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
               list: "a list", type(None): "unset"}
_LIST_WORDS = {str: "a list of strings", float: "a list of numbers", int: "a list of integers"}


def _type_name(types: tuple[type, ...]) -> str:
    return " or ".join(_TYPE_WORDS.get(t, t.__name__) for t in types)


def _check_types(cfg: Any) -> None:
    hints = get_type_hints(type(cfg))
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        allowed = allowed_types(hints[f.name])
        if float in allowed and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)  # TOML and the CLI write 1 for 1.0
            setattr(cfg, f.name, value)
        item = list_item_type(hints[f.name])
        words = _LIST_WORDS.get(item, _type_name(allowed)) if item else _type_name(allowed)
        if isinstance(value, bool) and bool not in allowed:
            raise ConfigError(f"{f.name} must be {words}, got {value!r}")
        if not isinstance(value, allowed):
            raise ConfigError(f"{f.name} must be {words}, got {value!r}")
        if isinstance(value, list):
            if item is float and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                value = [float(v) for v in value]
                setattr(cfg, f.name, value)
            if not all(isinstance(v, item) and not isinstance(v, bool) for v in value):
                raise ConfigError(f"{f.name} must be {words}, got {value!r}")


# --- TOML --------------------------------------------------------------------------------------

def config_to_toml(cfg: Any) -> str:
    """TOML text for a config dataclass. None values are left out (TOML has no null)."""
    data = {"config_version": CONFIG_VERSION, "kind": type(cfg).__name__}
    data.update({k: v for k, v in dataclasses.asdict(cfg).items() if v is not None})
    return tomli_w.dumps(data)


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write `cfg` as TOML atomically (temp file, then rename)."""
    from .atomic import write_text

    return write_text(path, config_to_toml(cfg))


def config_from_dict(cls: type, data: dict[str, Any], *, source: str = "config") -> Any:
    """Build a config of class `cls` from a dict; unknown keys and newer versions are errors."""
    data = dict(data)
    version = data.pop("config_version", CONFIG_VERSION)
    kind = data.pop("kind", cls.__name__)
    if not isinstance(version, int) or version > CONFIG_VERSION:
        raise ConfigError(f"{source} was written by a newer version of helpers (config_version {version}, "
                          f"this version reads up to {CONFIG_VERSION}); update helpers")
    if kind != cls.__name__:
        raise ConfigError(f"{source} holds a {kind}, not a {cls.__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{source} has unknown setting(s): {', '.join(unknown)}")
    return cls(**data)


def load_config(path: str | Path, cls: type = TrainConfig) -> Any:
    """Read a TOML file into a config dataclass (validated)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None
    return config_from_dict(cls, data, source=str(path))


CROP_MODES = ("none", "bucket", "face", "center", "subject", "pad")
MASK_SOURCES = ("none", "alpha", "face", "clipseg")


IMAGE_FORMATS = ("png", "jpg")


@dataclass
class PrepareConfig(ConfigBase):
    """Every setting of a dataset preparation; plain types, so TOML, the CLI and widgets can build it."""

    source: str = setting("", "a folder (recursive; kohya \"N_name\" subfolders kept) or a .zip file")
    output_dir: str = setting("", "the prepared copy; never inside the source")
    resolution: int = setting(512, "512 for SD 1.5, 768 for SD 2, 1024 for SDXL")
    crop: str = setting("bucket", "none | bucket | face (bucket crop around the face) | center | subject | pad")
    min_size: int | None = setting(None, "shorter side below this is rejected; None: resolution // 2")
    max_pixels: int = setting(100_000_000, "larger declared sizes are rejected as decompression bombs")
    max_side: int | None = setting(None, "crop=\"none\" only: cap the long side (downscale)")
    allow_upscale: bool = setting(False, "False: images smaller than the target keep their size (flagged)")
    background: str = setting("#ffffff", "transparency is flattened on it; \"pad\" fills with it")
    caption_extension: str = setting(".txt", "caption files beside images; \"\" to ignore captions")
    image_format: str = setting("png", "png (lossless) | jpg (quality jpeg_quality, 4:4:4)")
    jpeg_quality: int = setting(95, "JPEG quality when image_format is jpg")
    near_dup_threshold: int = setting(10, "max Hamming distance of 64-bit perceptual hashes; -1: off")
    clip_model: str | None = setting(None, "CLIP id or folder for embedding similarity; None: off")
    clip_threshold: float = setting(0.95, "cosine similarity at or above which images are grouped")
    min_bucket_reso: int = setting(256, "smallest bucket side in px")
    max_bucket_reso: int = setting(1024, "largest bucket side in px")
    bucket_reso_steps: int = setting(64, "bucket sides are multiples of this")
    detect_faces: bool = setting(True, "find faces, report how much of each crop they fill (crop=\"face\" needs it)")
    face_margin: float = setting(0.5, "crop=\"face\": room kept around the face, in face sizes on each side")
    min_face_coverage: float = setting(0.25, "flag images whose face fills less of the crop than this (0: never)")
    masks: str = setting("none", "loss masks written to _masks/: none | alpha (transparency) | face | clipseg")
    mask_prompt: str = setting("", "masks=\"clipseg\": what to keep, e.g. \"a person\" or \"a red flower\"")
    mask_model: str | None = setting(None, "masks=\"clipseg\": CLIPSeg hub id or folder (None: its standard model)")
    mask_threshold: float = setting(0.3, "masks=\"clipseg\": pixels at or above this probability are kept")

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"crop": CROP_MODES, "image_format": IMAGE_FORMATS,
                                                     "masks": MASK_SOURCES}

    def validate(self) -> None:
        """Check every field; raise ConfigError naming the first bad one."""
        _check_types(self)
        if self.crop not in CROP_MODES:
            raise ConfigError(f"crop must be one of {', '.join(CROP_MODES)}, got {self.crop!r}")
        if self.image_format not in IMAGE_FORMATS:
            raise ConfigError(f"image_format must be one of {', '.join(IMAGE_FORMATS)}, got {self.image_format!r}")
        if self.masks not in MASK_SOURCES:
            raise ConfigError(f"masks must be one of {', '.join(MASK_SOURCES)}, got {self.masks!r}")
        if self.crop == "face" and not self.detect_faces:
            raise ConfigError('crop="face" places the crop on the detected face: set detect_faces=True')
        if self.masks == "face" and not self.detect_faces:
            raise ConfigError('masks="face" draws the mask from the detected face: set detect_faces=True')
        if self.masks == "clipseg" and not self.mask_prompt.strip():
            raise ConfigError('masks="clipseg" needs mask_prompt: what the mask keeps, e.g. "a person"')
        if not 0.0 <= self.face_margin <= 10.0:
            raise ConfigError(f"face_margin must be in [0, 10] face sizes, got {self.face_margin}")
        if not 0.0 <= self.min_face_coverage < 1.0:
            raise ConfigError(f"min_face_coverage must be in [0, 1), got {self.min_face_coverage}")
        if not 0.0 < self.mask_threshold < 1.0:
            raise ConfigError(f"mask_threshold must be in (0, 1), got {self.mask_threshold}")
        for name in ("resolution", "max_pixels", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.min_bucket_reso < self.bucket_reso_steps:
            raise ConfigError(f"min_bucket_reso ({self.min_bucket_reso}) must be at least bucket_reso_steps "
                              f"({self.bucket_reso_steps})")
        if self.resolution % 8:
            raise ConfigError(f"resolution must be a multiple of 8, got {self.resolution}")
        if not self.min_bucket_reso <= self.resolution <= self.max_bucket_reso:
            raise ConfigError(f"resolution ({self.resolution}) must lie between min_bucket_reso "
                              f"({self.min_bucket_reso}) and max_bucket_reso ({self.max_bucket_reso})")
        if self.min_size is not None and self.min_size < 1:
            raise ConfigError(f"min_size must be a positive integer or None, got {self.min_size!r}")
        if self.max_side is not None and self.max_side < 8:
            raise ConfigError(f"max_side must be >= 8 or None, got {self.max_side!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")
        if not -1 <= self.near_dup_threshold <= 64:
            raise ConfigError(f"near_dup_threshold must be in [0, 64] (bits of 64), or -1 for off, "
                              f"got {self.near_dup_threshold}")
        if not 0.0 < self.clip_threshold <= 1.0:
            raise ConfigError(f"clip_threshold must be in (0, 1], got {self.clip_threshold}")
        if self.caption_extension and not self.caption_extension.startswith("."):
            raise ConfigError(f"caption_extension must start with '.', got {self.caption_extension!r}")
        try:
            parse_color(self.background)
        except ValueError as e:
            raise ConfigError(f"background: {e}") from None

    @property
    def effective_min_size(self) -> int:
        """min_size, or half the resolution when unset (below that an image needs > 2x upscaling)."""
        return self.min_size if self.min_size is not None else self.resolution // 2

    @property
    def background_rgb(self) -> tuple[int, int, int]:
        return parse_color(self.background)


def parse_color(value: str | Sequence[int]) -> tuple[int, int, int]:
    """An RGB triple from "white", "#rrggbb", "#rgb", "r,g,b" or a 3-sequence of 0-255 ints."""
    from PIL import ImageColor

    if isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"\d+\s*,\s*\d+\s*,\s*\d+", text):
            value = [int(v) for v in text.split(",")]
        else:
            try:
                rgb = ImageColor.getrgb(text)
            except ValueError:
                raise ValueError(f"not a colour: {value!r} (use a name like 'white', '#rrggbb' or 'r,g,b')") from None
            return tuple(int(c) for c in rgb[:3])  # type: ignore[return-value]
    values = list(value)
    if len(values) != 3 or not all(isinstance(v, numbers.Integral) and 0 <= v <= 255 for v in values):
        raise ValueError(f"not an RGB colour: {value!r} (three integers 0-255)")
    return (int(values[0]), int(values[1]), int(values[2]))


def color_text(rgb: tuple[int, int, int]) -> str:
    """A colour as #rrggbb (how configs and reports write it)."""
    return "#{:02x}{:02x}{:02x}".format(*rgb)
