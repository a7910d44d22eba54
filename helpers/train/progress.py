"""Where a run stands, what is due after each step and epoch, and the watch on NaN/inf losses.

`Progress` is the one record of the run's position (step, epoch, batch in the epoch, the running loss,
the last save); `Schedule` turns a position into the actions due (log, validate, sample, save, state);
`NanWatch` holds the policy for bad losses ("stop": noted on the device, read only when an action is due;
"skip": checked before each update, five in a row stop the run).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import TrainConfig
from .errors import TrainingError, nan_message

MAX_NAN_SKIPS = 5  # nan_policy="skip": this many bad steps in a row stop the run


@dataclass
class Progress:
    """The position of a run; also what an error message reports (how far it got, the last save)."""

    step: int = 0                    # optimizer updates done
    epoch: int = 0                   # the epoch being trained (0-based)
    batch_in_epoch: int = 0          # micro-batches of this epoch consumed by this process
    loss_sum: torch.Tensor | None = None   # summed on the device since the last log: no read per step
    loss_count: int = 0
    last_saved: Path | None = None
    pending_rng: dict[str, Any] | None = None  # a resumed state's RNG, put back once its data loader started

    def add_loss(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss.detach()
        self.loss_count += 1


@dataclass(frozen=True)
class Due:
    """The actions due at one point of the run, in the order they run."""

    log: bool = False
    validate: bool = False   # with the log: the fixed-noise validation loss joins its record
    sample: bool = False
    save: bool = False
    state: bool = False

    def __bool__(self) -> bool:
        return self.log or self.validate or self.sample or self.save or self.state


@dataclass(frozen=True)
class Schedule:
    """When logs, validation, samples, saves and training states are due (steps count optimizer updates)."""

    max_steps: int
    batches_per_epoch: int           # micro-batches per process
    log_every: int = 10
    validate_every: int | None = None
    sample_every: int | None = None
    save_every: int | None = None
    save_every_epochs: int | None = None
    state_every: int | None = None

    @classmethod
    def from_config(cls, cfg: TrainConfig, max_steps: int, batches_per_epoch: int) -> Schedule:
        return cls(max_steps, batches_per_epoch, cfg.log_every_n_steps, cfg.validation_interval,
                   cfg.sample_every_n_steps, cfg.save_every_n_steps, cfg.save_every_n_epochs,
                   cfg.save_state_every_n_steps)

    @staticmethod
    def _every(n: int | None, count: int) -> bool:
        return bool(n) and count % n == 0

    def _state(self, step: int) -> bool:
        return self._every(self.state_every, step) and step < self.max_steps

    def after_step(self, step: int, batch_in_epoch: int) -> Due:
        """Due after update `step`. A state due on an epoch's last batch waits for the epoch's end (after
        the epoch's own save), and is saved as the start of the next epoch."""
        validate = self._every(self.validate_every, step)
        return Due(log=self._every(self.log_every, step) or step == self.max_steps or validate, validate=validate,
                   sample=self._every(self.sample_every, step),
                   save=self._every(self.save_every, step) and step < self.max_steps,
                   state=self._state(step) and batch_in_epoch < self.batches_per_epoch)

    def after_epoch(self, step: int, batch_in_epoch: int, epoch: int) -> Due:
        """Due when epoch `epoch` (0-based) has ended at update `step`."""
        return Due(save=self._every(self.save_every_epochs, epoch + 1) and step < self.max_steps,
                   state=self._state(step) and batch_in_epoch >= self.batches_per_epoch)


@dataclass
class NanWatch:
    """The NaN/inf policy of a run, in one place; `advice` is what `nan_message` needs to explain it."""

    policy: str                      # "stop" | "skip"
    accelerator: Any
    advice: dict[str, Any] = field(default_factory=dict)
    in_row: int = 0
    skipped: int = 0
    first_bad: torch.Tensor = field(init=False)  # "stop": the first bad step (1-based) on the device, 0 if none

    def __post_init__(self) -> None:
        self.first_bad = torch.zeros((), dtype=torch.long, device=self.accelerator.device)

    def finite(self, loss: torch.Tensor, step: int, last_saved: Path | None) -> bool:
        """Whether to update from this loss (of update `step`, 1-based). "stop" always says yes and only notes
        a bad loss; `check` reads the note. "skip" decides now, on every process alike (or DDP would hang)."""
        if self.policy != "skip":
            bad = ~torch.isfinite(loss.detach()) & (self.first_bad == 0)
            self.first_bad = torch.where(bad, step, self.first_bad)
            return True
        if _all_finite(loss, self.accelerator):
            self.in_row = 0
            return True
        self.in_row += 1
        self.skipped += 1
        if self.in_row >= MAX_NAN_SKIPS:
            raise TrainingError(nan_message(step, last_saved=last_saved, skipped=self.in_row, **self.advice))
        if self.accelerator.is_main_process:
            print(f"step {step}: loss is NaN/inf, step skipped ({self.in_row} in a row)")
        return False

    def check(self, last_saved: Path | None) -> None:
        """"stop": raise with advice if any process saw a bad loss so far (one sync; every rank calls it),
        so that no log, sample or save shows or writes weights a NaN has touched."""
        if self.policy == "skip":
            return
        acc = self.accelerator
        steps = acc.gather(self.first_bad.reshape(1)) if acc.num_processes > 1 else self.first_bad.reshape(1)
        bad = [int(s) for s in steps.tolist() if s > 0]
        if bad:
            raise TrainingError(nan_message(min(bad), last_saved=last_saved, skipped=0, **self.advice))


def _all_finite(loss: torch.Tensor, accelerator) -> bool:
    """Whether the loss is finite on every process."""
    bad = (~torch.isfinite(loss.detach())).any().float()
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, "sum")
    return bad.item() == 0
