"""Progressive weight delivery, free of gRPC: packages built once per (model, split point, order) and cached,
manifests, and the stream of a package's chunks from any chunk on in messages of bounded size."""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Iterator

import grpc

from cloud.inference import RequestError, ServedModel
from models.bias_correction import bias_inputs
from models.progressive import DEFAULT_BITS, DEFAULT_CHUNK_BYTES, DEFAULT_USABLE_PLANES, ORDERS, Package, \
    build_package
from proto import spinn_v1_pb2 as pb

log = logging.getLogger("cloud")

#: Payload bytes per StreamWeights message; with the envelope, well under the 1 MiB message bound. Small chunks
#: share a message: each message wakes a thread on the device, which costs its answers' tail latency (README).
MESSAGE_BYTES = 64 * 1024


class PackageCache:
    """Built packages by (model id, version, split point, order), least recently used evicted beyond
    ``max_packages``. A package is built once: concurrent first requests wait for the same build."""

    def __init__(self, max_packages: int = 4, chunk_bytes: int = DEFAULT_CHUNK_BYTES, bits: int = DEFAULT_BITS,
                 usable_planes: int = DEFAULT_USABLE_PLANES) -> None:
        self.max_packages = max_packages
        self.chunk_bytes, self.bits, self.usable_planes = chunk_bytes, bits, usable_planes
        self._lock = threading.Lock()
        self._entries: collections.OrderedDict[tuple, tuple[threading.Lock, list[Package]]] = \
            collections.OrderedDict()

    def get(self, served: ServedModel, split_point: int, order: str) -> Package:
        """The package of ``served`` for ``split_point`` and ``order`` (validated by the caller)."""
        key = (served.model_id, served.model_version, split_point, order)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = (threading.Lock(), [])
                while len(self._entries) > self.max_packages:
                    self._entries.popitem(last=False)
            self._entries.move_to_end(key)
        build_lock, slot = entry
        with build_lock:
            if not slot:
                started = time.monotonic()
                slot.append(build_package(
                    served.model.state_dict(), served.metadata, served.model_id, served.model_version,
                    split_point, served.model.exit_points, order, self.bits, self.usable_planes,
                    self.chunk_bytes, bias_inputs(served.model, served.input_size)))
                m = slot[0].manifest
                log.info("built progressive package for split point %d, order %s: %d chunks, %d bytes (%.1f %% "
                         "of float32) in %.1f s", split_point, order, len(m.chunks), m.total_bytes,
                         100 * m.total_bytes / m.float32_bytes, time.monotonic() - started)
        return slot[0]


def check_package_request(served: ServedModel, model: pb.ModelRef, split_point: int, order: str) -> str:
    """Validate what names a package; returns the order (empty means ``split``). An empty model id or version
    means whatever the cloud serves.

    Raises RequestError: FAILED_PRECONDITION for a model/version the cloud does not serve, INVALID_ARGUMENT
    for a split point outside 0..N or an unknown order.
    """
    if (model.model_id and model.model_id != served.model_id) or (
            model.model_version and model.model_version != served.model_version):
        raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                           f"model {model.model_id!r} version {model.model_version!r} is not served; this cloud "
                           f"serves {served.model_id!r} version {served.model_version!r}")
    if not 0 <= split_point <= served.model.num_blocks:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"split_point {split_point} is outside 0..{served.model.num_blocks}")
    order = order or "split"
    if order not in ORDERS:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"order must be one of {ORDERS}, got {order!r}")
    return order


def weight_messages(package: Package, from_chunk: int, message_bytes: int = MESSAGE_BYTES
                    ) -> Iterator[pb.WeightChunk]:
    """The package's chunks from ``from_chunk`` on, as one run of bytes cut into messages of at most
    ``message_bytes``: a message may end inside a chunk or carry several. A message also ends with the chunk
    that makes the head usable, so that the device does not wait for more bytes to move to its split.

    Raises RequestError INVALID_ARGUMENT for ``from_chunk`` outside 0..chunks.
    """
    if not 0 <= from_chunk <= len(package.payloads):
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"from_chunk {from_chunk} is outside 0..{len(package.payloads)}")
    return _messages(package, from_chunk, message_bytes)


def _messages(package: Package, from_chunk: int, message_bytes: int) -> Iterator[pb.WeightChunk]:
    payloads, usable = package.payloads, package.manifest.usable_chunk
    index, offset = from_chunk, 0
    while index < len(payloads):
        message = pb.WeightChunk(index=index, offset=offset)
        data = bytearray()
        while index < len(payloads) and len(data) < message_bytes:
            piece = payloads[index][offset:offset + message_bytes - len(data)]
            data += piece
            offset += len(piece)
            if offset == len(payloads[index]):
                index, offset = index + 1, 0
                if index == usable + 1:
                    break
        message.data, message.last = bytes(data), offset == 0
        yield message
