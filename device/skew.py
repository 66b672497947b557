"""Version skew: the cloud does not serve the model version the device's head came from.

Head and tail of two versions make confident garbage, so the cloud refuses a request whose digest it does not
serve (FAILED_PRECONDITION, with the versions it serves in trailing metadata) and the device answers on its
own, degraded, with the reason ``version skew: cloud serves X, device holds Y``. Asking again per image would cost
every image a round trip, so after a refusal the device skips the cloud for ``retry_s`` seconds (for the version
it holds; a new version it switches to is tried at once) and then lets one request try again. The skew is logged
once per change, not per image.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Optional

import grpc

from models.identity import short_digest
from proto import spinn_v1_pb2 as pb
from proto.metadata import SERVED_VERSIONS_KEY

log = logging.getLogger("device")


def served_versions(err: grpc.RpcError) -> Optional[list[tuple[str, str]]]:
    """``(label, digest)`` of every version the cloud serves, from a refusal's trailing metadata; None when the
    refusal is not about the version (no such metadata)."""
    try:
        metadata = dict(err.trailing_metadata() or ())
    except Exception:  # an RpcError raised by the channel itself carries no metadata
        return None
    value = metadata.get(SERVED_VERSIONS_KEY)
    if value is None:
        return None
    pairs = []
    for item in str(value).split(",")[:16]:  # a cloud serves a few versions; more is not worth reading
        label, _, digest = item.partition("=")
        pairs.append((label[:64], digest[:64]))
    return pairs


def describe(label: str, digest: str) -> str:
    """``v2 (a1b2c3d4e5f6)``; just the short digest when the label is that already."""
    short = short_digest(digest)
    return short if label == short else f"{label} ({short})"


class SkewGate:
    """The device's view of version skew with the cloud; thread-safe."""

    def __init__(self, retry_s: float) -> None:
        self.retry_s = retry_s
        self._lock = threading.Lock()
        self._digest = ""  # the device's digest the cloud refused ("" when no skew is known)
        self._reason = ""
        self._until = 0.0  # time.monotonic() until which offloads of that digest are skipped
        self.refusals = 0  # skew refusals seen (tests and measurements)

    def blocked(self, held: pb.ModelRef) -> Optional[str]:
        """The skew reason while offloads of ``held`` are to be skipped, else None (one request then tries)."""
        with self._lock:
            if self._digest and self._digest == held.digest and time.monotonic() < self._until:
                return self._reason
            return None

    def refused(self, served: list[tuple[str, str]], held: pb.ModelRef) -> str:
        """Record a refusal of ``held``'s digest; returns the reason. Logged when the skew is new or changed."""
        cloud = ", ".join(describe(label, digest) for label, digest in served) or "no version"
        reason = f"version skew: cloud serves {cloud}, device holds {describe(held.model_version, held.digest)}"
        with self._lock:
            changed = (held.digest, reason) != (self._digest, self._reason)
            self._digest, self._reason = held.digest, reason
            self._until = time.monotonic() + self.retry_s
            self.refusals += 1
        if changed:
            log.warning("%s: answering on the device (degraded) until they match", reason)
        return reason

    def answered(self, held: pb.ModelRef) -> None:
        """The cloud answered ``held``: any skew is over (logged once)."""
        with self._lock:
            if not self._digest:
                return
            self._digest, self._reason, self._until = "", "", 0.0
        log.info("version skew over: the cloud serves %s", describe(held.model_version, held.digest))
