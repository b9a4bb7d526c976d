"""Vast.ai's rate limits and daily search quota, enforced the way vast-api.md §10 gives them.

Why this exists: on Vast.ai a refused call is the normal state of a client that does not pace
itself, so a fake that answers every call at once measures a plugin that cannot exist. Each
endpoint is limited separately for each identity (the API key a request carries + the client's
IP), as a minimum interval between calls (search: 10 per sliding minute). A refused call is
``429`` with a plain-text body and no ``Retry-After``, and it does not take effect. Only the
create has a penalty: a too-early create blocks creates for 12 s.

The numbers, their sources and the choices made where the real API is silent are in README.md
("Rate limits and accounting"). Everything here is thread-safe; the HTTP layer asks `check`
before a request reaches its handler.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

SEARCH = "POST /api/v0/bundles/"
QUOTA_BODY = {"error": "search_quota_exceeded"}


class LimitsError(ValueError):
    """A ``POST /_fake/limits`` document that does not follow the schema (answered with 400)."""


@dataclass(frozen=True)
class Limit:
    """At most `calls` accepted calls in any `seconds`-long window (one call: a minimum
    interval). A refused call blocks the bucket for `penalty` seconds from the refusal."""

    calls: int
    seconds: float
    penalty: float = 0.0

    @property
    def threshold(self) -> float:
        """The interval the refusal names: seconds per call (search: 60 / 10 = 6.0)."""
        return self.seconds / self.calls

    def refusal(self) -> str:
        return f"API requests too frequent: endpoint threshold={self.threshold}"


@dataclass(frozen=True)
class Rule:
    """How one endpoint is limited. Endpoints naming the same `bucket` share one allowance
    (a batch create spends the create's); `per_id` charges a batch one call per id it names."""

    limit: Limit
    bucket: str | None = None
    per_id: bool = False


_CREATE = Limit(1, 4.5, penalty=12.0)
_DESTROY = Limit(1, 3.0)
_ONE_PER_SECOND = Limit(1, 1.0)
# Keys are the ledger's api_calls keys ("METHOD /route template/"). Endpoints not listed (a
# path the fake does not serve, a wrong method) are not limited: they never reach a handler.
RULES: Mapping[str, Rule] = {
    SEARCH: Rule(Limit(10, 60.0)),
    "PUT /api/v0/asks/{id}/": Rule(_CREATE, bucket="create"),
    "POST /api/v0/asks/bulk/": Rule(_CREATE, bucket="create", per_id=True),
    "GET /api/v1/instances/": Rule(_ONE_PER_SECOND),
    "GET /api/v0/instances/": Rule(_ONE_PER_SECOND),
    "GET /api/v0/instances/{id}/": Rule(Limit(1, 2.0)),
    "DELETE /api/v0/instances/{id}/": Rule(_DESTROY, bucket="destroy"),
    "DELETE /api/v0/instances/": Rule(_DESTROY, bucket="destroy", per_id=True),
    "PUT /api/v0/instances/{id}/": Rule(_ONE_PER_SECOND),
    "PUT /api/v0/instances/reboot/{id}/": Rule(_ONE_PER_SECOND),
    "PUT /api/v0/instances/bid_price/{id}/": Rule(Limit(1, 5.5)),
    # Not in §10's table: limited like manage (one per second), the strictest limit §10 gives
    # any single-instance call, so a client that keeps to this keeps to whatever is real.
    "PUT /api/v0/instances/request_logs/{id}/": Rule(_ONE_PER_SECOND),
    "POST /api/v0/instances/{id}/ssh/": Rule(_ONE_PER_SECOND),
    "POST /api/v0/ssh/": Rule(_ONE_PER_SECOND),
    "GET /api/v0/ssh/": Rule(_ONE_PER_SECOND),
    "DELETE /api/v0/ssh/{id}/": Rule(_ONE_PER_SECOND),
    "GET /api/v0/users/current/": Rule(_ONE_PER_SECOND),
}


@dataclass(frozen=True)
class Identity:
    """Who a limit is kept for: the API key (however it was sent) and the client's IP."""

    key: str
    client: str


@dataclass(frozen=True)
class Refusal:
    """A 429 the limits give instead of the handler's answer."""

    payload: str | dict[str, Any]  # plain text (a rate limit) or JSON (the quota)
    headers: Mapping[str, str]


@dataclass
class Budget:
    """One identity's allowance on one bucket: the times its accepted calls occupy (a batch's
    later ids one threshold apart, in the future) and the end of a penalty."""

    limit: Limit
    charges: deque[float] = field(default_factory=deque)
    blocked_until: float = -math.inf

    def admit(self, now: float, units: int) -> bool:
        """Accept a call worth `units` calls at `now`, or refuse it. A refusal changes nothing
        but the penalty (create only): other refusals do not extend the wait."""
        window_start = now - self.limit.seconds
        while self.charges and self.charges[0] <= window_start:
            self.charges.popleft()
        if now < self.blocked_until or len(self.charges) >= self.limit.calls:
            if self.limit.penalty:
                self.blocked_until = max(self.blocked_until, now + self.limit.penalty)
            return False
        self.charges.extend(now + i * self.limit.threshold for i in range(units))
        return True


@dataclass
class Clock:
    """The limits' own clock: real monotonic time, which a test may freeze and move forward
    (``POST /_fake/limits``) to reach a boundary without waiting for it."""

    offset: float = 0.0
    frozen_at: float | None = None  # the real reading it stopped at

    def now(self) -> float:
        real = time.monotonic() if self.frozen_at is None else self.frozen_at
        return real + self.offset

    def wall(self) -> float:
        """Epoch seconds, shifted as `now` is (the quota's day follows the same clock)."""
        return time.time() + self.now() - time.monotonic()

    def freeze(self, frozen: bool) -> None:
        """Stop or restart; restarting resumes from the frozen reading, without a jump."""
        if frozen and self.frozen_at is None:
            self.frozen_at = time.monotonic()
        elif not frozen and self.frozen_at is not None:
            self.offset -= time.monotonic() - self.frozen_at
            self.frozen_at = None


def next_utc_midnight(epoch: float) -> int:
    """When a quota counted on the UTC day of `epoch` resets (epoch seconds)."""
    day = datetime.fromtimestamp(epoch, UTC).date() + timedelta(days=1)
    return int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp())


@dataclass
class SearchQuota:
    """Searches per API key per UTC day; `size` None means unlimited (no figure is
    documented)."""

    size: int | None = None
    used: Counter[str] = field(default_factory=Counter)
    resets_at: float = -math.inf

    def roll(self, wall: float) -> None:
        """Start a new count once the UTC day it was kept for has ended."""
        if wall >= self.resets_at:
            self.used.clear()
            self.resets_at = next_utc_midnight(wall)

    def exhausted(self, key: str, wall: float) -> bool:
        self.roll(wall)
        return self.size is not None and self.used[key] >= self.size

    def refusal(self) -> Refusal:
        return Refusal(dict(QUOTA_BODY), {"X-RateLimit-Reset": str(int(self.resets_at))})


class RateLimits:
    """Every identity's budgets, the search quota and the count of refused calls."""

    def __init__(self, enabled: bool = True, search_quota: int | None = None) -> None:
        self.enabled = enabled
        self.quota = SearchQuota(search_quota)
        self.clock = Clock()
        self._budgets: dict[tuple[Identity, str], Budget] = {}
        self._rate_limited: Counter[str] = Counter()
        self._quota_exceeded: Counter[str] = Counter()
        self._lock = threading.Lock()

    def check(self, identity: Identity, endpoint: str, ids: int = 1) -> Refusal | None:
        """Admit a request to `endpoint` ("METHOD /template/") naming `ids` ids, or refuse it.
        The quota is independent of the switch: it applies whenever a size is set."""
        rule = RULES.get(endpoint)
        if rule is None:
            return None
        with self._lock:
            if endpoint == SEARCH and self.quota.exhausted(identity.key, self.clock.wall()):
                self._quota_exceeded[endpoint] += 1
                return self.quota.refusal()
            if self.enabled and not self._budget(identity, endpoint, rule).admit(
                self.clock.now(), ids if rule.per_id else 1
            ):
                self._rate_limited[endpoint] += 1
                return Refusal(rule.limit.refusal(), {})
            if endpoint == SEARCH:
                self.quota.used[identity.key] += 1
        return None

    def _budget(self, identity: Identity, endpoint: str, rule: Rule) -> Budget:
        slot = (identity, rule.bucket or endpoint)
        if slot not in self._budgets:
            self._budgets[slot] = Budget(rule.limit)
        return self._budgets[slot]

    def ledger(self) -> dict[str, dict[str, int]]:
        """Refused calls per endpoint, for the ledger: a run that paces itself has none."""
        with self._lock:
            return {
                "rate_limited": dict(self._rate_limited),
                "quota_exceeded": dict(self._quota_exceeded),
            }

    def configure(self, doc: Any) -> dict[str, Any]:
        """Apply a ``POST /_fake/limits`` document (validated as a whole first)."""
        changes = _parse(doc)
        with self._lock:
            if changes.get("reset"):
                self._budgets.clear()
                self.quota.used.clear()
            if "enabled" in changes:
                self.enabled = changes["enabled"]
            if "search_quota" in changes:
                self.quota.size = changes["search_quota"]
            if "freeze" in changes:
                self.clock.freeze(changes["freeze"])
            self.clock.offset += changes.get("advance_seconds", 0.0)
        return self.to_json()

    def to_json(self) -> dict[str, Any]:
        with self._lock:
            wall = self.clock.wall()
            self.quota.roll(wall)
            return {
                "enabled": self.enabled,
                "wall_clock": wall,
                "search_quota": self.quota.size,
                "searches_today": dict(self.quota.used),
                "quota_resets_at": int(self.quota.resets_at),
                "frozen": self.clock.frozen_at is not None,
                "clock_offset": self.clock.offset,
                "rules": {
                    endpoint: {
                        "calls": rule.limit.calls,
                        "seconds": rule.limit.seconds,
                        "penalty": rule.limit.penalty,
                        "bucket": rule.bucket or endpoint,
                        "per_id": rule.per_id,
                    }
                    for endpoint, rule in RULES.items()
                },
            }


def _parse(doc: Any) -> dict[str, Any]:
    allowed = {"enabled", "search_quota", "reset", "freeze", "advance_seconds"}
    if not isinstance(doc, dict) or set(doc) - allowed:
        raise LimitsError(f"expected an object with keys among {sorted(allowed)}, got {doc!r}")
    for key in ("enabled", "reset", "freeze"):
        if key in doc and not isinstance(doc[key], bool):
            raise LimitsError(f"{key}: expected true or false, got {doc[key]!r}")
    quota = doc.get("search_quota")
    if quota is not None and (isinstance(quota, bool) or not isinstance(quota, int) or quota < 0):
        raise LimitsError(f"search_quota: expected an integer >= 0 or null, got {quota!r}")
    advance = doc.get("advance_seconds", 0.0)
    number = isinstance(advance, int | float) and not isinstance(advance, bool)
    if not (number and math.isfinite(advance) and advance >= 0):
        raise LimitsError(f"advance_seconds: expected a number >= 0, got {advance!r}")
    return dict(doc)
