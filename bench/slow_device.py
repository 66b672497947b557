"""Emulate a slower device CPU: a cgroup whose CFS bandwidth quota caps its processes at a share of one core.

    with cpu_share(0.25, "spinn-device") as group:       # a quarter of one core
        subprocess.run([*group.command_prefix(), sys.executable, "driver.py"])

The group gets ``quota = fraction x period`` microseconds of CPU time per ``period`` (10 ms), summed over all
its threads: 0.25 is a quarter of one core, 2.0 two cores. A throttled process runs at full clock speed in
bursts and waits out the rest of each period, so per-operation latency grows by about ``1 / fraction`` for
CPU-bound work longer than a period. Works with cgroup v1 (``/sys/fs/cgroup/cpu/<name>/cpu.cfs_quota_us``)
and v2 (``cpu.max``, when ``/sys/fs/cgroup/cgroup.controllers`` exists). Needs root; ``why_not()`` says why not.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

log = logging.getLogger("slow_device")

CGROUP_ROOT = Path("/sys/fs/cgroup")
PERIOD_US = 10_000  # CFS period, microseconds: short, so that throttling pauses stay short (<= 10 ms)
MIN_QUOTA_US = 1_000  # the kernel refuses a quota under 1 ms
MAX_PERIOD_US = 1_000_000  # the kernel's largest period, 1 s
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def _hierarchy() -> Optional[tuple[str, Path]]:
    """("v2", root) or ("v1", root of the cpu controller), or None when neither is mounted."""
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        return "v2", CGROUP_ROOT
    if (CGROUP_ROOT / "cpu" / "cpu.cfs_quota_us").exists():
        return "v1", CGROUP_ROOT / "cpu"
    return None


def period_quota(fraction: float) -> tuple[int, int]:
    """``(period_us, quota_us)`` for ``fraction`` of one core: period 10 ms, lengthened for small fractions so
    that the quota stays >= 1 ms (the kernel's minimum). Raises ValueError for a fraction too small."""
    if not fraction > 0:
        raise ValueError(f"fraction must be > 0, got {fraction}")
    period = PERIOD_US
    if fraction * period < MIN_QUOTA_US:
        period = int(MIN_QUOTA_US / fraction + 0.5)
        if period > MAX_PERIOD_US:
            raise ValueError(f"fraction {fraction} is below {MIN_QUOTA_US / MAX_PERIOD_US} of a core")
    return period, int(round(fraction * period))


@dataclass
class CpuGroup:
    """A CPU-limited cgroup: ``path`` its folder, ``version`` "v1" or "v2", ``fraction`` of one core."""

    name: str
    path: Path
    version: str
    fraction: float
    period_us: int
    quota_us: int

    @property
    def procs_file(self) -> Path:
        return self.path / "cgroup.procs"

    def add(self, pid: int) -> None:
        """Move process ``pid`` (all its threads) into the group; raises OSError (e.g. ESRCH: no such pid)."""
        self.procs_file.write_text(f"{pid}\n")

    def command_prefix(self) -> list[str]:
        """Argv prefix that runs a command inside the group: a shell joins it, then ``exec``s the command (so the
        command has the shell's pid, and its children are in the group from their first instruction). The
        ``&&`` makes a failed join fail the command instead of running it unthrottled. Put it before
        ``ip netns exec``, not after: that remounts /sys for the namespace, where the cgroup files are not."""
        script = f'echo $$ > {shlex.quote(str(self.procs_file))} && exec "$@"'
        return ["sh", "-c", script, "sh"]

    def pids(self) -> list[int]:
        return [int(p) for p in self.procs_file.read_text().split()]

    def stats(self) -> dict[str, int]:
        """The kernel's ``cpu.stat`` counters (v1: nr_periods, nr_throttled, throttled_time in ns; v2 also
        usage_usec, throttled_usec in µs)."""
        out = {}
        for line in (self.path / "cpu.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if value.strip().isdigit():
                out[key] = int(value)
        return out


def _set_limit(path: Path, version: str, period_us: int, quota_us: int) -> None:
    if version == "v2":
        (path / "cpu.max").write_text(f"{quota_us} {period_us}\n")
    else:
        # quota first would fail when it exceeds the old period's allowance on some kernels: reset it, then set
        (path / "cpu.cfs_quota_us").write_text("-1\n")
        (path / "cpu.cfs_period_us").write_text(f"{period_us}\n")
        (path / "cpu.cfs_quota_us").write_text(f"{quota_us}\n")


def _enable_v2_cpu(root: Path) -> None:
    """cgroup v2 gives a child ``cpu.max`` only if the parent delegates the cpu controller to its children."""
    control = root / "cgroup.subtree_control"
    if "cpu" not in control.read_text().split():
        control.write_text("+cpu\n")


def create(fraction: float, name: str) -> CpuGroup:
    """Create (or reuse, from a crashed run) the group ``name`` limited to ``fraction`` of one core.

    Raises ValueError for a bad name or fraction, OSError when the kernel refuses.
    """
    if not _NAME.match(name):
        raise ValueError(f"cgroup name {name!r}: letters, digits, '_', '.', '-' only")
    found = _hierarchy()
    if found is None:
        raise OSError(errno.ENOENT, "no cgroup cpu controller mounted under /sys/fs/cgroup")
    version, root = found
    period, quota = period_quota(fraction)
    if version == "v2":
        _enable_v2_cpu(root)
    path = root / name
    path.mkdir(exist_ok=True)
    _set_limit(path, version, period, quota)
    return CpuGroup(name, path, version, fraction, period, quota)


def resize(group: CpuGroup, fraction: float) -> None:
    """Change the group's limit to ``fraction`` of one core, its processes staying inside (bench/device_speed.py
    calibrates the device this way). Raises ValueError for a fraction too small, OSError when the kernel refuses."""
    period, quota = period_quota(fraction)
    _set_limit(group.path, group.version, period, quota)
    group.fraction, group.period_us, group.quota_us = fraction, period, quota


def remove(group: CpuGroup, timeout_s: float = 5.0) -> None:
    """Move the group's processes back to the root group, then delete it; retries until ``timeout_s`` seconds
    (a process may be exiting, or fork, meanwhile). Logs a warning when the group is left behind."""
    root_procs = group.path.parent / "cgroup.procs"
    deadline = time.monotonic() + timeout_s
    while True:
        for pid in group.pids() if group.path.exists() else []:
            with contextlib.suppress(ProcessLookupError, OSError):  # exited meanwhile
                root_procs.write_text(f"{pid}\n")
        try:
            group.path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as err:  # EBUSY: a process is still inside
            if time.monotonic() > deadline:
                log.warning("cgroup %s not removed after %.1f s: %s", group.path, timeout_s, err)
                return
            time.sleep(0.05)


@contextlib.contextmanager
def cpu_share(fraction: float, name: str) -> Iterator[CpuGroup]:
    """The group ``name`` limited to ``fraction`` of one core for the ``with`` block; removed after it."""
    group = create(fraction, name)
    log.info("cgroup %s: %.3f of a core (%d us every %d us)", group.path, fraction, group.quota_us, group.period_us)
    try:
        yield group
    finally:
        remove(group)


def why_not() -> Optional[str]:
    """None when a CPU-limited group can be made here, else the reason."""
    if os.geteuid() != 0:
        return "needs root to create a cpu cgroup"
    if _hierarchy() is None:
        return "no cgroup cpu controller (neither v1 cpu.cfs_quota_us nor v2 cpu.max under /sys/fs/cgroup)"
    try:
        group = create(0.5, f"spinn-probe-{os.getpid()}")
    except OSError as err:
        return f"cannot create a cpu cgroup: {err}"
    remove(group)
    return None
