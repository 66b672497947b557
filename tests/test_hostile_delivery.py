"""Weight delivery against a hostile, broken or reconfigured cloud (bench/hostile.py: a real gRPC server proxying a
real cloud and altering its answers). In every case the device answers every image, writes nothing outside its
weights cache, and ends on the honest model once the cloud is honest."""

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench.hostile import Cut, HostileCloud
from device.config import DeviceConfig
from device.runtime import DeviceRuntime
from models.config import ConfigError, from_dict
from proto import spinn_v1_pb2 as pb
from tests.conftest import ROOT, SIZE, digest_of
from tests.test_device import start_cloud, wait_until


def stream_cfg(address: str, cache: Path, **overrides) -> DeviceConfig:
    return from_dict(DeviceConfig, {"checkpoint": "stream", "cloud": address, "split_point": 7,
                                    "z_confidence_threshold": 1.0, "deadline_ms": 10_000, "fallback": "exit",
                                    "weights_cache": str(cache), "stream_poll_seconds": 0.2,
                                    "stream_decode_process": False, "log_level": "WARNING", **overrides})


def files_outside(root: Path, cache: Path) -> dict[str, int]:
    """Every file under ``root`` but the cache, with its size: what a device must never touch."""
    return {str(p): p.stat().st_size for p in root.rglob("*") if p.is_file() and cache not in p.parents}


def answers_every_image(runtime: DeviceRuntime, count: int = 3) -> None:
    for i in range(count):
        result = runtime.classify_tensor(torch.randn(3, SIZE, SIZE, generator=torch.Generator().manual_seed(i)))
        assert result.label  # an answer: the cloud's at split 0, or the device's own


def ends_honest(runtime: DeviceRuntime, proxy: HostileCloud, small_model) -> None:
    proxy.honest()
    runtime.streamed.check_soon()
    assert wait_until(lambda: runtime.active is not None and runtime.active.complete, 60)
    assert runtime.active.ref.digest == digest_of(small_model)
    got = runtime.active.model.state_dict()["final.classifier.1.bias"]
    assert torch.equal(got, small_model.state_dict()["final.classifier.1.bias"])


@pytest.fixture
def hostile(checkpoint):
    cloud = start_cloud(checkpoint, built_in_thread=True)
    proxy = HostileCloud(f"127.0.0.1:{cloud.port}")
    yield proxy, cloud
    proxy.stop()
    cloud.stop()


def _set(field: str, value: str):
    def mutate(m: pb.Manifest) -> pb.Manifest:
        if field == "order":
            m.order = value
        else:
            setattr(m.model, field, value)
        return m
    return mutate


def _raw_shape(suffix: str, shape: list[int]):
    def mutate(m: pb.Manifest) -> pb.Manifest:
        entry = next(t for t in m.tensors if t.name.endswith(suffix))
        entry.shape[:] = shape
        return m
    return mutate


def _nested(m: pb.Manifest) -> pb.Manifest:
    m.metadata_json = '{"a":' * 100_000 + "1" + "}" * 100_000
    return m


def _huge_chunk(m: pb.Manifest) -> pb.Manifest:
    m.chunks[0].size = 1 << 40
    return m


EVIL = "EVIL"  # replaced by an absolute path in the test's own folder


@pytest.mark.parametrize("mutate", [
    _set("model_id", EVIL), _set("model_id", "../../escaped"), _set("model_id", "a\0b"),
    _set("model_id", "x" * 10_000), _set("model_id", "a/b"),
    _set("model_version", EVIL), _set("model_version", "../.."), _set("model_version", "v\0"),
    _set("model_version", "y" * 10_000),
    _set("order", "../../escaped"), _set("order", EVIL),
    _raw_shape("running_mean", [7]),  # does not fit the metadata's model config
    _raw_shape("running_mean", [10 ** 9, 10 ** 6]),  # petabytes
    _nested, _huge_chunk,
], ids=["id-abs", "id-dotdot", "id-nul", "id-10k", "id-slash", "ver-abs", "ver-dotdot", "ver-nul", "ver-10k",
        "order-dotdot", "order-abs", "shape-config", "shape-petabytes", "metadata-100k-deep", "chunk-huge"])
def test_a_hostile_manifest_is_refused_whole_and_nothing_is_written(hostile, small_model, tmp_path, mutate):
    proxy, _ = hostile
    evil = tmp_path / "evil"

    def altered(m: pb.Manifest) -> pb.Manifest:
        m = mutate(m)
        for field in ("model_id", "model_version"):
            if getattr(m.model, field) == EVIL:
                setattr(m.model, field, str(evil))
        if m.order == EVIL:
            m.order = str(evil)
        return m

    proxy.manifest = altered
    cache = tmp_path / "cache"
    before = files_outside(tmp_path, cache)
    runtime = DeviceRuntime.start(stream_cfg(proxy.address, cache))
    try:
        assert wait_until(lambda: runtime.streamed.refused_manifests >= 2, 30)  # polled again, refused again
        answers_every_image(runtime)
        assert runtime.active.model is None  # nothing of it was installed
        assert files_outside(tmp_path, cache) == before and not evil.exists()
        assert not [p for p in cache.rglob("*") if p.is_file() and p.name != ".lock"]  # nothing stored
        ends_honest(runtime, proxy, small_model)
    finally:
        runtime.close()


def test_a_tampered_chunk_is_refused_and_fetched_again(hostile, small_model, tmp_path):
    proxy, _ = hostile
    tampered = []

    def flip_once(message: pb.WeightChunk, i: int):
        if not tampered and i == 2 and message.data:
            tampered.append(i)
            data = bytearray(message.data)
            data[len(data) // 2] ^= 0xFF
            message.data = bytes(data)
        return message

    proxy.chunk = flip_once
    runtime = DeviceRuntime.start(stream_cfg(proxy.address, tmp_path / "cache"))
    try:
        assert wait_until(lambda: runtime.active is not None and runtime.active.complete, 60)
        assert tampered and runtime.streamed.current.refused >= 1
        answers_every_image(runtime)
        ends_honest(runtime, proxy, small_model)
    finally:
        runtime.close()


def test_a_wrong_final_digest_is_never_installed_as_complete(hostile, small_model, tmp_path):
    proxy, _ = hostile

    def wrong_final(m: pb.Manifest) -> pb.Manifest:
        m.final_sha256 = hashlib.sha256(b"not these weights").hexdigest()
        return m

    proxy.manifest = wrong_final
    runtime = DeviceRuntime.start(stream_cfg(proxy.address, tmp_path / "cache"))
    try:
        assert wait_until(lambda: sum(runtime.streamed.failures.values()) >= 3, 120)  # fetched again, bounded
        answers_every_image(runtime)
        assert not runtime.active.complete  # every chunk matched its hash, yet the whole never counted
        ends_honest(runtime, proxy, small_model)
    finally:
        runtime.close()


def test_a_package_cut_again_under_the_same_version_is_streamed_anew(checkpoint, small_model, tmp_path):
    """A device whose first stream was cut short, against a cloud restarted with another chunk size (same
    checkpoint, same version): the cloud refuses the old package digest, the device fetches the new manifest."""
    first = start_cloud(checkpoint, delivery_chunk_bytes=2048)
    proxy = HostileCloud(f"127.0.0.1:{first.port}")
    second = None

    def cut_after(message: pb.WeightChunk, i: int):
        if i >= 3:
            raise Cut()
        return message

    proxy.chunk = cut_after
    runtime = DeviceRuntime.start(stream_cfg(proxy.address, tmp_path / "cache"))
    try:
        assert wait_until(lambda: runtime.streamed.current is not None and
                          runtime.streamed.current.decoder.next_chunk >= 3, 30)
        first.stop()
        second = start_cloud(checkpoint, delivery_chunk_bytes=6000)
        proxy.retarget(f"127.0.0.1:{second.port}")
        proxy.honest()
        assert wait_until(lambda: runtime.active is not None and runtime.active.complete, 120)
        assert runtime.active.ref.digest == digest_of(small_model)
        assert runtime.streamed.current.refused == 0  # no chunk of the old cut was taken for the new one
        answers_every_image(runtime)
    finally:
        runtime.close()
        proxy.stop()
        for cloud in (first, second):
            if cloud is not None:
                cloud.stop()


def test_a_truncated_cached_manifest_is_quarantined_and_the_device_starts(checkpoint, small_model, tmp_path):
    cloud = start_cloud(checkpoint)
    cache = tmp_path / "cache"
    try:
        runtime = DeviceRuntime.start(stream_cfg(f"127.0.0.1:{cloud.port}", cache))
        assert wait_until(lambda: runtime.active is not None and runtime.active.complete, 60)
        runtime.close()
        (stored,) = cache.rglob("manifest.pb")
        stored.write_bytes(stored.read_bytes()[:100])
        again = DeviceRuntime.start(stream_cfg(f"127.0.0.1:{cloud.port}", cache))
        try:
            assert list((cache / "quarantine").iterdir())  # kept for inspection, never loaded
            answers_every_image(again)
            assert wait_until(lambda: again.active is not None and again.active.complete, 60)
            assert again.active.ref.digest == digest_of(small_model)
        finally:
            again.close()
    finally:
        cloud.stop()


def test_one_process_per_cache(checkpoint, tmp_path):
    cloud = start_cloud(checkpoint)
    cache = tmp_path / "cache"
    runtime = DeviceRuntime.start(stream_cfg(f"127.0.0.1:{cloud.port}", cache))
    try:
        with pytest.raises(ConfigError, match=f"'weights_cache'.*in use by pid {os.getpid()}"):
            DeviceRuntime.start(stream_cfg(f"127.0.0.1:{cloud.port}", cache))
        other = subprocess.run([sys.executable, "-m", "device", "fetch", "--timeout", "20", "checkpoint=stream",
                                f"cloud=127.0.0.1:{cloud.port}", f"weights_cache={cache}"], cwd=ROOT,
                               capture_output=True, text=True, timeout=120)
        assert other.returncode == 2 and f"in use by pid {os.getpid()}" in other.stderr
    finally:
        runtime.close()
        cloud.stop()
    again = DeviceRuntime.start(stream_cfg(f"127.0.0.1:{cloud.port}", cache))  # released with the first
    again.close()


def _key_files(folder: Path, name: str) -> tuple[Path, Path]:
    key = Ed25519PrivateKey.generate()
    private, public = folder / f"{name}.pem", folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


@pytest.mark.parametrize("signer", ["none", "other"])
def test_with_a_public_key_only_packages_signed_by_it_are_accepted(checkpoint, small_model, tmp_path, signer):
    ours, ours_pub = _key_files(tmp_path, "ours")
    theirs, _ = _key_files(tmp_path, "theirs")
    bad = start_cloud(checkpoint, delivery_signing_key=None if signer == "none" else str(theirs))
    proxy = HostileCloud(f"127.0.0.1:{bad.port}")
    good = None
    runtime = DeviceRuntime.start(stream_cfg(proxy.address, tmp_path / "cache",
                                             delivery_public_key=str(ours_pub)))
    try:
        assert wait_until(lambda: runtime.streamed.refused_manifests >= 2, 30)
        answers_every_image(runtime)
        assert runtime.active.model is None
        good = start_cloud(checkpoint, delivery_signing_key=str(ours))
        proxy.retarget(f"127.0.0.1:{good.port}")
        ends_honest(runtime, proxy, small_model)
    finally:
        runtime.close()
        proxy.stop()
        bad.stop()
        if good is not None:
            good.stop()


def test_a_signature_that_does_not_cover_the_manifest_is_refused(checkpoint, tmp_path):
    """The signature covers the package digest, which covers every field: an altered manifest re-sealed by a
    mirror keeps the old signature, which no longer verifies."""
    ours, ours_pub = _key_files(tmp_path, "ours")
    cloud = start_cloud(checkpoint, delivery_signing_key=str(ours))
    proxy = HostileCloud(f"127.0.0.1:{cloud.port}")

    def retitled(m: pb.Manifest) -> pb.Manifest:
        m.model.model_version = "evil"  # valid name, re-sealed digest, the publisher's old signature
        return m

    proxy.manifest = retitled
    runtime = DeviceRuntime.start(stream_cfg(proxy.address, tmp_path / "cache", delivery_public_key=str(ours_pub)))
    try:
        assert wait_until(lambda: runtime.streamed.refused_manifests >= 2, 30)
        assert "does not verify" in runtime.streamed._last_refusal
    finally:
        runtime.close()
        proxy.stop()
        cloud.stop()
