"""kdkit's fixed costs on a small model: `kdkit.train` against a plain PyTorch loop, on CPU.

The student most users of a CPU toolkit distil is small: here an MLP 784-800-800-10 (1.3 M parameters) on MNIST-5k
(kdkit's built-in split: 3,500 training, 500 validation examples), trained with labels only (cross-entropy; no
teacher, so that the comparison is the engine alone), AdamW, a constant learning rate, batches of 128, 8 epochs and
a validation pass after every epoch that keeps the best weights. The plain loop does the same by hand: index the
training tensor with a seeded permutation, forward, backward, step; evaluate after each epoch and copy the best
weights.

kdkit is timed three ways: with its default checkpointing (a checkpoint when `train.checkpoint_every_minutes` have
passed at an epoch end, and the final state), with checkpointing off (no checkpoint folder), and with the old
per-epoch cadence (`checkpoint_every_minutes: 0`: ~21 MB with SHA-256 manifests written after every epoch).
Goal: kdkit with its default checkpointing <= 1.1x the plain loop.

Method (docs/benchmarks.md and /work/shared/BENCH.md): everything in one process, the configurations alternated
A B C D then D C B A after a warm-up round, each timed call a whole 8-epoch training (setup and evaluation
included); the result is the median of the per-round ratios (and the ratio of the medians beside it).

    python bench/small_model.py            # prints one JSON object on stdout (~3 min on 2 cores)
    python bench/small_model.py --write    # and appends a dated section to docs/benchmarks.md
    python bench/small_model.py --quick    # seconds; for the smoke test, the figures mean nothing
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

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
from kdkit.data import build_data
from kdkit.engine import TrainOptions, train
from kdkit.losses import build_loss
from kdkit.models.small import MLP

GOAL = 1.1
# name -> kdkit's checkpointing: "default" (TrainOptions' checkpoint_every_minutes), "off" (no checkpoint folder),
# "every_epoch" (checkpoint_every_minutes=0, the cadence before the interval existed). "plain" is the hand loop.
CONFIGS: dict[str, str | None] = {
    "plain": None,
    "kdkit_ckpt_default": "default",
    "kdkit_ckpt_off": "off",
    "kdkit_ckpt_every_epoch": "every_epoch",
}


@dataclass(frozen=True)
class Settings:
    epochs: int = 8
    batch_size: int = 128
    hidden: tuple[int, ...] = (800, 800)
    lr: float = 1e-3
    rounds: int = 2  # timed rounds after the warm-up; each round runs every configuration twice (A B C D D C B A)
    data: str = "mnist5k"  # a kdkit built-in data set (real data shipped inside an installed package)
    limit: int | None = None
    progress: bool = True  # kdkit's default: the progress bar on (drawn on stderr here)
    seed: int = 0


QUICK = Settings(epochs=2, batch_size=32, hidden=(16, 16), rounds=1, data="digits", limit=300)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """The validation pass both loops run after every epoch."""
    model.eval()
    with torch.inference_mode():
        right = sum((model(x[i : i + batch_size]).argmax(-1) == y[i : i + batch_size]).sum().item()
                    for i in range(0, len(y), batch_size))  # fmt: skip
    return right / len(y)


def plain_call(init: nn.Module, data, s: Settings) -> tuple[float, float]:
    """The reference: a plain PyTorch loop with per-epoch validation and a copy of the best weights.
    Returns (seconds, best validation accuracy)."""
    started = time.perf_counter()
    model = copy.deepcopy(init)
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.0)
    x, y = data.train.x, data.train.labels
    g = torch.Generator().manual_seed(s.seed)
    best, best_state = -1.0, None
    for _ in range(s.epochs):
        model.train()
        order = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), s.batch_size):
            idx = order[i : i + s.batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        value = accuracy(model, data.val.x, data.val.labels)
        if value > best:
            best, best_state = value, {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return time.perf_counter() - started, best


def kdkit_call(init: nn.Module, data, s: Settings, checkpoints: str, folder: Path) -> tuple[float, float]:
    """kdkit's `train` on the same model, data, optimizer and schedule. Returns (seconds, best validation accuracy)."""
    model = copy.deepcopy(init)
    opts = TrainOptions(epochs=s.epochs, batch_size=s.batch_size, optimizer="adamw", lr=s.lr, weight_decay=0.0,
                        schedule="constant", keep_best="accuracy")  # fmt: skip
    if checkpoints == "every_epoch":
        opts = replace(opts, checkpoint_every_minutes=0.0)
    ckpt_dir = None if checkpoints == "off" else Path(tempfile.mkdtemp(dir=folder))

    def on_eval(m: nn.Module) -> dict[str, float]:
        return {"accuracy": accuracy(m, data.val.x, data.val.labels)}

    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON result
        result = train(model, build_loss([("ce", 1.0, {})]), data.train, opts, on_eval=on_eval, seed=s.seed,
                       device="cpu", ckpt_dir=ckpt_dir, progress=s.progress, log=log)  # fmt: skip
    return time.perf_counter() - started, result.best_value


def measure(s: Settings, folder: Path) -> dict:
    data = build_data("builtin", s.data, limit=s.limit)
    torch.manual_seed(s.seed)
    init = MLP(data.input_shape, data.num_classes, hidden=list(s.hidden))

    def call(name: str) -> tuple[float, float]:
        mode = CONFIGS[name]
        return plain_call(init, data, s) if mode is None else kdkit_call(init, data, s, mode, folder)

    names = list(CONFIGS)
    for name in names:  # warm-up: allocator, thread pools, lazy imports
        call(name)
    seconds: dict[str, list[float]] = {n: [] for n in names}
    accuracy_: dict[str, list[float]] = {n: [] for n in names}
    watch = CpuWatch()
    with watch:
        for r in range(s.rounds):
            for order in (names, names[::-1]):
                for name in order:
                    t, acc = call(name)
                    seconds[name].append(t)
                    accuracy_[name].append(acc)
                log(f"round {r + 1}/{s.rounds}: " + " ".join(f"{n}={seconds[n][-1]:.2f}s" for n in names))
    configs = {}
    for name in names:
        entry = {"seconds": seconds[name], "seconds_median": median(seconds[name]),
                 "val_accuracy": accuracy_[name]}  # fmt: skip
        if name != "plain":
            ratios = [a / b for a, b in zip(seconds[name], seconds["plain"])]
            entry["ratio_vs_plain"] = median(ratios)
            entry["ratio_of_medians"] = median(seconds[name]) / median(seconds["plain"])
        configs[name] = entry
    return {
        "train_examples": len(data.train),
        "val_examples": len(data.val),
        "steps_per_epoch": -(-len(data.train) // s.batch_size),
        "student_params": sum(p.numel() for p in init.parameters()),
        "configs": configs,
        "others_fraction": watch.others_fraction,
        "noisy": watch.noisy,
    }


def run(s: Settings, threads: int | None, load_wait: dict | None, command: str, quick: bool) -> dict:
    if threads:
        torch.set_num_threads(threads)
    machine = {**machine_info(), "loadavg_before": loadavg()}
    log(f"small-model bench: {machine_line(machine)}")
    with tempfile.TemporaryDirectory() as folder:
        measured = measure(s, Path(folder))
    machine["loadavg_after"] = loadavg()
    default = measured["configs"]["kdkit_ckpt_default"]["ratio_vs_plain"]
    return {
        "quick": quick,
        "date": dt.date.today().isoformat(),
        "command": command,
        "machine": machine,
        "load_wait": load_wait,
        "settings": asdict(s),
        **measured,
        "goals": {"default_checkpointing_vs_plain": {"goal": GOAL, "value": default, "met": default <= GOAL}},
        "under_load": measured["noisy"],
    }


def to_markdown(result: dict) -> str:
    s, c = result["settings"], result["configs"]
    rows = []
    for name, entry in c.items():
        ratio = "1 (reference)" if name == "plain" else f"{entry['ratio_vs_plain']:.3f}"
        of_medians = "" if name == "plain" else f"{entry['ratio_of_medians']:.3f}"
        rows.append([name, f"{entry['seconds_median']:.2f}", ratio, of_medians,
                     f"{median(entry['val_accuracy']):.3f}"])  # fmt: skip
    goal = result["goals"]["default_checkpointing_vs_plain"]
    noisy = " (noisy: other processes used cores this bench needed)" if result["under_load"] else ""
    return f"""## Small model: kdkit `train` vs a plain PyTorch loop ({result["date"]})

`{result["command"]}` — {machine_line(result["machine"])}; load {result["machine"]["loadavg_before"]} before,
{result["machine"]["loadavg_after"]} after; other processes used {result["others_fraction"]} of the cores{noisy}.

MLP {"-".join(str(h) for h in (784, *s["hidden"], 10))} ({result["student_params"]:,} parameters) on {s["data"]}
({result["train_examples"]} training examples, {result["steps_per_epoch"]} steps an epoch), labels only (CE), AdamW
lr {s["lr"]}, constant schedule, batch {s["batch_size"]}, {s["epochs"]} epochs, validation after every epoch with
the best weights kept; kdkit's progress bar {"on" if s["progress"] else "off"}. Each figure is a whole training call;
ratios are medians of per-round ratios over {s["rounds"]} rounds of A B C D D C B A after a warm-up.

{markdown_table(["configuration", "seconds (median)", "ratio vs plain", "ratio of medians", "val accuracy"], rows)}

Goal: kdkit with its default checkpointing <= {goal["goal"]}x the plain loop: {goal["value"]:.3f}
({"met" if goal["met"] else "not met"}).
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run (the figures mean nothing)")
    add_run_args(p)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 2)")
    p.add_argument("--no-progress", action="store_true", help="kdkit's progress bar off")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    s = QUICK if args.quick else Settings()
    if args.rounds:
        s = replace(s, rounds=args.rounds)
    if args.no_progress:
        s = replace(s, progress=False)
    load_wait = None
    if not (args.quick or args.no_wait):
        load_wait = wait_for_quiet(args.load_threshold, args.max_wait)
    command = shlex.join(["python", *(sys.argv if argv is None else ["bench/small_model.py", *argv])])
    threads = args.threads or (1 if args.quick else None)
    result = run(s, threads=threads, load_wait=load_wait, command=command, quick=args.quick)
    return report_result(result, args, to_markdown)


if __name__ == "__main__":
    main()
