"""TCP relays of the fake marketplace: the ``ssh_host:ssh_port`` a client dials.

A relay sits between the client and an instance's sshd so tests can do to a connection what the
real Vast.ai proxy, the Internet and flaky hosts do to it: count its traffic and its round trips,
slow it down, delay it (a simulated round-trip time), or drop it.

Each direction of a connection is a receiver thread and a sender thread joined by a delay line:
the receiver reads (paced to the bandwidth cap), timestamps and queues; the sender delivers each
chunk once it is due. Many chunks are in flight at once, so a delay costs latency, not
throughput, as on a real long link.
"""

from __future__ import annotations

import contextlib
import math
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

_CHUNK = 64 * 1024
_CONNECT_TIMEOUT = 5.0
# Paced transfers send small slices so that a rate change takes effect quickly.
_PACED_SLICES_PER_SECOND = 20
# Bytes one direction may hold in flight before its receiver stops reading, so that a slow
# reader still pushes back on the writer as TCP would (caps throughput at this much per delay).
_MAX_IN_FLIGHT = 4 * 1024 * 1024
_EOF = b""  # queued after the last chunk: the sender then passes the half-close on


@dataclass
class TrafficCounter:
    """Thread-safe byte totals ("up": client to instance, "down": back). An instance's relays
    share one, which also adds into its marketplace's (`parent`): the bill is per instance,
    the totals are per marketplace."""

    up: int = 0
    down: int = 0
    parent: TrafficCounter | None = field(default=None, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, up: int = 0, down: int = 0) -> None:
        with self._lock:
            self.up += up
            self.down += down
        if self.parent is not None:
            self.parent.add(up, down)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {"up": self.up, "down": self.down}


class RoundTrips:
    """Thread-safe log of the request/response turns of all relays of one marketplace.

    Keeps the wall-clock time of each, so that a benchmark can attribute them to jobs by time
    window; the count is the length of the log."""

    def __init__(self) -> None:
        self._times: list[float] = []
        self._lock = threading.Lock()

    def record(self) -> None:
        with self._lock:
            self._times.append(time.time())

    def snapshot(self) -> list[float]:
        with self._lock:
            return list(self._times)


class _Turns:
    """Spots one connection's round trips: data down after data up is one request answered."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._up_since_last = False

    def arrived(self, direction: str) -> bool:
        """Note data arriving at the relay; True if it completes a round trip."""
        with self._lock:
            if direction == "up":
                self._up_since_last = True
                return False
            completed, self._up_since_last = self._up_since_last, False
            return completed


class _Pacer:
    """Holds one direction of one connection to the relay's current rate (sleep pacing)."""

    def __init__(self, relay: Relay) -> None:
        self._relay = relay
        self._due = time.monotonic()

    def chunk_size(self) -> int:
        rate = self._relay.bandwidth
        if rate is None:
            return _CHUNK
        return max(1, min(_CHUNK, int(rate / _PACED_SLICES_PER_SECOND)))

    def account(self, sent: int) -> None:
        """Sleep until `sent` more bytes fit the rate; idle time is not saved up as credit."""
        rate = self._relay.bandwidth
        now = time.monotonic()
        if rate is None:
            self._due = now
            return
        self._due = max(self._due, now) + sent / rate
        time.sleep(max(0.0, self._due - now))


class _DelayLine:
    """One direction's bytes in flight, in order, each released at its due time.

    A bounded FIFO between a receiver and a sender thread; `cut` empties it and wakes both."""

    def __init__(self) -> None:
        self._items: deque[tuple[float, bytes]] = deque()
        self._queued = 0
        self._cut = False
        self._changed = threading.Condition()

    def put(self, data: bytes, due: float) -> bool:
        """Queue `data` (`_EOF` for the end) to leave at monotonic time `due`; waits while the
        line is full. False once the line is cut."""
        with self._changed:
            while self._queued >= _MAX_IN_FLIGHT and not self._cut:
                self._changed.wait()
            if self._cut:
                return False
            self._items.append((due, data))
            self._queued += len(data)
            self._changed.notify_all()
            return True

    def take(self) -> bytes | None:
        """The next chunk once it is due (`_EOF` at the end); None once the line is cut."""
        with self._changed:
            while not self._cut:
                if not self._items:
                    self._changed.wait()
                    continue
                due, data = self._items[0]
                wait = due - time.monotonic()
                if wait > 0:
                    self._changed.wait(wait)
                    continue
                self._items.popleft()
                self._queued -= len(data)
                self._changed.notify_all()
                return data
            return None

    def cut(self) -> None:
        with self._changed:
            self._cut = True
            self._items.clear()
            self._queued = 0
            self._changed.notify_all()


class _Connection:
    """One relayed client connection: per direction a receiver and a sender joined by a delay
    line; the sockets are closed once all four threads have finished."""

    def __init__(self, relay: Relay, client: socket.socket, upstream: socket.socket) -> None:
        self._relay = relay
        self._client = client
        self._upstream = upstream
        self._lines = (_DelayLine(), _DelayLine())
        self._turns = _Turns()
        self._lock = threading.Lock()
        self._threads_left = 4

    def start(self) -> None:
        up, down = self._lines
        self._spawn(self._receive, self._client, up, "up")
        self._spawn(self._send, up, self._upstream, "up")
        self._spawn(self._receive, self._upstream, down, "down")
        self._spawn(self._send, down, self._client, "down")

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        name = f"fakevast-relay-{self._relay.port}-{target.__name__.strip('_')}-{args[-1]}"
        threading.Thread(target=target, args=args, name=name, daemon=True).start()

    def cut(self) -> None:
        """Drop queued data and shut both sockets down; this wakes every thread of the
        connection (recv() returns, sendall() fails, the delay lines return at once)."""
        for line in self._lines:
            line.cut()
        for sock in (self._client, self._upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _receive(self, source: socket.socket, line: _DelayLine, direction: str) -> None:
        pacer = _Pacer(self._relay)
        try:
            while data := source.recv(pacer.chunk_size()):
                if self._turns.arrived(direction):
                    self._relay.round_trips.record()
                if not line.put(data, self._relay.due()):
                    return
                pacer.account(len(data))
            line.put(_EOF, self._relay.due())  # orderly EOF, delayed like the data before it
        except OSError:
            self.cut()
        finally:
            self._finish()

    def _send(self, line: _DelayLine, sink: socket.socket, direction: str) -> None:
        try:
            while (data := line.take()) is not None:
                if data == _EOF:
                    sink.shutdown(socket.SHUT_WR)  # pass the half-close on
                    return
                sink.sendall(data)
                self._relay.counter.add(**{direction: len(data)})
        except OSError:
            self.cut()
        finally:
            self._finish()

    def _finish(self) -> None:
        with self._lock:
            self._threads_left -= 1
            if self._threads_left:
                return
        self._relay._forget(self)
        self._client.close()
        self._upstream.close()


class Relay:
    """Listens on 127.0.0.1:<free port>, forwards every connection to `target` (host, port).

    `round_trips` is the marketplace's shared log; a relay on its own gets a private one."""

    def __init__(
        self,
        target: tuple[str, int],
        counter: TrafficCounter,
        round_trips: RoundTrips | None = None,
    ) -> None:
        self.target = target
        self.counter = counter
        self.round_trips = round_trips if round_trips is not None else RoundTrips()
        self.bandwidth: float | None = None
        self.rtt_ms: float = 0.0
        # A tunnel that is down: each new connection is accepted and closed at once.
        self.down = False
        self._connections: set[_Connection] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(
            target=self._accept_loop, name=f"fakevast-relay-{self.port}-accept", daemon=True
        )
        self._acceptor.start()

    def set_bandwidth(self, bytes_per_second: float | None) -> None:
        """Cap each direction of each connection, live ones included; None lifts the cap."""
        if bytes_per_second is not None and bytes_per_second <= 0:
            raise ValueError(f"bandwidth must be positive, got {bytes_per_second}")
        self.bandwidth = bytes_per_second

    def set_rtt(self, rtt_ms: float) -> None:
        """Delay each direction by half of `rtt_ms`, for data arriving from now on (live
        connections included); 0 forwards at once."""
        if not (math.isfinite(rtt_ms) and rtt_ms >= 0):
            raise ValueError(f"rtt_ms must be a finite number >= 0, got {rtt_ms}")
        self.rtt_ms = rtt_ms

    def due(self) -> float:
        """When data arriving now is to be delivered (monotonic clock)."""
        return time.monotonic() + self.rtt_ms / 2000

    def cut_connections(self) -> int:
        """Drop every live connection abruptly, as a host or proxy failure would."""
        with self._lock:
            live = list(self._connections)
        for connection in live:
            connection.cut()
        return len(live)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        # On Linux, shutdown() is what wakes a thread blocked in accept(); close() alone does not.
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._acceptor.join()
        self._listener.close()
        self.cut_connections()

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(
                target=self._open,
                args=(client,),
                name=f"fakevast-relay-{self.port}-open",
                daemon=True,
            ).start()

    def _open(self, client: socket.socket) -> None:
        """Connect upstream; if the relay is down or the instance unreachable, hang up on the
        client."""
        if self.down:
            client.close()
            return
        try:
            upstream = socket.create_connection(self.target, timeout=_CONNECT_TIMEOUT)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        with self._lock:
            if self._closed or self.down:  # went down while connecting: not cut, so hang up
                client.close()
                upstream.close()
                return
            connection = _Connection(self, client, upstream)
            self._connections.add(connection)
        connection.start()

    def _forget(self, connection: _Connection) -> None:
        with self._lock:
            self._connections.discard(connection)
