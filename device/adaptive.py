"""The scheduler at work on a device: a thread that turns the runtime's measurements into ``Conditions``, asks
the ``Scheduler`` (device/scheduler.py) and applies its decision with ``DeviceRuntime.set_plan``.

It also pings the cloud's health service every round, which gives the round trip without payload (an offload's
network time minus it is the time its bytes took: a bandwidth sample), and when no bandwidth sample is fresh (no
offload, or only ones too small or too short to time, such as a learned code) it sends a probe (the last
activation the head computed, answer dropped) from its own thread: a device that stopped uploading because the
link was slow would otherwise never learn that it got fast again, and a probe on a request's path would put its
upload into that request's latency.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Optional

import numpy as np

from device.scheduler import Conditions, Decision, Objective, Scheduler, cloud_ms
from models.offline_profile import OfflineProfile

if TYPE_CHECKING:
    from device.runtime import DeviceRuntime

log = logging.getLogger("device.scheduler")

WINDOW_S = 10.0  # samples older than this do not describe the link any more
MAX_SAMPLES = 16  # the newest offloads a bandwidth estimate uses
PING_TIMEOUT_S = 1.0
DOWN_AFTER_PINGS = 2  # failed health pings in a row that mean the cloud is gone
RTT_BOUND_S = 60.0  # an offload's round trip bounds the RTT this long (a route may change)
MIN_RATE_BYTES = 2048  # an upload smaller than this is all per-call overhead: it bounds the bandwidth, no more
# A transfer too short to time says only that the link is at least bytes / resolution fast. Taken as a rate it
# pulled a 20 Mbit/s estimate down to 1.9 (6 KB JPEGs, pings 25 ms apart on a throttled device): the e2e
# predicted 97 ms for a 69 ms upload. So it is a lower bound: it raises a lower estimate and never lowers one.


def fresh_calls(calls: list, now: float) -> list:
    """The newest ``MAX_SAMPLES`` offload samples of the last ``WINDOW_S`` seconds."""
    return [c for c in calls if now - c.t <= WINDOW_S][-MAX_SAMPLES:]


class LinkEstimate:
    """Upload bandwidth (bytes/s, mean and 5th percentile) and RTT (ms, mean and p95) from the runtime's
    sample windows, keeping the last estimate while no fresh sample arrives.

    The RTT is the health pings' mean, but never more than the fastest answered offload's network time (an
    offload's round trip bounds the bare one from above; the bound is kept ``RTT_BOUND_S`` after the last
    offload): on a throttled device pings waited for the CPU behind other work and read 70-108 ms on a 40 ms
    link whose offloads took 54 (bench/e2e.py), which made every upload look 30 ms slower than it was."""

    def __init__(self, initial_bandwidth_bit_s: float, initial_rtt_ms: float) -> None:
        self.bandwidth = initial_bandwidth_bit_s / 8.0
        self.bandwidth_p05 = self.bandwidth
        self.rtt, self.rtt_p95 = initial_rtt_ms, initial_rtt_ms
        self.rtt_bound = float("inf")  # the fastest recent offload's network time, ms
        self._bound_t = float("-inf")
        self._ping_rtt, self._spread = initial_rtt_ms, 0.0  # the pings' mean and p95 - mean, ms
        self.censored = False  # the fresh offloads were all too small to time: only a probe can tell more

    def summary(self) -> dict:
        """The estimate in bit/s and ms."""
        return {"bandwidth_bit_s": round(8 * self.bandwidth), "bandwidth_p05_bit_s": round(8 * self.bandwidth_p05),
                "rtt_ms": round(self.rtt, 2), "rtt_p95_ms": round(self.rtt_p95, 2)}

    def update(self, calls: list, pings: list[tuple[float, float]], now: float) -> None:
        fresh = fresh_calls(calls, now)
        fresh_pings = [ms for t, ms in pings if now - t <= WINDOW_S]
        self._update_rtt(fresh, fresh_pings, now)
        resolution_ms = max(0.5, self.rtt_p95 - self.rtt)  # transfers shorter than the RTT's spread are noise
        # the bounds take the fastest ping as the round trip: a mean inflated by a busy CPU would make them big
        rtt_low = min([self.rtt, *fresh_pings])
        rates, bounds = [], []
        for c in fresh:
            transfer_ms = c.network_ms - self.rtt
            if transfer_ms >= resolution_ms and c.bytes_sent >= MIN_RATE_BYTES:
                rates.append(c.bytes_sent / (transfer_ms / 1000.0))
            else:  # too short or too small to time: the link is at least about this fast, maybe much faster
                bounds.append(c.bytes_sent / (max(c.network_ms - rtt_low, resolution_ms) / 1000.0))
        self.censored = bool(fresh) and not rates
        if rates:
            self.bandwidth = float(len(rates) / np.sum(1.0 / np.array(rates)))  # harmonic: time-weighted
            self.bandwidth_p05 = float(np.percentile(rates, 5)) if len(rates) >= 5 else min(rates)
        elif bounds:  # only bounds: a lower estimate (left from a slower phase) rises to them, none falls
            floor = max(bounds)
            self.bandwidth = max(self.bandwidth, floor)
            self.bandwidth_p05 = min(self.bandwidth, max(self.bandwidth_p05, floor))

    def _update_rtt(self, fresh: list, fresh_pings: list[float], now: float) -> None:
        """The pings' mean (their spread once there are 3), never above the bound of the fastest offload seen in
        the last ``RTT_BOUND_S``."""
        if fresh:
            self.rtt_bound, self._bound_t = min(c.network_ms for c in fresh), now
        elif now - self._bound_t > RTT_BOUND_S:
            self.rtt_bound = float("inf")
        if fresh_pings:
            self._ping_rtt = float(np.mean(fresh_pings))
        if len(fresh_pings) >= 3:
            self._spread = max(0.0, float(np.percentile(fresh_pings, 95)) - self._ping_rtt)
        self.rtt = min(self._ping_rtt, max(self.rtt_bound, 0.0))
        self.rtt_p95 = self.rtt + self._spread


class Adaptive:
    """Runs the scheduler every ``interval_s`` on a thread of its own (``start``/``close``); ``step`` is one
    round, callable directly (tests)."""

    def __init__(self, runtime: "DeviceRuntime", profile: OfflineProfile, objective: Objective, interval_s: float,
                 margin: float, probe_interval_s: float, initial_bandwidth_bit_s: float,
                 initial_rtt_ms: float) -> None:
        self.runtime = runtime
        self.profile = profile
        self.scheduler = Scheduler(profile, objective, margin)
        self.interval_s = interval_s
        self.probe_interval_s = probe_interval_s
        self.link = LinkEstimate(initial_bandwidth_bit_s, initial_rtt_ms)
        self.failed_pings = 0
        self._last_probe = float("-inf")
        self.rounds = 0
        self.cpu_ms = 0.0  # CPU time of this thread's rounds (ping, probe, estimate, decide): its own cost
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="spinn-scheduler", daemon=True)

    @property
    def last(self) -> Optional[Decision]:
        return self.scheduler.last

    def start(self) -> None:
        self._safe_step()
        self._thread.start()

    def close(self, timeout_s: Optional[float] = None) -> None:
        """Stop the thread; waits for a round in progress (a ping and a probe, each with its deadline)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s if timeout_s is not None else PING_TIMEOUT_S + self._probe_timeout_s() + 5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._safe_step()

    def _safe_step(self) -> None:
        started = time.thread_time()
        try:
            self.step()
        except Exception:  # a bad round must not end the scheduling: log it, keep the current plan
            log.exception("scheduler round failed; the current plan stays")
        self.rounds += 1
        self.cpu_ms += (time.thread_time() - started) * 1000.0

    def _probe_timeout_s(self) -> float:
        return max(1.0, self.runtime.cfg.deadline_ms / 1000.0)

    def ping(self) -> None:
        """One health check: its round trip is an RTT sample unless a request's head was computing meanwhile
        (then it also waited for the CPU, which the upload after the compute does not); failures in a row mark
        the cloud down."""
        link = self.runtime.link
        if link is None:
            self.failed_pings = DOWN_AFTER_PINGS
            return
        idle = not self.runtime.busy
        started = time.perf_counter()
        if link.healthy(timeout_s=PING_TIMEOUT_S):
            if idle and not self.runtime.busy:
                self.runtime.link_stats.record_ping((time.perf_counter() - started) * 1000.0)
            self.failed_pings = 0
        else:
            self.failed_pings += 1

    def conditions(self) -> Conditions:
        """What the device measures now, as the scheduler reads it."""
        now = time.monotonic()
        calls, pings = self.runtime.link_stats.recent()
        self.link.update(calls, pings, now)
        fresh = fresh_calls(calls, now)
        queue = float(np.mean([c.queue_ms for c in fresh])) if fresh else 0.0
        scales = [c.compute_ms / est for c in fresh if 0 <= c.split_point <= self.profile.num_blocks
                  and (est := cloud_ms(self.profile, c.split_point)) > 0]
        times = self.runtime.block_times.snapshot()
        up = (self.runtime.link is not None and not self.runtime.breaker.is_open
              and self.failed_pings < DOWN_AFTER_PINGS)
        return Conditions(self.link.bandwidth, self.link.bandwidth_p05, self.link.rtt, self.link.rtt_p95, queue,
                          float(np.mean(scales)) if scales else 1.0, times["block_ms"], times["exit_ms"], up,
                          self.runtime.block_times.tail_factor())

    def step(self) -> Optional[Decision]:
        """Ping, probe the link if no offload measured it lately, estimate, decide; apply a new decision.
        Returns it (None: the plan stays)."""
        self.ping()
        if not self._stop.is_set() and self.probe_due():
            self.runtime.probe_link(timeout_s=self._probe_timeout_s())
        splits, local_final = self.runtime.plan_splits()
        active = self.runtime.active
        current = None if active is None else (active.split_point, active.threshold)
        decision = self.scheduler.update(self.conditions(), self.runtime.codec_names(), splits, local_final,
                                         current)
        if decision is not None and not self._stop.is_set():
            try:
                self.runtime.set_plan(decision.split_point, decision.threshold)
            except ValueError as err:  # the usable splits changed under it: decide again next round
                log.warning("scheduler: %s; deciding again", err)
                self.scheduler.last = None
                return None
        return decision

    def probe_due(self) -> bool:
        """True (at most once per ``probe_interval_s``) when no offload has measured the link lately (none, or
        all too small to time: a learned code of 300 B says nothing of a 20 Mbit/s link, and a low estimate
        left from a slow phase would keep the plan on it), the cloud is up and the device served a request in
        the last ``WINDOW_S``."""
        now = time.monotonic()
        if self.failed_pings >= DOWN_AFTER_PINGS or self.runtime.breaker.is_open:
            return False
        if now - self.runtime.last_request_t > WINDOW_S:  # an idle device does not spend its link on probes
            return False
        last_call = float("-inf") if self.link.censored else self.runtime.link_stats.last_call_t()
        if now - max(last_call, self._last_probe) < self.probe_interval_s:
            return False
        self._last_probe = now
        return True
