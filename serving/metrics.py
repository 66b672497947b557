"""Prometheus metrics, the format serving users already scrape (Triton and TorchServe export the same way).

Each daemon keeps its metrics in a registry of its own (no process-global state: tests run several daemons in
one process) and, when its ``metrics_address`` key is set, serves them over HTTP at ``/metrics``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

from models.config import ConfigError

log = logging.getLogger(__name__)

#: Latency buckets (seconds): 1 ms .. 10 s, for answers from a device exit (ms) up to offloads over slow links.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class Exporter:
    """A running ``/metrics`` HTTP endpoint."""

    server: WSGIServer
    port: int

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start_exporter(address: str, registry: CollectorRegistry, key: str = "metrics_address") -> Exporter:
    """Serve ``registry`` at ``http://address/metrics`` (``host:port``; port 0 picks a free one). With no host
    (``:9100``) it binds loopback only: the series name models, versions and traffic, so exposing them to
    other hosts takes an explicit address (``0.0.0.0:9100``).

    Raises ConfigError naming ``key`` when the address is malformed or cannot be bound.
    """
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"config key '{key}': expected host:port, got {address!r}")
    host = host.strip("[]") or "127.0.0.1"
    try:
        server, _ = start_http_server(int(port), addr=host, registry=registry)
    except OSError as err:
        raise ConfigError(f"config key '{key}': cannot listen on {address!r} ({err})") from None
    bound = server.server_port
    log.info("metrics on http://%s:%d/metrics", host, bound)
    return Exporter(server, bound)
