"""bench/delay_proxy.py (added RTT on real loopback sockets) and bench/slow_device.py (CFS-quota CPU limit)."""

import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from bench import slow_device
from bench.delay_proxy import DelayProxy
from tests.conftest import ROOT


class Server:
    """A loopback TCP server on a free port; ``handle(conn)`` runs on a thread per connection."""

    def __init__(self, handle) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.handle, self.stopped, self.threads = handle, threading.Event(), []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            conn.settimeout(10)
            t = threading.Thread(target=self.handle, args=(conn,), daemon=True)
            t.start()
            self.threads.append(t)

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(2)
        self.sock.close()


def recv_exactly(conn: socket.socket, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        part = conn.recv(min(1 << 20, n - got))
        if not part:
            raise ConnectionError(f"closed after {got} of {n} bytes")
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def connect(proxy: DelayProxy) -> socket.socket:
    host, port = proxy.address.rsplit(":", 1)
    conn = socket.create_connection((host, int(port)), timeout=10)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def test_bytes_forwarded_exactly_both_ways():
    up, down = os.urandom(6 * 1024 * 1024 + 123), os.urandom(5 * 1024 * 1024 + 7)
    received = {}

    def handle(conn: socket.socket) -> None:  # reads all of ``up`` while sending ``down`` at the same time
        sender = threading.Thread(target=conn.sendall, args=(down,))
        sender.start()
        received["up"] = recv_exactly(conn, len(up))
        sender.join()
        conn.close()

    server = Server(handle)
    # a small buffer cap: the payloads are many times larger, so the back-pressure path is exercised too
    with DelayProxy("127.0.0.1", 0, "127.0.0.1", server.port, 5.0, max_buffer_bytes=256 * 1024) as proxy:
        conn = connect(proxy)
        sender = threading.Thread(target=conn.sendall, args=(up,))
        sender.start()
        got_down = recv_exactly(conn, len(down))
        sender.join()
        assert conn.recv(1) == b""  # the server's close is forwarded as end of stream
        conn.close()
    server.close()
    assert received["up"] == up and got_down == down
    assert proxy.stats.bytes_up == len(up) and proxy.stats.bytes_down == len(down)


def test_delay_does_not_cap_throughput():
    payload = os.urandom(8 * 1024 * 1024)

    def sink(conn: socket.socket) -> None:
        recv_exactly(conn, len(payload))
        conn.sendall(b"k")
        conn.close()

    def send_through(delay_ms: float) -> float:
        with DelayProxy("127.0.0.1", 0, "127.0.0.1", server.port, delay_ms) as proxy:
            conn = connect(proxy)
            t0 = time.perf_counter()
            conn.sendall(payload)
            recv_exactly(conn, 1)
            elapsed = time.perf_counter() - t0
            conn.close()
        return elapsed

    server = Server(sink)
    try:
        plain, delayed = send_through(0.0), send_through(50.0)
    finally:
        server.close()
    # the delay adds one round trip (0.1 s); waiting it per 64 KiB chunk would add 128 x 50 ms = 6.4 s
    assert delayed - plain < 3.0, (plain, delayed)


def median_rtt_ms(delay_ms: float, server: Server, rounds: int = 8) -> float:
    with DelayProxy("127.0.0.1", 0, "127.0.0.1", server.port, delay_ms) as proxy:
        conn = connect(proxy)
        conn.sendall(b"x")  # the first round trip sets up the proxy's connection to the target: not timed
        recv_exactly(conn, 1)
        rtts = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            conn.sendall(b"p")
            recv_exactly(conn, 1)
            rtts.append((time.perf_counter() - t0) * 1000)
        conn.close()
    return statistics.median(rtts)


def echo(conn: socket.socket) -> None:
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)


def test_ping_pong_rtt_grows_by_twice_the_delay():
    server = Server(echo)
    try:
        base, delayed = median_rtt_ms(0.0, server), median_rtt_ms(30.0, server)
    finally:
        server.close()
    assert delayed - base >= 2 * 30.0 * 0.97, (base, delayed)
    assert delayed < 2 * 30.0 + 40.0, (base, delayed)  # and not much more than asked


def test_rate_serialises_even_small_messages():
    server = Server(echo)
    message = os.urandom(2500)  # within a tbf burst of 4 KB: a token bucket alone would add nothing
    with DelayProxy("127.0.0.1", 0, "127.0.0.1", server.port, 0.0, rate_bit_s=1e6) as proxy:
        conn = connect(proxy)
        rtts = []
        for rate in (1e6, None):
            proxy.set_rate(rate)
            t0 = time.perf_counter()
            conn.sendall(message)
            assert recv_exactly(conn, len(message)) == message
            rtts.append((time.perf_counter() - t0) * 1000)
        conn.close()
    server.close()
    serialise_ms = 2 * len(message) * 8 / 1e6 * 1000  # 20 ms each way at 1 Mbit/s
    assert serialise_ms * 0.97 <= rtts[0] < serialise_ms + 40, rtts
    assert rtts[1] < serialise_ms / 2, rtts  # set_rate(None): unlimited again


def test_command_line_proxy_takes_rate_lines_and_stops_on_sigterm():
    server = Server(echo)
    with subprocess.Popen([sys.executable, str(ROOT / "bench" / "delay_proxy.py"), "--listen", "127.0.0.1:0",
                           "--target", f"127.0.0.1:{server.port}", "--delay-ms", "5", "--control"],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as proc:
        try:
            host, port = proc.stdout.readline().split()[1].rsplit(":", 1)
            proc.stdin.write("RATE 2000000\n")
            proc.stdin.flush()
            assert proc.stdout.readline().strip() == "RATE 2000000 OK"
            with socket.create_connection((host, int(port)), timeout=5) as conn:
                conn.sendall(b"hello")
                assert recv_exactly(conn, 5) == b"hello"
            proc.terminate()
            assert proc.wait(timeout=5) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            server.close()


def test_grpc_health_check_through_the_proxy():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with DelayProxy("127.0.0.1", 0, "127.0.0.1", port, 10.0) as proxy:
            with grpc.insecure_channel(proxy.address) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                first = stub.Check(health_pb2.HealthCheckRequest(), timeout=5, wait_for_ready=True)
                t0 = time.perf_counter()
                second = stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
                elapsed_ms = (time.perf_counter() - t0) * 1000
    finally:
        server.stop(0)
    assert first.status == second.status == health_pb2.HealthCheckResponse.SERVING
    assert elapsed_ms >= 2 * 10.0  # one round trip through the proxy


def test_stop_returns_within_its_deadline_with_connections_open():
    server = Server(echo)
    proxy = DelayProxy("127.0.0.1", 0, "127.0.0.1", server.port, 1000.0).start()
    conns = [connect(proxy) for _ in range(5)]
    for conn in conns:
        conn.sendall(b"queued in the proxy for a second" * 100)
    time.sleep(0.1)
    assert proxy.stop(timeout_s=1.0)  # True: done within its deadline (a hang would time the test out)
    for conn in conns:  # every client connection is closed: end of stream or reset, not a hang
        assert_closed(conn, 2)
    server.close()


def assert_closed(conn: socket.socket, timeout_s: float) -> None:
    """The peer closed ``conn`` (end of stream or reset) within ``timeout_s``; closes it."""
    conn.settimeout(timeout_s)
    try:
        assert conn.recv(1) == b""
    except ConnectionResetError:
        pass
    conn.close()


def test_unreachable_target_closes_the_client_connection_at_once():
    probe = socket.create_server(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    with DelayProxy("127.0.0.1", 0, "127.0.0.1", port, 5.0) as proxy:
        assert_closed(connect(proxy), 3)
        assert proxy.stats.refused == 1


def test_period_and_quota():
    assert slow_device.period_quota(0.25) == (10_000, 2_500)
    assert slow_device.period_quota(2.0) == (10_000, 20_000)
    assert slow_device.period_quota(0.05) == (20_000, 1_000)  # quota kept at the kernel's 1 ms minimum
    with pytest.raises(ValueError):
        slow_device.period_quota(0.0)


SPIN = ("import time; t = time.perf_counter(); n = 0\n"
        "for i in range(2_000_000): n += i\n"
        "print(time.perf_counter() - t)")


def spin_seconds(prefix: list[str]) -> float:
    done = subprocess.run([*prefix, sys.executable, "-c", SPIN], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return float(done.stdout)


def test_quarter_core_group_is_clearly_slower():
    reason = slow_device.why_not()
    if reason:
        pytest.skip(reason)
    free = spin_seconds([])
    with slow_device.cpu_share(0.25, f"spinn-test-{os.getpid()}") as group:
        limited = spin_seconds(group.command_prefix())
        throttled = group.stats().get("nr_throttled", 0)
    assert not group.path.exists()
    assert limited / free > 2.0, (free, limited)
    assert throttled > 0


def test_calibration_steps_the_share_inversely_to_the_latency():
    """bench/device_speed.py on a device whose p50 is its work over its share (CPU-bound, as a throttled process
    is): from 0.5 of a core at 80 ms it reaches a 250 ms device in one step, and stops when within tolerance."""
    from bench import device_speed

    assert device_speed.next_share(0.5, 80.0, 250.0) == pytest.approx(0.16)
    assert device_speed.next_share(0.5, 1.0, 10_000.0) == device_speed.MIN_SHARE  # clamped
    with pytest.raises(ValueError):
        device_speed.next_share(0.5, 0.0, 250.0)
    shares = []
    result = device_speed.calibrate(0.5, 250.0, lambda: 40.0 / (shares or [0.5])[-1], shares.append)
    assert result.converged and result.share == pytest.approx(0.16) and len(result.rounds) == 2
    stuck = device_speed.calibrate(0.5, 250.0, lambda: 80.0, lambda share: None, max_rounds=3)
    assert not stuck.converged and len(stuck.rounds) == 3 and "NOT within" in stuck.summary()


def test_a_cpu_group_is_resized_in_place():
    """``slow_device.resize`` (what the calibration turns) rewrites the kernel's limit of a live group: the
    quota read back from the cgroup files is the new fraction's, and its process stays inside."""
    reason = slow_device.why_not()
    if reason:
        pytest.skip(reason)
    with slow_device.cpu_share(0.9, f"spinn-test-resize-{os.getpid()}") as group:
        sleeper = subprocess.Popen([*group.command_prefix(), "sleep", "30"])
        try:
            deadline = time.monotonic() + 10
            while sleeper.pid not in group.pids() and time.monotonic() < deadline:
                time.sleep(0.05)
            slow_device.resize(group, 0.3)
            if group.version == "v2":
                quota, period = (group.path / "cpu.max").read_text().split()
            else:
                quota = (group.path / "cpu.cfs_quota_us").read_text().strip()
                period = (group.path / "cpu.cfs_period_us").read_text().strip()
            assert (int(quota), int(period)) == (3_000, 10_000) == (group.quota_us, group.period_us)
            assert sleeper.pid in group.pids()
        finally:
            sleeper.kill()
            sleeper.wait(10)


def test_e2e_compares_the_scheduler_with_the_best_fixed_strategy_of_the_phase():
    """bench/e2e.py: the best fixed strategy is the fastest of those within 1 point of the most accurate (a
    faster but less accurate one does not count), and the scheduler passes within 1.1x of its p95 only."""
    from bench import e2e

    def cell(p95, accuracy):
        return {"p95_ms": p95, "accuracy": accuracy, "lost": 0}

    def phase(scheduler_p95):
        return {"label": "20 Mbit/s", "cloud_up": True, "rate_bit_s": 20_000_000, "strategies": {
            "device-only": cell(300, 0.60), "cloud-only": cell(80, 0.60), "static": cell(60, 0.58),
            "scheduler": {**cell(scheduler_p95, 0.60), "predicted_p50_ms": 70.0, "p50_ms": 70.0,
                          "prediction_error": 0.0}}}

    name, best = e2e.best_fixed(phase(85)["strategies"])
    assert (name, best["p95_ms"]) == ("cloud-only", 80)
    verdicts = {p95: {c["check"]: c["passed"] for c in e2e.checks([phase(p95)])} for p95 in (85, 95)}
    key = next(k for k in verdicts[85] if k.startswith("scheduler p95 <= 1.1 x"))
    assert verdicts[85][key] and not verdicts[95][key]


def test_e2e_learned_check_counts_what_the_scheduler_sent():
    """bench/e2e.py's learned-codec check reads the codec each upload was sent as, not the plan's intent."""
    from bench import e2e

    rows = [{"lost": False, "latency_ms": 100.0, "correct": True, "bytes_sent": 260, "answered_by": "cloud",
             "degraded": False, "split_point": 9, "codec": codec} for codec in ("learned+ans", "jpeg", "")]

    def summary(codecs):
        cell = e2e.summarize_cell([r for r in rows if r["codec"] in codecs], 1.0)
        return [{"label": "0.25 Mbit/s", "strategies": {"scheduler": cell}}]

    sent = e2e.learned_check(summary({"learned+ans", ""}))
    assert sent["passed"] and "1 of 2 sent as learned+ans" in sent["detail"]
    assert not e2e.learned_check(summary({"jpeg", ""}))["passed"]
    assert e2e.learned_check([{"label": "x", "strategies": {}}]) is None
