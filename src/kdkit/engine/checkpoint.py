"""Resumable checkpoints, written atomically: a temp folder filled and fsynced, then renamed into place.

Layout: CKPT_DIR/step_00000123/{student.safetensors, loss_modules.safetensors, best.safetensors, trainer.pt,
state.json, manifest.json} and CKPT_DIR/latest.json naming the newest complete one. Student and
distillation-only modules are kept apart so that an export never carries projectors. trainer.pt (optimizer,
scheduler, the CPU, CUDA and data-loader generators) is read with weights_only=True: nothing is unpickled.
manifest.json holds the SHA-256 and size of every file, checked before anything is loaded: a truncated, edited or
foreign file is named and refused.

When the loop writes one is `CheckpointCadence`'s: at the points it asks at (each epoch end, or every
`checkpoint_every_steps` steps), only once `checkpoint_every_minutes` have passed since the last one.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kdkit.atomic import sha256_file, write_json
from kdkit.errors import TrainingError

# The clock of CheckpointCadence, read at the moment it is asked: a test replaces it with a fake one.
clock: Callable[[], float] = time.monotonic


class CheckpointCadence:
    """When the loop writes a checkpoint, so that short epochs do not pay for one each (a 1.3 M-parameter MLP
    writes ~21 MB with hashes per checkpoint, more than an epoch of MNIST-5k takes to train).

    The loop asks `due` at its checkpoint points: every `every_steps` optimizer steps, or each epoch end when
    `every_steps` is 0. A point is taken when `every_minutes` have passed since the last checkpoint written (or
    since the run started or resumed); 0 takes every point, as kdkit did before the interval existed. The loop
    writes the final state, an early stop and a stop by signal whatever the clock says (`mark` after each write).
    A SIGKILL therefore loses at most `every_minutes` of work plus the time to the next point (an epoch, or
    `every_steps` steps)."""

    def __init__(self, every_steps: int, every_minutes: float):
        if every_minutes < 0:
            raise ValueError(f"checkpoint_every_minutes={every_minutes}; expected >= 0 (0: at every point)")
        self.every_steps, self.interval_s = every_steps, every_minutes * 60.0
        self.mark()

    def mark(self) -> None:
        """A checkpoint was written now (or the run starts): the interval starts again."""
        self.last = clock()

    def is_point(self, step: int, end_of_epoch: bool) -> bool:
        """Whether the loop stands at a checkpoint point: a multiple of every_steps, or an epoch end without it."""
        return step % self.every_steps == 0 if self.every_steps else end_of_epoch

    def due(self, step: int, end_of_epoch: bool) -> bool:
        """Whether to write a checkpoint after optimizer step `step` (the clock is read only at a point)."""
        return self.is_point(step, end_of_epoch) and (not self.interval_s or clock() - self.last >= self.interval_s)


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def save_checkpoint(
    ckpt_dir: Path,
    step: int,
    *,
    student: dict,
    loss_modules: dict,
    best: dict | None,
    trainer: dict[str, Any],
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    from safetensors.torch import save_file

    ckpt_dir.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    tmp = ckpt_dir / f".tmp-{name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(_cpu(student), str(tmp / "student.safetensors"))
    save_file(_cpu(loss_modules), str(tmp / "loss_modules.safetensors"))
    if best is not None:
        save_file(_cpu(best), str(tmp / "best.safetensors"))
    torch.save(trainer, tmp / "trainer.pt")
    (tmp / "state.json").write_text(json.dumps(state, default=float))
    manifest = {f.name: {"sha256": sha256_file(f), "bytes": f.stat().st_size} for f in sorted(tmp.iterdir())}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    _fsync_dir(tmp)
    final = ckpt_dir / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_json(ckpt_dir / "latest.json", {"checkpoint": name, "step": step})
    for old in sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _cpu(state: dict) -> dict:
    """CPU copies; a tensor that shares memory with an earlier one (tied input and output embeddings of a language
    model) is cloned, since safetensors refuses shared storage. Loading assigns the same values to both names."""
    out, seen = {}, set()
    for k, v in state.items():
        v = v.detach()
        key = (v.device, v.untyped_storage().data_ptr()) if v.numel() else None
        shared = key is not None and key in seen
        if key is not None:
            seen.add(key)
        v = v.cpu()
        out[k] = v.clone() if shared else v.contiguous()
    return out


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    pointer = ckpt_dir / "latest.json"
    if not pointer.is_file():
        return None
    try:
        name = json.loads(pointer.read_text())["checkpoint"]
    except (ValueError, KeyError):
        raise TrainingError(f"checkpoint: {pointer} is unreadable; delete it to start over") from None
    path = ckpt_dir / name
    if not (path / "state.json").is_file():
        raise TrainingError(f"checkpoint: {pointer} names {name}, which is missing or incomplete")
    return path


def verify_checkpoint(path: Path) -> None:
    """Every file listed in the manifest is present with its size and hash; nothing unlisted is loaded."""
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise TrainingError(f"checkpoint: {path} has no manifest.json: not a complete kdkit checkpoint; delete it")
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError:
        raise TrainingError(f"checkpoint: {manifest_path} is unreadable; delete {path}") from None
    for name, entry in manifest.items():
        f = path / name
        if not f.is_file():
            raise TrainingError(f"checkpoint: {f} is missing; delete {path} to resume from an earlier one")
        if f.stat().st_size != entry["bytes"] or sha256_file(f) != entry["sha256"]:
            raise TrainingError(
                f"checkpoint: {f} is damaged or foreign (size/hash differ from the manifest); "
                f"delete {path} to resume from an earlier one"
            )


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint's parts, after `verify_checkpoint`. A file that fails to load although its hash matches says
    why: refused by torch.load(weights_only=True) (it holds pickled objects: not written by this kdkit),
    out of memory, or damaged (unreadable)."""
    from safetensors.torch import load_file

    verify_checkpoint(path)

    def tensors(name: str) -> dict[str, torch.Tensor]:
        return _load(path / name, lambda f: load_file(str(f)))

    return {
        "student": tensors("student.safetensors"),
        "loss_modules": tensors("loss_modules.safetensors"),
        "best": tensors("best.safetensors") if (path / "best.safetensors").is_file() else None,
        "trainer": _load(path / "trainer.pt", lambda f: torch.load(f, map_location="cpu", weights_only=True)),
        "state": _load(path / "state.json", lambda f: json.loads(f.read_text())),
    }


def _load(f: Path, read: Callable[[Path], Any]) -> Any:
    folder = f.parent
    try:
        return read(f)
    except pickle.UnpicklingError as exc:  # torch.load(weights_only=True) met a global it does not allow
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        holds = f"a pickled {found.group(1)} object" if found else "pickled Python objects"
        raise TrainingError(
            f"checkpoint: {f} holds {holds}, which torch.load(weights_only=True) refuses to unpickle; kdkit "
            f"checkpoints hold only tensors and plain values, so it was not written by this kdkit version; "
            f"resume from a checkpoint this version wrote, or move {folder} away to start from an earlier one"
        ) from None
    except (MemoryError, torch.OutOfMemoryError):
        raise TrainingError(
            f"checkpoint: out of memory while loading {f} ({f.stat().st_size / 2**20:.1f} MiB); the checkpoint is "
            "intact (its hashes match the manifest): free memory (close other processes) and resume again"
        ) from None
    except Exception as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise TrainingError(
            f"checkpoint: {f} is damaged: it cannot be read ({type(exc).__name__}: {first}) although its hash "
            f"matches the manifest (it was written incomplete); delete {folder} to resume from an earlier one"
        ) from None
