"""The HTTP server: answers with both backends, rejects each bad input with its status and keeps serving, the
token, Prometheus metrics, and shadow agreement on stubs whose answer is known."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from kdkit.config import dump_config, load_config
from kdkit.errors import ConfigError
from kdkit.models import build_model, model_spec, save_model_folder
from kdkit.serve import ShadowMonitor, build_app, create_app, load_disagreements

CONFIG = {
    "run": {"name": "tiny-serve", "seeds": [0], "progress": False, "tensorboard": False},
    "data": {"source": "builtin", "name": "digits", "limit": 400},
    "teacher": {
        "members": [
            {"model": {"name": "mlp", "kwargs": {"hidden": [32]}}},
            {"model": {"name": "mlp", "kwargs": {"hidden": [16]}}, "weight": 0.5},
        ]
    },
    "student": {"model": {"name": "mlp", "kwargs": {"hidden": [8]}}},
}
SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory as kdkit writes it (config.yaml, student/, teachers/member_<i>/), with untrained weights:
    serving does not care how good the student is."""
    base = tmp_path_factory.mktemp("serve") / "run"
    cfg = load_config(CONFIG)
    base.mkdir()
    (base / "config.yaml").write_text(dump_config(cfg))
    torch.manual_seed(0)
    folders = {"student": cfg.student.model}
    folders |= {f"teachers/member_{i}": m.model for i, m in enumerate(cfg.teacher.members)}
    for folder, m in folders.items():
        model = build_model(m.source, m.name, m.kwargs, SHAPE, 10)
        save_model_folder(model, base / folder, model_spec(m.source, m.name, m.kwargs, SHAPE, 10))
        if folder.startswith("teachers/"):  # a member trained by the run: its phase is finished
            (base / folder / "result.json").write_text("{}")
    return base


def _inputs(n: int, seed: int = 0) -> list:
    return np.random.default_rng(seed).normal(size=(n, *SHAPE)).round(4).tolist()


def _metrics(client, headers=None) -> dict[str, float]:
    """{'name{label="v",...}': value} of a /metrics answer, parsed with Prometheus's own parser."""
    r = client.get("/metrics", headers=headers or {})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def test_predict_with_torch_and_onnx_backends(run_dir):
    x = _inputs(5)
    answers = {}
    for backend in ("torch", "onnx"):
        with TestClient(create_app(run_dir, backend=backend)) as client:
            health = client.get("/health").json()
            assert health["status"] == "ok" and health["backend"] == backend and health["input_shape"] == [1, 8, 8]
            r = client.post("/predict", json={"inputs": x})
            assert r.status_code == 200
            answers[backend] = r.json()
    a, b = answers["torch"], answers["onnx"]
    assert a["ids"] == b["ids"] and a["labels"] == [str(i) for i in a["ids"]]  # digits' class names are "0".."9"
    np.testing.assert_allclose(a["probabilities"], b["probabilities"], atol=1e-5)
    np.testing.assert_allclose(np.sum(a["probabilities"], axis=1), 1.0, atol=1e-6)
    assert (run_dir / "export" / "onnx" / "model.onnx").is_file()  # the onnx backend exported the student


def _body(row: list) -> bytes:
    """A batch of one (1, 8, 8) example whose 8 rows are all `row`."""
    return json.dumps({"inputs": [[[row] * 8]]}).encode()


GOOD = {"inputs": _inputs(2)}
BAD = [
    ("malformed JSON", b'{"inputs": [[', 400, "bad_json"),
    ("NaN literal", b'{"inputs": NaN}', 400, "bad_json"),
    ("not UTF-8", b"\xff\xfe\x00", 400, "bad_json"),
    ("not an object", b"[1, 2, 3]", 422, "bad_input"),
    ("no inputs key", b'{"x": []}', 422, "bad_input"),
    ("empty batch", b'{"inputs": []}', 422, "bad_input"),
    ("inputs not a list", b'{"inputs": 3}', 422, "bad_input"),
    ("wrong shape", json.dumps({"inputs": [[1.0] * 64]}).encode(), 422, "bad_input"),
    ("no batch axis", json.dumps({"inputs": _inputs(1)[0]}).encode(), 422, "bad_input"),
    ("ragged", json.dumps({"inputs": [_inputs(1)[0], [[1.0]]]}).encode(), 422, "bad_input"),
    ("strings", _body(["a"] * 8), 422, "bad_input"),
    ("a boolean", _body([True] + [0.5] * 7), 422, "bad_input"),
    ("a null", _body([None] + [0.5] * 7), 422, "bad_input"),
    ("beyond float32", _body([1e39] * 8), 422, "bad_input"),
    ("huge integer", b'{"inputs": [[[' + b"9" * 400 + b"]]]}", 422, "bad_input"),
    ("batch too large", json.dumps({"inputs": _inputs(9)}).encode(), 413, "batch_too_large"),
    ("body too large", b" " * 300_000 + json.dumps(GOOD).encode(), 413, "body_too_large"),
]


def test_bad_inputs_get_their_status_and_the_server_keeps_serving(run_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    app = create_app(run_dir, max_batch=8, max_body_bytes=200_000)
    with TestClient(app) as client:
        for name, body, status, reason in BAD:
            r = client.post("/predict", content=body, headers={"content-type": "application/json"})
            assert r.status_code == status, name
            assert r.json()["reason"] == reason and r.json()["error"], name
            assert client.post("/predict", json=GOOD).status_code == 200, f"no answer after {name}"
        chunked = client.post("/predict", content=iter([b" " * 150_000, b" " * 150_000]))  # no Content-Length
        assert chunked.status_code == 413 and chunked.json()["reason"] == "body_too_large"
        assert client.get("/nowhere").status_code == 404 and client.get("/nowhere").json()["reason"] == "not_found"
        assert client.get("/predict").status_code == 405
        assert client.post("/predict", json=GOOD).status_code == 200
        m = _metrics(client)
    assert m['kdkit_errors_total{reason="bad_input"}'] == sum(1 for b in BAD if b[3] == "bad_input")
    assert m['kdkit_errors_total{reason="body_too_large"}'] == 2
    assert m['kdkit_requests_total{endpoint="/predict",status="200"}'] == len(BAD) + 1
    assert m['kdkit_requests_total{endpoint="other",status="404"}'] == 2
    assert m["kdkit_predicted_examples_total"] == 2 * (len(BAD) + 1)
    count = m['kdkit_request_latency_seconds_count{endpoint="/predict"}']
    assert (
        count == 2 * len(BAD) + 3 and m['kdkit_request_latency_seconds_bucket{endpoint="/predict",le="+Inf"}'] == count
    )
    assert list(tmp_path.iterdir()) == []  # nothing written outside the run directory ...
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before  # ... nor inside it


def test_internal_errors_answer_500_json_and_do_not_stop_the_server():
    def predict(x):
        if x[0, 0] < 0:
            raise RuntimeError("boom")
        return np.zeros((len(x), 2), dtype=np.float32)

    with TestClient(build_app(predict, ["a", "b"], (1,)), raise_server_exceptions=False) as client:
        r = client.post("/predict", json={"inputs": [[-1.0]]})
        assert r.status_code == 500 and r.json()["reason"] == "internal"
        assert client.post("/predict", json={"inputs": [[1.0]]}).json()["labels"] == ["a"]
        assert _metrics(client)['kdkit_requests_total{endpoint="/predict",status="500"}'] == 1


def test_api_token(run_dir, monkeypatch):
    monkeypatch.setenv("KDKIT_API_TOKEN", "s3cret")
    with TestClient(create_app(run_dir)) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = client.post("/predict", json=GOOD, headers=headers)
            assert r.status_code == 401 and r.json()["reason"] == "unauthorized"
            assert r.headers["www-authenticate"] == "Bearer"
        assert client.get("/metrics").status_code == 401
        assert client.get("/health").status_code == 200  # liveness probes need no token
        ok = {"Authorization": "Bearer s3cret"}
        assert client.post("/predict", json=GOOD, headers=ok).status_code == 200
        assert _metrics(client, ok)['kdkit_errors_total{reason="unauthorized"}'] == 4


def test_a_run_directory_without_a_student_is_refused(run_dir, tmp_path):
    (tmp_path / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    with pytest.raises(ConfigError, match="no trained student"):
        create_app(tmp_path)
    with pytest.raises(ConfigError, match="backend"):
        create_app(run_dir, backend="tensorrt")
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


# -- shadow monitoring on stubs --------------------------------------------------------------------------------
# Inputs are (class, flip): the student answers `class`; the teacher answers `class + flip` (mod 3), so it
# disagrees exactly on the examples with flip = 1.


def student_stub(x: np.ndarray) -> np.ndarray:
    return np.eye(3, dtype=np.float32)[x[:, 0].astype(int)]


def teacher_stub(x: np.ndarray) -> np.ndarray:
    return np.eye(3, dtype=np.float32)[(x[:, 0] + x[:, 1]).astype(int) % 3]


def test_shadow_window_agreement_is_exact():
    seen = []
    monitor = ShadowMonitor(teacher_stub, rate=1.0, window=4, threshold=0.0, log=seen.append)
    expected = [1.0, 0.5, 2 / 3, 0.75, 0.5, 0.5]  # window of the last 4 over T F T T F F
    for flip, want in zip([0, 1, 0, 0, 1, 1], expected):
        monitor.score(np.array([[1.0, flip]], dtype=np.float32), np.array([1]))
        assert monitor.agreement == pytest.approx(want)
    assert monitor.stats()["disagreements"] == 3 and monitor.stats()["window_examples"] == 4
    assert seen and "agreement 0.750 over the last 4" in seen[0]  # logged once per window of examples


def test_shadow_agreement_alert_and_disagreements_through_the_app(tmp_path):
    alerts = []
    monitor = ShadowMonitor(
        teacher_stub,
        rate=1.0,
        window=10,
        threshold=0.9,
        out_dir=tmp_path / "disagreements",
        class_names=["a", "b", "c"],
        alert=alerts.append,
    )
    app = build_app(student_stub, ["a", "b", "c"], (2,), shadow=monitor)
    x = [[i % 3, i % 2] for i in range(10)]  # every other example is flipped: agreement exactly 0.5
    with TestClient(app) as client:
        for row in x:
            assert client.post("/predict", json={"inputs": [row]}).status_code == 200
        assert monitor.drain()
        m = _metrics(client)
        assert m["kdkit_shadow_agreement"] == 0.5 and m["kdkit_shadow_window_examples"] == 10
        assert m["kdkit_shadow_disagreements_total"] == 5 and m["kdkit_shadow_alerts_total"] == 1
        assert len(alerts) == 1 and "agreement 0.500 over the last 10 examples" in alerts[0]
        xs, ys = load_disagreements(tmp_path / "disagreements")
        flipped = np.array([r for r in x if r[1] == 1], dtype=np.float32)
        np.testing.assert_array_equal(xs, flipped)
        np.testing.assert_array_equal(ys, (flipped[:, 0] + 1) % 3)  # the teacher's answers are the labels
        # Ten agreeing examples push the disagreements out of the window.
        client.post("/predict", json={"inputs": [[i % 3, 0] for i in range(10)]})
        assert monitor.drain()
        m = _metrics(client)
        assert m["kdkit_shadow_agreement"] == 1.0 and m["kdkit_shadow_scored_examples_total"] == 20
        assert m["kdkit_shadow_written_examples_total"] == 5 and m["kdkit_shadow_alerts_total"] == 1


def test_shadow_samples_a_fraction_of_requests():
    monitor = ShadowMonitor(teacher_stub, rate=0.25, window=1000, seed=0, queue_size=1000)
    queued = sum(monitor.offer(np.array([[0.0, 0.0]]), np.array([0])) for _ in range(400))
    assert 70 <= queued <= 130  # binomial(400, 0.25): mean 100, sd 8.7
    none = ShadowMonitor(teacher_stub, rate=0.0)
    assert not any(none.offer(np.array([[0.0, 0.0]]), np.array([0])) for _ in range(50))


def test_shadow_runs_off_the_request_path_and_drops_when_full():
    release = threading.Event()

    def slow_teacher(x):
        release.wait(10)
        return teacher_stub(x)

    monitor = ShadowMonitor(slow_teacher, rate=1.0, window=10, queue_size=1)
    with TestClient(build_app(student_stub, ["a", "b", "c"], (2,), shadow=monitor)) as client:
        start = time.perf_counter()
        for _ in range(5):
            assert client.post("/predict", json={"inputs": [[0, 0]]}).status_code == 200
        assert time.perf_counter() - start < 5  # answers did not wait for the blocked teacher
        release.set()
        assert monitor.drain()
        m = _metrics(client)
    assert m["kdkit_shadow_dropped_requests_total"] >= 3
    assert m["kdkit_shadow_scored_examples_total"] + m["kdkit_shadow_dropped_requests_total"] == 5


def test_a_failing_teacher_is_counted_and_does_not_touch_requests():
    def broken(x):
        raise RuntimeError("teacher down")

    monitor = ShadowMonitor(broken, rate=1.0)
    with TestClient(build_app(student_stub, ["a", "b", "c"], (2,), shadow=monitor)) as client:
        assert client.post("/predict", json={"inputs": [[0, 0]]}).status_code == 200
        assert monitor.drain()
        assert _metrics(client)["kdkit_shadow_failures_total"] == 1
        assert client.post("/predict", json={"inputs": [[1, 0]]}).json()["labels"] == ["b"]


def test_shadow_with_the_runs_teacher(run_dir):
    app = create_app(run_dir, shadow_rate=1.0, window=50, alert_threshold=0.0)
    with TestClient(app) as client:
        client.post("/predict", json={"inputs": _inputs(6)})
        assert app.state.shadow.drain()
        m = _metrics(client)
    assert m["kdkit_shadow_scored_examples_total"] == 6 and 0.0 <= m["kdkit_shadow_agreement"] <= 1.0
    assert not (run_dir / "shadow").exists()  # threshold 0: never below it, nothing written


def test_a_failing_latency_probe_says_what_happened(caplog):
    """The start-up probe used to swallow every exception silently; it must log which error it met."""
    from kdkit.serve.app import _seconds_per_example

    def broken(x):
        raise MemoryError("could not allocate 4 GB")

    with caplog.at_level("WARNING", logger="kdkit.serve"):
        assert _seconds_per_example(broken, (1, 8, 8)) == float("inf")
    assert "MemoryError: could not allocate 4 GB" in caplog.text and "latency probe" in caplog.text
    assert _seconds_per_example(lambda x: x.sum(), (1, 8, 8)) < float("inf")
