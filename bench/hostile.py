"""A hostile cloud: a real gRPC server that proxies a real cloud and alters what it answers.

Devices connect to it as to a cloud. ``manifest`` (a function of a ``Manifest`` message, returning the message
to send, or None to answer honestly) alters GetManifest answers; by default the altered manifest gets its
package digest recomputed, as a hostile cloud would, so that the device's own checks are what is tested, not the
digest. ``chunk`` alters StreamWeights messages the same way (or raises ``Cut`` to end the call). Everything
else (GetModelInfo, Infer, GetCheckpoint, health) is passed through. Used by tests/test_hostile_delivery.py and
``bench/fuzz.py --delivery``; binds loopback only.
"""

from __future__ import annotations

import sys
from concurrent import futures
from pathlib import Path
from typing import Callable, Optional

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from proto import spinn_v1_pb2 as pb  # noqa: E402
from proto import spinn_v1_pb2_grpc as pb_grpc  # noqa: E402
from proto.manifest import package_digest_of  # noqa: E402

ManifestHook = Callable[[pb.Manifest], Optional[pb.Manifest]]
ChunkHook = Callable[[pb.WeightChunk, int], Optional[pb.WeightChunk]]


class Cut(Exception):
    """Raised by a chunk hook: the StreamWeights call ends there (UNAVAILABLE, as a dropped connection)."""


class HostileCloud(pb_grpc.InferenceServicer, pb_grpc.ModelDeliveryServicer):
    """Proxies ``target`` (a cloud's ``host:port``) on a free loopback port (``address``)."""

    def __init__(self, target: str) -> None:
        self.manifest: Optional[ManifestHook] = None
        self.chunk: Optional[ChunkHook] = None
        self.reseal = True  # recompute the package digest of an altered manifest
        self.manifests_served = 0
        self._originals: dict[str, str] = {}  # re-sealed package digest -> the real cloud's
        self._channel = grpc.insecure_channel(target)
        self._inference = pb_grpc.InferenceStub(self._channel)
        self._delivery = pb_grpc.ModelDeliveryStub(self._channel)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        pb_grpc.add_InferenceServicer_to_server(self, self.server)
        pb_grpc.add_ModelDeliveryServicer_to_server(self, self.server)
        checker = health.HealthServicer()
        checker.set("", health_pb2.HealthCheckResponse.SERVING)
        checker.set(pb.DESCRIPTOR.services_by_name["Inference"].full_name, health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(checker, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{self.port}"
        self.server.start()

    def retarget(self, target: str) -> None:
        """Proxy another cloud from now on (e.g. one restarted with another package)."""
        old = self._channel
        self._channel = grpc.insecure_channel(target)
        self._inference = pb_grpc.InferenceStub(self._channel)
        self._delivery = pb_grpc.ModelDeliveryStub(self._channel)
        old.close()

    def honest(self) -> None:
        self.manifest = self.chunk = None

    # -- passed through --------------------------------------------------------------------------------------

    def _forward(self, call, request, context):
        try:
            return call(request, timeout=context.time_remaining())
        except grpc.RpcError as err:
            context.abort(err.code(), err.details())

    def GetModelInfo(self, request, context):
        return self._forward(self._inference.GetModelInfo, request, context)

    def Infer(self, request, context):
        return self._forward(self._inference.Infer, request, context)

    def GetCheckpoint(self, request, context):
        try:
            yield from self._delivery.GetCheckpoint(request, timeout=context.time_remaining())
        except grpc.RpcError as err:
            context.abort(err.code(), err.details())

    # -- altered -----------------------------------------------------------------------------------------------

    def GetManifest(self, request, context):
        message = self._forward(self._delivery.GetManifest, request, context)
        self.manifests_served += 1
        hook = self.manifest
        if hook is None:
            return message
        altered = hook(message)
        if altered is None:
            return message
        if self.reseal:
            original = message.package_digest
            altered.package_digest = package_digest_of(altered)
            self._originals[altered.package_digest] = original  # so that its chunks stream under the new name
        return altered

    def StreamWeights(self, request, context):
        request.package_digest = self._originals.get(request.package_digest, request.package_digest)
        try:
            for i, message in enumerate(self._delivery.StreamWeights(request, timeout=context.time_remaining())):
                hook = self.chunk
                if hook is not None:
                    try:
                        altered = hook(message, i)
                    except Cut:
                        context.abort(grpc.StatusCode.UNAVAILABLE, "connection cut (hostile proxy)")
                    message = message if altered is None else altered
                yield message
        except grpc.RpcError as err:
            context.abort(err.code(), err.details())

    def stop(self) -> None:
        self.server.stop(1).wait(5)
        self._channel.close()
