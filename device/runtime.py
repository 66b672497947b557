"""The device runtime: early exits on the device, offload with a deadline, a fallback that never loses an answer."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Optional

import grpc
import torch
from torch import Tensor

from device.breaker import CircuitBreaker
from device.config import DeviceConfig
from device.images import decode_image
from device.link import NETWORK_CODES, CloudLink, LinkError
from device.stats import BlockTimes, LinkStats
from models.checkpoint import Checkpoint, CheckpointError, load_checkpoint, load_checkpoint_bytes
from models.config import ConfigError
from models.exit_policy import confidence
from models.hardware import resolve_device
from models.early_exit import run_segment
from models.partition import Head, check_split_point, head
from proto import spinn_v1_pb2 as pb
from proto.codec import CodecSpec, encode

log = logging.getLogger("device")

OFFLINE_CODEC = CodecSpec("int8", "zstd")  # until the cloud can be asked for its default


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

    def to_json(self, image: Optional[str] = None) -> dict:
        """The JSON object of ``python -m device classify --json`` (``image`` first when given)."""
        out = {} if image is None else {"image": image}
        out.update({k: v for k, v in asdict(self).items() if k != "top_k"})
        out["top_k"] = [{"class_id": c, "label": n, "probability": p} for c, n, p in self.top_k]
        return out


def _top_k(logits: Tensor, names: list[str], k: int) -> list[tuple[int, str, float]]:
    probs = torch.softmax(logits.float(), dim=-1)
    values, ids = probs.topk(min(k, probs.shape[-1]))
    return [(int(c), names[int(c)], float(p)) for p, c in zip(values, ids)]


class DeviceRuntime:
    """Holds ``head(split_point)`` (with the exits before the split), the threshold, the codec and the link.

    ``classify_*`` are safe to call from several threads at once; a network fault never raises.
    """

    def __init__(self, cfg: DeviceConfig, checkpoint: Checkpoint, link: Optional[CloudLink],
                 codec: Optional[CodecSpec]) -> None:
        """``codec`` None: the cloud has not told its default yet; offload with OFFLINE_CODEC and ask it again
        after the first offload it answers."""
        try:
            check_split_point(checkpoint.model, cfg.split_point)
        except ValueError as err:
            raise ConfigError(f"config key 'split_point': {err}") from None
        self.cfg = cfg
        self.torch_device = resolve_device(cfg.torch_device, "torch_device")
        self.model = checkpoint.model.eval().to(self.torch_device)
        self.class_names = checkpoint.class_names
        self.preprocess = checkpoint.preprocess
        self.transform = checkpoint.preprocess.eval_transform()
        self.head: Head = head(self.model, cfg.split_point)
        self.codec = codec or OFFLINE_CODEC
        self._ask_codec = codec is None and link is not None
        self.link = link
        self.link_stats = LinkStats(cfg.ewma_alpha)
        self.block_times = BlockTimes(cfg.ewma_alpha)
        self.breaker = CircuitBreaker(cfg.breaker_failures, self._probe, cfg.breaker_probe_seconds)
        self.rpc_calls = 0  # Infer calls actually attempted (tests count them)
        self._calls_lock = threading.Lock()

    @classmethod
    def start(cls, cfg: DeviceConfig) -> "DeviceRuntime":
        """Connect, load the checkpoint (local file, or ``checkpoint: cloud`` to download it) and pick the
        codec (config, else the cloud's default for the split point, else int8+zstd when the cloud is down).

        Raises ConfigError / CheckpointError with the key or file named.
        """
        if cfg.intra_op_threads:
            torch.set_num_threads(cfg.intra_op_threads)
        link = CloudLink(cfg)
        if cfg.checkpoint == "cloud":
            try:
                data = link.fetch_checkpoint(timeout_s=max(30.0, cfg.deadline_ms / 1000))
            except LinkError as err:
                link.close()
                raise CheckpointError(f"config key 'checkpoint' is 'cloud' but {err}") from None
            checkpoint = load_checkpoint_bytes(data, f"cloud {link.target}")
        else:
            checkpoint = load_checkpoint(cfg.checkpoint)
        codec = cfg.codec_spec() or cls._cloud_codec(link, cfg)
        runtime = cls(cfg, checkpoint, link, codec)
        log.info("device ready: split point %d, threshold %.2f, codec %s, cloud %s", cfg.split_point,
                 cfg.z_confidence_threshold, runtime.codec.name, link.target)
        return runtime

    @staticmethod
    def _cloud_codec(link: CloudLink, cfg: DeviceConfig) -> Optional[CodecSpec]:
        """The cloud's default codec for ``cfg.split_point``; None when the cloud did not answer."""
        try:
            info = link.model_info(timeout_s=max(1.0, cfg.deadline_ms / 1000))
        except grpc.RpcError as err:
            log.warning("cloud %s did not answer GetModelInfo (%s); using %s until it does", link.target,
                        err.code().name, OFFLINE_CODEC.name)
            return None
        if (info.model.model_id, info.model.model_version) != (cfg.model_id, cfg.model_version):
            log.warning("cloud serves %s version %s, this device is configured for %s version %s: offloads will "
                        "be refused and answered locally", info.model.model_id, info.model.model_version,
                        cfg.model_id, cfg.model_version)
        for split in info.split_points:
            if split.split_point == cfg.split_point:
                try:
                    return CodecSpec.from_message(split.default_codec)
                except ValueError:
                    break
        return OFFLINE_CODEC

    def set_threshold(self, threshold: float) -> None:
        """Change the confidence threshold for the next requests (test.py --live sweeps it; a scheduler tunes it)."""
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"z_confidence_threshold must be in [0, 1], got {threshold}")
        self.cfg.z_confidence_threshold = threshold

    # -- classification -------------------------------------------------------------------------------------

    def classify_bytes(self, data: bytes, top_k: Optional[int] = None) -> ClassifyResult:
        """Classify an encoded image (JPEG/PNG bytes). Raises device.images.ImageError for bad bytes only."""
        started = time.perf_counter()
        image = decode_image(data, self.cfg.max_image_bytes, self.cfg.max_image_pixels)
        return self.classify_tensor(self.transform(image), top_k, started)

    def classify_tensor(self, x: Tensor, top_k: Optional[int] = None,
                        started: Optional[float] = None) -> ClassifyResult:
        """Classify one preprocessed image ``(3, H, W)`` (or ``(1, 3, H, W)``)."""
        started = time.perf_counter() if started is None else started
        k = top_k or self.cfg.top_k
        x = (x.unsqueeze(0) if x.dim() == 3 else x).to(self.torch_device)
        deepest: Optional[tuple[int, Tensor]] = None
        threshold = self.cfg.z_confidence_threshold
        with torch.no_grad():
            tick = time.perf_counter()
            for boundary, x, logits in self.head.steps(x):
                now = time.perf_counter()
                self.block_times.record("block", boundary - 1, (now - tick) * 1000.0)
                tick = now
                if logits is None:
                    continue
                deepest = (boundary, logits[0])
                if float(confidence(logits[0], self.cfg.confidence)) >= threshold:
                    return self._local(boundary, logits[0], k, started, degraded=False, reason="")
        return self._offload(x, deepest, k, started)

    def _offload(self, activation: Tensor, deepest: Optional[tuple[int, Tensor]], k: int,
                 started: float) -> ClassifyResult:
        if self.link is None or not self.breaker.allow():
            reason = "cloud circuit open" + (f" after {self.breaker.last_error}" if self.breaker.last_error else "")
            return self._fallback(activation, deepest, k, started, reason, bytes_sent=0)
        request = pb.FeatureRequest(
            request_id=uuid.uuid4().hex, model=self.link.model, split_point=self.cfg.split_point,
            features=encode(activation, self.codec), top_k=k,
        )
        size = request.ByteSize()
        with self._calls_lock:
            self.rpc_calls += 1
        try:
            reply, total_ms = self.link.infer(request, self.cfg.deadline_ms / 1000.0)
        except grpc.RpcError as err:
            code = err.code()
            reason = f"{code.name}: {err.details()}"
            if code in NETWORK_CODES:
                self.breaker.record_failure(reason)
                self.link_stats.record_failure()
            else:
                log.warning("cloud refused request %s: %s", request.request_id, reason)
            return self._fallback(activation, deepest, k, started, reason, bytes_sent=size)
        self.breaker.record_success()
        self._maybe_ask_codec()
        self.link_stats.record_call(total_ms, reply.timings.queue_ms + reply.timings.compute_ms, size)
        image = reply.images[0]
        scores = [(c.class_id, c.name, c.probability) for c in image.top_k]
        return ClassifyResult(
            class_id=scores[0][0], label=scores[0][1], confidence=scores[0][2], answered_by="cloud",
            degraded=False, reason="", bytes_sent=size, latency_ms=(time.perf_counter() - started) * 1000.0,
            top_k=scores,
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
        codec = self._cloud_codec(self.link, self.cfg)
        if codec is None:  # gone again: ask after the next answered offload
            with self._calls_lock:
                self._ask_codec = True
            return
        if codec != self.codec:
            log.info("cloud %s prefers codec %s at split point %d; switching from %s", self.link.target,
                     codec.name, self.cfg.split_point, self.codec.name)
        self.codec = codec  # one attribute store: requests encode with the old or the new spec, both accepted

    def _fallback(self, activation: Tensor, deepest: Optional[tuple[int, Tensor]], k: int, started: float,
                  reason: str, bytes_sent: int) -> ClassifyResult:
        """Answer from the deepest exit computed; with none before the split, run on to the next exit locally
        (the device holds the whole checkpoint) so that there is always an answer."""
        if deepest is None:
            boundary, logits = self._next_local_exit(activation)
            reason += f"; no exit before split point {self.cfg.split_point}, ran on to exit {boundary} on device"
            deepest = (boundary, logits)
        return self._local(deepest[0], deepest[1], k, started, degraded=True, reason=reason,
                           bytes_sent=bytes_sent)

    def _next_local_exit(self, activation: Tensor) -> tuple[int, Tensor]:
        later = [e for e in self.model.exit_points if e > self.cfg.split_point]
        stop = later[0] if later else self.model.num_blocks
        exits = {stop: self.model.exit_map()[stop]} if later else {}
        with torch.no_grad():
            x, logits = run_segment(self.model.features, exits, activation, self.cfg.split_point, stop)
            if not later:
                return -1, self.model.final(x)[0]
        return stop, logits[0][0]

    def _local(self, boundary: int, logits: Tensor, k: int, started: float, degraded: bool, reason: str,
               bytes_sent: int = 0) -> ClassifyResult:
        scores = _top_k(logits, self.class_names, k)
        return ClassifyResult(
            class_id=scores[0][0], label=scores[0][1], confidence=scores[0][2],
            answered_by="device:final" if boundary == -1 else f"device:exit-{boundary}",
            degraded=degraded, reason=reason, bytes_sent=bytes_sent,
            latency_ms=(time.perf_counter() - started) * 1000.0, top_k=scores,
        )

    # -- measurements and lifecycle -------------------------------------------------------------------------

    def _probe(self) -> bool:
        return self.link is not None and self.link.healthy(timeout_s=min(1.0, self.cfg.breaker_probe_seconds))

    def measurements(self) -> dict:
        """Live estimates for a scheduler: link RTT/bandwidth (EWMA), per-block device time, breaker state."""
        link = self.link_stats.snapshot()
        return {"rtt_ms": link.rtt_ms, "upload_bytes_per_s": link.upload_bytes_per_s, "offloads": link.calls,
                "offload_failures": link.failures, "breaker_open": self.breaker.is_open,
                **self.block_times.snapshot()}

    def close(self) -> None:
        self.breaker.close()
        if self.link is not None:
            self.link.close()
