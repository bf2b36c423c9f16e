"""Prometheus metrics of one engine, in a registry of its own.

A registry per engine (not the global one) lets tests run several servers in
one process and read each one's numbers.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The engine's counters, gauges and histograms (names start with `dinov2_`)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("dinov2_requests", "RPCs and jobs answered, by method and status code.",
                                ["method", "code"], registry=r)  # fmt: skip
        self.images = Counter("dinov2_images", "Images answered, by outcome (ok or error type).", ["outcome"],
                              registry=r)  # fmt: skip
        self.in_flight = Gauge("dinov2_in_flight_images", "Images accepted and not yet answered.", registry=r)
        self.queue_depth = Gauge("dinov2_queue_depth", "Decoded images waiting for a batch.", registry=r)
        self.batch_size = Histogram("dinov2_batch_size", "Images per forward pass.", buckets=_BATCH_BUCKETS,
                                    registry=r)  # fmt: skip
        self.dropped = Counter("dinov2_dropped_images", "Images dropped before the model (cancelled, expired).",
                               ["reason"], registry=r)  # fmt: skip
        self.preprocess_seconds = Histogram("dinov2_preprocess_seconds", "Decode and resize time per image.",
                                            buckets=_LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.queue_seconds = Histogram("dinov2_queue_seconds", "Time from decoded to batch start per image.",
                                       buckets=_LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.inference_seconds = Histogram("dinov2_inference_seconds", "Forward pass time per batch.",
                                           buckets=_LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.refused = Counter("dinov2_refused_requests", "Requests refused before any work, by the bound that "
                               "refused them (images, bytes, queue_time, deadline, wait, calls, receive).", ["reason"],
                               registry=r)  # fmt: skip
        self.queued_work_seconds = Gauge("dinov2_queued_work_seconds", "Estimated seconds until the images "
                                         "accepted now are answered, at the measured speed.", registry=r)  # fmt: skip
        self.inference_failures = Counter("dinov2_inference_failures", "Forward passes that raised.", registry=r)
        self.model_info = Info("dinov2_model", "The loaded model.", registry=r)
        self._httpd: object | None = None

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """A sample's current value (0 when absent); for tests and the benchmark."""
        return self.registry.get_sample_value(name, labels or {}) or 0.0

    def serve(self, host: str, port: int) -> int | None:
        """Starts the /metrics HTTP endpoint; returns its port, or None when disabled (port < 0)."""
        if port < 0:
            return None
        httpd, _ = start_http_server(port, addr=host, registry=self.registry)
        self._httpd = httpd
        bound = int(httpd.server_address[1])
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()  # type: ignore[attr-defined]
            self._httpd.server_close()  # type: ignore[attr-defined]
            self._httpd = None
