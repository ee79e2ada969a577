"""The HTTP server of a distilled student (FastAPI on uvicorn).

    POST /predict   one of, as JSON:
                      {"inputs": [example, ...]}  each example a nested list shaped like the model input
                      {"images": [base64, ...]}   PNG or JPEG files, base64 (image students)
                      {"texts": [string, ...]}    raw texts (text students)
                    or multipart/form-data with image files (any field name), or fields named "text"
                    → {"labels": [name, ...], "ids": [int, ...], "probabilities": [[float, ...], ...]}
    GET  /health    {"status": "ok", "backend": ..., "precision": ..., "accepts": [...], ...}; no token needed (for
                    liveness probes). An int8 backend adds "quantization": its method and test-split figures.
    GET  /metrics   Prometheus text format (see kdkit.serve.metrics)

"inputs" are what the model takes, preprocessed as in training (standardised features or pixels), batch first.
Images and texts are preprocessed by the server exactly as in training, from RUN_DIR/student/preprocess.json
(kdkit.serve.raw; its own 4xx reasons are listed there).
Every error is JSON {"error": message, "reason": short code} with a 4xx status, and the server keeps going:
    400 bad_json        the body is not JSON (NaN and Infinity literals included)
    401 unauthorized    a token is set (env var, default KDKIT_API_TOKEN) and the request lacks
                        "Authorization: Bearer <token>" or carries another one (/predict and /metrics)
    413 body_too_large  the body is larger than max_body_bytes
    413 batch_too_large more than max_batch examples in one request
    422 bad_input       not one of {"inputs"|"images"|"texts": [...]}, an empty batch, ragged lists, non-numbers
                        (strings, booleans, null), the wrong shape, or values that are not finite in float32
    404 / 405           unknown path or method
The server writes nothing but the shadow monitor's disagreement files under RUN_DIR/shadow/.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np

from kdkit.errors import ConfigError

try:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError:  # the serve extra is optional; say how to get it instead of a traceback
    raise ConfigError("serve: FastAPI is not installed (pip install 'kdkit[serve]')") from None

from kdkit.serve.errors import ApiError
from kdkit.serve.metrics import ServeMetrics
from kdkit.serve.raw import RawInputs, decode_base64, multipart_fields, raw_inputs_for
from kdkit.serve.shadow import ShadowMonitor

logger = logging.getLogger("kdkit.serve")

MAX_BODY_BYTES = 1 << 20  # 1 MiB: a batch of 256 MNIST-sized images as JSON numbers is about 1 MB
MAX_BATCH = 256
# A forward pass expected to take less than this runs on the event loop: handing it to the thread pool costs more
# (measured on 2 cores: ~0.5 ms of CPU per request and a 5x longer p99). Longer ones go to the thread pool so that
# the loop keeps accepting requests meanwhile.
INLINE_BUDGET_S = 0.002
# A body up to this size is parsed (JSON, images decoded, texts tokenised) on the event loop: an MNIST-sized PNG or
# a one-example tensor takes well under a millisecond. Larger ones (a batch of photos) are parsed in the thread pool.
INLINE_PARSE_BYTES = 64 * 1024
Logits = Callable[[np.ndarray], np.ndarray]
INPUT_FIELDS = ("inputs", "images", "texts")


def create_app(
    run_dir: str | Path,
    backend: str = "torch",
    shadow_rate: float = 0.0,
    alert_threshold: float = 0.9,
    window: int = 200,
    token_env: str = "KDKIT_API_TOKEN",
    max_body_bytes: int = MAX_BODY_BYTES,
    max_batch: int = MAX_BATCH,
    threads: int | None = None,
    seed: int | None = None,
    log: Callable[[str], None] = logger.info,
) -> FastAPI:
    """A server for the student of `run_dir`, scored by `backend` (a key of kdkit.serve.backends.BACKENDS: torch,
    onnx, onnx-int8, onnx-dynamic; /health says which, and its precision). With shadow_rate > 0 the
    teacher re-scores that share of requests off the request path (see kdkit.serve.shadow); disagreeing inputs go
    to RUN_DIR/shadow/disagreements/. The API token is read from the env var `token_env` now; unset or empty:
    no token is required."""
    from kdkit.export import open_run
    from kdkit.serve.backends import check_backend, class_names_of, student_backend, teacher_backend

    check_backend(backend)
    if not 0.0 <= shadow_rate <= 1.0:
        raise ConfigError(f"--shadow-rate: {shadow_rate}; expected a fraction in [0, 1]")
    if not 0.0 <= alert_threshold <= 1.0:
        raise ConfigError(f"--alert-threshold: {alert_threshold}; expected a fraction in [0, 1]")
    if window < 1 or max_batch < 1 or max_body_bytes < 1:
        raise ConfigError("--window, --max-batch and --max-body-bytes must be positive")
    run = open_run(run_dir)
    served = student_backend(run, backend, threads, log)
    raw = raw_inputs_for(run, log)
    names = class_names_of(run)
    shadow = None
    if shadow_rate > 0:
        shadow = ShadowMonitor(
            teacher_backend(run),
            rate=shadow_rate,
            window=window,
            threshold=alert_threshold,
            out_dir=run.run_dir / "shadow" / "disagreements",
            class_names=names,
            seed=seed,
        )
    info = {**served.info, "model": f"{run.spec.get('source')}/{run.spec.get('name')}", "run": run.cfg.run.name}
    return build_app(
        served.logits,
        names,
        run.in_shape,
        shadow=shadow,
        token=os.environ.get(token_env) or None,
        max_body_bytes=max_body_bytes,
        max_batch=max_batch,
        info=info,
        raw=raw,
    )


def build_app(
    predict: Logits,
    class_names: list[str],
    in_shape: tuple[int, ...],
    *,
    raw: RawInputs | None = None,
    shadow: ShadowMonitor | None = None,
    token: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_batch: int = MAX_BATCH,
    info: dict | None = None,
) -> FastAPI:
    """The app around any scoring function `predict` (inputs (B, *in_shape) float32 → logits (B, C)). `raw` turns
    images or texts into such inputs (kdkit.serve.raw); without it only tensors are taken."""
    raw = raw if raw is not None else RawInputs(None, why_not="no preprocessing was given to the app")
    metrics = ServeMetrics()
    if shadow is not None:
        metrics.watch_shadow(shadow.stats)
    in_shape = tuple(int(d) for d in in_shape)
    expected = "(batch, " + ", ".join(map(str, in_shape)) + ")"
    per_example_s = _seconds_per_example(predict, in_shape)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if shadow is not None:
            shadow.start()
        yield
        if shadow is not None:
            shadow.stop()

    app = FastAPI(title="kdkit student", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.metrics, app.state.shadow = metrics, shadow
    app.add_middleware(_Observe, metrics=metrics)

    _handle_errors(app, metrics)
    authorize = _authorizer(token)

    @app.post("/predict")
    async def predict_route(request: Request) -> JSONResponse:
        authorize(request)
        body = await _read_body(request, max_body_bytes)
        content_type = request.headers.get("content-type", "")
        if len(body) <= INLINE_PARSE_BYTES:
            x = parse_request(body, content_type, in_shape, expected, max_batch, raw)
        else:
            x = await run_in_threadpool(parse_request, body, content_type, in_shape, expected, max_batch, raw)
        if per_example_s * len(x) <= INLINE_BUDGET_S:
            logits = predict(x)
        else:
            logits = await run_in_threadpool(predict, x)
        probs = _softmax(logits)
        ids = probs.argmax(-1)
        metrics.examples.inc(len(ids))
        if shadow is not None:
            shadow.offer(x, ids)
        return JSONResponse(
            {
                "labels": [class_names[i] if i < len(class_names) else str(i) for i in ids.tolist()],
                "ids": ids.tolist(),
                "probabilities": probs.tolist(),
            }
        )

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse(
            {
                "status": "ok",
                **(info or {}),
                "input_shape": list(in_shape),
                "num_classes": len(class_names),
                "accepts": raw.accepts,
            }
        )

    @app.get("/metrics")
    async def metrics_route(request: Request) -> Response:
        authorize(request)
        text, content_type = metrics.render()
        return Response(text, media_type=content_type)

    return app


def _handle_errors(app: FastAPI, metrics: ServeMetrics) -> None:
    """Every error as a JSON body {error, reason} with its status, counted by reason in /metrics."""

    def error(status: int, reason: str, message: str, headers: dict | None = None) -> JSONResponse:
        metrics.errors.labels(reason).inc()
        return JSONResponse({"error": message, "reason": reason}, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return error(exc.status, exc.reason, exc.message, headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        reason = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error(exc.status_code, reason, str(exc.detail))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("serve: internal error on %s", request.url.path)
        return error(500, "internal", "internal error; the server logged it")


def _authorizer(token: str | None):
    """request → None, or ApiError 401 when a token is set and the request does not bear it."""

    def authorize(request: Request) -> None:
        if token is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
            raise ApiError(401, "unauthorized", "missing or wrong API token; send 'Authorization: Bearer <token>'")

    return authorize


def _seconds_per_example(predict: Logits, in_shape: tuple[int, ...]) -> float:
    """Median time of a one-example forward pass (after a warm-up); inf when it fails (then always the pool).
    A failure is logged with what happened: a model that cannot take an all-zero input still serves (it is only
    never run inline), but one that fails for another reason (out of memory, a broken export) is seen at start."""
    x = np.zeros((1, *in_shape), dtype=np.float32)
    times = []
    try:
        for i in range(7):
            start = time.perf_counter()
            predict(x)
            if i >= 2:
                times.append(time.perf_counter() - start)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        logger.warning(
            "serve: the start-up latency probe (an all-zero input of shape %s) failed with %s: %s; requests will "
            "always run in the worker pool, never inline",
            (1, *in_shape), type(exc).__name__, first,
        )
        return float("inf")
    return float(np.median(times))


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            too_big = int(declared) > limit
        except ValueError:
            raise ApiError(400, "bad_request", "Content-Length is not a number") from None
        if too_big:
            raise ApiError(413, "body_too_large", f"request body of {declared} bytes; the limit is {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():  # a chunked body has no Content-Length: count while reading
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "body_too_large", f"request body over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _no_constants(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def parse_request(
    body: bytes, content_type: str, in_shape: tuple[int, ...], expected: str, max_batch: int, raw: RawInputs
) -> np.ndarray:
    """A /predict body (JSON with inputs, images or texts; or multipart/form-data) → float32 array (B, *in_shape),
    or an ApiError saying what is wrong."""
    if content_type.split(";")[0].strip().lower() == "multipart/form-data":
        files, file_names, texts, text_names = multipart_fields(body, content_type)
        _check_batch("images" if files else "texts", files or texts, max_batch)
        return raw.images(files, file_names) if files else raw.texts(texts, text_names)
    payload = _json(body)
    given = [k for k in INPUT_FIELDS if k in payload] if isinstance(payload, dict) else []
    if len(given) != 1:
        raise ApiError(
            422, "bad_input",
            'expected a JSON object with one of {"inputs": [example, ...]}, {"images": [base64 PNG/JPEG, ...]} or '
            '{"texts": [string, ...]}',
        )  # fmt: skip
    field = given[0]
    if field == "inputs":
        return tensor_inputs(payload["inputs"], body, in_shape, expected, max_batch)
    items = payload[field]
    if not isinstance(items, list) or not items:
        raise ApiError(422, "bad_input", f"{field}: expected a non-empty list")
    _check_batch(field, items, max_batch)
    raw.require(field)
    names = [f"{field}[{i}]" for i in range(len(items))]
    if field == "images":
        return raw.images([decode_base64(item, name) for item, name in zip(items, names)], names)
    return raw.texts(items, names)


def parse_inputs(body: bytes, in_shape: tuple[int, ...], expected: str, max_batch: int) -> np.ndarray:
    """JSON body {"inputs": [...]} → float32 array (B, *in_shape), or an ApiError saying what is wrong."""
    payload = _json(body)
    if not isinstance(payload, dict) or "inputs" not in payload:
        raise ApiError(422, "bad_input", 'expected a JSON object {"inputs": [example, ...]}')
    return tensor_inputs(payload["inputs"], body, in_shape, expected, max_batch)


def _json(body: bytes):
    try:
        return json.loads(body, parse_constant=_no_constants)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "bad_json", f"the body is not valid JSON: {exc}".splitlines()[0]) from None


def _check_batch(field: str, items: list, max_batch: int) -> None:
    if len(items) > max_batch:
        raise ApiError(413, "batch_too_large", f"{field}: {len(items)} examples; the limit is {max_batch} per request")


def tensor_inputs(inputs, body: bytes, in_shape: tuple[int, ...], expected: str, max_batch: int) -> np.ndarray:
    """The "inputs" of a request → float32 array (B, *in_shape)."""
    if not isinstance(inputs, list) or not inputs:
        raise ApiError(422, "bad_input", f"inputs: expected a non-empty list of examples, shape {expected}")
    _check_batch("inputs", inputs, max_batch)
    try:
        arr = np.asarray(inputs)
    except (ValueError, TypeError):
        raise ApiError(422, "bad_input", f"inputs: ragged nested lists; expected shape {expected}") from None
    if arr.dtype.kind not in "iuf" or ((b"true" in body or b"false" in body) and _has_bool(inputs)):
        raise ApiError(
            422, "bad_input", f"inputs: expected numbers only (no strings, booleans or null) in shape {expected}"
        )
    if arr.shape[1:] != in_shape:
        got = "(" + ", ".join(map(str, arr.shape)) + ")"
        raise ApiError(422, "bad_input", f"inputs: shape {got}; expected {expected}")
    with np.errstate(over="ignore"):
        x = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ApiError(422, "bad_input", "inputs: every value must be a finite number within float32 range")
    return x


def _has_bool(value) -> bool:
    # numpy turns [true, 2] into [1, 2]; a boolean is no input value, so look for one (only when the body has one)
    if isinstance(value, list):
        return any(_has_bool(v) for v in value)
    return isinstance(value, bool)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


class _Observe:
    """ASGI middleware: count every HTTP request by endpoint and status and time it (to the response start)."""

    def __init__(self, app, metrics: ServeMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = {"code": 500}

        async def send_and_record(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                self.metrics.observe(scope["path"], status["code"], time.perf_counter() - start)
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        except Exception:
            if status["code"] == 500:
                self.metrics.observe(scope["path"], 500, time.perf_counter() - start)
            raise


def serve(
    run_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    backend: str = "torch",
    shadow_rate: float = 0.0,
    alert_threshold: float = 0.9,
    window: int = 200,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_batch: int = MAX_BATCH,
    threads: int | None = None,
    access_log: bool = True,
    token_env: str = "KDKIT_API_TOKEN",
) -> None:
    """Build the app and run it with uvicorn until interrupted. Binds to loopback unless `host` says otherwise."""
    import torch
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if threads:
        torch.set_num_threads(threads)
    app = create_app(
        run_dir,
        backend=backend,
        shadow_rate=shadow_rate,
        alert_threshold=alert_threshold,
        window=window,
        token_env=token_env,
        max_body_bytes=max_body_bytes,
        max_batch=max_batch,
        threads=threads,
    )
    if not _is_loopback(host) and not os.environ.get(token_env):
        logger.warning(
            "serve: listening on %s without an API token: anyone who can reach this address can query the model "
            "(set %s)",
            host,
            token_env,
        )
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=access_log)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
