"""Prometheus metrics of one server, in its own registry (two apps in one process do not share counters).

  kdkit_requests_total{endpoint, status}       counter    HTTP requests by route and status code
  kdkit_request_latency_seconds{endpoint}      histogram  time from request start to response start
  kdkit_errors_total{reason}                   counter    4xx/5xx answers by reason (bad_json, bad_input, ...)
  kdkit_predicted_examples_total               counter    examples scored by the student
with shadow monitoring on:
  kdkit_shadow_agreement                       gauge      student/teacher top-1 agreement over the window (NaN: empty)
  kdkit_shadow_window_examples                 gauge      examples in the window
  kdkit_shadow_rate, kdkit_shadow_threshold    gauge      the settings
  kdkit_shadow_scored_examples_total           counter    examples the teacher scored
  kdkit_shadow_disagreements_total             counter    ... on which teacher and student disagreed
  kdkit_shadow_dropped_requests_total          counter    sampled requests dropped because the queue was full
  kdkit_shadow_alerts_total                    counter    times the agreement fell below the threshold
  kdkit_shadow_written_examples_total          counter    disagreeing inputs written for re-distillation
  kdkit_shadow_failures_total                  counter    shadow batches the teacher failed on
"""

from __future__ import annotations

import math
from collections.abc import Callable

from kdkit.errors import ConfigError

try:
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
except ImportError:  # the serve extra is optional
    raise ConfigError("serve: prometheus-client is not installed (pip install 'kdkit[serve]')") from None

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
ENDPOINTS = ("/predict", "/health", "/metrics")


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "kdkit_requests",
            "HTTP requests by endpoint and status code.",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "kdkit_request_latency_seconds",
            "Time from request start to response start, by endpoint.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.errors = Counter("kdkit_errors", "Error answers (4xx, 5xx) by reason.", ["reason"], registry=self.registry)
        self.examples = Counter("kdkit_predicted_examples", "Examples scored by the student.", registry=self.registry)

    def watch_shadow(self, stats: Callable[[], dict]) -> None:
        """Expose a ShadowMonitor's stats() (read at scrape time)."""
        self.registry.register(_ShadowCollector(stats))

    def observe(self, path: str, status: int, seconds: float) -> None:
        endpoint = path if path in ENDPOINTS else "other"  # unknown paths share one label: bounded cardinality
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _ShadowCollector:
    def __init__(self, stats: Callable[[], dict]):
        self.stats = stats

    def collect(self):
        s = self.stats()
        agreement = s["agreement"]
        yield GaugeMetricFamily(
            "kdkit_shadow_agreement",
            "Top-1 agreement of student and teacher over the sliding window (NaN before any example).",
            value=math.nan if agreement is None else agreement,
        )
        yield GaugeMetricFamily("kdkit_shadow_window_examples", "Examples in the window.", value=s["window_examples"])
        yield GaugeMetricFamily("kdkit_shadow_rate", "Share of requests sent to the teacher.", value=s["rate"])
        yield GaugeMetricFamily("kdkit_shadow_threshold", "Alert threshold of the agreement.", value=s["threshold"])
        for key, help_text in (
            ("scored_examples", "Examples the teacher scored."),
            ("disagreements", "Scored examples on which teacher and student disagreed."),
            ("dropped_requests", "Sampled requests dropped because the shadow queue was full."),
            ("alerts", "Times the agreement fell below the threshold."),
            ("written_examples", "Disagreeing inputs written for re-distillation."),
            ("failures", "Shadow batches the teacher failed on."),
        ):
            yield CounterMetricFamily(f"kdkit_shadow_{key}", help_text, value=s[key])
