"""The training loop: LoRA, DreamBooth or Textual Inversion on SD 1.x/2.x/SDXL, on CPU, CUDA or several
processes under `accelerate launch`.

`train()` reads top to bottom: set up (`helpers.train.setup`), then per batch one step
(`helpers.train.step`), then the actions that are due (`helpers.train.progress`): log, validate, sample,
save, training state. What is trained and how it is saved lives in `helpers.train.methods`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import TrainConfig
from .errors import TrainingError, oom_advice
from .log import CsvLog, Event, TrainResult, no_events
from .methods import SaveTarget, describe_methods
from .monitor import fixed_noise_loss, sample_images, validation_batches
from .progress import Due, NanWatch, Progress
from .saves import SAVE_DTYPES, KeptSaves
from .setup import Run, frozen_after_caching, resume_into, setup, start_tracking
from .state import capture_rng, prune_states, save_state, state_name, states_dir, trainable_tensors


def train(cfg: TrainConfig, *, base=None, on_event: Event | None = None, progress: bool = True,
          resume: bool | str | None = None) -> TrainResult:
    """Train as `cfg` says and save the result (kohya and/or diffusers layout) with its config.

    `base` may pass an already loaded `helpers.sd.models.BaseModel` (notebooks reuse one); it is
    modified in place (LoRA layers are added to it). `on_event(kind, data)` receives "start",
    "log", "sample", "save", "state" and "end" events for live plots. `resume=True` (or "latest", or a
    state folder) continues from a saved training state; it overrides `cfg.resume`.
    Errors that stop the run (NaN loss, out of memory) raise `TrainingError` with advice.
    """
    if resume is not None:
        cfg = cfg.replace(resume="latest" if resume is True else (str(resume) if resume else None))
    prog = Progress()
    with _advice_on_oom(cfg, prog):
        run = setup(cfg, base, show_progress=progress)
        resume_into(run, prog)
        act = _Actions(run, prog, on_event or no_events, progress)
        acc = run.accelerator
        for epoch in range(prog.epoch, run.num_epochs):
            if prog.step >= run.max_steps:
                break
            for batch in _epoch_batches(run, prog, epoch):
                with acc.accumulate(*run.models):
                    loss = run.step.loss(run.unet, batch, run.generators["noise"])
                    if act.watch.finite(loss, prog.step + 1, prog.last_saved):
                        run.update(loss)
                        prog.add_loss(loss)
                    else:
                        run.update.discard()
                if not acc.sync_gradients:
                    continue  # accumulating: no update yet
                prog.step += 1
                if run.ema is not None:
                    run.ema.update(prog.step)
                act.after_step(run.schedule.after_step(prog.step, prog.batch_in_epoch))
                if prog.step >= run.max_steps:
                    break
            act.after_epoch(run.schedule.after_epoch(prog.step, prog.batch_in_epoch, epoch))
        return act.finish()


@contextlib.contextmanager
def _advice_on_oom(cfg: TrainConfig, prog: Progress):
    """Out of memory anywhere in the run becomes a `TrainingError` saying what to change, most effective first."""
    try:
        yield
    except torch.OutOfMemoryError:
        from ..sd.models import free_memory

        free_memory()
        raise TrainingError(oom_advice(cfg, step=prog.step, last_saved=prog.last_saved)) from None


def _epoch_batches(run: Run, prog: Progress, epoch: int) -> Iterator[dict]:
    """The batches of `epoch` (a resumed run's first epoch without the ones it already trained); counts them
    in `prog` and puts a resumed state's RNG back at the point where the saved run stood."""
    acc, loader = run.accelerator, run.loader
    run.sampler.set_epoch(epoch)
    run.dataset.set_epoch(epoch)
    for m in run.models:
        m.train()
    prog.batch_in_epoch = prog.batch_in_epoch if epoch == prog.epoch else 0
    prog.epoch = epoch
    if prog.batch_in_epoch:
        loader = acc.skip_first_batches(loader, prog.batch_in_epoch)  # skips indices, loads nothing
    # accelerate's loaders count epochs themselves and re-seed the sampler with that count when iterated:
    # a resumed run's fresh loader would count from 0, so tell it the real epoch
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    if prog.pending_rng is not None and not prog.batch_in_epoch:
        _restore_rng(run, prog)  # a state saved at an epoch's end: the RNG as this epoch begins
    for batch in loader:
        if prog.pending_rng is not None:  # a state saved mid-epoch: the RNG as it was after the saved step
            _restore_rng(run, prog)
        prog.batch_in_epoch += 1
        yield batch


def _restore_rng(run: Run, prog: Progress) -> None:
    from .state import restore_rng

    restore_rng(prog.pending_rng, run.generators)
    prog.pending_rng = None


class _Actions:
    """What the loop does between steps: logs, validation, samples, saves, states, and the end of the run."""

    def __init__(self, run: Run, prog: Progress, emit: Event, show_progress: bool):
        cfg, acc, state = run.cfg, run.accelerator, run.state
        self.run, self.prog, self.emit = run, prog, emit
        self.is_main = acc.is_main_process
        self.watch = NanWatch(cfg.nan_policy, acc, advice=dict(
            precision=acc.mixed_precision, learning_rate=cfg.learning_rate, optimizer=cfg.optimizer,
            family=run.base.family, vae=cfg.vae))
        self.kept = KeptSaves(cfg.save_last_n, state.info.get("lora_saves", []) if state is not None else None)
        log_path = Path(cfg.output_dir) / f"{cfg.output_name}_log.csv"
        self.result = TrainResult(None, Path(cfg.output_dir), prog.step, prog.epoch, None, log_path,
                                  resumed_from=state.path if state is not None else None)
        if self.is_main:
            print(self._start_line())
        emit("start", {"max_steps": run.max_steps, "start_step": prog.step, "epochs": run.num_epochs,
                       "samples_per_epoch": len(run.dataset)})
        self.logger = CsvLog(log_path, keep_until=prog.step if state is not None else None) if self.is_main else None
        val_source = run.validation_set if run.validation_set is not None else run.dataset
        self.val_batches = (validation_batches(run.step, val_source, cfg.validation_images, cfg.seed)
                            if cfg.validation_interval and self.is_main else None)
        self.offloaded = self._offload()
        start_tracking(cfg, acc)
        if self.val_batches is not None and state is None:  # the baseline: the model before any update
            record = {"step": 0, "epoch": 0, "val_loss": self._val_loss()}
            self.logger.write(record)
            if cfg.log_with != "none":
                acc.log({"val_loss": record["val_loss"]}, step=0)
            emit("log", record)
        self.bar = tqdm(total=run.max_steps, initial=prog.step, disable=not (show_progress and self.is_main),
                        desc="training", unit="step")
        self.last_log_step, self.t_last = prog.step, time.perf_counter()

    def _start_line(self) -> str:
        run, cfg, acc = self.run, self.run.cfg, self.run.accelerator
        from .optim import optimizer_kind

        n_params = sum(p.numel() for p in run.update.params)
        return (f"{run.base.describe()}\n{describe_methods(run.methods)}, {n_params:,} trainable params; "
                f"{len(run.dataset)} samples/epoch ({run.num_images} images), batch {cfg.train_batch_size} x accum "
                f"{cfg.gradient_accumulation_steps} x {acc.num_processes} process(es); {run.max_steps} steps, "
                f"{run.num_epochs} epoch(s); optimizer {optimizer_kind(run.optimizer)}, precision "
                f"{acc.mixed_precision}, attention {run.attention}")

    def _offload(self) -> list[torch.nn.Module]:
        """Frozen models the steps no longer need leave the GPU: the text encoders once their outputs are cached,
        the VAE once every latent is. They come back only to draw samples."""
        run = self.run
        if run.accelerator.device.type == "cpu":
            return []
        out = frozen_after_caching(run)
        for m in out:
            m.to("cpu")
        if out:
            torch.cuda.empty_cache()
        return out

    @contextlib.contextmanager
    def _models_back(self):
        """The offloaded models on the device inside the block (sampling), off it again afterwards."""
        for m in self.offloaded:
            m.to(self.run.accelerator.device)
        try:
            yield
        finally:
            for m in self.offloaded:
                m.to("cpu")

    def _val_loss(self) -> float:
        return fixed_noise_loss(self.run.step, self.run.accelerator.unwrap_model(self.run.unet), self.val_batches)

    # -- after each update and each epoch ---------------------------------------------------------
    def after_step(self, due: Due) -> None:
        prog, cfg = self.prog, self.run.cfg
        self.bar.update(1)
        if due:
            self.watch.check(prog.last_saved)  # nothing is shown or written from weights a NaN touched
        if due.log:
            self.log(due.validate)
        if due.sample and self.is_main:
            with self.averaged(), self._models_back():   # with EMA on, the samples show the averaged weights
                paths = sample_images(cfg, self.run.base.pipe, self.run.accelerator.unwrap_model(self.run.unet),
                                      self.run.step, self.run.accelerator, prog.step)
            self.result.samples += paths
            self.emit("sample", {"step": prog.step, "paths": paths})
        if due.save:
            self.save(f"{cfg.output_name}-step{prog.step:06d}", epoch=prog.epoch + 1)
        if due.state:
            self.save_state(prog.epoch, prog.batch_in_epoch)
        if due.log:
            self.t_last = time.perf_counter()  # step time excludes validation, sampling and saving

    def after_epoch(self, due: Due) -> None:
        prog = self.prog
        self.result.epochs = prog.epoch + 1
        if due:
            self.watch.check(prog.last_saved)
        if due.save:
            self.save(f"{self.run.cfg.output_name}-{prog.epoch + 1:06d}", epoch=prog.epoch + 1)
        if due.state:  # after the epoch's own save, as the start of the next epoch
            self.save_state(prog.epoch + 1, 0)

    # -- the actions ---------------------------------------------------------------------------------
    def log(self, validate: bool) -> None:
        run, prog, acc = self.run, self.prog, self.run.accelerator
        now = time.perf_counter()
        count = max(prog.loss_count, 1)
        lrs = run.lr_scheduler.get_last_lr()
        record = {"step": prog.step, "epoch": prog.epoch + 1,
                  "loss": acc.reduce(prog.loss_sum, "mean").item() / count if prog.loss_count else float("nan"),
                  "lr": lrs[0], "lr_te": lrs[-1] if run.text_encoders else None,
                  "step_time_s": (now - self.t_last) / max(1, prog.step - self.last_log_step)}
        if acc.device.type == "cuda":
            record["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        prog.loss_sum.zero_()
        prog.loss_count, self.last_log_step = 0, prog.step
        self.result.final_loss = record["loss"]
        if self.val_batches is not None and validate:
            record["val_loss"] = self._val_loss()
            best = self.result.best_validation
            if best is None or record["val_loss"] < best[1]:
                self.result.best_validation = (prog.step, record["val_loss"])
        if self.is_main:
            self.logger.write(record)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
        if run.cfg.log_with != "none":   # the same record in TensorBoard (accelerate logs on rank 0 only)
            acc.log({k: v for k, v in record.items() if k not in ("step", "epoch") and isinstance(v, float)},
                    step=prog.step)
        self.emit("log", record)

    def save(self, name: str, epoch: int, final: bool = False) -> list[Path]:
        """Write what every method trained as `name`, in the configured format(s); rank 0 only. Intermediate
        saves beyond `save_last_n` are deleted, oldest first."""
        run, acc = self.run, self.run.accelerator
        acc.wait_for_everyone()
        if not acc.is_main_process:
            return []
        to = SaveTarget(run.base, run.dataset.items, acc.mixed_precision, SAVE_DTYPES[run.cfg.save_precision])
        written = [p for m in run.methods for p in m.save(to, name, self.prog.step, epoch)]
        if run.ema is not None:   # the averaged weights beside them, as <name>_ema
            with self.averaged():
                ema_files = [p for m in run.methods for p in m.save(to, f"{name}_ema", self.prog.step, epoch)]
            self.result.ema_path = ema_files[0] if final and ema_files else self.result.ema_path
            written_all = written + ema_files
        else:
            written_all = written
        if not final:
            self.kept.add(written_all)
            self.result.saved += written
            self.prog.last_saved = written[0] if written else self.prog.last_saved
        self.emit("save", {"step": self.prog.step, "paths": written})
        return written

    def averaged(self):
        """A block in which the trained modules hold the EMA weights (a no-op without EMA)."""
        return self.run.ema.swapped() if self.run.ema is not None else contextlib.nullcontext()

    def save_state(self, epoch: int, batch_in_epoch: int) -> None:
        """A training state to continue at (`epoch`, `batch_in_epoch`): every process sends its RNG states to
        rank 0, which writes the folder (helpers.train.state) and prunes old ones."""
        from accelerate.utils import gather_object

        run, prog, acc, cfg = self.run, self.prog, self.run.accelerator, self.run.cfg
        mine = capture_rng(run.generators)
        mine["loss_sum"], mine["loss_count"] = prog.loss_sum.item(), prog.loss_count
        every_rank = gather_object([mine])
        if acc.is_main_process:
            folder = states_dir(cfg.output_dir) / state_name(cfg.output_name, prog.step)
            save_state(folder, trainable=trainable_tensors(run.modules()), optimizer=run.optimizer.state_dict(),
                       lr_scheduler=run.lr_scheduler.state_dict(),
                       scaler=acc.scaler.state_dict() if acc.scaler is not None else None, rng=every_rank,
                       info={"step": prog.step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                             "num_processes": acc.num_processes, "family": run.base.family,
                             "config": cfg.to_dict(), "lora_saves": self.kept.to_json()},
                       ema=run.ema.state_dict() if run.ema is not None else None)
            prune_states(cfg.output_dir, cfg.output_name, cfg.save_state_last_n)
            self.result.states.append(folder)
            prog.last_saved = folder
            self.emit("state", {"step": prog.step, "path": folder})
        acc.wait_for_everyone()

    def finish(self) -> TrainResult:
        """The final save; the base model is left ready for prompts."""
        run, prog, result = self.run, self.prog, self.result
        self.bar.close()
        self.watch.check(prog.last_saved)
        result.steps = prog.step
        final = self.save(run.cfg.output_name, epoch=result.epochs, final=True)
        for method in run.methods:
            method.finish()
        result.saved = [p for p in result.saved + final if p.exists()]  # pruned saves are gone
        result.lora_path = final[0] if final else None
        result.skipped_steps = self.watch.skipped
        if result.best_validation is not None and self.is_main:
            step, loss = result.best_validation
            best = result.best_save()
            print(f"lowest validation loss {loss:.4f} at step {step}"
                  + (f"; the save nearest after it: {best.name}" if best is not None else ""))
        run.accelerator.wait_for_everyone()
        self.emit("end", {"steps": prog.step, "lora_path": result.lora_path})
        run.accelerator.end_training()
        return result
