"""The training loop: LoRA on the UNet (and optionally the text encoders) of SD 1.x/2.x/SDXL.

Read top to bottom: `train()` sets up (model, LoRA, data, optimizer), then runs the loop; the
helpers below it compute the loss, encode images, sample, validate and save. It runs unchanged on
CPU and CUDA, and on several processes under `accelerate launch`.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..config import ConfigError, TrainConfig, save_config
from ..formats.lora import model_name_for_metadata
from ..sd.precision import accelerate_precision, decide_precision
from ..sd.text_encoding import encode_prompts, sdxl_time_ids
from ..sd.transfer import to_device
from .errors import TrainingError, nan_message, oom_advice

MAX_NAN_SKIPS = 5  # nan_policy="skip": this many bad steps in a row stop the run

Event = Callable[[str, dict[str, Any]], None]


@dataclass
class TrainResult:
    """What a finished run produced."""

    lora_path: Path | None
    output_dir: Path
    steps: int
    epochs: int
    final_loss: float | None
    log_path: Path
    saved: list[Path] = field(default_factory=list)
    samples: list[Path] = field(default_factory=list)
    states: list[Path] = field(default_factory=list)
    resumed_from: Path | None = None
    skipped_steps: int = 0      # steps skipped for a NaN/inf loss (nan_policy="skip")


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


# ================================================================================================
# The run
# ================================================================================================

def train(cfg: TrainConfig, *, base=None, on_event: Event | None = None, progress: bool = True,
          resume: bool | str | None = None) -> TrainResult:
    """Train a LoRA as `cfg` says and save it (kohya and/or diffusers layout) with its config.

    `base` may pass an already loaded `helpers.sd.models.BaseModel` (notebooks reuse one); it is
    modified in place (LoRA layers are added to it). `on_event(kind, data)` receives "start",
    "log", "sample", "save", "state" and "end" events for live plots. `resume=True` (or "latest", or a
    state folder) continues from a saved training state; it overrides `cfg.resume`.
    Errors that stop the run (NaN loss, out of memory) raise `TrainingError` with advice.
    """
    if resume is not None:
        cfg = cfg.replace(resume="latest" if resume is True else (str(resume) if resume else None))
    progress_box: dict[str, Any] = {"step": 0, "last_saved": None}
    try:
        return _train(cfg, base, on_event or (lambda kind, data: None), progress, progress_box)
    except torch.OutOfMemoryError:
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise TrainingError(oom_advice(cfg, step=progress_box["step"], last_saved=progress_box["last_saved"])) from None


def _train(cfg: TrainConfig, base, emit: Event, progress: bool, box: dict[str, Any]) -> TrainResult:
    """The run itself; `box` tells the caller how far it got (for error messages)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from peft import LoraConfig

    from ..data.dataset import BucketBatchSampler, CaptionProcessor, TrainDataset, collate, load_image_folder
    from ..sd.lora_targets import inject_lora, text_encoder_target_modules, unet_target_modules
    from ..sd.models import load_base, set_attention

    from .state import (
        capture_rng, check_config_compatible, find_resume_state, load_state, load_trainable, prune_states,
        restore_rng, save_state, state_name, states_dir, trainable_tensors
    )

    check_ready(cfg)
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    # accelerate keeps its settings in a process-wide singleton: a notebook that trains twice with other
    # precision settings would fail. Reset those settings, keep the distributed state (PartialState).
    from accelerate.state import AcceleratorState
    from accelerate.utils import DataLoaderConfiguration

    AcceleratorState._reset_state()
    accelerator = Accelerator(
        # cpu=True on GPU-less machines also lets accelerate see a multi-process CPU world (gloo) when
        # started by `accelerate launch --multi_gpu` / torchrun; MPS users are not served here.
        cpu=device_type == "cpu" and not torch.backends.mps.is_available(),
        mixed_precision=resolve_mixed_precision(cfg.mixed_precision, device_type),
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        # batches come from pinned memory (see the loader below): copy them to the GPU without waiting
        dataloader_config=DataLoaderConfiguration(non_blocking=device_type == "cuda"),
    )
    is_main = accelerator.is_main_process
    out_dir = Path(cfg.output_dir)
    # a saved state to continue from: every process reads the same folder
    state_path = find_resume_state(cfg.resume, out_dir, cfg.output_name)
    state = load_state(state_path) if state_path else None
    if state is not None:
        check_config_compatible(state.info.get("config", {}), cfg.to_dict(), state.path)
    elif cfg.resume and is_main:
        print(f"resume={cfg.resume!r}: no saved state under {states_dir(out_dir)} yet; starting from the beginning")
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / f"{cfg.output_name}.toml")
    set_seed(cfg.seed)

    # --- 1. the base model, frozen, weights in the compute dtype -----------------------------
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    if base is None:
        base = load_base(cfg.pretrained_model, device=accelerator.device, dtype=weight_dtype, vae=cfg.vae,
                         config=cfg.model_config, family=None if cfg.family == "auto" else cfg.family,
                         prediction_type=None if cfg.prediction_type == "auto" else cfg.prediction_type)
    unet, vae = base.unet, base.vae
    text_encoders, tokenizers = base.text_encoders, base.tokenizers
    if any(getattr(m, "peft_config", None) for m in [unet, *text_encoders]):
        # a notebook reusing its BaseModel: start from the plain base, not on top of an earlier LoRA
        print("removing LoRA layers left on the base model by an earlier run or load_loras()")
        base.pipe.unload_lora_weights()
    for module in [unet, vae, *text_encoders]:
        module.requires_grad_(False)
    attention_used = set_attention(unet, cfg.attention)

    # --- 2. what is trained: LoRA layers (peft), the whole UNet (DreamBooth), new token vectors ----
    def lora_config(targets: list[str]) -> LoraConfig:
        return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.lora_dropout,
                          init_lora_weights=True, target_modules=targets)

    trained_tes = list(text_encoders) if cfg.train_text_encoder else []
    if cfg.method == "lora":
        inject_lora(unet, lora_config(unet_target_modules(unet, cfg.target)))
        for te in trained_tes:
            inject_lora(te, lora_config(text_encoder_target_modules(te, cfg.target)))
    elif cfg.method == "dreambooth":  # every weight; fp32 master copies, the forward runs in the compute dtype
        for module in [unet, *trained_tes]:
            module.requires_grad_(True)
    embeddings = None  # textual inversion, or pivotal tuning with a LoRA
    if cfg.token_string:
        from ..sd.embeddings import NewTokenEmbeddings

        embeddings = NewTokenEmbeddings(tokenizers, text_encoders, cfg.token_string, cfg.init_word,
                                        cfg.num_vectors_per_token).to(accelerator.device)
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

    # --- 3. data: buckets, captions, class images, optional latent cache ------------------------
    items = load_image_folder(cfg.train_data_dir, caption_extension=cfg.caption_extension,
                              default_repeats=cfg.repeats)
    if embeddings is not None:
        _check_token_in_captions(items, cfg.token_string)
    reg_dir = cfg.reg_data_dir or (str(out_dir / "class_images") if cfg.num_class_images else None)
    if cfg.num_class_images:  # DreamBooth prior preservation: make the missing class images with the base model
        if is_main:
            from .class_images import generate_class_images

            generate_class_images(base.pipe, cfg.class_prompt, reg_dir, cfg.num_class_images, seed=cfg.seed,
                                  steps=cfg.sample_steps, cfg_scale=cfg.sample_cfg, sampler=cfg.sample_sampler,
                                  family=base.family, progress=progress)
        accelerator.wait_for_everyone()
    if reg_dir:
        items += load_image_folder(reg_dir, caption_extension=cfg.caption_extension,
                                   default_repeats=cfg.repeats, is_class=True)
    dataset = TrainDataset(
        items, resolution=cfg.resolution, enable_bucket=cfg.enable_bucket,
        min_bucket_reso=cfg.min_bucket_reso, max_bucket_reso=cfg.max_bucket_reso,
        bucket_reso_steps=cfg.bucket_reso_steps, bucket_no_upscale=cfg.bucket_no_upscale,
        flip=cfg.flip_aug, seed=cfg.seed,
        caption_processor=CaptionProcessor(shuffle=cfg.shuffle_caption, keep_tokens=cfg.keep_tokens,
                                           dropout=cfg.caption_dropout_rate,
                                           tag_dropout=cfg.caption_tag_dropout_rate),
    )
    vae_gen = torch.Generator(device=accelerator.device).manual_seed(cfg.seed)
    encode_images = _vae_encoder(vae, accelerator.device, vae_gen)
    if cfg.cache_latents:
        cache_dir = out_dir / "latent_cache" if cfg.cache_latents_to_disk else None
        with accelerator.main_process_first():
            dataset.cache_latents(encode_images, cache_dir=cache_dir, show_progress=progress and is_main,
                                  encoder_id=f"{cfg.pretrained_model}|{cfg.vae}|{vae.config.scaling_factor}|"
                                             f"{getattr(vae.config, 'shift_factor', None)}")
    sampler = BucketBatchSampler(dataset, cfg.train_batch_size, seed=cfg.seed)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate,
        num_workers=0 if cfg.cache_latents else min(2, max(0, (os.cpu_count() or 1) - 1)),
        pin_memory=device_type == "cuda")

    # --- 4. optimizer and schedule ------------------------------------------------------------
    from .optim import build_optimizer, build_scheduler, optimizer_kind

    groups = []
    if cfg.method != "textual_inversion":
        groups.append({"params": [p for p in unet.parameters() if p.requires_grad], "lr": cfg.learning_rate})
    for te in trained_tes:
        groups.append({"params": [p for p in te.parameters() if p.requires_grad], "lr": cfg.te_lr})
    if embeddings is not None:  # no weight decay on token vectors (it would pull them towards zero)
        groups.append({"params": list(embeddings.parameters()), "lr": cfg.emb_lr, "weight_decay": 0.0})
    optimizer = build_optimizer(cfg.optimizer, groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
    updates_per_epoch = math.ceil(math.ceil(len(loader) / accelerator.num_processes)
                                  / cfg.gradient_accumulation_steps)
    max_steps = cfg.max_train_epochs * updates_per_epoch if cfg.max_train_epochs else cfg.max_train_steps
    num_epochs = math.ceil(max_steps / updates_per_epoch)
    # accelerate steps a prepared scheduler once per process per optimizer step
    lr_scheduler = build_scheduler(cfg.lr_scheduler, optimizer,
                                   warmup_steps=cfg.lr_warmup_steps * accelerator.num_processes,
                                   total_steps=max_steps * accelerator.num_processes,
                                   num_cycles=cfg.lr_num_cycles, power=cfg.lr_power)

    prepared = accelerator.prepare(unet, *trained_tes, optimizer, loader, lr_scheduler)
    unet, trained_tes = prepared[0], list(prepared[1:1 + len(trained_tes)])
    optimizer, loader, lr_scheduler = prepared[-3:]
    if cfg.train_text_encoder:
        text_encoders = trained_tes

    noise_scheduler = base.noise_scheduler()
    prediction_type = noise_scheduler.config.prediction_type
    noise_gen = torch.Generator(device=accelerator.device).manual_seed(cfg.seed + accelerator.process_index)
    generators = {"noise": noise_gen, "vae": vae_gen}
    run = _Run(cfg, accelerator, base, noise_scheduler, tokenizers, text_encoders, encode_images, weight_dtype,
               embeddings)
    models = [unet, *trained_tes]
    named_models = {"unet": accelerator.unwrap_model(unet)}
    named_models.update({f"text_encoder_{i}": accelerator.unwrap_model(te) for i, te in enumerate(trained_tes)})
    if embeddings is not None:
        named_models["embeddings"] = embeddings
    trainable = [p for m in named_models.values() for p in m.parameters() if p.requires_grad]

    # --- 4b. resuming: put back weights, optimizer, schedule and the position in the data --------
    global_step, start_epoch, skip_batches, pending_rng = 0, 0, 0, None
    loss_sum = torch.zeros((), device=accelerator.device)
    loss_count = 0
    if state is not None:
        load_trainable(named_models, state.trainable, state.path)
        optimizer.load_state_dict(state.optimizer)
        lr_scheduler.load_state_dict(state.lr_scheduler)
        if state.scaler is not None and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(state.scaler)
        global_step, start_epoch, skip_batches = state.step, state.epoch, state.batch_in_epoch
        if accelerator.process_index < len(state.rng):
            pending_rng = state.rng[accelerator.process_index]  # restored when the data loader has started
            loss_sum += pending_rng.get("loss_sum", 0.0)
            loss_count = int(pending_rng.get("loss_count", 0))
        if len(state.rng) != accelerator.num_processes and is_main:
            warnings.warn(f"the state was saved by {len(state.rng)} process(es), this run has "
                          f"{accelerator.num_processes}: it continues, but not exactly as the original run would "
                          f"have (data order and noise differ).", RuntimeWarning, stacklevel=2)
        run._kept = [[Path(p) for p in group] for group in state.info.get("lora_saves", [])]
        if is_main:
            print(f"resuming from {state.path} at step {global_step} (epoch {start_epoch + 1}, "
                  f"batch {skip_batches} of {len(loader)})")
    box["step"] = global_step

    # --- 5. the loop ----------------------------------------------------------------------------
    if is_main:
        print(f"{base.describe()}\n"
              f"{_method_line(cfg, trained_tes)}, "
              f"{sum(p.numel() for p in trainable):,} trainable params; {len(dataset)} samples/epoch "
              f"({len(items)} images), batch {cfg.train_batch_size} x accum {cfg.gradient_accumulation_steps} "
              f"x {accelerator.num_processes} process(es); {max_steps} steps, {num_epochs} epoch(s); "
              f"optimizer {optimizer_kind(optimizer)}, precision {accelerator.mixed_precision}, "
              f"attention {attention_used}")
    emit("start", {"max_steps": max_steps, "start_step": global_step, "epochs": num_epochs,
                   "samples_per_epoch": len(dataset)})
    log_path = out_dir / f"{cfg.output_name}_log.csv"
    logger = _CsvLog(log_path, keep_until=global_step if state is not None else None) if is_main else None
    val_batch = run.validation_batch(dataset) if cfg.validation_every_n_steps and is_main else None
    if val_batch is not None and state is None:  # the baseline: the model before any update
        record = {"step": 0, "epoch": 0, "val_loss": run.fixed_noise_loss(accelerator.unwrap_model(unet), val_batch)}
        logger.write(record)
        emit("log", record)
    result = TrainResult(None, out_dir, global_step, start_epoch, None, log_path,
                         resumed_from=state.path if state is not None else None)
    bar = tqdm(total=max_steps, initial=global_step, disable=not (progress and is_main), desc="training", unit="step")
    last_log_step, t_last = global_step, time.perf_counter()
    nan_in_row = 0
    # nan_policy "stop" never syncs per step: the first bad step is kept on the device and read when a log,
    # sample or save is due (a save never writes weights a NaN has touched). "skip" must decide before each update.
    check_every_step = cfg.nan_policy == "skip"
    first_bad = torch.zeros((), dtype=torch.long, device=accelerator.device)

    def raise_if_nan() -> None:
        """Stop with advice if any process saw a NaN/inf loss since the start (one sync; all ranks call it)."""
        if check_every_step:
            return
        steps = accelerator.gather(first_bad.reshape(1)) if accelerator.num_processes > 1 else first_bad.reshape(1)
        bad = [int(s) for s in steps.tolist() if s > 0]
        if bad:
            raise TrainingError(nan_message(
                min(bad), precision=accelerator.mixed_precision, learning_rate=cfg.learning_rate,
                optimizer=cfg.optimizer, family=base.family, vae=cfg.vae, last_saved=box["last_saved"], skipped=0))

    def save_training_state(epoch_to_continue: int, batch_in_epoch: int) -> None:
        """Every process sends its RNG states to rank 0, which writes the state folder and prunes old ones."""
        from accelerate.utils import gather_object

        mine = capture_rng(generators)
        mine["loss_sum"], mine["loss_count"] = loss_sum.item(), loss_count
        every_rank = gather_object([mine])
        if is_main:
            folder = states_dir(out_dir) / state_name(cfg.output_name, global_step)
            save_state(folder, trainable=trainable_tensors(named_models), optimizer=optimizer.state_dict(),
                       lr_scheduler=lr_scheduler.state_dict(),
                       scaler=accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                       rng=every_rank,
                       info={"step": global_step, "epoch": epoch_to_continue, "batch_in_epoch": batch_in_epoch,
                             "num_processes": accelerator.num_processes, "family": base.family,
                             "config": cfg.to_dict(), "lora_saves": [[str(p) for p in g] for g in run._kept]})
            prune_states(out_dir, cfg.output_name, cfg.save_state_last_n)
            result.states.append(folder)
            box["last_saved"] = folder
            emit("state", {"step": global_step, "path": folder})
        accelerator.wait_for_everyone()

    def state_due() -> bool:
        every = cfg.save_state_every_n_steps
        return bool(every) and global_step % every == 0 and global_step < max_steps

    for epoch in range(start_epoch, num_epochs):
        if global_step >= max_steps:
            break
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        for m in models:
            m.train()
        batch_in_epoch = skip_batches if epoch == start_epoch else 0
        epoch_loader = loader
        if batch_in_epoch:
            epoch_loader = accelerator.skip_first_batches(loader, batch_in_epoch)  # skips indices, loads nothing
        # accelerate's loaders count epochs themselves and re-seed the sampler with that count when iterated:
        # a resumed run's fresh loader would count from 0, so tell it the real epoch
        if hasattr(epoch_loader, "set_epoch"):
            epoch_loader.set_epoch(epoch)
        if pending_rng is not None and not batch_in_epoch:
            restore_rng(pending_rng, generators)  # a state saved at an epoch's end: the RNG as this epoch begins
            pending_rng = None
        state_at_epoch_end = False
        for batch in epoch_loader:
            if pending_rng is not None:  # a state saved mid-epoch: the RNG as it was after the saved step
                restore_rng(pending_rng, generators)
                pending_rng = None
            batch_in_epoch += 1
            with accelerator.accumulate(*models):
                loss = run.loss(unet, batch, prediction_type, noise_gen)
                if check_every_step:
                    finite = _all_finite(loss, accelerator)
                else:  # noted on the device; raise_if_nan reads it when a log or save is due
                    first_bad = torch.where(~torch.isfinite(loss.detach()) & (first_bad == 0), global_step + 1,
                                            first_bad)
                    finite = True
                if finite:
                    nan_in_row = 0
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and embeddings is not None and accelerator.num_processes > 1:
                        _average_gradients(embeddings.parameters(), accelerator)  # DDP does not see them
                    if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    loss_sum += loss.detach()
                    loss_count += 1
                else:
                    nan_in_row += 1
                    result.skipped_steps += 1
                    if nan_in_row >= MAX_NAN_SKIPS:
                        raise TrainingError(nan_message(
                            global_step + 1, precision=accelerator.mixed_precision, learning_rate=cfg.learning_rate,
                            optimizer=cfg.optimizer, family=base.family, vae=cfg.vae, last_saved=box["last_saved"],
                            skipped=nan_in_row))
                    optimizer.zero_grad(set_to_none=True)  # drop this window's gradients, no update
                    if is_main:
                        print(f"step {global_step + 1}: loss is NaN/inf, step skipped ({nan_in_row} in a row)")
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            box["step"] = global_step
            bar.update(1)

            validate = bool(cfg.validation_every_n_steps) and global_step % cfg.validation_every_n_steps == 0
            logged = global_step % cfg.log_every_n_steps == 0 or global_step == max_steps or validate
            sample_due = bool(cfg.sample_every_n_steps) and global_step % cfg.sample_every_n_steps == 0
            save_due = (bool(cfg.save_every_n_steps) and global_step % cfg.save_every_n_steps == 0
                        and global_step < max_steps)
            if logged or sample_due or save_due or state_due():
                raise_if_nan()
            if logged:
                now = time.perf_counter()
                count = max(loss_count, 1)
                record = {"step": global_step, "epoch": epoch + 1,
                          "loss": accelerator.reduce(loss_sum, "mean").item() / count if loss_count else float("nan"),
                          "lr": lr_scheduler.get_last_lr()[0],
                          "lr_te": lr_scheduler.get_last_lr()[-1] if trained_tes else None,
                          "step_time_s": (now - t_last) / max(1, global_step - last_log_step)}
                if device_type == "cuda":
                    record["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
                loss_sum.zero_()
                loss_count, last_log_step = 0, global_step
                result.final_loss = record["loss"]
                if val_batch is not None and validate:
                    record["val_loss"] = run.fixed_noise_loss(accelerator.unwrap_model(unet), val_batch)
                if is_main:
                    logger.write(record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                emit("log", record)
            if is_main and sample_due:
                paths = run.sample(accelerator.unwrap_model(unet), global_step)
                result.samples += paths
                emit("sample", {"step": global_step, "paths": paths})
            if save_due:
                saved = run.save(unet, trained_tes, f"{cfg.output_name}-step{global_step:06d}",
                                 global_step, epoch + 1, dataset, emit)
                result.saved += saved
                box["last_saved"] = saved[0] if saved else box["last_saved"]
            if state_due():
                if batch_in_epoch < len(loader):
                    save_training_state(epoch, batch_in_epoch)
                else:
                    state_at_epoch_end = True  # after the epoch's own saves, as the start of the next epoch
            if logged:
                t_last = time.perf_counter()  # step time excludes validation, sampling and saving
            if global_step >= max_steps:
                break
        result.epochs = epoch + 1
        epoch_save_due = (bool(cfg.save_every_n_epochs) and (epoch + 1) % cfg.save_every_n_epochs == 0
                          and global_step < max_steps)
        if epoch_save_due:  # (a state at the epoch's end was checked at its step, as state_due)
            raise_if_nan()
            saved = run.save(unet, trained_tes, f"{cfg.output_name}-{epoch + 1:06d}",
                             global_step, epoch + 1, dataset, emit)
            result.saved += saved
            box["last_saved"] = saved[0] if saved else box["last_saved"]
        if state_at_epoch_end:
            save_training_state(epoch + 1, 0)
    bar.close()
    raise_if_nan()

    # --- 6. the final LoRA ------------------------------------------------------------------------
    result.steps = global_step
    result.epochs = max(result.epochs, start_epoch)
    final = run.save(unet, trained_tes, cfg.output_name, global_step, result.epochs, dataset, emit, final=True)
    if embeddings is not None:  # the trained vectors go into the tables: the pipeline is ready for prompts
        embeddings.write_into_encoders()
        embeddings.remove_hooks()
    result.saved = [p for p in result.saved + final if p.exists()]  # pruned saves are gone
    result.lora_path = final[0] if final else None
    accelerator.wait_for_everyone()
    emit("end", {"steps": global_step, "lora_path": result.lora_path})
    accelerator.end_training()
    return result


# ================================================================================================
# The pieces
# ================================================================================================

class _Run:
    """State the loop's helpers share: config, accelerator, model parts, encoders."""

    def __init__(self, cfg, accelerator, base, noise_scheduler, tokenizers, text_encoders, encode_images,
                 weight_dtype, embeddings=None):
        self.cfg, self.acc, self.base = cfg, accelerator, base
        self.noise_scheduler = noise_scheduler
        self.tokenizers, self.text_encoders = tokenizers, text_encoders
        self.encode_images = encode_images
        self.weight_dtype = weight_dtype
        self.device = accelerator.device
        self.alphas_cumprod = noise_scheduler.alphas_cumprod.to(self.device, torch.float32)
        self._kept: list[list[Path]] = []
        self.embeddings = embeddings  # new token vectors (textual inversion / pivotal tuning) or None
        self.text_grad = cfg.train_text_encoder or embeddings is not None

    def expand(self, texts: list[str]) -> list[str]:
        """Captions/prompts with a multi-vector token written out as all its tokens."""
        return [self.embeddings.expand(t) for t in texts] if self.embeddings is not None else list(texts)

    # -- conditioning --------------------------------------------------------------------------
    def condition(self, batch: dict) -> dict[str, Any]:
        """UNet keyword arguments for a batch: text embeddings and, for SDXL, pooled + time ids."""
        with torch.set_grad_enabled(self.text_grad):
            emb = encode_prompts(self.base.family, self.tokenizers, self.text_encoders, self.expand(batch["captions"]),
                                 clip_skip=self.cfg.clip_skip, device=self.device)
        kwargs: dict[str, Any] = {"encoder_hidden_states": emb.hidden}
        if self.base.family == "sdxl":
            time_ids = sdxl_time_ids(batch["original_size"], batch["crop_top_left"], batch["target_size"])
            kwargs["added_cond_kwargs"] = {"text_embeds": emb.pooled, "time_ids": to_device(time_ids, self.device)}
        return kwargs

    def latents_of(self, batch: dict) -> torch.Tensor:
        if "latents" in batch:
            return batch["latents"].to(self.device, torch.float32)
        with torch.no_grad():
            return self.encode_images(batch["pixel_values"]).to(self.device, torch.float32)

    # -- the loss --------------------------------------------------------------------------------
    def loss(self, unet, batch: dict, prediction_type: str, gen: torch.Generator,
             noise: torch.Tensor | None = None, timesteps: torch.Tensor | None = None) -> torch.Tensor:
        """Diffusion loss for one batch: MSE to the noise (or v), with min-SNR weighting and the
        prior-preservation weight on class images. `noise`/`timesteps` fix the draw (validation)."""
        cfg = self.cfg
        latents = self.latents_of(batch)
        b = latents.shape[0]
        if noise is None:
            noise = torch.randn(latents.shape, generator=gen, device=self.device)
            if cfg.noise_offset:
                noise = noise + cfg.noise_offset * torch.randn((b, latents.shape[1], 1, 1), generator=gen,
                                                               device=self.device)
        if timesteps is None:
            timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (b,), generator=gen,
                                      device=self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        pred = unet(noisy.to(self.weight_dtype), timesteps, **self.condition(batch)).sample
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        is_class = (to_device(batch["is_class"], self.device) if "is_class" in batch
                    else torch.zeros(b, dtype=torch.bool, device=self.device))
        weights = loss_weights(timesteps, self.alphas_cumprod, is_class, prediction_type=prediction_type,
                               min_snr_gamma=cfg.min_snr_gamma, prior_loss_weight=cfg.prior_loss_weight)
        return (per_sample * weights).mean()

    # -- fixed-noise validation ------------------------------------------------------------------
    def validation_batch(self, dataset) -> list[dict]:
        """A few distinct training images (plain, raw captions), each with a fixed noise and timestep.

        One batch per image: images may sit in different buckets."""
        from ..data.dataset import collate

        first_entry: dict[int, int] = {}
        for entry, item_idx in enumerate(dataset.entries):
            first_entry.setdefault(item_idx, entry)
        entries = list(first_entry.values())[: self.cfg.validation_images]
        gen = torch.Generator().manual_seed(self.cfg.seed + 7)
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.linspace(50, steps - 50, len(entries)).long()
        batches = []
        for k, entry in enumerate(entries):
            batch = collate([dataset.example(entry, augment=False)])
            batch["latents"] = self.latents_of(batch)
            batch.pop("pixel_values", None)
            batch["_noise"] = torch.randn(batch["latents"].shape, generator=gen).to(self.device)
            batch["_timesteps"] = timesteps[k:k + 1].to(self.device)
            batches.append(batch)
        return batches

    @torch.no_grad()
    def fixed_noise_loss(self, unet, batches: list[dict]) -> float:
        """Mean loss over the validation images at their fixed noise: comparable across steps."""
        was_training = unet.training
        unet.eval()
        prediction_type = self.noise_scheduler.config.prediction_type
        losses = [self.loss(unet, b, prediction_type, None, noise=b["_noise"], timesteps=b["_timesteps"]).item()
                  for b in batches]
        unet.train(was_training)
        return sum(losses) / len(losses)

    # -- samples -----------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, unet, step: int) -> list[Path]:
        from ..generate.inference import generate
        from ..formats.png_info import save_png

        cfg = self.cfg
        pipe = self.base.pipe
        was_training = unet.training
        unet.eval()
        out = Path(cfg.output_dir) / "samples"
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        size = cfg.resolution
        for i, prompt in enumerate(cfg.sample_prompts):
            with self.acc.autocast():
                    images, params = generate(pipe, self.expand([prompt])[0], negative_prompt=cfg.sample_negative_prompt,
                                          steps=cfg.sample_steps, cfg_scale=cfg.sample_cfg,
                                          seed=cfg.sample_seed + i, sampler=cfg.sample_sampler, width=size,
                                          height=size, clip_skip=cfg.clip_skip, family=self.base.family)
            paths.append(save_png(images[0], out / f"{cfg.output_name}_step{step:06d}_{i:02d}.png", params[0]))
        unet.train(was_training)
        return paths

    # -- saving ------------------------------------------------------------------------------------
    def save(self, unet, trained_tes, name: str, step: int, epoch: int, dataset, emit: Event,
             final: bool = False) -> list[Path]:
        """Write what the method trained as `name`: the LoRA, the DreamBooth checkpoint and/or the new
        token's embedding, in the configured format(s); rank 0 only. Prunes old intermediate saves."""
        self.acc.wait_for_everyone()
        if not self.acc.is_main_process:
            return []
        cfg = self.cfg
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32}[cfg.save_precision]
        out = Path(cfg.output_dir)
        written: list[Path] = []
        if cfg.method == "lora":
            written += self._save_lora(unet, trained_tes, name, step, epoch, dataset, dtype, out)
        elif cfg.method == "dreambooth":
            written += self._save_checkpoint(name, step, dtype, out)
        if self.embeddings is not None:
            from ..formats.embedding import save_embedding

            emb_name = name if cfg.method == "textual_inversion" else f"{name}_emb"
            written.append(save_embedding(
                out / f"{emb_name}.safetensors", self.embeddings.file_tensors(self.base.family),
                token=cfg.token_string, family=self.base.family,
                metadata={"init_word": cfg.init_word, "step": str(step),
                          "base_model": model_name_for_metadata(cfg.pretrained_model)}))
        if not final and cfg.save_last_n:
            self._kept.append(written)
            while len(self._kept) > cfg.save_last_n:
                for old in self._kept.pop(0):
                    _remove(old)
        emit("save", {"step": step, "paths": written})
        return written

    def _save_lora(self, unet, trained_tes, name, step, epoch, dataset, dtype, out: Path) -> list[Path]:
        from ..formats.lora import extract_peft_lora, kohya_metadata, save_lora

        cfg = self.cfg
        weights = {"unet": extract_peft_lora(self.acc.unwrap_model(unet))}
        for key, te in zip(("text_encoder", "text_encoder_2"), trained_tes):
            weights[key] = extract_peft_lora(self.acc.unwrap_model(te))
        metadata = kohya_metadata(
            family=self.base.family, rank=cfg.rank, alpha=cfg.alpha, output_name=name,
            resolution=cfg.resolution, clip_skip=cfg.clip_skip,
            num_train_images=sum(i.repeats for i in dataset.items if not i.is_class),  # sd-scripts counts repeats
            tag_frequency=tag_frequency([i for i in dataset.items if not i.is_class]), steps=step, epoch=epoch,
            prediction_type=self.base.prediction_type, timestamp=_build_timestamp(),
            extra={"ss_num_reg_images": str(sum(i.repeats for i in dataset.items if i.is_class)),
                   "ss_prior_loss_weight": str(cfg.prior_loss_weight),
                   "ss_learning_rate": str(cfg.learning_rate), "ss_text_encoder_lr": str(cfg.te_lr),
                   "ss_unet_lr": str(cfg.learning_rate), "ss_optimizer": cfg.optimizer,
                   "ss_lr_scheduler": cfg.lr_scheduler, "ss_seed": str(cfg.seed),
                   "ss_network_dropout": str(cfg.lora_dropout), "ss_min_snr_gamma": str(cfg.min_snr_gamma),
                   "ss_noise_offset": str(cfg.noise_offset), "ss_max_train_steps": str(step),
                   "ss_mixed_precision": self.acc.mixed_precision, 
                   "ss_sd_model_name": model_name_for_metadata(cfg.pretrained_model),
                   "ss_training_comment": f"helpers target={cfg.target}",
                   "ss_network_args": json.dumps({"target": cfg.target})})
        written: list[Path] = []
        unet_config = dict(self.base.unet.config)
        if cfg.save_format in ("kohya", "both"):
            written.append(save_lora(out / f"{name}.safetensors", weights, family=self.base.family,
                                     unet_config=unet_config, format="kohya", metadata=metadata, dtype=dtype))
        if cfg.save_format in ("diffusers", "both"):
            written.append(save_lora(out / f"{name}_diffusers", weights, family=self.base.family,
                                     unet_config=unet_config, format="diffusers", metadata=metadata, dtype=dtype))
        return written

    def _save_checkpoint(self, name: str, step: int, dtype: torch.dtype, out: Path) -> list[Path]:
        """DreamBooth: the whole pipeline as one original-layout file (A1111, ComfyUI) and/or a diffusers folder."""
        from ..atomic import atomic_dir
        from ..formats.checkpoint import save_single_file

        cfg = self.cfg
        pipe = self.base.pipe  # its UNet (and text encoders) are the trained modules themselves
        written: list[Path] = []
        if cfg.save_format in ("kohya", "both"):
            meta = {"modelspec.title": name, "helpers.method": "dreambooth", "helpers.step": str(step),
                    "helpers.base_model": model_name_for_metadata(cfg.pretrained_model),
                    "helpers.prediction_type": self.base.prediction_type}
            written.append(save_single_file(pipe, out / f"{name}.safetensors", self.base.family, dtype=dtype,
                                            metadata=meta))
        if cfg.save_format in ("diffusers", "both"):
            folder = out / f"{name}_diffusers"
            with atomic_dir(folder) as tmp:
                pipe.save_pretrained(str(tmp), safe_serialization=True)
                _cast_safetensors_files(tmp, dtype)
            written.append(folder)
        return written


def loss_weights(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, is_class: torch.Tensor, *,
                 prediction_type: str = "epsilon", min_snr_gamma: float | None = None,
                 prior_loss_weight: float = 1.0) -> torch.Tensor:
    """Per-sample loss weights: min-SNR-gamma (Hang et al. 2023; for v-prediction min(snr, g) / (snr + 1))
    times `prior_loss_weight` on class (regularization) images."""
    weights = torch.ones(timesteps.shape, device=timesteps.device)
    if min_snr_gamma:
        snr = alphas_cumprod[timesteps] / (1 - alphas_cumprod[timesteps])
        clipped = torch.clamp(snr, max=min_snr_gamma)
        weights = clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr
    return weights * torch.where(is_class, prior_loss_weight, 1.0)


def _vae_encoder(vae, device, gen: torch.Generator) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function pixels in [-1, 1] -> scaled (and shifted) latents, as the UNet sees them (sampling with `gen`)."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    scale = vae.config.scaling_factor

    @torch.no_grad()
    def encode(pixels: torch.Tensor) -> torch.Tensor:
        dist = vae.encode(pixels.to(device, vae.dtype)).latent_dist
        latents = dist.sample(generator=gen).float()
        return (latents - shift) * scale

    return encode


def _all_finite(loss: torch.Tensor, accelerator) -> bool:
    """Whether the loss is finite on every process (all must agree before backward, or DDP would hang)."""
    bad = (~torch.isfinite(loss.detach())).any().float()
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, "sum")
    return bad.item() == 0


def _method_line(cfg: TrainConfig, trained_tes: list) -> str:
    te = " + text encoder" if trained_tes else ""
    token = (f" + new token {cfg.token_string!r} x{cfg.num_vectors_per_token} from {cfg.init_word!r}"
             if cfg.token_string else "")
    if cfg.method == "lora":
        return f"LoRA rank {cfg.rank} alpha {cfg.alpha} ({cfg.target}{te}){token}"
    if cfg.method == "dreambooth":
        return f"DreamBooth: full UNet{te}"
    return f"Textual Inversion:{token.removeprefix(' +')}"


def _average_gradients(params, accelerator) -> None:
    """Average gradients of parameters outside the DDP-wrapped models across processes."""
    for p in params:
        if p.grad is not None:
            p.grad = accelerator.reduce(p.grad, "mean")


def _cast_safetensors_files(folder: Path, dtype: torch.dtype) -> None:
    """Cast the float tensors of every .safetensors file under `folder` to `dtype` (the save precision)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    for file in folder.rglob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if all(not t.is_floating_point() or t.dtype == dtype for t in tensors.values()):
            continue
        save_file({k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items()}, str(file),
                  metadata=meta)


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
                      f"{Path(lacking[0].path).name}); those images train nothing for it", RuntimeWarning, stacklevel=3)


def _build_timestamp() -> float | None:
    """SOURCE_DATE_EPOCH when set (reproducible builds: same seed, byte-identical files), else now."""
    value = os.environ.get("SOURCE_DATE_EPOCH")
    return float(value) if value else None


def tag_frequency(items) -> dict[str, dict[str, int]]:
    """sd-scripts' ss_tag_frequency: {folder name: {tag: count}} over comma-separated captions."""
    freq: dict[str, Counter] = {}
    for item in items:
        folder = Path(item.path).parent.name
        tags = [t.strip() for t in item.caption.split(",") if t.strip()]
        freq.setdefault(folder, Counter()).update(tags)
    return {k: dict(v) for k, v in freq.items()}


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


class _CsvLog:
    """Append-only CSV of log records (loss, lr, step time ...) that pandas or matplotlib can read."""

    COLUMNS = ["step", "epoch", "loss", "lr", "lr_te", "step_time_s", "val_loss", "peak_mem_gb"]

    def __init__(self, path: Path, keep_until: int | None = None):
        """A new log, or (resuming) the old one cut after step `keep_until`: rows logged after the state was
        saved belong to steps that will be trained again."""
        import io

        from ..atomic import write_text

        self.path = path
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(self.COLUMNS)
        if keep_until is not None and path.is_file():
            with open(path, newline="") as f:
                for row in csv.DictReader(f):
                    if row.get("step") and float(row["step"]) <= keep_until:
                        writer.writerow([row.get(c, "") for c in self.COLUMNS])
        write_text(path, buf.getvalue())

    def write(self, record: dict) -> None:
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow(["" if record.get(c) is None else record[c] for c in self.COLUMNS])


def read_log(path: str | Path) -> list[dict[str, float]]:
    """The training log as a list of dicts of floats (empty cells left out)."""
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]

