"""One rented instance: its state as the API reports it, the timeline it follows, and its faults.

Everything here runs under the market's lock and never blocks: work on processes and sockets
(starting or halting the container, killing sshd, cutting relays) is returned to the market as
`Effects` to run after the lock is released.

Billing follows the stop tier: an instance pays its GPU (`dph_base`) while it holds the GPU,
from create (or the moment a start gets the GPU back) until its container has halted after a
stop, and its storage (`storage_total_cost`) from create to destroy, stopped or not.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from .catalog import storage_per_hour
from .container import Container
from .faults import Delay, PriceRise, Timing
from .launch import LaunchSpec
from .relay import Relay, TrafficCounter

BYTES_PER_GB = 1e9  # inet_up_cost / inet_down_cost are $/GB
# The first poll still sees actual_status null (vast-api.md §4: "after about 1-2 polls").
LOADING_AFTER_SECONDS = 0.3
REBOOT_SECONDS = 1.0
# The API answers a stop at once and the host's daemon acts on it a moment later (a watchdog
# stopping its own instance from inside must still read the answer); then `docker stop` kills
# every process. Vast.ai gives no figure: 0.5 s, during which the GPU is still billed.
HALT_AFTER_SECONDS = 0.5
# A start waits for the GPU first: docs.vast.ai ("vastai start instance") calls it the
# "scheduling" state; §4 lists no such actual_status, so it stays "stopped" meanwhile.
SCHEDULING_MSG = "Scheduling: waiting for the instance's GPU to be free"
RESTART_MSG = "Starting container: its image is on the machine already"
# Whether the container's processes run: "off" (not yet booted, halted, or failed to start),
# or a boot or halt thread is under way.
Power = Literal["off", "booting", "on", "halting"]
_CREATE_FAILURE = "oci runtime create failed"
# Hardware fields an instance row copies from the offer it was rented from.
MACHINE_FIELDS = (
    "machine_id",
    "host_id",
    "bundle_id",
    "num_gpus",
    "gpu_name",
    "gpu_arch",
    "gpu_ram",
    "gpu_frac",
    "gpu_mem_bw",
    "bw_nvlink",
    "compute_cap",
    "cpu_arch",
    "cpu_name",
    "cpu_cores",
    "cpu_cores_effective",
    "cpu_ghz",
    "cpu_ram",
    "cuda_max_good",
    "driver_version",
    "disk_bw",
    "disk_name",
    "dlperf",
    "total_flops",
    "storage_cost",
    "min_bid",
    "inet_down",
    "inet_up",
    "inet_down_cost",
    "inet_up_cost",
    "reliability2",
    "geolocation",
    "hosting_type",
    "verification",
    "direct_port_count",
    "static_ip",
    "has_avx",
    "mobo_name",
    "pci_gen",
    "pcie_bw",
    "ubuntu_version",
    "end_date",
)


@dataclass
class Event:
    """A one-shot fault waiting to happen to this instance."""

    kind: str  # "offline" | "stopped" | "price_rise" | "cut_connections"
    after_seconds: float
    armed_at: float
    dph_total: float | None = None

    def due(self, now: float, running_at: float | None) -> bool:
        """Price rises count from arming; the others also wait for the instance to run."""
        if self.kind == "price_rise":
            return now >= self.armed_at + self.after_seconds
        if running_at is None:
            return False
        return now >= max(self.armed_at, running_at) + self.after_seconds


@dataclass
class Effects:
    """Blocking work decided under the lock, done after it is released."""

    boot: list[Instance] = field(default_factory=list)
    halt: list[Instance] = field(default_factory=list)
    kill_sshd: list[Container] = field(default_factory=list)
    cut: list[Relay] = field(default_factory=list)
    bandwidth: list[tuple[Relay, float | None]] = field(default_factory=list)
    rtt: list[tuple[Relay, float]] = field(default_factory=list)


@dataclass(eq=False)
class Instance:
    id: int
    offer: Mapping[str, Any]  # the offer as priced when it was rented
    launch: LaunchSpec
    created_at: float
    keys: list[str]  # account keys at create time plus every key pushed or attached since
    request: Mapping[str, Any] = field(default_factory=dict)  # the create's body, as sent
    traffic: TrafficCounter = field(default_factory=TrafficCounter)  # its relays' bytes
    dph_base: float = field(init=False)
    dph_total: float = field(init=False)
    label: str | None = field(init=False)
    actual_status: str | None = None
    intended_status: str = "running"
    cur_state: str = "running"
    next_state: str = "running"
    status_msg: str | None = None
    running_at: float | None = None  # when it first ran
    restarted_at: float | None = None  # when a start last brought it back to running
    ended_at: float | None = None
    polled: bool = False  # shown since it was created or last asked to start
    asked_at: float = field(init=False)  # its create, or the last start of it stopped
    scheduled_at: float = field(init=False)  # when it got its GPU: its boot counts from then
    power: Power = "off"
    halt_at: float | None = None  # a stop's `docker stop` is due then
    gpu_since: float | None = field(init=False)  # holds (and pays) its GPU since; None: not
    gpu_seconds: float = 0.0  # GPU time paid before `gpu_since`
    host_lost: bool = False  # the `offline` fault: it never runs again
    outbid: bool = False  # the `stopped` fault: a higher bid holds its GPU for good
    boot_decided: bool = False  # the boot was started, or it failed for good
    boot_failure: str | None = None
    stuck_loading: bool = False
    drop_attach: bool = False  # key attaches answer success but install nothing
    proxy_down: bool = False  # the proxy relay closes every connection, until a reboot
    container: Container | None = None
    proxy: Relay | None = None
    direct: Relay | None = None
    events: list[Event] = field(default_factory=list)
    bandwidth: float | None = None  # this instance's cap; None follows the marketplace's
    applied_bandwidth: float | None = None  # what its relays were last set to
    rtt_ms: float | None = None  # this instance's round-trip time; None follows the marketplace's
    applied_rtt_ms: float | None = None  # what its relays were last set to
    reboot_until: float | None = None
    jupyter_token: str = field(default_factory=lambda: secrets.token_hex(32))
    # Vast.ai's scoped per-instance key: in the main process's env as CONTAINER_API_KEY, and
    # good (as a Bearer token) for showing, stopping/starting and destroying this instance only.
    container_api_key: str = field(default_factory=lambda: secrets.token_hex(32))
    # Who ended it / last stopped it: "user" (the user's key), "container" (its own scoped
    # key) or "fake" (the fake's shutdown; an outbid `stopped` fault); None if it did not happen.
    destroyed_by: str | None = None
    stopped_by: str | None = None

    def __post_init__(self) -> None:
        price = self.launch.price
        self.dph_base = self.offer["dph_base"] if price is None else price
        self.dph_total = self.dph_base + self.storage_dph
        self.label = self.launch.label
        self.asked_at = self.scheduled_at = self.created_at
        self.gpu_since = self.created_at

    @property
    def storage_dph(self) -> float:
        """Its disk's price per hour, the API's `storage_total_cost`."""
        return storage_per_hour(self.offer, self.launch.disk)

    @property
    def alive(self) -> bool:
        return self.ended_at is None

    @property
    def main_env(self) -> dict[str, str]:
        """What Vast.ai puts into the environment of the container's main process only."""
        return {"CONTAINER_ID": str(self.id), "CONTAINER_API_KEY": self.container_api_key}

    @property
    def relays(self) -> list[Relay]:
        return [relay for relay in (self.proxy, self.direct) if relay is not None]

    @property
    def holds_offer(self) -> bool:
        """Its offer's GPU is not for rent: it holds it, or lost it to a higher bid or with its
        host."""
        return self.alive and (self.gpu_since is not None or self.outbid or self.host_lost)

    # -- faults ---------------------------------------------------------------------------------

    def arm(self, given: Mapping[str, Any], now: float) -> None:
        """Attach instance faults (InstanceFaults field names); None removes a pending one."""
        for key, value in given.items():
            if key in (
                "boot_failure",
                "stuck_loading",
                "bandwidth",
                "rtt_ms",
                "drop_attach",
                "proxy_down",
            ):
                setattr(self, key, value)
                continue
            self.events = [e for e in self.events if e.kind != key]
            if isinstance(value, Delay):
                self.events.append(Event(key, value.after_seconds, now))
            elif isinstance(value, PriceRise):
                self.events.append(Event(key, value.after_seconds, now, value.dph_total))
            elif value is True:  # cut_connections
                self.events.append(Event(key, 0.0, now))

    def disarm(self) -> None:
        """Drop the faults that have not happened yet (boot outcomes already decided stay)."""
        self.events.clear()
        self.bandwidth = None
        self.rtt_ms = None
        self.drop_attach = False  # later attaches work again; keys already dropped stay so
        self.proxy_down = False
        if not self.boot_decided:
            self.boot_failure = None
            self.stuck_loading = False

    # -- timeline -------------------------------------------------------------------------------

    def step(self, now: float, timing: Timing, effects: Effects) -> None:
        """Advance null -> loading -> (boot), halt a stopped container when due, and fire due
        fault events."""
        if not self.alive:
            return
        if self.actual_status is None and self.intended_status == "running" and self._waited(now):
            self._start_loading()
        if self._boot_due(now, timing):
            self._boot(effects)
        if self.power == "on" and self.halt_at is not None and now >= self.halt_at:
            self.power, self.halt_at = "halting", None
            effects.halt.append(self)
        if self.reboot_until is not None and now >= self.reboot_until:
            self.reboot_until = None
            if self.actual_status == "rebooting":
                self.actual_status = "running"
        if self.actual_status == "running" and self.container and not self.container.is_running():
            self.actual_status = "exited"
        for event in [e for e in self.events if e.due(now, self.running_at)]:
            self.events.remove(event)
            self._fire(event, now, effects)

    def _waited(self, now: float) -> bool:
        """Past the first poll after its create or start (vast-api.md §4: "1-2 polls")."""
        return self.polled or now - self.asked_at >= LOADING_AFTER_SECONDS

    def _boot_due(self, now: float, timing: Timing) -> bool:
        """A restart needs its start only; a first boot pulls the image too, and waits while
        its faults say it is stuck or has failed."""
        if self.actual_status != "loading" or self.power != "off":
            return False
        if self.container is not None:
            return now >= self.scheduled_at + timing.restart_seconds
        late = now >= self.scheduled_at + timing.boot_seconds
        return late and not self.boot_decided and not self.stuck_loading

    def _boot(self, effects: Effects) -> None:
        """Start its container, unless its first boot fails as its boot_failure says."""
        if self.container is None:
            self.boot_decided = True
            if self.boot_failure is not None:
                if _CREATE_FAILURE in self.boot_failure.lower():
                    self.fail_create(self.boot_failure)
                return
        self.power = "booting"
        effects.boot.append(self)

    def _start_loading(self) -> None:
        self.actual_status = "loading"
        failure = self.boot_failure
        pull_failure = failure is not None and _CREATE_FAILURE not in failure.lower()
        self.status_msg = failure if pull_failure else f"Pulling image {self.launch.image}"

    def _fire(self, event: Event, now: float, effects: Effects) -> None:
        if event.kind == "price_rise" and event.dph_total is not None:
            self.dph_total = event.dph_total
            self.dph_base = event.dph_total - self.storage_dph
        elif event.kind == "cut_connections":
            effects.cut.extend(self.relays)
        elif event.kind == "offline":
            self.actual_status = "offline"
            self.status_msg = "Host is offline: no heartbeat"
            self.host_lost = True
            self._lose_sshd(effects)
        elif event.kind == "stopped":
            self.stop(now, effects, "Instance stopped: outbid by a higher bid", by="fake")
            self.outbid = True

    def _lose_sshd(self, effects: Effects) -> None:
        if self.container is not None:
            effects.kill_sshd.append(self.container)
        effects.cut.extend(self.relays)

    def stop(self, now: float, effects: Effects, why: str, by: str) -> None:
        """Outbid or stopped by the user: every state field says stopped (a lost host stays
        offline) and sshd goes away at once; every other process HALT_AFTER_SECONDS later."""
        self.cur_state = self.intended_status = self.next_state = "stopped"
        if not self.host_lost:
            self.actual_status, self.status_msg = "stopped", why
        self.stopped_by = by
        self._lose_sshd(effects)
        if self.power == "off":
            self._release_gpu(now)
        elif self.power != "halting":
            self.halt_at = now + HALT_AFTER_SECONDS

    def halted(self, now: float) -> None:
        """Its container's processes are gone: from now on it pays its storage only."""
        self.power = "off"
        self._release_gpu(now)

    def _release_gpu(self, now: float) -> None:
        if self.gpu_since is not None:
            self.gpu_seconds += now - self.gpu_since
            self.gpu_since = None

    def request_start(self, now: float) -> None:
        """A start of a stopped instance: it waits, still `stopped`, for its GPU."""
        self.intended_status = self.next_state = "running"
        self.asked_at, self.polled = now, False
        if not self.host_lost:
            self.status_msg = SCHEDULING_MSG

    def wants_gpu(self, now: float) -> bool:
        """Asked to start, halted, and past the first poll: it takes its GPU once that is free
        (never after losing it to a higher bid or with its host)."""
        return (
            self.alive
            and self.intended_status == "running"
            and self.gpu_since is None
            and self.power == "off"
            and not (self.outbid or self.host_lost)
            and self._waited(now)
        )

    def take_gpu(self, now: float) -> None:
        """Its GPU is its own again: loading, then a restart (or, never booted, a first boot)."""
        self.gpu_since = self.scheduled_at = now
        self.cur_state = "running"
        if self.container is None:
            self.boot_decided = False  # its first boot runs again, faults and all
            self._start_loading()
        else:
            self.actual_status, self.status_msg = "loading", RESTART_MSG

    def reboot(self, now: float, effects: Effects) -> None:
        """Cuts live connections and reports `rebooting` for a while; a proxy tunnel that was
        down (`proxy_down`) comes up, as a reboot re-registers the instance with the proxy."""
        self.actual_status = "rebooting"
        self.reboot_until = now + REBOOT_SECONDS
        self.proxy_down = False
        effects.cut.extend(self.relays)

    def change_bid(self, price: float) -> None:
        """A new bid: the price it rents at from now on (the ledger's bid_price too)."""
        self.launch = replace(self.launch, price=price)
        self.dph_base = price
        self.dph_total = price + self.storage_dph

    def fail_create(self, message: str) -> None:
        """The container could not be created/started: stays `created` with Docker's error."""
        self.actual_status = "created"
        self.status_msg = message

    def booted(self, now: float, proxy: Relay | None, direct: Relay | None) -> list[Relay]:
        """Its container is up with these relays; running unless stopped meanwhile. Returns
        the relays of its last run, to close."""
        replaced = self.relays
        self.proxy, self.direct = proxy, direct
        self.applied_bandwidth = self.applied_rtt_ms = None  # new relays: set them again
        self.power = "on"
        if self.actual_status == "loading":
            self._mark_running(now)
        return replaced

    def boot_failed(self, now: float, message: str) -> None:
        """Its container did not start: Docker's error if it was loading; if it was stopped
        meanwhile, it is simply off."""
        self.power, self.halt_at = "off", None
        if self.actual_status == "loading":
            self.fail_create(message)
        else:
            self._release_gpu(now)

    def _mark_running(self, now: float) -> None:
        if self.running_at is None:
            self.running_at = now
        else:
            self.restarted_at = now
        self.actual_status = "running"
        suffix = "ssh" if self.launch.ssh else "args"
        self.status_msg = f"success, running {self.launch.image.replace(':', '_')}/{suffix}"

    def end(self, now: float, by: str) -> None:
        self.ended_at = now
        self.destroyed_by = by
        self.events.clear()
        self._release_gpu(now)

    def gpu_cost(self, now: float) -> float:
        """GPU dollars at the current dph_base (an approximation) for every second it held its
        GPU: a stopped instance pays no GPU (vast-api.md §4: "Only disk is billed")."""
        held = self.gpu_seconds + (now - self.gpu_since if self.gpu_since is not None else 0.0)
        return self.dph_base * held / 3600

    def disk_cost(self, now: float) -> float:
        """Storage dollars from create to destroy, stopped included (vast-api.md §10)."""
        return self.storage_dph * ((self.ended_at or now) - self.created_at) / 3600

    def cost(self, now: float) -> float:
        """Its whole bill: GPU, storage and bandwidth."""
        return self.gpu_cost(now) + self.disk_cost(now) + self.bandwidth_cost()

    def bandwidth_cost(self) -> float:
        """Dollars for the bytes its SSH relays carried, in any state (vast-api.md §10): into
        the instance at the offer's inet_down_cost, out of it at inet_up_cost, per GB."""
        moved = self.traffic.snapshot()
        into, out = moved["up"], moved["down"]
        offer = self.offer
        dollars = into * (offer["inet_down_cost"] or 0.0) + out * (offer["inet_up_cost"] or 0.0)
        return dollars / BYTES_PER_GB

    def ram_share_mb(self) -> float:
        """Its RAM: the machine's (`cpu_ram`) times its share of the machine (`gpu_frac`)."""
        return self.offer["cpu_ram"] * self.offer["gpu_frac"]

    # -- how the API shows it -------------------------------------------------------------------

    def row(self, now: float) -> dict[str, Any]:
        """The instance object of vast-api.md §3.4."""
        offer = self.offer
        ssh_port = self.proxy.port if self.proxy else None
        direct_port = self.direct.port if self.direct else None
        has_ports = self.power == "on" and self.actual_status not in ("stopped", "exited")
        up_since = self.restarted_at or self.running_at  # the container's uptime, as Docker's
        ports: dict[str, Any] = {}
        if has_ports and direct_port is not None:
            ports["22/tcp"] = [{"HostIp": "0.0.0.0", "HostPort": str(direct_port)}]
        return {
            **{key: offer.get(key) for key in MACHINE_FIELDS},
            "id": self.id,
            "actual_status": self.actual_status,
            "intended_status": self.intended_status,
            "cur_state": self.cur_state,
            "next_state": self.next_state,
            "status_msg": self.status_msg,
            "label": self.label,
            "image_uuid": self.launch.image,
            "image_runtype": self.launch.runtype,
            "image_args": list(self.launch.args or []),
            "onstart": self.launch.onstart,
            "extra_env": [[k, v] for k, v in self.launch.env.items()],
            "ssh_host": "127.0.0.1" if ssh_port else None,
            "ssh_port": ssh_port,
            "ssh_idx": "1" if ssh_port else None,
            "public_ipaddr": "127.0.0.1" if self.running_at is not None else None,
            "local_ipaddrs": "127.0.0.1",
            "ports": ports,
            "direct_port_start": direct_port or -1,
            "direct_port_end": direct_port or -1,
            "gpu_totalram": offer.get("gpu_total_ram"),
            "gpu_util": 0.0 if self.actual_status == "running" else None,
            "gpu_temp": 38.0 if self.actual_status == "running" else None,
            "start_date": float(self.created_at),
            "duration": now - self.created_at,
            "uptime_mins": (now - up_since) / 60 if up_since else None,
            "disk_space": self.launch.disk,
            "dph_base": self.dph_base,
            "dph_total": self.dph_total,
            "storage_total_cost": self.storage_dph,
            "is_bid": self.launch.price is not None,
            "jupyter_token": self.jupyter_token,
            "template_id": None,
            "template_hash_id": None,
            "volume_info": [],
        }

    def ledger_row(self, now: float) -> dict[str, Any]:
        return {
            "id": self.id,
            "label": self.label,
            "offer_id": self.offer["id"],
            "machine_id": self.offer.get("machine_id"),
            "min_bid": self.offer.get("min_bid"),
            "bid_price": self.launch.price,  # None: on demand
            "gpu_name": self.offer["gpu_name"],
            "num_gpus": self.offer["num_gpus"],
            "dph_total": self.dph_total,
            "dph_base": self.dph_base,
            "storage_total_cost": self.storage_dph,
            "gpu_held": self.gpu_since is not None,
            "gpu_cost": self.gpu_cost(now),
            "disk_cost": self.disk_cost(now),
            "cost": self.cost(now),
            "image": self.launch.image,
            "create_request": dict(self.request),
            "extra_env": [[k, v] for k, v in self.launch.env.items()],
            "created_at": self.created_at,
            "running_at": self.running_at,
            "restarted_at": self.restarted_at,
            "ended_at": self.ended_at,
            "status": self.actual_status if self.alive else "destroyed",
            "destroyed_by": self.destroyed_by,
            "stopped_by": self.stopped_by,
            "gpu_frac": self.offer["gpu_frac"],
            "cpu_cores": self.offer["cpu_cores"],
            "cpu_cores_effective": self.offer["cpu_cores_effective"],
            "cpu_ram": self.offer["cpu_ram"],
            "ram_share_mb": self.ram_share_mb(),
            "ssh_bytes": self.traffic.snapshot(),
            "inet_up_cost": self.offer["inet_up_cost"],
            "inet_down_cost": self.offer["inet_down_cost"],
            "bandwidth_cost": self.bandwidth_cost(),
        }
