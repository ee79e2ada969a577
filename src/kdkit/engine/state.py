"""Where a training run stands, and how that goes to and from a checkpoint.

A checkpoint holds the prepared model, the loss modules, the optimizer and the scheduler (written by the loop) and
this `TrainState`: the counters, the history, the best state so far and every random generator the run draws from.
Restored, a run continues exactly: the same dropout masks, the same data order and the same data-loading worker
seeds as a run that was never stopped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdkit.engine.checkpoint import save_checkpoint
from kdkit.types import StepOutput


@dataclass
class TrainState:
    """The loop's progress. `batch_in_epoch` counts the micro-batches of epoch `epoch` done so far (0 at an epoch
    boundary). `loss_sums` / `loss_count` are the running sums of the loss parts since the last history record, so
    a resumed run writes the same records. `loader_rng` is the data loader's generator as it was when epoch `epoch`
    started: each epoch's iterator draws the base seed of the loading workers from it."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    history: list[dict] = field(default_factory=list)
    best_value: float | None = None
    best_epoch: int | None = None
    bad_evals: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    loss_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    loss_count: int = 0
    loader_rng: torch.Tensor | None = None

    def add_losses(self, out: StepOutput) -> None:
        """Add one micro-batch's loss and parts to the running sums (on the device: no synchronisation)."""
        for k, v in {"total": out.loss.detach(), **out.parts}.items():
            self.loss_sums[k] = self.loss_sums.get(k, 0.0) + v.float()
        self.loss_count += 1

    def take_record(self, micro_per_epoch: int, lr: float, extra: dict[str, float]) -> dict[str, float]:
        """Append a history record of the mean loss parts since the last one (and reset the sums)."""
        record = {
            "step": self.step,
            "epoch": self.epoch + self.batch_in_epoch / micro_per_epoch,
            **{f"train/{k}": (v / self.loss_count).item() for k, v in self.loss_sums.items()},
            "lr": lr,
            **extra,
        }
        self.history.append(record)
        self.loss_sums, self.loss_count = {}, 0
        return record

    def end_epoch(self, loader_generator: torch.Generator) -> None:
        self.epoch += 1
        self.batch_in_epoch = 0
        self.loader_rng = loader_generator.get_state()

    # -- to and from a checkpoint ---------------------------------------------------------------------------------

    def to_checkpoint(
        self,
        ckpt_dir: Path,
        *,
        student: dict,
        loss_modules: dict,
        optimizer: dict,
        scheduler: dict,
        device: torch.device,
        keep: int,
    ) -> Path:
        """Write a checkpoint of this state with the given state dicts (main process only)."""
        trainer: dict[str, Any] = {"optimizer": optimizer, "scheduler": scheduler, **_rng_states(device)}
        if self.loader_rng is not None:
            trainer["loader_rng"] = self.loader_rng
        state = {
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "history": self.history,
            "best_value": self.best_value,
            "best_epoch": self.best_epoch,
            "bad_evals": self.bad_evals,
            "loss_sums": {k: v.item() for k, v in self.loss_sums.items()},  # float32 → float → float32: exact
            "loss_count": self.loss_count,
        }
        return save_checkpoint(
            ckpt_dir,
            self.step,
            student=student,
            loss_modules=loss_modules,
            best=self.best_state,
            trainer=trainer,
            state=state,
            keep=keep,
        )

    @classmethod
    def from_checkpoint(cls, ck: dict[str, Any]) -> TrainState:
        """The state of a loaded checkpoint (`load_checkpoint`). Checkpoints of earlier kdkit versions have no loss
        sums and no loader generator: the run then continues with empty sums and a fresh generator."""
        st = ck["state"]
        return cls(
            step=st["step"],
            epoch=st["epoch"],
            batch_in_epoch=st["batch_in_epoch"],
            history=st["history"],
            best_value=st["best_value"],
            best_epoch=st["best_epoch"],
            bad_evals=st["bad_evals"],
            best_state=ck["best"],
            loss_sums={k: torch.tensor(v, dtype=torch.float32) for k, v in st.get("loss_sums", {}).items()},
            loss_count=st.get("loss_count", 0),
            loader_rng=ck["trainer"].get("loader_rng"),
        )

    def restore_rng(self, trainer: dict[str, Any], device: torch.device, loader_generator: torch.Generator) -> None:
        """Set the global CPU generator, the CUDA generator of `device` (when the checkpoint has one and the run is
        on CUDA) and the data loader's generator to what they were when the checkpoint was written."""
        torch.set_rng_state(trainer["rng"])
        if device.type == "cuda" and "cuda_rng" in trainer:
            torch.cuda.set_rng_state(trainer["cuda_rng"], device)
        if self.loader_rng is not None:
            loader_generator.set_state(self.loader_rng)
        else:  # a checkpoint of an earlier kdkit: the fresh generator goes on from here
            self.loader_rng = loader_generator.get_state()


def _rng_states(device: torch.device) -> dict[str, torch.Tensor]:
    """The global generators the training step draws from: the CPU one, and the one of the CUDA device trained on
    (dropout on the GPU). Each process of a multi-process run draws the same numbers from the same seed, so the
    main process's states stand for every process's (as the CPU state always has)."""
    states = {"rng": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda_rng"] = torch.cuda.get_rng_state(device)
    return states
