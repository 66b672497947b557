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


class FolderWatcher:
    """Polls ``folder`` every ``interval_s``; each image file is answered once, as one JSON object per line in
    ``results`` (the ``classify --json`` fields, or ``image`` + ``error`` for a file that is not an image).

    Files already named in ``results`` are skipped, so a restarted daemon does not answer them twice.
    """

    def __init__(self, runtime: DeviceRuntime, folder: Path, results: Path, interval_s: float) -> None:
        self.runtime = runtime
        self.folder = folder
        self.results = results
        self.interval_s = interval_s
        self.done: set[str] = set()
        if results.exists():
            for line in results.read_text().splitlines():
                try:
                    self.done.add(json.loads(line)["image"])
                except (ValueError, KeyError, TypeError):
                    continue  # a torn last line from a crash: that image is simply answered again
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def scan_once(self) -> int:
        """Answer the images not yet answered; returns how many it answered."""
        count = 0
        for path in sorted(self.folder.iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file() or path.name in self.done:
                continue
            try:
                record = self.runtime.classify_bytes(path.read_bytes()).to_json(image=path.name)
            except NoModelError as err:  # streaming, nothing received yet: answer it on a later scan
                log.info("%s waits: %s", path.name, err)
                return count
            except (ImageError, OSError) as err:
                record = {"image": path.name, "error": str(err)}
            with self.results.open("a") as out:
                out.write(json.dumps(record) + "\n")
            self.done.add(path.name)
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
