"""Prometheus metrics through Ray's metrics API (scraped from each node's metrics export port, prefixed `ray_`)."""

from __future__ import annotations

from ray.util import metrics

LATENCY_BOUNDARIES_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000]


class IngressMetrics:
    def __init__(self) -> None:
        self.active_sessions = metrics.Gauge("da3_active_streams", "open WebSocket streams in this replica")
        self.frames_in = metrics.Counter("da3_frames_in_total", "frames accepted")
        self.frames_out = metrics.Counter("da3_frames_out_total", "frames processed (results committed)")
        self.errors = metrics.Counter("da3_errors_total", "errors sent to clients, by code", tag_keys=("code",))
        self.window_latency = metrics.Histogram(
            "da3_window_latency_ms", "first frame received -> window committed", boundaries=LATENCY_BOUNDARIES_MS)
        self.model_latency = metrics.Histogram(
            "da3_model_roundtrip_ms", "window sent to model -> prediction back", boundaries=LATENCY_BOUNDARIES_MS)


class ModelMetrics:
    def __init__(self) -> None:
        self.batch_size = metrics.Histogram("da3_batch_size", "windows per forward pass",
                                            boundaries=[1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64])
        self.forward_ms = metrics.Histogram("da3_forward_ms", "model forward time per batch",
                                            boundaries=LATENCY_BOUNDARIES_MS)
        self.failures = metrics.Counter("da3_model_failures_total", "windows that failed in the model")
