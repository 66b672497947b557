"""Per-thread CPU priority, shared by both daemons: background work (the device's weight stream, the cloud's
forward) runs nicer than the threads that must answer at once, so that when the cores are saturated the
kernel gives those the CPU first."""

from __future__ import annotations

import logging
import os
import signal
import threading

log = logging.getLogger("spinn")


def lower_thread_priority(nice: int) -> None:
    """Make the calling thread ``nice`` steps nicer (capped at 19). Linux gives each thread its own nice value;
    elsewhere, or when the call fails, a no-op (logged at debug level): priority is an optimisation only."""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except OSError as err:
        log.debug("could not lower thread %s's priority: %s", threading.current_thread().name, err)


def become_background_child(nice: int) -> None:
    """In a child process the daemon owns (forward worker, decode process): ignore SIGINT/SIGTERM, which reach
    the whole process group while the daemon drains and then stops the child itself, and run ``nice`` steps
    nicer (the whole process, its torch threads included)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if nice > 0 and hasattr(os, "nice"):
        os.nice(nice)

