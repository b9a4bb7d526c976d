"""Run a fake marketplace as a subprocess, for tests, benchmarks and the README demo.

A subprocess rather than an in-process server: the fake then lives exactly as a user's
``python -m tests.fakevast`` does, its instances die with it, and a test that kills or hangs
cannot leave threads behind in pytest.
"""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 60.0


class FakeVast:
    """A started ``python -m tests.fakevast``; use as a context manager."""

    def __init__(
        self,
        boot_seconds: float = 0.0,
        offers: Path | None = None,
        api_key: str = "fake-key",
        state_dir: Path | None = None,
        rtt_ms: float = 0.0,
        rate_limits: bool = True,
        search_quota: int | None = None,
        restart_seconds: float | None = None,
    ) -> None:
        """`rtt_ms` is the SSH relays' simulated round-trip time (``--rtt-ms``), e.g. 50 for a
        laptop-to-Vast link; faults can change it later. `rate_limits` False answers every
        call at once (``--no-rate-limits``), for tests about something else; `search_quota`
        is the searches per key per UTC day (``--search-quota``; None: unlimited);
        `restart_seconds` how long a start of a stopped instance takes once it has its GPU
        (``--restart-seconds``; None: as long as a boot, at most 30 s)."""
        self.api_key = api_key
        self.rate_limits = rate_limits  # as started (``set_limits`` may change it later)
        command = [sys.executable, "-m", "tests.fakevast", "--port", "0"]
        command += ["--boot-seconds", str(boot_seconds), "--api-key", api_key, "--exit-on-eof"]
        command += ["--rtt-ms", str(rtt_ms)]
        if not rate_limits:
            command += ["--no-rate-limits"]
        if search_quota is not None:
            command += ["--search-quota", str(search_quota)]
        if restart_seconds is not None:
            command += ["--restart-seconds", str(restart_seconds)]
        if offers is not None:
            command += ["--offers", str(offers)]
        if state_dir is not None:
            command += ["--state-dir", str(state_dir)]
        # stdin is a lifeline: if this process dies without stop(), the fake sees EOF and
        # shuts down cleanly instead of leaving its instances' sshds behind.
        self._process = subprocess.Popen(
            command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True
        )
        self.url = self._read_url()

    def _read_url(self) -> str:
        """The first stdout line; later lines are passed on to stderr so the pipe never fills
        (less the `export` line, which is for a person at a terminal)."""
        assert self._process.stdout is not None
        stdout = self._process.stdout
        lines: queue.Queue[str] = queue.Queue()

        def pump() -> None:
            lines.put(stdout.readline())
            for line in stdout:
                if not line.startswith("export "):
                    sys.stderr.write(line)

        self._pump = threading.Thread(target=pump, name="fakevast-stdout", daemon=True)
        self._pump.start()
        try:
            first = lines.get(timeout=STARTUP_TIMEOUT)
        except queue.Empty:
            self.stop()
            raise RuntimeError(f"fakevast printed no URL within {STARTUP_TIMEOUT:.0f} s") from None
        if not first.startswith("URL "):
            self.stop()
            raise RuntimeError(f"fakevast did not start (exit {self._process.poll()}): {first!r}")
        return first.split()[1]

    def __enter__(self) -> FakeVast:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def ledger(self) -> dict[str, Any]:
        return self._call("GET", "/_fake/ledger")

    def set_faults(self, faults: dict[str, Any]) -> None:
        self._call("POST", "/_fake/faults", faults)

    def faults(self) -> dict[str, Any]:
        """The fault settings in force (GET /_fake/faults)."""
        return self._call("GET", "/_fake/faults")

    def clear_faults(self) -> None:
        self._call("DELETE", "/_fake/faults")

    def limits(self) -> dict[str, Any]:
        """The rate limits' settings and state (GET /_fake/limits)."""
        return self._call("GET", "/_fake/limits")

    def set_limits(self, **changes: Any) -> dict[str, Any]:
        """POST /_fake/limits: `enabled`, `search_quota`, `reset`, `freeze`, `advance_seconds`
        (README, "Rate limits and accounting")."""
        return self._call("POST", "/_fake/limits", changes)

    def requests(self) -> list[dict[str, Any]]:
        """Every /api/ request so far, in arrival order (GET /_fake/requests)."""
        return self._call("GET", "/_fake/requests")["requests"]

    def alive_instances(self) -> list[dict[str, Any]]:
        return [row for row in self.ledger()["instances"] if row["ended_at"] is None]

    def wait_for(
        self, predicate: Callable[[], Any], timeout: float, interval: float = 0.05
    ) -> None:
        """Poll `predicate` until it is truthy; TimeoutError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"condition not met within {timeout} s")
            time.sleep(interval)

    def stop(self) -> None:
        """SIGTERM (the fake destroys its instances), then wait; idempotent."""
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
                raise RuntimeError("fakevast ignored SIGTERM; killed it") from None
        self._pump.join(timeout=5)  # stdout reaches EOF once the fake has exited
        for pipe in (self._process.stdin, self._process.stdout):
            if pipe is not None and not self._pump.is_alive():
                pipe.close()
