"""Serving: the student behind an HTTP API (app.py), its metrics (metrics.py), and shadow monitoring against the
teacher (shadow.py). Needs the `serve` extra: pip install 'kdkit[serve]'."""

from __future__ import annotations

from kdkit.serve.app import build_app, create_app, parse_inputs, serve
from kdkit.serve.shadow import ShadowMonitor, load_disagreements

__all__ = ["ShadowMonitor", "build_app", "create_app", "load_disagreements", "parse_inputs", "serve"]
