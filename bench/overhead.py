"""kdkit's overhead against a minimal hand-written distillation loop, on CPU.

(a) KD step: kdkit's real `train()` with a live `Teacher` (fp32, channels-last, bf16, bf16 + channels-last) divided
    by a plain-torch fp32 loop on the same models and data. Goal: <= 0.92 through a faster teacher inference path,
    counting bf16 only where the student's accuracy is unchanged (checked on real data, MNIST-5k).
(b) Cached teacher: a kdkit epoch reading teacher logits from a `TeacherCache` divided by a kdkit epoch of the
    student alone (labels only). Goal: <= 1.05. Building the cache is a one-off cost, reported beside it.
(c) torch.compile of the teacher's model (COMPILED_MODES; no kdkit option, so never counted for (a)): timed in the
    same rounds as (a), each compiled configuration divided by its uncompiled twin (the hand loop's by the hand loop,
    a compiled kdkit Teacher's by the same Teacher uncompiled). Compilation runs before any timing, on every batch
    shape the timed calls see, and its time is reported apart. Where torch.compile fails (no C++ compiler, ...) the
    reason is recorded and those configurations are skipped.

Method (docs/benchmarks.md and /work/shared/BENCH.md): everything in one process, configurations alternated
A B C … then reversed after a warm-up, medians and the median of per-round ratios. Each timed call is a whole
`train()` call over one epoch of `steps` batches, so kdkit's per-call setup (Accelerator, optimizer, DataLoader) is
inside it; a forward pre-hook on the student timestamps every step, which gives the steady per-step time (median gap
between consecutive steps) and the setup (call start to the first step) separately.

    python bench/overhead.py            # prints one JSON object on stdout (~12-15 min on 2 cores)
    python bench/overhead.py --write    # and appends a dated section to docs/benchmarks.md
    python bench/overhead.py --quick    # about a minute (compiling); for the smoke test, figures mean nothing
    python bench/overhead.py --no-compile   # (a) and (b) only, as before (c) existed (~7 min)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import importlib.util
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common import (  # noqa: I001
    CpuWatch,
    add_run_args,
    loadavg,
    log,
    machine_info,
    machine_line,
    markdown_table,
    median,
    report_result,
    wait_for_quiet,
)
from kdkit.data import TeacherCache, TensorData, build_data
from kdkit.engine import TrainOptions, train
from kdkit.evaluate.schema import spread
from kdkit.losses import build_loss
from kdkit.models.small import MLP, CifarResNet
from kdkit.teachers import Teacher
from kdkit.types import Batch, ModelOutputs

KD_STEP_GOAL = 0.92
CACHE_GOAL = 1.05
# The student's accuracy counts as unchanged by a bf16 teacher when the mean paired difference in test accuracy is
# within this many points (MNIST-5k's test split has 1,000 examples: 0.005 is 5 of them).
ACCURACY_TOLERANCE = 0.005

# kdkit Teacher settings timed against the hand loop: name -> (precision, channels_last, fuse_bn).
TEACHER_MODES: dict[str, tuple[str, bool, bool]] = {
    "fp32": ("fp32", False, False),
    "channels_last": ("fp32", True, False),
    "channels_last_fuse_bn": ("fp32", True, True),
    "bf16": ("bf16", False, False),
    "bf16_channels_last": ("bf16", True, False),
}
# Teacher modes whose numerics differ from fp32 enough to need the accuracy check.
LOW_PRECISION_MODES = ("bf16", "bf16_channels_last")
# Modes outside kdkit's config, timed for comparison only (none now: BatchNorm folding became
# distill.teacher_fuse_bn, measured above as channels_last_fuse_bn).
WHAT_IF_MODES: tuple[str, ...] = ()


@dataclass(frozen=True)
class CompiledTeacher:
    """A teacher whose model runs through torch.compile. base: "hand" (the hand loop's teacher, called under
    no_grad) or a TEACHER_MODES key (a kdkit Teacher with those settings whose `.model` is then compiled, called under
    its inference_mode); mode: torch.compile's mode (None: its default); freezing: inductor's `freezing` option
    (weights become constants: BatchNorm folded, convolution weights prepacked), PyTorch's advice for CPU inference."""

    base: str
    mode: str | None = None
    freezing: bool = False

    def describe(self) -> str:
        options = ", options={'freezing': True}" if self.freezing else ""
        return f"torch.compile(mode={self.mode or 'default'}{options})"


# Compiled twins, timed beside the modes above; each is divided by its base (uncompiled) in every round.
COMPILED_MODES: dict[str, CompiledTeacher] = {
    "fp32_compiled": CompiledTeacher("fp32"),
    "hand_compiled": CompiledTeacher("hand"),
    # On CPU, max-autotune tunes matrix-multiply templates (only the ResNet's last linear layer here): it compiled
    # in about the default's time on the --quick model.
    "fp32_compiled_max_autotune": CompiledTeacher("fp32", mode="max-autotune-no-cudagraphs"),
    "fp32_compiled_freezing": CompiledTeacher("fp32", freezing=True),
}
# A compiled teacher "pays" when its step is at least this much faster than its uncompiled twin's: differences
# under ~5% are within this bench's noise (docs/benchmarks.md).
COMPILE_PAYS_BELOW = 0.95


@dataclass(frozen=True)
class Settings:
    steps: int = 5  # optimizer steps per timed call: one epoch of steps × batch_size synthetic examples
    rounds: int = 5  # timed rounds after one warm-up round
    warmup_steps: int = 2
    batch_size: int = 128
    image_shape: tuple[int, int, int] = (3, 32, 32)
    num_classes: int = 10
    teacher_depth: int = 110
    student_depth: int = 20
    width: int = 16
    lr: float = 0.05
    momentum: float = 0.9
    temperature: float = 4.0
    ce_weight: float = 0.1
    kd_weight: float = 0.9
    teacher_forward_reps: int = 1  # forwards per mode per round when timing the teacher alone
    cache_pairs: int = 5
    accuracy_teacher_depth: int = 20
    accuracy_teacher_epochs: int = 2
    accuracy_student_hidden: int = 64
    accuracy_student_epochs: int = 15
    accuracy_seeds: int = 3
    accuracy_data: str = "mnist5k"  # a kdkit built-in data set (real data shipped inside an installed package)
    accuracy_limit: int | None = None  # examples used (None: all); mnist5k is sorted by class, digits is not
    cold_compile: bool = True  # each torch.compile configuration in an empty inductor cache of its own
    seed: int = 0


QUICK = Settings(
    steps=2,
    rounds=1,
    warmup_steps=1,
    batch_size=8,
    image_shape=(3, 16, 16),
    teacher_depth=14,
    student_depth=8,
    width=4,
    teacher_forward_reps=1,
    cache_pairs=1,
    accuracy_teacher_depth=8,
    accuracy_teacher_epochs=1,
    accuracy_student_epochs=1,
    accuracy_seeds=1,
    accuracy_data="digits",
    accuracy_limit=300,
    cold_compile=False,  # the configurations share compiled kernels: ~10 s less per configuration
)


@dataclass
class CallTiming:
    """One timed call. total_s: the whole call; setup_s: call start → first step; step_s: median gap between the
    starts of consecutive steps (steady state); teacher_s: median time from a step's teacher call to its student
    forward, i.e. the teacher's forward inside the loop (None without a teacher); steps: optimizer steps run."""

    total_s: float
    setup_s: float
    step_s: float
    teacher_s: float | None
    steps: int

    @property
    def per_step_s(self) -> float:
        return self.total_s / self.steps


class StepClock:
    """Timestamps every step: each teacher call (the step's start when there is a teacher) and each student forward
    (a forward pre-hook on the student)."""

    def __init__(self, student: nn.Module):
        self.student_starts: list[float] = []
        self.teacher_starts: list[float] = []
        self._hook = student.register_forward_pre_hook(self._on_forward)

    def _on_forward(self, module: nn.Module, args) -> None:
        self.student_starts.append(time.perf_counter())

    def on_teacher_call(self) -> None:
        self.teacher_starts.append(time.perf_counter())

    def wrap(self, teacher: Callable[[Batch], ModelOutputs]) -> Callable[[Batch], ModelOutputs]:
        def timed(batch: Batch) -> ModelOutputs:
            self.on_teacher_call()
            return teacher(batch)

        return timed

    def finish(self, started: float, ended: float, steps: int) -> CallTiming:
        self._hook.remove()
        s_starts, t_starts = self.student_starts, self.teacher_starts
        first = min(s_starts[:1] + t_starts[:1])
        gaps = [b - a for a, b in zip(s_starts, s_starts[1:])]
        teacher = median([s - t for t, s in zip(t_starts, s_starts)]) if len(t_starts) == len(s_starts) else None
        return CallTiming(ended - started, first - started, median(gaps) if gaps else ended - first, teacher, steps)


# ---------------------------------------------------------------------------------------------------------------
# The two loops being compared


def hand_kd_call(teacher: nn.Module, student_init: nn.Module, x: torch.Tensor, y: torch.Tensor, s: Settings, seed: int):
    """The reference: a minimal hand-written fp32 KD loop, plain torch, one epoch over (x, y)."""
    student = copy.deepcopy(student_init)
    clock = StepClock(student)
    started = time.perf_counter()
    teacher.eval()
    optimizer = torch.optim.SGD(student.parameters(), lr=s.lr, momentum=s.momentum)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    steps = len(y) // s.batch_size
    t = s.temperature
    for i in range(steps):
        idx = order[i * s.batch_size : (i + 1) * s.batch_size]
        xb, yb = x[idx], y[idx]
        clock.on_teacher_call()
        with torch.no_grad():
            t_logits = teacher(xb)
        s_logits = student(xb)
        kd = F.kl_div(F.log_softmax(s_logits / t, dim=-1), F.softmax(t_logits / t, dim=-1), reduction="batchmean")
        loss = s.ce_weight * F.cross_entropy(s_logits, yb) + s.kd_weight * kd * (t * t)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return clock.finish(started, time.perf_counter(), steps)


def kdkit_call(student_init: nn.Module, loss: nn.Module, data: TensorData, s: Settings, teacher, seed: int):
    """kdkit's real training loop for one epoch; teacher is a callable(batch) -> ModelOutputs, or None."""
    student = copy.deepcopy(student_init)
    clock = StepClock(student)
    opts = TrainOptions(
        epochs=1,
        batch_size=s.batch_size,
        optimizer="sgd",
        lr=s.lr,
        momentum=s.momentum,
        schedule="constant",
        precision="fp32",
        keep_best="none",
    )
    started = time.perf_counter()
    result = train(
        student,
        loss,
        data,
        opts,
        teacher=clock.wrap(teacher) if teacher is not None else None,
        seed=seed,
        device="cpu",
        progress=False,
        log=log,
    )
    return clock.finish(started, time.perf_counter(), result.steps)


def kd_loss(s: Settings):
    return build_loss([("ce", s.ce_weight, {}), ("soft_kl", s.kd_weight, {"temperature": s.temperature})])


def live_teacher(teacher: Teacher) -> Callable[[Batch], ModelOutputs]:
    from kdkit.run.teacher import LiveTeacher

    return LiveTeacher(teacher)  # what kdkit's pipeline passes to train() without a cache


# ---------------------------------------------------------------------------------------------------------------
# Measurements


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_models(s: Settings) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(s.seed)
    teacher = CifarResNet(s.image_shape, s.num_classes, depth=s.teacher_depth, width=s.width).eval()
    student = CifarResNet(s.image_shape, s.num_classes, depth=s.student_depth, width=s.width)
    return teacher, student


def synthetic_data(s: Settings, steps: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images and labels: speed does not depend on the pixels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(steps * s.batch_size, *s.image_shape, generator=g)
    y = torch.randint(0, s.num_classes, (steps * s.batch_size,), generator=g)
    return x, y


def make_teachers(teacher_model: nn.Module, image_shape=(3, 32, 32)) -> dict[str, Teacher]:
    """kdkit Teachers for every mode in TEACHER_MODES, then the what-if modes; a BN fold is checked on a few
    example inputs, as a run checks it."""
    # Teacher(channels_last=True) converts its model in place, so each mode gets its own copy.
    example = torch.randn(8, *image_shape, generator=torch.Generator().manual_seed(0))
    return {
        name: Teacher.from_settings(
            copy.deepcopy(teacher_model), precision=precision, channels_last=cl, fuse_bn=fuse_bn, example=example,
            log=lambda message: None,
        )
        for name, (precision, cl, fuse_bn) in TEACHER_MODES.items()
    }


def timed_batch_sizes(s: Settings) -> list[int]:
    """Every batch size the timed calls give the teacher: full batches and, where an epoch's examples do not divide
    by the batch size, the last partial batch (train() keeps it), for the warm-up and the timed epochs alike."""
    sizes = {s.batch_size}
    for n in (s.warmup_steps * s.batch_size, s.steps * s.batch_size):
        sizes |= {min(n, s.batch_size), n % s.batch_size}
    return sorted(sizes - {0}, reverse=True)  # full batches first: dynamo compiles them static, then any other size


def compiled_graphs() -> int:
    """Graphs torch.compile has compiled in this process so far (a recompile counts as another)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def compile_teachers(s: Settings, teacher_model: nn.Module) -> tuple[dict[str, nn.Module], dict]:
    """The COMPILED_MODES teachers, each compiled and run once on every batch shape of the timed calls, in the way
    the timed calls run it (a kdkit Teacher through its forward, under inference_mode; the hand loop's model under
    no_grad), so that no compilation happens while timing. Returns ({name: compiled hand model or Teacher}, report);
    a configuration whose compilation fails is left out, with the reason in the report."""
    models: dict[str, nn.Module] = {}
    report: dict[str, dict] = {}
    start_up_s, failed = _start_inductor()
    for name, spec in COMPILED_MODES.items():
        entry = {"how": spec.describe(), "base": spec.base}
        if failed:  # torch.compile does not work here at all: every configuration is skipped for the same reason
            report[name] = entry | {"compiled": False, "error": failed}
            continue
        try:
            models[name], warm_up = _compiled(spec, teacher_model, s.image_shape)
            with _own_inductor_cache() if s.cold_compile else contextlib.nullcontext():
                report[name] = entry | {"compiled": True} | warm_up(timed_batch_sizes(s))
        except Exception as exc:  # no C++ compiler, an unsupported op, ...: record why and skip this configuration
            models.pop(name, None)
            report[name] = entry | {"compiled": False, "error": f"{type(exc).__name__}: {_first_line(exc)}"}
            log(f"compile {name}: failed ({report[name]['error']}); skipped")
            continue
        log(f"compile {name}: {report[name]['compile_s']} s for batch sizes {timed_batch_sizes(s)}")
    return models, {"start_up_s": start_up_s, "configs": report}


def _own_inductor_cache():
    """An empty inductor cache for one configuration, so that its compile time does not depend on what the
    configurations before it compiled (the same kernels, the same graph under no_grad). Kept until the run's own
    cache folder (run()) is deleted; what it compiled is loaded by then."""
    from torch._inductor.utils import fresh_cache

    return fresh_cache(dir=os.environ.get("TORCHINDUCTOR_CACHE_DIR"), delete=False)


def _start_inductor() -> tuple[float | None, str]:
    """Compile a tiny conv-BN-ReLU block first (under inference_mode, as a Teacher runs): the process's one-off start
    of torch.compile (imports, compile workers, the first trace and C++ build) is timed here, so that each
    configuration's compile time is its own whatever its place in the order. ('' or why torch.compile fails.)"""
    block = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 2)).eval()
    started = time.perf_counter()
    try:
        with torch.inference_mode():
            torch.compile(block)(torch.ones(2, 3, 4, 4))
    except Exception as exc:  # no C++ compiler, no inductor, ...
        reason = f"{type(exc).__name__}: {_first_line(exc)}"
        log(f"torch.compile does not work here ({reason}): the compiled configurations are skipped")
        return None, reason
    return round(time.perf_counter() - started, 3), ""


def _compiled(spec: CompiledTeacher, teacher_model: nn.Module, image_shape) -> tuple[nn.Module, Callable]:
    """(the compiled teacher, warm_up(batch sizes) -> its compile report). torch.compile is lazy: warm_up compiles,
    with the first call per batch size, and reads inductor's graph-cache counters around it."""
    from torch._dynamo.utils import counters

    options = {"freezing": True} if spec.freezing else None
    if spec.base == "hand":
        model = torch.compile(copy.deepcopy(teacher_model).eval(), mode=spec.mode, options=options)
        forward = _no_grad_forward(model)
    else:
        precision, cl, fuse_bn = TEACHER_MODES[spec.base]
        example = torch.randn(8, *image_shape, generator=torch.Generator().manual_seed(0))
        model = Teacher.from_settings(
            copy.deepcopy(teacher_model), precision=precision, channels_last=cl, fuse_bn=fuse_bn, example=example,
            log=lambda message: None,
        )  # folding (fx) works on the plain model: compile what the Teacher ended up with
        model.model = torch.compile(model.model, mode=spec.mode, options=options)
        forward = model.logits

    def warm_up(sizes: list[int]) -> dict:
        before = dict(counters["inductor"])
        first_calls = {}
        for size in sizes:
            inputs = torch.randn(size, *image_shape, generator=torch.Generator().manual_seed(size))
            started = time.perf_counter()
            forward(inputs)
            first_calls[size] = round(time.perf_counter() - started, 3)
        cache = {k.removeprefix("fxgraph_cache_"): v - before.get(k, 0) for k, v in counters["inductor"].items()}
        return {
            "compile_s": round(sum(first_calls.values()), 3),  # first call per shape: compiling + one forward
            "first_call_s_per_batch_size": first_calls,
            "inductor_fx_graph_cache": {k: v for k, v in cache.items() if k in ("hit", "miss", "bypass") and v},
        }

    return model, warm_up


def _no_grad_forward(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(inputs)

    return forward


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def logit_agreement(reference: torch.Tensor, other: torch.Tensor, temperature: float) -> dict:
    """How far `other` logits are from `reference` (both (N, C) fp32)."""
    diff = (other - reference).abs()
    t = temperature
    kl_t = F.kl_div(
        F.log_softmax(other / t, -1), F.log_softmax(reference / t, -1), reduction="batchmean", log_target=True
    )
    kl_1 = F.kl_div(F.log_softmax(other, -1), F.log_softmax(reference, -1), reduction="batchmean", log_target=True)
    return {
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "reference_logit_std": float(reference.std()),
        "top1_agreement": float((other.argmax(-1) == reference.argmax(-1)).float().mean()),
        f"kl_T{t:g}": float(kl_t),
        "kl_T1": float(kl_1),
    }


def measure_teacher_forward(s: Settings, hands: dict[str, nn.Module], teachers: dict[str, Teacher], x: torch.Tensor):
    """The teacher's forward alone on one batch, per mode, alternated; `no_grad` is the hand loop's way (hands:
    the hand loop's teacher models by configuration name, "hand" reported as no_grad_fp32)."""
    batch = x[: s.batch_size]
    forwards = {("no_grad_fp32" if k == "hand" else k): _no_grad_forward(m) for k, m in hands.items()}
    forwards |= {k: t.logits for k, t in teachers.items()}
    outputs = {name: fn(batch).float() for name, fn in forwards.items()}  # warm-up (oneDNN primitives per format)
    times: dict[str, list[float]] = {name: [] for name in forwards}
    with CpuWatch() as watch:
        for r in range(min(s.rounds, 3)):  # the forward inside the loop is measured in every KD round as well
            names = list(forwards) if r % 2 == 0 else list(reversed(forwards))
            for name in names:
                for _ in range(s.teacher_forward_reps):
                    started = time.perf_counter()
                    forwards[name](batch)
                    times[name].append(time.perf_counter() - started)
    reference = outputs["no_grad_fp32"]
    return {
        "seconds": {name: round(median(v), 4) for name, v in times.items()},
        "inference_mode_vs_no_grad": round(median(times["fp32"]) / median(times["no_grad_fp32"]), 3),
        "numerics_vs_fp32": {
            # An untrained teacher on random inputs: this shows the rounding through the network's depth only.
            name: logit_agreement(reference, out, s.temperature)
            for name, out in outputs.items()
            if name not in ("no_grad_fp32", "fp32")
        },
        "others_cpu_fraction": watch.others_fraction,
        "noisy": watch.noisy,
    }


def measure_kd_step(
    s: Settings,
    hands: dict[str, nn.Module],
    student_init: nn.Module,
    teachers: dict[str, Teacher],
    twins: dict[str, str],
):
    """Goal (a): kdkit's step with each Teacher mode divided by the hand loop, alternated round by round. hands: the
    hand loop's teacher models ("hand", and compiled ones); twins: {compiled configuration: its uncompiled base},
    which it is also divided by, round by round (section (c))."""
    x, y = synthetic_data(s, s.steps, s.seed)
    warm_x, warm_y = x[: s.warmup_steps * s.batch_size], y[: s.warmup_steps * s.batch_size]
    loss = kd_loss(s)

    def config(name: str, xs: torch.Tensor, ys: torch.Tensor, seed: int) -> CallTiming:
        if name in hands:
            return hand_kd_call(hands[name], student_init, xs, ys, s, seed)
        return kdkit_call(student_init, loss, TensorData(xs, ys), s, live_teacher(teachers[name]), seed)

    names = [*hands, *teachers]
    log(f"kd step: warm-up ({s.warmup_steps} steps per configuration)")
    for name in names:
        config(name, warm_x, warm_y, s.seed)
    rounds: list[dict] = []
    for r in range(s.rounds):
        order = names if r % 2 == 0 else list(reversed(names))
        timings: dict[str, CallTiming] = {}
        with CpuWatch() as watch:
            for name in order:
                timings[name] = config(name, x, y, s.seed + r)
                log(
                    f"kd step round {r + 1}/{s.rounds} {name}: {timings[name].per_step_s:.3f} s/step over the call, "
                    f"{timings[name].step_s:.3f} steady (teacher {timings[name].teacher_s:.3f}), "
                    f"setup {timings[name].setup_s:.3f} s"
                )
        rounds.append({"timings": timings, "others_cpu_fraction": watch.others_fraction, "noisy": watch.noisy})

    def col(name: str, attr: str) -> list[float]:
        return [getattr(rd["timings"][name], attr) for rd in rounds]

    modes = {}
    for name in names:
        entry = {
            "step_s_whole_call": round(median(col(name, "per_step_s")), 4),
            "step_s_steady": round(median(col(name, "step_s")), 4),
            "setup_s": round(median(col(name, "setup_s")), 4),
            # The teacher's forward inside the loop, and its share of the step (per round, then the median).
            "teacher_in_step_s": round(median(col(name, "teacher_s")), 4),
            "teacher_share_of_step": round(
                median([a / b for a, b in zip(col(name, "teacher_s"), col(name, "step_s"))]), 3
            ),
        }
        if name != "hand":
            pair = [a / b for a, b in zip(col(name, "per_step_s"), col("hand", "per_step_s"))]
            steady = [a / b for a, b in zip(col(name, "step_s"), col("hand", "step_s"))]
            entry |= {
                "ratio_vs_hand": round(median(pair), 3),
                "ratio_of_medians": round(median(col(name, "per_step_s")) / median(col("hand", "per_step_s")), 3),
                "ratio_vs_hand_steady": round(median(steady), 3),
                "per_round_ratios": [round(v, 3) for v in pair],
            }
        if name in twins:
            entry |= _vs_twin(col, name, twins[name])
        modes[name] = entry
    return {
        "modes": modes,
        "rounds_others_cpu_fraction": [rd["others_cpu_fraction"] for rd in rounds],
        "noisy": any(rd["noisy"] for rd in rounds),
    }


def _vs_twin(col: Callable[[str, str], list[float]], name: str, base: str) -> dict:
    """A compiled configuration against its uncompiled base, per round: whole call, steady step, teacher's forward."""

    def ratios(attr: str) -> list[float]:
        return [a / b for a, b in zip(col(name, attr), col(base, attr))]

    return {
        "uncompiled": base,
        "ratio_vs_uncompiled": round(median(ratios("per_step_s")), 3),
        "ratio_vs_uncompiled_steady": round(median(ratios("step_s")), 3),
        "teacher_ratio_vs_uncompiled": round(median(ratios("teacher_s")), 3),
        "per_round_ratios_vs_uncompiled": [round(v, 3) for v in ratios("per_step_s")],
    }


def measure_cache(s: Settings, teacher_model: nn.Module, student_init: nn.Module):
    """Goal (b): a kdkit epoch with a TeacherCache divided by a kdkit epoch of the student alone (labels only)."""
    x, y = synthetic_data(s, s.steps, s.seed + 1)
    data = TensorData(x, y)
    teacher = Teacher(copy.deepcopy(teacher_model))
    losses = {"cached_teacher": kd_loss(s), "student_alone": build_loss([("ce", 1.0, {})])}
    with tempfile.TemporaryDirectory(prefix="kdkit-bench-cache-") as folder:
        started = time.perf_counter()
        cache = TeacherCache.build_or_load(
            data, teacher.logits, teacher.fingerprint(), folder, batch_size=256, device="cpu", log=log
        )
        build_s = time.perf_counter() - started
        sources = {"cached_teacher": cache, "student_alone": None}

        def config(name: str, seed: int) -> CallTiming:
            return kdkit_call(student_init, losses[name], data, s, sources[name], seed)

        for name in sources:  # warm-up
            config(name, s.seed)
        timings: dict[str, list[CallTiming]] = {name: [] for name in sources}
        with CpuWatch() as watch:
            for p in range(s.cache_pairs):
                for name in list(sources) if p % 2 == 0 else list(reversed(sources)):
                    timings[name].append(config(name, s.seed + p))
                log(
                    f"cache pair {p + 1}/{s.cache_pairs}: cached {timings['cached_teacher'][-1].total_s:.3f} s, "
                    f"alone {timings['student_alone'][-1].total_s:.3f} s per epoch"
                )
    cached, alone = timings["cached_teacher"], timings["student_alone"]
    epoch = {name: [t.total_s for t in v] for name, v in timings.items()}
    return {
        "epoch_s": {name: round(median(v), 4) for name, v in epoch.items()},
        "step_s_steady": {name: round(median([t.step_s for t in v]), 4) for name, v in timings.items()},
        "ratio": round(median([a.total_s / b.total_s for a, b in zip(cached, alone)]), 3),
        "ratio_of_medians": round(median(epoch["cached_teacher"]) / median(epoch["student_alone"]), 3),
        "ratio_steady": round(median([a.step_s / b.step_s for a, b in zip(cached, alone)]), 3),
        "per_pair_ratios": [round(a.total_s / b.total_s, 3) for a, b in zip(cached, alone)],
        "one_off_cache_build_s": round(build_s, 3),
        "cache_examples": len(data),
        "others_cpu_fraction": watch.others_fraction,
        "noisy": watch.noisy,
    }


def check_bf16_accuracy(s: Settings):
    """Does a student learn as well from a bf16 teacher? Real data (MNIST-5k), a CIFAR-style ResNet teacher trained
    briefly, its logits in each precision compared, then an MLP student distilled from each, over several seeds.

    The student reads the teacher's logits from a TeacherCache built per precision: a frozen teacher is
    deterministic, so this is the same as running it live, at a fraction of the time.
    """
    started = time.perf_counter()
    data = build_data("builtin", s.accuracy_data, limit=s.accuracy_limit)
    torch.manual_seed(s.seed)
    net = CifarResNet(data.input_shape, data.num_classes, depth=s.accuracy_teacher_depth, width=s.width)
    teacher_opts = TrainOptions(
        epochs=s.accuracy_teacher_epochs,
        batch_size=128,
        optimizer="sgd",
        lr=s.lr,
        momentum=s.momentum,
        schedule="cosine",
        keep_best="none",
    )
    log(f"bf16 check: training a ResNet-{s.accuracy_teacher_depth} teacher on {s.accuracy_data}")
    train(net, build_loss([("ce", 1.0, {})]), data.train, teacher_opts, seed=s.seed, device="cpu", progress=False)
    teachers = make_teachers(net, tuple(data.test.x.shape[1:]))
    test_logits = {name: t.logits(data.test.x) for name, t in teachers.items()}
    test_labels = data.test.labels
    agreement = {
        name: logit_agreement(test_logits["fp32"], test_logits[name], s.temperature)
        for name in teachers
        if name != "fp32"
    }
    teacher_accuracy = {
        name: round(float((v.argmax(-1) == test_labels).float().mean()), 4) for name, v in test_logits.items()
    }

    student_modes = ("fp32", *LOW_PRECISION_MODES)
    train_logits = {name: teachers[name].logits(data.train.x).numpy() for name in student_modes}
    # A mode whose training logits are bit-identical to an earlier mode's trains the identical student: reuse it.
    same_as = {
        name: next((o for o in student_modes[:i] if np.array_equal(train_logits[o], train_logits[name])), None)
        for i, name in enumerate(student_modes)
    }
    students: dict[str, dict[str, list[float]]] = {name: {"best": [], "last": []} for name in student_modes}
    for seed in range(s.accuracy_seeds):
        for name in student_modes:
            if same_as[name] is not None:
                best, last = students[same_as[name]]["best"][-1], students[same_as[name]]["last"][-1]
            else:
                best, last = _distil_mlp(s, data, TeacherCache(train_logits[name]), seed)
            students[name]["best"].append(best)
            students[name]["last"].append(last)

    def mean_std(v: list[float]) -> dict:
        s = spread(v)  # metrics.json's definition: population std over seeds (ddof=0)
        return {"mean": round(s["mean"], 4), "std": round(s["std"], 4)}

    student_summary = {}
    unchanged = {}
    for name in student_modes:
        entry = {f"test_accuracy_{k}": mean_std(v) | {"per_seed": v} for k, v in students[name].items()}
        if name != "fp32":
            diffs = [a - b for a, b in zip(students[name]["best"], students["fp32"]["best"])]
            entry["diff_vs_fp32_best"] = mean_std(diffs)
            unchanged[name] = abs(sum(diffs) / len(diffs)) <= ACCURACY_TOLERANCE
        student_summary[name] = entry
    return {
        "data": f"{s.accuracy_data} (built-in, real): {len(data.train)} train / {len(data.val or [])} val / "
        f"{len(data.test)} test",
        "teacher_model": f"CifarResNet depth {s.accuracy_teacher_depth} width {s.width}, "
        f"{s.accuracy_teacher_epochs} epochs ({param_count(net)} params)",
        "student_model": f"MLP {data.input_shape} -> {s.accuracy_student_hidden} -> {data.num_classes}, "
        f"{s.accuracy_student_epochs} epochs, AdamW, {s.ce_weight:g}*ce + {s.kd_weight:g}*soft_kl(T={s.temperature:g}),"
        f" {s.accuracy_seeds} seeds; test accuracy at the best-validation epoch and at the last epoch",
        "teacher_test_accuracy": teacher_accuracy,
        "teacher_logits_vs_fp32": agreement,
        "students": student_summary,
        "identical_teacher_logits_to": {k: v for k, v in same_as.items() if v is not None},
        "criterion": f"unchanged when |mean paired diff of best-epoch test accuracy| <= {ACCURACY_TOLERANCE}",
        "student_accuracy_unchanged": unchanged,
        "seconds": round(time.perf_counter() - started, 1),
    }


def _distil_mlp(s: Settings, data, cache: TeacherCache, seed: int) -> tuple[float, float]:
    """Distil an MLP student from cached logits; test accuracy at the best-validation epoch and at the last."""
    torch.manual_seed(seed)
    student = MLP(data.input_shape, data.num_classes, hidden=[s.accuracy_student_hidden])
    history: list[tuple[float, float]] = []

    def accuracy(model: nn.Module, split) -> float:
        model.eval()
        with torch.no_grad():
            return float((model(split.x).argmax(-1) == split.labels).float().mean())

    def on_eval(model: nn.Module) -> dict[str, float]:
        val, test = accuracy(model, data.val or data.test), accuracy(model, data.test)
        history.append((val, test))
        return {"accuracy": val}

    opts = TrainOptions(epochs=s.accuracy_student_epochs, batch_size=128, keep_best="none")
    train(
        student, kd_loss(s), data.train, opts, teacher=cache, on_eval=on_eval, seed=seed, device="cpu", progress=False
    )
    best = max(range(len(history)), key=lambda i: history[i][0])  # first epoch with the best validation accuracy
    return round(history[best][1], 4), round(history[-1][1], 4)


def torchdistill_status() -> dict:
    """torchdistill is a dev/bench peer; it is timed only where it imports. Here it cannot be installed (see reason)."""
    if importlib.util.find_spec("torchdistill") is None:
        reason = "not installed"
        if importlib.util.find_spec("torchvision") is None:
            reason = (
                "not installed: torchdistill 1.1.5 requires torchvision>=0.27, which is not installed here and whose "
                "only available build is a 5.5 GiB CUDA wheel pinned to another torch (torch 2.14.1 / torchvision "
                "0.29.1); skipped by design rather than replacing the environment's torch"
            )
        return {"timed": False, "reason": reason}
    return {
        "timed": False,
        "reason": "installed, but not wired into this bench yet (it could not be installed where the bench was "
        "written, so there was nothing to test the timing code against)",
    }


# ---------------------------------------------------------------------------------------------------------------
# The whole run


def run(
    s: Settings,
    threads: int | None = None,
    load_wait: dict | None = None,
    command: str = "",
    quick: bool = False,
    compile_teacher: bool = True,
) -> dict:
    threads_before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    # oneDNN off for the one-thread smoke run: torch 2.13's single-threaded oneDNN conv backward corrupts the heap on
    # some AVX2-only CPUs (reproduced on a 2-core AMD EPYC: "corrupted double-linked list" a few steps into training a
    # small ResNet; fine with 2 threads or oneDNN off). --quick figures mean nothing anyway.
    onednn = torch.backends.mkldnn.flags(enabled=False) if quick and threads == 1 else contextlib.nullcontext()
    try:
        with onednn, _fresh_inductor_cache() if compile_teacher else contextlib.nullcontext():
            return _run(s, load_wait, command, quick, compile_teacher)
    finally:
        torch.set_num_threads(threads_before)  # a caller (the smoke test) keeps its own setting


def _fresh_inductor_cache():
    """A fresh, empty inductor cache for the run (deleted after it): compile times are those of a first compile, not
    of whatever an earlier run left in the user's cache. Where inductor cannot be imported, compiling will fail and
    say so (section (c)); the run goes on."""
    try:
        from torch._inductor.utils import fresh_cache
    except ImportError:
        return contextlib.nullcontext()
    return fresh_cache()


def _compile_if(on: bool, s: Settings, teacher_model: nn.Module) -> tuple[dict, dict, float | None]:
    """compile_teachers' models and report, and the share of the cores others used meanwhile; nothing when off."""
    if not on:
        return {}, {}, None
    log(f"torch.compile: {len(COMPILED_MODES)} teacher configurations, batch sizes {timed_batch_sizes(s)}")
    with CpuWatch() as watch:
        compiled, report = compile_teachers(s, teacher_model)
    return compiled, report, watch.others_fraction


def _run(s: Settings, load_wait: dict | None, command: str, quick: bool, compile_teacher: bool) -> dict:
    started = time.perf_counter()
    machine = machine_info() | {"loadavg_before": loadavg(), "load_wait": load_wait}
    teacher_model, student_init = build_models(s)
    teachers = make_teachers(teacher_model, s.image_shape)
    t_params, s_params = param_count(teacher_model), param_count(student_init)
    log(f"teacher ResNet-{s.teacher_depth} {t_params} params, student ResNet-{s.student_depth} {s_params} params")

    hands: dict[str, nn.Module] = {"hand": copy.deepcopy(teacher_model)}
    compiled, compile_report, compile_others = _compile_if(compile_teacher, s, teacher_model)
    hands |= {n: m for n, m in compiled.items() if COMPILED_MODES[n].base == "hand"}
    teachers |= {n: m for n, m in compiled.items() if COMPILED_MODES[n].base != "hand"}
    twins = {n: COMPILED_MODES[n].base for n in compiled}

    graphs_compiled = compiled_graphs()
    log("teacher forward alone")
    x, _ = synthetic_data(s, 1, s.seed + 2)
    teacher_forward = measure_teacher_forward(s, hands, teachers, x)
    log("kd step: hand loop against kdkit train() per teacher mode")
    kd_step = measure_kd_step(s, hands, student_init, teachers, twins)
    # 0 when compile_teachers covered every shape and grad mode that the timed parts (and their warm-ups) ran.
    graphs_compiled = compiled_graphs() - graphs_compiled
    log("cached teacher against the student alone")
    cache = measure_cache(s, teacher_model, student_init)
    log("bf16 accuracy check")
    with CpuWatch() as watch:
        accuracy = check_bf16_accuracy(s)
    accuracy |= {"others_cpu_fraction": watch.others_fraction, "noisy": watch.noisy}

    modes = kd_step["modes"]
    unchanged = accuracy["student_accuracy_unchanged"]
    eligible = {n: m["ratio_vs_hand"] for n, m in modes.items() if n in TEACHER_MODES and unchanged.get(n, True)}
    best_mode = min(eligible, key=eligible.get)
    for name, m in modes.items():
        if name != "hand":
            m["goal_met"] = m["ratio_vs_hand"] <= KD_STEP_GOAL
            m["accuracy_unchanged"] = unchanged.get(name, True)
            m["kdkit_option"] = name in TEACHER_MODES
    compile_part = summarize_compile(compile_report, modes, graphs_compiled, s.cold_compile)
    compile_part |= {
        "skipped": None if compile_teacher else "--no-compile",
        "others_cpu_fraction": compile_others,
    }
    goals = {
        "kd_step_vs_hand": {
            "goal": KD_STEP_GOAL,
            "best_mode": best_mode,
            "best_ratio": eligible[best_mode],
            "met": eligible[best_mode] <= KD_STEP_GOAL,
            "rule": "best median per-round ratio among kdkit Teacher modes whose bf16 accuracy check passed",
        },
        "cached_epoch_vs_student_alone": {
            "goal": CACHE_GOAL,
            "ratio": cache["ratio"],
            "met": cache["ratio"] <= CACHE_GOAL,
        },
    }
    noisy_parts = [
        name
        for name, part in (("teacher_forward", teacher_forward), ("kd_step", kd_step), ("cache", cache))
        if part["noisy"]
    ] + (["bf16_accuracy"] if accuracy["noisy"] else [])
    machine |= {"loadavg_after": loadavg(), "torch_threads_after": torch.get_num_threads()}
    quiet_start = load_wait is None or load_wait.get("quiet_at_start", True)
    return {
        "bench": "overhead",
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command,
        "quick": quick,
        "machine": machine,
        "under_load": bool(noisy_parts) or not quiet_start,
        "noisy_parts": noisy_parts,
        "settings": asdict(s)
        | {
            "teacher": f"CifarResNet depth {s.teacher_depth} width {s.width}",
            "student": f"CifarResNet depth {s.student_depth} width {s.width}",
            "teacher_params": t_params,
            "student_params": s_params,
            "teacher_to_student_params": round(t_params / s_params, 2),
            "data": "synthetic: random N(0,1) images and random labels (timing only)",
            "loss": f"{s.ce_weight:g}*ce + {s.kd_weight:g}*soft_kl(T={s.temperature:g}) (T^2-scaled, batchmean)",
            "optimizer": f"SGD lr {s.lr:g} momentum {s.momentum:g}, fp32 student (kdkit's SGD adds nesterov=True)",
            "kdkit_train": "train(epochs=1, keep_best='none', schedule='constant', progress=False, device='cpu')",
        },
        "teacher_forward": teacher_forward,
        "kd_step": kd_step,
        "cache": cache,
        "compile": compile_part,
        "bf16_accuracy": accuracy,
        "torchdistill": torchdistill_status(),
        "goals": goals,
        "elapsed_s": round(time.perf_counter() - started, 1),
    }


def summarize_compile(report: dict, modes: dict[str, dict], graphs_after_warm_up: int, cold: bool) -> dict:
    """Section (c): does torch.compile of the teacher pay? Each compiled configuration's step against its uncompiled
    twin's (median per-round ratio, whole call), its compile time, and the steps it takes to earn that time back.
    report: compile_teachers' (empty when not compiling)."""
    configs = {
        name: _against_twin(entry, modes[name], modes[COMPILED_MODES[name].base]) if entry["compiled"] else entry
        for name, entry in report.get("configs", {}).items()
    }
    timed = {n: c for n, c in configs.items() if c["compiled"]}
    kdkit_compiled = {n: modes[n]["ratio_vs_hand"] for n in timed if COMPILED_MODES[n].base != "hand"}
    best = min(kdkit_compiled, key=kdkit_compiled.get) if kdkit_compiled else None
    best_vs_hand = None
    if best is not None:
        ratio = kdkit_compiled[best]
        best_vs_hand = {"mode": best, "ratio_vs_hand": ratio, "would_meet_kd_step_goal": ratio <= KD_STEP_GOAL}
    cache = (
        "each configuration compiles in an empty inductor cache of its own (a first compile)"
        if cold
        else "the configurations share one inductor cache (--quick), so later ones reuse kernels"
    )
    return {
        "configs": configs,
        "inductor_start_up_s": report.get("start_up_s"),
        "pays": any(c["pays"] for c in timed.values()) if timed else None,
        "verdict": _compile_verdict(configs),
        "rule": f"compiled ÷ uncompiled twin, median per-round ratio of whole-call s/step <= {COMPILE_PAYS_BELOW}",
        "best_kdkit_compiled_vs_hand": best_vs_hand,
        "graphs_compiled_after_warm_up": graphs_after_warm_up,
        "compile_cache": cache + "; all after torch.compile's one-off start in the process",
    }


def _against_twin(entry: dict, m: dict, base: dict) -> dict:
    """A compiled configuration's compile report with its step against its uncompiled twin's (kd_step modes)."""
    keys = ("ratio_vs_uncompiled", "ratio_vs_uncompiled_steady", "teacher_ratio_vs_uncompiled")
    saved = base["step_s_whole_call"] - m["step_s_whole_call"]
    pays = m["ratio_vs_uncompiled"] <= COMPILE_PAYS_BELOW
    return entry | {k: m[k] for k in (*keys, "per_round_ratios_vs_uncompiled")} | {
        "step_s_whole_call": m["step_s_whole_call"],
        "uncompiled_step_s_whole_call": base["step_s_whole_call"],
        # Steps of this size that win the compile time back; only where the gain is beyond noise.
        "break_even_steps": round(entry["compile_s"] / saved) if pays and saved > 0 else None,
        "pays": pays,
    }


def _compile_verdict(configs: dict[str, dict]) -> str:
    """One plain line: does it pay, and each compiled configuration's ratio and compile time."""
    timed = {n: c for n, c in configs.items() if c["compiled"]}
    if not timed:
        return "not measured: " + ("; ".join(sorted({c["error"] for c in configs.values()})) or "skipped")
    paying = [n for n, c in timed.items() if c["pays"]]
    figures = ", ".join(
        f"{n} {c['ratio_vs_uncompiled']}x its uncompiled step (compile {c['compile_s']} s)" for n, c in timed.items()
    )
    head = f"pays ({', '.join(paying)})" if paying else "does not pay"
    return f"{head} on these models: {figures}; 'pays' means <= {COMPILE_PAYS_BELOW}x (smaller is within noise)"


def _quiet_note(result: dict) -> str:
    """What 'not under load' meant for this run: no one else, or others only on cores this run left free."""
    shares = [result["teacher_forward"]["others_cpu_fraction"], result["cache"]["others_cpu_fraction"]]
    shares += result["kd_step"]["rounds_others_cpu_fraction"] + [result["bf16_accuracy"]["others_cpu_fraction"]]
    busiest = max((v for v in shares if v is not None), default=0.0)
    if busiest <= 0.15:
        return "Quiet."
    threads, cores = result["machine"]["torch_threads"], result["machine"]["cores"]
    free = max(0, cores - threads) / cores
    return (
        f"Not quiet, but not contended: other processes kept up to {busiest:.0%} of the cores busy, about the "
        f"{free:.0%} that this run's {threads} torch thread(s) left free (no part flagged noisy)."
    )


def to_markdown(result: dict) -> str:
    """The dated section that --write appends to docs/benchmarks.md."""
    m, st, g = result["machine"], result["settings"], result["goals"]
    modes, fwd = result["kd_step"]["modes"], result["teacher_forward"]
    lines = [
        f"## {result['date'][:10]} — kdkit overhead vs a hand-written KD loop (`bench/overhead.py`)",
        "",
        f"- Machine: {machine_line(m)}.",
        f"- Load: /proc/loadavg {m['loadavg_before']} before, {m['loadavg_after']} after (includes this run); "
        f"other processes' share of the cores per part: teacher forward {fwd['others_cpu_fraction']}, KD rounds "
        f"{result['kd_step']['rounds_others_cpu_fraction']}, cache {result['cache']['others_cpu_fraction']}, "
        f"accuracy {result['bf16_accuracy']['others_cpu_fraction']}. "
        + (
            f"**Measured under load** (noisy: {', '.join(result['noisy_parts']) or 'load at start'})."
            if result["under_load"]
            else _quiet_note(result)
        ),
        f"- Command: `{result['command']}` ({result['elapsed_s']} s).",
        f"- Models: teacher {st['teacher']} ({st['teacher_params']:,} params), student {st['student']} "
        f"({st['student_params']:,} params), {st['teacher_to_student_params']}× smaller. Batch {st['batch_size']}, "
        f"{'×'.join(map(str, st['image_shape']))}, {st['data']}. Loss {st['loss']}; {st['optimizer']}.",
        f"- Each timed call is one epoch of {st['steps']} steps; {st['rounds']} rounds after a warm-up, order reversed "
        "every other round. Ratio = median over rounds of (kdkit ÷ hand) for whole calls (setup included); "
        "steady = the same for the median step inside a call (setup excluded).",
        "",
        f"### (a) KD step, kdkit `train()` with a live `Teacher` ÷ hand loop (goal ≤ {KD_STEP_GOAL:g})",
        "",
    ]
    rows = []
    for name, mm in modes.items():
        t_fwd = fwd["seconds"]["no_grad_fp32" if name == "hand" else name]
        teacher = f"{mm['teacher_in_step_s']} ({mm['teacher_share_of_step']:.0%}); alone {t_fwd}"
        if name == "hand":
            rows.append(
                [
                    "hand loop (fp32, no_grad)",
                    mm["step_s_whole_call"],
                    mm["step_s_steady"],
                    mm["setup_s"],
                    "1",
                    "1",
                    teacher,
                    "—",
                ]
            )
        else:
            ok = "yes" if mm["goal_met"] else "no"
            acc = "" if mm["accuracy_unchanged"] else " (accuracy changed)"
            label = f"kdkit, Teacher {name}"
            if name in COMPILED_MODES:
                spec = COMPILED_MODES[name]
                where = "hand loop" if spec.base == "hand" else f"kdkit, Teacher {spec.base}"
                label = f"what-if: {where}, teacher model {spec.describe()} ({name}; no config option)"
                ok = "—" if spec.base == "hand" else f"({ok}: not counted)"
            elif not mm["kdkit_option"]:
                label = f"what-if: kdkit, Teacher channels_last on a BN-folded copy ({name}; no config option)"
                ok = f"({ok}: not counted)"
            rows.append(
                [
                    label,
                    mm["step_s_whole_call"],
                    mm["step_s_steady"],
                    mm["setup_s"],
                    f"**{mm['ratio_vs_hand']}** {mm['per_round_ratios']}",
                    mm["ratio_vs_hand_steady"],
                    teacher,
                    ok + acc,
                ]
            )
    lines.append(
        markdown_table(
            [
                "configuration",
                "s/step (whole call)",
                "s/step (steady)",
                "setup s",
                "ratio vs hand (per round)",
                "steady ratio",
                "teacher forward s in the step (share); alone",
                f"≤ {KD_STEP_GOAL:g}?",
            ],
            rows,
        )
    )
    kd_goal = g["kd_step_vs_hand"]
    lines += [
        "",
        f"Best eligible mode: **{kd_goal['best_mode']} at {kd_goal['best_ratio']}** — goal "
        f"{'met' if kd_goal['met'] else 'missed'} (compiled what-ifs not counted: section (c)). Teacher forward under "
        f"inference_mode ÷ under no_grad: {fwd['inference_mode_vs_no_grad']}.",
        "",
        "### (b) Cached teacher epoch ÷ student-alone epoch (goal ≤ 1.05)",
        "",
    ]
    c = result["cache"]
    lines.append(
        markdown_table(
            [
                "configuration",
                "s/epoch",
                "s/step (steady)",
                "ratio (per pair)",
                "steady ratio",
                "one-off cache build s",
            ],
            [
                [
                    "kdkit, TeacherCache (0.1 ce + 0.9 soft_kl)",
                    c["epoch_s"]["cached_teacher"],
                    c["step_s_steady"]["cached_teacher"],
                    f"**{c['ratio']}** {c['per_pair_ratios']}",
                    c["ratio_steady"],
                    f"{c['one_off_cache_build_s']} ({c['cache_examples']} examples)",
                ],
                [
                    "kdkit, student alone (ce)",
                    c["epoch_s"]["student_alone"],
                    c["step_s_steady"]["student_alone"],
                    "1",
                    "1",
                    "—",
                ],
            ],
        )
    )
    cg = g["cached_epoch_vs_student_alone"]
    lines += [
        "",
        f"Goal {'met' if cg['met'] else 'missed'} ({cg['ratio']}).",
        "",
        *compile_markdown(result["compile"]),
        "",
        "### bf16 teacher: accuracy check",
        "",
    ]
    a = result["bf16_accuracy"]
    lines.append(f"{a['data']}; teacher {a['teacher_model']}; student {a['student_model']}.")
    lines.append("")
    rows = []
    for name, s_entry in a["students"].items():
        agree = a["teacher_logits_vs_fp32"].get(name)
        kl_key = f"kl_T{st['temperature']:g}"
        rows.append(
            [
                name,
                a["teacher_test_accuracy"][name],
                "—"
                if agree is None
                else f"{agree['max_abs_diff']:.3g} / {agree['top1_agreement']:.4f} / {agree[kl_key]:.2e}",
                f"{s_entry['test_accuracy_best']['mean']} ± {s_entry['test_accuracy_best']['std']}",
                f"{s_entry['test_accuracy_last']['mean']} ± {s_entry['test_accuracy_last']['std']}",
                "—"
                if name == "fp32"
                else f"{s_entry['diff_vs_fp32_best']['mean']:+.4f} ± {s_entry['diff_vs_fp32_best']['std']}",
            ]
        )
    lines.append(
        markdown_table(
            [
                "teacher precision",
                "teacher test acc",
                f"logits vs fp32: max abs / top-1 agree / KL(T={st['temperature']:g})",
                "student test acc (best epoch)",
                "student test acc (last epoch)",
                "Δ vs fp32 (best)",
            ],
            rows,
        )
    )
    syn = fwd["numerics_vs_fp32"]
    lines += [
        "",
        f"Criterion: {a['criterion']}; unchanged: {a['student_accuracy_unchanged']}. On the timed ResNet-"
        f"{st['teacher_depth']} (untrained, random inputs) logits differ from fp32 by max "
        + ", ".join(
            f"{k} {v['max_abs_diff']:.3g} (logit std {v['reference_logit_std']:.3g}, top-1 agree "
            f"{v['top1_agreement']:.3f})"
            for k, v in syn.items()
        )
        + ".",
        "",
        f"torchdistill: {result['torchdistill']['reason']}.",
    ]
    return "\n".join(lines) + "\n"


def compile_markdown(c: dict) -> list[str]:
    """Section (c) of the docs section: does torch.compile of the teacher pay?"""
    lines = ["### (c) torch.compile of the teacher: compiled ÷ uncompiled, same rounds as (a)", ""]
    if c["skipped"]:
        return lines + [f"Not measured ({c['skipped']})."]
    if c["pays"] is None:  # nothing compiled
        return lines + [f"**torch.compile of the teacher {c['verdict']}**: the compiled configurations were skipped."]
    rows = []
    for e in c["configs"].values():
        where = "hand loop" if e["base"] == "hand" else f"kdkit, Teacher {e['base']}"
        if not e["compiled"]:
            rows.append([f"{where}, {e['how']}", f"failed: {e['error']}", "—", "—", "—", "—", "—", "skipped"])
            continue
        cache = ", ".join(f"{k} {v}" for k, v in e["inductor_fx_graph_cache"].items()) or "—"
        rows.append(
            [
                f"{where}, {e['how']}",
                f"{e['compile_s']} (batch sizes {list(e['first_call_s_per_batch_size'])}; graph cache: {cache})",
                f"{e['step_s_whole_call']} vs {e['uncompiled_step_s_whole_call']}",
                f"**{e['ratio_vs_uncompiled']}** {e['per_round_ratios_vs_uncompiled']}",
                e["ratio_vs_uncompiled_steady"],
                e["teacher_ratio_vs_uncompiled"],
                "—" if e["break_even_steps"] is None else e["break_even_steps"],
                "yes" if e["pays"] else "no",
            ]
        )
    lines.append(
        markdown_table(
            [
                "configuration",
                "compile s (first calls)",
                "s/step compiled vs uncompiled",
                "ratio (per round)",
                "steady ratio",
                "teacher forward ratio",
                "steps to earn the compile back",
                f"pays (≤ {COMPILE_PAYS_BELOW:g})?",
            ],
            rows,
        )
    )
    best = c["best_kdkit_compiled_vs_hand"]
    lines += [
        "",
        f"**torch.compile of the teacher {c['verdict']}.**"
        + (
            ""
            if best is None
            else f" Best compiled kdkit configuration against the hand loop: {best['mode']} at {best['ratio_vs_hand']}"
            f" ({'within' if best['would_meet_kd_step_goal'] else 'outside'} the KD-step goal ≤ {KD_STEP_GOAL:g}, "
            "were it an option)."
        )
        + f" Graphs compiled after the compile warm-up: {c['graphs_compiled_after_warm_up']} (0: it covered every "
        "shape the timed parts ran). Compile time: the first call per batch size; "
        f"{c['compile_cache']} ({c['inductor_start_up_s']} s, not in the table); others' CPU share while compiling "
        f"(inductor's compile workers count as others): {c['others_cpu_fraction']}.",
    ]
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--quick", action="store_true", help="tiny models, a few steps, one thread: a smoke run, figures mean nothing"
    )
    add_run_args(p)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--steps", type=int, default=None, help="steps per timed call (default 5)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile configurations (section (c))")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    s = QUICK if args.quick else Settings()
    if args.steps:
        s = replace(s, steps=args.steps)
    if args.rounds:
        s = replace(s, rounds=args.rounds)
    load_wait = None
    if not (args.quick or args.no_wait):
        load_wait = wait_for_quiet(args.load_threshold, args.max_wait)
    command = shlex.join(["python", *(sys.argv if argv is None else ["bench/overhead.py", *argv])])
    # --quick runs on one thread: on a busy 2-core machine, two OpenMP threads that wait for each other at every
    # barrier make tiny steps 10-30x slower, and the smoke run only has to finish.
    threads = args.threads or (1 if args.quick else None)
    result = run(
        s, threads=threads, load_wait=load_wait, command=command, quick=args.quick, compile_teacher=not args.no_compile
    )
    return report_result(result, args, to_markdown)


if __name__ == "__main__":
    main()
