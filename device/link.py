"""The device's gRPC channel to the cloud: addresses, load balancing, retries, keepalive, TLS, token."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import socket
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from device.config import DeviceConfig
from models.config import ConfigError
from proto import spinn_v1_pb2 as pb
from proto import spinn_v1_pb2_grpc as pb_grpc

INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["Inference"].full_name

# Codes after which the device answers locally. The breaker counts only those that say the cloud is gone or
# drowning; FAILED_PRECONDITION (wrong model/split) is a config mismatch, not an outage.
NETWORK_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                           grpc.StatusCode.RESOURCE_EXHAUSTED})


class LinkError(Exception):
    """The cloud could not provide something the device needs at start-up (model info, checkpoint)."""


def _literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def channel_target(addresses: list[str]) -> str:
    """gRPC target for one or several ``host:port``.

    One address is used as given (the DNS resolver; round_robin then spreads over its A records). Several are
    turned into a static ``ipv4:``/``ipv6:`` list, resolving host names once, so round_robin spreads calls over
    all replicas. Raises ConfigError naming ``cloud`` for a name that does not resolve or mixed families.
    """
    if len(addresses) == 1:
        return addresses[0]
    resolved = []
    for address in addresses:
        host, _, port = address.rpartition(":")
        ip = _literal(host)
        if ip is None:
            try:
                ip = ipaddress.ip_address(socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)[0][4][0])
            except (OSError, ValueError) as err:
                raise ConfigError(f"config key 'cloud': cannot resolve {address!r} ({err})") from None
        resolved.append((ip, port))
    versions = {ip.version for ip, _ in resolved}
    if len(versions) > 1:
        raise ConfigError("config key 'cloud': mix of IPv4 and IPv6 addresses; use one family")
    if versions == {4}:
        return "ipv4:" + ",".join(f"{ip}:{port}" for ip, port in resolved)
    return "ipv6:" + ",".join(f"[{ip}]:{port}" for ip, port in resolved)


def channel_options(cfg: DeviceConfig) -> list[tuple[str, object]]:
    """Channel arguments: round_robin, retry on UNAVAILABLE (bounded by each call's deadline), keepalive,
    fast reconnects (a cloud that comes back is used within about a second), message limits."""
    method: dict[str, object] = {"name": [{"service": INFERENCE_SERVICE}]}
    if cfg.max_attempts > 1:  # gRPC wants maxAttempts >= 2 in a retry policy; 1 means no policy
        method["retryPolicy"] = {
            "maxAttempts": cfg.max_attempts, "initialBackoff": "0.01s", "maxBackoff": "0.1s",
            "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"],
        }
    service_config = {"loadBalancingConfig": [{"round_robin": {}}], "methodConfig": [method]}
    options: list[tuple[str, object]] = [
        ("grpc.service_config", json.dumps(service_config)),
        ("grpc.enable_retries", 1 if cfg.max_attempts > 1 else 0),
        ("grpc.keepalive_time_ms", cfg.keepalive_ms),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
        ("grpc.max_receive_message_length", cfg.max_message_bytes),
        ("grpc.max_send_message_length", cfg.max_message_bytes),
    ]
    if cfg.tls_server_name:
        options.append(("grpc.ssl_target_name_override", cfg.tls_server_name))
    return options


class CloudLink:
    """One channel to the cloud replicas and the calls the device makes on it."""

    def __init__(self, cfg: DeviceConfig) -> None:
        target = channel_target(cfg.addresses())
        self.channel = self._open(cfg, target, [])
        # Weights stream on a connection of their own: on one HTTP/2 connection an answer waits behind every
        # weight byte already in the cloud's socket buffer (measured over 1 Mbit/s: first answer 3.0 s).
        self._delivery_channel = self._open(cfg, target, [("grpc.use_local_subchannel_pool", 1)])
        self.target = target
        token = cfg.token()
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.model = pb.ModelRef(model_id=cfg.model_id, model_version=cfg.model_version or "")
        self._inference = pb_grpc.InferenceStub(self.channel)
        self._delivery = pb_grpc.ModelDeliveryStub(self._delivery_channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    @staticmethod
    def _open(cfg: DeviceConfig, target: str, extra: list[tuple[str, object]]) -> grpc.Channel:
        options = channel_options(cfg) + extra
        if not cfg.tls_ca:
            return grpc.insecure_channel(target, options=options)
        creds = grpc.ssl_channel_credentials(
            root_certificates=Path(cfg.tls_ca).read_bytes(),
            private_key=Path(cfg.tls_key).read_bytes() if cfg.tls_key else None,
            certificate_chain=Path(cfg.tls_cert).read_bytes() if cfg.tls_cert else None,
        )
        return grpc.secure_channel(target, creds, options=options)

    def infer(self, request: pb.FeatureRequest, timeout_s: float) -> tuple[pb.Prediction, float]:
        """Call Infer with a deadline of ``timeout_s`` (retries included); returns the reply and the latency
        in ms. Raises grpc.RpcError."""
        started = time.perf_counter()
        reply = self._inference.Infer(request, timeout=timeout_s, metadata=self.metadata)
        return reply, (time.perf_counter() - started) * 1000.0

    def model_info(self, timeout_s: float) -> pb.ModelInfo:
        """GetModelInfo. Raises grpc.RpcError."""
        return self._inference.GetModelInfo(pb.ModelInfoRequest(), timeout=timeout_s, metadata=self.metadata)

    def manifest(self, request: pb.ManifestRequest, timeout_s: float) -> pb.Manifest:
        """GetManifest for this device's model id (any version the cloud serves). Raises grpc.RpcError."""
        request.model.model_id = request.model.model_id or self.model.model_id
        return self._delivery.GetManifest(request, timeout=timeout_s, metadata=self.metadata)

    def stream_weights(self, request: pb.WeightRequest, timeout_s: float):
        """StreamWeights: an iterator of WeightChunk messages that can be ``cancel()``-ed. Raises grpc.RpcError
        while iterating."""
        return self._delivery.StreamWeights(request, timeout=timeout_s, metadata=self.metadata)

    def healthy(self, timeout_s: float = 1.0) -> bool:
        """True when the cloud's Inference service reports SERVING."""
        try:
            reply = self._health.Check(health_pb2.HealthCheckRequest(service=INFERENCE_SERVICE),
                                       timeout=timeout_s, wait_for_ready=True)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def fetch_checkpoint(self, timeout_s: float, max_bytes: int = 1 << 30, latest: bool = False
                         ) -> tuple[bytes, str]:
        """Download a checkpoint file the cloud serves: the configured version (``model_version``), else or with
        ``latest`` the latest. Returns the file's bytes, SHA-256 verified, and the model digest the cloud
        announced for it (the caller checks it against the loaded checkpoint's).

        Raises LinkError naming what went wrong (unreachable, refused, truncated, hash mismatch).
        """
        data, digest, total, announced = bytearray(), "", -1, ""
        ref = pb.ModelRef(model_id=self.model.model_id) if latest else self.model
        try:
            for chunk in self._delivery.GetCheckpoint(pb.CheckpointRequest(model=ref), timeout=timeout_s,
                                                      metadata=self.metadata, wait_for_ready=True):
                data += chunk.data
                digest, total, announced = chunk.sha256, chunk.total_bytes, chunk.model.digest
                if len(data) > max_bytes or len(data) > total:
                    raise LinkError(f"checkpoint from {self.target}: more bytes than announced ({total})")
        except grpc.RpcError as err:
            raise LinkError(f"checkpoint from {self.target}: {err.code().name}: {err.details()}") from None
        if len(data) != total:
            raise LinkError(f"checkpoint from {self.target}: got {len(data)} of {total} bytes")
        if hashlib.sha256(data).hexdigest() != digest:
            raise LinkError(f"checkpoint from {self.target}: SHA-256 mismatch")
        return bytes(data), announced

    def close(self) -> None:
        self.channel.close()
        self._delivery_channel.close()
