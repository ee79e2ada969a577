"""The training loop: one readable function. The step's forward is `distill_step`; evaluation comes in as a
callable (`on_eval`) so the engine never imports evaluation; the teacher comes in as a callable too (a frozen
Teacher/TeacherEnsemble, or a TeacherCache that looks outputs up by example index)."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from kdkit.data import collate
from kdkit.data.augment import Augment
from kdkit.data.lm import predicted_positions
from kdkit.engine.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from kdkit.engine.optim import build_optimizer, build_scheduler
from kdkit.engine.runtime import (
    average_gradients,
    full_optimizer_state,
    full_state_dict,
    load_full_optimizer_state,
    load_full_state_dict,
    make_accelerator,
    micro_batch,
    shards_model,
)
from kdkit.engine.schedules import ScheduledValue, apply_schedules
from kdkit.engine.step import distill_step
from kdkit.errors import TrainingError, TrainingInterrupted
from kdkit.losses import WeightedLoss
from kdkit.types import Batch, ModelOutputs


@dataclass(frozen=True)
class TrainOptions:
    """Flat training settings (the fields of the `train` config section)."""

    epochs: int = 10
    batch_size: int = 128
    grad_accum: int = 1
    optimizer: str = "adamw"
    lr: float = 3e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    schedule: str = "cosine"
    warmup_steps: int = 0
    step_every_epochs: int = 10
    step_gamma: float = 0.1
    grad_clip: float | None = None
    precision: str = "fp32"
    eval_every_epochs: int = 1
    keep_best: str = "accuracy"
    early_stopping_patience: int | None = None
    checkpoint_every_steps: int = 0
    keep_checkpoints: int = 2
    num_workers: int = 0

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainOptions:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)
    steps: int = 0
    epochs_run: int = 0
    best_epoch: int | None = None
    best_value: float | None = None
    stopped_early: bool = False
    interrupted: bool = False
    seconds: float = 0.0


class EpochShuffle(Sampler[int]):
    """A permutation per epoch from (seed, epoch): the data order is the same on every run and after a resume."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


def _better(value: float, best: float | None, metric: str) -> bool:
    if best is None:
        return True
    return value < best if metric == "loss" else value > best


def train(
    student: nn.Module,
    loss: WeightedLoss,
    train_data: Dataset,
    opts: TrainOptions,
    *,
    teacher: Callable[[Batch], ModelOutputs] | None = None,
    on_eval: Callable[[nn.Module], dict[str, float]] | None = None,
    seed: int = 0,
    device: str = "auto",
    ckpt_dir: Path | None = None,
    resume: bool = False,
    tb_dir: Path | None = None,
    progress: bool = True,
    desc: str = "train",
    log: Callable[[str], None] = print,
    interrupt_after: int | None = None,
    student_taps=None,
    schedules: list[ScheduledValue] | tuple = (),
    augment: Augment | None = None,
    transform: Callable[[Batch, nn.Module, int], Batch] | None = None,
) -> TrainResult:
    """Train `student` (and any parameters of `loss`, e.g. projectors) on `train_data`.

    teacher(batch) gives the teacher's outputs when the loss needs them. on_eval(student) returns validation
    metrics ({"accuracy", "f1_macro", "loss", ...}) every `opts.eval_every_epochs`; the best state by
    `opts.keep_best` is restored at the end. With ckpt_dir, a checkpoint is written every
    `opts.checkpoint_every_steps` optimizer steps (or each epoch) and `resume=True` continues from the newest
    one exactly. interrupt_after stops after that many optimizer steps in this call, as a crash would (tests).
    student_taps (kdkit.models.taps.FeatureTaps on the student) feeds feature losses. schedules set loss weights
    and loss parameters (the KD temperature) for every step. augment transforms each training batch before
    the teacher and the student see it; with a teacher cache of stored views it replays those views.
    transform(batch, student, step) replaces a batch after augmentation and before the teacher sees it (on-policy
    distillation: the student's own continuations). Token-level batches (labels (B, T)) get
    batch.num_real_tokens: the optimizer step's global count of predicted tokens over grad_accum × processes, so
    that token losses, averaged over micro-batches and processes as usual, equal Σ / (global count).

    Sharded (FSDP under `accelerate launch`): a copy of `student` is sharded and trained, so that `student` itself
    stays a plain module; at the end it receives the whole trained (or best) weights on every process, on the
    device it came in on (the CPU, as the pipelines build it). Checkpoints and the best state hold whole state dicts
    (gathered collectively, written by the main process) and load into an unwrapped model. on_eval and transform
    get the sharded model and run on every process (each process must run the same forwards). Loss modules with
    parameters (projectors) are not supported sharded.
    """
    started = time.perf_counter()
    if len(train_data) == 0:
        raise TrainingError("data: the training split is empty; expected at least one example")
    accelerator = make_accelerator(device, opts.precision, opts.grad_accum)
    torch.manual_seed(seed)
    sampler = EpochShuffle(len(train_data), seed)
    # The loader gets its own generator: creating an iterator would otherwise draw from the global RNG, which
    # also drives dropout, and a resumed run creates its iterators at other moments than an uninterrupted one.
    loader = DataLoader(
        train_data,
        batch_size=opts.batch_size,
        sampler=sampler,
        collate_fn=getattr(train_data, "collate", collate),  # text data pads per batch
        num_workers=opts.num_workers,
        generator=torch.Generator().manual_seed(seed),
    )
    sharded = shards_model(accelerator)
    if sharded and (student_taps is not None or any(True for _ in loss.parameters())):
        # Projector gradients would not be reduced across processes, and taps hook the module that is not trained.
        raise TrainingError(
            "distill.losses: feature losses (student taps or projectors) under FSDP; expected token-level losses "
            "(token_ce, token_kl) when sharding, or train without the FSDP accelerate config"
        )
    # FSDP shards the module it is given in place (its class and parameters change); train a copy and hand the
    # weights back to `student` at the end, so the caller keeps a plain module it can save and evaluate.
    trained = copy.deepcopy(student) if sharded else student
    params = list(trained.parameters()) + list(loss.parameters())
    optimizer = build_optimizer(
        params, opts.optimizer, opts.lr, opts.weight_decay, opts.momentum, accelerator.device.type
    )
    model, optimizer, loader = accelerator.prepare(trained, optimizer, loader)
    # Sharded, the prepared model has new (sharded) parameters: clip those, as Accelerate matches them by identity.
    clip_params = list(model.parameters()) if sharded else params
    # FSDP1 wraps the module (its inner module cannot run alone); FSDP2 shards it in place. Either way the model
    # that evaluates and generates is the prepared one.
    live = (lambda: model) if sharded else (lambda: accelerator.unwrap_model(model))
    micro_per_epoch = len(loader)  # per process: with N processes each takes every N-th batch
    steps_per_epoch = math.ceil(micro_per_epoch / opts.grad_accum)
    total_steps = steps_per_epoch * opts.epochs
    scheduler = build_scheduler(
        optimizer,
        total_steps,
        opts.schedule,
        opts.warmup_steps,
        steps_per_epoch,
        opts.step_every_epochs,
        opts.step_gamma,
    )
    loss = loss.to(accelerator.device)
    loss_params = [p for p in loss.parameters() if p.requires_grad]
    # A loss whose weight starts at 0 but is scheduled to grow needs the teacher too.
    needs_teacher = loss.needs_teacher or any(
        loss.parts[sv.term].needs_teacher for sv in schedules if sv.what == "weight"
    )
    if needs_teacher and teacher is None:
        raise TrainingError("distill.losses: a loss needs the teacher's outputs, but no teacher was given")

    result = TrainResult()
    step, epoch, skip = 0, 0, 0
    best_state: dict | None = None
    bad_evals = 0
    if resume and ckpt_dir is not None and (path := latest_checkpoint(ckpt_dir)) is not None:
        ck = load_checkpoint(path)  # every process reads the same whole checkpoint
        load_full_state_dict(accelerator, model, ck["student"])
        if ck["loss_modules"]:
            loss.load_state_dict(ck["loss_modules"])
        load_full_optimizer_state(accelerator, model, optimizer, ck["trainer"]["optimizer"])
        scheduler.load_state_dict(ck["trainer"]["scheduler"])
        torch.set_rng_state(ck["trainer"]["rng"])
        st = ck["state"]
        step, epoch, skip = st["step"], st["epoch"], st["batch_in_epoch"]
        result.history, result.best_value, result.best_epoch = st["history"], st["best_value"], st["best_epoch"]
        bad_evals = st["bad_evals"]
        best_state = ck["best"]
        log(f"{desc}: resumed from {path.name} (epoch {epoch + 1}, step {step})")

    def checkpoint(batch_in_epoch: int, at_epoch: int) -> None:
        # Sharded, gathering the whole state is a collective: every process takes part, the main one writes.
        if ckpt_dir is None or not (sharded or accelerator.is_main_process):
            return
        student_state = full_state_dict(accelerator, model)
        optimizer_state = full_optimizer_state(accelerator, model, optimizer)
        if not accelerator.is_main_process:
            return
        save_checkpoint(
            ckpt_dir,
            step,
            student=student_state,
            loss_modules=loss.state_dict(),
            best=best_state,
            trainer={
                "optimizer": optimizer_state,
                "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state(),
            },
            state={
                "step": step,
                "epoch": at_epoch,
                "batch_in_epoch": batch_in_epoch,
                "history": result.history,
                "best_value": result.best_value,
                "best_epoch": result.best_epoch,
                "bad_evals": bad_evals,
            },
            keep=opts.keep_checkpoints,
        )

    writer = None
    if tb_dir is not None and accelerator.is_main_process:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(tb_dir))
    bar = _Progress(total_steps, desc, enabled=progress and accelerator.is_main_process)
    bar.advance(step)
    steps_this_call = 0
    stop = _StopOnSignal()
    sums: dict[str, torch.Tensor] = {}
    n_sums = 0
    log_every = max(1, min(50, steps_per_epoch // 4))
    try:
        while epoch < opts.epochs:
            model.train()
            batches = accelerator.skip_first_batches(loader, skip) if skip else loader
            # Accelerate's loaders set the sampler's epoch from their own counter when iterated; a loader made by
            # skip_first_batches starts that counter at 0, so the epoch is set on the loader, not on the sampler.
            # With several processes the loader's batch sampler is a shard that does not pass the epoch on.
            if hasattr(batches, "set_epoch"):
                batches.set_epoch(epoch)
            sampler.set_epoch(epoch)
            micro = skip
            skip = 0
            for group in _step_groups(batches, opts.grad_accum):
                for i, batch in enumerate(group):
                    if augment is not None and augment.active:
                        batch = augment.apply(batch, seed, epoch, views=getattr(teacher, "views", 0))
                    if transform is not None:  # e.g. on-policy distillation: the student writes the continuation
                        batch = transform(batch, live(), step)
                    group[i] = batch
                if group[0].labels.dim() == 2:  # token-level: every micro-batch divides by the step's global count
                    count = sum(predicted_positions(b.labels) for b in group).to(accelerator.device)
                    share = accelerator.reduce(count.float(), "sum") / (opts.grad_accum * accelerator.num_processes)
                    for b in group:
                        b.num_real_tokens = share
                for i, batch in enumerate(group):
                    if schedules:
                        scheduled_now = apply_schedules(loss, schedules, step, total_steps, steps_per_epoch)
                    with micro_batch(accelerator, model, last=i == len(group) - 1):
                        t_out = teacher(batch) if needs_teacher else None
                        out = distill_step(model, loss, batch, t_out, student_taps)
                        if not torch.isfinite(out.loss):
                            parts = ", ".join(f"{k}={v.item():.4g}" for k, v in out.parts.items())
                            last = latest_checkpoint(ckpt_dir) if ckpt_dir is not None else None
                            kept = f"; last good checkpoint: {last}" if last else "; no checkpoint was written yet"
                            raise TrainingError(
                                f"{desc}: the loss became {out.loss.item()} at step {step + 1} (epoch {epoch + 1}; "
                                f"parts: {parts}); training stopped{kept}. Lower train.lr or set train.grad_clip"
                            )
                        accelerator.backward(out.loss)
                        if accelerator.sync_gradients and loss_params:  # adapters live outside the DDP model
                            average_gradients(accelerator, loss_params)
                        if accelerator.sync_gradients and opts.grad_clip:
                            accelerator.clip_grad_norm_(clip_params, opts.grad_clip)
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                    micro += 1
                    for k, v in {"total": out.loss.detach(), **out.parts}.items():
                        sums[k] = sums.get(k, 0.0) + v.float()
                    n_sums += 1
                    if not accelerator.sync_gradients:
                        continue
                    scheduler.step()
                    step += 1
                    steps_this_call += 1
                    bar.advance(1)
                    if step % log_every == 0 or micro == micro_per_epoch:
                        record = {
                            "step": step,
                            "epoch": epoch + micro / micro_per_epoch,
                            **{f"train/{k}": (v / n_sums).item() for k, v in sums.items()},
                            "lr": scheduler.get_last_lr()[0],
                            **(scheduled_now if schedules else {}),
                        }
                        result.history.append(record)
                        bar.show(record)
                        if writer:
                            for k, v in record.items():
                                if k not in ("step", "epoch"):
                                    writer.add_scalar(k, v, step)
                        sums, n_sums = {}, 0
                    every = opts.checkpoint_every_steps
                    if every and step % every == 0 and micro < micro_per_epoch:
                        checkpoint(micro, epoch)
                    if interrupt_after is not None and steps_this_call >= interrupt_after:
                        result.interrupted = True
                        return result
                    if stop.signal is not None:  # SIGTERM / Ctrl-C: save at this step boundary, then leave
                        checkpoint(micro, epoch)
                        where = f"; checkpoint saved in {ckpt_dir}" if ckpt_dir is not None else ""
                        raise TrainingInterrupted(
                            f"{desc}: stopped by signal {stop.signal} at step {step}{where}; continue with --resume",
                            stop.signal,
                        )
            epoch += 1
            if on_eval is not None and (epoch % opts.eval_every_epochs == 0 or epoch == opts.epochs):
                metrics = on_eval(live())
                model.train()
                result.history.append(
                    {"step": step, "epoch": float(epoch), **{f"val/{k}": v for k, v in metrics.items()}}
                )
                if writer:
                    for k, v in metrics.items():
                        writer.add_scalar(f"val/{k}", v, step)
                if opts.keep_best != "none" and opts.keep_best in metrics:
                    better = _better(metrics[opts.keep_best], result.best_value, opts.keep_best)
                    if sharded:  # gathering the best state is a collective: all processes must agree to take it
                        from accelerate.utils import broadcast_object_list

                        better = broadcast_object_list([better])[0]
                    if better:
                        result.best_value, result.best_epoch, bad_evals = metrics[opts.keep_best], epoch, 0
                        best_state = {
                            k: v.detach().cpu().clone()
                            for k, v in full_state_dict(accelerator, model, everywhere=True).items()
                        }
                    else:
                        bad_evals += 1
                bar.note(f"epoch {epoch}: " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
            if not opts.checkpoint_every_steps or step % opts.checkpoint_every_steps == 0 or epoch == opts.epochs:
                checkpoint(0, epoch)
            if opts.early_stopping_patience and bad_evals >= opts.early_stopping_patience:
                result.stopped_early = True
                log(
                    f"{desc}: early stop after epoch {epoch} "
                    f"({bad_evals} evaluations without a better {opts.keep_best})"
                )
                break
    finally:
        stop.restore()
        bar.close()
        if writer:
            writer.close()
    if sharded:  # the whole trained (or best) weights into the caller's plain module, on every process
        student.load_state_dict(best_state if best_state is not None else full_state_dict(accelerator, model, True))
    else:
        final = accelerator.unwrap_model(model, keep_fp32_wrapper=False)  # no autocast left on forward
        if best_state is not None:
            final.load_state_dict(best_state)
    result.steps, result.epochs_run = step, epoch
    result.seconds = time.perf_counter() - started
    return result


def _step_groups(batches, n: int):
    """The micro-batches of each optimizer step, as lists of n (the last of an epoch may be shorter, as
    Accelerate's accumulation ends the step at the end of the loader)."""
    group = []
    for batch in batches:
        group.append(batch)
        if len(group) == n:
            yield group
            group = []
    if group:
        yield group


class _StopOnSignal:
    """Turns SIGTERM and SIGINT into a flag the loop checks after each optimizer step, so that a checkpoint is
    written at a consistent point (never between backward and the optimizer step). Only in the main thread."""

    def __init__(self):
        import signal
        import threading

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
        import signal

        for sig, handler in self._old.items():
            signal.signal(sig, handler)


class _Progress:
    """A rich progress bar with ETA and the latest loss parts; silent when disabled."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.enabled = enabled
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
            self.progress.advance(self.task, n)

    def show(self, record: dict) -> None:
        if self.enabled:
            info = " ".join(f"{k.split('/', 1)[1]}={v:.4f}" for k, v in record.items() if k.startswith("train/"))
            self.progress.update(self.task, info=info)

    def note(self, text: str) -> None:
        if self.enabled:
            self.progress.console.print(f"  {text}", highlight=False)

    def close(self) -> None:
        if self.enabled:
            self.progress.stop()
