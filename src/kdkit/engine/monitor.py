"""What a run shows and listens to while it trains: the progress bar and TensorBoard (`Monitor`), and SIGTERM /
Ctrl-C turned into a flag the loop checks at step boundaries (`StopOnSignal`)."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path


class Monitor:
    """A rich progress bar with ETA and the latest loss parts, and a TensorBoard writer; each silent when off
    (on every process but the main one)."""

    def __init__(self, total: int, desc: str, *, progress: bool, tb_dir: Path | None, log: Callable[[str], None]):
        self.desc, self.log = desc, log
        self.bar = _Progress(total, desc, enabled=progress)
        self.writer = None
        if tb_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(tb_dir))

    def advance(self, n: int) -> None:
        self.bar.advance(n)

    def record(self, record: dict[str, float]) -> None:
        """Show a training record on the bar and write its scalars (all but step and epoch)."""
        self.bar.show(record)
        self.scalars({k: v for k, v in record.items() if k not in ("step", "epoch")}, record["step"])

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)

    def note(self, text: str) -> None:
        self.bar.note(text)

    def close(self) -> None:
        self.bar.close()
        if self.writer:
            self.writer.close()


class StopOnSignal:
    """Turns SIGTERM and SIGINT into a flag the loop checks after each optimizer step, so that a checkpoint is
    written at a consistent point (never between backward and the optimizer step). Only in the main thread."""

    def __init__(self):
        self.signal: int | None = None
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:  # a second Ctrl-C: stop at once
            raise KeyboardInterrupt
        self.signal = signum

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


class _Progress:
    """A rich progress bar; silent when disabled. Steps are counted here and handed to rich at most every
    `EVERY_S` seconds (and before anything else is shown): the bar redraws at 10 Hz anyway, and a call into rich on
    every step of a small model costs more than the count is worth."""

    EVERY_S = 0.2

    def __init__(self, total: int, desc: str, enabled: bool):
        self.enabled, self.pending, self.flushed = enabled, 0, 0.0
        if not enabled:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task(desc, total=total, info="")

    def advance(self, n: int) -> None:
        if self.enabled and n:
            self.pending += n
            if time.monotonic() - self.flushed >= self.EVERY_S:
                self._flush()

    def _flush(self) -> None:
        if self.pending:
            self.progress.advance(self.task, self.pending)
            self.pending = 0
        self.flushed = time.monotonic()

    def show(self, record: dict) -> None:
        if self.enabled:
            self._flush()
            info = " ".join(f"{k.split('/', 1)[1]}={v:.4f}" for k, v in record.items() if k.startswith("train/"))
            self.progress.update(self.task, info=info)

    def note(self, text: str) -> None:
        if self.enabled:
            self._flush()
            self.progress.console.print(f"  {text}", highlight=False)

    def close(self) -> None:
        if self.enabled:
            self._flush()
            self.progress.stop()
