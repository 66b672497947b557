"""What the benchmarks measure about processes and ports, shared by bench/serving.py and bench/grpc_floor.py."""

from __future__ import annotations

import os
import socket
from pathlib import Path


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_cpu_seconds(pid: int) -> tuple[float, float] | None:
    """CPU seconds (user + system) used so far by process ``pid`` itself and by its live children (the forward
    worker), as ``(own, children)``.

    Reads /proc, so None where there is none; the benchmarks then leave the server's CPU out.
    """
    tick = os.sysconf("SC_CLK_TCK")
    own, children, found = 0.0, 0.0, False
    for entry in Path("/proc").iterdir() if Path("/proc/self/stat").exists() else []:
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        # fields[1] is the parent pid; fields[11], fields[12] are utime and stime in clock ticks.
        seconds = (int(fields[11]) + int(fields[12])) / tick
        if int(entry.name) == pid:
            own, found = own + seconds, True
        elif int(fields[1]) == pid:
            children += seconds
    return (own, children) if found else None


def context_switches(pid: int) -> int:
    """Voluntary + involuntary context switches of all live threads of process ``pid`` so far, from /proc."""
    switches = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            for line in (task / "status").read_text().splitlines():
                if "ctxt_switches" in line:
                    switches += int(line.split()[1])
        except OSError:  # the thread ended while we looked
            continue
    return switches
