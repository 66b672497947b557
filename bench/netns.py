"""Two hosts on one machine: network namespaces joined by a veth pair, each direction shaped with ``tc tbf``.

Used by tests/test_two_hosts.py and the link benchmarks. Needs root and iproute2; ``why_not()`` says why not.
Only the namespaces' own addresses (10.231.x.0/24, created here) carry traffic.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import Iterator


def sh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=30)


def why_not() -> str | None:
    """None when namespaces can be made here, else the reason."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "needs iproute2 (ip, tc)"
    probe = f"spinn-probe-{os.getpid()}"
    if sh("ip", "netns", "add", probe).returncode != 0:
        return "ip netns add is not permitted here"
    sh("ip", "netns", "del", probe)
    return None


@dataclass
class TwoHosts:
    cloud_ns: str
    device_ns: str
    cloud_ip: str
    device_link: str  # the device's veth (``ip link set ... down`` cuts the link)

    def exec(self, ns: str) -> list[str]:
        """Command prefix that runs a program inside namespace ``ns``."""
        return ["ip", "netns", "exec", ns]


class SetupError(RuntimeError):
    """A step of the namespace setup failed (the message names it)."""


@contextlib.contextmanager
def two_hosts(rate_bit_s: int, tag: int | None = None) -> Iterator[TwoHosts]:
    """Create the two namespaces with a veth pair shaped to ``rate_bit_s`` each way; removed on exit.

    Raises SetupError naming the step that failed.
    """
    tag = tag if tag is not None else os.getpid() % 200 + 20
    hosts = TwoHosts(f"spinn-cloud-{tag}", f"spinn-device-{tag}", f"10.231.{tag}.1", f"vd{tag}")
    device_ip = f"10.231.{tag}.2"
    c, d = hosts.cloud_ns, hosts.device_ns
    steps = [
        ("ip", "netns", "add", c), ("ip", "netns", "add", d),
        ("ip", "link", "add", f"vc{tag}", "type", "veth", "peer", "name", f"vd{tag}"),
        ("ip", "link", "set", f"vc{tag}", "netns", c), ("ip", "link", "set", f"vd{tag}", "netns", d),
        ("ip", "-n", c, "addr", "add", f"{hosts.cloud_ip}/24", "dev", f"vc{tag}"),
        ("ip", "-n", d, "addr", "add", f"{device_ip}/24", "dev", f"vd{tag}"),
        ("ip", "-n", c, "link", "set", f"vc{tag}", "up"), ("ip", "-n", d, "link", "set", f"vd{tag}", "up"),
        ("ip", "-n", c, "link", "set", "lo", "up"), ("ip", "-n", d, "link", "set", "lo", "up"),
        ("ip", "netns", "exec", d, "tc", "qdisc", "add", "dev", f"vd{tag}", "root", "tbf",
         "rate", f"{rate_bit_s}bit", "burst", "4kb", "latency", "200ms"),
        ("ip", "netns", "exec", c, "tc", "qdisc", "add", "dev", f"vc{tag}", "root", "tbf",
         "rate", f"{rate_bit_s}bit", "burst", "4kb", "latency", "200ms"),
    ]
    try:
        for step in steps:
            done = sh(*step)
            if done.returncode != 0:
                raise SetupError(f"{' '.join(step)} failed: {done.stderr.strip()}")
        yield hosts
    finally:
        sh("ip", "netns", "del", c)
        sh("ip", "netns", "del", d)
