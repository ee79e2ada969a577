"""bench/overhead.py runs end to end at --quick size and reports every figure its docs section needs.

A smoke test only: tiny models, a couple of steps, no assertion about any timing (this machine is shared and noisy).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def overhead():
    sys.path.insert(0, str(BENCH))
    try:
        import overhead

        yield overhead
    finally:
        sys.path.remove(str(BENCH))
        for name in ("overhead", "common"):  # bench modules are not a package: do not leave them importable
            sys.modules.pop(name, None)


def test_quick_run_prints_one_json_object_and_writes_the_docs_section(overhead, tmp_path, capsys):
    docs = tmp_path / "benchmarks.md"
    result = overhead.main(["--quick", "--write", "--docs", str(docs)])

    printed = json.loads(capsys.readouterr().out)  # stdout holds exactly one JSON object
    assert printed == json.loads(json.dumps(result))
    assert printed["quick"] is True
    assert {
        "machine",
        "settings",
        "teacher_forward",
        "kd_step",
        "cache",
        "bf16_accuracy",
        "torchdistill",
        "goals",
        "under_load",
        "command",
    } <= printed.keys()
    machine = printed["machine"]
    assert {"cores", "cpu_model", "torch", "torch_threads", "loadavg_before", "loadavg_after"} <= machine.keys()
    assert {"teacher_params", "student_params"} <= printed["settings"].keys()

    modes = printed["kd_step"]["modes"]
    assert set(modes) == {"hand", *overhead.TEACHER_MODES, *overhead.WHAT_IF_MODES}
    for name, mode in modes.items():
        assert {"step_s_whole_call", "step_s_steady", "setup_s"} <= mode.keys()
        if name != "hand":
            assert {"ratio_vs_hand", "ratio_vs_hand_steady", "ratio_of_medians", "goal_met"} <= mode.keys()
    assert set(printed["teacher_forward"]["seconds"]) == {
        "no_grad_fp32",
        *overhead.TEACHER_MODES,
        *overhead.WHAT_IF_MODES,
    }
    assert {"ratio", "ratio_steady", "one_off_cache_build_s"} <= printed["cache"].keys()
    assert set(printed["bf16_accuracy"]["student_accuracy_unchanged"]) == set(overhead.LOW_PRECISION_MODES)
    assert {"kd_step_vs_hand", "cached_epoch_vs_student_alone"} == set(printed["goals"])
    assert all(isinstance(g["met"], bool) for g in printed["goals"].values())

    text = docs.read_text()
    assert text.startswith("# kdkit benchmarks")
    assert "python bench/overhead.py --quick" in text and "| configuration |" in text
