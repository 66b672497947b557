"""``python -m device serve|classify|fetch --config apps/device.yml [key=value ...]``: the device daemon and CLI."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from pathlib import Path

from tqdm import tqdm

from device.config import DeviceConfig
from device.plan import run_plan
from device.images import ImageError
from device.runtime import DeviceRuntime, NoModelError
from device.server import serve
from models.checkpoint import CheckpointError
from models.config import ConfigError, load_config

log = logging.getLogger("device")


def split_args(items: list[str]) -> tuple[list[str], list[str]]:
    """Separate ``key=value`` overrides from image paths (an existing file is always an image)."""
    overrides, images = [], []
    for item in items:
        (overrides if "=" in item and not Path(item).exists() else images).append(item)
    return overrides, images


def format_row(image: str, r: dict) -> str:
    return (f"{image[-32:]:<32} {r['label'][:20]:<20} {r['confidence']:>6.3f} {r['answered_by']:<14} "
            f"{('yes' if r['degraded'] else 'no'):<8} {r['bytes_sent']:>7} {r['latency_ms']:>9.1f}")


class StreamProgress:
    """A tqdm bar on stderr with the share of the weights received, while the device streams them."""

    def __init__(self, runtime: DeviceRuntime) -> None:
        self.runtime = runtime
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="spinn-progress", daemon=True)
        if runtime.streamed is not None:
            self._thread.start()

    def _run(self) -> None:
        with tqdm(total=100, unit="%", desc="weights", file=sys.stderr, leave=False,
                  bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}") as bar:
            while not self._stop.wait(0.2):
                m = self.runtime.measurements()
                if "weights_fraction" in m:
                    bar.n = round(100 * m["weights_fraction"], 1)
                    bar.set_postfix_str(f"v{m['model_version']} split {m['split_point']} head {m['head_bits']:.1f} "
                                        "bits")

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def classify(cfg: DeviceConfig, images: list[str], as_json: bool) -> int:
    """Classify each image once; prints a table or JSON lines. Returns 1 if any image could not be read."""
    runtime = DeviceRuntime.start(cfg)
    progress = StreamProgress(runtime)
    failed = False
    try:
        if not as_json:
            print(f"{'image':<32} {'label':<20} {'conf':>6} {'answered_by':<14} {'degraded':<8} {'bytes':>7} "
                  f"{'ms':>9}")
        for image in images:
            try:
                result = runtime.classify_bytes(Path(image).read_bytes()).to_json(image=image)
            except (ImageError, OSError, NoModelError) as err:
                failed = True
                if as_json:
                    print(json.dumps({"image": image, "error": str(err)}), flush=True)
                else:
                    print(f"{image[-32:]:<32} error: {err}", flush=True)
                continue
            print(json.dumps(result) if as_json else format_row(image, result), flush=True)
            if result["degraded"] and not as_json:
                print(f"    degraded: {result['reason']}")
    finally:
        progress.close()
        runtime.close()
    return 1 if failed else 0


def fetch(cfg: DeviceConfig, timeout_s: float) -> int:
    """Stream the whole model into ``weights_cache`` (progress bar on stderr); 0 once every chunk is verified,
    1 when ``timeout_s`` passes first."""
    if cfg.checkpoint != "stream":
        raise ConfigError("config key 'checkpoint': fetch needs checkpoint=stream")
    runtime = DeviceRuntime.start(cfg)
    progress = StreamProgress(runtime)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            active = runtime.active
            if active is not None and active.complete:
                log.info("model %s version %s complete in %s", active.ref.model_id, active.ref.model_version,
                         cfg.weights_cache)
                return 0
            time.sleep(0.1)
        log.error("the model was not complete after %.0f s", timeout_s)
        return 1
    finally:
        progress.close()
        runtime.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m device", description="SPINN device daemon and CLI")
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="run the daemon (local Classify API, optional folder watch)")
    p_serve.add_argument("--config", default=None, help="YAML config (apps/device.yml)")
    p_serve.add_argument("overrides", nargs="*", help="key=value overrides")
    p_classify = sub.add_parser("classify", help="classify images once and print the answers")
    p_classify.add_argument("--config", default=None, help="YAML config (apps/device.yml)")
    p_classify.add_argument("--json", action="store_true", help="one JSON object per image")
    p_classify.add_argument("items", nargs="+", help="image files, and key=value overrides")
    p_fetch = sub.add_parser("fetch", help="stream the whole model into weights_cache (checkpoint=stream)")
    p_fetch.add_argument("--config", default=None, help="YAML config (apps/device.yml)")
    p_fetch.add_argument("--timeout", type=float, default=3600.0, help="give up after this many seconds")
    p_fetch.add_argument("overrides", nargs="*", help="key=value overrides")
    p_plan = sub.add_parser("plan", help="the scheduler's choice and predicted table for a given link")
    p_plan.add_argument("--config", default=None, help="YAML config (apps/device.yml; needs profile=PATH)")
    p_plan.add_argument("--bandwidth", required=True, help="upload rate, e.g. 2mbit, 500kbit")
    p_plan.add_argument("--rtt", required=True, help="round trip, e.g. 40ms")
    p_plan.add_argument("--device-slowdown", type=float, default=1.0,
                        help="this device's compute time over the profiling machine's (default 1)")
    p_plan.add_argument("--json", action="store_true", help="the decision and table as JSON")
    p_plan.add_argument("overrides", nargs="*", help="key=value overrides")
    # Overrides, images and flags may come in any order ("cloud=H:P --json a.jpg"): argparse stops filling a
    # positional list at the first flag, so what it leaves over is appended to that list.
    args, rest = parser.parse_known_args(argv)
    flags = [r for r in rest if r.startswith("-")]
    if flags:
        parser.error(f"unrecognized arguments: {' '.join(flags)}")
    getattr(args, "items" if args.command == "classify" else "overrides").extend(rest)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    try:
        if args.command in ("serve", "fetch"):
            cfg = load_config(DeviceConfig, args.config, args.overrides)
            logging.getLogger().setLevel(cfg.log_level.upper())
            return serve(cfg) if args.command == "serve" else fetch(cfg, args.timeout)
        if args.command == "plan":
            cfg = load_config(DeviceConfig, args.config, args.overrides)
            return run_plan(cfg, args.bandwidth, args.rtt, args.device_slowdown, args.json)
        overrides, images = split_args(args.items)
        if not images:
            parser.error("classify needs at least one image file")
        cfg = load_config(DeviceConfig, args.config, overrides)
        logging.getLogger().setLevel(cfg.log_level.upper())
        return classify(cfg, images, args.json)
    except (ConfigError, CheckpointError) as err:
        log.error("%s", err)
        return 2


if __name__ == "__main__":
    sys.exit(main())
