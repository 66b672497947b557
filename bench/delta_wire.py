"""A device that holds v1 upgrades to v2 over real gRPC: the delta the cloud offers against the full package a
device without v1 streams, side by side on one loopback cloud.

    python bench/delta_wire.py --v1 ../shared/models/cars_dev_joint20.pt \\
        --v2 runs/cars_dev_ft1_seed1/best_model.pt --split-point 9 --name cars_dev

The cloud serves v1; a streaming device (``checkpoint: stream``, an empty weights cache) completes it; then v2 is
added to the cloud. Reported: what the device asked and got (order, base), the delta's build time in the cloud (the
first GetManifest that names v1's weights), the bytes the device received until it switched to v2 (its head exact)
and until v2 was complete and verified, and the same for a second device with an empty cache streaming v2's full
package from that cloud. Loopback, unshaped: the times are the cloud's build and the device's decode, not a link's;
bytes are what a link would carry. Writes ``bench/results/delta_wire_<name>.{json,md}``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import write_results  # noqa: E402
from cloud.inference import ServedModel  # noqa: E402
from cloud.server import CloudConfig, CloudServer, build_server  # noqa: E402
from device.config import DeviceConfig  # noqa: E402
from device.runtime import DeviceRuntime  # noqa: E402
from models.config import from_dict  # noqa: E402
from models.progressive.delta import weights_digest  # noqa: E402

TIMEOUT_S = 900.0


def wait(predicate, what: str, timeout_s: float = TIMEOUT_S) -> float:
    """Seconds until ``predicate()`` holds; RuntimeError naming ``what`` past ``timeout_s``."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout_s:
            raise RuntimeError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(0.05)
    return time.monotonic() - started


def device(port: int, cache: Path, split_point: int) -> DeviceRuntime:
    return DeviceRuntime.start(from_dict(DeviceConfig, {
        "checkpoint": "stream", "cloud": f"127.0.0.1:{port}", "split_point": split_point,
        "weights_cache": str(cache), "stream_poll_seconds": 0.5, "log_level": "WARNING"}))


def upgrade(runtime: DeviceRuntime, digest: str) -> dict:
    """Follow ``runtime`` from now until it serves version ``digest`` complete: seconds and bytes received until
    it switched (its head usable) and until complete."""
    started = time.monotonic()
    switched = wait(lambda: runtime.streamed.current is not None and
                    runtime.streamed.current.manifest.model_digest == digest and
                    runtime.streamed.current.snapshot.progress.usable, "switch to v2")
    at_switch = runtime.streamed.current.snapshot.progress.bytes
    wait(lambda: runtime.streamed.current.outcome == "complete", "v2 complete")
    stream = runtime.streamed.current
    return {"order": stream.manifest.order, "base_sha256": stream.manifest.base_sha256,
            "switch_s": switched, "switch_bytes": at_switch, "complete_s": time.monotonic() - started,
            "complete_bytes": stream.manifest.total_bytes, "final_sha256": stream.digest()}


def run(v1_path: str, v2_path: str, split_point: int, work: Path) -> dict:
    cloud: CloudServer = build_server(
        CloudConfig(checkpoint=v1_path, address="127.0.0.1:0", model_version="v1", log_level="WARNING"),
        ServedModel.from_file(v1_path, "spinn", "v1"))
    try:
        holder = device(cloud.port, work / "holder", split_point)
        try:
            v1 = upgrade(holder, cloud.models.latest().digest)
            v2 = ServedModel.from_file(v2_path, "spinn", "v2")
            cloud.models.add(v2, (2,))
            delta = upgrade(holder, v2.digest)
        finally:
            holder.close()
        fresh = device(cloud.port, work / "fresh", split_point)
        try:
            full = upgrade(fresh, v2.digest)
        finally:
            fresh.close()
        target = cloud.packages.weights_digest(v2)
    finally:
        cloud.stop()
    return {"v1": v1, "delta": delta, "full": full, "v2_weights_sha256": target,
            "bit_exact": delta["final_sha256"] == full["final_sha256"] == target,
            "v1_weights_sha256": weights_digest(ServedModel.from_file(v1_path, "spinn", "v1").model.state_dict())}


def markdown(result: dict) -> str:
    d, f = result["delta"], result["full"]
    rows = [("order streamed", d["order"], f["order"]),
            ("bytes until switched to v2 (head exact / usable)", f"{d['switch_bytes']:,}", f"{f['switch_bytes']:,}"),
            ("bytes until v2 complete", f"{d['complete_bytes']:,}", f"{f['complete_bytes']:,}"),
            ("seconds until switched (loopback: build + decode)", f"{d['switch_s']:.1f}", f"{f['switch_s']:.1f}"),
            ("seconds until complete", f"{d['complete_s']:.1f}", f"{f['complete_s']:.1f}")]
    lines = [f"# Delta upgrade on the wire: {result['name']}", "", f"`{result['command']}`", "",
             f"Split point {result['split_point']}. The device holding v1 named its weights "
             f"({result['v1_weights_sha256'][:12]}) and got order `{d['order']}` from base "
             f"{d['base_sha256'][:12] or '-'}; a device with an empty cache got the full package.", "",
             "| | device holding v1 (delta) | device with nothing (full) |", "|---|---|---|"]
    lines += [f"| {name} | {a} | {b} |" for name, a, b in rows]
    lines += ["", f"Delta / full bytes until complete: {d['complete_bytes'] / f['complete_bytes']:.3f}; until "
              f"switched: {d['switch_bytes'] / max(1, f['switch_bytes']):.3f}. Both end on v2's package weights "
              f"bit-exact: {result['bit_exact']}. The delta's head is exact when the device switches; the full "
              "package's is at its usable planes. The holder's seconds include the cloud building v2's full package "
              "(to weigh the delta against) and the delta, one after the other; the device with nothing found v2's "
              "full package built.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--v1", required=True, help="the checkpoint the device holds first")
    parser.add_argument("--v2", required=True, help="the checkpoint the cloud serves next (same architecture)")
    parser.add_argument("--split-point", type=int, default=9)
    parser.add_argument("--name", default="cars_dev")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        result = run(args.v1, args.v2, args.split_point, Path(work))
    result.update(name=args.name, split_point=args.split_point,
                  command="python bench/delta_wire.py " + " ".join(sys.argv[1:] if argv is None else argv))
    write_results(f"delta_wire_{args.name}", result, markdown(result))
    return 0 if result["bit_exact"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
