"""The marketplace's state and the operations behind every endpoint.

One lock guards instances, keys, logs and counters; anything that blocks (starting or halting a
container, killing sshd, relays) happens outside it. A ticker thread drives each instance's
timeline, gives stopped instances asked to start their GPU back once it is free, and fires due
faults, so statuses change with time, as on Vast.ai, not only when polled.
"""

from __future__ import annotations

import contextlib
import hmac
import math
import re
import secrets
import shutil
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .catalog import Catalog
from .container import Container, ContainerError, ContainerSpec
from .errors import ApiError, api_error, forbidden, no_such_instance
from .faults import FaultBook, FaultError, InstanceFaults, parse_update
from .instance import Effects, Instance
from .launch import MAX_PRICE, MIN_PRICE, parse_launch
from .limits import RateLimits
from .listing import list_page
from .relay import Relay, RoundTrips, TrafficCounter

TICK_SECONDS = 0.1
FIRST_INSTANCE_ID = 22_000_001
USER_ID = 41_207
STARTING_CREDIT = 100.0
_SSH_KEY = re.compile(r"^(ssh-(rsa|dss|ed25519)|ecdsa-sha2-nistp\d+|sk-[\w@.-]+) [A-Za-z0-9+/]+=*")


@dataclass
class AccountKey:
    id: int
    public_key: str
    created_at: str


@dataclass
class ApiCall:
    """One /api/ request in the request log; `status` stays None until it is answered."""

    t: float  # epoch seconds at arrival
    method: str
    endpoint: str  # "METHOD /template/", the api_calls key
    path: str
    status: int | None = None
    garbled: bool = False  # answered with its JSON cut short (an http rule's `garbled`)


@dataclass
class LogUpload:
    """A result_url's content; `not_ready` 404s come first, like an S3 upload still running."""

    text: str
    not_ready: int


def _int_id(raw: str, error: ApiError) -> int:
    try:
        return int(raw)
    except ValueError:
        raise error from None


def _id_list(body: Mapping[str, Any], key: str, what: str) -> list[int]:
    """A batch call's ids: a non-empty list of integers, else the whole call is a 400."""
    ids = body.get(key)
    if not (isinstance(ids, list) and ids and all(type(i) is int for i in ids)):
        raise api_error(400, "invalid_args", f"{key} must be a non-empty list of {what} ids")
    return ids


def _key_from(body: Mapping[str, Any]) -> str:
    key = body.get("ssh_key")
    if not isinstance(key, str) or not key.strip():
        raise api_error(400, "no_ssh_key", "No ssh key provided")
    if not _SSH_KEY.match(key.strip()):
        raise api_error(400, "invalid_args", "Invalid ssh key: expected an OpenSSH public key")
    return key.strip()


class Market:
    """All state of one fake marketplace."""

    def __init__(
        self,
        catalog: Catalog,
        boot_seconds: float,
        state_root: Path,
        rtt_ms: float = 0.0,
        limits: RateLimits | None = None,
        restart_seconds: float | None = None,
    ) -> None:
        self.catalog = catalog
        self.faults = FaultBook(boot_seconds, rtt_ms, restart_seconds)
        self.limits = limits if limits is not None else RateLimits()
        self.traffic = TrafficCounter()
        self.round_trips = RoundTrips()
        self.state_root = state_root
        self._lock = threading.RLock()
        self._instances: dict[int, Instance] = {}
        self._taken_by_others: dict[int, float] = {}  # offer id -> until (epoch; inf: for good)
        self._keys: list[AccountKey] = []
        self._logs: dict[str, LogUpload] = {}
        self._api_calls: Counter[str] = Counter()
        self._requests: list[ApiCall] = []
        self._next_id = FIRST_INSTANCE_ID
        self._next_key_id = 1
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._ticker = threading.Thread(target=self._tick_loop, name="fakevast-ticker", daemon=True)

    # -- lifecycle of the market ----------------------------------------------------------------

    def start(self) -> None:
        self._ticker.start()

    def close(self) -> None:
        """Destroy every instance, then wait for boots in flight: nothing may outlive us."""
        self._stop.set()
        if self._ticker.is_alive():
            self._ticker.join()
        with self._lock:
            alive = [i.id for i in self._instances.values() if i.alive]
        for instance_id in alive:
            with contextlib.suppress(ApiError):
                self.destroy(str(instance_id), by="fake")
        for thread in list(self._threads):
            thread.join()

    def _tick_loop(self) -> None:
        while not self._stop.wait(TICK_SECONDS):
            self.tick()

    def tick(self) -> None:
        now = time.time()
        effects = Effects()
        with self._lock:
            timing = self.faults.timing()
            self._schedule(now)
            for instance in self._instances.values():
                instance.step(now, timing, effects)
                self._track_link(instance, effects)
        self._run(effects)

    def _schedule(self, now: float) -> None:
        """Each instance waiting to start takes its GPU once nobody holds it (first asked,
        first served: instances are kept in create order)."""
        taken = self._unavailable(now)
        for instance in self._instances.values():
            if instance.wants_gpu(now) and instance.offer["id"] not in taken:
                instance.take_gpu(now)
                taken.add(instance.offer["id"])

    def _track_link(self, instance: Instance, effects: Effects) -> None:
        """Queue the bandwidth cap and round-trip time in force for `instance` for its relays,
        when they differ from what the relays were last given; put its relays down or up:
        both while its container is not on (they would lead to a port another instance's sshd
        may hold by now), the proxy also as `proxy_down` says (a flag, set at once under the
        lock, so that no client sees the instance's status and its proxy disagree; going down
        also cuts live sessions)."""
        if not (instance.alive and instance.relays):
            return
        off = instance.power != "on"
        for relay, down in ((instance.proxy, off or instance.proxy_down), (instance.direct, off)):
            if relay is not None and relay.down != down:
                relay.down = down
                if down:
                    effects.cut.append(relay)
        rate = instance.bandwidth if instance.bandwidth is not None else self.faults.bandwidth
        if rate != instance.applied_bandwidth:
            instance.applied_bandwidth = rate
            effects.bandwidth.extend((relay, rate) for relay in instance.relays)
        rtt_ms = instance.rtt_ms if instance.rtt_ms is not None else self.faults.rtt_ms
        if rtt_ms != instance.applied_rtt_ms:
            instance.applied_rtt_ms = rtt_ms
            effects.rtt.extend((relay, rtt_ms) for relay in instance.relays)

    def _run(self, effects: Effects) -> None:
        for instance in effects.boot:
            self._spawn(self._boot_container, instance, "boot")
        for instance in effects.halt:
            self._spawn(self._halt, instance, "halt")
        for container in effects.kill_sshd:
            container.kill_sshd()
        for relay in effects.cut:
            relay.cut_connections()
        for relay, rate in effects.bandwidth:
            relay.set_bandwidth(rate)
        for relay, rtt_ms in effects.rtt:
            relay.set_rtt(rtt_ms)

    def _spawn(self, work: Callable[[Instance], None], instance: Instance, what: str) -> None:
        """Run `work` off the request and ticker threads; `close` waits for it."""
        thread = threading.Thread(
            target=self._tracked, args=(work, instance), name=f"fakevast-{what}-{instance.id}"
        )
        self._threads.append(thread)
        thread.start()

    def _tracked(self, work: Callable[[Instance], None], instance: Instance) -> None:
        try:
            work(instance)
        finally:
            self._threads.remove(threading.current_thread())

    def _halt(self, instance: Instance) -> None:
        """`docker stop` after a stop: every process dies, the files stay for a start."""
        with self._lock:
            container = instance.container
        if container is not None:
            try:
                container.halt()
            except ContainerError as error:
                print(f"fakevast: halting {instance.id}: {error}", file=sys.stderr)
        effects = Effects()
        with self._lock:
            instance.halted(time.time())
            self._track_link(instance, effects)  # its relays go down with it
        self._run(effects)

    def _boot_container(self, instance: Instance) -> None:
        """Start its container (made at its first boot), then publish its endpoints."""
        with self._lock:
            container = instance.container
        container = container or self._new_container(instance)
        if container is None:
            return
        try:
            container.start()
        except ContainerError as error:
            first_line = str(error).splitlines()[0]
            message = f"Error response from daemon: OCI runtime create failed: {first_line}"
            with self._lock:
                if instance.alive:
                    instance.boot_failed(time.time(), message)
            return
        self._publish(instance, container)

    def _new_container(self, instance: Instance) -> Container | None:
        """Its container, on a fresh state dir; None if it was destroyed meanwhile."""
        with self._lock:
            spec = ContainerSpec(
                instance_id=instance.id,
                image=instance.launch.image,
                ssh=instance.launch.ssh,
                onstart=instance.launch.onstart,
                args=instance.launch.args,
                env=instance.launch.variables,
                authorized_keys=list(instance.keys),
                main_env=instance.main_env,
            )
        state_dir = self.state_root / f"inst-{instance.id}"
        shutil.rmtree(state_dir, ignore_errors=True)
        container = Container(spec, state_dir)
        with self._lock:
            if not instance.alive:
                return None
            instance.container = container
            late_keys = instance.keys[len(spec.authorized_keys) :]
        for key in late_keys:
            container.add_authorized_key(key)
        return container

    def _publish(self, instance: Instance, container: Container) -> None:
        relays: list[Relay] = []
        proxy = direct = None
        if container.sshd_port is not None:
            target = ("127.0.0.1", container.sshd_port)
            proxy = Relay(target, instance.traffic, self.round_trips)
            relays.append(proxy)
            if instance.launch.wants_direct and instance.offer["direct_port_count"] > 0:
                direct = Relay(target, instance.traffic, self.round_trips)
                relays.append(direct)
        effects = Effects()
        with self._lock:
            if instance.alive:
                relays = instance.booted(time.time(), proxy, direct)
                if instance.actual_status != "running":  # stopped or lost while booting
                    effects.kill_sshd.append(container)
                self._track_link(instance, effects)
        self._run(effects)
        for relay in relays:  # its last run's, or these if it was destroyed while booting
            relay.close()

    # -- counters and the ledger ----------------------------------------------------------------

    def log_call(self, method: str, template: str, path: str) -> ApiCall:
        """Count an arriving /api/ request and log it; the caller fills in its status."""
        endpoint = f"{method} {template}"
        with self._lock:
            self._api_calls[endpoint] += 1
            call = ApiCall(time.time(), method, endpoint, path)
            self._requests.append(call)
            return call

    def log_answer(self, call: ApiCall, status: int, garbled: bool = False) -> None:
        with self._lock:
            call.status = status
            call.garbled = garbled

    def requests(self) -> dict[str, Any]:
        """The request log in arrival order; faults come and go, the log stays."""
        with self._lock:
            return {"requests": [asdict(call) for call in self._requests]}

    def ledger(self) -> dict[str, Any]:
        round_trip_times = self.round_trips.snapshot()
        now = time.time()
        with self._lock:
            return {
                "instances": [i.ledger_row(now) for i in self._instances.values()],
                "api_calls": dict(self._api_calls),
                "ssh_bytes": self.traffic.snapshot(),
                "ssh_round_trips": len(round_trip_times),
                "ssh_round_trip_times": round_trip_times,
                **self.limits.ledger(),
            }

    # -- faults ---------------------------------------------------------------------------------

    def set_faults(self, doc: Any) -> dict[str, Any]:
        try:
            update = parse_update(doc)
        except FaultError as error:
            raise api_error(400, "invalid_faults", str(error)) from None
        effects = Effects()
        now = time.time()
        with self._lock:
            for instance_id in update.instances:
                if instance_id not in self._instances or not self._instances[instance_id].alive:
                    raise api_error(400, "invalid_faults", f"no live instance {instance_id}")
            self.faults.apply(update)
            for instance_id, given in update.instances.items():
                self._instances[instance_id].arm(given, now)
            for instance in self._instances.values():
                if update.cut_connections and instance.alive:
                    effects.cut.extend(instance.relays)
                self._track_link(instance, effects)
        self._run(effects)
        self.tick()  # faults due at once happen before this call returns
        return self.faults_json()

    def clear_faults(self) -> dict[str, Any]:
        effects = Effects()
        with self._lock:
            self.faults.clear()
            for instance in self._instances.values():
                instance.disarm()
                self._track_link(instance, effects)
        self._run(effects)
        return self.faults_json()

    def faults_json(self) -> dict[str, Any]:
        with self._lock:
            pending = {
                str(i.id): [asdict(e) for e in i.events]
                for i in self._instances.values()
                if i.events
            }
        return {**self.faults.to_json(), "instances": pending}

    # -- offers and creates ---------------------------------------------------------------------

    def _unavailable(self, now: float) -> set[int]:
        """Offers whose GPU is not for rent: held by one of our instances (a stopped one's is
        free: docs.vast.ai, "Stopped instances have no GPU reservation"), or by someone else."""
        ours = {i.offer["id"] for i in self._instances.values() if i.holds_offer}
        return ours | {offer for offer, until in self._taken_by_others.items() if until > now}

    def search(self, body: Mapping[str, Any]) -> dict[str, Any]:
        with self._lock:
            unavailable = self._unavailable(time.time())
        return {"offers": self.catalog.search(body, unavailable)}

    def create(self, raw_offer_id: str, body: Mapping[str, Any]) -> dict[str, Any]:
        def not_available(offer_id: object) -> ApiError:
            msg = f"error 404/3603: no_such_ask Instance type by id {offer_id} is not available."
            return api_error(404, "invalid_args", msg, ask_id=offer_id)

        offer_id = _int_id(raw_offer_id, not_available(raw_offer_id))
        offer = self.catalog.offers.get(offer_id)
        if offer is None:
            raise not_available(offer_id)
        launch = parse_launch(body, offer)
        with self._lock:
            now = time.time()
            if offer_id in self._unavailable(now) or not offer["rentable"]:
                raise self._gone(offer_id)
            faults = self.faults.take_create(offer_id)
            if faults.gone:
                self._taken_by_others[offer_id] = math.inf
                raise self._gone(offer_id)
            instance = Instance(
                id=self._next_id,
                offer=offer,
                launch=launch,
                created_at=now,
                keys=[k.public_key for k in self._keys],
                request=dict(body),
                traffic=TrafficCounter(parent=self.traffic),
            )
            instance.arm({f.name: getattr(faults, f.name) for f in fields(InstanceFaults)}, now)
            self._next_id += 1
            self._instances[instance.id] = instance
        return {"success": True, "new_contract": instance.id}

    def create_many(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """``POST /asks/bulk/``: the same create body on every offer in `ids`. Each offer is
        answered as its own create would be (in `results`, with its `ask_id`); one offer's
        refusal does not stop the others."""
        ids = _id_list(body, "ids", "offer")
        results = []
        for offer_id in ids:
            try:
                answer = self.create(str(offer_id), body)
            except ApiError as error:
                answer = error.body
            results.append({**answer, "ask_id": offer_id})
        created = [r["new_contract"] for r in results if r.get("success")]
        return {"success": len(created) == len(ids), "new_contracts": created, "results": results}

    @staticmethod
    def _gone(offer_id: int) -> ApiError:
        msg = f"error 410/3907: no_such_ask Instance type {offer_id} is no longer available."
        return api_error(410, "no_such_ask", msg, ask_id=offer_id)

    # -- instances ------------------------------------------------------------------------------

    def _alive(self, raw_id: str, error: ApiError | None = None) -> Instance:
        error = error or no_such_instance(raw_id)
        instance = self._instances.get(_int_id(raw_id, error))
        if instance is None or not instance.alive:
            raise error
        return instance

    def _rows(self) -> list[dict[str, Any]]:
        now = time.time()
        rows = []
        for instance in self._instances.values():
            if instance.alive:
                rows.append(instance.row(now))
                instance.polled = True
        return rows

    def list_v1(self, query: Mapping[str, str]) -> dict[str, Any]:
        with self._lock:
            rows = self._rows()
        return list_page(rows, query)

    def list_v0(self) -> dict[str, Any]:
        with self._lock:
            return {"instances": self._rows()}

    def show(self, raw_id: str) -> dict[str, Any]:
        with self._lock:
            try:
                instance = self._alive(raw_id)
            except ApiError:
                return {"instances": None}
            instance.polled = True
            return {"instances": instance.row(time.time())}

    def container_key_owner(self, key: str) -> int | None:
        """The id of the instance (alive or destroyed) whose CONTAINER_API_KEY `key` is."""
        with self._lock:
            for instance in self._instances.values():
                if hmac.compare_digest(key.encode(), instance.container_api_key.encode()):
                    return instance.id
        return None

    def destroy(self, raw_id: str, by: str = "user") -> dict[str, Any]:
        """`by` is who asked, for the ledger: "user", "container" (its scoped key) or "fake"."""
        with self._lock:
            instance = self._alive(raw_id)
            instance.end(time.time(), by)
            container, relays = instance.container, instance.relays
        for relay in relays:
            relay.close()
        if container is not None:
            try:
                container.destroy()
            except ContainerError as error:
                print(f"fakevast: destroying {instance.id}: {error}", file=sys.stderr)
        return {"success": True, "msg": f"destroying instance {instance.id}."}

    def destroy_many(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """``DELETE /instances/`` with `instance_ids`: destroys each live one; the ids that
        are unknown or already gone are listed, not an error for the rest."""
        destroyed, not_found = [], []
        for instance_id in _id_list(body, "instance_ids", "instance"):
            try:
                self.destroy(str(instance_id))
            except ApiError:
                not_found.append(instance_id)
            else:
                destroyed.append(instance_id)
        return {
            "success": not not_found,
            "destroyed": destroyed,
            "not_found": not_found,
            "msg": f"destroying instances {destroyed}.",
        }

    def manage(self, raw_id: str, body: Mapping[str, Any], by: str = "user") -> dict[str, Any]:
        """``PUT /instances/{id}/``: dispatch on the body keys (label, or state). An instance's
        scoped key (`by` "container") may change its state but not its label. A stop halts the
        container and keeps its files; a start brings it back on them once it has its GPU."""
        if "label" in body and by == "container":
            raise forbidden("an instance's API key may change its state, not its label")
        if "label" in body:
            return self._label(raw_id, body["label"])
        state = body.get("state")
        if state not in ("running", "stopped"):
            raise api_error(400, "invalid_args", "expected 'label' or 'state': running|stopped")
        effects = Effects()
        with self._lock:
            instance = self._alive(raw_id)
            now = time.time()
            if state == "stopped" and instance.intended_status != "stopped":
                instance.stop(now, effects, "Instance stopped by user", by)
            elif state == "running" and instance.intended_status == "stopped":
                self._start(instance, now)
        self._run(effects)
        return {"success": True, "msg": f"instance {instance.id} set to {state}"}

    def _start(self, instance: Instance, now: float) -> None:
        """While it was stopped, another renter may have taken its GPU (the
        gpu_taken_while_stopped fault): it then waits for as long as they keep it."""
        until = self.faults.take_gpu(now)
        if until is not None:
            offer_id = instance.offer["id"]
            self._taken_by_others[offer_id] = max(until, self._taken_by_others.get(offer_id, 0))
        instance.request_start(now)

    def _label(self, raw_id: str, label: Any) -> dict[str, Any]:
        if label is not None and (not isinstance(label, str) or len(label) > 1024):
            raise api_error(400, "label_too_long", "label must be at most 1024 characters")
        with self._lock:
            instance = self._alive(raw_id)
            instance.label = label
        return {"success": True, "msg": f"label for {instance.id} set to '{label}'"}

    def change_bid(self, raw_id: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """``PUT /instances/bid_price/{id}/`` (the SDK's change_bid): an interruptible
        instance's bid becomes `price`, within the bounds a create's bid has."""
        price = body.get("price")
        with self._lock:
            instance = self._alive(raw_id)
            low = max(MIN_PRICE, instance.offer["min_bid"])
            if isinstance(price, bool) or not isinstance(price, int | float):
                raise api_error(400, "invalid_price", f"price must be a number, got {price!r}")
            if not low <= price <= MAX_PRICE:
                msg = f"bid price {price} is outside [{low}, {MAX_PRICE}]"
                raise api_error(400, "invalid_price", msg)
            if instance.launch.price is None:
                msg = f"instance {instance.id} is on demand: only an interruptible one has a bid"
                raise api_error(400, "invalid_args", msg)
            instance.change_bid(float(price))
        return {"success": True, "msg": f"bid price of instance {instance.id} set to {price}"}

    def reboot(self, raw_id: str) -> dict[str, Any]:
        effects = Effects()
        with self._lock:
            instance = self._alive(raw_id)
            if instance.actual_status == "running":
                instance.reboot(time.time(), effects)
                self._track_link(instance, effects)
        self._run(effects)
        return {"success": True}

    # -- ssh keys -------------------------------------------------------------------------------

    def attach(self, raw_id: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """Attach a key for later logins; with the `drop_attach` fault the answer is the same
        but the key is never installed (the race the earlier plugin's authors met on Vast)."""
        key = _key_from(body)
        with self._lock:
            instance = self._alive(raw_id)
            container = None
            if not instance.drop_attach:
                instance.keys.append(key)
                container = instance.container
        if container is not None:
            container.add_authorized_key(key)
        return {"success": True, "msg": "SSH key attached successfully"}

    def add_key(self, body: Mapping[str, Any]) -> dict[str, Any]:
        key = _key_from(body)
        with self._lock:
            record = AccountKey(self._next_key_id, key, datetime.now(UTC).isoformat())
            self._next_key_id += 1
            self._keys.append(record)
            containers = []
            for instance in self._instances.values():
                if instance.alive:
                    instance.keys.append(key)
                    if instance.container is not None:
                        containers.append(instance.container)
        for container in containers:
            container.add_authorized_key(key)
        return {
            "success": True,
            "key": {
                "id": record.id,
                "user_id": USER_ID,
                "public_key": record.public_key,
                "created_at": record.created_at,
                "deleted_at": None,
            },
        }

    def list_keys(self) -> list[dict[str, Any]]:
        with self._lock:
            return [
                {
                    "id": k.id,
                    "user_id": USER_ID,
                    "key": k.public_key,
                    "created_at": k.created_at,
                    "deleted_at": None,
                }
                for k in self._keys
            ]

    def delete_key(self, raw_id: str) -> dict[str, Any]:
        missing = api_error(404, "not_found", f"ssh key {raw_id} not found")
        key_id = _int_id(raw_id, missing)
        with self._lock:
            kept = [k for k in self._keys if k.id != key_id]
            if len(kept) == len(self._keys):
                raise missing
            self._keys = kept
        return {"success": True}

    # -- logs and the account -------------------------------------------------------------------

    def request_logs(self, raw_id: str, body: Mapping[str, Any], base_url: str) -> dict[str, Any]:
        with self._lock:
            instance = self._alive(raw_id, api_error(404, "invalid_id", "Invalid instance id."))
            container = instance.container
            daemon_says = instance.status_msg or ""
        # Before its container runs, an instance's log is what the host's daemon says of it
        # (the image pull, or Docker's error), as Vast shows it.
        text = container.log_text() if container else daemon_says
        lines = text.splitlines(keepends=True)
        pattern = body.get("filter")
        if pattern:
            lines = [line for line in lines if str(pattern) in line]
        tail = body.get("tail")
        with contextlib.suppress(TypeError, ValueError):
            lines = lines[-int(tail) :] if tail is not None and int(tail) > 0 else lines
        token = secrets.token_hex(16)
        with self._lock:
            self._logs[token] = LogUpload("".join(lines), self.faults.logs_not_ready)
        return {
            "success": True,
            "result_url": f"{base_url}/_fake/logs/{token}.log",
            "msg": "Log request queued; the logs will be at result_url shortly.",
        }

    def fetch_log(self, name: str) -> str | None:
        """The uploaded text, or None while it is 'not uploaded yet' or unknown (S3's 404)."""
        with self._lock:
            upload = self._logs.get(name.removesuffix(".log"))
            if upload is None:
                return None
            if upload.not_ready > 0:
                upload.not_ready -= 1
                return None
            return upload.text

    def user(self) -> dict[str, Any]:
        now = time.time()
        with self._lock:
            spent = sum(i.cost(now) for i in self._instances.values())
            first_key = self._keys[0].public_key if self._keys else None
        balance = round(STARTING_CREDIT - spent, 6)
        return {
            "id": USER_ID,
            "username": "fakevast",
            "email": "fakevast@example.com",
            "fullname": "Fake Vast User",
            "balance": balance,
            "credit": balance,
            "ssh_key": first_key,
            "sid": "fakevast-session",
            "key_id": 1,
            "can_pay": balance > 0,
            "has_billing": True,
        }
