"""`kdkit sweep CONFIG`: how small can the student be? A family of students, each distilled and trained on labels
alone over the run's seeds, placed on a cost/quality frontier.

    config (+ sweep.grid) → data → teacher (once) → for each point: its own run directory, as `kdkit train` writes
    it (RUN_DIR/points/<name>/) → sweep.json, sweep.md, plots/frontier_*.png

Every point is a whole run (baseline and distilled student per seed, metrics.json in the one schema, report.md,
the kept student), so `kdkit eval`, `export` and `serve` take a point's folder as they take any run; its
`teachers/` is a link to the sweep's, trained once. The teacher's output cache (distill.cache_teacher) is keyed by
teacher and data, so the points share it too. `--resume` reuses the finished points and continues the unfinished
one from its checkpoints; points may be added to the config between runs (the folder is keyed by position and name,
so add them at the end).
"""

from __future__ import annotations

import itertools
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kdkit.atomic import write_json, write_text
from kdkit.errors import ConfigError
from kdkit.evaluate.frontier import COSTS, summarize, teacher_quality
from kdkit.evaluate.schema import mean_of, std_of
from kdkit.pipeline import train_students
from kdkit.report.sweep import frontier_plot, sweep_markdown
from kdkit.run import open_run_dir
from kdkit.tasks import load_task

Log = Callable[[str], None]
FIXED_IN_SWEEP = ("teacher.", "data.", "sweep.", "run.", "search.")


def grid_points(grid: dict[str, list[Any]], extra: list[dict[str, Any]] = ()) -> list[tuple[str, list[str]]]:
    """Every combination of the grid's values, in the order given (the last path varies fastest), then the extra
    points, as (name, ["path=value", ...]); the name joins the paths' last parts and values, e.g. "hidden=[64, 64]"."""
    paths = list(grid)
    settings = [dict(zip(paths, values)) for values in itertools.product(*(grid[p] for p in paths))] if paths else []
    return [_point(setting) for setting in [*settings, *extra]]


def _point(setting: dict[str, Any]) -> tuple[str, list[str]]:
    overrides = [f"{p}={json.dumps(v)}" for p, v in setting.items()]
    name = " ".join(f"{p.rsplit('.', 1)[-1]}={_short(v)}" for p, v in setting.items())
    return name, overrides


def _short(value: Any) -> str:
    """A value as a name: JSON with ", " between items and no quotes, e.g. [64, 64] or {width: 8}."""
    text = json.dumps(value, separators=(", ", ": "))
    return text.replace('"', "")


def folder_name(index: int, name: str) -> str:
    """A point's folder: its index and its name reduced to letters, digits and - _ =."""
    safe = re.sub("_+", "_", "".join(c if c.isalnum() or c in "-_=" else "_" for c in name)).strip("_")
    return f"{index:02d}_{safe}"[:80]


def sweep(config: str | Path | dict, *, out: str | Path | None = None, overrides: tuple[str, ...] = (),
          resume: bool = False, log: Log = print) -> dict:
    """Train every point of sweep.grid; return (and write) the sweep's summary."""
    task, cfg = load_task(config, overrides)
    grid = getattr(getattr(cfg, "sweep", None), "grid", None)
    extra = getattr(getattr(cfg, "sweep", None), "points", None) or []
    if not task.search_metrics or grid is None:
        raise ConfigError(f"sweep: a {task.name} run has no sweep; kdkit sweep takes classification and causal_lm "
                          "configs")
    if not grid and not extra:
        raise ConfigError("sweep.grid: empty (and no sweep.points); expected paths and values, e.g. "
                          "student.model.kwargs.hidden: [[16], [64], [64, 64]]")
    for where, path in [*((f"grid.{p}", p) for p in grid), *((f"points.{i}.{p}", p) for i, pt in enumerate(extra)
                                                              for p in pt)]:
        if path.startswith(FIXED_IN_SWEEP):
            raise ConfigError(f"sweep.{where}: the teacher, the data and the run stay fixed in a sweep; "
                              "vary the student, the losses or the training")
    points = grid_points(grid, extra)
    names = [name for name, _ in points]
    if len(set(names)) < len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise ConfigError(f"sweep: the point {twice!r} comes twice (grid and points); expected distinct students")
    point_cfgs = []
    for name, point_overrides in points:  # every point checked before anything trains
        try:
            pcfg = task.load_config(config, (*overrides, *point_overrides))
            task.check(pcfg)
        except ConfigError as exc:
            raise ConfigError(f"sweep point {name!r}: {exc.details[0] if exc.details else exc}") from None
        point_cfgs.append(pcfg)
    path = Path(out) if out else Path(cfg.run.out_dir) / f"{cfg.run.name}-sweep"
    # The sweep folder's config.yaml is what the points share (teacher, data, run): points may be added or
    # removed on --resume; each point's folder checks its own config.
    shared = task.dump_config(cfg.model_copy(update={"sweep": type(cfg.sweep)()}))
    run = open_run_dir(path, shared, resume, cfg.run.device, cfg.run.threads, log, list(cfg.run.seeds),
                       cfg.data.split_seed)
    data = task.load_data(cfg, run)
    teacher = task.build_teacher(cfg, data, run)
    rows = []
    for i, ((name, point_overrides), pcfg) in enumerate(zip(points, point_cfgs)):
        point_dir = run.path / "points" / folder_name(i, name)
        if run.resume and (point_dir / "metrics.json").is_file():
            log(f"sweep point {i + 1}/{len(points)}: {name} (finished: reused)")
            metrics = json.loads((point_dir / "metrics.json").read_text())
        else:
            log(f"sweep point {i + 1}/{len(points)}: {name}")
            point_resume = run.resume and (point_dir / "config.yaml").is_file()
            prun = open_run_dir(point_dir, task.dump_config(pcfg), point_resume, pcfg.run.device, pcfg.run.threads,
                                log, list(pcfg.run.seeds), pcfg.data.split_seed)
            _link_teachers(run.path, point_dir)
            metrics = train_students(task, pcfg, config, (*overrides, *point_overrides), data, teacher, prun).metrics
        if run.is_main:
            rows.append(point_row(name, point_overrides, metrics, point_dir, quality_key(task)))
    summary: dict = {}
    if run.is_main:
        summary = summarize(rows, quality_key(task), cfg.sweep.tolerance, teacher_quality(rows))
        plots = [frontier_plot(summary, cost, label, run.path / "plots" / f"frontier_{cost}.png")
                 for cost, label in COSTS]
        summary["plots"] = [str(p.relative_to(run.path)) for p in plots if p is not None]
        write_json(run.path / "sweep.json", summary)
        write_text(run.path / "sweep.md", sweep_markdown(summary))
    run.barrier()
    return summary


def _link_teachers(sweep_dir: Path, point_dir: Path) -> None:
    """point/teachers → ../../teachers, so that a point's folder rebuilds its teacher as any run does."""
    source, link = sweep_dir / "teachers", point_dir / "teachers"
    if source.is_dir() and not link.exists():
        os.symlink(os.path.relpath(source, point_dir), link, target_is_directory=True)


def quality_key(task) -> str:
    """The task's headline metric (the first column of its summary table)."""
    return task.columns[0][0]


def point_row(name: str, overrides: list[str], metrics: dict, folder: Path, key: str) -> dict:
    """One point of the sweep: its students' quality (mean, std over seeds), the paired gain and its interval,
    and the distilled student's cost."""
    cost = (metrics.get("cost") or {}).get("student") or {}
    gain = (metrics.get("gain") or {}).get(key) or {}
    return {
        "name": name,
        "overrides": overrides,
        "folder": str(folder),
        "student": mean_of((metrics.get("student") or {}).get(key)),
        "student_std": std_of((metrics.get("student") or {}).get(key)),
        "baseline": mean_of((metrics.get("baseline_student") or {}).get(key)),
        "baseline_std": std_of((metrics.get("baseline_student") or {}).get(key)),
        "teacher": mean_of((metrics.get("teacher") or {}).get(key)),
        "gain": gain.get("mean"),
        "gain_ci95": gain.get("ci95"),
        **{c: cost.get(c) for c in ("params", "size_mb", "latency_ms", "throughput", "speedup_latency")},
    }
