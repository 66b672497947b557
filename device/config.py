"""Keys of ``apps/device.yml``: what the device daemon and ``python -m device classify`` read."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional, Union

from models.config import ConfigError, check_at_least, check_files, check_log_level, check_positive
from models.hardware import resolve_device
from device.scheduler import OBJECTIVES, Objective
from models.progressive import ORDERS
from proto.codec import CodecSpec
from models.progressive import ProgressiveError
from proto.manifest import check_name
from serving.signing import Verifier
from serving.security import TOKEN_ENV, check_client_exposure, is_loopback, read_token

_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):\d{1,5}$")


@dataclass
class DeviceConfig:
    """Device config (README: device config reference). Times are milliseconds unless the name says seconds."""

    REMOVED_KEYS: ClassVar[dict[str, str]] = {
        "auth_token": f"a token given as a value shows in ps; put it in a file (auth_token_file) or in {TOKEN_ENV}",
    }

    # a local file; "cloud": download the whole checkpoint file from the cloud; "stream": progressive delivery
    checkpoint: str = "runs/quickstart/best_model.pt"
    cloud: Union[str, list[str]] = "127.0.0.1:50051"  # host:port, a comma-separated list, or a YAML list
    model_id: str = "spinn"
    model_version: Optional[str] = None  # a local checkpoint's label; None: its digest's short form
    skew_retry_seconds: float = 10.0  # after the cloud refused the device's version, offloads skip it this long
    split_point: int = 7
    z_confidence_threshold: float = 0.7
    confidence: str = "top1"  # top1 | entropy (models.exit_policy.confidence)
    deadline_ms: float = 500.0
    codec: Optional[str] = None  # e.g. "int8+zstd"; None: the cloud's default for the split (int8+zstd offline)
    top_k: int = 5
    fallback: str = "final"  # final | exit: what answers when the cloud fails (final: needs the whole model)
    # progressive delivery (checkpoint: stream)
    weights_cache: str = "runs/weights_cache"  # verified chunks persist here: a cut stream or restart resumes
    stream_order: str = "split"  # split | value | whole (models/progressive/)
    stream_poll_seconds: float = 30.0  # how often the cloud is asked whether it serves a new model version
    stream_nice: int = 10  # the weight stream's thread runs this much nicer than serving (Linux), 0..19
    stream_decode_process: bool = True  # decode chunks in a child process (off: in the stream's thread)
    stream_swap_ms: float = 1000.0  # new weights swapped in at most this often (usable head, complete: at once)
    max_package_bytes: int = 256 * 1024 * 1024  # a manifest announcing more (chunks or float32 weights) is refused
    delivery_public_key: Optional[str] = None  # Ed25519 public key (PEM): only packages signed by it are accepted
    input_codec: str = "jpeg"  # how the input travels at split point 0: jpeg, or a feature codec (int8+zstd)
    jpeg_quality: int = 90
    # scheduler (device/scheduler.py): split point and threshold chosen at run time from the offline profile
    scheduler: bool = False  # True: split_point and z_confidence_threshold are only where it starts
    profile: Optional[str] = None  # python test.py ... split_point=all; None: profile.json beside the checkpoint
    objective: str = "min_latency"  # min_latency | max_accuracy | min_bytes | min_cloud_load | max_throughput
    latency_bound_ms: Optional[float] = None  # p95 bound: needed by max_accuracy, optional for the others
    accuracy_floor: Optional[float] = None  # accuracy bound of the objectives but max_accuracy
    accuracy_tolerance: float = 0.01  # min_latency without a floor: within this of the model's own accuracy
    scheduler_interval_seconds: float = 0.5  # how often the measurements are looked at (and the cloud pinged)
    scheduler_margin: float = 0.15  # relative change that makes it re-decide, and gain that makes it switch
    probe_interval_seconds: float = 2.0  # with no offload for this long, the scheduler's thread probes the link
    initial_bandwidth_mbit: float = 5.0  # upload bandwidth assumed until the first offload measures it
    initial_rtt_ms: float = 50.0
    # channel
    max_attempts: int = 3  # gRPC retry policy on UNAVAILABLE, always within deadline_ms
    keepalive_ms: int = 30_000
    max_message_bytes: int = 16 * 1024 * 1024
    tls_ca: Optional[str] = None  # set: TLS to the cloud, trusting this CA bundle
    tls_cert: Optional[str] = None  # client certificate for mutual TLS
    tls_key: Optional[str] = None
    tls_server_name: Optional[str] = None  # name on the cloud's certificate when it differs from the address
    auth_token_file: Optional[str] = None  # file holding the token sent as "authorization: Bearer <token>" (else
    # $SPINN_AUTH_TOKEN when set)
    insecure: bool = False  # allow plaintext to a cloud off loopback, and the local API (listen) off loopback
    # circuit breaker
    breaker_failures: int = 3  # consecutive network failures that open it
    breaker_probe_seconds: float = 1.0  # health probe period while open
    # measurements
    ewma_alpha: float = 0.2
    # local API and folder watch (python -m device serve)
    listen: str = "127.0.0.1:50061"
    max_in_flight: int = 16  # Classify calls of the local API at once; beyond: RESOURCE_EXHAUSTED at once
    metrics_address: Optional[str] = None  # host:port: Prometheus /metrics there (None: not exported)
    watch_dir: Optional[str] = None
    watch_results: Optional[str] = None  # JSON lines; None: <watch_dir>/results.jsonl
    watch_interval_seconds: float = 1.0
    # input limits
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_image_aspect: float = 10.0  # long side / short side; bounds the resize (see device/images.py)
    intra_op_threads: int = 0  # 0: torch's default
    torch_device: str = "auto"  # auto: CUDA when torch sees a GPU (e.g. a Jetson), else CPU
    log_level: str = "INFO"

    def addresses(self) -> list[str]:
        """The cloud addresses as a list of ``host:port``."""
        items = self.cloud if isinstance(self.cloud, list) else self.cloud.split(",")
        return [a.strip() for a in items if a.strip()]

    def token(self) -> Optional[str]:
        """The bearer token sent to the cloud: ``auth_token_file``'s contents, else ``$SPINN_AUTH_TOKEN``, else
        None. Raises ConfigError naming the key or variable."""
        return read_token(self.auth_token_file)

    def codec_spec(self) -> Optional[CodecSpec]:
        return None if self.codec is None else CodecSpec.from_name(self.codec)

    def objective_spec(self, model_accuracy: float) -> Objective:
        """The objective; ``min_latency`` without an ``accuracy_floor`` gets ``model_accuracy`` (the profile's
        final-classifier accuracy) less ``accuracy_tolerance``."""
        floor = self.accuracy_floor
        if floor is None and self.objective == "min_latency":
            floor = max(0.0, model_accuracy - self.accuracy_tolerance)
        return Objective(self.objective, self.latency_bound_ms, floor)

    def profile_path(self) -> Optional[str]:
        """The offline profile: ``profile`` when set, else ``profile.json`` beside a local checkpoint when there
        is one (``python test.py ... split_point=all`` writes it into the checkpoint's ``log_dir``), else None."""
        if self.profile is not None:
            return self.profile
        if self.checkpoint in ("cloud", "stream"):
            return None
        beside = Path(self.checkpoint).parent / "profile.json"
        return str(beside) if beside.is_file() else None

    def missing_profile(self) -> ConfigError:
        """The error for a command that needs the profile and has none: it names the command that writes it."""
        where = "cloud" if self.checkpoint in ("cloud", "stream") else str(Path(self.checkpoint).parent)
        command = ("python test.py app:apps/quickstart_test.yml split_point=all"
                   if Path(self.checkpoint) == Path(DeviceConfig.checkpoint) else
                   f"python test.py app:<your model's test app>.yml checkpoint={self.checkpoint} log_dir={where} "
                   "split_point=all")
        return ConfigError(f"config key 'profile': no offline profile (none given, none beside the checkpoint); "
                           f"write it with:  {command}")

    def check_objective(self) -> None:
        """ConfigError naming the key unless objective, latency_bound_ms and accuracy_floor make an objective
        (checked when the scheduler is on, and by ``python -m device plan``)."""
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"config key 'objective': must be one of {OBJECTIVES}, got {self.objective!r}")
        bound = self.latency_bound_ms
        if not (math.isfinite(self.accuracy_tolerance) and 0.0 <= self.accuracy_tolerance <= 1.0):
            raise ConfigError(f"config key 'accuracy_tolerance': must be in [0, 1], got {self.accuracy_tolerance}")
        if bound is None and self.objective == "max_accuracy":
            raise ConfigError("config key 'latency_bound_ms': objective max_accuracy needs a p95 bound (ms)")
        if bound is not None and not (math.isfinite(bound) and bound > 0):
            raise ConfigError(f"config key 'latency_bound_ms': must be a number > 0 (ms), got {bound}")
        floor = self.accuracy_floor
        if floor is None and self.objective not in ("max_accuracy", "min_latency"):
            raise ConfigError(f"config key 'accuracy_floor': objective {self.objective} needs one")
        if floor is not None and not 0.0 <= floor <= 1.0:
            raise ConfigError(f"config key 'accuracy_floor': must be in [0, 1], got {floor}")

    def _validate_scheduler(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"config key 'objective': must be one of {OBJECTIVES}, got {self.objective!r}")
        for key in ("scheduler_interval_seconds", "probe_interval_seconds", "initial_bandwidth_mbit",
                    "initial_rtt_ms"):
            if not math.isfinite(getattr(self, key)):
                raise ConfigError(f"config key '{key}': must be a finite number, got {getattr(self, key)}")
        if not 0.0 <= self.scheduler_margin < 1.0:
            raise ConfigError(f"config key 'scheduler_margin': must be in [0, 1), got {self.scheduler_margin}")
        if self.profile is not None and not Path(self.profile).is_file():
            raise ConfigError(f"config key 'profile': file {self.profile!r} does not exist")
        if self.scheduler and self.profile_path() is None:
            raise self.missing_profile()
        if self.profile is not None and not Path(self.profile).is_file():
            raise ConfigError(f"config key 'profile': file {self.profile!r} does not exist")
        if self.scheduler:
            self.check_objective()

    def validate(self) -> None:
        addresses = self.addresses()
        if not addresses:
            raise ConfigError("config key 'cloud': no address given")
        for address in addresses + [self.listen]:
            if not _ADDRESS.match(address):
                key = "listen" if address == self.listen and address not in addresses else "cloud"
                raise ConfigError(f"config key '{key}': {address!r} is not host:port")
        if self.split_point < 0:
            raise ConfigError(f"config key 'split_point': must be >= 0, got {self.split_point}")
        if not 0.0 <= self.z_confidence_threshold <= 1.0:
            raise ConfigError(
                f"config key 'z_confidence_threshold': must be in [0, 1], got {self.z_confidence_threshold}")
        if self.fallback not in ("final", "exit"):
            raise ConfigError(f"config key 'fallback': must be 'final' or 'exit', got {self.fallback!r}")
        if self.stream_order not in ORDERS:
            raise ConfigError(f"config key 'stream_order': must be one of {ORDERS}, got {self.stream_order!r}")
        if self.confidence not in ("top1", "entropy"):
            raise ConfigError(f"config key 'confidence': must be 'top1' or 'entropy', got {self.confidence!r}")
        check_positive(self, ("deadline_ms", "skew_retry_seconds", "breaker_probe_seconds", "watch_interval_seconds",
                              "stream_poll_seconds", "scheduler_interval_seconds", "probe_interval_seconds",
                              "initial_bandwidth_mbit", "initial_rtt_ms"))
        self._validate_scheduler()
        check_at_least(self, ("top_k", "max_package_bytes", "max_attempts", "keepalive_ms", "max_message_bytes", "breaker_failures",
                              "max_image_bytes", "max_image_pixels", "max_image_aspect", "max_in_flight"), 1)
        check_at_least(self, ("intra_op_threads", "stream_swap_ms"), 0)
        if self.max_attempts > 5:
            raise ConfigError(f"config key 'max_attempts': gRPC allows at most 5, got {self.max_attempts}")
        if not 0.0 < self.ewma_alpha <= 1.0:
            raise ConfigError(f"config key 'ewma_alpha': must be in (0, 1], got {self.ewma_alpha}")
        try:
            self.codec_spec()
        except ValueError as err:
            raise ConfigError(f"config key 'codec': {err}") from None
        if self.input_codec != "jpeg":
            try:
                learned = CodecSpec.from_name(self.input_codec).learned
            except ValueError as err:
                raise ConfigError(f"config key 'input_codec': jpeg or {err}") from None
            if learned:  # a bottleneck sits after a block, never on the input
                raise ConfigError(f"config key 'input_codec': the input cannot take {self.input_codec}")
        if not 0 <= self.stream_nice <= 19:
            raise ConfigError(f"config key 'stream_nice': must be in 0..19, got {self.stream_nice}")
        if not 1 <= self.jpeg_quality <= 95:
            raise ConfigError(f"config key 'jpeg_quality': must be in 1..95, got {self.jpeg_quality}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("config key 'tls_cert': tls_cert and tls_key go together")
        if self.tls_cert is not None and self.tls_ca is None:
            raise ConfigError("config key 'tls_ca': a client certificate needs TLS (set tls_ca)")
        check_files(self, ("tls_ca", "tls_cert", "tls_key", "auth_token_file", "delivery_public_key"))
        if self.delivery_public_key is not None:
            Verifier.from_file(self.delivery_public_key)
        try:
            check_name(self.model_id, "model_id")
        except ProgressiveError as err:
            raise ConfigError(f"config key {err}") from None
        check_client_exposure(addresses, tls=self.tls_ca is not None, token=self.token() is not None,
                              insecure=self.insecure)
        if not is_loopback(self.listen) and not self.insecure:
            raise ConfigError(f"config key 'insecure': listen {self.listen!r} is reachable from other hosts and the "
                              "local API has no authentication; keep it on loopback, or set insecure: true on a "
                              "network you trust")
        if self.checkpoint not in ("cloud", "stream") and not Path(self.checkpoint).is_file():
            raise ConfigError(f"config key 'checkpoint': file {self.checkpoint!r} does not exist (train one with "
                              "train.py, or set checkpoint=stream to stream the cloud's)")
        if self.watch_dir is not None and not Path(self.watch_dir).is_dir():
            raise ConfigError(f"config key 'watch_dir': {self.watch_dir!r} is not a folder")
        check_log_level(self)
        resolve_device(self.torch_device, "torch_device")
