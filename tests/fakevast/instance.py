"""One rented instance: its state as the API reports it, the timeline it follows, and its faults.

Everything here runs under the market's lock and never blocks: work on processes and sockets
(starting the container, killing sshd, cutting relays) is returned to the market as `Effects`
to run after the lock is released.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from .catalog import storage_per_hour
from .container import Container
from .faults import Delay, PriceRise
from .launch import LaunchSpec
from .relay import Relay, TrafficCounter

BYTES_PER_GB = 1e9  # inet_up_cost / inet_down_cost are $/GB
# The first poll still sees actual_status null (vast-api.md §4: "after about 1-2 polls").
LOADING_AFTER_SECONDS = 0.3
REBOOT_SECONDS = 1.0
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
    running_at: float | None = None
    ended_at: float | None = None
    polled: bool = False
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
        self.dph_total = self.dph_base + storage_per_hour(self.offer, self.launch.disk)
        self.label = self.launch.label

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

    def step(self, now: float, boot_seconds: float, effects: Effects) -> None:
        """Advance null -> loading -> (boot) and fire due fault events."""
        if not self.alive:
            return
        waited = self.polled or now - self.created_at >= LOADING_AFTER_SECONDS
        if self.actual_status is None and self.intended_status == "running" and waited:
            self._start_loading()
        if (
            self.actual_status == "loading"
            and not self.boot_decided
            and not self.stuck_loading
            and now - self.created_at >= boot_seconds
        ):
            self.boot_decided = True
            if self.boot_failure is None:
                effects.boot.append(self)
            elif _CREATE_FAILURE in self.boot_failure.lower():
                self.fail_create(self.boot_failure)
        if self.reboot_until is not None and now >= self.reboot_until:
            self.reboot_until = None
            if self.actual_status == "rebooting":
                self.actual_status = "running"
        if self.actual_status == "running" and self.container and not self.container.is_running():
            self.actual_status = "exited"
        for event in [e for e in self.events if e.due(now, self.running_at)]:
            self.events.remove(event)
            self._fire(event, effects)

    def _start_loading(self) -> None:
        self.actual_status = "loading"
        failure = self.boot_failure
        pull_failure = failure is not None and _CREATE_FAILURE not in failure.lower()
        self.status_msg = failure if pull_failure else f"Pulling image {self.launch.image}"

    def _fire(self, event: Event, effects: Effects) -> None:
        if event.kind == "price_rise" and event.dph_total is not None:
            self.dph_total = event.dph_total
            self.dph_base = event.dph_total - storage_per_hour(self.offer, self.launch.disk)
        elif event.kind == "cut_connections":
            effects.cut.extend(self.relays)
        elif event.kind == "offline":
            self.actual_status = "offline"
            self.status_msg = "Host is offline: no heartbeat"
            self._lose_sshd(effects)
        elif event.kind == "stopped":
            self.stop(effects, "Instance stopped: outbid by a higher bid", by="fake")

    def _lose_sshd(self, effects: Effects) -> None:
        if self.container is not None:
            effects.kill_sshd.append(self.container)
        effects.cut.extend(self.relays)

    def stop(self, effects: Effects, why: str, by: str) -> None:
        """Outbid or stopped by the user: every state field says stopped; sshd goes away."""
        self.actual_status = self.cur_state = self.intended_status = self.next_state = "stopped"
        self.status_msg = why
        self.stopped_by = by
        self._lose_sshd(effects)

    def resume_before_boot(self) -> None:
        """A start after a stop, for an instance whose container never started."""
        self.intended_status = self.cur_state = self.next_state = "running"
        self.actual_status = None
        self.status_msg = None

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
        self.dph_total = price + storage_per_hour(self.offer, self.launch.disk)

    def fail_create(self, message: str) -> None:
        """The container could not be created/started: stays `created` with Docker's error."""
        self.actual_status = "created"
        self.status_msg = message

    def mark_running(self, now: float, proxy: Relay | None, direct: Relay | None) -> None:
        self.proxy, self.direct = proxy, direct
        self.running_at = now
        self.actual_status = "running"
        suffix = "ssh" if self.launch.ssh else "args"
        self.status_msg = f"success, running {self.launch.image.replace(':', '_')}/{suffix}"

    def end(self, now: float, by: str) -> None:
        self.ended_at = now
        self.destroyed_by = by
        self.events.clear()

    def cost(self, now: float) -> float:
        """Dollars accrued at the current price since creation (an approximation)."""
        return self.dph_total * ((self.ended_at or now) - self.created_at) / 3600

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
        has_ports = self.running_at is not None and self.actual_status not in ("stopped", "exited")
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
            "uptime_mins": (now - self.running_at) / 60 if self.running_at else None,
            "disk_space": self.launch.disk,
            "dph_base": self.dph_base,
            "dph_total": self.dph_total,
            "storage_total_cost": storage_per_hour(offer, self.launch.disk),
            "is_bid": self.launch.price is not None,
            "jupyter_token": self.jupyter_token,
            "template_id": None,
            "template_hash_id": None,
            "volume_info": [],
        }

    def ledger_row(self) -> dict[str, Any]:
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
            "image": self.launch.image,
            "create_request": dict(self.request),
            "extra_env": [[k, v] for k, v in self.launch.env.items()],
            "created_at": self.created_at,
            "running_at": self.running_at,
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
