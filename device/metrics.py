"""The device's Prometheus series (scraped at ``metrics_address`` when set; see serving/metrics.py)."""

from __future__ import annotations

from typing import Callable

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from serving.metrics import LATENCY_BUCKETS

_CODES = {c.name for c in grpc.StatusCode}


def reason_label(reason: str) -> str:
    """A bounded label for a degraded answer's free-text reason: the gRPC status name it starts with,
    ``version_skew``, ``circuit_open``, ``bad_reply``, ``none`` (not degraded) or ``other``."""
    if not reason:
        return "none"
    if reason.startswith("version skew"):
        return "version_skew"
    if reason.startswith("cloud circuit open"):
        return "circuit_open"
    if reason.startswith("bad reply"):
        return "bad_reply"
    head = reason.split(":", 1)[0]
    return head if head in _CODES else "other"


class DeviceMetrics:
    """Answers by who answered and degraded reason, by model version, bytes sent, latency, and how much of the
    model is in."""

    def __init__(self, weights_fraction: Callable[[], float], in_flight: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        self.answers = Counter("spinn_device_answers", "Answers by who answered and why degraded",
                               ["answered_by", "degraded_reason"], registry=self.registry)
        self.by_version = Counter("spinn_device_version_answers", "Answers by the model version that answered",
                                  ["model_version"], registry=self.registry)
        self.bytes_sent = Counter("spinn_device_bytes_sent", "Bytes of requests sent to the cloud",
                                  registry=self.registry)
        self.latency = Histogram("spinn_device_classify_seconds", "Time to answer an image",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        Gauge("spinn_device_weights_fraction", "Share of the model's weight bits on the device",
              registry=self.registry).set_function(weights_fraction)
        Gauge("spinn_device_in_flight", "Classify calls admitted and not yet answered",
              registry=self.registry).set_function(in_flight)

    def record(self, answered_by: str, reason: str, bytes_sent: int, latency_ms: float, model_version: str = ""
               ) -> None:
        self.answers.labels(answered_by, reason_label(reason)).inc()
        self.by_version.labels(model_version).inc()
        self.bytes_sent.inc(bytes_sent)
        self.latency.observe(latency_ms / 1000.0)
