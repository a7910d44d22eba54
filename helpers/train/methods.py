"""What a run trains: LoRA layers, the whole UNet (DreamBooth) or new token vectors (Textual Inversion).

Each trainable attaches itself to the frozen base, names its parameters for training states, gives its
optimizer groups, says what it is in one line and saves itself in the files A1111, ComfyUI and diffusers
read. A method is a list of them: LoRA `[LoraLayers]`, DreamBooth `[WholeUNet]`, Textual Inversion
`[NewTokens]`, pivotal tuning `[LoraLayers, NewTokens]`. This is the one file where the methods differ.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, TrainConfig
from ..formats.lora import model_name_for_metadata
from .saves import build_timestamp, cast_safetensors_files, ss_tag_frequency


@dataclass
class SaveTarget:
    """What a save needs besides the trained weights: the base model (family, pipeline, configs), the
    training images (sd-scripts' counts and tag frequencies), the run's precision and the file dtype."""

    base: Any
    items: list
    mixed_precision: str
    dtype: torch.dtype


class Trainable:
    """The parts every method shares; subclasses fill in what they train and how they save it."""

    text_grad = False        # gradients must flow through the text encoders
    outside_ddp = False      # its parameters live outside the DDP-wrapped models (synced by hand)

    def __init__(self) -> None:
        self.unet = None
        self.text_encoders: list[torch.nn.Module] = []   # the encoders it trains (their own weights or LoRA)

    def attach(self, unet, text_encoders: list, tokenizers: list, device: torch.device) -> None:
        """Make this method's parameters trainable on the frozen base (called once, before `accelerate.prepare`)."""
        raise NotImplementedError

    def modules(self) -> dict[str, torch.nn.Module]:
        """{name: module} holding the trained parameters, as training states store them."""
        named = {"unet": self.unet}
        named.update({f"text_encoder_{i}": te for i, te in enumerate(self.text_encoders)})
        return named

    def param_groups(self, cfg: TrainConfig) -> list[dict]:
        """Optimizer groups: the UNet's trained parameters at `learning_rate`, each trained encoder's at `te_lr`."""
        groups = [{"params": [p for p in self.unet.parameters() if p.requires_grad], "lr": cfg.learning_rate}]
        for te in self.text_encoders:
            groups.append({"params": [p for p in te.parameters() if p.requires_grad], "lr": cfg.te_lr})
        return groups

    def expand(self, text: str) -> str:
        """A caption or prompt as the tokenizer must see it (new tokens written out)."""
        return text

    def describe(self) -> str:
        raise NotImplementedError

    def save(self, to: SaveTarget, name: str, step: int, epoch: int) -> list[Path]:
        """Write what was trained as `name` (rank 0 only); returns the files and folders written."""
        raise NotImplementedError

    def finish(self) -> None:
        """Leave the base model ready for prompts once training ends."""


class LoraLayers(Trainable):
    """peft LoRA layers on the UNet's target modules (and on the text encoders with `train_text_encoder`)."""

    def __init__(self, cfg: TrainConfig, tokens: "NewTokens | None" = None):
        super().__init__()
        self.cfg = cfg
        self.text_grad = cfg.train_text_encoder
        self.tokens = tokens   # pivotal tuning: the new token's vectors go into this LoRA's file

    def _config(self, targets: list[str], ranks: dict | None = None, alphas: dict | None = None):
        from peft import LoraConfig

        cfg = self.cfg
        if cfg.network == "loha":
            from ..formats.lycoris import loha_config

            return loha_config(cfg.rank, cfg.alpha, targets, ranks, alphas)
        if cfg.network == "lokr":
            from ..formats.lycoris import lokr_config

            return lokr_config(cfg.rank, cfg.alpha, targets, ranks, alphas, factor=cfg.factor)
        return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.lora_dropout, init_lora_weights=True,
                          target_modules=targets, rank_pattern=ranks or {}, alpha_pattern=alphas or {})

    def attach(self, unet, text_encoders, tokenizers, device) -> None:
        from ..sd.lora_targets import (inject_lora, text_encoder_target_modules, unet_resnet_target_modules,
                                       unet_target_modules)
        from .blocks import filter_layers, rank_plan

        cfg = self.cfg
        self.unet = unet
        self.text_encoders = list(text_encoders) if cfg.train_text_encoder else []
        candidates, convs = unet_target_modules(unet, cfg.target), []
        conv = conv_layers(cfg)
        if conv is not None:   # the ResNet blocks too; their 3x3 convolutions at conv_dim / conv_alpha
            linear, convs = unet_resnet_target_modules(unet)
            candidates = sorted(candidates + linear + convs)
        try:
            targets = filter_layers(candidates, cfg.layer_filter, cfg.layer_filter_regex)
            targets, ranks, alphas = rank_plan(targets, unet.config, cfg.rank, cfg.alpha, cfg.block_dims,
                                               cfg.block_alphas)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if convs:   # per block with conv_block_dims / conv_block_alphas; rank 0 leaves a convolution out
            from .blocks import conv_plan, module_pattern

            try:
                plan = conv_plan(sorted(set(convs).intersection(targets)), unet.config, conv[0], conv[1],
                                 cfg.conv_block_dims, cfg.conv_block_alphas)
            except ValueError as e:
                raise ConfigError(str(e)) from None
            targets = [t for t in targets if t not in plan or plan[t][0] > 0]
            for name, (r, a) in plan.items():
                if r > 0:
                    ranks[module_pattern(name)], alphas[module_pattern(name)] = r, a
        inject_lora(unet, self._config(targets, ranks, alphas))
        if cfg.network == "dora":   # each LoRA layer gets its magnitude per input column (formats/dora.py)
            from ..formats.dora import add_input_dora

            add_input_dora(unet)
        for te in self.text_encoders:
            # a filter written for the UNet (attn2, ff) may match none of the text encoder's modules: it then
            # trains them as without a filter
            names = filter_layers(text_encoder_target_modules(te, cfg.target), cfg.layer_filter,
                                  cfg.layer_filter_regex, required=False)
            inject_lora(te, self._config(names))
            if cfg.network == "dora":
                add_input_dora(te)

    def param_groups(self, cfg: TrainConfig) -> list[dict]:
        """As every method's, but with LoRA+ (`loraplus_lr_ratio`) each model's B (up) matrices in their own
        group at that many times its learning rate (Hayou et al. 2024; sd-scripts' loraplus_lr_ratio)."""
        groups = super().param_groups(cfg)
        if not cfg.loraplus_lr_ratio:
            return groups
        models = [self.unet, *self.text_encoders]
        out = []
        for model, group in zip(models, groups):
            b = {id(p) for n, p in model.named_parameters() if p.requires_grad and ".lora_B." in n}
            a_params = [p for p in group["params"] if id(p) not in b]
            b_params = [p for p in group["params"] if id(p) in b]
            out += [{"params": a_params, "lr": group["lr"]},
                    {"params": b_params, "lr": group["lr"] * cfg.loraplus_lr_ratio}]
        return out

    def describe(self) -> str:
        cfg = self.cfg
        te = " + text encoder" if self.text_encoders else ""
        plus = f", LoRA+ x{cfg.loraplus_lr_ratio:g}" if cfg.loraplus_lr_ratio else ""
        layers = conv_layers(cfg)
        conv = f", ResNet blocks too: 3x3 convolutions at rank {layers[0]} alpha {layers[1]:g}" if layers else ""
        kind = {"locon": "LoCon", "loha": "LoHa", "lokr": "LoKr", "dora": "DoRA"}.get(cfg.network, "LoRA")
        return f"{kind} rank {cfg.rank} alpha {cfg.alpha} ({cfg.target}{te}{plus}{conv})"

    def save(self, to, name, step, epoch) -> list[Path]:
        from ..formats.lora import extract_peft_lora, save_lora
        from ..formats.dora import extract_peft_dora
        from ..formats.lycoris import extract_peft_loha, extract_peft_lokr

        cfg, base = self.cfg, to.base
        extract = {"loha": extract_peft_loha, "lokr": extract_peft_lokr, "dora": extract_peft_dora}.get(
            cfg.network, extract_peft_lora)
        weights = {"unet": extract(self.unet)}
        for key, te in zip(("text_encoder", "text_encoder_2"), self.text_encoders):
            weights[key] = extract(te)
        metadata = self.metadata(to, name, step, epoch)
        bundle = None
        if self.tokens is not None:   # pivotal tuning: the token's vectors inside the file, as A1111 reads them
            from ..formats.embedding import bundle_tensors

            bundle = bundle_tensors(cfg.token_string, self.tokens.embeddings.file_tensors(base.family), base.family)
        out = Path(cfg.output_dir)
        written: list[Path] = []
        for fmt, path in (("kohya", out / f"{name}.safetensors"), ("diffusers", out / f"{name}_diffusers")):
            if cfg.save_format in (fmt, "both"):
                written.append(save_lora(path, weights, family=base.family, unet_config=dict(base.unet.config),
                                         format=fmt, metadata=metadata, dtype=to.dtype,
                                         extra_tensors=bundle if fmt == "kohya" else None))
        return written

    def metadata(self, to: SaveTarget, name: str, step: int, epoch: int) -> dict[str, str]:
        """sd-scripts' `ss_*` keys: LoRA browsers and A1111 read the training settings from them."""
        from ..formats.lora import kohya_metadata

        cfg, items = self.cfg, to.items
        instance = [i for i in items if not i.is_class]
        return kohya_metadata(
            family=to.base.family, rank=cfg.rank, alpha=cfg.alpha, output_name=name, resolution=cfg.resolution,
            clip_skip=cfg.clip_skip, num_train_images=sum(i.repeats for i in instance),  # sd-scripts counts repeats
            tag_frequency=ss_tag_frequency(instance), steps=step, epoch=epoch,
            prediction_type=to.base.prediction_type, timestamp=build_timestamp(),
            extra={"ss_num_reg_images": str(sum(i.repeats for i in items if i.is_class)),
                   "ss_prior_loss_weight": str(cfg.prior_loss_weight),
                   "ss_learning_rate": str(cfg.learning_rate), "ss_text_encoder_lr": str(cfg.te_lr),
                   "ss_unet_lr": str(cfg.learning_rate), "ss_optimizer": cfg.optimizer,
                   "ss_lr_scheduler": cfg.lr_scheduler, "ss_seed": str(cfg.seed),
                   "ss_network_dropout": str(cfg.lora_dropout), "ss_min_snr_gamma": str(cfg.min_snr_gamma),
                   "ss_noise_offset": str(cfg.noise_offset), "ss_max_train_steps": str(step),
                   # sd-scripts writes None for the plain 75 tokens
                   "ss_max_token_length": "None" if cfg.max_token_length == 75 else str(cfg.max_token_length),
                   **{f"ss_{key}": str(getattr(cfg, name)) for key, name in SS_VARIANTS},
                   "ss_validation_split": str(cfg.validation_split), "ss_ema_decay": str(cfg.ema_decay),
                   "ss_cache_text_encoder_outputs": str(cfg.cache_text_encoder_outputs),
                   "ss_masked_loss": str(cfg.masked_loss), "ss_alpha_mask": str(cfg.alpha_mask),
                   "ss_loraplus_lr_ratio": str(cfg.loraplus_lr_ratio),
                   "ss_mixed_precision": to.mixed_precision,
                   "ss_sd_model_name": model_name_for_metadata(cfg.pretrained_model),
                   "ss_training_comment": f"helpers target={cfg.target}",
                   "ss_network_args": json.dumps({"target": cfg.target, **network_args(cfg)}),
                   # LyCORIS' own module name for its network types (what kohya_ss and LoRA browsers show)
                   **({"ss_network_module": "lycoris.kohya"} if cfg.network in LYCORIS_NETWORKS else {})})


LYCORIS_NETWORKS = ("loha", "lokr", "dora")   # trained as LyCORIS does: its module name and algo in the metadata


# sd-scripts' metadata names for the noise, timestep and loss variants (key, TrainConfig field)
SS_VARIANTS = [("multires_noise_iterations", "multires_noise_iterations"),
               ("multires_noise_discount", "multires_noise_discount"), ("zero_terminal_snr", "zero_terminal_snr"),
               ("ip_noise_gamma", "ip_noise_gamma"), ("debiased_estimation", "debiased_estimation_loss"),
               ("noise_offset_random_strength", "noise_offset_random_strength"),
               ("ip_noise_gamma_random_strength", "ip_noise_gamma_random_strength"), ("loss_type", "loss_type"),
               ("huber_schedule", "huber_schedule"), ("huber_scale", "huber_scale"), ("huber_c", "huber_c"),
               ("min_timestep", "min_timestep"), ("max_timestep", "max_timestep"),
               ("scale_v_pred_loss_like_noise_pred", "scale_v_pred_loss_like_noise_pred")]


def network_args(cfg: TrainConfig) -> dict[str, str]:
    """sd-scripts' network_args for the block ranks, alphas and layer filter (comma-joined, as it writes them)."""
    out = {}
    if cfg.block_dims:
        out["block_dims"] = ",".join(map(str, cfg.block_dims))
    if cfg.block_alphas:
        out["block_alphas"] = ",".join(f"{a:g}" for a in cfg.block_alphas)
    if cfg.layer_filter:
        out["layer_filter"] = ",".join(cfg.layer_filter)
    if cfg.network in ("loha", "lokr"):
        out["algo"] = cfg.network    # LyCORIS' network_args spelling
    if cfg.network == "dora":        # LyCORIS: DoRA is its locon / lora algo with dora_wd
        out["algo"], out["dora_wd"] = ("locon" if conv_layers(cfg) else "lora"), "True"
    if cfg.network == "lokr":
        out["factor"] = str(cfg.factor)
    conv = conv_layers(cfg)
    if conv is not None:   # sd-scripts' networks.lora spells LoCon as these two network_args (LyCORIS too)
        out["conv_dim"], out["conv_alpha"] = str(conv[0]), f"{conv[1]:g}"
    if cfg.conv_block_dims:
        out["conv_block_dims"] = ",".join(map(str, cfg.conv_block_dims))
    if cfg.conv_block_alphas:
        out["conv_block_alphas"] = ",".join(f"{a:g}" for a in cfg.conv_block_alphas)
    return out


def conv_layers(cfg: TrainConfig) -> tuple[int, float] | None:
    """(rank, alpha) of the ResNet blocks' 3x3 convolutions when the network trains them
    (`TrainConfig.trains_convs`), else None."""
    if cfg.trains_convs:
        return cfg.conv_dim or cfg.rank, cfg.conv_alpha if cfg.conv_alpha is not None else cfg.alpha
    return None


class WholeUNet(Trainable):
    """DreamBooth: every UNet weight (and every text-encoder weight with `train_text_encoder`), fp32 masters."""

    def __init__(self, cfg: TrainConfig, tokens: "NewTokens | None" = None):
        super().__init__()
        self.cfg = cfg
        self.text_grad = cfg.train_text_encoder
        self.tokens = tokens   # pivotal tuning: the new token's vectors go into this LoRA's file

    def attach(self, unet, text_encoders, tokenizers, device) -> None:
        self.unet = unet
        self.text_encoders = list(text_encoders) if self.cfg.train_text_encoder else []
        for module in [unet, *self.text_encoders]:
            module.requires_grad_(True)

    def describe(self) -> str:
        return "DreamBooth: full UNet" + (" + text encoder" if self.text_encoders else "")

    def save(self, to, name, step, epoch) -> list[Path]:
        """The whole pipeline as one original-layout file (A1111, ComfyUI) and/or a diffusers folder."""
        from ..atomic import atomic_dir
        from ..formats.checkpoint import save_single_file

        cfg, base, dtype = self.cfg, to.base, to.dtype
        out = Path(cfg.output_dir)
        pipe = base.pipe  # its UNet (and text encoders) are the trained modules themselves
        written: list[Path] = []
        if cfg.save_format in ("kohya", "both"):
            meta = {"modelspec.title": name, "helpers.method": "dreambooth", "helpers.step": str(step),
                    "helpers.base_model": model_name_for_metadata(cfg.pretrained_model),
                    "helpers.prediction_type": base.prediction_type}
            written.append(save_single_file(pipe, out / f"{name}.safetensors", base.family, dtype=dtype,
                                            metadata=meta))
        if cfg.save_format in ("diffusers", "both"):
            folder = out / f"{name}_diffusers"
            with atomic_dir(folder) as tmp:
                pipe.save_pretrained(str(tmp), safe_serialization=True)
                cast_safetensors_files(tmp, dtype)
            written.append(folder)
        return written


class NewTokens(Trainable):
    """Textual Inversion: new vectors for `token_string` in each text encoder, the tables left untouched."""

    text_grad = True
    outside_ddp = True

    def __init__(self, cfg: TrainConfig, file_suffix: str = "", write_file: bool = True):
        super().__init__()
        self.cfg = cfg
        self.file_suffix = file_suffix  # "_emb" beside a LoRA of the same name (pivotal tuning)
        self.write_file = write_file    # pivotal tuning bundles the vectors in the LoRA; the file is optional
        self.embeddings = None

    def attach(self, unet, text_encoders, tokenizers, device) -> None:
        from ..sd.embeddings import NewTokenEmbeddings

        cfg = self.cfg
        self.embeddings = NewTokenEmbeddings(tokenizers, text_encoders, cfg.token_string, cfg.init_word,
                                             cfg.num_vectors_per_token).to(device)

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"embeddings": self.embeddings}

    def param_groups(self, cfg: TrainConfig) -> list[dict]:
        # no weight decay on token vectors: it would pull them towards zero
        return [{"params": list(self.embeddings.parameters()), "lr": cfg.emb_lr, "weight_decay": 0.0}]

    def expand(self, text: str) -> str:
        return self.embeddings.expand(text)

    def describe(self) -> str:
        cfg = self.cfg
        return f"new token {cfg.token_string!r} x{cfg.num_vectors_per_token} from {cfg.init_word!r}"

    def save(self, to, name, step, epoch) -> list[Path]:
        from ..formats.embedding import save_embedding

        cfg, family = self.cfg, to.base.family
        if not self.write_file:
            return []
        path = Path(cfg.output_dir) / f"{name}{self.file_suffix}.safetensors"
        return [save_embedding(path, self.embeddings.file_tensors(family), token=cfg.token_string, family=family,
                               metadata={"init_word": cfg.init_word, "step": str(step),
                                         "base_model": model_name_for_metadata(cfg.pretrained_model)})]

    def finish(self) -> None:
        """The trained vectors go into the tables: the pipeline is ready for prompts."""
        self.embeddings.write_into_encoders()
        self.embeddings.remove_hooks()


def methods_for(cfg: TrainConfig) -> list[Trainable]:
    """The trainables `cfg.method` (and `token_string`) ask for, in the order their optimizer groups go."""
    if cfg.method == "textual_inversion":
        return [NewTokens(cfg)]
    if cfg.method == "dreambooth":
        return [WholeUNet(cfg)]
    if not cfg.token_string:
        return [LoraLayers(cfg)]
    tokens = NewTokens(cfg, file_suffix="_emb", write_file=cfg.embedding_file)
    return [LoraLayers(cfg, tokens=tokens), tokens]


def describe_methods(methods: list[Trainable]) -> str:
    """One line for the start of a run: 'LoRA rank 16 alpha 16.0 (attention) + new token ...'."""
    if len(methods) == 1 and isinstance(methods[0], NewTokens):
        return f"Textual Inversion: {methods[0].describe()}"
    return " + ".join(m.describe() for m in methods)
