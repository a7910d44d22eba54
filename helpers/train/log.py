"""What a run reports: its events for live plots, the CSV log, and the result it returns."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

Event = Callable[[str, dict[str, Any]], None]  # on_event(kind, data): "start", "log", "sample", "save", "state", "end"


def no_events(kind: str, data: dict[str, Any]) -> None:
    """The `on_event` of a run nobody watches."""


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
    best_validation: tuple[int, float] | None = None   # (step, loss) of the lowest validation loss
    ema_path: Path | None = None   # the final EMA weights (<name>_ema), when ema_decay is set

    def best_save(self) -> Path | None:
        """The file saved at or nearest after the step of the lowest validation loss (the final LoRA if none)."""
        if self.best_validation is None:
            return None
        step = self.best_validation[0]
        import re

        def saved_step(p: Path) -> int | None:
            m = re.search(r"-step(\d+)$", p.stem)
            return int(m.group(1)) if m else None
        later = sorted((s, p) for p in self.saved if (s := saved_step(p)) is not None and s >= step)
        return later[0][1] if later else self.lora_path


class CsvLog:
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
