"""Folder watch: classify every new image dropped into a folder and append the answers as JSON lines."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

from device.images import ImageError
from device.runtime import NoModelError
from device.runtime import DeviceRuntime

log = logging.getLogger("device.watch")

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"})


Version = tuple[int, int]  # (size in bytes, mtime in ns): what tells one content of a file from the next


def file_version(path: Path) -> Version | None:
    """``(size, mtime_ns)`` of a regular file, None when it is gone or not a file."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns) if path.is_file() else None


class FolderWatcher:
    """Polls ``folder`` every ``interval_s``; each version of an image file is answered once, as one JSON object
    per line in ``results`` (the ``classify --json`` fields, or ``image`` + ``error`` for a file that is not an
    image, plus ``size`` and ``mtime_ns``).

    - A file is read only once its size and mtime have not changed for one interval, and answered only if they
      did not change while it was read: a file still being copied is waited for, not recorded as truncated.
    - A file replaced by another of the same name (new size or mtime) is answered again.
    - Versions already in ``results`` are skipped, so a restarted daemon answers nothing twice.
    """

    def __init__(self, runtime: DeviceRuntime, folder: Path, results: Path, interval_s: float) -> None:
        self.runtime = runtime
        self.folder = folder
        self.results = results
        self.interval_s = interval_s
        self.done: set[tuple[str, Version | None]] = set()  # version None: recorded before versions were
        self._last_seen: dict[str, Version] = {}
        if results.exists():
            for line in results.read_text().splitlines():
                try:
                    record = json.loads(line)
                    version = (int(record["size"]), int(record["mtime_ns"])) if "size" in record else None
                    self.done.add((str(record["image"]), version))
                except (ValueError, KeyError, TypeError):
                    continue  # a torn last line from a crash: that image is simply answered again
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _settled(self, path: Path) -> Version | None:
        """The file's version when it is an image not yet answered that has not changed since the last scan."""
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            return None
        version = file_version(path)
        if version is None or (path.name, version) in self.done or (path.name, None) in self.done:
            return None
        previous, self._last_seen[path.name] = self._last_seen.get(path.name), version
        return version if previous == version else None

    def scan_once(self) -> int:
        """Answer the settled images not yet answered; returns how many it answered."""
        count = 0
        for path in sorted(self.folder.iterdir()):
            version = self._settled(path)
            if version is None:
                continue
            try:
                data = path.read_bytes()
                if file_version(path) != version:  # written to while read: try again once it settles
                    continue
                record = self.runtime.classify_bytes(data).to_json(image=path.name)
            except NoModelError as err:  # streaming, nothing received yet: answer it on a later scan
                log.info("%s waits: %s", path.name, err)
                return count
            except (ImageError, OSError) as err:
                record = {"image": path.name, "error": str(err)}
            record.update(size=version[0], mtime_ns=version[1])
            with self.results.open("a") as out:
                out.write(json.dumps(record) + "\n")
            self.done.add((path.name, version))
            count += 1
        return count

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="spinn-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.scan_once()
            except Exception:  # a vanished folder or a full disk must not kill the daemon; retry next period
                log.exception("scanning %s failed", self.folder)
            self._stop.wait(self.interval_s)
