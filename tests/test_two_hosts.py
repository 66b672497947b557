"""Device and cloud on two hosts: network namespaces joined by a veth pair, bandwidth shaped with tc tbf.

Runs where the machine allows it (root, iproute2 with netns + tbf); skipped with the reason otherwise.
"""

import io
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from bench import netns
from serving.security import TOKEN_ENV
from tests.conftest import ROOT, make_cert

RATE_BIT_S = 2_000_000  # tbf rate on each direction of the link


@pytest.fixture
def two_hosts():
    reason = netns.why_not()
    if reason:
        pytest.skip(reason)
    try:
        with netns.two_hosts(RATE_BIT_S) as hosts:
            yield {"cloud_ns": hosts.cloud_ns, "device_ns": hosts.device_ns, "cloud_ip": hosts.cloud_ip,
                   "device_link": hosts.device_link}
    except netns.SetupError as err:
        pytest.skip(str(err))


HEALTH = ("import grpc,sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; "
          "c=grpc.ssl_channel_credentials(open(sys.argv[2],'rb').read()); "
          "s=g.HealthStub(grpc.secure_channel(sys.argv[1],c)); "
          "sys.exit(0 if s.Check(h.HealthCheckRequest(),timeout=2,wait_for_ready=True).status==1 else 1)")


def test_device_and_cloud_on_two_shaped_hosts(two_hosts, checkpoint, tmp_path):
    """The README's two-machine setup: the cloud on its host's address with TLS and a bearer token from a file,
    the device with the CA and the token from SPINN_AUTH_TOKEN; a device without the token is refused."""
    ns_exec = ("ip", "netns", "exec")
    address = f"{two_hosts['cloud_ip']}:50051"
    cert, key = make_cert(tmp_path, ip=two_hosts["cloud_ip"])
    token_file = tmp_path / "token"
    token_file.write_text("two-hosts-s3cret\n")
    token_file.chmod(0o600)
    cloud = subprocess.Popen([*ns_exec, two_hosts["cloud_ns"], sys.executable, "-m", "cloud",
                              f"checkpoint={checkpoint}", f"address={address}", "log_level=WARNING",
                              f"tls_cert={cert}", f"tls_key={key}", f"auth_token_file={token_file}"],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env={k: v for k, v in os.environ.items() if k != TOKEN_ENV})
    try:
        deadline = time.monotonic() + 90
        while subprocess.run([*ns_exec, two_hosts["device_ns"], sys.executable, "-c", HEALTH, address, str(cert)],
                             capture_output=True).returncode != 0:
            assert cloud.poll() is None, cloud.stderr.read()
            assert time.monotonic() < deadline, "the cloud never became SERVING across the link"
            time.sleep(0.5)
        images = []
        for i in range(3):
            pixels = np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="PNG")
            images.append(tmp_path / f"i{i}.png")
            images[-1].write_bytes(buf.getvalue())

        def classify(token: str | None):
            env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
            if token is not None:
                env[TOKEN_ENV] = token
            proc = subprocess.run(
                [*ns_exec, two_hosts["device_ns"], sys.executable, "-m", "device", "classify", "--json",
                 *map(str, images), f"checkpoint={checkpoint}", f"cloud={address}", f"tls_ca={cert}",
                 "split_point=0", "z_confidence_threshold=1.0", "codec=float32+none", "deadline_ms=5000"],
                cwd=ROOT, capture_output=True, text=True, timeout=180, env=env)
            assert proc.returncode == 0, proc.stderr
            return [json.loads(line) for line in proc.stdout.splitlines()]

        rows = classify("two-hosts-s3cret")
        for row in rows:
            assert row["answered_by"] == "cloud" and not row["degraded"]
            # The raw 3x32x32 float32 input (12 kB) cannot cross a 2 Mbit/s link faster than the rate allows:
            # a physical lower bound that proves the traffic went over the shaped veth, not loopback.
            assert row["latency_ms"] >= 0.8 * row["bytes_sent"] * 8 / RATE_BIT_S * 1000
        for row in classify(None):  # no token: refused by the cloud, answered on the device
            assert row["degraded"] and row["reason"].startswith("UNAUTHENTICATED")

        netns.sh(*ns_exec, two_hosts["device_ns"], "ip", "link", "set", two_hosts["device_link"], "down")
        for row in classify("two-hosts-s3cret"):  # link cut: every image still answered, on the device
            assert row["degraded"] and row["answered_by"].startswith("device:")
    finally:
        cloud.terminate()
        cloud.wait(timeout=30)
