"""Fault configuration: what ``POST /_fake/faults`` accepts, validates and remembers.

This module only parses and keeps the settings; the market and the HTTP layer ask it what to do.
The JSON schema is documented in README.md ("Faults").
"""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from http import HTTPStatus
from typing import Any

# The status_msg texts vast-api.md §4 lists for boot failures; any other text works too.
BOOT_FAILURES = (
    "Error response from daemon: failed to create task for container: failed to create shim "
    "task: OCI runtime create failed: runc create failed: unable to start container process: "
    'exec: "/bin/sh": permission denied: unknown',
    "toomanyrequests: You have reached your pull rate limit. You may increase the limit by "
    "authenticating and upgrading: https://www.docker.com/increase-rate-limit",
    "Error response from daemon: manifest for vastai/missing:latest not found: "
    "manifest unknown: manifest unknown",
    'Error response from daemon: Head "https://registry-1.docker.io/v2/acme/private/manifests/'
    'latest": unauthorized: authentication required',
    "failed to register layer: write /usr/lib/x86_64-linux-gnu/libcudnn.so.8: "
    "no space left on device",
)
HTTP_STATUSES = frozenset({429, 500, 502, 503, 504})
# The longest a start of a stopped instance takes, its GPU free: docs.vast.ai ("vastai start
# instance") reads an instance "stuck in the scheduling state for more than 30 seconds" as one
# whose machine lacks the resources, so a start that gets them is under way within 30 s.
RESTART_CAP_SECONDS = 30.0
_METHODS = frozenset({"GET", "POST", "PUT", "DELETE"})


class FaultError(ValueError):
    """A fault document that does not follow the schema (answered with 400)."""


def normalise_path(path: str) -> str:
    """Collapse repeated slashes and end with exactly one, as the fake serves every path."""
    parts = [part for part in path.split("/") if part]
    return "/" + "/".join(parts) + "/" if parts else "/"


def _object(value: Any, where: str, allowed: set[str] | None = None) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise FaultError(f"{where}: expected an object, got {value!r}")
    unknown = set(value) - allowed if allowed is not None else set()
    if unknown:
        raise FaultError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
    return value


def _number(value: Any, where: str, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
        raise FaultError(f"{where}: expected a number >= {minimum}, got {value!r}")
    return float(value)


def _flag(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise FaultError(f"{where}: expected true or false, got {value!r}")
    return value


def _count(value: Any, where: str) -> int | None:
    """A use count: a positive integer, or null for "until cleared"."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise FaultError(f"{where}: expected a positive integer or null, got {value!r}")
    return value


def _skip(value: Any, where: str) -> int:
    """How many matching requests pass before a rule applies: a whole number, >= 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise FaultError(f"{where}: expected a whole number >= 0, got {value!r}")
    return value


def _probability(value: Any, where: str) -> float:
    """A chance in (0, 1]; 1 means every matching request."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise FaultError(f"{where}: expected a number in (0, 1], got {value!r}")
    return float(value)


def _seed(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise FaultError(f"{where}: expected an integer, got {value!r}")
    return value


def _bandwidth(value: Any, where: str) -> float | None:
    return None if value is None else _number(value, where, minimum=1.0)


def _rtt(value: Any, where: str) -> float | None:
    """Milliseconds of simulated round-trip time; null means "back to the default"."""
    if value is None:
        return None
    rtt_ms = _number(value, where)
    if not math.isfinite(rtt_ms):
        raise FaultError(f"{where}: expected a finite number of milliseconds, got {value!r}")
    return rtt_ms


def _boot_failure(value: Any, where: str) -> str | None:
    if value is not None and not (isinstance(value, str) and value):
        raise FaultError(f"{where}: expected a status_msg string or null, got {value!r}")
    return value


def _id(key: str, where: str) -> int:
    try:
        return int(key)
    except ValueError:
        raise FaultError(f"{where}: keys must be numeric ids, got {key!r}") from None


@dataclass(frozen=True)
class Delay:
    """A one-shot event, due `after_seconds` after it is armed."""

    after_seconds: float = 0.0

    @classmethod
    def parse(cls, value: Any, where: str) -> Delay | None:
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        data = _object(value, where, {"after_seconds"})
        return cls(_number(data.get("after_seconds", 0.0), f"{where}.after_seconds"))


@dataclass(frozen=True)
class PriceRise:
    """The instance's dph_total becomes `dph_total`, `after_seconds` after it is armed."""

    dph_total: float
    after_seconds: float = 0.0

    @classmethod
    def parse(cls, value: Any, where: str) -> PriceRise | None:
        if value is None:
            return None
        data = _object(value, where, {"dph_total", "after_seconds"})
        if "dph_total" not in data:
            raise FaultError(f"{where}: dph_total is required")
        return cls(
            _number(data["dph_total"], f"{where}.dph_total"),
            _number(data.get("after_seconds", 0.0), f"{where}.after_seconds"),
        )


@dataclass(frozen=True)
class GpuTaken:
    """While an instance is stopped its GPU is free to rent (docs.vast.ai: "Stopped instances
    have no GPU reservation"); with chance `probability`, drawn at its next start, another
    renter has taken it and keeps it `for_seconds` from then (None: for good, the stricter
    reading, as nothing tells when a stranger's rental ends)."""

    probability: float = 1.0
    for_seconds: float | None = None

    @classmethod
    def parse(cls, value: Any, where: str) -> GpuTaken | None:
        if value is None:
            return None
        data = _object(value, where, {"probability", "for_seconds"})
        seconds = data.get("for_seconds")
        return cls(
            _probability(data.get("probability", 1.0), f"{where}.probability"),
            None if seconds is None else _number(seconds, f"{where}.for_seconds"),
        )


@dataclass(frozen=True)
class Timing:
    """How long a first boot (image pull and start) and a restart (start only) take."""

    boot_seconds: float
    restart_seconds: float


@dataclass(frozen=True)
class InstanceFaults:
    """What goes wrong with one instance; attached per offer, per next create or per id."""

    boot_failure: str | None = None
    stuck_loading: bool = False
    offline: Delay | None = None
    stopped: Delay | None = None
    price_rise: PriceRise | None = None
    bandwidth: float | None = None
    rtt_ms: float | None = None
    cut_connections: bool = False
    # POST /instances/{id}/ssh/ answers success but the key never reaches authorized_keys.
    drop_attach: bool = False
    # The proxy endpoint (ssh_host:ssh_port) closes every connection; a reboot heals it.
    proxy_down: bool = False


@dataclass(frozen=True)
class CreateFaults(InstanceFaults):
    """Instance faults for creates, plus `gone`: the create answers 410 and the offer vanishes
    (someone else took it after it was shown). `count` limits next_creates to N creates."""

    gone: bool = False
    count: int | None = None


_PARSERS: dict[str, Callable[[Any, str], Any]] = {
    "boot_failure": _boot_failure,
    "stuck_loading": _flag,
    "offline": Delay.parse,
    "stopped": Delay.parse,
    "price_rise": PriceRise.parse,
    "bandwidth": _bandwidth,
    "rtt_ms": _rtt,
    "cut_connections": _flag,
    "drop_attach": _flag,
    "proxy_down": _flag,
    "gone": _flag,
    "count": _count,
}
INSTANCE_KEYS = frozenset(f.name for f in fields(InstanceFaults))
_OFFER_KEYS = INSTANCE_KEYS | {"gone"}
_NEXT_CREATE_KEYS = _OFFER_KEYS | {"count"}


def parse_fields(value: Any, where: str, allowed: frozenset[str]) -> dict[str, Any]:
    """The keys given, validated, so that an update merges key by key."""
    data = _object(value, where, set(allowed))
    return {key: _PARSERS[key](item, f"{where}.{key}") for key, item in data.items()}


def _optional_fields(value: Any, where: str, allowed: frozenset[str]) -> dict[str, Any] | None:
    """null removes the faults set for that scope."""
    return None if value is None else parse_fields(value, where, allowed)


def to_json(faults: InstanceFaults) -> dict[str, Any]:
    return {
        f.name: asdict(v) if isinstance(v := getattr(faults, f.name), Delay | PriceRise) else v
        for f in fields(faults)
    }


@dataclass
class HttpRule:
    """Answers matching /api/ requests late and/or with an error status, `count` times.

    `probability` makes the fault random (count then counts only the faults that fired);
    `after_effect` lets the request take effect first and only loses its answer; `garbled`
    lets it take effect and cuts its answer short (a 200 whose JSON ends halfway)."""

    endpoint: str | None = None  # "METHOD /path/" or "/path/": a template or a concrete path
    count: int | None = 1
    status: int | None = None
    retry_after: float | None = None
    latency: float = 0.0
    body: dict[str, Any] | None = None
    probability: float = 1.0
    after_effect: bool = False
    garbled: bool = False
    skip: int = 0  # matching requests let through untouched before the rule applies

    @classmethod
    def parse(cls, value: Any, where: str) -> HttpRule:
        data = _object(value, where, {f.name for f in fields(cls)})
        status = data.get("status")
        if status is not None and status not in HTTP_STATUSES:
            raise FaultError(f"{where}.status: one of {sorted(HTTP_STATUSES)}, got {status!r}")
        garbled = _flag(data.get("garbled", False), f"{where}.garbled")
        if garbled and status is not None:
            raise FaultError(f"{where}: garbled cuts the real answer short; give no status")
        if status is None and not data.get("latency") and not garbled:
            raise FaultError(f"{where}: give a status, a latency, garbled, or a latency with one")
        if data.get("retry_after") is not None and status is None:
            raise FaultError(f"{where}.retry_after needs a status")
        if data.get("body") is not None and not isinstance(data["body"], dict):
            raise FaultError(f"{where}.body: expected an object")
        after_effect = _flag(data.get("after_effect", False), f"{where}.after_effect")
        if after_effect and status is None:
            raise FaultError(f"{where}.after_effect needs a status")
        retry_after = data.get("retry_after")
        return cls(
            endpoint=_endpoint(data.get("endpoint"), f"{where}.endpoint"),
            count=_count(data.get("count", 1), f"{where}.count"),
            status=status,
            retry_after=None if retry_after is None else _number(retry_after, where),
            latency=_number(data.get("latency", 0.0), f"{where}.latency"),
            body=data.get("body"),
            probability=_probability(data.get("probability", 1.0), f"{where}.probability"),
            after_effect=after_effect,
            garbled=garbled,
            skip=_skip(data.get("skip", 0), f"{where}.skip"),
        )

    def matches(self, method: str, template: str, path: str) -> bool:
        if self.endpoint is None:
            return True
        want_method, _, want_path = self.endpoint.rpartition(" ")
        return want_method in ("", method) and want_path in (template, path)

    def fires(self, draw: Callable[[], float]) -> bool:
        """Whether this match is faulted; draws only for random rules, so that fixed rules
        leave a seeded sequence alone."""
        return self.probability >= 1.0 or draw() < self.probability

    def headers(self) -> dict[str, str]:
        return {} if self.retry_after is None else {"Retry-After": f"{self.retry_after:g}"}

    def error_body(self, method: str, template: str) -> dict[str, Any]:
        """The body the real API sends with this status on this endpoint (vast-api.md §3)."""
        if self.body is not None:
            return self.body
        if self.status == 429:
            detail = "API requests too frequent endpoint threshold=3.0"
            if method == "DELETE" and template == "/api/v0/instances/{id}/":
                return {"success": False, "error": "rate_limit_exceeded", "msg": detail}
            return {"detail": detail}
        phrase = HTTPStatus(self.status or 500).phrase
        return {"success": False, "error": "server_error", "msg": f"{self.status} {phrase}"}


def _endpoint(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise FaultError(f"{where}: expected 'METHOD /path/' or '/path/', got {value!r}")
    method, _, path = value.strip().rpartition(" ")
    method = method.strip().upper()
    if method and method not in _METHODS:
        raise FaultError(f"{where}: unknown method {method!r}")
    return f"{method} {normalise_path(path)}".strip()


@dataclass(frozen=True)
class FaultUpdate:
    """A validated ``POST /_fake/faults`` document, split by who applies which part."""

    # boot_seconds, restart_seconds, bandwidth, rtt_ms, logs_not_ready, next_creates,
    # gpu_taken_while_stopped
    settings: dict[str, Any]
    http: list[HttpRule]
    offers: dict[int, dict[str, Any] | None]
    instances: dict[int, dict[str, Any]]
    cut_connections: bool
    seed: int | None


_TOP_KEYS = {
    "boot_seconds",
    "restart_seconds",
    "gpu_taken_while_stopped",
    "http",
    "offers",
    "next_creates",
    "instances",
    "bandwidth",
    "rtt_ms",
    "cut_connections",
    "logs_not_ready",
    "seed",
}


def parse_update(doc: Any) -> FaultUpdate:
    """Validate a whole document before anything is applied, so a bad one changes nothing."""
    data = _object(doc, "faults", _TOP_KEYS)
    settings: dict[str, Any] = {}
    for key in ("boot_seconds", "restart_seconds"):
        if key in data:
            settings[key] = None if data[key] is None else _number(data[key], key)
    if "gpu_taken_while_stopped" in data:
        given = data["gpu_taken_while_stopped"]
        settings["gpu_taken_while_stopped"] = GpuTaken.parse(given, "gpu_taken_while_stopped")
    if "bandwidth" in data:
        settings["bandwidth"] = _bandwidth(data["bandwidth"], "bandwidth")
    if "rtt_ms" in data:
        settings["rtt_ms"] = _rtt(data["rtt_ms"], "rtt_ms")
    if "logs_not_ready" in data:
        settings["logs_not_ready"] = int(_number(data["logs_not_ready"], "logs_not_ready"))
    if "next_creates" in data:
        given = _optional_fields(data["next_creates"], "next_creates", _NEXT_CREATE_KEYS)
        settings["next_creates"] = None if given is None else CreateFaults(**{"count": 1, **given})
    rules = data.get("http", [])
    if not isinstance(rules, list):
        raise FaultError("http: expected a list of rules")
    offers = {
        _id(key, "offers"): _optional_fields(value, f"offers.{key}", _OFFER_KEYS)
        for key, value in _object(data.get("offers", {}), "offers").items()
    }
    instances = {
        _id(key, "instances"): parse_fields(value, f"instances.{key}", INSTANCE_KEYS)
        for key, value in _object(data.get("instances", {}), "instances").items()
    }
    return FaultUpdate(
        settings=settings,
        http=[HttpRule.parse(rule, f"http[{i}]") for i, rule in enumerate(rules)],
        offers=offers,
        instances=instances,
        cut_connections=_flag(data.get("cut_connections", False), "cut_connections"),
        seed=None if data.get("seed") is None else _seed(data["seed"], "seed"),
    )


@dataclass
class FaultBook:
    """The marketplace-wide fault settings; thread-safe, consulted on every request.

    `boot_seconds`, `restart_seconds` and `rtt_ms` start from the command line's values; null
    or a clear goes back to those. A `restart_seconds` of None follows `boot_seconds` (see
    `timing`)."""

    default_boot_seconds: float
    default_rtt_ms: float = 0.0
    default_restart_seconds: float | None = None
    boot_seconds: float = field(init=False)
    restart_seconds: float | None = field(init=False)
    rtt_ms: float = field(init=False)
    gpu_taken_while_stopped: GpuTaken | None = None
    http: list[HttpRule] = field(default_factory=list)
    offers: dict[int, CreateFaults] = field(default_factory=dict)
    next_creates: CreateFaults | None = None
    bandwidth: float | None = None
    logs_not_ready: int = 0
    _random: random.Random = field(default_factory=random.Random, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self.boot_seconds = self.default_boot_seconds
        self.restart_seconds = self.default_restart_seconds
        self.rtt_ms = self.default_rtt_ms

    def apply(self, update: FaultUpdate) -> None:
        """Merge: settings replace, `http` rules append, offers merge key by key. A seed
        reseeds the draws of random rules before the document's rules can use them."""
        with self._lock:
            if update.seed is not None:
                self._random.seed(update.seed)
            for key, value in update.settings.items():
                if key in ("boot_seconds", "restart_seconds", "rtt_ms") and value is None:
                    value = getattr(self, f"default_{key}")
                setattr(self, key, value)
            self.http.extend(update.http)
            for offer_id, given in update.offers.items():
                if given is None:
                    self.offers.pop(offer_id, None)
                else:
                    old = self.offers.get(offer_id, CreateFaults())
                    self.offers[offer_id] = replace(old, **given)

    def clear(self) -> None:
        with self._lock:
            self.boot_seconds = self.default_boot_seconds
            self.restart_seconds = self.default_restart_seconds
            self.gpu_taken_while_stopped = None
            self.http.clear()
            self.offers.clear()
            self.next_creates = None
            self.bandwidth = None
            self.rtt_ms = self.default_rtt_ms
            self.logs_not_ready = 0

    def timing(self) -> Timing:
        """The boot and restart times in force. A restart without a time of its own takes as
        long as a boot (no kinder: Vast.ai gives no figure), but at most RESTART_CAP_SECONDS,
        as its image is on the machine already."""
        with self._lock:
            restart = self.restart_seconds
            if restart is None:
                restart = min(self.boot_seconds, RESTART_CAP_SECONDS)
            return Timing(self.boot_seconds, restart)

    def take_gpu(self, now: float) -> float | None:
        """At the start of a stopped instance: until when another renter holds its GPU (inf:
        for good), or None if nobody took it. Draws only for a probability below 1, so that a
        fixed setting leaves a seeded sequence alone."""
        with self._lock:
            taken = self.gpu_taken_while_stopped
            if taken is None:
                return None
            if taken.probability < 1.0 and self._random.random() >= taken.probability:
                return None
            return math.inf if taken.for_seconds is None else now + taken.for_seconds

    def take_http(self, method: str, template: str, path: str) -> HttpRule | None:
        """The first rule that matches this request and fires, with one of its uses consumed;
        a random rule that did not fire lets the later rules have their turn."""
        with self._lock:
            for rule in self.http:
                if rule.skip and rule.matches(method, template, path):
                    rule.skip -= 1  # this one passes untouched (a later page, say, is hit)
                    continue
                if rule.matches(method, template, path) and rule.fires(self._random.random):
                    if rule.count is not None:
                        rule.count -= 1
                        if rule.count == 0:
                            self.http.remove(rule)
                    return rule
        return None

    def take_create(self, offer_id: int) -> CreateFaults:
        """The faults of one create on `offer_id`: next_creates (one use taken) if set, else
        the offer's; an offer's `gone` fires once, after which the offer stays taken."""
        with self._lock:
            per_offer = self.offers.get(offer_id, CreateFaults())
            if per_offer.gone:
                self.offers[offer_id] = replace(per_offer, gone=False)
                return per_offer
            upcoming = self.next_creates
            if upcoming is None:
                return per_offer
            if upcoming.count is not None:
                left = upcoming.count - 1
                self.next_creates = replace(upcoming, count=left) if left else None
            return upcoming

    def to_json(self) -> dict[str, Any]:
        with self._lock:
            return {
                "boot_seconds": self.boot_seconds,
                "restart_seconds": self.restart_seconds,
                "gpu_taken_while_stopped": (
                    asdict(self.gpu_taken_while_stopped) if self.gpu_taken_while_stopped else None
                ),
                "http": [asdict(rule) for rule in self.http],
                "offers": {str(k): to_json(v) for k, v in self.offers.items()},
                "next_creates": to_json(self.next_creates) if self.next_creates else None,
                "bandwidth": self.bandwidth,
                "rtt_ms": self.rtt_ms,
                "logs_not_ready": self.logs_not_ready,
            }
