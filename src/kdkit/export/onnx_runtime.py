"""ONNX Runtime sessions for exported students (parity checks here, the onnx backend of kdkit serve)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kdkit.errors import ConfigError


def onnx_session(path: str | Path, threads: int | None = None):
    """A CPU InferenceSession for `path`; `threads` sets intra-op threads (None: ONNX Runtime's choice)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ConfigError("onnx: 'onnxruntime' is not installed (pip install 'kdkit[onnx]')") from None
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable or invalid models
        raise ConfigError(f"onnx: could not load {str(path)!r}: {exc}".splitlines()[0]) from None


def run_session(session, x: np.ndarray) -> np.ndarray:
    """Logits (B, C) float32 for inputs (B, *in_shape); thread-safe (ONNX Runtime sessions may run concurrently)."""
    name = session.get_inputs()[0].name
    return session.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0]
