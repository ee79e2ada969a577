"""A finished run keeps what a user needs: each phase's resumable checkpoints go (or shrink to the newest one)
once its weights and result.json are saved; --resume still skips finished phases and continues a cut one exactly;
the report says what the run directory holds and its size (kdkit.run.disk)."""

from __future__ import annotations

import copy
import json
import re

import pytest

from kdkit.atomic import write_json
from kdkit.config import load_config
from kdkit.errors import TrainingError
from kdkit.pipeline import distill
from kdkit.run import RunDir
from kdkit.run.disk import Entry, disk_section, human_size, run_dir_entries, tree_size
from kdkit.run.run_dir import kept_checkpoints, open_run_dir

TINY = {
    "run": {"name": "tiny-disk", "seeds": [0], "progress": False, "tensorboard": False},
    "data": {"source": "builtin", "name": "digits", "limit": 300},
    "teacher": {
        "members": [{"model": {"name": "mlp", "kwargs": {"hidden": [16]}}}],
        "train": {"epochs": 2, "batch_size": 32},
    },
    "student": {"model": {"name": "mlp", "kwargs": {"hidden": [8]}}},
    "distill": {"cache_teacher": True},
    "train": {"epochs": 2, "batch_size": 32, "checkpoint_every_minutes": 0},  # a checkpoint each epoch
    "eval": {"latency_repeats": 1, "latency_warmup": 0, "robustness": False},
}
PHASES = ("teacher-0", "baseline-s0", "student-s0")


def tiny(**run) -> object:
    raw = copy.deepcopy(TINY)
    raw["run"].update(run)
    return load_config(raw)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KDKIT_CACHE_DIR", str(tmp_path / "cache"))


def _file(path, n: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * n)


# ---------------------------------------------------------------------------------------------------------------
# What a run directory holds


def test_entries_sum_files_and_list_phase_folders_one_by_one(tmp_path):
    _file(tmp_path / "metrics.json", 10)
    _file(tmp_path / "student" / "model.safetensors", 1000)
    _file(tmp_path / "student" / "model.json", 24)
    _file(tmp_path / "checkpoints" / "student-s0" / "step_00000002" / "trainer.pt", 5000)
    _file(tmp_path / "checkpoints" / "student-s0" / "latest.json", 40)
    _file(tmp_path / "checkpoints" / "baseline-s0" / "step_00000001" / "trainer.pt", 300)
    _file(tmp_path / "phases" / "student-s0" / "model.safetensors", 1000)
    assert run_dir_entries(tmp_path) == [  # largest first
        Entry("checkpoints/student-s0/", 5040, 2),
        Entry("student/", 1024, 2),
        Entry("phases/student-s0/", 1000, 1),
        Entry("checkpoints/baseline-s0/", 300, 1),
        Entry("metrics.json", 10, 1),
    ]
    assert tree_size(tmp_path) == (7374, 7)


def test_human_size_uses_decimal_units():
    assert human_size(0) == "0 B"
    assert human_size(999) == "999 B"
    assert human_size(1000) == "1 kB"
    assert human_size(12_345) == "12.3 kB"
    assert human_size(4_560_000) == "4.56 MB"
    assert human_size(300_000_000) == "300 MB"
    assert human_size(999_999) == "1 MB"  # not "1000 kB"
    assert human_size(3_800_000_000) == "3.8 GB"


def test_section_names_the_total_the_largest_entries_and_the_rest(tmp_path):
    for i in range(10):
        _file(tmp_path / "plots" / f"p{i}.png", 1)
        _file(tmp_path / f"f{i}.json", 100 * (i + 1))
    _file(tmp_path / "checkpoints" / "student-s0" / "trainer.pt", 2000)
    text = disk_section(tmp_path, top=3)
    assert text.startswith("## Run directory\n")
    # 5500 bytes of f*.json + 10 of plots + 2000 of checkpoints, in 21 files
    assert f"`{tmp_path.name}/` holds **7.51 kB** in 21 files" in text
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert rows == ["| `checkpoints/student-s0/` | 2 kB | 1 |", "| `f9.json` | 1 kB | 1 |",
                    "| `f8.json` | 900 B | 1 |"]
    assert "| 9 more entries | 3.61 kB | 18 |" in text  # f0..f7 (3600 B, 8 files) + plots/ (10 B, 10 files)
    assert "Resumable checkpoints kept: 2 kB" in text


def test_section_says_when_no_checkpoints_are_kept(tmp_path):
    _file(tmp_path / "student" / "student.json", 5)
    assert "No resumable checkpoints are kept" in disk_section(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Settling a finished phase's checkpoints


def _checkpoints(run: RunDir, phase: str, steps=(1, 2)) -> None:
    folder = run.checkpoints(phase)
    for step in steps:
        _file(folder / f"step_{step:08d}" / "state.json", 2)
    _file(folder / ".tmp-step_00000009" / "student.safetensors", 3)  # a write cut short
    write_json(folder / "latest.json", {"checkpoint": f"step_{steps[-1]:08d}", "step": steps[-1]})


def _run(tmp_path, keep: str = "none", read_only: bool = False) -> RunDir:
    return RunDir(tmp_path, False, "cpu", lambda m: None, read_only=read_only, keep_checkpoints=keep)


def test_none_removes_the_phase_folder_and_checkpoints_with_its_last_phase(tmp_path):
    run = _run(tmp_path)
    _checkpoints(run, "baseline-s0")
    _checkpoints(run, "student-s0")
    run.settle_checkpoints("baseline-s0")
    assert not run.checkpoints("baseline-s0").exists() and run.checkpoints("student-s0").is_dir()
    run.settle_checkpoints("student-s0")
    assert not (tmp_path / "checkpoints").exists()
    run.settle_checkpoints("student-s0")  # nothing left: nothing to do


def test_last_keeps_only_the_checkpoint_latest_json_names(tmp_path):
    run = _run(tmp_path, "last")
    _checkpoints(run, "student-s0", steps=(3, 5))
    run.settle_checkpoints("student-s0")
    assert sorted(p.name for p in run.checkpoints("student-s0").iterdir()) == ["latest.json", "step_00000005"]


def test_last_with_a_broken_pointer_keeps_nothing(tmp_path):
    run = _run(tmp_path, "last")
    _checkpoints(run, "student-s0")
    (run.checkpoints("student-s0") / "latest.json").write_text("{not json")
    run.settle_checkpoints("student-s0")
    assert not (tmp_path / "checkpoints").exists()


def test_a_read_only_run_removes_nothing(tmp_path):
    run = _run(tmp_path, read_only=True)
    _checkpoints(run, "student-s0")
    run.settle_checkpoints("student-s0")
    assert (run.checkpoints("student-s0") / "step_00000002").is_dir()


def test_the_setting_is_read_from_the_resolved_config():
    assert kept_checkpoints({"run": {"keep_checkpoints_after": "last"}}) == "last"
    assert kept_checkpoints({"run": {"name": "interpret"}}) == "none"  # a task whose run section lacks it
    assert kept_checkpoints(None) == "none"
    with pytest.raises(TrainingError, match=r"run.keep_checkpoints_after: 'all' is not one of none, last"):
        kept_checkpoints({"run": {"keep_checkpoints_after": "all"}})


def test_a_fresh_run_clears_a_folder_holding_only_finished_phases(tmp_path):
    _file(tmp_path / "run" / "phases" / "student-s0" / "result.json", 2)  # an earlier run, its checkpoints gone
    open_run_dir(tmp_path / "run", "run: {}\n", False, "cpu", None, lambda m: None, [0], 0)
    assert not (tmp_path / "run" / "phases").exists()


# ---------------------------------------------------------------------------------------------------------------
# Whole runs


def test_a_finished_run_keeps_no_checkpoints_and_reports_its_size(tmp_path):
    distill(tiny(), out=tmp_path / "run", log=lambda m: None)
    run = tmp_path / "run"
    assert not (run / "checkpoints").exists()
    for phase in PHASES[1:]:
        assert (run / "phases" / phase / "result.json").is_file()
    assert (run / "teachers" / "member_0" / "result.json").is_file()
    report = (run / "report.md").read_text()
    assert "## Run directory" in report and "No resumable checkpoints are kept" in report
    total = re.search(r"holds \*\*(.+?)\*\* in (\d+) files", report)
    assert total, report[-800:]
    # Measured before report.md gained the section: the other files exactly, report.md a little smaller.
    size, files = tree_size(run)
    assert int(total.group(2)) == files
    assert total.group(1) in {human_size(size - n) for n in range(len(report) - report.index("## Run directory") + 2)}


def test_last_keeps_exactly_one_checkpoint_per_phase(tmp_path):
    distill(tiny(keep_checkpoints_after="last"), out=tmp_path / "run", log=lambda m: None)
    folders = sorted((tmp_path / "run" / "checkpoints").iterdir())
    assert [f.name for f in folders] == sorted(PHASES)
    for folder in folders:
        steps = [p.name for p in folder.iterdir() if p.name != "latest.json"]
        assert steps == [json.loads((folder / "latest.json").read_text())["checkpoint"]], folder
    assert "Resumable checkpoints kept:" in (tmp_path / "run" / "report.md").read_text()


def _crash_in(monkeypatch, phase: str, at_eval: int) -> None:
    """The engine's on_eval raises at evaluation `at_eval` of `phase`, once (after the epoch-1 checkpoint)."""
    from kdkit.tasks import classification

    real = classification.train

    def train(*args, **kwargs):
        if kwargs["desc"] == phase and kwargs["on_eval"] is not None:
            on_eval, calls = kwargs["on_eval"], []

            def crashing(model):
                calls.append(1)
                if len(calls) == at_eval:
                    raise RuntimeError("crash for the test")
                return on_eval(model)

            kwargs["on_eval"] = crashing
        return real(*args, **kwargs)

    monkeypatch.setattr(classification, "train", train)


def test_resume_after_a_cut_phase_skips_finished_ones_whose_checkpoints_are_gone(tmp_path, monkeypatch):
    full = distill(tiny(), out=tmp_path / "a", log=lambda m: None)
    with monkeypatch.context() as mp:
        _crash_in(mp, "student-s0", at_eval=2)
        with pytest.raises(RuntimeError, match="crash for the test"):
            distill(tiny(), out=tmp_path / "b", log=lambda m: None)
    ckpts = tmp_path / "b" / "checkpoints"
    assert [p.name for p in ckpts.iterdir()] == ["student-s0"]  # the finished phases' are gone already
    assert not (tmp_path / "b" / "phases" / "student-s0" / "result.json").exists()
    logs = []
    resumed = distill(tiny(), out=tmp_path / "b", resume=True, log=logs.append)
    assert any("teacher-0: finished earlier" in line for line in logs)
    assert any("baseline-s0: finished earlier" in line for line in logs)
    assert any(re.search(r"student-s0: resumed from step_\d+ \(epoch 2", line) for line in logs), logs
    assert not ckpts.exists()
    for model in ("student", "baseline_student"):
        for key in ("accuracy", "f1_macro", "nll"):
            assert resumed.metrics[model][key] == full.metrics[model][key], (model, key)


def test_a_crash_after_result_json_leaves_a_finished_phase(tmp_path, monkeypatch):
    """The order is model, result.json, then the checkpoints: stopped just before they go, the phase is finished
    (reused on --resume, which then removes its leftover checkpoints)."""
    with monkeypatch.context() as mp:
        def stop(self, phase):
            raise KeyboardInterrupt(phase)

        mp.setattr(RunDir, "settle_checkpoints", stop)
        with pytest.raises(KeyboardInterrupt, match="teacher-0"):
            distill(tiny(), out=tmp_path / "run", log=lambda m: None)
    assert (tmp_path / "run" / "teachers" / "member_0" / "result.json").is_file()
    assert (tmp_path / "run" / "checkpoints" / "teacher-0").is_dir()
    logs = []
    distill(tiny(), out=tmp_path / "run", resume=True, log=logs.append)
    assert any("teacher-0: finished earlier" in line for line in logs)
    assert not (tmp_path / "run" / "checkpoints").exists()
