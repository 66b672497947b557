"""A model folder the cloud polls: one checkpoint file per version (``<model_dir>/<version>.pt``), the file's name
being the version's label; the latest ``keep`` labels (natural order: ``v2`` < ``v10``) are served.

A new file is loaded on the poller's thread, at a lower CPU priority, while the other versions keep serving, once
its size and modification time have not changed for one poll (a file still being copied is waited for); a
version whose file is removed, or that falls beyond the policy, retires (unloaded after its last request). A file
that cannot become a version (unreadable, another architecture, a label reused for other weights) is logged once
with the reason and skipped until it changes; the versions served stay as they are.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from cloud.inference import ServedModel
from cloud.versions import ModelRegistry, VersionRefused, version_rank
from models.checkpoint import CheckpointError
from serving.priority import lower_thread_priority

log = logging.getLogger("cloud")

SUFFIX = ".pt"


@dataclass(frozen=True)
class _Seen:
    """What a file was when last looked at: loading is retried only once it changes."""

    size: int
    mtime_ns: int


def _state(path: Path) -> Optional[_Seen]:
    try:
        st = path.stat()
    except OSError:
        return None
    return _Seen(st.st_size, st.st_mtime_ns)


class ModelFolder:
    """Keeps ``registry`` in step with the checkpoint files of ``folder``. ``load(path, label)`` builds the
    ServedModel of one file (raising CheckpointError for a file that is not a checkpoint)."""

    def __init__(self, folder: Path, registry: ModelRegistry, load: Callable[[Path, str], ServedModel],
                 poll_seconds: float, nice: int = 0,
                 on_loaded: Optional[Callable[[ServedModel], None]] = None) -> None:
        """``on_loaded(served)``: called on the poller's thread after a new version serves (e.g. to build its
        progressive packages before devices ask for them)."""
        self.folder, self.registry, self.load, self.on_loaded = folder, registry, load, on_loaded
        self.poll_seconds, self.nice = poll_seconds, nice
        self._loaded: dict[str, tuple[str, _Seen]] = {}  # label -> (digest, file state when loaded)
        self._refused: dict[str, _Seen] = {}  # label -> file state when it was refused
        self._settling: dict[str, _Seen] = {}  # label -> file state at the last poll, not loaded yet
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="spinn-model-dir", daemon=True)

    def wanted(self) -> dict[str, Path]:
        """The latest ``registry.keep`` checkpoint files by label."""
        files = {p.stem: p for p in self.folder.glob(f"*{SUFFIX}") if p.is_file()}
        labels = sorted(files, key=version_rank)[-self.registry.keep:]
        return {label: files[label] for label in labels}

    def scan(self, settled: bool = False) -> int:
        """One pass: load new or changed files among the wanted ones that have not changed since the last pass
        (``settled``: at start-up, files are taken as complete at once), retire versions no longer wanted;
        returns how many versions were loaded. Never raises for a bad file (logged)."""
        wanted = self.wanted()
        for label, (digest, _) in list(self._loaded.items()):
            if label not in wanted:
                del self._loaded[label]
                self.registry.retire(digest, f"{label}{SUFFIX} is gone from {self.folder} or beyond the policy")
        loaded = 0
        for label in sorted(wanted, key=version_rank, reverse=True):  # the latest first: SERVING soonest
            path, seen = wanted[label], _state(wanted[label])
            if seen is None or self._refused.get(label) == seen:
                continue
            known = self._loaded.get(label)
            if known is not None and known[1] == seen:
                continue
            if not settled and self._settling.get(label) != seen:
                self._settling[label] = seen  # new or still changing: look again at the next poll
                continue
            self._settling.pop(label, None)
            loaded += self._try_load(label, path, seen)
        return loaded

    def _try_load(self, label: str, path: Path, seen: _Seen) -> int:
        try:
            served = self.load(path, label)
            known = self._loaded.get(label)
            if known is not None and known[0] == served.digest:  # rewritten with the same content: nothing new
                self._loaded[label] = (served.digest, seen)
                return 0
            self.registry.add(served, version_rank(label))
        except (CheckpointError, VersionRefused, OSError) as err:
            self._refused[label] = seen
            log.error("model folder: %s not served: %s", path, err)
            return 0
        self._refused.pop(label, None)
        self._loaded[label] = (served.digest, seen)
        if self.on_loaded is not None:
            self.on_loaded(served)
        return 1

    def start(self) -> None:
        """Poll every ``poll_seconds`` on a thread of its own."""
        self._thread.start()

    def _run(self) -> None:
        lower_thread_priority(self.nice)  # loading a version must not take the CPU from the requests served
        while not self._stop.wait(self.poll_seconds):
            try:
                self.scan()
            except Exception:  # a poller that dies would freeze the versions served: log and go on
                log.exception("model folder %s: scan failed", self.folder)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10.0)
