"""The device daemon: local Classify gRPC API (thin adapter over DeviceRuntime) and the optional folder watch."""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from device.config import DeviceConfig
from device.images import ImageError
from device.runtime import ClassifyResult, DeviceRuntime, NoModelError
from device.watch import FolderWatcher
from models.config import ConfigError
from proto import spinn_v1_pb2 as pb
from proto import spinn_v1_pb2_grpc as pb_grpc
from serving.admission import Overloaded
from serving.metrics import Exporter, start_exporter

log = logging.getLogger("device")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Device"].full_name
SPARE_THREADS = 4


def to_reply(request_id: str, result: ClassifyResult) -> pb.ClassifyReply:
    return pb.ClassifyReply(
        request_id=request_id, class_id=result.class_id, label=result.label, confidence=result.confidence,
        answered_by=result.answered_by, degraded=result.degraded, reason=result.reason,
        bytes_sent=result.bytes_sent, latency_ms=result.latency_ms,
        top_k=[pb.ClassScore(class_id=c, name=n, probability=p) for c, n, p in result.top_k],
        model_version=result.model_version, model_digest=result.model_digest, split_point=result.split_point,
        weights_fraction=result.weights_fraction, head_bits=result.head_bits,
    )


class DeviceServicer(pb_grpc.DeviceServicer):
    def __init__(self, runtime: DeviceRuntime) -> None:
        self.runtime = runtime

    def Classify(self, request: pb.ClassifyRequest, context: grpc.ServicerContext) -> pb.ClassifyReply:
        if request.top_k < 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"top_k must be >= 0, got {request.top_k}")
        try:
            with self.runtime.admission.admit():
                result = self.runtime.classify_bytes(request.image, request.top_k or None)
        except Overloaded as err:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
        except ImageError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except NoModelError as err:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(err))
        return to_reply(request.request_id, result)


@dataclass
class DeviceServer:
    server: grpc.Server
    port: int
    runtime: DeviceRuntime
    watcher: Optional[FolderWatcher]
    exporter: Optional[Exporter] = None

    def stop(self, grace_s: float = 5.0) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        self.server.stop(grace_s).wait(grace_s + 5)
        self.runtime.close()
        if self.exporter is not None:
            self.exporter.stop()


def build_server(cfg: DeviceConfig, runtime: DeviceRuntime) -> DeviceServer:
    """Start the local API on ``cfg.listen`` (and the folder watch when ``watch_dir`` is set)."""
    options = [("grpc.max_receive_message_length", cfg.max_image_bytes + 4096)]
    # Threads beyond max_in_flight answer health checks and refusals under a flood; gRPC's queue is bounded.
    threads = cfg.max_in_flight + SPARE_THREADS
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads), options=options,
                         maximum_concurrent_rpcs=4 * threads)
    pb_grpc.add_DeviceServicer_to_server(DeviceServicer(runtime), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        port = server.add_insecure_port(cfg.listen)
    except RuntimeError:
        port = 0
    if port == 0:
        raise ConfigError(f"config key 'listen': cannot listen on {cfg.listen!r}")
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    watcher = None
    if cfg.watch_dir is not None:
        results = Path(cfg.watch_results or Path(cfg.watch_dir) / "results.jsonl")
        watcher = FolderWatcher(runtime, Path(cfg.watch_dir), results, cfg.watch_interval_seconds)
        watcher.start()
    running = DeviceServer(server, port, runtime, watcher)
    if cfg.metrics_address is not None:
        try:
            running.exporter = start_exporter(cfg.metrics_address, runtime.metrics.registry)
        except ConfigError:
            running.stop(0)
            raise
    return running


def serve(cfg: DeviceConfig) -> int:
    """Run the daemon until SIGTERM/SIGINT; returns 0."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    running = build_server(cfg, DeviceRuntime.start(cfg))
    log.info("device API on port %d%s", running.port,
             f", watching {cfg.watch_dir}" if cfg.watch_dir else "")
    stop.wait()
    log.info("shutting down")
    running.stop()
    return 0
