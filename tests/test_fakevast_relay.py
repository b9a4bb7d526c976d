"""The relays' simulated round-trip time and round-trip counting, shown on real loopback sockets.

Wall-clock assertions are lower bounds only, except where an upper bound is the property under
test (a delay line must not throttle throughput to chunk/delay); those margins are wide.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import threading
import time
import urllib.error
from collections.abc import Callable, Iterator

import paramiko
import pytest

from tests.fakevast.clients import (
    public_key,
    rent,
    run,
    sdk,
    ssh_login,
    wait_for,
    wait_status,
)
from tests.fakevast.harness import FakeVast
from tests.fakevast.relay import Relay, TrafficCounter

_CHUNK = 64 * 1024  # the relay's read size: a naive "sleep, then forward" relay's unit


class Upstream:
    """A loopback server that runs `handler` on each accepted connection, in its own thread."""

    def __init__(self, handler: Callable[[socket.socket], None]) -> None:
        self._handler = handler
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address: tuple[str, int] = self._listener.getsockname()
        self._acceptor = threading.Thread(target=self._accept, name="test-upstream", daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            self._handler(conn)

    def close(self) -> None:
        self._listener.shutdown(socket.SHUT_RDWR)
        self._acceptor.join()
        self._listener.close()


def echo(conn: socket.socket) -> None:
    """Echo until EOF, then half-close back."""
    while data := conn.recv(_CHUNK):
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)


def digest_reply(conn: socket.socket) -> None:
    """Read everything (a one-way upload), then answer once with its SHA-256 and length."""
    digest, size = hashlib.sha256(), 0
    while data := conn.recv(_CHUNK):
        digest.update(data)
        size += len(data)
    conn.sendall(f"{digest.hexdigest()} {size}".encode())


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    parts, left = [], size
    while left:
        data = sock.recv(min(left, _CHUNK))
        assert data, f"EOF with {left} bytes still expected"
        parts.append(data)
        left -= len(data)
    return b"".join(parts)


def recv_all(sock: socket.socket) -> bytes:
    parts = []
    while data := sock.recv(_CHUNK):
        parts.append(data)
    return b"".join(parts)


@pytest.fixture
def relay_to() -> Iterator[Callable[..., Relay]]:
    """``relay_to(handler, rtt_ms=...)``: a relay in front of a fresh loopback server."""
    made: list[tuple[Upstream, Relay]] = []

    def make(handler: Callable[[socket.socket], None], rtt_ms: float = 0.0) -> Relay:
        upstream = Upstream(handler)
        relay = Relay(upstream.address, TrafficCounter())
        relay.set_rtt(rtt_ms)
        made.append((upstream, relay))
        return relay

    yield make
    for upstream, relay in made:
        relay.close()
        upstream.close()


def dial(relay: Relay) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", relay.port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


# -- the delay ----------------------------------------------------------------------------------


def test_an_echo_takes_one_round_trip_time(relay_to) -> None:
    relay = relay_to(echo, rtt_ms=100)
    with dial(relay) as sock:
        for _ in range(3):
            started = time.monotonic()
            sock.sendall(b"ping")
            assert recv_exactly(sock, 4) == b"ping"
            assert time.monotonic() - started >= 0.095  # 50 ms there, 50 ms back


def upload(relay, payload: bytes) -> tuple[str, float]:
    """Send payload, half-close, read the server's whole answer; with the seconds it took."""
    with dial(relay) as sock:
        started = time.monotonic()
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        reply = recv_all(sock).decode()
        return reply, time.monotonic() - started


def test_a_bulk_transfer_is_delayed_intact(relay_to) -> None:
    """16 MiB through a delay line arrive whole and in order. (That it is not throttled to a
    chunk per delay is a matter of speed, shown by the benchmarks, not asserted here.)"""
    relay = relay_to(digest_reply, rtt_ms=50)
    payload = bytes(range(256)) * (16 * 1024 * 1024 // 256)
    reply, elapsed = upload(relay, payload)
    assert reply == f"{hashlib.sha256(payload).hexdigest()} {len(payload)}"  # intact, in order
    assert elapsed >= 0.045  # the upload's end and the answer each waited 25 ms
    totals = {"up": len(payload), "down": len(reply)}  # counted as delivered
    assert wait_for(lambda: relay.counter.snapshot() == totals, timeout=10)


def test_the_delay_combines_with_the_bandwidth_cap(relay_to) -> None:
    relay = relay_to(digest_reply, rtt_ms=100)
    relay.set_bandwidth(200_000)
    payload = b"c" * 100_000
    reply, elapsed = upload(relay, payload)
    assert reply == f"{hashlib.sha256(payload).hexdigest()} {len(payload)}"
    assert elapsed >= 0.5 + 0.09  # 0.5 s of pacing on the way in, then 50 ms each way


def test_an_rtt_change_applies_to_a_live_connection(relay_to) -> None:
    relay = relay_to(echo)
    with dial(relay) as sock:
        sock.sendall(b"a")
        assert recv_exactly(sock, 1) == b"a"
        relay.set_rtt(200)
        started = time.monotonic()
        sock.sendall(b"b")
        assert recv_exactly(sock, 1) == b"b"
        assert time.monotonic() - started >= 0.19


def test_eof_half_close_is_delayed_and_passed_on(relay_to) -> None:
    seen_eof: list[float] = []

    def read_then_answer(conn: socket.socket) -> None:
        received = recv_all(conn)
        seen_eof.append(time.monotonic())
        conn.sendall(b"got " + received)  # the reverse direction still works after EOF
        conn.shutdown(socket.SHUT_WR)

    relay = relay_to(read_then_answer, rtt_ms=200)
    before = set(threading.enumerate())
    with dial(relay) as sock:
        sock.sendall(b"request")
        sock.shutdown(socket.SHUT_WR)
        shut_at = time.monotonic()
        assert recv_all(sock) == b"got request"  # ends in EOF: the server's half-close
        answered_at = time.monotonic()
    assert seen_eof[0] - shut_at >= 0.095  # the EOF waited its 100 ms like the data
    assert answered_at - shut_at >= 0.19
    # An orderly close leaves no relay thread behind.
    assert wait_for(lambda: not set(threading.enumerate()) - before, timeout=10)


def test_cut_drops_queued_data_at_once_and_ends_every_thread(relay_to) -> None:
    received: list[bytes] = []
    relay = relay_to(lambda conn: received.append(recv_all(conn)), rtt_ms=60_000)
    before = set(threading.enumerate())
    with dial(relay) as sock:
        sock.sendall(b"x" * 200_000)  # due upstream in 30 s
        # Four relay threads and the server's handler, with the bytes read into the line.
        assert wait_for(lambda: len(set(threading.enumerate()) - before) >= 5, timeout=10)
        time.sleep(0.2)
        assert relay.cut_connections() == 1
        # Far sooner than the 30 s the data was due: the delay lines let go at once.
        assert wait_for(lambda: not set(threading.enumerate()) - before, timeout=10)
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(1) == b""
    assert b"x" not in b"".join(received)  # the server saw the end, never the queued bytes
    assert relay.counter.snapshot() == {"up": 0, "down": 0}


# -- round trips --------------------------------------------------------------------------------


def test_each_request_response_exchange_is_one_round_trip(relay_to) -> None:
    relay = relay_to(echo, rtt_ms=10)
    started = time.time()
    with dial(relay) as sock:
        for i in range(7):
            message = f"request {i}".encode()  # small: one segment each way
            sock.sendall(message)
            assert recv_exactly(sock, len(message)) == message
    times = relay.round_trips.snapshot()
    assert len(times) == 7
    assert times == sorted(times) and started <= times[0] and times[-1] <= time.time()


def test_a_one_way_upload_is_at_most_one_round_trip(relay_to) -> None:
    relay = relay_to(digest_reply)
    with dial(relay) as sock:
        for _ in range(50):
            sock.sendall(b"u" * 40_000)
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock).endswith(b" 2000000")
    assert len(relay.round_trips.snapshot()) == 1  # the one answer, at the end


# -- through the marketplace --------------------------------------------------------------------


def test_rtt_setting_and_round_trips_in_the_ledger(fakevast_factory) -> None:
    fake: FakeVast = fakevast_factory(rtt_ms=50)
    ledger = fake.ledger()
    assert ledger["ssh_round_trips"] == 0 and ledger["ssh_round_trip_times"] == []
    assert ledger["ssh_bytes"] == {"up": 0, "down": 0}
    assert fake.faults()["rtt_ms"] == 50.0  # --rtt-ms is the starting value

    fake.set_faults({"rtt_ms": 20})
    assert fake.faults()["rtt_ms"] == 20.0
    fake.set_faults({"rtt_ms": 0})
    assert fake.faults()["rtt_ms"] == 0.0
    fake.set_faults({"rtt_ms": None})  # null: back to --rtt-ms
    assert fake.faults()["rtt_ms"] == 50.0

    fake.set_faults({"rtt_ms": 5})
    for bad in (-1, "50", True, [50], {"ms": 50}):
        with pytest.raises(urllib.error.HTTPError) as rejected:
            fake.set_faults({"rtt_ms": bad})
        assert rejected.value.code == 400
        answer = json.loads(rejected.value.read())
        assert answer["error"] == "invalid_faults" and "rtt_ms" in answer["msg"]
    with pytest.raises(urllib.error.HTTPError) as rejected:
        fake.set_faults({"next_creates": {"rtt_ms": -5}})  # per instance too
    assert rejected.value.code == 400
    assert fake.faults()["rtt_ms"] == 5.0  # nothing applied

    fake.clear_faults()
    assert fake.faults()["rtt_ms"] == 50.0


def test_an_ssh_session_through_the_fake_pays_the_rtt_and_is_counted(
    fakevast_factory, ssh_key: paramiko.PKey
) -> None:
    fake: FakeVast = fakevast_factory(rtt_ms=100)
    vast = sdk(fake)
    instance_id = rent(vast)
    vast.attach_ssh(instance_id, public_key(ssh_key))
    row = wait_status(vast, instance_id, "running")
    client = ssh_login(row["ssh_host"], row["ssh_port"], ssh_key)
    try:
        before = fake.ledger()["ssh_round_trips"]
        started = time.time()
        assert run(client, "echo hi") == "hi\n"  # channel open, exec, output: several turns
        elapsed = time.time() - started
        fake.set_faults({"instances": {str(instance_id): {"rtt_ms": 0}}})  # per instance
        assert run(client, "echo again") == "again\n"
    finally:
        client.close()
        vast.destroy_instance(instance_id)
    assert elapsed >= 0.095
    ledger = fake.ledger()
    times = ledger["ssh_round_trip_times"]
    assert ledger["ssh_round_trips"] == len(times) > before >= 1  # the login was counted too
    assert any(started <= t <= started + elapsed for t in times)
    assert fake.faults()["rtt_ms"] == 100.0  # the instance's override left the default alone
