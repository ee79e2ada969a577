"""`kdkit serve` under load on loopback: requests/s and latency percentiles of the PyTorch, ONNX Runtime (fp32) and
int8 ONNX Runtime backends (and PyTorch with shadow monitoring at rate 0.1), each a real uvicorn server in its own
process (the int8 one quantizes the student as `kdkit export --quantize int8` does, when it starts); and, with
--inputs, raw PNG requests (base64 in JSON, or a multipart upload) against tensor requests on the same server.

Method: train a small run (MNIST-5k, a small-CNN teacher, an MLP 784→64→10 student) in a temp folder unless --run
is given; start one server per configuration on 127.0.0.1 (free ports, token required); warm each up; then
alternate the configurations A B C, C B A, ... (--rounds), each time sending --requests POST /predict requests of
one example at --concurrency, and report the median over rounds of each figure. Each configuration is measured
with every kind of request in --inputs (tensor: the preprocessed example as JSON numbers; png: {"images": [base64
PNG]}; png-multipart: the PNG as a multipart/form-data file), alternated the same way; the PNGs are the same
held-out test images as stored by the data set (the run's student/preprocess.json undone, whole pixel values).
The client is a minimal asyncio HTTP/1.1 client in this process (see `load`). Latency is measured by the client
(send to full answer), so it includes HTTP and JSON on both sides; the server's own mean time per request comes
from its latency histogram.
The client shares the machine's cores with the server: figures are for the pair, as a user on the same box sees.

    python bench/serve.py                 # prints one JSON object on stdout (~1-2 min on 2 cores)
    python bench/serve.py --write         # and appends a dated section to docs/benchmarks.md
    python bench/serve.py --quick         # a seconds-long smoke run on digits; figures mean nothing
    python bench/serve.py --configs torch --inputs tensor,png,png-multipart   # PNG vs tensor requests/s

Loopback only, bounded: a fixed number of requests per round, a timeout per request and for the servers to come
up, and every server is stopped at the end (also on errors).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import io
import json
import os
import platform
import secrets
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parent.parent
try:  # the other bench scripts' shared header (how to read the document), when this runs beside them
    from common import DOCS_HEADER
except ImportError:
    DOCS_HEADER = "# kdkit benchmarks\n"
REQUEST_TIMEOUT_S = 30.0
STARTUP_TIMEOUT_S = 180.0
CONFIGS = {  # name: (backend, shadow rate)
    "torch": ("torch", 0.0),
    "onnx": ("onnx", 0.0),
    "onnx-int8": ("onnx-int8", 0.0),  # the static int8 student; the server quantizes it at start when needed
    "torch+shadow0.1": ("torch", 0.1),
}
INPUT_KINDS = ("tensor", "png", "png-multipart")
JSON = "application/json"
BOUNDARY = "kdkit-bench-boundary"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def loadavg() -> list[float]:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def make_run(base: Path, quick: bool) -> Path:
    """A finished run to serve: small and quick to train; the serving figures do not depend on its accuracy."""
    from kdkit.config import load_config
    from kdkit.pipeline import distill

    config = {
        "run": {"name": "bench-serve", "seeds": [0], "progress": False, "tensorboard": False},
        "data": {"source": "builtin", "name": "digits" if quick else "mnist5k", "limit": 400 if quick else None},
        "teacher": {
            "members": [{"model": {"name": "small_cnn", "kwargs": {"width": 4 if quick else 8}}}],
            "train": {"epochs": 1, "batch_size": 64},
        },
        "student": {"model": {"name": "mlp", "kwargs": {"hidden": [64]}}, "baseline": False},
        "distill": {"cache_teacher": True, "cache_dir": str(base / "cache")},
        "train": {"epochs": 1 if quick else 2, "batch_size": 64},
        "eval": {"latency_repeats": 2, "latency_warmup": 0},
    }
    out = base / "run"
    distill(load_config(config), out=out, log=lambda m: None)
    return out


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m kdkit serve RUN_DIR` on 127.0.0.1 in a child process."""

    def __init__(self, run_dir: Path, backend: str, shadow_rate: float, threads: int | None, token: str, logs: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "kdkit", "serve", str(run_dir), "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--backend", backend, "--shadow-rate", str(shadow_rate), "--no-access-log"]
        if threads:
            cmd += ["--threads", str(threads)]
        env = {**os.environ, "KDKIT_API_TOKEN": token}
        env.pop("KDKIT_DEBUG", None)
        self.log_path = logs
        self.log_file = open(logs, "wb")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(cmd, stdout=self.log_file, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        self.cmd = cmd

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server on port {self.port} not up after {STARTUP_TIMEOUT_S:.0f} s")

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # uvicorn shuts down gracefully on SIGINT
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log_file.close()
        return self.proc.returncode


def stored_pixels(x: np.ndarray, description: dict) -> np.ndarray:
    """Preprocessed images (B, C, H, W) back to the whole pixel values the data set stores (uint8, (B, H, W[, C]))."""
    mean = np.asarray(description["mean"], dtype=np.float64).reshape(-1, 1, 1)
    std = np.asarray(description["std"], dtype=np.float64).reshape(-1, 1, 1)
    pixels = np.rint((x.astype(np.float64) * std + mean) * description["scale"]).clip(0, 255).astype(np.uint8)
    return pixels[:, 0] if pixels.shape[1] == 1 else pixels.transpose(0, 2, 3, 1)


def png_bytes(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def request_bodies(kind: str, inputs: np.ndarray, description: dict | None) -> tuple[list[bytes], str]:
    """One-example /predict bodies of `kind` for the held-out inputs, and their Content-Type."""
    if kind == "tensor":
        return [json.dumps({"inputs": [x.round(5).tolist()]}).encode() for x in inputs], JSON
    if description is None or description.get("kind") != "image":
        raise SystemExit(f"--inputs {kind}: the run's student/preprocess.json is missing or not for images")
    pngs = [png_bytes(p) for p in stored_pixels(inputs, description)]
    if kind == "png":
        return [json.dumps({"images": [base64.b64encode(b).decode()]}).encode() for b in pngs], JSON
    head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
    head += "Content-Type: image/png\r\n\r\n"
    bodies = [head.encode() + b + f"\r\n--{BOUNDARY}--\r\n".encode() for b in pngs]
    return bodies, f"multipart/form-data; boundary={BOUNDARY}"


async def load(
    url: str, bodies: list[bytes], n: int, concurrency: int, token: str, content_type: str = JSON
) -> dict:
    """Send n requests (cycling through bodies) over `concurrency` keep-alive connections; per-request latency.

    The client is a minimal asyncio HTTP/1.1 client (one connection per worker, Content-Length framing, which is
    how uvicorn answers): httpx costs ~5 ms of CPU per request at this concurrency, as much as the server, and on
    2 shared cores the client would measure itself. Each answer's status and JSON are checked."""
    host, port = url.removeprefix("http://").split(":")
    latencies: list[float] = []
    errors: list[str] = []
    next_index = 0

    def request(body: bytes) -> bytes:
        head = (
            f"POST /predict HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body

    requests = [request(b) for b in bodies]

    async def exchange(reader, writer, payload: bytes) -> tuple[int, bytes, bool]:
        writer.write(payload)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        body = await reader.readexactly(int(fields.get("content-length", "0")))
        return status, body, fields.get("connection", "").lower() == "close"

    async def worker() -> None:
        nonlocal next_index
        reader = writer = None
        while next_index < n:
            i = next_index
            next_index += 1
            started = time.perf_counter()
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(host, int(port))
                status, body, close = await asyncio.wait_for(
                    exchange(reader, writer, requests[i % len(requests)]), REQUEST_TIMEOUT_S
                )
                if close:
                    writer.close()
                    reader = writer = None
                if status != 200:
                    errors.append(f"HTTP {status}: {body[:200]!r}")
                    continue
                if "labels" not in json.loads(body):
                    errors.append(f"answer without labels: {body[:200]!r}")
                    continue
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                if writer is not None:
                    writer.close()
                reader = writer = None
                continue
            latencies.append(time.perf_counter() - started)
        if writer is not None:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    ms = np.array(latencies) * 1000.0
    return {
        "requests": n,
        "errors": len(errors),
        "error_examples": errors[:3],
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(latencies) / wall, 1) if wall > 0 else None,
        "p50_ms": round(float(np.percentile(ms, 50)), 3) if len(ms) else None,
        "p99_ms": round(float(np.percentile(ms, 99)), 3) if len(ms) else None,
        "mean_ms": round(float(ms.mean()), 3) if len(ms) else None,
    }


def server_counts(url: str, token: str) -> dict:
    """What the server itself counted (its /metrics), to cross-check the client."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=5.0).text
    counts = {"predict_200": 0.0, "predict_errors": 0.0, "latency_sum_s": 0.0, "latency_count": 0.0}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "kdkit_requests_total" and s.labels.get("endpoint") == "/predict":
                key = "predict_200" if s.labels.get("status") == "200" else "predict_errors"
                counts[key] += s.value
            elif s.name == "kdkit_request_latency_seconds_sum" and s.labels.get("endpoint") == "/predict":
                counts["latency_sum_s"] = s.value
            elif s.name == "kdkit_request_latency_seconds_count" and s.labels.get("endpoint") == "/predict":
                counts["latency_count"] = s.value
            elif s.name in ("kdkit_shadow_scored_examples_total", "kdkit_shadow_dropped_requests_total"):
                counts[s.name.removeprefix("kdkit_").removesuffix("_total")] = s.value
            elif s.name == "kdkit_shadow_agreement":
                counts["shadow_agreement"] = s.value
    return counts


def run(args: argparse.Namespace) -> dict:
    import torch

    import kdkit
    from kdkit.data.preprocess import load_preprocess
    from kdkit.export import held_out, open_run

    load_before = loadavg()
    with tempfile.TemporaryDirectory(prefix="kdkit-bench-serve-") as tmp:
        base = Path(tmp)
        if args.run:
            run_dir = Path(args.run)
        else:
            log(f"training a small run to serve ({'digits' if args.quick else 'mnist5k'}, small-CNN teacher → MLP)")
            run_dir = make_run(base, args.quick)
        inputs = held_out(open_run(run_dir), 64).inputs.numpy()
        description = load_preprocess(run_dir / "student")
        requests = {kind: request_bodies(kind, inputs, description) for kind in args.inputs}
        token = secrets.token_hex(16)
        servers_named = [c for c in CONFIGS if c in args.configs]
        # One measurement per (server, kind of request); the tensor one keeps the server's own name.
        measures = {(n if k == "tensor" else f"{n}/{k}"): (n, k) for n in servers_named for k in args.inputs}
        names = list(measures)
        servers: dict[str, Server] = {}
        try:
            for name in servers_named:
                backend, rate = CONFIGS[name]
                servers[name] = Server(run_dir, backend, rate, args.threads, token, base / f"{name}.log")
            for name, server in servers.items():
                server.wait_ready()
                log(f"{name}: up on {server.url}")
                for kind in args.inputs:
                    bodies, content_type = requests[kind]
                    warm = asyncio.run(load(server.url, bodies, args.warmup, args.concurrency, token, content_type))
                    if warm["errors"]:
                        raise RuntimeError(f"{name} {kind}: warm-up errors: {warm['error_examples']}")
            rounds: dict[str, list[dict]] = {name: [] for name in names}
            for r in range(args.rounds):
                order = names if r % 2 == 0 else names[::-1]
                for name in order:
                    server_name, kind = measures[name]
                    server = servers[server_name]
                    bodies, content_type = requests[kind]
                    before = server_counts(server.url, token)
                    result = asyncio.run(
                        load(server.url, bodies, args.requests, args.concurrency, token, content_type)
                    )
                    after = server_counts(server.url, token)
                    handled = after["latency_count"] - before["latency_count"]
                    server_s = after["latency_sum_s"] - before["latency_sum_s"]
                    result["server_mean_ms"] = round(1000 * server_s / handled, 3) if handled else None
                    result["loadavg_after"] = loadavg()
                    rounds[name].append(result)
                    log(
                        f"round {r + 1} {name}: {result['requests_per_s']} req/s, p50 {result['p50_ms']} ms, "
                        f"p99 {result['p99_ms']} ms, {result['errors']} errors"
                    )
            counted = {name: server_counts(servers[measures[name][0]].url, token) for name in names}
        finally:
            exits = {name: s.stop() for name, s in servers.items()}
        body_bytes = {kind: int(np.median([len(b) for b in requests[kind][0]])) for kind in args.inputs}
        in_shape = list(inputs.shape[1:])
    results = {}
    for name in names:
        rs = rounds[name]
        results[name] = {
            "requests_per_s": statistics.median(x["requests_per_s"] for x in rs),
            "p50_ms": statistics.median(x["p50_ms"] for x in rs),
            "p99_ms": statistics.median(x["p99_ms"] for x in rs),
            "server_mean_ms": statistics.median(x["server_mean_ms"] for x in rs),
            "errors": sum(x["errors"] for x in rs),
            "requests": sum(x["requests"] for x in rs),
            "rounds": rs,
            "server_counted": counted[name],
            "server_exit_code": exits[measures[name][0]],
            "inputs": measures[name][1],
            "body_bytes": body_bytes[measures[name][1]],
        }
    ratio = _ratio(rounds, "onnx", "torch")
    over_torch = {n: _ratio(rounds, n, "torch") for n in servers_named if n != "torch" and "torch" in rounds}
    png_ratio = {}
    for name, (server_name, kind) in measures.items():
        if kind != "tensor" and server_name in results:  # raw images vs tensors, the same server, the same rounds
            per_round = [p["requests_per_s"] / t["requests_per_s"] for p, t in zip(rounds[name], rounds[server_name])]
            png_ratio[name] = round(statistics.median(per_round), 3)
    return {
        "benchmark": "serve",
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "quick": args.quick,
        "settings": {
            "requests_per_round": args.requests,
            "concurrency": args.concurrency,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "examples_per_request": 1,
            "input_shape": in_shape,
            "inputs": list(args.inputs),
            "body_bytes": body_bytes.get("tensor", next(iter(body_bytes.values()))),
            "body_bytes_by_inputs": body_bytes,
            "server_threads": args.threads,
            "run": str(args.run) if args.run else "trained here (MLP 784→64→10 student)",
        },
        "machine": {
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "onnxruntime": _version("onnxruntime"),
            "fastapi": _version("fastapi"),
            "uvicorn": _version("uvicorn"),
            "kdkit": kdkit.__version__,
            "loadavg_before": load_before,
            "loadavg_after": loadavg(),
        },
        "results": results,
        "onnx_over_torch_requests_per_s": ratio,
        "over_torch_requests_per_s": over_torch,
        "int8_over_onnx_requests_per_s": _ratio(rounds, "onnx-int8", "onnx"),
        "raw_over_tensor_requests_per_s": png_ratio,
        "command": "python bench/serve.py " + " ".join(shlex.quote(a) for a in args.argv),
    }


def _ratio(rounds: dict[str, list[dict]], a: str, b: str) -> float | None:
    """Median over rounds of a's requests/s ÷ b's (measured side by side in each round); None without both."""
    if a not in rounds or b not in rounds:
        return None
    return round(statistics.median(x["requests_per_s"] / y["requests_per_s"] for x, y in zip(rounds[a], rounds[b])), 3)


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "not installed"


def section(result: dict) -> str:
    s, m = result["settings"], result["machine"]
    lines = [
        f"## Serving: kdkit serve under load ({result['date']})",
        "",
        f"Student: {s['run']}. {s['rounds']} round{'s' if s['rounds'] != 1 else ''} × "
        f"{s['requests_per_round']:,} POST /predict requests of one example "
        f"(input {'×'.join(map(str, s['input_shape']))}; requests: {', '.join(s.get('inputs', ['tensor']))}, "
        "body sizes in the table) at concurrency "
        f"{s['concurrency']}, client and server on loopback on the same machine; each configuration is its own "
        f"uvicorn process (server threads: {s['server_threads'] or 'default'}); medians over rounds, configurations "
        "alternated. Latency is the client's (a minimal asyncio HTTP/1.1 client, keep-alive connections: send → "
        "full answer); server mean ms is the server's own time per request (its latency histogram: request start → "
        "response start), the rest is queueing at concurrency 16 on 2 cores shared with the client.",
        "",
        "| configuration | request | body bytes | requests/s | p50 ms | p99 ms | server mean ms | errors | requests |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for name, r in result["results"].items():
        lines.append(
            f"| {name.split('/')[0]} | {r['inputs']} | {r['body_bytes']:,} | {r['requests_per_s']:,.1f} | "
            f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['server_mean_ms']:.2f} | {r['errors']} | {r['requests']:,} |"
        )
    lines.append("")
    for name, value in result.get("raw_over_tensor_requests_per_s", {}).items():
        tensor = name.split("/")[0]
        lines.append(f"{name} ÷ {tensor} (tensor) requests/s (median of per-round ratios): **{value:.3f}**.")
    if result["onnx_over_torch_requests_per_s"] is not None:
        lines.append(
            f"ONNX Runtime ÷ PyTorch requests/s (median of per-round ratios): "
            f"**{result['onnx_over_torch_requests_per_s']:.3f}**."
        )
    if result.get("int8_over_onnx_requests_per_s") is not None:
        lines.append(
            f"int8 ONNX Runtime ÷ fp32 ONNX Runtime requests/s (median of per-round ratios): "
            f"**{result['int8_over_onnx_requests_per_s']:.3f}**."
        )
    shadow = result["results"].get("torch+shadow0.1", {}).get("server_counted", {})
    if "shadow_scored_examples" in shadow:
        lines.append(
            f"Shadow at rate 0.1: the teacher scored {shadow['shadow_scored_examples']:.0f} examples off the request "
            f"path ({shadow.get('shadow_dropped_requests', 0):.0f} dropped by a full queue)."
        )
    lines += [
        "",
        f"Machine: {m['cores']} cores; Python {m['python']}, torch {m['torch']}, onnxruntime {m['onnxruntime']}, "
        f"fastapi {m['fastapi']}, uvicorn {m['uvicorn']}. /proc/loadavg before {m['loadavg_before']}, after "
        f"{m['loadavg_after']} (the machine is shared; the load after includes this bench).",
        "",
        f"Reproduce: `{result['command']}`",
    ]
    return "\n".join(lines)


def append_section(path: Path, text: str) -> None:
    """Append only (other bench scripts append to the same file): never rewrite what is there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        if fh.tell() == 0:
            fh.write(DOCS_HEADER)
        fh.write("\n" + text.strip("\n") + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, default=None, help="serve this run directory (default: train a small one)")
    p.add_argument("--requests", type=int, default=None, help="requests per round (default 1000)")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight (default 16)")
    p.add_argument("--rounds", type=int, default=None, help="rounds per configuration (default 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed requests per server first (default 100)")
    p.add_argument("--threads", type=int, default=1, help="server CPU threads (kdkit serve --threads; default 1)")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {', '.join(CONFIGS)}")
    p.add_argument(
        "--inputs", default="tensor", help=f"kinds of request, comma-separated subset of {', '.join(INPUT_KINDS)}"
    )
    p.add_argument("--quick", action="store_true", help="digits, 100 requests, 1 round: a smoke run")
    p.add_argument("--write", action="store_true", help="append a dated section to --docs")
    p.add_argument("--docs", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.requests = args.requests or (100 if args.quick else 1000)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.warmup = args.warmup if args.warmup is not None else (10 if args.quick else 100)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        p.error(f"--configs: unknown {', '.join(unknown)}; expected some of {', '.join(CONFIGS)}")
    args.inputs = [k.strip() for k in args.inputs.split(",") if k.strip()]
    unknown = [k for k in args.inputs if k not in INPUT_KINDS]
    if unknown or not args.inputs:
        p.error(f"--inputs: unknown {', '.join(unknown) or 'none given'}; expected some of {', '.join(INPUT_KINDS)}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    result = run(args)
    print(json.dumps(result, indent=2))
    if args.write:
        append_section(args.docs, section(result))
        log(f"appended a section to {args.docs}")
    return result


if __name__ == "__main__":
    main()
