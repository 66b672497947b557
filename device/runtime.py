"""The device runtime: early exits on the device, offload with a deadline, a fallback that never loses an answer."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import grpc
import torch
from torch import Tensor

from device.adaptive import Adaptive
from device.breaker import CircuitBreaker
from device.cache import CacheLock
from device.delivery import Snapshot, StreamedModel
from device.config import DeviceConfig
from device.images import decode_image
from device.link import NETWORK_CODES, CloudLink, LinkError
from device.metrics import DeviceMetrics
from device.skew import SkewGate, describe, served_versions
from device.stats import BlockTimes, LinkStats
from models.checkpoint import Checkpoint, CheckpointError, load_checkpoint, load_checkpoint_bytes
from models.config import ConfigError
from models.datasets import Preprocess
from models.exit_policy import confidence
from models.identity import short_digest
from models.offline_profile import JPEG, ProfileError, load_profile
from models.hardware import follow, resolve_device
from models.early_exit import EarlyExitMobileNetV2, run_segment
from models.partition import Head, bottleneck_at, check_split_point, head
from proto import spinn_v1_pb2 as pb
from proto.codec import CodecSpec, encode, encode_code_message, encode_jpeg
from serving.admission import Admission
from serving.heap import freeze_heap
from serving.signing import Verifier

log = logging.getLogger("device")

OFFLINE_CODEC = CodecSpec("int8", "zstd")  # until the cloud can be asked for its default
MANIFEST_TIMEOUT_S = 30.0  # a cloud builds a package on the first GetManifest (seconds for MobileNetV2)


@dataclass
class ClassifyResult:
    """One answer. ``answered_by`` is ``device:exit-K`` (K = block boundary) or ``cloud``; ``degraded`` means the
    cloud was wanted but failed or was skipped (``reason`` says why); ``latency_ms`` is wall time on the device,
    ``bytes_sent`` the size of the feature request (0 when a device exit answered with confidence)."""

    class_id: int
    label: str
    confidence: float
    answered_by: str
    degraded: bool
    reason: str
    bytes_sent: int
    latency_ms: float
    top_k: list[tuple[int, str, float]] = field(default_factory=list)
    model_version: str = ""
    model_digest: str = ""  # the version that answered: the head's, and the cloud's tail when it answered
    split_point: int = 0
    weights_fraction: float = 1.0  # share of the model's weight bits the device holds
    head_bits: float = 32.0  # mean bits per weight of the head (32: a float32 checkpoint)
    codec: str = ""  # what the features were sent as (int8+zstd, learned+ans, jpeg, ...); "" when nothing was sent

    def to_json(self, image: Optional[str] = None) -> dict:
        """The JSON object of ``python -m device classify --json`` (``image`` first when given)."""
        out = {} if image is None else {"image": image}
        out.update({k: v for k, v in asdict(self).items() if k != "top_k"})
        out["top_k"] = [{"class_id": c, "label": n, "probability": p} for c, n, p in self.top_k]
        return out


class NoModelError(RuntimeError):
    """The device holds no model yet (streaming, the cloud not reached and nothing cached)."""


@dataclass(frozen=True)
class ActiveModel:
    """What one request runs on, read once at its start: swapping in a new one is a single reference store,
    so a request never sees a half-updated model nor mixes two versions."""

    model: Optional[EarlyExitMobileNetV2]  # None: no weights yet (streaming): every image goes to the cloud
    head: Optional[Head]
    ref: pb.ModelRef
    class_names: list[str]
    preprocess: Preprocess
    complete: bool  # the whole model at full precision: a failed offload may run on to the final classifier
    weights_fraction: float = 1.0
    head_bits: float = 32.0
    threshold: float = 1.0  # the plan is (head, threshold): one store publishes both
    usable: bool = True  # the head of the configured split has arrived (streaming); False: only split 0
    transform: Callable = field(init=False, repr=False, compare=False)  # from ``preprocess``

    def __post_init__(self) -> None:
        object.__setattr__(self, "transform", self.preprocess.eval_transform())

    @property
    def split_point(self) -> int:
        return 0 if self.head is None else self.head.split_point

    @property
    def wire_ref(self) -> pb.ModelRef:
        """What a request names: the model and its digest (the label is this device's own name for it)."""
        return pb.ModelRef(model_id=self.ref.model_id, digest=self.ref.digest)


def weightless(info: pb.ModelInfo, threshold: float = 1.0) -> ActiveModel:
    """What a device with no weights serves: every image offloaded at split point 0 (the cloud runs the whole
    model), with the preprocessing and class names from the cloud's ModelInfo."""
    pre = Preprocess(info.input_size, info.resize_size, tuple(info.mean), tuple(info.std))  # type: ignore[arg-type]
    return ActiveModel(None, None, info.model, list(info.class_names), pre, complete=False, weights_fraction=0.0,
                       head_bits=0.0, threshold=threshold, usable=False)


def split_codecs(info: pb.ModelInfo) -> dict[int, CodecSpec]:
    """The cloud's default codec of every split point it announces (unknown codecs left out)."""
    out = {}
    for split in info.split_points:
        try:
            out[split.split_point] = CodecSpec.from_message(split.default_codec)
        except ValueError:
            continue
    return out


def wire_codec_name(features: pb.Tensor) -> str:
    """The name of the codec a feature message carries (``jpeg`` for an input JPEG)."""
    if features.codec.quantization == pb.Codec.JPEG:
        return JPEG
    return CodecSpec.from_message(features.codec, per_channel=len(features.codec.scale) > 1).name


def has_encoder(active: Optional[ActiveModel], split_point: int) -> bool:
    """Whether the model ``active`` runs has its bottleneck at ``split_point`` (so it can send a learned code)."""
    return active is not None and active.model is not None and bottleneck_at(active.model, split_point) is not None


def _top_k(logits: Tensor, names: list[str], k: int) -> list[tuple[int, str, float]]:
    probs = torch.softmax(logits.float(), dim=-1)
    values, ids = probs.topk(min(k, probs.shape[-1]))
    return [(int(c), names[int(c)], float(p)) for p, c in zip(values, ids)]


def reply_scores(reply: pb.Prediction, num_classes: int) -> list[tuple[int, str, float]]:
    """The top-k ``(class id, name, probability)`` of the one image of ``reply``.

    Raises ValueError saying what is wrong with a reply that cannot be an answer (no image, an empty top-k, a
    class id outside ``[0, num_classes)``, a probability outside [0, 1]): the caller falls back to a device
    exit instead of losing the answer.
    """
    if len(reply.images) != 1:
        raise ValueError(f"{len(reply.images)} images in the prediction, 1 expected")
    scores = [(c.class_id, c.name, c.probability) for c in reply.images[0].top_k]
    if not scores:
        raise ValueError("an empty top_k")
    for class_id, _, p in scores:
        if not 0 <= class_id < num_classes:
            raise ValueError(f"class_id {class_id} outside 0..{num_classes - 1}")
        if not 0.0 <= p <= 1.0:  # also false for NaN
            raise ValueError(f"probability {p} outside [0, 1]")
    return scores


def downloaded_checkpoint(link: CloudLink, timeout_s: float, latest: bool = False) -> Checkpoint:
    """The cloud's checkpoint file (``CloudLink.fetch_checkpoint``), loaded; CheckpointError when its content is
    not the model digest the cloud announced for it, LinkError when the download failed."""
    data, announced = link.fetch_checkpoint(timeout_s, latest=latest)
    checkpoint = load_checkpoint_bytes(data, f"cloud {link.target}")
    if announced and announced != checkpoint.digest:
        raise CheckpointError(f"checkpoint from {link.target}: the cloud announced digest {announced}, the file "
                              f"holds {checkpoint.digest}")
    return checkpoint


class DeviceRuntime:
    """Holds ``head(split_point)`` (with the exits before the split), the threshold, the codec and the link.

    ``classify_*`` are safe to call from several threads at once; a network fault never raises.
    """

    def __init__(self, cfg: DeviceConfig, checkpoint: Optional[Checkpoint], link: Optional[CloudLink],
                 codec: Optional[CodecSpec]) -> None:
        """``codec`` None: the cloud has not told its default yet; offload with OFFLINE_CODEC and ask it again
        after the first offload it answers. ``checkpoint`` None: no model until ``install`` (streaming)."""
        self.cfg = cfg
        self.torch_device = resolve_device(cfg.torch_device, "torch_device")
        self.active: Optional[ActiveModel] = None
        self.streamed: Optional[StreamedModel] = None
        if checkpoint is not None:
            self._check_split(checkpoint.model)
            self._check_codec(checkpoint.model)
            ref = pb.ModelRef(model_id=cfg.model_id, model_version=cfg.model_version or short_digest(checkpoint.digest),
                              digest=checkpoint.digest)
            model = checkpoint.model.eval().to(self.torch_device)
            self.active = ActiveModel(model, head(model, cfg.split_point), ref, checkpoint.class_names,
                                      checkpoint.preprocess, complete=True, threshold=cfg.z_confidence_threshold)
        self.codec = codec or OFFLINE_CODEC
        self.split_codecs: dict[int, CodecSpec] = {}  # the cloud's default codec per split (GetModelInfo)
        self._ask_codec = codec is None and link is not None
        self.adaptive: Optional[Adaptive] = None  # the scheduler's thread (scheduler: true)
        self.cache_lock: Optional[CacheLock] = None  # held on weights_cache while streaming
        self._last_activation: Optional[tuple[ActiveModel, Tensor]] = None
        self.probe_bytes = 0  # bytes of link probes (not part of any answer)
        self.last_request_t = float("-inf")  # time.monotonic of the last classify
        self._plan_split = cfg.split_point  # where the scheduler (or set_plan) wants the head
        self._plan_lock = threading.Lock()  # install (stream thread) and set_plan (scheduler) read-modify-write
        self.link = link
        self.link_stats = LinkStats(cfg.ewma_alpha)
        self.block_times = BlockTimes(cfg.ewma_alpha)
        self.breaker = CircuitBreaker(cfg.breaker_failures, self._probe, cfg.breaker_probe_seconds)
        self.skew = SkewGate(cfg.skew_retry_seconds)
        self._refetching = threading.Lock()  # one download of the cloud's checkpoint at a time (checkpoint: cloud)
        self.rpc_calls = 0  # Infer calls actually attempted (tests count them)
        self._computing = 0  # requests whose head is computing (``busy``)
        self._calls_lock = threading.Lock()
        self.admission = Admission(cfg.max_in_flight, "max_in_flight", "classify calls")
        self.metrics = DeviceMetrics(lambda: self.active.weights_fraction if self.active else 0.0,
                                     lambda: self.admission.in_flight)

    @classmethod
    def start(cls, cfg: DeviceConfig) -> "DeviceRuntime":
        """Connect, load the checkpoint (local file, or ``checkpoint: cloud`` to download it) and pick the
        codec (config, else the cloud's default for the split point, else int8+zstd when the cloud is down).

        Raises ConfigError / CheckpointError with the key or file named.
        """
        if cfg.intra_op_threads:
            torch.set_num_threads(cfg.intra_op_threads)
        link = CloudLink(cfg)
        if cfg.checkpoint == "stream":
            return cls._start_streaming(cfg, link)
        if cfg.checkpoint == "cloud":
            try:
                checkpoint = downloaded_checkpoint(link, max(30.0, cfg.deadline_ms / 1000))
            except (LinkError, CheckpointError) as err:
                link.close()
                raise CheckpointError(f"config key 'checkpoint' is 'cloud' but {err}") from None
        else:
            checkpoint = load_checkpoint(cfg.checkpoint)
        info = cls._model_info(link, cfg)
        codec = cfg.codec_spec() or (None if info is None else cls._codec_from_info(info, cfg))
        runtime = cls(cfg, checkpoint, link, codec)
        runtime._adopt_info_and_schedule(info)
        freeze_heap()
        ref = runtime.active.ref
        if info is not None and ref.digest not in {v.digest for v in info.versions}:
            log.warning("version skew: cloud serves %s, device holds %s: offloads will be answered on the device "
                        "(degraded)%s", ", ".join(describe(v.model_version, v.digest) for v in info.versions),
                        describe(ref.model_version, ref.digest),
                        "; following the cloud's version" if cfg.checkpoint == "cloud" else "")
        log.info("device ready: %s version %s (digest %s), split point %d, threshold %.2f, codec %s, cloud %s%s",
                 ref.model_id, ref.model_version, ref.digest, cfg.split_point, cfg.z_confidence_threshold,
                 runtime.codec.name, link.target, ", scheduler on" if runtime.adaptive else "")
        return runtime

    def _adopt_info_and_schedule(self, info: Optional[pb.ModelInfo]) -> None:
        """The cloud's codec per split from ``info`` (when it answered), then the scheduler; on a ConfigError
        everything started so far is closed before it is raised."""
        if info is not None:
            self.split_codecs = split_codecs(info)
        try:
            self.start_scheduler(info)
        except ConfigError:
            self.close()
            raise

    def start_scheduler(self, info: Optional[pb.ModelInfo] = None) -> None:
        """With ``scheduler: true``: load the profile and start the scheduler's thread (ConfigError naming
        the key when the profile does not fit the model, or ``info``'s while no weights have arrived)."""
        if not self.cfg.scheduler:
            return
        path = self.cfg.profile_path()
        if path is None:
            raise self.cfg.missing_profile()
        try:
            profile = load_profile(path)
        except ProfileError as err:
            raise ConfigError(f"config key 'profile': {err}") from None
        active = self.active
        shape = None
        if active is not None and active.model is not None:
            shape = (active.model.num_blocks, list(active.model.exit_points))
        elif info is not None:  # streaming, no weights yet: the cloud's ModelInfo describes the model
            shape = (max((s.split_point for s in info.split_points), default=0), list(info.exit_points))
        if shape is not None and (profile.num_blocks, profile.exit_points) != shape:
            raise ConfigError(f"config key 'profile': {path!r} profiles {profile.num_blocks} blocks with "
                              f"exits {profile.exit_points}; the model has {shape[0]} with exits {shape[1]}")
        cfg = self.cfg
        self.adaptive = Adaptive(self, profile, cfg.objective_spec(profile.final_accuracy),
                                 cfg.scheduler_interval_seconds,
                                 cfg.scheduler_margin, cfg.probe_interval_seconds, cfg.initial_bandwidth_mbit * 1e6,
                                 cfg.initial_rtt_ms)
        self.adaptive.start()

    @classmethod
    def _start_streaming(cls, cfg: DeviceConfig, link: CloudLink) -> "DeviceRuntime":
        """A device with no weights: one GetModelInfo gives the preprocessing, so it offloads its first image
        at split point 0 at once; the manifest and the chunks follow on threads of their own."""
        info = cls._model_info(link, cfg)
        codec = cfg.codec_spec() or (None if info is None else cls._codec_from_info(info, cfg))
        try:
            lock = CacheLock(Path(cfg.weights_cache))  # one process per cache: two would overwrite each other
        except ConfigError:
            link.close()
            raise
        runtime = cls(cfg, None, link, codec)
        runtime.cache_lock = lock
        if info is not None:
            runtime.active = weightless(info, cfg.z_confidence_threshold)
        verifier = Verifier.from_file(cfg.delivery_public_key) if cfg.delivery_public_key else None
        runtime.streamed = StreamedModel(
            link, Path(cfg.weights_cache), cfg.split_point, cfg.stream_order, runtime.torch_device, runtime.install,
            cfg.stream_poll_seconds, MANIFEST_TIMEOUT_S, nice=cfg.stream_nice,
            decode_process=cfg.stream_decode_process, swap_interval_s=cfg.stream_swap_ms / 1000.0,
            verifier=verifier, max_package_bytes=cfg.max_package_bytes)
        freeze_heap()  # before the stream's swaps start making short-lived modules
        runtime.streamed.start()
        runtime._adopt_info_and_schedule(info)
        active = runtime.active
        log.info("device streaming its weights: split point %d once usable (now %s), threshold %.2f, cloud %s",
                 cfg.split_point, "no model" if active is None else active.split_point, cfg.z_confidence_threshold,
                 link.target)
        return runtime

    def _check_split(self, model: EarlyExitMobileNetV2) -> None:
        try:
            check_split_point(model, self.cfg.split_point)
        except ValueError as err:
            raise ConfigError(f"config key 'split_point': {err}") from None

    def _check_codec(self, model: EarlyExitMobileNetV2) -> None:
        """ConfigError naming ``codec`` when it is learned and ``model`` has no bottleneck at ``split_point``."""
        spec, split = self.cfg.codec_spec(), self.cfg.split_point
        if spec is not None and spec.learned and bottleneck_at(model, split) is None:
            has = "none" if model.bottleneck is None else f"one at split point {model.bottleneck.config.split_point}"
            raise ConfigError(f"config key 'codec': {spec.name} needs the checkpoint's bottleneck at split_point "
                              f"{split}; it has {has}")

    def install(self, snapshot: Snapshot) -> None:
        """Serve ``snapshot`` from the next request on: at the configured split point once its head is usable,
        before that at split point 0 (the cloud runs the whole network on the input)."""
        model, progress = snapshot.checkpoint.model, snapshot.progress
        self._check_split(model)
        m = snapshot.manifest
        with self._plan_lock:
            split = 0
            if progress.complete:
                split = self._plan_split
            elif progress.usable:
                split = min(self._plan_split, self.cfg.split_point)
            previous = self.active
            self.active = ActiveModel(
                model, head(model, split), pb.ModelRef(model_id=m.model_id, model_version=m.model_version,
                                                       digest=m.model_digest),
                snapshot.checkpoint.class_names, snapshot.checkpoint.preprocess, complete=progress.complete,
                weights_fraction=progress.weights_fraction, head_bits=progress.head_bits,
                threshold=previous.threshold if previous is not None else self.cfg.z_confidence_threshold,
                usable=progress.usable)
        if previous is None or (previous.split_point, previous.ref.digest) != (split, m.model_digest):
            log.info("serving %s version %s (digest %s) at split point %d (head %.1f bits per weight)", m.model_id,
                     m.model_version, m.model_digest, split, progress.head_bits)

    def _current(self) -> ActiveModel:
        active = self.active
        if active is None:
            raise NoModelError("no model yet: the cloud has not been reached and the weights cache is empty")
        return active

    @property
    def model(self) -> EarlyExitMobileNetV2:
        return self._current().model

    @property
    def head(self) -> Head:
        return self._current().head

    @property
    def class_names(self) -> list[str]:
        return self._current().class_names

    @staticmethod
    def _model_info(link: CloudLink, cfg: DeviceConfig) -> Optional[pb.ModelInfo]:
        try:
            return link.model_info(timeout_s=max(1.0, cfg.deadline_ms / 1000))
        except grpc.RpcError as err:
            log.warning("cloud %s did not answer GetModelInfo (%s); using %s until it does", link.target,
                        err.code().name, OFFLINE_CODEC.name)
            return None

    @staticmethod
    def _codec_from_info(info: pb.ModelInfo, cfg: DeviceConfig) -> CodecSpec:
        for split in info.split_points:
            if split.split_point == cfg.split_point:
                try:
                    return CodecSpec.from_message(split.default_codec)
                except ValueError:
                    break
        return OFFLINE_CODEC

    def set_threshold(self, threshold: float) -> None:
        """Change the confidence threshold for the next requests (test.py --live sweeps it; a scheduler tunes it)."""
        active = self.active
        self.set_plan(active.split_point if active is not None else self.cfg.split_point, threshold)

    @property
    def threshold(self) -> float:
        active = self.active
        return active.threshold if active is not None else self.cfg.z_confidence_threshold

    def plan_splits(self) -> tuple[list[int], bool]:
        """The split points a plan may use now, and whether the device holds the whole model (then at the last
        split it answers with the final classifier itself). While weights stream in, only the splits whose
        head has arrived: up to the configured split once it is usable, else split point 0."""
        return self._allowed(self.active)

    def _allowed(self, active: Optional[ActiveModel]) -> tuple[list[int], bool]:
        if active is None or active.model is None:
            return [0], False
        n = active.model.num_blocks
        if active.complete:
            return list(range(n + 1)), True
        if active.usable:
            return list(range(min(self.cfg.split_point, n) + 1)), False
        return [0], False

    def set_plan(self, split_point: int, threshold: float) -> None:
        """Serve at ``split_point`` with ``threshold`` from the next request on, without a pause: the head of
        any split is a slice of the weights the device holds, and head and threshold are published by one
        reference store, so a request runs on the old plan or the new one, never a mix. ValueError (nothing
        changed) for a threshold outside [0, 1] or a split point not usable now."""
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"z_confidence_threshold must be in [0, 1], got {threshold}")
        with self._plan_lock:
            active = self.active
            if active is None:
                self.cfg.z_confidence_threshold = threshold
                return
            if active.model is None:  # no weights yet: split 0 whatever the plan says
                self.active = dataclasses.replace(active, threshold=threshold)
                return
            try:
                check_split_point(active.model, split_point)
            except ValueError as err:
                raise ValueError(f"set_plan: {err}") from None
            allowed, _ = self._allowed(active)
            if split_point not in allowed:
                raise ValueError(f"set_plan: split point {split_point} is not usable yet (usable: {allowed})")
            self._plan_split = split_point
            new_head = active.head if split_point == active.split_point else head(active.model, split_point)
            self.active = dataclasses.replace(active, head=new_head, threshold=threshold)
        if split_point != active.split_point:
            log.info("split point %d -> %d, threshold %.3f", active.split_point, split_point, threshold)

    def codec_for(self, split_point: int) -> CodecSpec:
        """The codec of an offload at ``split_point``: the config's, else the cloud's default for that split."""
        if split_point == self.cfg.split_point:
            return self.codec
        return self.cfg.codec_spec() or self.split_codecs.get(split_point, OFFLINE_CODEC)

    def sendable_codec(self, active: Optional[ActiveModel], split_point: int) -> CodecSpec:
        """``codec_for(split_point)``, except that a learned codec needs the bottleneck's encoder at that split
        in the model ``active`` runs: without it (another version, a split elsewhere) int8+zstd."""
        spec = self.codec_for(split_point)
        if spec.learned and not has_encoder(active, split_point):
            return OFFLINE_CODEC
        return spec

    def codec_names(self) -> dict[int, str]:
        """Per split point, the name of what an offload there sends ("jpeg" for a JPEG of the input)."""
        active = self.active
        n = active.model.num_blocks if active is not None and active.model is not None else 0
        names = {s: self.sendable_codec(active, s).name for s in range(1, n + 1)}
        if self._jpeg_input():
            names[0] = JPEG
        else:
            names[0] = self.cfg.codec if self.cfg.split_point == 0 and self.cfg.codec else self.cfg.input_codec
        return names

    def _jpeg_input(self) -> bool:
        return self.cfg.input_codec == "jpeg" and not (self.cfg.split_point == 0 and self.cfg.codec)

    # -- classification -------------------------------------------------------------------------------------

    def classify_bytes(self, data: bytes, top_k: Optional[int] = None) -> ClassifyResult:
        """Classify an encoded image (JPEG/PNG bytes). Raises device.images.ImageError for bad bytes only."""
        started = time.perf_counter()
        image = decode_image(data, self.cfg.max_image_bytes, self.cfg.max_image_pixels, self.cfg.max_image_aspect)
        active = self._current()
        return self._measured(self._classify(active, active.transform(image), top_k, started))

    def classify_tensor(self, x: Tensor, top_k: Optional[int] = None,
                        started: Optional[float] = None) -> ClassifyResult:
        """Classify one preprocessed image ``(3, H, W)`` (or ``(1, 3, H, W)``). Raises NoModelError."""
        return self._measured(self._classify(self._current(), x, top_k, started))

    def _measured(self, result: ClassifyResult) -> ClassifyResult:
        self.metrics.record(result.answered_by, result.reason, result.bytes_sent, result.latency_ms,
                            result.model_version)
        return result

    def _follow_cloud_version(self) -> None:
        """After a version-skew refusal: a streaming device asks for the cloud's manifest at once (it streams the
        new version beside the old and switches when its head is usable); a ``checkpoint: cloud`` device downloads
        the cloud's checkpoint on a thread of its own and switches to it; a local checkpoint stays (logged by the
        gate once per change)."""
        if self.streamed is not None:
            self.streamed.check_soon()
        elif self.cfg.checkpoint == "cloud" and self._refetching.acquire(blocking=False):
            threading.Thread(target=self._refetch_checkpoint, name="spinn-refetch", daemon=True).start()

    def _refetch_checkpoint(self) -> None:
        """Download the checkpoint the cloud serves now and serve it from the next request on (one reference
        store: a request runs on the old model or the new one)."""
        try:
            assert self.link is not None
            checkpoint = downloaded_checkpoint(self.link, max(30.0, self.cfg.deadline_ms / 1000), latest=True)
            self._check_split(checkpoint.model)
        except (LinkError, CheckpointError, ConfigError) as err:
            log.warning("could not follow the cloud's version: %s", err)
            return
        finally:
            self._refetching.release()
        model = checkpoint.model.eval().to(self.torch_device)
        ref = pb.ModelRef(model_id=self.cfg.model_id, model_version=short_digest(checkpoint.digest),
                          digest=checkpoint.digest)
        with self._plan_lock:
            previous = self.active
            self.active = ActiveModel(model, head(model, previous.split_point if previous else self.cfg.split_point),
                                      ref, checkpoint.class_names, checkpoint.preprocess, complete=True,
                                      threshold=self.threshold)
        log.info("switched to the cloud's %s (digest %s)", ref.model_version, ref.digest)

    @property
    def busy(self) -> bool:
        """Whether a request's head is computing now (a health ping meanwhile waits for the CPU too; the upload
        after the compute does not)."""
        return self._computing > 0

    @contextlib.contextmanager
    def _compute(self) -> Iterator[None]:
        with self._calls_lock:
            self._computing += 1
        try:
            yield
        finally:
            with self._calls_lock:
                self._computing -= 1

    def _classify(self, active: ActiveModel, x: Tensor, top_k: Optional[int],
                  started: Optional[float]) -> ClassifyResult:
        started = time.perf_counter() if started is None else started
        k = top_k or self.cfg.top_k
        x = x.unsqueeze(0) if x.dim() == 3 else x
        if active.model is not None:
            x = follow(x, active.model)
        deepest: Optional[tuple[int, Tensor]] = None
        threshold = active.threshold
        self.last_request_t = time.monotonic()
        begin = tick = time.perf_counter()
        ran: list[tuple[str, int]] = []
        cuda = x.device.type == "cuda"

        def clock(kind: str, key: int) -> None:
            nonlocal tick
            if cuda:  # kernels run asynchronously: without this the time lands wherever the next sync is
                torch.cuda.synchronize(x.device)
            now = time.perf_counter()
            self.block_times.record(kind, key, (now - tick) * 1000.0)
            ran.append((kind, key))
            tick = now

        steps = active.head.steps(x, clock) if active.head is not None else ()
        with torch.no_grad(), self._compute():
            for boundary, x, logits in steps:
                if logits is None:
                    continue
                deepest = (boundary, logits[0])
                if float(confidence(logits[0], self.cfg.confidence)) >= threshold:
                    self.block_times.record_request(ran, (time.perf_counter() - begin) * 1000.0)
                    return self._local(active, boundary, logits[0], k, started, degraded=False, reason="")
                tick = time.perf_counter()  # the confidence test is neither this exit's time nor the next block's
            self.block_times.record_request(ran, (time.perf_counter() - begin) * 1000.0)
            self._last_activation = (active, x)  # what a link probe sends (device/adaptive.py)
            if active.complete and active.model is not None and active.split_point == active.model.num_blocks:
                # the device holds the final classifier after the last block: uploading would only move it
                return self._local(active, -1, active.model.final(x)[0], k, started, degraded=False, reason="")
        return self._offload(active, x, deepest, k, started)

    def probe_link(self, timeout_s: float) -> bool:
        """Offload the last activation the head computed and drop the answer: a bandwidth sample for a device
        whose plan uploads nothing or too little to time (run by the scheduler's thread, never on a request's
        path). A learned code (a few hundred bytes) goes as int8+zstd instead: it is the bytes that measure.
        True when the cloud answered."""
        last, current = self._last_activation, self.active
        if last is None or self.link is None or current is None or last[0] is not current:
            return False
        active, activation = last
        if self.sendable_codec(active, active.split_point).learned:
            features = encode(activation, OFFLINE_CODEC)
        else:
            features = self._encode(active, activation)
        request = pb.FeatureRequest(request_id="probe-" + uuid.uuid4().hex, model=active.wire_ref,
                                    split_point=active.split_point, features=features, top_k=1)
        try:
            reply, total_ms = self.link.infer(request, timeout_s)
        except grpc.RpcError:
            return False
        self.link_stats.record_call(total_ms, reply.timings.queue_ms + reply.timings.compute_ms, request.ByteSize(),
                                    queue_ms=reply.timings.queue_ms, split_point=active.split_point)
        self.probe_bytes += request.ByteSize()
        return True

    def _offload(self, active: ActiveModel, activation: Tensor, deepest: Optional[tuple[int, Tensor]], k: int,
                 started: float) -> ClassifyResult:
        if self.link is None or not self.breaker.allow():
            reason = "cloud circuit open" + (f" after {self.breaker.last_error}" if self.breaker.last_error else "")
            return self._fallback(active, activation, deepest, k, started, reason, bytes_sent=0)
        skew = self.skew.blocked(active.ref)
        if skew is not None:  # the cloud refused this version a moment ago: do not pay a round trip per image
            return self._fallback(active, activation, deepest, k, started, skew, bytes_sent=0)
        features = self._encode(active, activation)
        result = self._send(active, activation, deepest, k, started, features)
        return dataclasses.replace(result, codec=wire_codec_name(features))

    def _send(self, active: ActiveModel, activation: Tensor, deepest: Optional[tuple[int, Tensor]], k: int,
              started: float, features: pb.Tensor) -> ClassifyResult:
        """One Infer call with ``features``; the cloud's answer, or on any failure the device's own."""
        request = pb.FeatureRequest(request_id=uuid.uuid4().hex, model=active.wire_ref,
                                    split_point=active.split_point, features=features, top_k=k)
        size = request.ByteSize()
        with self._calls_lock:
            self.rpc_calls += 1
        try:
            reply, total_ms = self.link.infer(request, self.cfg.deadline_ms / 1000.0)
        except grpc.RpcError as err:
            code = err.code()
            reason = f"{code.name}: {err.details()}"
            served = served_versions(err) if code == grpc.StatusCode.FAILED_PRECONDITION else None
            if served is not None:
                reason = self.skew.refused(served, active.ref)
                self._follow_cloud_version()
            elif code in NETWORK_CODES:
                self.breaker.record_failure(reason)
                self.link_stats.record_failure()
            else:
                log.warning("cloud refused request %s: %s", request.request_id, reason)
            return self._fallback(active, activation, deepest, k, started, reason, bytes_sent=size)
        self.breaker.record_success()
        if reply.model.digest and reply.model.digest != active.ref.digest:  # a tail of another version answered
            log.warning("cloud answered request %s from version digest %s, asked %s", request.request_id,
                        reply.model.digest, active.ref.digest)
            return self._fallback(active, activation, deepest, k, started,
                                  f"bad reply: answered by digest {reply.model.digest[:12]}, asked "
                                  f"{active.ref.digest[:12]}", bytes_sent=size)
        self.skew.answered(active.ref)
        self._maybe_ask_codec()
        self.link_stats.record_call(total_ms, reply.timings.queue_ms + reply.timings.compute_ms, size,
                                    queue_ms=reply.timings.queue_ms, split_point=active.split_point)
        try:
            scores = reply_scores(reply, len(active.class_names))
        except ValueError as err:
            log.warning("cloud answered request %s with %s", request.request_id, err)
            return self._fallback(active, activation, deepest, k, started, f"bad reply: {err}", bytes_sent=size)
        return self._result(active, scores, "cloud", False, "", size, started)

    def _encode(self, active: ActiveModel, activation: Tensor) -> pb.Tensor:
        split = active.split_point
        if split != 0 or (self.cfg.split_point == 0 and self.cfg.codec):
            spec = self.sendable_codec(active, split)
            if spec.learned:
                assert active.head is not None and active.head.encoder is not None and active.model is not None
                try:
                    with torch.no_grad():
                        code = active.head.encoder.code(activation)
                    return encode_code_message(code, spec, active.model.bottleneck.code_counts)
                except ValueError as err:  # a frequency table not (fully) received yet: send what needs none
                    log.warning("cannot send a learned code (%s); sending %s", err, OFFLINE_CODEC.name)
                    spec = OFFLINE_CODEC
            return encode(activation, spec)
        if self._jpeg_input():
            pre = active.preprocess
            return encode_jpeg(activation, pre.mean, pre.std, self.cfg.jpeg_quality)
        return encode(activation, CodecSpec.from_name(self.cfg.input_codec))

    @staticmethod
    def _result(active: ActiveModel, scores: list[tuple[int, str, float]], answered_by: str, degraded: bool,
                reason: str, bytes_sent: int, started: float) -> ClassifyResult:
        return ClassifyResult(
            class_id=scores[0][0], label=scores[0][1], confidence=scores[0][2], answered_by=answered_by,
            degraded=degraded, reason=reason, bytes_sent=bytes_sent,
            latency_ms=(time.perf_counter() - started) * 1000.0, top_k=scores,
            model_version=active.ref.model_version, model_digest=active.ref.digest, split_point=active.split_point,
            weights_fraction=active.weights_fraction, head_bits=active.head_bits,
        )

    def _maybe_ask_codec(self) -> None:
        """After an answered offload, fetch the codec the cloud prefers if it was down at start-up; on a thread
        of its own so that no request waits for it."""
        with self._calls_lock:
            ask, self._ask_codec = self._ask_codec, False
        if ask:
            threading.Thread(target=self._ask_cloud_codec, name="spinn-codec", daemon=True).start()

    def _ask_cloud_codec(self) -> None:
        assert self.link is not None
        info = self._model_info(self.link, self.cfg)
        if info is None:  # gone again: ask after the next answered offload
            with self._calls_lock:
                self._ask_codec = True
            return
        self.split_codecs = split_codecs(info)
        codec = self._codec_from_info(info, self.cfg)
        if codec != self.codec:
            log.info("cloud %s prefers codec %s at split point %d; switching from %s", self.link.target,
                     codec.name, self.cfg.split_point, self.codec.name)
        self.codec = codec  # one attribute store: requests encode with the old or the new spec, both accepted

    def _fallback(self, active: ActiveModel, activation: Tensor, deepest: Optional[tuple[int, Tensor]], k: int,
                  started: float, reason: str, bytes_sent: int) -> ClassifyResult:
        """Answer locally so that there is always an answer: with the whole model at full precision and
        ``fallback: final``, the final classifier (run on from the split); otherwise the deepest exit computed,
        or with none before the split, the next exit after it."""
        if active.model is None:
            raise NoModelError(f"{reason}; and no weights have arrived yet to answer on the device")
        to_final = active.complete and self.cfg.fallback == "final"
        if deepest is None or to_final:
            boundary, logits = self._run_on(active, activation, to_final)
            where = "the final classifier" if boundary == -1 else f"exit {boundary}"
            reason += f"; ran on from split point {active.split_point} to {where} on device"
            deepest = (boundary, logits)
        return self._local(active, deepest[0], deepest[1], k, started, degraded=True, reason=reason,
                           bytes_sent=bytes_sent)

    @staticmethod
    def _run_on(active: ActiveModel, activation: Tensor, to_final: bool) -> tuple[int, Tensor]:
        """Run the model on from the split: to the next exit (``(boundary, logits)``), or with ``to_final`` or
        no later exit, to the final classifier (``(-1, logits)``)."""
        model, split = active.model, active.split_point
        assert model is not None
        later = [e for e in model.exit_points if e > split]
        stop = model.num_blocks if to_final or not later else later[0]
        exits = {} if stop == model.num_blocks else {stop: model.exit_map()[stop]}
        with torch.no_grad():
            x, logits = run_segment(model.features, exits, activation, split, stop)
            if stop == model.num_blocks:
                return -1, model.final(x)[0]
        return stop, logits[0][0]

    def _local(self, active: ActiveModel, boundary: int, logits: Tensor, k: int, started: float, degraded: bool,
               reason: str, bytes_sent: int = 0) -> ClassifyResult:
        scores = _top_k(logits, active.class_names, k)
        answered_by = "device:final" if boundary == -1 else f"device:exit-{boundary}"
        return self._result(active, scores, answered_by, degraded, reason, bytes_sent, started)

    # -- measurements and lifecycle -------------------------------------------------------------------------

    def _probe(self) -> bool:
        return self.link is not None and self.link.healthy(timeout_s=min(1.0, self.cfg.breaker_probe_seconds))

    def measurements(self) -> dict:
        """Live estimates for a scheduler: link RTT/bandwidth (EWMA), per-block device time, breaker state."""
        link = self.link_stats.snapshot()
        active = self.active
        model = {} if active is None else {
            "model_version": active.ref.model_version, "split_point": active.split_point,
            "weights_fraction": active.weights_fraction, "head_bits": active.head_bits}
        plan = {"threshold": self.threshold, "probe_bytes": self.probe_bytes}
        decision = self.adaptive.last if self.adaptive is not None else None
        if decision is not None:
            plan["scheduler"] = {"split_point": decision.split_point, "threshold": decision.threshold,
                                 "feasible": decision.feasible, "reason": decision.reason,
                                 "predicted": decision.predicted,
                                 # what it plans with (rtt_ms/upload_bytes_per_s above are the plain EWMAs)
                                 "link": self.adaptive.link.summary()}
        return {"rtt_ms": link.rtt_ms, "upload_bytes_per_s": link.upload_bytes_per_s, "offloads": link.calls,
                "offload_failures": link.failures, "breaker_open": self.breaker.is_open,
                **model, **plan, **self.block_times.snapshot()}

    def close(self) -> None:
        if self.adaptive is not None:
            self.adaptive.close()
        if self.streamed is not None:
            self.streamed.close()
        if self.cache_lock is not None:
            self.cache_lock.release()
        self.breaker.close()
        if self.link is not None:
            self.link.close()
