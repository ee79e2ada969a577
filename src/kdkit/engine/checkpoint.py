"""Resumable checkpoints, written atomically: a temp folder filled and fsynced, then renamed into place.

Layout: CKPT_DIR/step_00000123/{student.safetensors, loss_modules.safetensors, best.safetensors, trainer.pt,
state.json} and CKPT_DIR/latest.json naming the newest complete one. Student and distillation-only modules are
kept apart so that an export never carries projectors. trainer.pt (optimizer, scheduler, RNG) is read with
weights_only=True: nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from kdkit.atomic import write_json
from kdkit.errors import TrainingError


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
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


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


def load_checkpoint(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    try:
        out = {
            "student": load_file(str(path / "student.safetensors")),
            "loss_modules": load_file(str(path / "loss_modules.safetensors")),
            "best": load_file(str(path / "best.safetensors")) if (path / "best.safetensors").is_file() else None,
            "trainer": torch.load(path / "trainer.pt", map_location="cpu", weights_only=True),
            "state": json.loads((path / "state.json").read_text()),
        }
    except Exception as exc:
        raise TrainingError(
            f"checkpoint: {path} is damaged ({str(exc).splitlines()[0]}); delete it to start over"
        ) from None
    return out
