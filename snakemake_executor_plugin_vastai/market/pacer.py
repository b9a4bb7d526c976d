"""Keeping to Vast.ai's rate limits, so that the marketplace never has to refuse a call.

Why a book on disk: Vast.ai limits each endpoint per API key (and client IP), not per
process. A second workflow of the same key, or ``snakemake-vastai offers`` run beside a
workflow, spends the same allowance. So every process of the same key and URL on this
machine books its calls in one small file under the user's cache directory, under an
exclusive lock, and together they stay within the limits. The file holds times only: never
the key, whose digest names it.

The limits are Vast.ai's own ("Rate Limits and Errors" and each endpoint's ``x-rate-limit``
in its OpenAPI files, as ``vast-api.md`` section 10 quotes them).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snakemake_executor_plugin_vastai.base.errors import PluginError
from snakemake_executor_plugin_vastai.market.keyfiles import key_file, locked_json


@dataclass(frozen=True)
class Limit:
    """At most ``calls`` calls in any ``seconds`` seconds; a refused call blocks the
    endpoint for ``penalty`` seconds (Vast.ai's create), else for one interval."""

    calls: int
    seconds: float
    penalty: float = 0.0


LIMITS: dict[str, Limit] = {
    "search": Limit(10, 60.0),  # POST /bundles/: 10 per minute
    "create": Limit(1, 4.5, penalty=12.0),  # PUT /asks/{id}/: one per 4.5 s, 12 s penalty
    "list": Limit(1, 1.0),  # GET /instances/
    "show": Limit(1, 2.0),  # GET /instances/{id}/
    "destroy": Limit(1, 3.0),  # DELETE /instances/{id}/
    "manage": Limit(1, 1.0),  # PUT /instances/{id}/ (label, stop), reboot, attach, logs
    "user": Limit(1, 1.0),  # GET /users/current: not documented; paced like manage
}
# Added to every interval: the marketplace times a call by its arrival, which a slow
# connection may delay for one call and not the next.
SLACK_SECONDS = 0.25
WAIT_SLICE_SECONDS = 0.25  # a wait looks this often whether to give up


class Unpaced(PluginError):
    """The caller gave up waiting for its turn (the run is closing, a deadline passed)."""


def book_path(api_url: str, api_key: str) -> Path:
    """Where this key's calls to this URL are booked."""
    return key_file(api_url, api_key, "pace")


class Pacer:
    """Waits for each call's turn under the limits, shared by every thread (a lock) and
    every process (a file lock) of the same key and URL."""

    def __init__(
        self,
        path: Path,
        limits: dict[str, Limit] = LIMITS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.limits = limits
        self.clock = clock
        self._lock = threading.Lock()

    def wait_turn(
        self, endpoint: str, give_up: Callable[[], bool] | None = None, weight: int = 1
    ) -> float:
        """Block until a call to ``endpoint`` keeps within its limit, and book it. Returns
        the seconds waited. Raises Unpaced when ``give_up`` says so first. A batch call
        (``weight`` ids) may go when one call may, and then holds the allowance of that
        many calls: Vast.ai does not document its batch limits, so the stricter reading."""
        started = self.clock()
        while True:
            with self._book() as book:
                now = self.clock()
                wait = self._wait(book, endpoint, now)
                if wait <= 0:
                    book.setdefault("calls", {}).setdefault(endpoint, []).append(now)
                    if weight > 1:
                        limit = self.limits[endpoint]
                        held = now + weight * limit.seconds / limit.calls + SLACK_SECONDS
                        self._block(book, endpoint, held)
                    return now - started
            self._sleep(wait, give_up)

    def refused(self, endpoint: str) -> None:
        """The marketplace refused a call anyway (another machine or tool spends the same
        key): no call to that endpoint before its penalty, or one interval, is over."""
        limit = self.limits[endpoint]
        interval = limit.seconds / limit.calls  # search: 6 s, not the whole minute's window
        with self._book() as book:
            self._block(book, endpoint, self.clock() + (limit.penalty or interval) + SLACK_SECONDS)

    def _block(self, book: dict[str, Any], endpoint: str, until: float) -> None:
        blocked = book.setdefault("blocked", {})
        blocked[endpoint] = max(blocked.get(endpoint, 0.0), until)

    def _wait(self, book: dict[str, Any], endpoint: str, now: float) -> float:
        limit = self.limits[endpoint]
        window = limit.seconds + SLACK_SECONDS
        recent = [t for t in book.get("calls", {}).get(endpoint, []) if now - t < window]
        book.setdefault("calls", {})[endpoint] = recent
        blocked = book.get("blocked", {}).get(endpoint, 0.0) - now
        full = recent[-limit.calls] + window - now if len(recent) >= limit.calls else 0.0
        return max(blocked, full)

    def _sleep(self, seconds: float, give_up: Callable[[], bool] | None) -> None:
        deadline = time.monotonic() + seconds
        while True:
            if give_up is not None and give_up():
                raise Unpaced("stopped waiting for a turn under Vast.ai's rate limit")
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, WAIT_SLICE_SECONDS))

    @contextlib.contextmanager
    def _book(self) -> Iterator[dict[str, Any]]:
        """The book, under the thread lock and the file lock. A damaged book starts afresh:
        it only ever makes the wait shorter once."""
        with self._lock, locked_json(self.path) as book:
            yield book
