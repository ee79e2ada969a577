"""The training loop, read top to bottom (nanoGPT's train.py, litgpt's fit()): `set_up` builds what a run needs,
`TrainState` (state.py) is where the run stands and goes to and from a checkpoint, `optimizer_step` does one step
over a group of micro-batches, `evaluate_and_keep_best` runs after an epoch, and `_fit` is the loop that calls them.

The step's forward is `distill_step`; evaluation comes in as a callable (`on_eval`) so the engine never imports
evaluation; the teacher comes in as a callable too (a frozen Teacher/TeacherEnsemble, or a TeacherCache that looks
outputs up by example index).

Sharded (FSDP under `accelerate launch`): a copy of the student is sharded and trained, so that the caller's student
stays a plain module; at the end it receives the whole trained (or best) weights on every process, on the device it
came in on. Checkpoints and the best state hold whole state dicts (gathered collectively, written by the main
process) and load into an unwrapped model. on_eval and transform get the sharded model and run on every process
(each process must run the same forwards). Loss modules with parameters (projectors) are not supported sharded.
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from kdkit.data import collate
from kdkit.data.augment import Augment
from kdkit.data.lm import predicted_positions
from kdkit.engine.checkpoint import CheckpointCadence, latest_checkpoint, load_checkpoint
from kdkit.engine.monitor import Monitor, StopOnSignal
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
from kdkit.engine.state import TrainState
from kdkit.engine.step import distill_step
from kdkit.errors import TrainingError, TrainingInterrupted
from kdkit.losses import WeightedLoss
from kdkit.types import Batch, ModelOutputs, StepOutput


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
    checkpoint_every_minutes: float = 5.0  # a checkpoint point is taken only this long after the last one; 0: each
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
    interrupted: bool = False  # always False: an interrupted run raises TrainingInterrupted (kept for callers)
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
    student_taps=None,
    schedules: list[ScheduledValue] | tuple = (),
    augment: Augment | None = None,
    transform: Callable[[Batch, nn.Module, int], Batch] | None = None,
) -> TrainResult:
    """Train `student` (and any parameters of `loss`, e.g. projectors) on `train_data`.

    teacher(batch) gives the teacher's outputs when the loss needs them. on_eval(student) returns validation
    metrics ({"accuracy", "f1_macro", "loss", ...}) every `opts.eval_every_epochs`; the best state by
    `opts.keep_best` is restored at the end. With ckpt_dir, a checkpoint is written every
    `opts.checkpoint_every_steps` optimizer steps (or each epoch) once `opts.checkpoint_every_minutes` have passed
    since the last one (0: each time), and at the end; `resume=True` continues from the newest one exactly;
    SIGTERM / Ctrl-C writes one at the next step boundary and raises TrainingInterrupted.
    student_taps (kdkit.models.taps.FeatureTaps on the student) feeds feature losses. schedules set loss weights
    and loss parameters (the KD temperature) for every step. augment transforms each training batch before
    the teacher and the student see it; with a teacher cache of stored views it replays those views.
    transform(batch, student, step) replaces a batch after augmentation and before the teacher sees it (on-policy
    distillation: the student's own continuations). Token-level batches (labels (B, T)) get
    batch.num_real_tokens: the optimizer step's global count of predicted tokens over grad_accum × processes, so
    that token losses, averaged over micro-batches and processes as usual, equal Σ / (global count). Other losses
    are means over examples: a step's micro-batches are weighted by their example counts, so that the step's
    gradient is the gradient of its whole batch (also for the short last step of an epoch). Sharded runs: see the
    module docstring.
    """
    started = time.perf_counter()
    run = set_up(student, loss, train_data, opts, teacher=teacher, taps=student_taps, schedules=schedules,
                 augment=augment, transform=transform, seed=seed, device=device, desc=desc)  # fmt: skip
    state = TrainState(loader_rng=run.generator.get_state())
    if resume and ckpt_dir is not None and (path := latest_checkpoint(ckpt_dir)) is not None:
        state = restore(run, path)
        log(f"{desc}: resumed from {path.name} (epoch {state.epoch + 1}, step {state.step})")
    main = run.accelerator.is_main_process
    monitor = Monitor(run.total_steps, desc, progress=progress and main, tb_dir=tb_dir if main else None, log=log)
    stop = StopOnSignal()
    try:
        stopped_early = _fit(run, state, opts, on_eval, ckpt_dir, monitor, stop)
    finally:
        stop.restore()
        monitor.close()
    _hand_back(run, student, state.best_state)
    return TrainResult(
        history=state.history,
        steps=state.step,
        epochs_run=state.epoch,
        best_epoch=state.best_epoch,
        best_value=state.best_value,
        stopped_early=stopped_early,
        seconds=time.perf_counter() - started,
    )


def _fit(
    run: Setup,
    state: TrainState,
    opts: TrainOptions,
    on_eval: Callable[[nn.Module], dict[str, float]] | None,
    ckpt_dir: Path | None,
    monitor: Monitor,
    stop: StopOnSignal,
) -> bool:
    """The loop: epochs of optimizer steps, a history record every few steps, checkpoints when `CheckpointCadence`
    says (and at the end), evaluation after an epoch. Returns True on an early stop."""
    cadence = CheckpointCadence(opts.checkpoint_every_steps, opts.checkpoint_every_minutes)
    log_every = max(1, min(50, run.steps_per_epoch // 4))
    monitor.advance(state.step)
    while state.epoch < opts.epochs:
        run.model.train()
        for group in _step_groups(_epoch_batches(run, state), opts.grad_accum):
            scheduled = optimizer_step(run, group, state, ckpt_dir)
            monitor.advance(1)
            end_of_epoch = state.batch_in_epoch == run.micro_per_epoch
            if state.step % log_every == 0 or end_of_epoch:
                monitor.record(state.take_record(run.micro_per_epoch, run.scheduler.get_last_lr()[0], scheduled))
            if not end_of_epoch and cadence.due(state.step, end_of_epoch=False):
                save(run, state, ckpt_dir, opts.keep_checkpoints)
                cadence.mark()
            if stop.signal is not None:  # SIGTERM / Ctrl-C: save at this step boundary, then leave
                save(run, state, ckpt_dir, opts.keep_checkpoints)
                where = f"; checkpoint saved in {ckpt_dir}" if ckpt_dir is not None else ""
                raise TrainingInterrupted(
                    f"{monitor.desc}: stopped by signal {stop.signal} at step {state.step}{where}; "
                    "continue with --resume",
                    stop.signal,
                )
        state.end_epoch(run.generator)
        if on_eval is not None and (state.epoch % opts.eval_every_epochs == 0 or state.epoch == opts.epochs):
            evaluate_and_keep_best(run, state, on_eval, opts.keep_best, monitor)
        stop_early = bool(opts.early_stopping_patience and state.bad_evals >= opts.early_stopping_patience)
        if state.epoch == opts.epochs or stop_early or cadence.due(state.step, end_of_epoch=True):
            save(run, state, ckpt_dir, opts.keep_checkpoints)
            cadence.mark()
        if stop_early:
            monitor.log(
                f"{monitor.desc}: early stop after epoch {state.epoch} "
                f"({state.bad_evals} evaluations without a better {opts.keep_best})"
            )
            return True
    return False


@dataclass
class Setup:
    """What `set_up` builds for a run: the prepared model, optimizer, scheduler and loader, what one step needs
    (the loss, the teacher when the loss needs one, taps, schedules, augmentation, transform) and the counts."""

    accelerator: Accelerator
    model: nn.Module  # prepared (wrapped, or sharded: a copy of the caller's student)
    optimizer: Any
    stepper: Any  # what `_step_optimizer` steps (and the scheduler counts): see `_stepper`
    scheduler: Any
    loader: DataLoader
    sampler: EpochShuffle
    generator: torch.Generator  # the loader's: each epoch's iterator draws the workers' base seed from it
    loss: WeightedLoss
    teacher: Callable[[Batch], ModelOutputs] | None  # None when no loss (now or scheduled) needs it
    views: int  # stored augmented views of a teacher cache
    taps: Any
    schedules: list[ScheduledValue] | tuple
    augment: Augment | None
    transform: Callable[[Batch, nn.Module, int], Batch] | None
    seed: int
    desc: str
    grad_accum: int
    grad_clip: float | None
    clip_params: list[nn.Parameter]
    loss_params: list[nn.Parameter]
    sharded: bool
    replay_skipped: bool  # with loading workers a resumed epoch loads its done batches again (see _epoch_batches)
    micro_per_epoch: int
    steps_per_epoch: int
    total_steps: int

    def live(self) -> nn.Module:
        """The model that evaluates and generates: FSDP1 wraps the module (its inner module cannot run alone);
        FSDP2 shards it in place. Either way, sharded, that is the prepared one."""
        return self.model if self.sharded else self.accelerator.unwrap_model(self.model)


def set_up(
    student: nn.Module,
    loss: WeightedLoss,
    train_data: Dataset,
    opts: TrainOptions,
    *,
    teacher: Callable[[Batch], ModelOutputs] | None,
    taps,
    schedules: list[ScheduledValue] | tuple,
    augment: Augment | None,
    transform: Callable[[Batch, nn.Module, int], Batch] | None,
    seed: int,
    device: str,
    desc: str,
) -> Setup:
    """The accelerator, the seeded data loader, the optimizer and scheduler, all prepared; the inputs checked."""
    if len(train_data) == 0:
        raise TrainingError("data: the training split is empty; expected at least one example")
    accelerator = make_accelerator(device, opts.precision, opts.grad_accum)
    torch.manual_seed(seed)
    sampler = EpochShuffle(len(train_data), seed)
    # The loader gets its own generator: creating an iterator would otherwise draw from the global RNG, which
    # also drives dropout, and a resumed run creates its iterators at other moments than an uninterrupted one.
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        train_data,
        batch_size=opts.batch_size,
        sampler=sampler,
        collate_fn=getattr(train_data, "collate", collate),  # text data pads per batch
        num_workers=opts.num_workers,
        generator=generator,
    )
    sharded = shards_model(accelerator)
    if sharded and (taps is not None or any(True for _ in loss.parameters())):
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
    micro_per_epoch = len(loader)  # per process: with N processes each takes every N-th batch
    steps_per_epoch = math.ceil(micro_per_epoch / opts.grad_accum)
    total_steps = steps_per_epoch * opts.epochs
    stepper = _stepper(accelerator, optimizer)
    scheduler = build_scheduler(
        stepper, total_steps, opts.schedule, opts.warmup_steps, steps_per_epoch, opts.step_every_epochs,
        opts.step_gamma,
    )  # fmt: skip
    loss = loss.to(accelerator.device)
    # A loss whose weight starts at 0 but is scheduled to grow needs the teacher too.
    needs_teacher = loss.needs_teacher or any(
        loss.parts[sv.term].needs_teacher for sv in schedules if sv.what == "weight"
    )
    if needs_teacher and teacher is None:
        raise TrainingError("distill.losses: a loss needs the teacher's outputs, but no teacher was given")
    return Setup(
        accelerator=accelerator, model=model, optimizer=optimizer, stepper=stepper, scheduler=scheduler,
        loader=loader, sampler=sampler, generator=generator, loss=loss, teacher=teacher if needs_teacher else None,
        views=getattr(teacher, "views", 0), taps=taps, schedules=schedules, augment=augment, transform=transform,
        seed=seed, desc=desc, grad_accum=opts.grad_accum, grad_clip=opts.grad_clip,
        # Sharded, the prepared model has new (sharded) parameters: clip those, as Accelerate matches them by identity.
        clip_params=list(model.parameters()) if sharded else params,
        loss_params=[p for p in loss.parameters() if p.requires_grad], sharded=sharded,
        replay_skipped=opts.num_workers > 0, micro_per_epoch=micro_per_epoch, steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
    )  # fmt: skip


def optimizer_step(run: Setup, group: list[Batch], state: TrainState, ckpt_dir: Path | None) -> dict[str, float]:
    """One optimizer step over a group of micro-batches (gradient accumulation; the last group of an epoch may be
    shorter). Advances `state` (step, batch_in_epoch, the loss sums); returns the scheduled values of the step."""
    acc = run.accelerator
    weights = _prepare_group(run, group, state)
    scheduled: dict[str, float] = {}
    for i, (batch, weight) in enumerate(zip(group, weights)):
        run.loss.set_epoch(state.epoch + state.batch_in_epoch / run.micro_per_epoch)
        if run.schedules:
            scheduled = apply_schedules(run.loss, run.schedules, state.step, run.total_steps, run.steps_per_epoch)
        with micro_batch(acc, run.model, last=i == len(group) - 1):
            t_out = run.teacher(batch) if run.teacher is not None else None
            out = distill_step(run.model, run.loss, batch, t_out, run.taps)
            if not torch.isfinite(out.loss):
                raise _non_finite(run, out, state, ckpt_dir)
            acc.backward(out.loss if weight == 1.0 else out.loss * weight)  # backward divides by grad_accum
            if acc.sync_gradients:  # the step's last micro-batch
                if run.loss_params:  # adapters live outside the DDP model
                    average_gradients(acc, run.loss_params)
                if run.grad_clip:
                    acc.clip_grad_norm_(run.clip_params, run.grad_clip)
                _step_optimizer(run)
        state.batch_in_epoch += 1
        state.add_losses(out)
    run.scheduler.step()
    state.step += 1
    return scheduled


def _stepper(accelerator: Accelerator, optimizer: Any) -> Any:
    """The optimizer to step at the end of a step. Accelerate's optimizer wrapper asks importlib twice per step
    whether an optional package is installed and inspects zero_grad's signature (~0.5 ms a step: 3% of a small
    MLP's step on CPU); without a gradient scaler it then only calls the optimizer it wraps, so that one is stepped
    directly. With a scaler (fp16) the wrapper is: it scales, steps and skips the steps that overflowed."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if inner is not None and accelerator.scaler is None else optimizer


def _step_optimizer(run: Setup) -> None:
    run.stepper.step()
    run.stepper.zero_grad(set_to_none=True)


def _prepare_group(run: Setup, group: list[Batch], state: TrainState) -> list[float]:
    """Augment and transform the step's micro-batches in place; return each one's loss weight.

    accelerator.backward divides every loss by grad_accum, which makes a full group of equal micro-batches the
    mean over the step's examples. Token-level losses divide by the step's global count of predicted tokens
    (batch.num_real_tokens), which is exact for any group. Example-mean losses are weighted grad_accum × (its
    examples) / (the step's examples): 1 for a full group of equal micro-batches, and for a short last group (or
    a smaller last micro-batch) exactly the whole-batch mean."""
    for i, batch in enumerate(group):
        if run.augment is not None and run.augment.active:
            batch = run.augment.apply(batch, run.seed, state.epoch, views=run.views)
        if run.transform is not None:  # e.g. on-policy distillation: the student writes the continuation
            batch = run.transform(batch, run.live(), state.step)
        group[i] = batch
    acc = run.accelerator
    if group[0].labels.dim() == 2:  # token-level: every micro-batch divides by the step's global count
        # Both counts in one reduce: shifted (next-token losses) and unshifted (shift: false).
        counts = sum(torch.stack([predicted_positions(b.labels), predicted_positions(b.labels, shift=False)])
                     for b in group).to(acc.device)
        share = acc.reduce(counts.float(), "sum") / (run.grad_accum * acc.num_processes)
        for b in group:
            b.num_real_tokens, b.num_labelled_tokens = share[0], share[1]
        return [1.0] * len(group)
    sizes = [b.labels.shape[0] for b in group]
    return [run.grad_accum * n / sum(sizes) for n in sizes]


def _non_finite(run: Setup, out: StepOutput, state: TrainState, ckpt_dir: Path | None) -> TrainingError:
    parts = ", ".join(f"{k}={v.item():.4g}" for k, v in out.parts.items())
    last = latest_checkpoint(ckpt_dir) if ckpt_dir is not None else None
    kept = f"; last good checkpoint: {last}" if last else "; no checkpoint was written yet"
    return TrainingError(
        f"{run.desc}: the loss became {out.loss.item()} at step {state.step + 1} (epoch {state.epoch + 1}; "
        f"parts: {parts}); training stopped{kept}. Lower train.lr or set train.grad_clip"
    )


def evaluate_and_keep_best(
    run: Setup,
    state: TrainState,
    on_eval: Callable[[nn.Module], dict[str, float]],
    keep_best: str,
    monitor: Monitor,
) -> None:
    """Evaluate after an epoch, record the metrics, and keep a copy of the weights when `keep_best` improved
    (lower for "loss", higher otherwise); count the evaluations without improvement for early stopping."""
    metrics = on_eval(run.live())
    run.model.train()
    values = {f"val/{k}": v for k, v in metrics.items()}
    state.history.append({"step": state.step, "epoch": float(state.epoch), **values})
    monitor.scalars(values, state.step)
    if keep_best != "none" and keep_best in metrics:
        value = metrics[keep_best]
        better = _better(value, state.best_value, keep_best)
        if run.sharded:  # gathering the best state is a collective: all processes must agree to take it
            from accelerate.utils import broadcast_object_list

            better = broadcast_object_list([better])[0]
        if better:
            state.best_value, state.best_epoch, state.bad_evals = value, state.epoch, 0
            whole = full_state_dict(run.accelerator, run.model, everywhere=True)
            state.best_state = {k: v.detach().cpu().clone() for k, v in whole.items()}
        else:
            state.bad_evals += 1
    monitor.note(f"epoch {state.epoch}: " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))


def _better(value: float, best: float | None, metric: str) -> bool:
    if best is None:
        return True
    return value < best if metric == "loss" else value > best


def save(run: Setup, state: TrainState, ckpt_dir: Path | None, keep: int) -> None:
    """Write a checkpoint. Sharded, gathering the whole state is a collective: every process takes part, the main
    one writes."""
    acc = run.accelerator
    if ckpt_dir is None or not (run.sharded or acc.is_main_process):
        return
    student_state = full_state_dict(acc, run.model)
    optimizer_state = full_optimizer_state(acc, run.model, run.optimizer)
    if not acc.is_main_process:
        return
    state.to_checkpoint(
        ckpt_dir,
        student=student_state,
        loss_modules=run.loss.state_dict(),
        optimizer=optimizer_state,
        scheduler=run.scheduler.state_dict(),
        device=acc.device,
        keep=keep,
    )


def restore(run: Setup, path: Path) -> TrainState:
    """Load a checkpoint into the prepared run (every process reads the same whole checkpoint); its state."""
    ck = load_checkpoint(path)
    load_full_state_dict(run.accelerator, run.model, ck["student"])
    if ck["loss_modules"]:
        run.loss.load_state_dict(ck["loss_modules"])
    load_full_optimizer_state(run.accelerator, run.model, run.optimizer, ck["trainer"]["optimizer"])
    run.scheduler.load_state_dict(ck["trainer"]["scheduler"])
    state = TrainState.from_checkpoint(ck)
    state.restore_rng(ck["trainer"], run.accelerator.device, run.generator)
    return state


def _epoch_batches(run: Setup, state: TrainState) -> Iterator[Batch]:
    """The micro-batches of epoch `state.epoch` after the first `state.batch_in_epoch` (a resumed run).

    Without loading workers the done batches are skipped unread. With workers they are loaded again and dropped:
    worker k loads every k-th batch with its own random generator (seeded from the loader's generator), so a
    dataset that draws random numbers gives the same examples only if every worker loads the same batches."""
    skip = state.batch_in_epoch
    loader = run.loader
    if skip and not run.replay_skipped:
        loader = run.accelerator.skip_first_batches(loader, skip)
    # Accelerate's loaders set the sampler's epoch from their own counter when iterated; a loader made by
    # skip_first_batches starts that counter at 0, so the epoch is set on the loader, not on the sampler.
    # With several processes the loader's batch sampler is a shard that does not pass the epoch on.
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(state.epoch)
    run.sampler.set_epoch(state.epoch)
    batches = iter(loader)
    return itertools.islice(batches, skip, None) if skip and run.replay_skipped else batches


def _step_groups(batches: Iterator[Batch], n: int) -> Iterator[list[Batch]]:
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


def _hand_back(run: Setup, student: nn.Module, best_state: dict | None) -> None:
    """The trained (or best) weights into the caller's module."""
    if run.sharded:  # the whole weights into the caller's plain module, on every process
        student.load_state_dict(
            best_state if best_state is not None else full_state_dict(run.accelerator, run.model, True)
        )
    else:
        final = run.accelerator.unwrap_model(run.model, keep_fp32_wrapper=False)  # no autocast left on forward
        if best_state is not None:
            final.load_state_dict(best_state)
