"""The dead-man switch, one per instance, started by the onstart script in the container's
first second (and again by the bootstrap, which then finds it running and leaves it) as
``python -I -S watchdog-<key>.py <deadman seconds> <api url>``.

Why: when the controlling Snakemake dies by ``kill -9`` or the laptop loses power, nobody is
left to destroy the run's instances, and they bill until someone notices. The run refreshes a
heartbeat file on every instance it still holds; when none came for the deadman time, this
process destroys its own instance with the scoped per-instance key that Vast.ai puts in the
container's main process environment (``CONTAINER_ID``, ``CONTAINER_API_KEY``: an SSH session
does not inherit them, so they are read from ``/proc/1/environ``). The user's own key never
comes to the host. If the destroy is refused, it stops the instance (a stopped instance bills
only its disk); if that fails too, it ends the container's main process.

An instance kept warm past its run (``--vastai-keep-warm``) has a ``keep-until`` file: an
epoch second on this host's clock, written by the run as it ends. While it exists the
deadline rules instead of the heartbeat, so the instance ends then even if nobody returns;
the next run that adopts it touches the heartbeat and removes the file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import signal
import sys
import time
import urllib.error
import urllib.request

BASE = os.path.dirname(os.path.abspath(__file__))
HEARTBEAT = os.path.join(BASE, "heartbeat")
KEEP_UNTIL = os.path.join(BASE, "keep-until")
CALL_TIMEOUT_SECONDS = 30
DESTROY_ATTEMPTS = 3
RETRY_SECONDS = 5
KILL_GRACE_SECONDS = 10


def say(text: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} watchdog: {text}", flush=True)


def container_credentials() -> tuple[str, str] | None:
    """(CONTAINER_ID, CONTAINER_API_KEY) of this container's main process, if readable."""
    try:
        with open("/proc/1/environ", "rb") as handle:
            entries = handle.read().split(b"\0")
    except OSError:
        return None
    env = dict(entry.split(b"=", 1) for entry in entries if b"=" in entry)
    found, key = env.get(b"CONTAINER_ID"), env.get(b"CONTAINER_API_KEY")
    return (found.decode(), key.decode()) if found and key else None


def call(method: str, url: str, key: str, body: dict | None = None) -> bool:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Authorization", f"Bearer {key}")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=CALL_TIMEOUT_SECONDS) as answer:
            return 200 <= answer.status < 300
    except (urllib.error.URLError, OSError, ValueError) as error:
        say(f"{method} {url.rsplit('/api/', 1)[-1]} failed: {error}")
        return False


def end_instance(api_url: str, credentials: tuple[str, str]) -> None:
    """Destroy, else stop, else end the main process: whatever stops the bill soonest."""
    instance_id, key = credentials
    url = f"{api_url.rstrip('/')}/api/v0/instances/{instance_id}/"
    for attempt in range(DESTROY_ATTEMPTS):
        if call("DELETE", url, key):
            say(f"destroyed instance {instance_id}")
            return
        if attempt + 1 < DESTROY_ATTEMPTS:
            time.sleep(RETRY_SECONDS)
    if call("PUT", url, key, {"state": "stopped"}):
        say(f"could not destroy instance {instance_id}; stopped it")
        return
    say("the API refused to end this instance; ending the container's main process")
    with contextlib.suppress(OSError):
        os.kill(1, signal.SIGTERM)
        time.sleep(KILL_GRACE_SECONDS)
        os.kill(1, signal.SIGKILL)


def silence(started: float) -> float:
    """Seconds since the last sign of life: the newer of the heartbeat and this watchdog's
    start, so a run that never logged in (still pulling, or dead before the bootstrap) counts
    as silent from the container's first second."""
    try:
        last = max(os.stat(HEARTBEAT).st_mtime, started)
    except FileNotFoundError:
        last = started
    return time.time() - last


def kept_until() -> float | None:
    """The keep-warm deadline, if the run left one; an unreadable file counts as none (the
    heartbeat rule is the stricter one)."""
    try:
        with open(KEEP_UNTIL) as handle:
            until = float(handle.read().strip())
    except (OSError, ValueError):
        return None
    return until if math.isfinite(until) else None


def why_end(started: float, deadman: float) -> str | None:
    """Why the instance must end now; None while it may live."""
    until = kept_until()
    if until is not None:
        return f"kept warm until {until:.0f}, which has passed" if time.time() > until else None
    quiet = silence(started)
    if quiet > deadman:
        return f"no heartbeat for {quiet:.0f} s: the run that rented this instance is gone"
    return None


def main() -> int:
    deadman, api_url = float(sys.argv[1]), sys.argv[2]
    lock = open(os.path.join(BASE, "watchdog.lock"), "a")  # noqa: SIM115 (held for life)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return 0  # another watchdog guards this instance
    credentials = container_credentials()
    if credentials is None:  # not a Vast container: PID 1 may be a real machine's init
        say("no CONTAINER_ID/CONTAINER_API_KEY in /proc/1/environ; not guarding")
        return 0
    started = time.time()
    say(f"guarding: no heartbeat for {deadman:g} s ends this instance")
    check = max(1.0, min(10.0, deadman / 4))
    reason = why_end(started, deadman)
    while reason is None:
        time.sleep(check)
        reason = why_end(started, deadman)
    say(reason)
    end_instance(api_url, credentials)
    return 0


if __name__ == "__main__":
    sys.exit(main())
