"""Serving the int8 student (`kdkit serve RUN --backend onnx-int8 | onnx-dynamic`): the server answers the test split
with exactly the numbers of the int8 ONNX model run directly in ONNX Runtime (and not the fp32 ones), a PNG is
answered as the int8 model answers its tensor, shadow monitoring compares the int8 answers with the teacher's, a
stale int8 model is quantized again, a missed quantization bound refuses to serve in one line (exit 2), an unknown
backend gets one line listing the choices, and the CLI option reaches the server."""

from __future__ import annotations

import base64
import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from tests.image_helpers import png, stored_pixels

from kdkit.cli import main
from kdkit.config import load_config
from kdkit.data import build_data
from kdkit.data.preprocess import load_preprocess
from kdkit.errors import ConfigError
from kdkit.export import load_teacher, open_run
from kdkit.pipeline import distill
from kdkit.serve import create_app
from kdkit.serve.app import _softmax
from kdkit.serve.backends import BACKENDS

ort = pytest.importorskip("onnxruntime")
quantize = pytest.importorskip("kdkit.export.quantize")

TINY = {  # test_raw_inputs.TINY, trained enough that int8 stays within the default bounds of fp32 on the test split
    "run": {"name": "tiny-int8-serve", "seeds": [0], "progress": False, "tensorboard": False},
    "data": {"source": "builtin", "name": "digits", "limit": 500},
    "teacher": {"members": [{"model": {"name": "mlp", "kwargs": {"hidden": [64]}}}], "train": {"epochs": 4}},
    "student": {"model": {"name": "mlp", "kwargs": {"hidden": [64]}}, "baseline": False},
    "distill": {"cache_teacher": False},
    "train": {"epochs": 6, "batch_size": 32},
    "eval": {"latency_repeats": 1, "latency_warmup": 0, "robustness": False},
}


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A finished tiny run on scikit-learn digits (its student/preprocess.json included) and its test split."""
    out = tmp_path_factory.mktemp("int8-serve") / "digits"
    distill(load_config(TINY), out=out, log=lambda m: None)
    data = build_data(**load_config(TINY).data.model_dump())
    return out, data


def b64(blob: bytes) -> str:
    return base64.b64encode(blob).decode()


def ort_probabilities(model_path, x: np.ndarray) -> np.ndarray:
    """Softmax of the ONNX model's logits for inputs x, run directly by ONNX Runtime (its own session)."""
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: np.ascontiguousarray(x, dtype=np.float32)})[0]
    return _softmax(logits)


def op_types(model_path) -> set[str]:
    import onnx

    return {node.op_type for node in onnx.load(str(model_path)).graph.node}


@pytest.mark.parametrize("mode, int8_op", [("int8", "QuantizeLinear"), ("dynamic", "MatMulInteger")])
def test_the_server_answers_the_test_split_as_the_int8_model_does_in_onnxruntime(digits_run, mode, int8_op):
    run_dir, data = digits_run
    folder = run_dir / "export" / f"onnx-{mode}"
    assert not folder.exists()
    x = data.test.x.numpy()
    with TestClient(create_app(run_dir, backend=f"onnx-{mode}")) as client:
        health = client.get("/health").json()
        answers = [client.post("/predict", json={"inputs": x[i : i + 32].tolist()}) for i in range(0, len(x), 32)]
    # The backend made the export that `kdkit export --quantize` makes, from the current student weights.
    record = json.loads((folder / "export.json").read_text())
    assert record["quantize"] == mode and record["student_sha256"] == open_run(run_dir).student_sha256()
    assert int8_op in op_types(folder / "model.onnx")
    assert health["backend"] == f"onnx-{mode}" and health["precision"] == "int8"
    assert health["file"] == f"export/onnx-{mode}/model.onnx"
    q = record["quantization"]
    assert health["quantization"]["method"] == {"int8": "static", "dynamic": "dynamic"}[mode]
    assert (health["quantization"]["agreement"], health["quantization"]["test_examples"]) == (q["agreement"], len(x))
    # Each request's numbers are the int8 model's on the same batch: the same bits through JSON.
    for i, r in zip(range(0, len(x), 32), answers):
        assert r.status_code == 200, r.text
        want = ort_probabilities(folder / "model.onnx", x[i : i + 32])
        np.testing.assert_array_equal(np.asarray(r.json()["probabilities"]), want)
        assert r.json()["ids"] == want.argmax(1).tolist()
    # ... and not the fp32 model's: int8 rounding moves the probabilities.
    served = np.concatenate([r.json()["probabilities"] for r in answers])
    fp32 = _softmax(open_run(run_dir).student(torch.from_numpy(x)).detach().numpy())
    assert np.abs(served - fp32).max() > 1e-6


def test_the_fp32_backends_say_their_precision(digits_run):
    run_dir, _ = digits_run
    for backend in ("torch", "onnx"):
        with TestClient(create_app(run_dir, backend=backend)) as client:
            health = client.get("/health").json()
        assert (health["backend"], health["precision"]) == (backend, "float32")
        assert "quantization" not in health


def test_a_png_is_answered_as_the_int8_model_answers_its_tensor(digits_run):
    run_dir, data = digits_run
    x = data.test.x[:6]
    blobs = [png(p[0]) for p in stored_pixels(x, load_preprocess(run_dir / "student"))]
    with TestClient(create_app(run_dir, backend="onnx-int8")) as client:
        assert client.get("/health").json()["accepts"] == ["inputs", "images"]
        as_json = client.post("/predict", json={"images": [b64(b) for b in blobs]})
        files = [("image", (f"{i}.png", b, "image/png")) for i, b in enumerate(blobs)]
        as_upload = client.post("/predict", files=files)
        one = client.post("/predict", json={"images": [b64(blobs[0])]})
    model = run_dir / "export" / "onnx-int8" / "model.onnx"
    assert as_json.status_code == as_upload.status_code == one.status_code == 200
    np.testing.assert_array_equal(np.asarray(as_json.json()["probabilities"]), ort_probabilities(model, x.numpy()))
    np.testing.assert_array_equal(np.asarray(one.json()["probabilities"]), ort_probabilities(model, x[:1].numpy()))
    assert as_upload.json() == as_json.json()


def test_shadow_monitoring_compares_the_int8_answers_with_the_teacher(digits_run):
    run_dir, data = digits_run
    x = data.test.x.numpy()[:48]
    app = create_app(run_dir, backend="onnx-int8", shadow_rate=1.0, window=1000, alert_threshold=0.0)
    with TestClient(app) as client:
        r = client.post("/predict", json={"inputs": x.tolist()})
        assert r.status_code == 200 and app.state.shadow.drain()
        stats = app.state.shadow.stats()
    with torch.inference_mode():
        teacher_ids = load_teacher(open_run(run_dir))(torch.from_numpy(x)).logits.argmax(-1).numpy()
    assert stats["window_examples"] == len(x)
    assert stats["agreement"] == pytest.approx(float(np.mean(np.asarray(r.json()["ids"]) == teacher_ids)))


def test_a_stale_int8_model_is_quantized_again(digits_run, tmp_path):
    from safetensors.torch import load_file, save_file

    run_dir = tmp_path / "run"
    shutil.copytree(digits_run[0], run_dir)
    model = run_dir / "export" / "onnx-int8" / "model.onnx"
    before = model.read_bytes()
    said: list[str] = []
    create_app(run_dir, backend="onnx-int8", log=said.append)  # fresh: served as it is
    assert not [m for m in said if "quantizing" in m] and model.read_bytes() == before
    weights_path = run_dir / "student" / "model.safetensors"
    weights = load_file(weights_path)
    save_file({k: v * 1.5 if v.is_floating_point() else v for k, v in weights.items()}, weights_path)
    app = create_app(run_dir, backend="onnx-int8", log=said.append)
    assert [m for m in said if m.startswith("serve: quantizing the student")]
    assert model.read_bytes() != before
    record = json.loads((model.parent / "export.json").read_text())
    assert record["student_sha256"] == open_run(run_dir).student_sha256()
    x = digits_run[1].test.x.numpy()[:8]
    with TestClient(app) as client:
        got = client.post("/predict", json={"inputs": x.tolist()}).json()["probabilities"]
    np.testing.assert_array_equal(np.asarray(got), ort_probabilities(model, x))


def test_a_missed_quantization_bound_refuses_to_serve_in_one_line(digits_run, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(digits_run[0], run_dir, ignore=shutil.ignore_patterns("export"))
    real_measure = quantize.measure

    def lossy(*args, **kwargs):  # the int8 model as if it lost 5 points of accuracy
        figures = real_measure(*args, **kwargs)
        return replace(figures, accuracy_int8=figures.accuracy_fp32 - 5.0)

    monkeypatch.setattr(quantize, "measure", lossy)
    with pytest.raises(SystemExit) as exc:
        main(["serve", str(run_dir), "--backend", "onnx-int8", "--port", "1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: serve --backend onnx-int8: export --quantize int8: accuracy drop 5.00 points")
    assert "exceeds --max-accuracy-drop 1;" in err[0] and "--quantize int8 --max-accuracy-drop" in err[0]
    assert not (run_dir / "export" / "onnx-int8").exists()


def test_an_unknown_backend_gets_one_line_listing_the_choices(digits_run, capsys):
    run_dir, _ = digits_run
    with pytest.raises(SystemExit) as exc:
        main(["serve", str(run_dir), "--backend", "onnx-int4"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: --backend: unknown backend 'onnx-int4' (did you mean: onnx-int8, onnx, onnx-dynamic?); expected one "
        "of: torch, onnx, onnx-int8, onnx-dynamic"
    ]
    with pytest.raises(ConfigError, match=r"^--backend: unknown backend 'tensorrt'; expected one of: torch, onnx,"):
        create_app(run_dir, backend="tensorrt")


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_the_cli_backend_option_reaches_the_server(digits_run, monkeypatch, backend):
    import kdkit.serve

    called = {}
    monkeypatch.setattr(kdkit.serve, "serve", lambda run_dir, **kw: called.update(run_dir=run_dir, **kw))
    main(["serve", str(digits_run[0]), "--backend", backend, "--threads", "1", "--port", "8123"])
    assert (called["backend"], called["threads"], called["port"]) == (backend, 1, 8123)
