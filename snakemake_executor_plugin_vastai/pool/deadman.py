"""The run's side of the dead-man switch: a heartbeat on every instance the run holds.

Why: each instance's watchdog (``onhost/watchdog.py``) ends its instance when the heartbeat
file goes stale for ``--vastai-deadman`` seconds. A live run touches it about four times per
deadman period over the SSH connection it already holds, whether jobs run or the run merely
waits, so the switch fires only when this process (or its network) is gone.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

from snakemake_executor_plugin_vastai.base.logger import get_logger
from snakemake_executor_plugin_vastai.pool.instance import Instance
from snakemake_executor_plugin_vastai.remote.bootstrap import HEARTBEAT
from snakemake_executor_plugin_vastai.remote.ssh import ExecStream, RemoteError, error_detail

log = get_logger(__name__)

BEATS_PER_PERIOD = 4
TOUCH_TIMEOUT_SECONDS = 15.0
# A touch reconnects for this long at most: meanwhile it holds the host's connection, and a
# job re-attaching after the same outage (a computer waking up) waits behind it.
RECONNECT_SECONDS = 5.0


def beat_interval(deadman: float) -> float:
    return max(1.0, min(60.0, deadman / BEATS_PER_PERIOD))


class Heartbeat:
    """Touches each instance's heartbeat file on a thread of its own, so one unreachable host
    never delays the others (nor the reaper that calls ``beat``)."""

    def __init__(self) -> None:
        self._beating: set[str] = set()  # labels with a touch under way
        self._lock = threading.Lock()

    def beat(self, instances: Iterable[Instance]) -> None:
        for instance in instances:
            with self._lock:
                if instance.host is None or instance.label in self._beating:
                    continue
                self._beating.add(instance.label)
            threading.Thread(
                target=self._touch, args=(instance,), name="vastai-heartbeat", daemon=True
            ).start()

    def _touch(self, instance: Instance) -> None:
        try:
            assert instance.host is not None
            stream = instance.host.open_stream(f"touch {HEARTBEAT}", b"", RECONNECT_SECONDS)
            try:
                _wait_for_end(stream, time.monotonic() + TOUCH_TIMEOUT_SECONDS)
            finally:
                stream.close()
            instance.heartbeat_at = time.time()  # a loss after a long silence is not its fault
        except (RemoteError, OSError) as error:
            log.debug("%s: heartbeat failed: %s", instance.name, error_detail(error, instance.name))
        finally:
            with self._lock:
                self._beating.discard(instance.label)


def _wait_for_end(stream: ExecStream, deadline: float) -> None:
    """Until the command's output ends (TimeoutError at the deadline); RemoteError when its
    connection died instead."""
    while stream.read(1024, max(0.0, deadline - time.monotonic())):
        pass
    if stream.lost:
        raise RemoteError(f"{stream.host_name}: the connection dropped")
