"""TCP relays of the fake marketplace: the ``ssh_host:ssh_port`` a client dials.

A relay sits between the client and an instance's sshd so tests can do to a connection what the
real Vast.ai proxy and flaky hosts do to it: count its traffic, slow it down, or drop it.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import dataclass, field

_CHUNK = 64 * 1024
_CONNECT_TIMEOUT = 5.0
# Paced transfers send small slices so that a rate change takes effect quickly.
_PACED_SLICES_PER_SECOND = 20


@dataclass
class TrafficCounter:
    """Thread-safe byte totals shared by all relays of one marketplace."""

    up: int = 0
    down: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, up: int = 0, down: int = 0) -> None:
        with self._lock:
            self.up += up
            self.down += down

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {"up": self.up, "down": self.down}


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


class _Connection:
    """One relayed client connection: two pump threads, closed once both have finished."""

    def __init__(self, relay: Relay, client: socket.socket, upstream: socket.socket) -> None:
        self._relay = relay
        self._client = client
        self._upstream = upstream
        self._lock = threading.Lock()
        self._pumps_left = 2

    def start(self) -> None:
        for source, sink, direction in (
            (self._client, self._upstream, "up"),
            (self._upstream, self._client, "down"),
        ):
            threading.Thread(target=self._pump, args=(source, sink, direction), daemon=True).start()

    def cut(self) -> None:
        """Shut both sockets down; this also wakes the pumps blocked in recv()."""
        for sock in (self._client, self._upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _pump(self, source: socket.socket, sink: socket.socket, direction: str) -> None:
        pacer = _Pacer(self._relay)
        try:
            while data := source.recv(pacer.chunk_size()):
                sink.sendall(data)
                self._relay.counter.add(**{direction: len(data)})
                pacer.account(len(data))
            # Orderly EOF: pass the half-close on so the peer sees it too.
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            self.cut()
        finally:
            self._finish()

    def _finish(self) -> None:
        with self._lock:
            self._pumps_left -= 1
            if self._pumps_left:
                return
        self._relay._forget(self)
        self._client.close()
        self._upstream.close()


class Relay:
    """Listens on 127.0.0.1:<free port>, forwards every connection to `target` (host, port)."""

    def __init__(self, target: tuple[str, int], counter: TrafficCounter) -> None:
        self.target = target
        self.counter = counter
        self.bandwidth: float | None = None
        self._connections: set[_Connection] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._acceptor.start()

    def set_bandwidth(self, bytes_per_second: float | None) -> None:
        """Cap each direction of each connection, live ones included; None lifts the cap."""
        if bytes_per_second is not None and bytes_per_second <= 0:
            raise ValueError(f"bandwidth must be positive, got {bytes_per_second}")
        self.bandwidth = bytes_per_second

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
            threading.Thread(target=self._open, args=(client,), daemon=True).start()

    def _open(self, client: socket.socket) -> None:
        """Connect upstream; if the instance is unreachable, hang up on the client."""
        try:
            upstream = socket.create_connection(self.target, timeout=_CONNECT_TIMEOUT)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        with self._lock:
            if self._closed:
                client.close()
                upstream.close()
                return
            connection = _Connection(self, client, upstream)
            self._connections.add(connection)
        connection.start()

    def _forget(self, connection: _Connection) -> None:
        with self._lock:
            self._connections.discard(connection)
