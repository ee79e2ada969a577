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
    from rich.console import Console

    return Console()


def _show(metrics: dict) -> None:
    from kdkit.report.table import gain_line, summary_table

    console = _console()
    console.print(summary_table(metrics))
    line = gain_line(metrics)
    if line:
        console.print(line)


@app.command()
def demo(
    out: Path = typer.Option(None, help="Run directory (default: runs/demo)."), set_: Optional[list[str]] = SetOpt
) -> None:
    """Run the main job on the embedded data: ensemble teacher → MLP student vs labels-only baseline, 3 seeds."""
    from importlib.resources import files

    from kdkit.pipeline import distill

    config = Path(str(files("kdkit") / "configs" / "demo.yaml"))
    result = distill(config, out=out, overrides=tuple(set_ or ()), log=_console().print)
    _show(result.metrics)
    _console().print(f"run directory: {result.run_dir}  (report: {result.run_dir / 'report.md'})")


@app.command("train")
def train_cmd(
    config: Path = typer.Argument(..., help="YAML config."),
    out: Path = typer.Option(None, help="Run directory (default: run.out_dir/run.name)."),
    set_: Optional[list[str]] = SetOpt,
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its checkpoints."),
) -> None:
    """Train the teacher (if needed), the baseline and the distilled student from a config."""
    from kdkit.pipeline import distill

    result = distill(config, out=out, overrides=tuple(set_ or ()), resume=resume, log=_console().print)
    _show(result.metrics)
    _console().print(f"run directory: {result.run_dir}")


@app.command()
def validate(config: Path = typer.Argument(..., help="YAML config."), set_: Optional[list[str]] = SetOpt) -> None:
    """Check a config (keys, types, loss and model names, their parameters) without training."""
    from kdkit.config import load_config

    cfg = load_config(config, tuple(set_ or ()))
    from kdkit.validate import check_names

    check_names(cfg)
    typer.echo(f"{config}: ok")


@app.command("eval")
def eval_cmd(run_dir: Path = typer.Argument(..., help="A run directory written by kdkit train/demo.")) -> None:
    """Re-evaluate a finished run's teacher and student on its test split (writes RUN_DIR/eval.json)."""
    from kdkit.pipeline import evaluate_run

    _show(evaluate_run(run_dir, log=_console().print))


@app.command("config-docs")
def config_docs() -> None:
    """Print the configuration reference (docs/config.md) generated from the config models."""
    from kdkit.config import config_markdown

    typer.echo(config_markdown(), nl=False)


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app(args=argv, standalone_mode=False)
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
