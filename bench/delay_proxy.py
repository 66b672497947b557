"""A TCP forwarding proxy that adds a fixed one-way delay in each direction (user-space stand-in for netem).

    python bench/delay_proxy.py --listen 127.0.0.1:50052 --target 10.231.20.1:50051 --delay-ms 20

``tc netem`` is not available on the benchmark machine, so added round-trip time comes from this proxy: every
chunk read from one side is stamped with its arrival time and written to the other side ``delay`` later, so a
request/reply round trip gains ``2 x delay`` while throughput is not reduced (reads never wait for the delay,
only for buffer space). Bytes are forwarded exactly and in order (one FIFO per direction), so HTTP/2 (gRPC)
works through it. Not emulated: the TCP handshake itself is not delayed (the proxy accepts at once and connects
to the target at once; the first bytes each way are), and there is no loss or jitter.

Optionally (``rate_bit_s``, ``--rate-bit-s``) it also serialises each direction at a link rate, one clock per
direction shared by all connections, as ``netem rate`` would: ``tc tbf`` alone lets any message that fits its
token bucket (4 KB in bench/netns.py) through at line rate, so at 0.25 Mbit/s a 1.3 KB upload would gain nothing
instead of the 41 ms a real link takes to send it.

Limits, so that nothing waits or grows without bound: at most ``max_buffer_bytes`` waiting per direction of a
connection (reads pause beyond it: TCP back-pressure to the sender), at most ``max_connections`` at once, a
deadline on the connect to the target, on every drain of a write and on idle reads, and on ``stop()``.

Run from the command line it prints ``LISTENING host:port`` on stdout once ready (``--listen HOST:0`` picks a
free port) and runs until SIGTERM or SIGINT (or the end of stdin, with ``--control``). With ``--control`` a
line ``RATE <bit/s>`` (or ``RATE none``) on stdin changes the rate, answered by ``RATE <bit/s> OK`` on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import signal
import socket
import sys
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

log = logging.getLogger("delay_proxy")

CHUNK_BYTES = 64 * 1024  # one read; the delay is applied per chunk read


@dataclass
class ProxyStats:
    """Counters of one proxy (updated on its event-loop thread; plain ints, safe to read from others)."""

    connections: int = 0  # accepted since start
    refused: int = 0  # closed at once: target unreachable or too many connections
    bytes_up: int = 0  # client -> target, bytes
    bytes_down: int = 0  # target -> client, bytes


@dataclass
class _Link:
    """One direction of the emulated link, shared by every connection: a serialisation clock, so that a message
    of ``n`` bytes takes ``8 n / rate`` seconds even when it is small (a token bucket such as ``tc tbf`` lets a
    message within its burst through at once), and messages queue behind each other as on a real link."""

    rate_bit_s: Optional[float] = None  # None: no serialisation delay
    free_at: float = 0.0  # event-loop time (s) when everything stamped so far has been sent

    def departure(self, now: float, size: int) -> float:
        """When the last byte of ``size`` bytes that arrived at ``now`` (s, loop time) has been sent."""
        rate = self.rate_bit_s
        if not rate:
            return now
        self.free_at = max(now, self.free_at) + size * 8 / rate
        return self.free_at


@dataclass
class _Pipe:
    """One direction of one connection: chunks read from ``reader`` wait in a FIFO until ``delay_s`` after
    their departure from ``link`` (their arrival, without a rate), then go to ``writer``. ``None`` as data marks
    the reader's end of stream.

    Both pumps run on one event loop, so the queue needs no lock: nothing else runs between two awaits."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    delay_s: float
    max_buffer_bytes: int
    idle_timeout_s: float
    write_timeout_s: float
    count: Callable[[int], None]  # called with the bytes of each write done
    link: _Link = field(default_factory=_Link)
    queue: collections.deque = field(default_factory=collections.deque)
    buffered: int = 0  # bytes in ``queue``
    has_data: asyncio.Event = field(default_factory=asyncio.Event)
    has_space: asyncio.Event = field(default_factory=asyncio.Event)
    closed: bool = False

    def close(self) -> None:
        """Make both pumps return at their next step. Needed besides ``Task.cancel``: on Python 3.11
        ``asyncio.wait_for`` can swallow a cancel that arrives as its inner wait completes."""
        self.closed = True
        self.has_data.set()
        self.has_space.set()

    async def pump_in(self) -> None:
        """Read chunks and stamp them until end of stream; pauses while ``max_buffer_bytes`` are waiting."""
        loop = asyncio.get_running_loop()
        while not self.closed:
            while self.buffered >= self.max_buffer_bytes and not self.closed:
                # bounded by the writer's own deadlines: it drains the queue, or fails and the connection ends
                self.has_space.clear()
                await self.has_space.wait()
            data = await asyncio.wait_for(self.reader.read(CHUNK_BYTES), self.idle_timeout_s)
            self.queue.append((self.link.departure(loop.time(), len(data)) + self.delay_s, data or None))
            self.buffered += len(data)
            self.has_data.set()
            if not data:
                return

    async def pump_out(self) -> None:
        """Write every chunk at its due time (all chunks already due in one write), half-close at the end."""
        loop = asyncio.get_running_loop()
        while not self.closed:
            if not self.queue:
                # no deadline of its own: bounded by pump_in's idle deadline (it fails or queues data or EOF)
                self.has_data.clear()
                await self.has_data.wait()
                if self.closed:
                    return
            await asyncio.sleep(max(0.0, self.queue[0][0] - loop.time()))
            now, parts, end = loop.time(), [], False
            while self.queue and self.queue[0][0] <= now and not end:
                data = self.queue.popleft()[1]
                end = data is None
                if data:
                    parts.append(data)
            self.buffered -= sum(map(len, parts))
            if self.buffered < self.max_buffer_bytes:
                self.has_space.set()
            if parts:
                payload = b"".join(parts)
                self.writer.write(payload)
                await asyncio.wait_for(self.writer.drain(), self.write_timeout_s)
                self.count(len(payload))
            if end:
                if self.writer.can_write_eof():
                    self.writer.write_eof()
                return


def _nodelay(writer: asyncio.StreamWriter) -> None:
    """Small gRPC frames must not wait for Nagle's algorithm: that would add latency the proxy did not mean."""
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _abort(*writers: asyncio.StreamWriter) -> None:
    for writer in writers:
        writer.transport.abort()


class DelayProxy:
    """Forward ``listen_host:listen_port`` to ``target_host:target_port`` with ``one_way_delay_ms`` added each way.

    Runs an asyncio event loop on a background thread from ``start()`` (or ``with``) to ``stop()``.
    ``rate_bit_s`` (None: unlimited) also serialises each direction at that rate, shared by all connections
    (like ``netem rate``); ``set_rate`` changes it for the bytes read from then on.
    ``listen_port`` 0 picks a free port; ``address`` gives the one bound. Times are milliseconds or seconds
    as named; ``max_buffer_bytes`` is per direction of one connection.
    """

    STOP_TASKS_S = 1.0  # how long a closing connection waits for its four pump tasks, seconds

    def __init__(self, listen_host: str, listen_port: int, target_host: str, target_port: int,
                 one_way_delay_ms: float, *, rate_bit_s: Optional[float] = None,
                 max_buffer_bytes: int = 4 * 1024 * 1024, max_connections: int = 256, connect_timeout_s: float = 5.0,
                 idle_timeout_s: float = 600.0, write_timeout_s: float = 60.0) -> None:
        if one_way_delay_ms < 0:
            raise ValueError(f"one_way_delay_ms must be >= 0, got {one_way_delay_ms}")
        if max_buffer_bytes < CHUNK_BYTES:
            raise ValueError(f"max_buffer_bytes must be >= {CHUNK_BYTES}, got {max_buffer_bytes}")
        self.listen_host, self.listen_port = listen_host, listen_port
        self.target_host, self.target_port = target_host, target_port
        self.delay_s = one_way_delay_ms / 1000.0
        self.max_buffer_bytes, self.max_connections = max_buffer_bytes, max_connections
        self.connect_timeout_s, self.idle_timeout_s = connect_timeout_s, idle_timeout_s
        self.write_timeout_s = write_timeout_s
        self.stats = ProxyStats()
        self._links = (_Link(), _Link())  # client -> target, target -> client
        self.set_rate(rate_bit_s)
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._server: Optional[asyncio.AbstractServer] = None
        self._handlers: set[asyncio.Task] = set()
        self._ready = threading.Event()
        self._error: Optional[BaseException] = None
        self._closing = False  # stop() has begun: a connection that completes its connect now ends at once

    def set_rate(self, rate_bit_s: Optional[float]) -> None:
        """Serialise each direction at ``rate_bit_s`` bit/s from the next chunk read on (None: unlimited). Safe
        from any thread: one attribute store per direction."""
        if rate_bit_s is not None and not rate_bit_s > 0:
            raise ValueError(f"rate_bit_s must be > 0 or None, got {rate_bit_s}")
        for link in self._links:
            link.rate_bit_s = rate_bit_s

    @property
    def rate_bit_s(self) -> Optional[float]:
        return self._links[0].rate_bit_s

    @property
    def address(self) -> str:
        """``host:port`` the proxy listens on (the bound port when started with port 0)."""
        return f"{self.listen_host}:{self.listen_port}"

    def start(self, timeout_s: float = 5.0) -> "DelayProxy":
        """Bind and start forwarding; raises OSError (e.g. port in use) or TimeoutError within ``timeout_s``."""
        self._thread = threading.Thread(target=self._run, name="delay-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError(f"delay proxy did not start within {timeout_s} s")
        if self._error is not None:
            self._thread.join(timeout_s)
            raise self._error
        log.info("delay proxy %s -> %s:%d, %.1f ms each way", self.address, self.target_host, self.target_port,
                 self.delay_s * 1000)
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._server = loop.run_until_complete(
                asyncio.start_server(self._handle, self.listen_host, self.listen_port, reuse_address=True))
            self.listen_port = self._server.sockets[0].getsockname()[1]
        except BaseException as err:  # reported to start()'s caller
            self._error = err
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._handlers.add(task)
        self.stats.connections += 1
        try:
            if len(self._handlers) > self.max_connections:
                log.warning("delay proxy: more than %d connections, closing a new one", self.max_connections)
                self.stats.refused += 1
                return  # the finally below closes the client's connection
            try:
                target_reader, target_writer = await asyncio.wait_for(
                    asyncio.open_connection(self.target_host, self.target_port), self.connect_timeout_s)
            except (OSError, asyncio.TimeoutError) as err:
                # the client sees its connection closed, as it would see a refused connect
                log.info("delay proxy: target %s:%d unreachable (%s)", self.target_host, self.target_port, err)
                self.stats.refused += 1
                return  # the finally below closes the client's connection
            if self._closing:  # a cancel lost in the wait_for above (Python 3.11): end here
                target_writer.transport.abort()
                return
            await self._forward(client_reader, client_writer, target_reader, target_writer)
        except asyncio.CancelledError:
            # stop(): end quietly (asyncio's stream server logs a handler task that ends cancelled as an error)
            pass
        finally:
            self._handlers.discard(task)
            _abort(client_writer)  # idempotent; also covers a cancel (stop) during the connect

    async def _forward(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter,
                       target_reader: asyncio.StreamReader, target_writer: asyncio.StreamWriter) -> None:
        """Both directions until both ended; any error (reset, deadline) aborts both sides at once."""
        _nodelay(client_writer)
        _nodelay(target_writer)

        def up(n: int) -> None:
            self.stats.bytes_up += n

        def down(n: int) -> None:
            self.stats.bytes_down += n

        limits = (self.delay_s, self.max_buffer_bytes, self.idle_timeout_s, self.write_timeout_s)
        pipes = [_Pipe(client_reader, target_writer, *limits, up, self._links[0]),
                 _Pipe(target_reader, client_writer, *limits, down, self._links[1])]
        tasks = [asyncio.create_task(coro) for p in pipes for coro in (p.pump_in(), p.pump_out())]
        try:
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            failed = [t for t in done if not t.cancelled() and t.exception() is not None]
            if failed:
                log.debug("delay proxy: connection aborted: %r", failed[0].exception())
        finally:
            # aborting first ends pending reads (EOF) and drains (error) even where a cancel below is lost
            _abort(client_writer, target_writer)
            for p in pipes:
                p.close()
            for t in tasks:
                t.cancel()
            await asyncio.wait(tasks, timeout=self.STOP_TASKS_S)

    def stop(self, timeout_s: float = 2.0) -> bool:
        """Close the listener and every connection; returns within about ``timeout_s`` seconds, True when the
        loop thread has ended (False: it is left behind as a daemon thread, logged)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return True
        try:
            future = asyncio.run_coroutine_threadsafe(self._shutdown(timeout_s / 2), loop)
            future.result(timeout_s / 2 + 0.1)
        except Exception as err:  # a deadline or a closed loop: stop the loop anyway
            log.warning("delay proxy: shutdown did not finish cleanly: %r", err)
        try:
            loop.call_soon_threadsafe(loop.stop)
        except RuntimeError:  # the loop is already closed
            pass
        thread.join(timeout_s / 2)
        if thread.is_alive():
            log.warning("delay proxy: event loop thread still running after %.1f s", timeout_s)
            return False
        return True

    async def _shutdown(self, timeout_s: float) -> None:
        """Stop accepting, then cancel every connection (again, while any is left, until ``timeout_s``)."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self._handlers and asyncio.get_running_loop().time() < deadline:
            handlers = list(self._handlers)
            for task in handlers:
                task.cancel()
            await asyncio.wait(handlers, timeout=0.1)
        await asyncio.sleep(0)  # let the aborted transports run their connection_lost callbacks

    def __enter__(self) -> "DelayProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def host_port(text: str) -> tuple[str, int]:
    """``"host:port"`` -> ``(host, port)``; raises argparse.ArgumentTypeError."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not host:port")
    return host.strip("[]"), int(port)


def control(proxy: DelayProxy, stop: threading.Event) -> None:
    """``--control``: apply ``RATE <bit/s>|none`` lines from stdin until its end (then stop)."""
    for line in sys.stdin:
        words = line.split()
        if len(words) != 2 or words[0] != "RATE":
            print(f"ERROR expected 'RATE <bit/s>|none', got {line.strip()!r}", flush=True)
            continue
        try:
            proxy.set_rate(None if words[1] == "none" else float(words[1]))
        except ValueError as err:
            print(f"ERROR {err}", flush=True)
            continue
        print(f"RATE {words[1]} OK", flush=True)
    stop.set()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", type=host_port, required=True, help="host:port to listen on (port 0: any)")
    parser.add_argument("--target", type=host_port, required=True, help="host:port to forward to")
    parser.add_argument("--delay-ms", type=float, required=True, help="added one-way delay, ms (each direction)")
    parser.add_argument("--rate-bit-s", type=float, default=None, help="serialise each direction at this rate")
    parser.add_argument("--control", action="store_true", help="read RATE lines from stdin")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    proxy = DelayProxy(*args.listen, *args.target, args.delay_ms, rate_bit_s=args.rate_bit_s).start()
    print(f"LISTENING {proxy.address}", flush=True)  # the machine-readable ready line a parent waits for
    if args.control:
        threading.Thread(target=control, args=(proxy, stop), daemon=True).start()
    while not stop.wait(1.0):
        pass
    s = proxy.stats
    log.info("stopping: %d connections (%d refused), %d B up, %d B down", s.connections, s.refused, s.bytes_up,
             s.bytes_down)
    return 0 if proxy.stop() else 1


if __name__ == "__main__":
    sys.exit(main())
