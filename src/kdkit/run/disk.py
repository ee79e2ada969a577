"""What a run directory holds on disk: its entries with their sizes, and the report's "Run directory" section.

A finished run keeps what a user needs (the student, the teachers, each phase's weights and result, metrics, the
report, plots, TensorBoard scalars); resumable checkpoints go once their phase is saved (run.keep_checkpoints_after).
This module only measures and describes: it deletes nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from kdkit.atomic import write_text

# Folders of the run-directory layout (run_dir.py) that hold one sub-folder per phase, member or trial: each
# sub-folder is an entry of its own, so that the report names the phase that takes the space.
PER_CHILD = ("checkpoints", "phases", "teachers", "tb", "trials")
TOP = 8  # entries named in the report's section; the rest are summed in one line


@dataclass(frozen=True)
class Entry:
    """A file or folder of the run directory: its path relative to it (folders end in "/"), its bytes (the sum
    of the files below it) and its file count."""

    path: str
    bytes: int
    files: int


def tree_size(path: Path) -> tuple[int, int]:
    """(bytes, files) of a file, or of every file below a folder; links are not followed (counted as themselves)."""
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_size, 1
    total, count = 0, 0
    for folder, _, names in os.walk(path):
        for name in names:
            total += os.lstat(os.path.join(folder, name)).st_size
            count += 1
    return total, count


def run_dir_entries(run_dir: Path) -> list[Entry]:
    """The run directory's entries, largest first: each top-level file and folder, except that the folders of
    PER_CHILD are listed by their sub-folders (checkpoints/student-s0/, phases/baseline-s1/, ...)."""
    entries = []
    for item in sorted(Path(run_dir).iterdir()):
        children = sorted(item.iterdir()) if item.name in PER_CHILD and item.is_dir() else [item]
        for child in children:
            size, files = tree_size(child)
            rel = child.relative_to(run_dir).as_posix() + ("/" if child.is_dir() else "")
            entries.append(Entry(rel, size, files))
    return sorted(entries, key=lambda e: (-e.bytes, e.path))


def human_size(n: int) -> str:
    """Bytes in decimal units, as disk sizes are usually quoted: 999 B, 12.3 kB, 4.56 MB, 3.8 GB, 300 MB."""
    if n < 1000:
        return f"{n} B"
    for unit in ("kB", "MB", "GB", "TB"):
        n /= 1000
        if n < 999.5 or unit == "TB":  # 999.7 kB reads "1 MB", not "1000 kB"
            return f"{n:.3g} {unit}" if n < 100 else f"{n:.0f} {unit}"
    raise AssertionError("unreachable")


def disk_section(run_dir: Path, top: int = TOP) -> str:
    """The report's "Run directory" section (markdown): the total size and file count, the `top` largest entries
    and whether resumable checkpoints are kept."""
    entries = run_dir_entries(run_dir)
    total, files = sum(e.bytes for e in entries), sum(e.files for e in entries)
    rows = [f"| `{e.path}` | {human_size(e.bytes)} | {e.files} |" for e in entries[:top]]
    rest = entries[top:]
    if rest:
        rows.append(f"| {len(rest)} more entries | {human_size(sum(e.bytes for e in rest))} | "
                    f"{sum(e.files for e in rest)} |")
    kept = [e for e in entries if e.path.startswith("checkpoints/")]
    note = (f"Resumable checkpoints kept: {human_size(sum(e.bytes for e in kept))} in `checkpoints/` "
            "(run.keep_checkpoints_after); they are not needed by eval, export or serve."
            if kept else "No resumable checkpoints are kept: each finished phase keeps its weights and result.json.")
    return "\n".join([
        "## Run directory",
        "",
        f"`{Path(run_dir).name}/` holds **{human_size(total)}** in {files} files when this report was written.",
        "",
        "| entry | size | files |",
        "|---|---:|---:|",
        *rows,
        "",
        note,
    ])


def append_disk_section(run_dir: Path, report: str = "report.md") -> None:
    """Append the "Run directory" section to RUN_DIR/report.md (rewritten atomically). Called by a task's report
    writer once everything else of the run is on disk, on the main process only."""
    path = Path(run_dir) / report
    write_text(path, path.read_text().rstrip("\n") + "\n\n" + disk_section(run_dir) + "\n")
