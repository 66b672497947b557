"""What the cloud computes, free of gRPC: request validation, the batched tail forward, top-k answers."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Optional

import grpc
import torch

from models.checkpoint import Checkpoint, checkpoint_metadata, load_checkpoint_bytes
from models.identity import model_digest, short_digest
from models.early_exit import EarlyExitMobileNetV2
from models.exit_policy import confidence
from models.hardware import follow
from models.partition import Tail, activation_shapes, bottleneck_at, tail
from proto import spinn_v1_pb2 as pb
from proto.codec import CodecError, decode, decode_code_message, decode_jpeg

DEFAULT_TOP_K = 5


class RequestError(Exception):
    """A request the cloud refuses; ``code`` is the gRPC status to answer with, ``detail`` names the field."""

    def __init__(self, code: grpc.StatusCode, detail: str, trailing: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.trailing = trailing  # trailing metadata sent with the status (e.g. the versions served)


@dataclass
class ServedModel:
    """One model version the cloud serves: its tails per split point and the expected activation shapes.
    ``digest`` is its content identity (models/identity.py), ``model_version`` the label bound to it."""

    model_id: str
    model_version: str
    model: EarlyExitMobileNetV2
    class_names: list[str]
    input_size: int
    tails: dict[int, Tail]
    activation_shapes: dict[int, tuple[int, ...]]
    checkpoint_bytes: bytes = b""  # the file the model came from, for ModelDelivery (empty: not offered)
    metadata: dict = field(default_factory=dict)  # models.checkpoint.checkpoint_metadata, for manifests
    digest: str = ""
    source: str = ""  # where it was loaded from (a file path), for logs

    @property
    def ref(self) -> pb.ModelRef:
        return pb.ModelRef(model_id=self.model_id, model_version=self.model_version, digest=self.digest)

    @property
    def architecture(self) -> tuple:
        """What two versions must share to be versions of one model: every tensor's name and shape, and the input
        size (a checkpoint of another architecture in the model folder is refused)."""
        return (self.input_size, tuple((k, tuple(v.shape)) for k, v in self.model.state_dict().items()))

    @property
    def checkpoint_sha256(self) -> str:
        return hashlib.sha256(self.checkpoint_bytes).hexdigest()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @classmethod
    def from_checkpoint(
        cls, ckpt: Checkpoint, model_id: str, model_version: Optional[str] = None, checkpoint_bytes: bytes = b"",
        device: torch.device = torch.device("cpu"), source: str = "",
    ) -> "ServedModel":
        """Serve ``ckpt`` under ``model_version`` (None or empty: the short form of its digest)."""
        model = ckpt.model.eval()
        metadata = checkpoint_metadata(model, ckpt.class_names, ckpt.preprocess)
        digest = ckpt.digest or model_digest(metadata, model.state_dict())
        shapes = activation_shapes(model, ckpt.preprocess.input_size)
        model.to(device)
        tails = {s: tail(model, s) for s in shapes}
        return cls(model_id, model_version or short_digest(digest), model, ckpt.class_names,
                   ckpt.preprocess.input_size, tails, shapes, checkpoint_bytes, metadata, digest, source)

    @classmethod
    def from_file(cls, path: str, model_id: str, model_version: Optional[str] = None,
                  device: torch.device = torch.device("cpu")) -> "ServedModel":
        """Load ``path`` once; the bytes that built the model are the bytes devices may download."""
        data = open(path, "rb").read()
        return cls.from_checkpoint(load_checkpoint_bytes(data, path), model_id, model_version, data, device, path)


def validate_request(req: pb.FeatureRequest, served: ServedModel, max_batch: int) -> torch.Tensor:
    """Check a request against ``served`` (the version its digest named: cloud.versions resolves it) and decode
    its activation ``(B, C, H, W)``.

    Raises RequestError: FAILED_PRECONDITION for a split the cloud does not serve, INVALID_ARGUMENT for anything
    malformed (naming the field).
    """
    if req.split_point not in served.tails:
        raise RequestError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"split_point {req.split_point} is not served; valid split points are 0..{max(served.tails)}",
        )
    if req.top_k < 0:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"top_k must be >= 0, got {req.top_k}")
    if not 0.0 <= req.cloud_exit_threshold <= 1.0:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"cloud_exit_threshold must be in [0, 1], got {req.cloud_exit_threshold}")
    if req.features.codec.quantization == pb.Codec.LEARNED:
        return decode_learned(req, served, max_batch)
    want = served.activation_shapes[req.split_point]
    shape = tuple(req.features.shape)
    if len(shape) != 4 or shape[1:] != tuple(want) or not 1 <= shape[0] <= max_batch:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"features.shape: split point {req.split_point} needs (B, {', '.join(map(str, want))}) with "
            f"1 <= B <= {max_batch}, got {list(shape)}",
        )
    try:
        if req.features.codec.quantization == pb.Codec.JPEG:
            if req.split_point != 0:
                raise CodecError("features.codec.quantization: JPEG is for the input at split point 0 only")
            pre = served.metadata["preprocess"]
            return decode_jpeg(req.features, tuple(pre["mean"]), tuple(pre["std"]))
        return decode(req.features, "features")
    except CodecError as err:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from None


@torch.no_grad()
def decode_learned(req: pb.FeatureRequest, served: ServedModel, max_batch: int) -> torch.Tensor:
    """The activation ``(B, C, H, W)`` float32 (CPU) a LEARNED request's code ``(B, c, H, W)`` restores through the
    decoder of the bottleneck at its split point. RequestError: FAILED_PRECONDITION when the served model has no
    bottleneck there, INVALID_ARGUMENT naming the field for a shape or payload that does not fit it."""
    split = served.tails[req.split_point]
    bottleneck = bottleneck_at(served.model, req.split_point)
    if split.decoder is None or bottleneck is None:
        where = "none" if served.model.bottleneck is None else \
            f"one at split point {served.model.bottleneck.config.split_point}"
        raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                           f"features.codec.quantization: LEARNED needs the model's bottleneck at split point "
                           f"{req.split_point}; version {served.model_version} has {where}")
    _, h, w = served.activation_shapes[req.split_point]
    want = (bottleneck.config.channels, h, w)
    shape = tuple(req.features.shape)
    if len(shape) != 4 or shape[1:] != want or not 1 <= shape[0] <= max_batch:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"features.shape: the bottleneck's code at split point {req.split_point} is (B, "
            f"{', '.join(map(str, want))}) with 1 <= B <= {max_batch}, got {list(shape)}")
    try:
        code = decode_code_message(req.features, bottleneck.code_counts, "features")
    except CodecError as err:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from None
    return split.decode(follow(code, served.model)).float().cpu()


@torch.no_grad()
def run_tail(served: ServedModel, split_point: int, activations: torch.Tensor) -> list[torch.Tensor]:
    """Run the tail of ``split_point`` on a batch ``(B, C, H, W)``; returns later exits' and final logits
    ``(B, classes)`` on the CPU, wherever the model runs."""
    outputs = served.tails[split_point](follow(activations, served.model))
    return [o.float().cpu() for o in outputs]


def answer(
    served: ServedModel, split_point: int, logits: list[torch.Tensor], top_k: int, cloud_exit_threshold: float
) -> list[pb.ImagePrediction]:
    """Turn tail logits for B images into predictions.

    With ``cloud_exit_threshold > 0`` the first cloud-side exit whose top-1 probability reaches it answers
    (its boundary is reported); otherwise the final classifier answers (``answered_by_exit = -1``).
    """
    k = min(top_k or DEFAULT_TOP_K, len(served.class_names))
    exit_points = served.tails[split_point].exit_points
    out = []
    for i in range(logits[-1].shape[0]):
        chosen, by = logits[-1][i], -1
        if cloud_exit_threshold > 0:
            for boundary, exit_logits in zip(exit_points, logits[:-1]):
                if float(confidence(exit_logits[i])) >= cloud_exit_threshold:
                    chosen, by = exit_logits[i], boundary
                    break
        probs = torch.softmax(chosen.float(), dim=-1)
        values, ids = probs.topk(k)
        out.append(pb.ImagePrediction(
            top_k=[pb.ClassScore(class_id=int(c), name=served.class_names[int(c)], probability=float(p))
                   for p, c in zip(values, ids)],
            answered_by_exit=by,
        ))
    return out


def checkpoint_chunks(served: ServedModel, chunk_bytes: int) -> list[pb.CheckpointChunk]:
    """The served checkpoint file as ordered chunks of at most ``chunk_bytes`` bytes, each with the file's hash.

    Raises RequestError FAILED_PRECONDITION when the model was not loaded from a file.
    """
    data = served.checkpoint_bytes
    if not data:
        raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, "this cloud offers no checkpoint for download")
    ref = served.ref
    digest = served.checkpoint_sha256
    return [pb.CheckpointChunk(model=ref, total_bytes=len(data), data=data[i:i + chunk_bytes], sha256=digest)
            for i in range(0, len(data), chunk_bytes)]
