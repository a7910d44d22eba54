"""Everything a run sets up before its first step: accelerator, base model, trainables, data, optimizer.

`setup(cfg)` returns a `Run` that the loop in `helpers.train.loop` drives; a saved training state is put
back by `resume_into`. The pieces are functions of their own so the step benchmark builds its models the
trainer's way (`make_accelerator`, `attach_methods`, `param_groups`).
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, TrainConfig, save_config
from ..sd.precision import accelerate_precision, decide_precision
from .methods import Trainable, methods_for
from .progress import Progress, Schedule
from .state import TrainState
from .step import DiffusionStep, OptimizerStep, Variants, vae_encoder


@dataclass
class Run:
    """A set-up run: the models as accelerate prepared them, what is trained, the data and the optimizer."""

    cfg: TrainConfig
    accelerator: Any
    base: Any                       # helpers.sd.models.BaseModel, with the trainables attached
    methods: list[Trainable]
    unet: Any                       # prepared (DDP-wrapped when several processes run)
    text_encoders: list             # the trained ones, prepared
    step: DiffusionStep
    update: OptimizerStep
    dataset: Any
    loader: Any
    sampler: Any
    optimizer: Any
    lr_scheduler: Any
    generators: dict[str, torch.Generator]   # "noise" (the step's draws), "vae" (latent sampling)
    schedule: Schedule
    max_steps: int
    num_epochs: int
    num_images: int
    attention: str
    state: TrainState | None = None
    validation_set: Any = None      # held-out images (validation_split / validation_data_dir), never trained on
    ema: Any = None                 # helpers.train.ema.Ema of the trained weights when cfg.ema_decay is set

    @property
    def models(self) -> list:
        """The prepared models gradients flow into: accumulated together, put in train mode each epoch."""
        return [self.unet, *self.text_encoders]

    def modules(self) -> dict[str, torch.nn.Module]:
        """{name: module} of every trained parameter, in the order the optimizer groups go."""
        return {name: m for method in self.methods for name, m in method.modules().items()}



def resolve_mixed_precision(requested: str, device_type: str) -> str:
    """accelerate's mixed_precision value for `requested` on this device ("no" | "fp16" | "bf16"), as
    `helpers.sd.precision.decide_precision` decides it (fp16 on a T4, bf16 on Ampere+, fp32 on CPU)."""
    return accelerate_precision(decide_precision(requested, device_type))


def check_ready(cfg: TrainConfig) -> None:
    """Fail before loading anything when the run cannot start."""
    if not cfg.pretrained_model:
        raise ConfigError("pretrained_model must be set: a hub id, a diffusers folder or a .safetensors file")
    if not cfg.train_data_dir:
        raise ConfigError("train_data_dir must be set: a folder of images with .txt captions")
    for name in ("train_data_dir", "reg_data_dir"):
        folder = getattr(cfg, name)
        if folder and not Path(folder).is_dir():
            raise ConfigError(f"{name} {folder!r} is not a folder")


def make_accelerator(cfg: TrainConfig, device_type: str | None = None) -> tuple[Any, torch.dtype]:
    """A fresh accelerate `Accelerator` for `cfg` and the compute dtype the frozen weights take."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DataLoaderConfiguration

    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    # accelerate keeps its settings in a process-wide singleton: a notebook that trains twice with other
    # precision settings would fail. Reset those settings, keep the distributed state (PartialState).
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        # cpu=True on GPU-less machines also lets accelerate see a multi-process CPU world (gloo) when
        # started by `accelerate launch --multi_gpu` / torchrun; MPS users are not served here.
        cpu=device_type == "cpu" and not torch.backends.mps.is_available(),
        mixed_precision=resolve_mixed_precision(cfg.mixed_precision, device_type),
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        # batches come from pinned memory (see the loader): copy them to the GPU without waiting
        dataloader_config=DataLoaderConfiguration(non_blocking=device_type == "cuda"),
        **tracker_settings(cfg),
    )
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    return accelerator, weight_dtype


def tracker_settings(cfg: TrainConfig) -> dict[str, Any]:
    """accelerate's tracker arguments for `cfg.log_with` (none: no tracker); ConfigError when the package the
    tracker needs is missing."""
    if cfg.log_with == "none":
        return {}
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
        raise ConfigError("log_with='tensorboard' needs the tensorboard package: pip install tensorboard "
                          "(Colab has it)")
    return {"log_with": cfg.log_with, "project_dir": str(cfg.tensorboard_dir)}


def start_tracking(cfg: TrainConfig, accelerator) -> None:
    """Open the run in the tracker (TensorBoard), its settings as hyperparameters."""
    if cfg.log_with == "none":
        return
    flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in cfg.to_dict().items()}
    accelerator.init_trackers(cfg.output_name, config=flat)


def attach_methods(cfg: TrainConfig, unet, text_encoders: list, tokenizers: list,
                   device: torch.device) -> list[Trainable]:
    """Freeze the base, attach what `cfg` trains, and set the memory/speed options of the trained modules.
    Returns the trainables; their parameters are fp32 masters, the frozen weights keep their dtype."""
    for module in [unet, *text_encoders]:
        module.requires_grad_(False)
    methods = methods_for(cfg)
    for method in methods:
        method.attach(unet, text_encoders, tokenizers, device)
    trained_tes = [te for m in methods for te in m.text_encoders]
    for module in [unet, *trained_tes]:
        for p in module.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for te in trained_tes:
            te.gradient_checkpointing_enable()
    if cfg.channels_last:
        unet.to(memory_format=torch.channels_last)
    if cfg.torch_compile:  # in place: the module, its parameter names and every save stay as they are
        unet.compile(backend=cfg.compile_backend)
    return methods


def param_groups(cfg: TrainConfig, methods: list[Trainable]) -> list[dict]:
    return [group for m in methods for group in m.param_groups(cfg)]


def setup(cfg: TrainConfig, base=None, *, show_progress: bool = True) -> Run:
    """Set up a run as `cfg` says (on every process); `base` may be an already loaded BaseModel."""
    from accelerate.utils import set_seed

    from ..sd.models import load_base, set_attention
    from .optim import build_optimizer, build_scheduler
    from .state import check_config_compatible, find_resume_state, load_state, states_dir

    check_ready(cfg)
    accelerator, weight_dtype = make_accelerator(cfg)
    out_dir = Path(cfg.output_dir)
    state_path = find_resume_state(cfg.resume, out_dir, cfg.output_name)  # every process reads the same folder
    state = load_state(state_path) if state_path else None
    if state is not None:
        check_config_compatible(state.info.get("config", {}), cfg.to_dict(), state.path)
    elif cfg.resume and accelerator.is_main_process:
        print(f"resume={cfg.resume!r}: no saved state under {states_dir(out_dir)} yet; starting from the beginning")
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / f"{cfg.output_name}.toml")
    set_seed(cfg.seed)

    if base is None:  # the frozen base model, weights in the compute dtype
        base = load_base(cfg.pretrained_model, device=accelerator.device, dtype=weight_dtype, vae=cfg.vae,
                         config=cfg.model_config, family=None if cfg.family == "auto" else cfg.family,
                         prediction_type=None if cfg.prediction_type == "auto" else cfg.prediction_type)
    if any(getattr(m, "peft_config", None) for m in [base.unet, *base.text_encoders]):
        # a notebook reusing its BaseModel: start from the plain base, not on top of an earlier LoRA
        print("removing LoRA layers left on the base model by an earlier run or load_loras()")
        base.pipe.unload_lora_weights()
    for module in [base.unet, base.vae, *base.text_encoders]:
        module.requires_grad_(False)
    attention = set_attention(base.unet, cfg.attention)
    methods = attach_methods(cfg, base.unet, base.text_encoders, base.tokenizers, accelerator.device)
    trained_tes = [te for m in methods for te in m.text_encoders]

    dataset, num_images, encode_images, vae_gen, validation_set = _training_data(cfg, base, methods, accelerator,
                                                                                 show_progress)
    sampler, loader = _loader(cfg, dataset, accelerator.device.type)
    optimizer = build_optimizer(cfg.optimizer, param_groups(cfg, methods), lr=cfg.learning_rate,
                                weight_decay=cfg.weight_decay, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                eps=cfg.adam_epsilon)
    updates_per_epoch = math.ceil(math.ceil(len(loader) / accelerator.num_processes)
                                  / cfg.gradient_accumulation_steps)
    max_steps = cfg.max_train_epochs * updates_per_epoch if cfg.max_train_epochs else cfg.max_train_steps
    # accelerate steps a prepared scheduler once per process per optimizer step
    lr_scheduler = build_scheduler(cfg.lr_scheduler, optimizer,
                                   warmup_steps=cfg.lr_warmup_steps * accelerator.num_processes,
                                   total_steps=max_steps * accelerator.num_processes,
                                   num_cycles=cfg.lr_num_cycles, power=cfg.lr_power)
    prepared = accelerator.prepare(base.unet, *trained_tes, optimizer, loader, lr_scheduler)
    unet, trained_tes = prepared[0], list(prepared[1:1 + len(trained_tes)])
    optimizer, loader, lr_scheduler = prepared[-3:]

    noise_scheduler = training_schedule(cfg, base.noise_scheduler())
    ema = None
    if cfg.ema_decay:
        from .ema import Ema, trained_parameters

        ema = Ema(trained_parameters({n: m for method in methods for n, m in method.modules().items()}),
                  cfg.ema_decay, cfg.ema_warmup)
    noise_gen = torch.Generator(device=accelerator.device).manual_seed(cfg.seed + accelerator.process_index)
    step = make_step(cfg, methods, base.family, noise_scheduler, base.tokenizers,
                     trained_tes if cfg.train_text_encoder else base.text_encoders, accelerator.device, weight_dtype,
                     encode_images=encode_images)
    if cfg.cache_text_encoder_outputs:   # every caption once; the encoders then leave the GPU (_Actions)
        from .text_cache import dataset_captions, load_or_encode

        captions = dataset_captions(dataset) + (dataset_captions(validation_set) if validation_set else [])
        step.text_cache = load_or_encode(cfg, step, base.family, captions)
    update = make_update(cfg, methods, accelerator, optimizer, lr_scheduler)
    return Run(cfg, accelerator, base, methods, unet, trained_tes, step, update, dataset, loader, sampler, optimizer,
               lr_scheduler, {"noise": noise_gen, "vae": vae_gen}, Schedule.from_config(cfg, max_steps, len(loader)),
               max_steps, math.ceil(max_steps / updates_per_epoch), num_images, attention, state, validation_set,
               ema)


def training_schedule(cfg: TrainConfig, noise_scheduler):
    """The base model's DDPM schedule, rescaled to zero terminal SNR when `cfg.zero_terminal_snr` (Lin et al.
    2023; it needs a v-prediction model, checked here once the model's prediction type is known)."""
    if not cfg.zero_terminal_snr:
        return noise_scheduler
    if noise_scheduler.config.prediction_type != "v_prediction":
        raise ConfigError("zero_terminal_snr needs a v-prediction model (set prediction_type v_prediction when "
                          f"training one); this model predicts {noise_scheduler.config.prediction_type}")
    return type(noise_scheduler).from_config(noise_scheduler.config, rescale_betas_zero_snr=True)


def frozen_after_caching(run: Run) -> list[torch.nn.Module]:
    """The frozen models the steps no longer call once caches are filled: the text encoders with cached
    outputs, the VAE when every latent is cached (the loop moves them off the GPU)."""
    cfg = run.cfg
    out = list(run.base.text_encoders) if cfg.cache_text_encoder_outputs else []
    if cfg.cache_latents and run.dataset.latents_cached:
        out.append(run.base.vae)
    return out


def make_step(cfg: TrainConfig, methods: list[Trainable], family: str, noise_scheduler, tokenizers: list,
              text_encoders: list, device: torch.device, weight_dtype: torch.dtype,
              encode_images=None) -> DiffusionStep:
    """The diffusion step `cfg` asks for; `text_encoders` are the prepared ones when they are trained."""
    return DiffusionStep(family, noise_scheduler, tokenizers, text_encoders, device, weight_dtype,
                         clip_skip=cfg.clip_skip, max_token_length=cfg.max_token_length,
                         noise_offset=cfg.noise_offset, min_snr_gamma=cfg.min_snr_gamma,
                         prior_loss_weight=cfg.prior_loss_weight, text_grad=any(m.text_grad for m in methods),
                         expand=_expander(methods), encode_images=encode_images, variants=Variants.from_config(cfg))


def make_update(cfg: TrainConfig, methods: list[Trainable], accelerator, optimizer, lr_scheduler) -> OptimizerStep:
    """The update of every trained parameter (clipped at `max_grad_norm`) from one loss."""
    return OptimizerStep(accelerator, optimizer, lr_scheduler, trainable_params(methods), cfg.max_grad_norm,
                         outside_ddp=[p for m in methods if m.outside_ddp for p in trainable_params([m])])


def trainable_params(methods: list[Trainable]) -> list[torch.nn.Parameter]:
    """Every trained parameter, in the order of the methods' modules (clipped together)."""
    return [p for m in methods for mod in m.modules().values() for p in mod.parameters() if p.requires_grad]


def _expander(methods: list[Trainable]):
    """One function writing out every method's new tokens in a caption (the identity without new tokens)."""

    def expand(text: str) -> str:
        for m in methods:
            text = m.expand(text)
        return text

    return expand


def _training_data(cfg: TrainConfig, base, methods: list[Trainable], accelerator, show_progress: bool):
    """The dataset (buckets, captions, class images, optional latent cache), the number of images, the
    image encoder the step uses when latents are not cached, and its sampling generator."""
    from ..data.dataset import CaptionProcessor, TrainDataset, load_image_folder

    out_dir, is_main = Path(cfg.output_dir), accelerator.is_main_process
    items = load_image_folder(cfg.train_data_dir, caption_extension=cfg.caption_extension,
                              default_repeats=cfg.repeats)
    items, held_out = split_validation(cfg, items)
    if cfg.token_string:
        _check_token_in_captions(items, cfg.token_string)
    reg_dir = cfg.reg_data_dir or (str(out_dir / "class_images") if cfg.num_class_images else None)
    if cfg.num_class_images:  # DreamBooth prior preservation: make the missing class images with the base model
        if is_main:
            from .class_images import generate_class_images

            generate_class_images(base.pipe, cfg.class_prompt, reg_dir, cfg.num_class_images, seed=cfg.seed,
                                  steps=cfg.sample_steps, cfg_scale=cfg.sample_cfg, sampler=cfg.sample_sampler,
                                  family=base.family, progress=show_progress)
        accelerator.wait_for_everyone()
    if reg_dir:
        items += load_image_folder(reg_dir, caption_extension=cfg.caption_extension,
                                   default_repeats=cfg.repeats, is_class=True)
    buckets = dict(resolution=cfg.resolution, enable_bucket=cfg.enable_bucket, min_bucket_reso=cfg.min_bucket_reso,
                   max_bucket_reso=cfg.max_bucket_reso, bucket_reso_steps=cfg.bucket_reso_steps,
                   bucket_no_upscale=cfg.bucket_no_upscale, seed=cfg.seed)
    masks = masks_for(cfg, items)
    dataset = TrainDataset(
        items, **buckets, flip=cfg.flip_aug, mask_source=masks,
        caption_processor=CaptionProcessor(shuffle=cfg.shuffle_caption, keep_tokens=cfg.keep_tokens,
                                           dropout=cfg.caption_dropout_rate,
                                           tag_dropout=cfg.caption_tag_dropout_rate),
    )
    validation_set = TrainDataset(held_out, **buckets, flip=False, mask_source=masks) if held_out else None
    vae, device = base.vae, accelerator.device
    vae_gen = torch.Generator(device=device).manual_seed(cfg.seed)
    encode_images = vae_encoder(vae, device, vae_gen)
    if cfg.cache_latents:
        cache_dir = out_dir / "latent_cache" if cfg.cache_latents_to_disk else None
        with accelerator.main_process_first():
            dataset.cache_latents(encode_images, cache_dir=cache_dir, show_progress=show_progress and is_main,
                                  encoder_id=f"{cfg.pretrained_model}|{cfg.vae}|{vae.config.scaling_factor}|"
                                             f"{getattr(vae.config, 'shift_factor', None)}")
    return dataset, len(items), encode_images, vae_gen, validation_set


def masks_for(cfg: TrainConfig, items: list):
    """The loss masks' source for masked_loss ("alpha" or a folder), with a warning naming images that have
    none (they count everywhere); ConfigError when there is nothing to read masks from."""
    from ..data.masks import find_mask, load_mask, mask_source

    try:
        source = mask_source(cfg.masked_loss, cfg.alpha_mask, cfg.mask_dir, cfg.train_data_dir)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if source is None:
        return None
    own = [it for it in items if not it.is_class]
    lacking = [Path(it.path).name for it in own
               if (load_mask(Path(it.path), source) is None if source == "alpha" else
                   find_mask(Path(it.path), Path(source)) is None)]
    if len(lacking) == len(own):
        raise ConfigError(f"masked_loss: none of the {len(own)} training images has a mask "
                          f"({'no transparency' if source == 'alpha' else f'nothing matching in {source}'})")
    if lacking:
        warnings.warn(f"masked_loss: {len(lacking)} of {len(own)} images have no mask and count everywhere: "
                      f"{', '.join(lacking[:5])}{' ...' if len(lacking) > 5 else ''}", UserWarning, stacklevel=2)
    return source


def split_validation(cfg: TrainConfig, items: list) -> tuple[list, list]:
    """(training items, held-out items): `validation_data_dir`'s images, or a `validation_split` share of the
    training images picked by the seed (at least one; at least one left to train on); none by default."""
    import random

    from ..data.dataset import load_image_folder

    if cfg.validation_data_dir:
        return items, load_image_folder(cfg.validation_data_dir, caption_extension=cfg.caption_extension)
    if not cfg.validation_split:
        return items, []
    if len(items) < 2:
        raise ConfigError(f"validation_split needs at least 2 training images to hold one out, "
                          f"{cfg.train_data_dir} has {len(items)}")
    n = min(len(items) - 1, max(1, round(cfg.validation_split * len(items))))
    chosen = set(random.Random(cfg.seed).sample(range(len(items)), n))
    return ([it for i, it in enumerate(items) if i not in chosen], [it for i, it in enumerate(items) if i in chosen])


MIN_BATCHES_FOR_WORKERS = 8   # workers start anew each epoch (the epoch's flips and crops reach them that way)


def loader_workers(cfg: TrainConfig, device_type: str, batches_per_epoch: int, cores: int | None = None) -> int:
    """DataLoader worker processes for this run: `max_data_loader_n_workers` when set; else none when every latent
    is cached (nothing to decode), on a CPU (the step already uses every core: a worker only takes one away; on 2
    cores that made each step 0.12 s slower) or when an epoch is too short to pay for starting them; else up to 2,
    leaving a core to the main process, which feeds the GPU."""
    if cfg.max_data_loader_n_workers is not None:
        return cfg.max_data_loader_n_workers
    if cfg.cache_latents or device_type != "cuda" or batches_per_epoch < MIN_BATCHES_FOR_WORKERS:
        return 0
    return min(2, max(0, (cores or os.cpu_count() or 1) - 1))


def _loader(cfg: TrainConfig, dataset, device_type: str):
    """The bucket sampler and the data loader over it (workers as `loader_workers` decides)."""
    from ..data.dataset import BucketBatchSampler, collate

    sampler = BucketBatchSampler(dataset, cfg.train_batch_size, seed=cfg.seed)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate,
        num_workers=loader_workers(cfg, device_type, len(sampler)), pin_memory=device_type == "cuda")
    return sampler, loader


def resume_into(run: Run, prog: Progress) -> None:
    """Put a saved state back: trained weights, optimizer, schedule, grad scaler and the position in the data."""
    state, acc = run.state, run.accelerator
    prog.loss_sum = torch.zeros((), device=acc.device)
    if state is None:
        return
    from .state import load_trainable

    load_trainable(run.modules(), state.trainable, state.path)
    if run.ema is not None:
        if state.ema is None:
            raise ConfigError(f"{state.path} holds no EMA: it was saved by a run without ema_decay")
        run.ema.load_state_dict(state.ema, str(state.path))
    run.optimizer.load_state_dict(state.optimizer)
    run.lr_scheduler.load_state_dict(state.lr_scheduler)
    if state.scaler is not None and acc.scaler is not None:
        acc.scaler.load_state_dict(state.scaler)
    prog.step, prog.epoch, prog.batch_in_epoch = state.step, state.epoch, state.batch_in_epoch
    if acc.process_index < len(state.rng):
        prog.pending_rng = state.rng[acc.process_index]  # restored when the data loader has started
        prog.loss_sum += prog.pending_rng.get("loss_sum", 0.0)
        prog.loss_count = int(prog.pending_rng.get("loss_count", 0))
    if len(state.rng) != acc.num_processes and acc.is_main_process:
        warnings.warn(f"the state was saved by {len(state.rng)} process(es), this run has "
                      f"{acc.num_processes}: it continues, but not exactly as the original run would "
                      f"have (data order and noise differ).", RuntimeWarning, stacklevel=3)
    if acc.is_main_process:
        print(f"resuming from {state.path} at step {prog.step} (epoch {prog.epoch + 1}, "
              f"batch {prog.batch_in_epoch} of {len(run.loader)})")


def _check_token_in_captions(items, token: str) -> None:
    """Textual inversion learns a token from the captions that contain it: none would teach nothing."""
    from ..sd.embeddings import token_pattern

    pattern = token_pattern(token)
    lacking = [i for i in items if not pattern.search(i.caption)]
    if len(lacking) == len(items):
        raise ConfigError(f"no caption contains token_string {token!r}, so nothing would teach it. Put it in the "
                          f"captions (python -m helpers tag <folder> --trigger {token}), e.g. '{token}, a photo of ...'")
    if lacking:
        warnings.warn(f"{len(lacking)} of {len(items)} captions lack token_string {token!r} (e.g. "
                      f"{Path(lacking[0].path).name}); those images train nothing for it", RuntimeWarning, stacklevel=5)
