"""Int8 students: the fp32 ONNX export quantized with ONNX Runtime's own tools, then measured against it on the
run's test split (accuracy, agreement, size, CPU throughput side by side), with bounds that fail loudly.

    kdkit export RUN_DIR --quantize int8      # static: QDQ, per-channel int8 weights, activations calibrated
    kdkit export RUN_DIR --quantize dynamic   # dynamic: int8 weights of the linear layers, activations per call

    from kdkit.export.quantize import export_quantized
    result = export_quantized("runs/demo", "int8")   # -> QuantizedExport(path, mode, figures, files)

Static quantization (onnxruntime.quantization.quantize_static) fixes the scale of every activation from
`calibration_examples` training examples of the run (a seeded sample; the test split is never seen), stores
weights as int8 per output channel and writes QDQ nodes that ONNX Runtime fuses into integer kernels (Conv, Gemm,
MatMul). Dynamic quantization (quantize_dynamic) stores the weights of MatMul layers as int8 and quantizes their
inputs per call from the batch's own range: no calibration, the choice for linear-heavy students (MLPs); it
leaves convolutions in fp32, because ONNX Runtime's ConvInteger is far slower than its fp32 Conv (0.3× measured).
Both start from the fp32 export (parity-checked against eager PyTorch), preprocessed with quant_pre_process
(shape inference and graph optimisation, as ONNX Runtime recommends before quantizing).

The folder (default RUN_DIR/export/onnx-int8 or onnx-dynamic) holds model.onnx (same input "input" and output
"logits" as the fp32 export), model.json, README.md and export.json, whose "quantization" part holds the figures.
When a bound fails (--max-accuracy-drop, --min-agreement) nothing is written and an older export stays as it was,
as with a failed parity check: the error line names the figure, its value and the bound, and the full figures are
logged just before it.
"""

from __future__ import annotations

import math
import platform
import shutil
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from kdkit.atomic import replace_dir, write_json, write_text
from kdkit.data import DataBundle
from kdkit.data.preprocess import copy_preprocess
from kdkit.errors import ConfigError
from kdkit.export.card import model_card
from kdkit.export.formats import INPUT_NAME, ONNX_OPSET, OUTPUT_NAME, export_onnx
from kdkit.export.onnx_runtime import onnx_session, run_session
from kdkit.export.parity import FP32_TOLERANCE, Parity, ParityError
from kdkit.export.run import Run, open_run, run_data
from kdkit.registry import suggest

CALIBRATION_EXAMPLES = 256  # training examples whose activation ranges fix static int8's scales
MAX_ACCURACY_DROP = 1.0  # points of test accuracy the int8 model may lose against the fp32 ONNX model
MIN_AGREEMENT = 95.0  # % of test examples on which int8 and fp32 must pick the same class
PARITY_INPUTS = 256  # test inputs of the fp32 export's parity check against eager PyTorch
# Throughput per core by default: what int8 changes is the work per example, and one thread gives the same figure on
# a busy machine (measured on 2 shared cores, two spinning threads each made both models up to 4x slower, at random).
THREADS = 1
CALIBRATION_BATCH = 64


@dataclass(frozen=True)
class Figures:
    """fp32 ONNX vs int8 ONNX on `n` test examples. Accuracies and agreement in %; sizes in bytes; throughput in
    examples/s at `batch_size`, the median of `rounds` rounds that alternate the two models."""

    n: int
    accuracy_fp32: float
    accuracy_int8: float
    agreement: float
    max_abs_diff: float
    size_fp32: int
    size_int8: int
    batch_size: int
    rounds: int
    throughput_fp32: float
    throughput_int8: float

    @property
    def accuracy_drop(self) -> float:
        """Points of accuracy lost by int8 (negative: int8 is more accurate)."""
        return self.accuracy_fp32 - self.accuracy_int8

    @property
    def size_ratio(self) -> float:
        return self.size_int8 / max(self.size_fp32, 1)

    @property
    def speedup(self) -> float:
        return self.throughput_int8 / max(self.throughput_fp32, 1e-12)

    def as_dict(self) -> dict:
        return {
            "test_examples": self.n,
            "accuracy_fp32": self.accuracy_fp32,
            "accuracy_int8": self.accuracy_int8,
            "accuracy_drop_points": self.accuracy_drop,
            "agreement": self.agreement,
            "max_abs_logit_diff": self.max_abs_diff,
            "size_bytes": {"fp32": self.size_fp32, "int8": self.size_int8, "ratio": self.size_ratio},
            "throughput": {
                "batch_size": self.batch_size,
                "rounds": self.rounds,
                "fp32": self.throughput_fp32,
                "int8": self.throughput_int8,
                "speedup": self.speedup,
            },
        }

    def line(self) -> str:
        return (
            f"accuracy fp32 {self.accuracy_fp32:.2f}% → int8 {self.accuracy_int8:.2f}% (drop {self.accuracy_drop:.2f} "
            f"points), agreement {self.agreement:.2f}% on {self.n} test examples; size {_mb(self.size_fp32)} → "
            f"{_mb(self.size_int8)} MB ({self.size_ratio:.2f}×); throughput {self.throughput_fp32:,.0f} → "
            f"{self.throughput_int8:,.0f} examples/s at batch {self.batch_size} ({self.speedup:.2f}×)"
        )


@dataclass
class QuantizedExport:
    """path: the export folder; settings: how the model was quantized; figures: fp32 vs int8 on the test split."""

    path: Path
    mode: str
    settings: dict
    figures: Figures
    files: list[str] = field(default_factory=list)


# --- the two ways to quantize: fp32 ONNX file in, int8 ONNX file out, the settings used returned -------------------


def quantize_static_qdq(fp32: Path, out: Path, calibration: np.ndarray) -> dict:
    """quantize_static in QDQ format: int8 weights per output channel (symmetric, 7 bits: reduce_range), uint8
    activations whose ranges are the min/max over `calibration` (inputs (N, *in_shape) float32). U8S8 is ONNX
    Runtime's fast CPU pairing (1.39× fp32 on the demo's MLP, S8S8 1.30×: docs/export.md). reduce_range is on so
    that the file gives the same answers on every x86 CPU it may be deployed to: without VNNI (AVX2 only) ONNX
    Runtime multiplies uint8 × int8 pairs into saturating int16 sums (VPMADDUBSW), which 8-bit weights can overflow
    (seen on an AVX2-only AMD EPYC: 2 points of accuracy lost on a small CNN, and int8 logits that no longer match
    the arithmetic); 7-bit weights (|q| ≤ 64: 2 × 255 × 64 < 2¹⁵) cannot, and VNNI CPUs give the same numbers."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    settings = {
        "method": "static",
        "tool": "onnxruntime.quantization.quantize_static",
        "format": "QDQ",
        "weights": "int8 in [-64, 64] (7 bits), per channel, symmetric",
        "activations": "uint8, per tensor",
        "calibration": f"MinMax on {len(calibration)} training examples",
        "calibration_examples": len(calibration),
        "reduce_range": True,
    }
    quantize_static(
        str(fp32),
        str(out),
        _calibration_reader(calibration),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        reduce_range=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
    )
    return settings


def quantize_dynamic_matmul(fp32: Path, out: Path, calibration: np.ndarray) -> dict:
    """quantize_dynamic on the MatMul layers (Linear layers, rewritten from Gemm first: quantize_dynamic quantizes
    MatMul only), int8 weights per output channel; `calibration` is unused (ranges come from each batch)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = gemm_as_matmul(onnx.load(str(fp32)))
    convs = sum(n.op_type == "Conv" for n in model.graph.node)
    settings = {
        "method": "dynamic",
        "tool": "onnxruntime.quantization.quantize_dynamic",
        "format": "QOperator (MatMulInteger)",
        "weights": "int8 in [-64, 64] (7 bits), per channel, MatMul (Linear) layers only"
        + (f"; the {convs} convolutions stay fp32 (--quantize int8 quantizes them)" if convs else ""),
        "activations": "uint8, range of each batch",
        "calibration": "none",
        "calibration_examples": 0,
        "reduce_range": True,  # as quantize_static_qdq: no int16 saturation on CPUs without VNNI
    }
    quantize_dynamic(
        model,
        str(out),
        op_types_to_quantize=["MatMul"],
        per_channel=True,
        reduce_range=True,
        weight_type=QuantType.QInt8,
    )
    return settings


Quantizer = Callable[[Path, Path, np.ndarray], dict]

QUANTIZERS: dict[str, Quantizer] = {
    "int8": quantize_static_qdq,
    "dynamic": quantize_dynamic_matmul,
}


def gemm_as_matmul(model):
    """Each Gemm that is a Linear layer (Y = X·Wᵀ + b: weight an initializer, alpha = beta = 1, no transA) written
    as MatMul(X, Wᵀ) followed by Add(b): the same numbers, in the op quantize_dynamic quantizes. Other nodes are
    kept as they are. Takes and returns an onnx.ModelProto (changed in place)."""
    from onnx import helper, numpy_helper

    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    nodes, replaced = [], set()
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        linear = (
            node.op_type == "Gemm"
            and node.input[1] in weights
            and not attrs.get("transA", 0)
            and attrs.get("alpha", 1.0) == 1.0
            and attrs.get("beta", 1.0) == 1.0
        )
        if not linear:
            nodes.append(node)
            continue
        w = numpy_helper.to_array(weights[node.input[1]])
        name = f"{node.input[1]}.as_matmul"
        graph.initializer.append(
            numpy_helper.from_array(np.ascontiguousarray(w.T if attrs.get("transB", 0) else w), name)
        )
        replaced.add(node.input[1])
        has_bias = len(node.input) > 2 and node.input[2] != ""
        product = f"{node.output[0]}.matmul" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], name], [product], name=f"{node.name}.matmul"))
        if has_bias:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}.bias"))
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    kept = [t for t in graph.initializer if t.name in used or t.name not in replaced]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return model


def _calibration_reader(x: np.ndarray, batch_size: int = CALIBRATION_BATCH):
    """An onnxruntime CalibrationDataReader over `x` in batches (built here: onnxruntime is an optional extra)."""
    from onnxruntime.quantization import CalibrationDataReader

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.rewind()

        def get_next(self) -> dict | None:
            return next(self._batches, None)

        def rewind(self) -> None:
            self._batches = iter({INPUT_NAME: x[i : i + batch_size]} for i in range(0, len(x), batch_size))

    return Batches()


# --- measurement -------------------------------------------------------------------------------------------------


def onnx_logits(session, x: np.ndarray, batch_size: int) -> np.ndarray:
    """Logits (N, C) of an ONNX Runtime session over inputs (N, *in_shape), `batch_size` at a time."""
    return np.concatenate([run_session(session, x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def side_by_side_throughput(
    sessions: list, batch: np.ndarray, rounds: int = 5, seconds_per_round: float = 0.25
) -> list[float]:
    """Examples/s of each session on `batch`: `rounds` rounds, each timing every session in turn (so that a change
    of machine load or clock hits all of them alike), each round's figure the median of several calls
    (kdkit.evaluate.latency.throughput); the median over rounds is returned, one per session."""
    import time

    from kdkit.evaluate.latency import throughput

    calls = []
    for session in sessions:  # calls per round: about `seconds_per_round` of work, at least 3
        start = time.perf_counter()
        run_session(session, batch)
        run_session(session, batch)
        one = (time.perf_counter() - start) / 2
        calls.append(max(3, min(50, math.ceil(seconds_per_round / max(one, 1e-6)))))
    per_round: list[list[float]] = [[] for _ in sessions]
    for _ in range(rounds):
        for i, session in enumerate(sessions):
            per_round[i].append(throughput(lambda b, s=session: run_session(s, b), batch, repeats=calls[i], warmup=1))
    return [statistics.median(r) for r in per_round]


def measure(
    fp32: Path,
    int8: Path,
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int = 256,
    rounds: int = 5,
    threads: int | None = None,
) -> Figures:
    """fp32 vs int8 ONNX model files on test inputs x (N, *in_shape) with labels y (N,)."""
    sessions = [onnx_session(fp32, threads), onnx_session(int8, threads)]
    ref, got = (onnx_logits(s, x, batch_size) for s in sessions)
    pred_ref, pred_got = ref.argmax(-1), got.argmax(-1)
    batch = np.resize(x, (batch_size, *x.shape[1:])) if len(x) < batch_size else x[:batch_size]
    speed = side_by_side_throughput(sessions, np.ascontiguousarray(batch), rounds)
    return Figures(
        n=int(len(y)),
        accuracy_fp32=100 * float(np.mean(pred_ref == y)),
        accuracy_int8=100 * float(np.mean(pred_got == y)),
        agreement=100 * float(np.mean(pred_ref == pred_got)),
        max_abs_diff=float(np.max(np.abs(ref.astype(np.float64) - got))),
        size_fp32=fp32.stat().st_size,
        size_int8=int8.stat().st_size,
        batch_size=int(batch_size),
        rounds=int(rounds),
        throughput_fp32=float(speed[0]),
        throughput_int8=float(speed[1]),
    )


def check_bounds(figures: Figures, mode: str, max_accuracy_drop: float, min_agreement: float) -> None:
    """Raise ParityError (exit 2) naming the first figure out of its bound. A figure equal to its bound passes
    (compared at 1e-6 points, so that 95.0 − 94.0 computed in floats is not 1.0000000000000142 > 1)."""
    where = f"export --quantize {mode}"
    if round(figures.accuracy_drop - max_accuracy_drop, 6) > 0:
        raise ParityError(
            f"{where}: accuracy drop {figures.accuracy_drop:.2f} points (fp32 {figures.accuracy_fp32:.2f}% → int8 "
            f"{figures.accuracy_int8:.2f}% on {figures.n} test examples) exceeds --max-accuracy-drop "
            f"{max_accuracy_drop:g}; nothing was written"
        )
    if round(min_agreement - figures.agreement, 6) > 0:
        raise ParityError(
            f"{where}: agreement with fp32 {figures.agreement:.2f}% on {figures.n} test examples is below "
            f"--min-agreement {min_agreement:g}; nothing was written"
        )


# --- the whole export --------------------------------------------------------------------------------------------


def export_quantized(
    run_dir: str | Path,
    mode: str,
    out: str | Path | None = None,
    *,
    calibration_examples: int = CALIBRATION_EXAMPLES,
    max_accuracy_drop: float = MAX_ACCURACY_DROP,
    min_agreement: float = MIN_AGREEMENT,
    batch_size: int | None = None,
    rounds: int = 5,
    threads: int | None = THREADS,
    seed: int = 0,
    log: Callable[[str], None] = lambda message: None,
) -> QuantizedExport:
    """Quantize the student of `run_dir` (`mode`: a key of QUANTIZERS) into `out` (default
    RUN_DIR/export/onnx-<mode>), measured against the fp32 ONNX student on the test split. batch_size: of the
    throughput figure (None: the run's eval.batch_size, the report's); threads: ONNX Runtime's intra-op threads
    of the measurement (None: its own choice, one per core)."""
    _check_options(mode, calibration_examples, max_accuracy_drop, min_agreement)
    try:
        import onnxruntime.quantization  # noqa: F401
    except ImportError:
        raise ConfigError("--quantize: 'onnxruntime' is not installed (pip install 'kdkit[onnx]')") from None
    from kdkit.export import check_out  # the package's own check of --out; the package never imports this module

    run = open_run(run_dir)
    final = Path(out) if out is not None else run.run_dir / "export" / f"onnx-{mode}"
    check_out(final, run)
    data = run_data(run)
    if data.modality != "tensor":
        raise ConfigError(
            f"--quantize: the student reads {data.modality} (token ids); int8 export covers students with float "
            "inputs (images, feature vectors: builtin mlp, small_cnn, resnet); use --format onnx or hf for it"
        )
    calibration = calibration_inputs(data, calibration_examples, seed)
    x_test, y_test = (t.numpy() for t in data.inputs("test"))
    x_test = np.ascontiguousarray(x_test, dtype=np.float32)
    batch_size = int(batch_size or run.cfg.eval.batch_size)

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        with tempfile.TemporaryDirectory(prefix="kdkit-quantize-") as scratch:
            scratch = Path(scratch)
            _, parity = export_onnx(run.student, dict(run.spec), torch.from_numpy(x_test[:PARITY_INPUTS]), scratch)
            prepared = _preprocess(scratch / "model.onnx", scratch / "model.prep.onnx")
            settings = QUANTIZERS[mode](prepared, tmp / "model.onnx", calibration)
            settings["preprocess"] = "quant_pre_process" if prepared != scratch / "model.onnx" else "none"
            log(
                f"export: quantized ({settings['method']}; weights {settings['weights']}; calibration: "
                f"{settings['calibration']}); measuring against fp32 on the test split"
            )
            figures = measure(scratch / "model.onnx", tmp / "model.onnx", x_test, y_test, batch_size, rounds, threads)
        log(f"export: {figures.line()}")
        check_bounds(figures, mode, max_accuracy_drop, min_agreement)
        names = list(data.class_names)
        if len(names) != run.num_classes:
            names = [str(i) for i in range(run.num_classes)]
        record = _record(run, names, mode, settings, figures, parity, (max_accuracy_drop, min_agreement), seed, threads)
        _write_folder(tmp, final, run, mode, record, parity)
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    listed = sorted(str(p.relative_to(final)) for p in final.rglob("*") if p.is_file())
    return QuantizedExport(final, mode, settings, figures, listed)


def _write_folder(tmp: Path, final: Path, run: Run, mode: str, record: dict, parity: Parity) -> None:
    """model.json, README.md (the model card with its int8 section) and export.json next to tmp/model.onnx."""
    onnx_io = {"input": INPUT_NAME, "output": OUTPUT_NAME, "opset": ONNX_OPSET, "quantize": mode}
    write_json(tmp / "model.json", {**run.spec, "onnx": onnx_io})
    preprocess = copy_preprocess(run.run_dir / "student", tmp)  # how raw inputs become model inputs, if recorded
    card = model_card(
        fmt="onnx",
        path=final,
        run_dir=run.run_dir,
        run_name=run.cfg.run.name,
        spec=run.spec,
        metrics=run.metrics(),
        class_names=record["class_names"],
        parity=parity,
        parity_source="test split",
        files=["model.onnx", "model.json", *preprocess],
        provenance=record["provenance"],
        quantization=record["quantization"],
    )
    write_text(tmp / "README.md", card)
    write_json(tmp / "export.json", record)


def calibration_inputs(data: DataBundle, n: int, seed: int = 0) -> np.ndarray:
    """n training inputs (all of them when the split is smaller), a seeded random sample so that every class is
    likely there even when the files are sorted by class; float32 (n, *in_shape)."""
    order = np.random.default_rng(seed).permutation(len(data.train))[:n]
    x = data.collate([data.train[int(i)] for i in order]).inputs
    return np.ascontiguousarray(x.float().numpy(), dtype=np.float32)


def _preprocess(fp32: Path, out: Path) -> Path:
    """quant_pre_process (symbolic shape inference, ONNX Runtime's basic graph optimisations, ONNX shape inference)
    into `out`; the fp32 file itself when it fails (a graph the symbolic inference cannot follow)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(fp32), str(out))
    except Exception:  # noqa: BLE001 - preprocessing is an optimisation; quantization works without it
        return fp32
    return out


def _check_options(mode: str, calibration_examples: int, max_accuracy_drop: float, min_agreement: float) -> None:
    if mode not in QUANTIZERS:
        raise ConfigError(
            f"--quantize: unknown mode {mode!r}{suggest(mode, list(QUANTIZERS))}; expected one of: "
            f"{', '.join(QUANTIZERS)}"
        )
    if calibration_examples < 1:
        raise ConfigError(f"--calibration-examples: {calibration_examples}; expected a positive number of examples")
    if not (math.isfinite(max_accuracy_drop) and -100 <= max_accuracy_drop <= 100):
        raise ConfigError(f"--max-accuracy-drop: {max_accuracy_drop}; expected points of accuracy in [-100, 100]")
    if not (math.isfinite(min_agreement) and 0 <= min_agreement <= 100):
        raise ConfigError(f"--min-agreement: {min_agreement}; expected a percentage in [0, 100]")


def _record(
    run: Run,
    class_names: list[str],
    mode: str,
    settings: dict,
    figures: Figures,
    parity: Parity,
    bounds: tuple[float, float],
    seed: int,
    threads: int | None,
) -> dict:
    """export.json: the export_run record of an onnx export, plus "quantization" (settings, bounds, figures)."""
    import onnxruntime

    from kdkit.export import _kdkit_version

    return {
        "format": "onnx",
        "quantize": mode,
        "run_dir": str(run.run_dir),
        "student_sha256": run.student_sha256(),
        "in_shape": list(run.in_shape),
        "num_classes": run.num_classes,
        "class_names": class_names,
        "parity": {
            "of": "the fp32 ONNX model quantized here, against eager PyTorch",
            "max_abs_diff": parity.max_abs_diff,
            "label_agreement": parity.label_agreement,
            "inputs": parity.n,
            "source": "test split",
            "tolerance": FP32_TOLERANCE,
        },
        "quantization": {
            **settings,
            "calibration_seed": seed,
            "bounds": {"max_accuracy_drop": bounds[0], "min_agreement": bounds[1]},
            "passed": True,
            **figures.as_dict(),
            "machine": f"{_cpu_name()}, {_threads(threads)}",
        },
        "provenance": {
            "kdkit": _kdkit_version(),
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version(),
            "exported": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "student weights sha256": run.student_sha256(),
            "onnx opset": ONNX_OPSET,
        },
    }


def _cpu_name() -> str:
    """The CPU model (Linux: /proc/cpuinfo), else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine() or "unknown CPU"


def _threads(threads: int | None) -> str:
    if not threads:
        return "ONNX Runtime's default threads"
    return f"{threads} ONNX Runtime thread{'s' if threads > 1 else ''}"


def _mb(size: int) -> str:
    return f"{size / 1e6:.3g}"
