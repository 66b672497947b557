"""The cloud daemon: gRPC servicer (thin adapter over cloud.inference and cloud.batcher), server assembly."""

from __future__ import annotations

import collections
import contextlib
import hmac
import gc
import json
import logging
import os
import signal
import threading
import time
import uuid
from concurrent import futures
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Iterator, Optional, Union

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cloud.delivery import (DELTA_MAX_FRACTION, BuildFailed, BuildsBusy, PackageCache, check_package_request,
                            held_base, offered_package, weight_messages)
from cloud.batcher import BatchResult, DeadlineExpired, DynamicBatcher, ForwardHung, QueueFull, ShuttingDown
from cloud.metrics import CloudMetrics
from cloud.inference import RequestError, ServedModel, answer, checkpoint_chunks, run_tail, validate_request
from cloud.model_dir import ModelFolder
from cloud.versions import ModelRegistry, VersionRefused, version_rank
from cloud.worker import START_TIMEOUT_S, ForwardWorker, WorkerError
from models.config import ConfigError, check_at_least, check_files, check_log_level, check_positive
from models.hardware import resolve_device
from models.partition import bottleneck_at
from proto import spinn_v1_pb2 as pb
from proto import spinn_v1_pb2_grpc as pb_grpc
from models.progressive import PLANE_CODERS, Package
from models.progressive.delta import DELTA_ORDER
from proto.codec import C, CodecSpec, Q
from serving.admission import Admission, IdleCalls, Overloaded, pending_call_options
from serving.heap import collection_paused, freeze_heap
from serving.metrics import Exporter, start_exporter
from serving.signing import Signer
from serving.security import TOKEN_ENV, check_server_exposure, read_token, token_file_is_private
from proto.manifest import manifest_message

log = logging.getLogger("cloud")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Inference"].full_name
DELIVERY_NAME = pb.DESCRIPTOR.services_by_name["ModelDelivery"].full_name
HEALTH_NAMES = ("", SERVICE_NAME, DELIVERY_NAME)
CHUNK_BYTES = 1 << 20
#: Nice of loading a new version from a model folder: below the forward (forward_nice), so that it takes only the
#: CPU the versions served leave (package builds run at idle priority in a process of their own: cloud/delivery.py).
BACKGROUND_NICE = 19
#: RPC threads that admitted work can never take: health checks, reflection and refusals always find one.
SPARE_RPC_THREADS = 4
#: gRPC's own bound on calls in the server (running or queued for a thread), per RPC thread.
QUEUED_PER_THREAD = 4
DEFAULT_CODEC = CodecSpec("int8", "zstd")
LEARNED_CODEC = CodecSpec("learned", "ans")


def load_codec_table(path: str | None) -> dict[int, CodecSpec]:
    """Default codec per split point from a bench/codec.py result file (``{"defaults": {"9": "int8+zstd"}}``)."""
    if path is None:
        return {}
    try:
        defaults = json.loads(Path(path).read_text())["defaults"]
        return {int(k): CodecSpec.from_name(v) for k, v in defaults.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ConfigError(f"config key 'codec_table': {path!r} is not a bench/codec.py result ({err})") from None


def default_codec(served: ServedModel, split_point: int, table: dict[int, CodecSpec]) -> CodecSpec:
    """The codec a device should send at ``split_point``: the configured table's, else ``learned+ans`` where
    ``served`` has its bottleneck (hundreds of bytes where int8+zstd takes kilobytes), else int8+zstd."""
    if split_point in table:
        return table[split_point]
    return LEARNED_CODEC if bottleneck_at(served.model, split_point) is not None else DEFAULT_CODEC


def code_shape(served: ServedModel, split_point: int) -> list[int]:
    """``(c, H, W)`` of the bottleneck's code when ``served`` has its bottleneck at ``split_point``, else []."""
    bottleneck = bottleneck_at(served.model, split_point)
    if bottleneck is None:
        return []
    _, h, w = served.activation_shapes[split_point]
    return [bottleneck.config.channels, h, w]


@dataclass
class CloudConfig:
    """Keys of ``apps/cloud.yml`` (README: cloud config reference)."""

    REMOVED_KEYS: ClassVar[dict[str, str]] = {
        "auth_token": f"a token given as a value shows in ps; put it in a file (auth_token_file) or in {TOKEN_ENV}",
        "max_streams": "ModelDelivery calls are bounded by max_delivery_calls, InferStreams by max_infer_streams",
    }

    # a checkpoint file; a list of them (versions, the last is the latest); or a folder of <version>.pt files, polled
    checkpoint: Union[str, list[str]] = "runs/quickstart/best_model.pt"
    address: str = "127.0.0.1:50051"
    model_id: str = "spinn"
    model_version: Optional[str] = None  # a single checkpoint's label; None: its digest's short form
    keep_versions: int = 2  # version policy: the latest N versions are served (Triton's "latest")
    model_dir_poll_seconds: float = 5.0  # how often a model folder is looked at for new or removed versions
    max_batch_size: int = 16
    max_queue_delay_ms: float = 2.0
    max_queue_size: int = 256
    max_in_flight: int = 64  # Infer requests admitted at once; beyond: RESOURCE_EXHAUSTED at once
    max_infer_streams: int = 16  # InferStreams open at once (each holds an RPC thread); beyond: RESOURCE_EXHAUSTED
    infer_stream_idle_seconds: float = 60.0  # an InferStream with no request for this long is closed
    max_delivery_calls: int = 8  # GetManifest/StreamWeights/GetCheckpoint calls at once; beyond: RESOURCE_EXHAUSTED
    forward_timeout_s: float = 60.0  # a batch forward running longer is failed (UNAVAILABLE) by the watchdog
    forward_nice: int = 10  # the forward (batcher thread or worker process) runs this much nicer, 0..19 (Linux)
    metrics_address: Optional[str] = None  # host:port (":9100" binds loopback): Prometheus /metrics (None: off)
    intra_op_threads: int = 0  # 0: all cores but one (at least 1), see intra_op_threads_for()
    rpc_threads: int = 96  # >= max_in_flight + max_infer_streams + max_delivery_calls + 4 (spare threads)
    max_pending_calls: Optional[int] = None  # calls gRPC core queues before dropping (CANCELLED); None: core's
    max_message_bytes: int = 16 * 1024 * 1024
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None
    tls_client_ca: Optional[str] = None  # set: clients must present a certificate signed by it (mutual TLS)
    auth_token_file: Optional[str] = None  # file holding the bearer token every call needs (else $SPINN_AUTH_TOKEN)
    insecure: bool = False  # allow an address off loopback without TLS or without caller authentication
    codec_table: Optional[str] = None  # bench/codec.py JSON: default codec per split point; None: int8+zstd
    grace_seconds: float = 10.0
    torch_device: str = "auto"  # auto: CUDA when torch sees a GPU, else CPU
    forward_process: bool = False  # run the tail forward in a worker process (cloud/worker.py)
    # progressive weight delivery (models/progressive/): packages are built on first request and cached
    delivery_bits: int = 16  # sign + 15 magnitude bit planes
    delivery_plane_coder: str = "zstd"  # how each plane is coded: zstd, or context (models/progressive/context.py)
    # > 0: each layer's final precision is the coarsest grid that keeps every output channel's signal to
    # quantisation noise at least this (dB); its lower planes are all zero (README, "Coarser final precision")
    delivery_snr_db: float = 0.0
    delivery_usable_planes: int = 7  # the device's head is usable once its layers have this many planes
    delivery_chunk_bytes: int = 16384  # target chunk size (a chunk is the unit of hashing and resuming)
    delivery_cache_packages: int = 4  # packages kept (one per split point and order asked for)
    delivery_cache_bytes: int = 256 * 1024 * 1024  # and at most this many bytes of them (the newest is kept)
    max_package_builds: int = 1  # packages built at once (a build is zstd -19 over the model: seconds of a core)
    delivery_message_bytes: int = 64 * 1024  # payload per StreamWeights message (small chunks share one, a large
    # chunk spans several)
    delivery_prebuild: list[int] = field(default_factory=list)  # split points whose package (split order) is
    # built right after loading, so that the first device does not wait for it
    delivery_signing_key: Optional[str] = None  # Ed25519 private key (PEM): every package's digest is signed
    log_level: str = "INFO"

    def token(self) -> Optional[str]:
        """The bearer token callers must send: ``auth_token_file``'s contents, else ``$SPINN_AUTH_TOKEN``, else
        None (no token). Raises ConfigError naming the key or variable."""
        return read_token(self.auth_token_file)

    def checkpoint_files(self) -> list[Path]:
        """The checkpoint files of a file or list config (empty for a folder)."""
        if isinstance(self.checkpoint, list):
            return [Path(p) for p in self.checkpoint]
        return [] if Path(self.checkpoint).is_dir() else [Path(self.checkpoint)]

    def model_dir(self) -> Optional[Path]:
        """The model folder when ``checkpoint`` names one."""
        if isinstance(self.checkpoint, str) and Path(self.checkpoint).is_dir():
            return Path(self.checkpoint)
        return None

    def _validate_models(self) -> None:
        if isinstance(self.checkpoint, list) and not self.checkpoint:
            raise ConfigError("config key 'checkpoint': an empty list")
        if self.model_version is not None and (isinstance(self.checkpoint, list) or self.model_dir() is not None):
            raise ConfigError("config key 'model_version': labels the one checkpoint of a file config; a list or a "
                              "folder labels each version by its file name")
        if self.model_version is not None and not self.model_version.strip():
            raise ConfigError("config key 'model_version': an empty label (null: the digest's short form)")
        check_at_least(self, ("keep_versions",), 1)
        check_positive(self, ("model_dir_poll_seconds",))

    def min_rpc_threads(self) -> int:
        """Threads every admitted call may hold at once, plus the spare ones health checks and refusals use."""
        return self.max_in_flight + self.max_infer_streams + self.max_delivery_calls + SPARE_RPC_THREADS

    def validate(self) -> None:
        check_at_least(self, ("max_batch_size", "max_queue_size", "rpc_threads", "max_message_bytes",
                              "max_in_flight", "max_infer_streams", "max_delivery_calls", "max_package_builds",
                              "delivery_cache_bytes"), 1)
        check_positive(self, ("forward_timeout_s", "grace_seconds", "infer_stream_idle_seconds"))
        if not 0 <= self.forward_nice <= 19:
            raise ConfigError(f"config key 'forward_nice': must be in 0..19, got {self.forward_nice}")
        if self.rpc_threads < self.min_rpc_threads():
            raise ConfigError(
                f"config key 'rpc_threads': must be >= max_in_flight + max_infer_streams + max_delivery_calls + "
                f"{SPARE_RPC_THREADS} = {self.min_rpc_threads()} (threads left for health checks and refusals), "
                f"got {self.rpc_threads}")
        check_at_least(self, ("max_queue_delay_ms", "intra_op_threads"), 0)
        if self.max_pending_calls is not None and self.max_pending_calls < 1:
            raise ConfigError(f"config key 'max_pending_calls': must be >= 1, got {self.max_pending_calls}")
        self._validate_delivery()
        self._validate_security()
        self._validate_models()
        check_files(self, ("codec_table", "delivery_signing_key"))
        if self.delivery_signing_key is not None:
            Signer.from_file(self.delivery_signing_key)
        check_log_level(self)
        resolve_device(self.torch_device, "torch_device")

    def _validate_delivery(self) -> None:
        check_at_least(self, ("delivery_chunk_bytes", "delivery_cache_packages", "delivery_usable_planes",
                              "delivery_message_bytes"), 1)
        for i, split_point in enumerate(self.delivery_prebuild):
            if split_point < 0:
                raise ConfigError(f"config key 'delivery_prebuild[{i}]': a split point is >= 0, got {split_point}")
        if self.delivery_message_bytes > 1 << 20:
            raise ConfigError("config key 'delivery_message_bytes': at most 1 MiB (1048576), got "
                              f"{self.delivery_message_bytes}")
        if self.delivery_plane_coder not in PLANE_CODERS:
            raise ConfigError(f"config key 'delivery_plane_coder': one of {', '.join(PLANE_CODERS)}, got "
                              f"{self.delivery_plane_coder!r}")
        if not 0 <= self.delivery_snr_db <= 200:
            raise ConfigError(f"config key 'delivery_snr_db': must be in 0..200 (0: every plane exact), got "
                              f"{self.delivery_snr_db}")
        if not 2 <= self.delivery_bits <= 24:
            raise ConfigError(f"config key 'delivery_bits': must be in 2..24, got {self.delivery_bits}")
        if self.delivery_usable_planes > self.delivery_bits - 1:
            raise ConfigError(f"config key 'delivery_usable_planes': at most delivery_bits - 1 = "
                              f"{self.delivery_bits - 1}, got {self.delivery_usable_planes}")

    def _validate_security(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("config key 'tls_cert': tls_cert and tls_key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError("config key 'tls_client_ca': mutual TLS needs tls_cert and tls_key too")
        check_files(self, ("tls_cert", "tls_key", "tls_client_ca", "auth_token_file"))
        token = self.token() is not None
        check_server_exposure(self.address, "address", tls=self.tls_cert is not None,
                              authenticated=token or self.tls_client_ca is not None, token=token,
                              insecure=self.insecure)


class InferenceServicer(pb_grpc.InferenceServicer):
    """gRPC adapter: validation, batching and answering live in cloud.inference / cloud.batcher."""

    def __init__(
        self, models: ModelRegistry, batcher: DynamicBatcher, max_batch: int,
        default_codecs: dict[int, CodecSpec], admission: Optional[Admission] = None,
        result_timeout_s: float = 60.0, streams: Optional[Admission] = None, idle: Optional[IdleCalls] = None,
    ) -> None:
        """``models``: the versions served (none while the daemon is still loading). ``admission`` bounds
        requests being answered (unary or in a stream), ``streams`` the InferStreams open at once; ``idle`` closes
        streams that send nothing for too long (None: never closed)."""
        self.models = models
        # the worker process's run(digest, split, activations) when there is one; None: this process
        self.forward: Optional[Callable[[str, int, torch.Tensor], list[torch.Tensor]]] = None
        self.counts: collections.Counter[str] = collections.Counter()  # final status name -> requests
        self._counts_lock = threading.Lock()
        self.batcher = batcher
        self.max_batch = max_batch
        self.default_codecs = default_codecs
        self.admission = admission or Admission(1 << 30, "max_in_flight")
        self.streams = streams or Admission(1 << 30, "max_infer_streams", "InferStreams")
        self.idle = idle
        self.metrics = CloudMetrics(batcher.queued, lambda: self.admission.in_flight,
                                    lambda: [(v.model_version, v.digest) for v in models.versions()])
        self.result_timeout_s = result_timeout_s  # the longest a call waits for the batcher, with no deadline

    def run_batch(self, key: tuple[str, int], activations: torch.Tensor) -> list[torch.Tensor]:
        """The batcher's forward for ``key`` = (version digest, split point): the worker process when there is
        one, else this process. Every request of the batch holds a lease on that version, so it is loaded."""
        digest, split_point = key
        if self.forward is not None:
            return self.forward(digest, split_point, activations)
        return run_tail(self.models.held(digest), split_point, activations)

    def _infer(self, req: pb.FeatureRequest, remaining_s: Optional[float], method: str = "Infer") -> pb.Prediction:
        """Answer one request, or raise RequestError with its status; every request is counted, measured and
        logged once."""
        started = time.monotonic()
        request_id = req.request_id or uuid.uuid4().hex
        status, batch, queue_ms = "OK", 0, None
        try:
            with self.admission.admit():
                prediction = self._compute(req, request_id, remaining_s)
            batch, queue_ms = prediction.timings.batch_size, prediction.timings.queue_ms
            return prediction
        except Overloaded as err:
            status = "RESOURCE_EXHAUSTED"
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err)) from None
        except RequestError as err:
            status = err.code.name
            raise
        except Exception as err:  # a bug past validation (e.g. in answer()): logged, answered and counted INTERNAL
            log.exception("request %s failed", request_id)
            status = "INTERNAL"
            raise RequestError(grpc.StatusCode.INTERNAL, f"internal error: {type(err).__name__}") from None
        finally:
            with self._counts_lock:
                self.counts[status] += 1
            self.metrics.record(method, status, time.monotonic() - started, queue_ms, batch)
            if log.isEnabledFor(logging.INFO):  # json.dumps per request is measurable at high rates
                log.info(json.dumps({"request_id": request_id, "split_point": req.split_point, "batch_size": batch,
                                     "ms": round((time.monotonic() - started) * 1000, 3), "status": status}))

    def _compute(self, req: pb.FeatureRequest, request_id: str, remaining_s: Optional[float]) -> pb.Prediction:
        # The version the request's digest names, held from validation to answer: one version end to end.
        with self.models.lease(req.model) as served:
            activations = validate_request(req, served, self.max_batch)
            wait_s = self.result_timeout_s if remaining_s is None else min(remaining_s, self.result_timeout_s)
            result = self._batched(served, req.split_point, activations, wait_s)
            images = answer(served, req.split_point, result.outputs, req.top_k, req.cloud_exit_threshold)
        self.metrics.answered_by(served.model_version)
        return pb.Prediction(
            request_id=request_id, images=images, model=served.ref,
            timings=pb.ServerTimings(queue_ms=result.queue_ms, compute_ms=result.compute_ms,
                                     batch_size=result.batch_size),
        )

    def _batched(self, served: ServedModel, split_point: int, activations: torch.Tensor, wait_s: float
                 ) -> BatchResult:
        """Run ``activations`` in a batch of its version and split point; RequestError with the status."""
        try:
            return self.batcher.submit((served.digest, split_point), activations,
                                       time.monotonic() + wait_s).result(wait_s)
        except QueueFull as err:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err)) from None
        except (ShuttingDown, WorkerError, ForwardHung) as err:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, str(err)) from None
        except (DeadlineExpired, FutureTimeout) as err:
            raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, str(err) or f"no result within {wait_s:.1f} s"
                               ) from None
        except Exception as err:  # a failing forward: the batcher logged it; answer (and count) INTERNAL
            raise RequestError(grpc.StatusCode.INTERNAL, f"forward failed: {type(err).__name__}") from None

    def Infer(self, request: pb.FeatureRequest, context: grpc.ServicerContext) -> pb.Prediction:
        try:
            return self._infer(request, context.time_remaining())
        except RequestError as err:
            abort(context, err)

    def InferStream(self, request_iterator: Iterator[pb.FeatureRequest], context: grpc.ServicerContext):
        # A stream holds an RPC thread for its whole life, so it is admitted like a request (max_infer_streams)
        # and closed when idle: otherwise idle streams could take every thread, health checks' included.
        try:
            with self.streams.admit():
                yield from self._stream_answers(request_iterator, context)
        except Overloaded as err:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))

    def _stream_answers(self, requests: Iterator[pb.FeatureRequest], context: grpc.ServicerContext
                        ) -> Iterator[pb.Prediction]:
        """One answer per request, in order. Sequential per stream; pipelining clients open several streams (or
        use Infer concurrently). A request that fails is answered with its status and the stream goes on: one
        bad message costs one answer. Ends quietly when the call is cancelled (by the client, or as idle)."""
        watch = self.idle.watch(context.cancel) if self.idle is not None else contextlib.nullcontext()
        with watch as call:
            try:
                for request in requests:
                    if call is not None:
                        call.busy()
                    try:
                        yield self._infer(request, context.time_remaining(), "InferStream")
                    except RequestError as err:
                        yield pb.Prediction(request_id=request.request_id,
                                            status=pb.RequestStatus(code=err.code.value[0], message=err.detail))
                    if call is not None:
                        call.idle()
            except grpc.RpcError:  # the call was cancelled while waiting for its next request
                return

    def GetModelInfo(self, request: pb.ModelInfoRequest, context: grpc.ServicerContext) -> pb.ModelInfo:
        try:
            s = self.models.resolve(request.model)
        except RequestError as err:
            abort(context, err)
        learned = s.model.bottleneck is not None  # LEARNED is accepted at its split
        return pb.ModelInfo(
            model=s.ref, versions=[v.ref for v in self.models.versions()],
            class_names=s.class_names,
            input_size=s.input_size,
            exit_points=s.model.exit_points,
            split_points=[
                pb.SplitPointInfo(split_point=k, activation_shape=list(shape),
                                  device_exits=[e for e in s.model.exit_points if e <= k],
                                  default_codec=default_codec(s, k, self.default_codecs).message(),
                                  code_shape=code_shape(s, k))
                for k, shape in sorted(s.activation_shapes.items())
            ],
            quantizations=[Q.FLOAT32, Q.FLOAT16, Q.INT8, Q.INT4, Q.JPEG] + ([Q.LEARNED] if learned else []),
            compressions=[C.NONE, C.ZLIB, C.ZSTD] + ([C.ANS] if learned else []),
            resize_size=s.metadata["preprocess"]["resize_size"], mean=s.metadata["preprocess"]["mean"],
            std=s.metadata["preprocess"]["std"],
        )


class ModelDeliveryServicer(pb_grpc.ModelDeliveryServicer):
    """gRPC adapter over cloud.inference.checkpoint_chunks and cloud.delivery, for the model the Inference
    servicer serves."""

    def __init__(self, inference: InferenceServicer, packages: PackageCache, message_bytes: int,
                 calls: Optional[Admission] = None) -> None:
        """``calls`` bounds the delivery calls served at once (each holds an RPC thread, a manifest maybe for a
        package build of seconds)."""
        self.inference = inference
        self.packages = packages
        self.message_bytes = message_bytes
        self.calls = calls or Admission(1 << 30, "max_delivery_calls", "delivery calls")

    def _stream(self, messages: Callable[[], Iterator], context: grpc.ServicerContext) -> Iterator:
        """Yield what ``messages()`` makes while holding a place among ``max_delivery_calls``; a refused
        request (RequestError) or no place aborts the call with its status."""
        try:
            with self.calls.admit():
                yield from messages()
        except Overloaded as err:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
        except RequestError as err:
            abort(context, err)

    def _package(self, model: pb.ModelRef, split_point: int, order: str, held_sha256: str = "") -> Package:
        """The package a ManifestRequest gets (the full one, or a delta from ``held_sha256``)."""
        served = self.inference.models.resolve(model)
        order = check_package_request(served, split_point, order)
        with _build_errors():
            return offered_package(self.packages, self.inference.models.versions(), served, split_point, order,
                                   held_sha256)

    def _streamed(self, request: pb.WeightRequest) -> Package:
        """The package a WeightRequest names: a delta (order ``delta``) by its base, else as ``_package``."""
        if request.order != DELTA_ORDER:
            return self._package(request.model, request.split_point, request.order)
        served = self.inference.models.resolve(request.model)
        check_package_request(served, request.split_point, "")
        base = held_base(self.packages, self.inference.models.versions(), served, request.base_sha256,
                         "base_sha256")
        with _build_errors():
            full = self.packages.get(served, request.split_point, "split") if base is not None else None
            delta = None if full is None else self.packages.delta(served, request.split_point, base,
                                                                  DELTA_MAX_FRACTION * full.manifest.total_bytes)
        if delta is None:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"base_sha256 {request.base_sha256[:12]}: no delta from that base is served (fetch the "
                               "manifest again: the full package)")
        return delta

    def GetManifest(self, request: pb.ManifestRequest, context: grpc.ServicerContext) -> pb.Manifest:
        try:
            with self.calls.admit():
                package = self._package(request.model, request.split_point, request.order, request.held_sha256)
        except Overloaded as err:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
        except RequestError as err:
            abort(context, err)
        return manifest_message(package.manifest)

    def StreamWeights(self, request: pb.WeightRequest, context: grpc.ServicerContext):
        def messages() -> Iterator[pb.WeightChunk]:
            if not request.model.digest:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                                   "model.digest: required (the manifest's: it names the version streamed)")
            if not request.package_digest:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                                   "package_digest: required (the manifest's: it names the package streamed)")
            package = self._streamed(request)
            return weight_messages(package, request.from_chunk, self.message_bytes, request.package_digest)

        yield from self._stream(messages, context)

    def GetCheckpoint(self, request: pb.CheckpointRequest, context: grpc.ServicerContext):
        def chunks() -> Iterator[pb.CheckpointChunk]:
            return iter(checkpoint_chunks(self.inference.models.resolve(request.model), CHUNK_BYTES))

        yield from self._stream(chunks, context)


@contextlib.contextmanager
def _build_errors() -> Iterator[None]:
    """A package build's refusals as the statuses they get: BuildsBusy RESOURCE_EXHAUSTED, BuildFailed INTERNAL."""
    try:
        yield
    except BuildsBusy as err:
        raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err)) from None
    except BuildFailed as err:
        raise RequestError(grpc.StatusCode.INTERNAL, str(err)) from None


def abort(context: grpc.ServicerContext, err: RequestError) -> None:
    """End the call with ``err``'s status, detail and trailing metadata (raises, as ``context.abort``)."""
    if err.trailing:
        context.set_trailing_metadata(err.trailing)
    context.abort(err.code, err.detail)


class TokenInterceptor(grpc.ServerInterceptor):
    """Refuses calls without ``authorization: Bearer <token>`` (UNAUTHENTICATED), reflection included; only
    health checks stay open (orchestrators probe without credentials)."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith("/grpc.health.v1.Health/"):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        given = metadata.get("authorization", "")
        # Constant-time: a byte-by-byte == would tell a caller how much of a guessed token was right.
        if hmac.compare_digest(given.encode() if isinstance(given, str) else given, self._expected):
            return handler
        return _denial(handler)


def _denial(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` (unary or streaming on either side) that answers
    UNAUTHENTICATED: gRPC needs the kinds to match to read the request."""

    def deny(_request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

    kinds = {(False, False): grpc.unary_unary_rpc_method_handler,
             (False, True): grpc.unary_stream_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler,
             (True, True): grpc.stream_stream_rpc_method_handler}
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(deny, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


@dataclass
class CloudServer:
    server: grpc.Server
    port: int
    batcher: DynamicBatcher
    health: health.HealthServicer
    servicer: InferenceServicer
    grace_seconds: float
    packages: PackageCache
    forward_timeout_s: float = 60.0
    worker: Optional[ForwardWorker] = None
    hung: bool = False  # an in-process forward is hung (health NOT_SERVING until it returns)
    exporter: Optional[Exporter] = None  # /metrics, when metrics_address is set
    idle: Optional[IdleCalls] = None  # closes idle InferStreams
    delivery: Optional["ModelDeliveryServicer"] = None
    folder: Optional[ModelFolder] = None  # the model folder polled, when checkpoint names one
    _stop_watch: threading.Event = field(default_factory=threading.Event)

    @property
    def models(self) -> ModelRegistry:
        return self.servicer.models

    def use_worker(self, worker: Optional[ForwardWorker]) -> None:
        """Run the forwards in ``worker`` (which must hold every version added from now on) or in-process."""
        self.worker = worker
        self.servicer.forward = worker.run if worker is not None else None
        # The longest a call waits for its result, whatever its deadline: a batch ahead of it and its own (the
        # watchdog fails a longer forward first), and a worker process that must be started again.
        self.servicer.result_timeout_s = 2 * self.forward_timeout_s + 1.0 + (START_TIMEOUT_S if worker else 0.0)

    def set_model(self, served: ServedModel, worker: Optional[ForwardWorker] = None, rank: tuple = ()) -> None:
        """Serve ``served`` as a version (its forward in ``worker`` when given, which must hold it); health turns
        SERVING. Raises VersionRefused."""
        self.use_worker(worker)
        self.models.add(served, rank)
        self.serving()

    def serving(self) -> None:
        """Health SERVING (once a version is loaded)."""
        self._set_health(health_pb2.HealthCheckResponse.SERVING)

    def watch(self, folder: ModelFolder) -> None:
        """Poll ``folder`` for new and removed versions until ``stop``."""
        self.folder = folder
        folder.start()

    def unloaded(self, served: ServedModel) -> None:
        """A retired version's last request has finished: free its packages and its forward process copy."""
        self.packages.drop(served.digest)
        if self.worker is not None:
            self.worker.unload(served.digest)

    def _set_health(self, status: int) -> None:
        for name in HEALTH_NAMES:
            self.health.set(name, status)

    def start_watchdog(self, period_s: float = 0.5) -> None:
        threading.Thread(target=self._watch, args=(period_s,), name="spinn-watchdog", daemon=True).start()

    def _watch(self, period_s: float) -> None:
        """Fail a batch whose forward runs past ``forward_timeout_s`` (its callers get UNAVAILABLE at once). A
        worker process is killed, so the batcher goes on and the next batch starts a new one; a forward in this
        process cannot be killed, so health says NOT_SERVING until it returns."""
        while not self._stop_watch.wait(period_s):
            running = self.batcher.running_for()
            if self.worker is not None:  # loading a new worker process is not a hung forward
                running = self.worker.busy_for(running)
            if running > self.forward_timeout_s and not self.hung:
                if self.worker is None:  # before its callers are answered: a health check they send says so
                    self.hung = True
                    self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
                failed = self.batcher.fail_running(ForwardHung(
                    f"the forward hung (over {self.forward_timeout_s:g} s, forward_timeout_s); retry"))
                log.error("forward running for %.1f s: failed its %d requests; %s", running, failed,
                          "killing the worker process" if self.worker else "NOT_SERVING until it returns")
                if self.worker is not None:
                    self.worker.kill()
            elif self.hung and running == 0.0:
                self.hung = False
                log.warning("the hung forward returned; SERVING again")
                self._set_health(health_pb2.HealthCheckResponse.SERVING)

    def stop(self) -> None:
        """Graceful shutdown: NOT_SERVING, refuse new RPCs, let in-flight ones finish (``grace_seconds``), then
        stop the batcher and the worker; bounded even when a forward is hung."""
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.folder is not None:
            self.folder.close()
        self.server.stop(self.grace_seconds).wait(self.grace_seconds + 5)
        self._stop_watch.set()
        self.batcher.close(drain=True, timeout_s=self.grace_seconds)
        if self.worker is not None:
            self.worker.close()
        if self.idle is not None:
            self.idle.close()
        if self.exporter is not None:
            self.exporter.stop()


def intra_op_threads_for(cfg: CloudConfig, cores: int | None = None) -> int:
    """Torch intra-op threads for the daemon: the configured number, or (0) all cores but one.

    The gRPC threads need a core of their own: when they share every core with the intra-op pool, each op's
    barrier waits for a preempted worker, and bench/serving.py measured the forward 1.7-2.3x slower per image
    on 2 cores than with one core left free.
    """
    if cfg.intra_op_threads:
        return cfg.intra_op_threads
    return max(1, (cores or os.cpu_count() or 1) - 1)


def build_server(cfg: CloudConfig, served: Optional[ServedModel]) -> CloudServer:
    """Assemble and start the gRPC server, serving ``served`` as its one version; returns it with the port it
    listens on.

    With ``served=None`` the port opens at once with health NOT_SERVING and Inference calls answered
    UNAVAILABLE, until versions are added (``CloudServer.set_model``, ``serve``): orchestrators see a loading
    daemon, not a dead one.
    """
    servicer: InferenceServicer  # assigned below; the batcher calls it only once requests arrive
    batcher = DynamicBatcher(lambda s, x: servicer.run_batch(s, x), cfg.max_batch_size,
                             cfg.max_queue_delay_ms, cfg.max_queue_size, cfg.forward_nice)
    options = [("grpc.max_receive_message_length", cfg.max_message_bytes),
               ("grpc.max_send_message_length", cfg.max_message_bytes),
               # devices keep idle channels alive with pings (device config keepalive_ms >= 10 s)
               ("grpc.keepalive_permit_without_calls", 1),
               ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
               ("grpc.http2.max_ping_strikes", 0),
               *pending_call_options(cfg.max_pending_calls)]
    token = cfg.token()
    if cfg.auth_token_file and not token_file_is_private(cfg.auth_token_file):
        log.warning("token file %s may be read by other users (chmod 600 it)", cfg.auth_token_file)
    interceptors = [TokenInterceptor(token)] if token else []
    # Calls beyond the pool wait in gRPC's queue; this bounds it (refused RESOURCE_EXHAUSTED beyond). Admission
    # (max_in_flight, max_infer_streams, max_delivery_calls) refuses earlier, so the pool always has threads left
    # for health checks.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=cfg.rpc_threads), options=options,
                         interceptors=interceptors, maximum_concurrent_rpcs=QUEUED_PER_THREAD * cfg.rpc_threads)
    idle = IdleCalls(cfg.infer_stream_idle_seconds)
    registry = ModelRegistry(cfg.model_id, cfg.keep_versions)
    servicer = InferenceServicer(registry, batcher, cfg.max_batch_size, load_codec_table(cfg.codec_table),
                                 Admission(cfg.max_in_flight, "max_in_flight"),
                                 streams=Admission(cfg.max_infer_streams, "max_infer_streams", "InferStreams"),
                                 idle=idle)
    idle.on_close = servicer.metrics.idle_stream_closed
    pb_grpc.add_InferenceServicer_to_server(servicer, server)
    signer = Signer.from_file(cfg.delivery_signing_key) if cfg.delivery_signing_key else None
    packages = PackageCache(cfg.delivery_cache_packages, cfg.delivery_chunk_bytes, cfg.delivery_bits,
                            cfg.delivery_usable_planes, cfg.delivery_cache_bytes, cfg.max_package_builds, signer,
                            cfg.delivery_plane_coder, cfg.delivery_snr_db)
    delivery = ModelDeliveryServicer(servicer, packages, cfg.delivery_message_bytes,
                                     Admission(cfg.max_delivery_calls, "max_delivery_calls", "delivery calls"))
    registry.on_unload = lambda unloaded: running.unloaded(unloaded)
    pb_grpc.add_ModelDeliveryServicer_to_server(delivery, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, DELIVERY_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    try:
        if cfg.tls_cert:
            creds = grpc.ssl_server_credentials(
                [(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())],
                root_certificates=Path(cfg.tls_client_ca).read_bytes() if cfg.tls_client_ca else None,
                require_client_auth=cfg.tls_client_ca is not None,
            )
            port = server.add_secure_port(cfg.address, creds)
        else:
            port = server.add_insecure_port(cfg.address)
    except RuntimeError:  # grpcio raises (older releases returned 0) when it cannot bind
        port = 0
    if port == 0:
        batcher.close(drain=False)
        idle.close()
        raise ConfigError(f"config key 'address': cannot listen on {cfg.address!r}")
    for name in HEALTH_NAMES:
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    server.start()
    running = CloudServer(server, port, batcher, health_servicer, servicer, cfg.grace_seconds, packages,
                          cfg.forward_timeout_s, idle=idle, delivery=delivery)
    running.start_watchdog()
    if cfg.metrics_address is not None:
        try:
            running.exporter = start_exporter(cfg.metrics_address, servicer.metrics.registry)
        except ConfigError:
            running.stop()
            raise
    if served is not None:
        running.set_model(served)
    return running


def serve(cfg: CloudConfig) -> int:
    """Open the port (NOT_SERVING), load the versions, serve until SIGTERM/SIGINT, drain, return 0.

    A checkpoint (of a file or list config) that fails to load stops the server and re-raises (the CLI exits 2
    naming the file); in a model folder a bad file is logged and skipped, and the daemon serves what loads.
    """
    _check_sources(cfg)
    # Process-wide, so set by the daemon, not build_server; with a worker process this one only decodes.
    torch.set_num_threads(1 if cfg.forward_process else intra_op_threads_for(cfg))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    running = build_server(cfg, None)
    log.info("listening on port %d; loading %s", running.port, cfg.checkpoint)
    try:
        folder = load_versions(cfg, running)
    except BaseException:
        running.stop()
        raise
    # Under a 4x flood, full collections over torch's and the model's objects held the GIL for up to 140 ms,
    # and health checks waited behind them; after the freeze the longest took 10 ms (README, Reliability).
    # Before SERVING, so the collection first (the loading's own cycles) delays nobody.
    gc.collect()
    log.info("froze %d start-up objects out of the garbage collector's reach", freeze_heap())
    running.serving()
    for served in running.models.versions():
        log.info("serving %s version %s (digest %s) on port %d", cfg.model_id, served.model_version, served.digest,
                 running.port)
    if folder is not None:
        running.watch(folder)
    _prebuild(cfg, running)
    stop.wait()
    log.info("draining and shutting down")
    running.stop()
    return 0


def _check_sources(cfg: CloudConfig) -> None:
    """ConfigError naming ``checkpoint`` when a file it lists does not exist."""
    if cfg.model_dir() is None:
        for path in cfg.checkpoint_files():
            if not path.is_file():
                raise ConfigError(f"config key 'checkpoint': file {str(path)!r} does not exist (nor a folder)")


def load_versions(cfg: CloudConfig, running: CloudServer) -> Optional[ModelFolder]:
    """Load every version (into a forward process too, with ``forward_process``) before SERVING; returns the
    folder to poll when ``checkpoint`` is one. Raises ConfigError / CheckpointError / WorkerError."""
    device = resolve_device(cfg.torch_device, "torch_device")
    if cfg.forward_process:
        worker = ForwardWorker(device, intra_op_threads_for(cfg), cfg.forward_nice)
        running.use_worker(worker)
        # The worker owns the models that compute; this process keeps CPU copies for metadata and packages.
        running.models.before_add = lambda served: worker.load(served.digest, served.checkpoint_bytes,
                                                               served.source)
        device = torch.device("cpu")

    def load(path: Path, label: Optional[str]) -> ServedModel:
        # while serving other versions: no collection over the whole heap mid-load, and the new model's objects
        # frozen after it, as the start-up heap is (serving/heap.py)
        with collection_paused():
            served = ServedModel.from_file(str(path), cfg.model_id, label, device)
            freeze_heap()  # before collection resumes: else the next allocation scans every object just made
        beyond = [s for s in cfg.delivery_prebuild if s > served.model.num_blocks]
        if beyond:
            raise ConfigError(f"config key 'delivery_prebuild': split point {beyond[0]} is beyond the model's "
                              f"{served.model.num_blocks} blocks")
        return served

    folder_path = cfg.model_dir()
    if folder_path is not None:
        folder = ModelFolder(folder_path, running.models, load, cfg.model_dir_poll_seconds, BACKGROUND_NICE)
        folder.scan(settled=True)
        # versions found later are packaged as soon as they load, on the poller's thread, before devices ask
        folder.on_loaded = lambda served: _prebuild(cfg, running, served)
        if not running.models.versions():
            raise ConfigError(f"config key 'checkpoint': no loadable <version>.pt checkpoint in folder "
                              f"{str(folder_path)!r} (see the log for each file's reason)")
        return folder
    files = cfg.checkpoint_files()
    for rank, path in enumerate(files):
        label = cfg.model_version if len(files) == 1 and not isinstance(cfg.checkpoint, list) else path.stem
        try:
            running.models.add(load(path, label), (rank,))
        except VersionRefused as err:
            raise ConfigError(f"config key 'checkpoint': {err}") from None
    return None


def _prebuild(cfg: CloudConfig, running: CloudServer, served: Optional[ServedModel] = None) -> None:
    """The packages of ``delivery_prebuild`` for ``served`` (default: the latest version), so that the first device
    does not wait for them."""
    served = served or running.models.latest()
    for split_point in cfg.delivery_prebuild:
        try:
            running.packages.get(served, split_point, "split")
        except (BuildsBusy, BuildFailed) as err:  # a device asked first: its build serves it
            log.warning("prebuilding the package for split point %d: %s", split_point, err)
