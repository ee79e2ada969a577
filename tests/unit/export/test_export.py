"""Export of a finished run's student: parity for each format on a real (tiny) run, an MLP and a CNN student;
the student alone (no distillation-only keys); a failed parity check writes nothing; the HF path reloads."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from kdkit.cli import main
from kdkit.config import load_config
from kdkit.errors import ConfigError
from kdkit.export import ParityError, export_run, open_run
from kdkit.models import load_model_folder
from kdkit.pipeline import distill

TINY = {
    "run": {"name": "tiny-export", "seeds": [0], "progress": False, "tensorboard": False},
    "data": {"source": "builtin", "name": "digits", "limit": 400},
    "teacher": {
        "members": [
            {"model": {"name": "mlp", "kwargs": {"hidden": [32]}}},
            {"model": {"name": "mlp", "kwargs": {"hidden": [16]}}, "weight": 0.5},
        ],
        "train": {"epochs": 2, "batch_size": 32},
    },
    "student": {"model": {"name": "mlp", "kwargs": {"hidden": [8]}}},
    "distill": {"cache_teacher": True},
    "train": {"epochs": 2, "batch_size": 32},
    "eval": {"latency_repeats": 2, "latency_warmup": 0},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two finished runs: an MLP student and a small CNN student (image input (1, 8, 8)) on digits."""
    base = tmp_path_factory.mktemp("export-runs")
    cnn = copy.deepcopy(TINY)
    cnn["student"] = {"model": {"name": "small_cnn", "kwargs": {"width": 4}}, "baseline": False}
    # The CNN run reuses the MLP run's first teacher as a kdkit folder: no second teacher training.
    cnn["teacher"]["members"] = [{"model": {"source": "kdkit", "path": str(base / "mlp" / "teachers" / "member_0")}}]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KDKIT_CACHE_DIR", str(base / "cache"))
        distill(load_config(TINY), out=base / "mlp", log=lambda m: None)
        distill(load_config(cnn), out=base / "cnn", log=lambda m: None)
    return {"mlp": base / "mlp", "cnn": base / "cnn"}


def _test_inputs(run_dir, n=16):
    from kdkit.export import held_out

    return held_out(open_run(run_dir), n).inputs


@pytest.mark.parametrize("student", ["mlp", "cnn"])
@pytest.mark.parametrize("fmt", ["safetensors", "onnx", "torchscript"])
def test_export_parity_on_held_out_inputs(runs, student, fmt):
    result = export_run(runs[student], fmt)
    assert result.path == runs[student] / "export" / fmt
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-4
    assert result.parity_source == "test split" and result.parity_inputs == 80  # 20% of 400 examples
    assert {"README.md", "export.json", "model.json"} <= set(result.files)
    record = json.loads((result.path / "export.json").read_text())
    assert record["parity"]["max_abs_diff"] == result.max_abs_diff
    assert record["student_sha256"] == open_run(runs[student]).student_sha256()
    # The exported model, loaded the way the card says, gives the eager student's logits at another batch size.
    x = _test_inputs(runs[student], 7)
    with torch.inference_mode():
        eager = open_run(runs[student]).student(x).numpy()
    if fmt == "safetensors":
        got = load_model_folder(result.path).eval()(x).detach().numpy()
    elif fmt == "torchscript":
        got = torch.jit.load(str(result.path / "model.pt")).eval()(x).detach().numpy()
    else:
        import onnxruntime as ort

        session = ort.InferenceSession(str(result.path / "model.onnx"), providers=["CPUExecutionProvider"])
        assert session.get_inputs()[0].shape[0] == "batch"  # the batch axis is dynamic
        got = session.run(["logits"], {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, eager, atol=1e-4, rtol=0)


def test_model_card_carries_the_reports_figures_and_the_config(runs):
    result = export_run(runs["mlp"], "onnx")
    card = (result.path / "README.md").read_text()
    metrics = json.loads((runs["mlp"] / "metrics.json").read_text())
    assert f"| distilled student | {100 * metrics['student']['accuracy']:.2f} |" in card
    assert f"| teacher | {100 * metrics['teacher']['accuracy']:.2f} |" in card
    assert "| baseline student |" in card
    assert "`total = 0.1*ce + 0.9*soft_kl(T=4)`" in card
    assert "(batch, 1, 8, 8)" in card and "0: 0, 1: 1" in card
    assert "```yaml\n" + (runs["mlp"] / "config.yaml").read_text().rstrip("\n") + "\n```" in card
    assert "onnxruntime" in card and f"**{result.max_abs_diff:.3g}**" in card


def test_export_holds_the_student_alone(runs):
    run_dir = runs["mlp"]
    result = export_run(run_dir, "safetensors")
    exported = set(load_file(str(result.path / "model.safetensors")))
    assert exported == set(open_run(run_dir).student.state_dict())
    loss_module_keys = set()
    for path in (run_dir / "checkpoints").rglob("loss_modules.safetensors"):
        loss_module_keys |= set(load_file(str(path)))
    assert not exported & loss_module_keys
    assert not [k for k in exported if any(w in k for w in ("adapter", "projector", "loss"))]
    assert not any(p.name.startswith(".") for p in (run_dir / "export").iterdir())  # no temp folder left


def test_failed_parity_writes_nothing_and_keeps_the_old_export(runs, monkeypatch):
    run_dir = runs["cnn"]
    export_run(run_dir, "onnx")
    before = (run_dir / "export" / "onnx" / "export.json").read_text()
    from kdkit.export import onnx_runtime

    real = onnx_runtime.run_session
    monkeypatch.setattr(onnx_runtime, "run_session", lambda session, x: real(session, x) + 1e-3)
    with pytest.raises(ParityError, match="max abs diff 0.001"):
        export_run(run_dir, "onnx")
    assert (run_dir / "export" / "onnx" / "export.json").read_text() == before
    assert not [p for p in (run_dir / "export").iterdir() if p.name.startswith(".")]  # no temp folder left


def test_hf_export_needs_a_transformers_student(runs):
    with pytest.raises(ConfigError, match="needs a transformers student"):
        export_run(runs["mlp"], "hf")
    assert not (runs["mlp"] / "export" / "hf").exists()


def test_hf_export_of_a_transformers_student_reloads(tmp_path):
    transformers = pytest.importorskip("transformers")
    from kdkit.export.formats import export_hf

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=40,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
        num_labels=3,
    )
    student = transformers.BertForSequenceClassification(config).eval()
    ids = torch.randint(0, 40, (5, 6))
    files, parity = export_hf(student, {"source": "hf"}, ids, tmp_path)
    assert "config.json" in files and "model.safetensors" in files and parity.max_abs_diff <= 1e-4
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path)).eval()
    with torch.inference_mode():
        torch.testing.assert_close(reloaded(ids).logits, student(ids).logits)


def test_bad_run_directories_and_outputs(runs, tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.yaml").write_text((runs["mlp"] / "config.yaml").read_text())
    with pytest.raises(ConfigError, match="no trained student"):
        export_run(tmp_path / "half", "onnx")
    with pytest.raises(ConfigError, match="not a kdkit run directory"):
        export_run(tmp_path, "onnx")
    with pytest.raises(ConfigError, match="did you mean: onnx"):
        export_run(runs["mlp"], "onx")
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a kdkit export"):
        export_run(runs["mlp"], "onnx", out=keep)
    assert [p.name for p in keep.iterdir()] == ["notes.txt"]
    assert not list((tmp_path / "half").iterdir())[1:]  # only config.yaml: nothing written into a bad run


def test_cli_export_verb(runs, tmp_path, capsys):
    main(["export", str(runs["cnn"]), "--format", "torchscript", "--out", str(tmp_path / "ts")])
    assert "max abs diff" in capsys.readouterr().out
    assert (tmp_path / "ts" / "model.pt").is_file()
    with pytest.raises(SystemExit) as exc:
        main(["export", str(tmp_path), "--format", "onnx"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.startswith("error: RUN_DIR:")
