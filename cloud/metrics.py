"""The cloud daemon's Prometheus series (scraped at ``metrics_address`` when set; see serving/metrics.py)."""

from __future__ import annotations

from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from serving.metrics import LATENCY_BUCKETS

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class _Versions:
    """``spinn_cloud_model_versions{model_version, digest}`` = 1 for every version served now (read at scrape)."""

    def __init__(self, versions: Callable[[], Iterable[tuple[str, str]]]) -> None:
        self.versions = versions

    def collect(self):
        family = GaugeMetricFamily("spinn_cloud_model_versions", "Model versions served now (1 each)",
                                   labels=["model_version", "digest"])
        for label, digest in self.versions():
            family.add_metric([label, digest], 1.0)
        yield family


class CloudMetrics:
    """Requests by method and status, latency and queue-time histograms, batch sizes, queue depth, in flight,
    the versions served and the answers per version."""

    def __init__(self, queue_depth: Callable[[], int], in_flight: Callable[[], int],
                 versions: Callable[[], Iterable[tuple[str, str]]] = lambda: ()) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("spinn_cloud_requests", "Inference requests by method and final status",
                                ["method", "status"], registry=self.registry)
        self.latency = Histogram("spinn_cloud_request_seconds", "Time from receipt to answer, by method",
                                 ["method"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue = Histogram("spinn_cloud_queue_seconds", "Time a request waited for its batch",
                               buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch = Histogram("spinn_cloud_batch_images", "Images per batched forward (one sample per request)",
                               buckets=BATCH_BUCKETS, registry=self.registry)
        Gauge("spinn_cloud_queue_depth", "Requests waiting in the batcher",
              registry=self.registry).set_function(queue_depth)
        Gauge("spinn_cloud_in_flight", "Infer requests admitted and not yet answered",
              registry=self.registry).set_function(in_flight)
        self.idle_streams = Counter("spinn_cloud_idle_streams_closed", "InferStreams closed after "
                                    "infer_stream_idle_seconds without a request", registry=self.registry)
        self.by_version = Counter("spinn_cloud_version_answers", "Requests answered, by the model version whose "
                                  "tail answered", ["model_version"], registry=self.registry)
        self.registry.register(_Versions(versions))

    def answered_by(self, model_version: str) -> None:
        self.by_version.labels(model_version).inc()

    def idle_stream_closed(self) -> None:
        self.idle_streams.inc()

    def record(self, method: str, status: str, seconds: float, queue_ms: float | None, batch: int) -> None:
        """One finished request (``queue_ms`` None when it never reached the batcher)."""
        self.requests.labels(method, status).inc()
        self.latency.labels(method).observe(seconds)
        if queue_ms is not None:
            self.queue.observe(queue_ms / 1000.0)
            self.batch.observe(batch)
