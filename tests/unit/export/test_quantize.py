"""Int8 export (kdkit.export.quantize): static (QDQ, calibrated) and dynamic int8 of a real tiny MLP and small-CNN
run; the int8 model runs in ONNX Runtime, is smaller and agrees with the fp32 export on the test split, and the
record's figures are the ones recomputed here; bounds and bad options exit 2 with one line and write nothing."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kdkit.cli import main
from kdkit.config import load_config
from kdkit.errors import ConfigError
from kdkit.export import ParityError, export_run, open_run
from kdkit.export.run import run_data
from kdkit.pipeline import distill

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
quantize = pytest.importorskip("kdkit.export.quantize")

MLP = {
    "run": {"name": "tiny-int8", "seeds": [0], "progress": False, "tensorboard": False},
    "data": {"source": "builtin", "name": "digits", "limit": 500},
    "teacher": {"members": [{"model": {"name": "mlp", "kwargs": {"hidden": [64]}}}], "train": {"epochs": 4}},
    # Wide enough that the weights, not the graph's bookkeeping, make most of the file (so int8 is smaller).
    "student": {"model": {"name": "mlp", "kwargs": {"hidden": [96]}}, "baseline": False},
    "distill": {"cache_teacher": True},
    "train": {"epochs": 4, "batch_size": 32},
    "eval": {"latency_repeats": 2, "latency_warmup": 0, "robustness": False},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two finished runs on digits (inputs (1, 8, 8), 100 test examples): an MLP student and a small CNN student."""
    base = tmp_path_factory.mktemp("quantize-runs")
    cnn = copy.deepcopy(MLP)
    cnn["student"] = {"model": {"name": "small_cnn", "kwargs": {"width": 8}}, "baseline": False}
    cnn["teacher"]["members"] = [{"model": {"source": "kdkit", "path": str(base / "mlp" / "teachers" / "member_0")}}]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KDKIT_CACHE_DIR", str(base / "cache"))
        distill(load_config(MLP), out=base / "mlp", log=lambda m: None)
        distill(load_config(cnn), out=base / "cnn", log=lambda m: None)
    return {"mlp": base / "mlp", "cnn": base / "cnn"}


@pytest.mark.parametrize("student", ["mlp", "cnn"])
@pytest.mark.parametrize("mode", ["int8", "dynamic"])
def test_quantized_export_runs_is_smaller_and_agrees_with_fp32(runs, student, mode):
    result = quantize.export_quantized(runs[student], mode, rounds=1)
    assert result.path == runs[student] / "export" / f"onnx-{mode}"
    assert set(result.files) == {"model.onnx", "model.json", "README.md", "export.json", "preprocess.json"}
    # The int8 model reads raw inputs exactly as the fp32 student does: the same preprocessing description.
    copied = json.loads((result.path / "preprocess.json").read_text())
    assert copied == json.loads((runs[student] / "student" / "preprocess.json").read_text())
    record = json.loads((result.path / "export.json").read_text())
    q = record["quantization"]

    # Integer arithmetic is really in the file: int8 weights, and the ops that use them.
    model = onnx.load(str(result.path / "model.onnx"))
    ops = {n.op_type for n in model.graph.node}
    int8_weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert int8_weights
    if mode == "int8":
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    else:
        assert "MatMulInteger" in ops and "DynamicQuantizeLinear" in ops

    # It runs in ONNX Runtime at another batch size, as the card says, with the fp32 export's input and output.
    data = run_data(open_run(runs[student]))
    x, y = (t.numpy() for t in data.inputs("test"))
    assert len(y) == q["test_examples"] == 100
    session = ort.InferenceSession(str(result.path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.run(["logits"], {"input": x[:7]})[0].shape == (7, 10)

    # The recorded figures are what the two files give on the test split (batched as the measurement batches:
    # dynamic quantization takes its ranges from the whole batch), against the shipped fp32 export.
    fp32 = export_run(runs[student], "onnx").path / "model.onnx"
    batch = q["throughput"]["batch_size"]
    ref = np.concatenate(
        [ort.InferenceSession(str(fp32)).run(None, {"input": x[i : i + batch]})[0] for i in range(0, len(x), batch)]
    )
    got = np.concatenate([session.run(None, {"input": x[i : i + batch]})[0] for i in range(0, len(x), batch)])
    assert q["accuracy_fp32"] == pytest.approx(100 * np.mean(ref.argmax(1) == y))
    assert q["accuracy_int8"] == pytest.approx(100 * np.mean(got.argmax(1) == y))
    assert q["agreement"] == pytest.approx(100 * np.mean(ref.argmax(1) == got.argmax(1)))
    assert q["accuracy_drop_points"] == pytest.approx(q["accuracy_fp32"] - q["accuracy_int8"])
    assert q["agreement"] >= 95.0 and q["accuracy_drop_points"] <= 1.0  # the default bounds held
    assert q["max_abs_logit_diff"] == pytest.approx(float(np.max(np.abs(ref - got))), rel=1e-5)
    assert 0 < q["max_abs_logit_diff"] < 0.2 * np.abs(ref).max()  # quantized (not a copy of fp32), and close

    # Smaller: fp32 size is the shipped export's; int8's is the file's.
    assert q["size_bytes"]["fp32"] == fp32.stat().st_size
    assert q["size_bytes"]["int8"] == (result.path / "model.onnx").stat().st_size
    if mode == "int8" or student == "mlp":  # dynamic leaves convolutions in fp32: a CNN keeps most of its bytes
        assert q["size_bytes"]["int8"] < 0.6 * q["size_bytes"]["fp32"]
    assert q["throughput"]["fp32"] > 0 and q["throughput"]["int8"] > 0  # measured; no timed assertion
    assert q["bounds"] == {"max_accuracy_drop": 1.0, "min_agreement": 95.0} and q["passed"] is True
    assert q["method"] == ("static" if mode == "int8" else "dynamic")
    assert record["format"] == "onnx" and record["quantize"] == mode
    assert record["student_sha256"] == open_run(runs[student]).student_sha256()
    assert record["parity"]["max_abs_diff"] <= 1e-4  # the fp32 model it came from matched eager PyTorch

    card = (result.path / "README.md").read_text()
    assert "## Int8 quantization" in card
    assert f"| accuracy (%) | {q['accuracy_fp32']:.2f} | {q['accuracy_int8']:.2f} |" in card
    assert f"| agreement with fp32 (%) | 100.00 | {q['agreement']:.2f} |" in card
    assert "onnxruntime" in card and "passed" in card
    assert json.loads((result.path / "model.json").read_text())["onnx"]["quantize"] == mode


def test_static_calibration_uses_the_requested_training_examples(runs, monkeypatch):
    seen = []
    real = quantize.QUANTIZERS["int8"]

    def spy(fp32, out, calibration):
        seen.append(calibration)
        return real(fp32, out, calibration)

    monkeypatch.setitem(quantize.QUANTIZERS, "int8", spy)
    result = quantize.export_quantized(runs["cnn"], "int8", calibration_examples=40, rounds=1)
    data = run_data(open_run(runs["cnn"]))
    train = data.train.x.numpy()
    (calibration,) = seen
    assert calibration.shape == (40, 1, 8, 8) and calibration.dtype == np.float32
    # Every calibration input is a training example, none repeated (a seeded sample, not the test split).
    rows = {r.tobytes() for r in train.reshape(len(train), -1)}
    assert all(c.tobytes() in rows for c in calibration.reshape(40, -1))
    assert len({c.tobytes() for c in calibration.reshape(40, -1)}) == 40
    np.testing.assert_array_equal(calibration, quantize.calibration_inputs(data, 40))
    assert "MinMax on 40 training examples" in result.settings["calibration"]
    assert len(quantize.calibration_inputs(data, 10_000)) == len(data.train)  # capped at the split


def test_calibration_reader_yields_every_example_in_batches_and_rewinds():
    x = np.arange(10 * 3, dtype=np.float32).reshape(10, 3)
    reader = quantize._calibration_reader(x, batch_size=4)
    batches = list(iter(reader.get_next, None))
    assert [b["input"].shape[0] for b in batches] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([b["input"] for b in batches]), x)
    reader.rewind()
    assert reader.get_next()["input"].shape == (4, 3)


def test_gemm_as_matmul_computes_the_same_logits(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3, bias=False)).eval()
    path = tmp_path / "m.onnx"
    torch.onnx.export(
        net,
        (torch.randn(2, 6),),
        str(path),
        dynamo=False,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "b"}},
    )
    before = onnx.load(str(path))
    assert [n.op_type for n in before.graph.node].count("Gemm") == 1  # torch writes the biased Linear as Gemm
    after = quantize.gemm_as_matmul(onnx.load(str(path)))
    onnx.checker.check_model(after)
    assert "Gemm" not in {n.op_type for n in after.graph.node}
    assert [n.op_type for n in after.graph.node].count("MatMul") == 2
    x = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
    run = ort.InferenceSession(after.SerializeToString()).run
    want = net(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(run(None, {"input": x})[0], want, atol=1e-6, rtol=0)
    names = {t.name for t in after.graph.initializer}
    assert not [n for n in names if n.endswith("weight") and f"{n}.as_matmul" in names]  # replaced weights dropped


def _figures(**changes):
    base = dict(
        n=200,
        accuracy_fp32=97.0,
        accuracy_int8=96.5,
        agreement=98.0,
        max_abs_diff=0.1,
        size_fp32=4000,
        size_int8=1000,
        batch_size=256,
        rounds=5,
        throughput_fp32=1000.0,
        throughput_int8=2000.0,
    )
    return quantize.Figures(**{**base, **changes})


def test_bounds_name_the_figure_its_value_and_the_bound():
    quantize.check_bounds(_figures(), "int8", 1.0, 95.0)  # drop 0.5, agreement 98: inside
    quantize.check_bounds(_figures(accuracy_int8=98.0), "int8", 0.0, 95.0)  # int8 better: a negative drop
    # On the bound passes, though 55% − 54% of 100 examples, in floats, is 1.000000000000007 points.
    on_bound = _figures(n=100, accuracy_fp32=100 * (55 / 100), accuracy_int8=100 * (54 / 100), agreement=95.0)
    assert on_bound.accuracy_drop > 1.0
    quantize.check_bounds(on_bound, "int8", 1.0, 95.0)
    with pytest.raises(
        ParityError,
        match=r"accuracy drop 1\.50 points \(fp32 97\.00% → int8 95\.50% on 200 test "
        r"examples\) exceeds --max-accuracy-drop 1;",
    ):
        quantize.check_bounds(_figures(accuracy_int8=95.5), "int8", 1.0, 95.0)
    with pytest.raises(
        ParityError,
        match=r"agreement with fp32 94\.50% on 200 test examples is below "
        r"--min-agreement 95;",
    ):
        quantize.check_bounds(_figures(agreement=94.5), "dynamic", 1.0, 95.0)
    f = _figures()
    assert (f.accuracy_drop, f.size_ratio, f.speedup) == pytest.approx((0.5, 0.25, 2.0))


def test_cli_quantize_and_a_bound_set_impossibly_tight_exits_2_writing_nothing(runs, tmp_path, capsys):
    out = tmp_path / "int8"
    main(["export", str(runs["mlp"]), "--quantize", "int8", "--out", str(out), "--calibration-examples", "16"])
    printed = capsys.readouterr().out
    assert "agreement" in printed and "examples/s" in printed and (out / "model.onnx").is_file()
    before = (out / "export.json").read_text()
    assert json.loads(before)["quantization"]["calibration_examples"] == 16
    with pytest.raises(SystemExit) as exc:
        main(["export", str(runs["mlp"]), "--quantize", "int8", "--out", str(out), "--max-accuracy-drop=-100"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("error: export --quantize int8: accuracy drop ")
    assert "exceeds --max-accuracy-drop -100; nothing was written" in err[0]
    assert (out / "export.json").read_text() == before  # the old export stays as it was
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--quantize", "int4"],
            "error: --quantize: unknown mode 'int4' (did you mean: int8?); expected one of: int8, dynamic",
        ),
        (["--quantize", "dynamic", "--format", "torchscript"], "error: --quantize: int8 students are ONNX models"),
        (
            ["--quantize", "int8", "--calibration-examples", "0"],
            "error: --calibration-examples: 0; expected a positive",
        ),
        (["--quantize", "int8", "--min-agreement", "100.5"], "error: --min-agreement: 100.5; expected a percentage"),
        (["--max-accuracy-drop", "2"], "error: --max-accuracy-drop: only with --quantize"),
    ],
)
def test_cli_bad_quantize_options_exit_2_with_one_line(runs, args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["export", str(runs["mlp"]), *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message)
    assert not (runs["mlp"] / "export" / "onnx-int4").exists()


def test_text_students_are_refused_in_one_line(runs, monkeypatch):
    monkeypatch.setattr(quantize, "run_data", lambda run: SimpleNamespace(modality="text"))
    with pytest.raises(ConfigError, match=r"^--quantize: the student reads text \(token ids\)"):
        quantize.export_quantized(runs["mlp"], "dynamic")
