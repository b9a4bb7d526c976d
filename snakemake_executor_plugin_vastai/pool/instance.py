"""One rented instance: what the run knows of it, and the steps that concern it alone (reading
its boot progress, first SSH login, bootstrap). Its state changes only through the
:class:`~snakemake_executor_plugin_vastai.pool.table.InstanceTable`, under the table's lock.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from snakemake_executor_plugin_vastai.base.errors import HostError
from snakemake_executor_plugin_vastai.market.marketplace import InstanceInfo, Offer
from snakemake_executor_plugin_vastai.market.request import Signature
from snakemake_executor_plugin_vastai.pool.ledger import billed_dollars
from snakemake_executor_plugin_vastai.pool.slots import SlotBook
from snakemake_executor_plugin_vastai.pool.states import State
from snakemake_executor_plugin_vastai.remote.bootstrap import (
    INSTALLED_MARKER,
    SCRIPT_COMMAND,
    BootstrapPlan,
    explain_failure,
)
from snakemake_executor_plugin_vastai.remote.ssh import (
    Endpoint,
    RemoteError,
    RemoteHost,
    load_private_key,
)
from snakemake_executor_plugin_vastai.remote.sshkey import RunKey
from snakemake_executor_plugin_vastai.remote.staging import InstanceFiles

BYTES_PER_GB = 1e9  # Vast.ai's bandwidth prices are per GB (decimal, as the fake bills)


class InstanceFailure(HostError):
    """The instance cannot run jobs (boot failed, host lost, bootstrap failed)."""


@dataclass(eq=False)
class Instance:
    label: str
    signature: Signature  # what was asked for; what the machine has once the offer is known
    state: State = State.RENTING
    offer: Offer | None = None
    dph_total: float = 0.0  # counted toward the price caps from the moment it is reserved
    slots: SlotBook | None = None
    instance_id: int | None = None
    info: InstanceInfo | None = None
    host: RemoteHost | None = None
    files: InstanceFiles = field(default_factory=InstanceFiles)
    rented_at: float = field(default_factory=lambda: time.time())  # freezable in tests
    born_at: float | None = None  # first rented, by an earlier run that kept it (adopted)
    kept_until: float | None = None  # kept warm past the run until then (--vastai-keep-warm)
    stopped_at: float | None = None  # stopped by the run (and not started again) since then
    started_at: float | None = None  # the last start of it stopped (its boot counts from here)
    seen_stopped_at: float | None = None  # the last list row since that start still said so
    resumed_at: float | None = None  # when its GPU billed again after its last stop
    stopped_seconds: float = 0.0  # time spent stopped before that: billed for its disk only
    earlier_data_dollars: float = 0.0  # bandwidth of its SSH connections before its last stop
    created_at: float | None = None  # the create answered: Vast.ai made it a moment before
    running_at: float | None = None
    gone_at: float | None = None  # confirmed gone, or kept past the run: off its bill
    last_released_at: float | None = None
    jobs_run: int = 0
    busy_since: float | None = None
    busy_seconds: float = 0.0
    price_warned: bool = False
    vanished: bool = False  # listed once, then no longer: destroyed outside this run
    deadman: float = 0.0  # its dead-man switch's period, once the bootstrap armed it; 0: none
    heartbeat_at: float | None = None  # when this run last gave it a sign of life
    silence_at_loss: float | None = None  # this run's silence when it vanished, past deadman
    failure: str | None = None  # why it could not be prepared: told to the jobs waiting on it
    machine_fault: bool = False  # it failed to boot through its machine: jobs may boot elsewhere
    retiring: str | None = None  # why it takes no new job and goes once its jobs are done
    creating: bool = False  # its create request has been sent (renting: an answer is due)
    unknown_since: float | None = None  # when its create's answer was lost
    list_misses: int = 0  # list rounds that did not show it (while unknown)
    presumed_absent: bool = False  # unknown, and list rounds have missed it long enough
    destroy_error: str | None = None  # the last failed destroy; retried until confirmed
    boot_log: str | None = None  # its log's last lines, once fetched for a boot error

    @property
    def name(self) -> str:
        gpu = self.offer.gpu_name if self.offer else "?"
        return f"instance {self.instance_id or '?'} ({gpu}, {self.label})"

    def priced(self, offer: Offer, capacity_signature: Signature, exclusive: bool) -> None:
        """The offer this reservation will rent: its price counts from now on."""
        self.offer = offer
        self.dph_total = offer.dph_total
        self.signature = capacity_signature
        self.slots = SlotBook(offer.capacity(capacity_signature.disk_gb), exclusive=exclusive)

    def cost(self, now: float) -> float:
        """Dollars so far: its time at its $/h (at its disk's price while stopped), and the
        bytes it moved."""
        if self.instance_id is None and self.state is not State.UNKNOWN:
            return 0.0
        end = self.gone_at if self.gone_at is not None else now
        running = billed_dollars(self.rented_at, end, self.dph_total)
        return running - self.stop_saving(end) + self.data_cost()

    def stopped_for(self, now: float) -> float:
        """Seconds it has spent stopped, up to ``now``."""
        current = now - self.stopped_at if self.stopped_at is not None else 0.0
        return self.stopped_seconds + max(0.0, current)

    def stop_saving(self, now: float) -> float:
        """What its stops took off the bill: the GPU's part of its price while stopped."""
        storage = self.offer.storage_dph if self.offer else 0.0
        return billed_dollars(0.0, self.stopped_for(now), max(0.0, self.dph_total - storage))

    def data_cost(self) -> float:
        """What its bandwidth cost: Vast.ai bills each byte at the offer's $/GB, into the
        instance at inet_down_cost and out of it at inet_up_cost."""
        if self.host is None or self.offer is None:
            return self.earlier_data_dollars
        traffic = self.host.traffic
        up = traffic.received * self.offer.inet_up_cost
        return self.earlier_data_dollars + (traffic.sent * self.offer.inet_down_cost + up) / (
            BYTES_PER_GB
        )

    def stopped(self, now: float) -> None:
        """Stopped by the run: its connection goes (its sshd is gone), its bytes so far stay
        counted, and from ``now`` it bills its disk only. Call with the table's lock held."""
        self.earlier_data_dollars = self.data_cost()
        host, self.host = self.host, None
        if host is not None:  # a close may wait on a reconnect: never under the lock
            threading.Thread(target=host.close, name="vastai-ssh-close", daemon=True).start()
        self.stopped_at = now
        self.started_at = self.seen_stopped_at = None  # no start of this stop yet

    def started(self, now: float) -> None:
        """Asked to run again: its row must be read afresh (the last one says stopped). It
        bills its disk only until a row shows it off ``stopped`` (see `observe`): a start
        waits for the machine's GPU, and Vast.ai bills the GPU once it has it. Call with the
        table's lock held."""
        self.started_at = now
        self.seen_stopped_at = None
        self.info = None

    @property
    def billing_rate(self) -> float:
        """What it bills per hour now: its disk only while stopped."""
        if self.stopped_at is not None and self.offer is not None:
            return self.offer.storage_dph
        return self.dph_total

    @property
    def boot_began(self) -> float:
        """When its current boot began: its rent, or its last start after a stop."""
        return self.started_at or self.rented_at

    def observe(self, info: InstanceInfo | None) -> None:
        """A fresh row from the instance list (None: the marketplace no longer lists it).
        Call with the table's lock held."""
        if info is None and self.info is not None:
            self.vanished = True
            now = time.time()
            if self.switch_may_have_fired(now):
                self.silence_at_loss = self.silence(now)
        self.info = info
        if info is not None:
            self.dph_total = info.dph_total or self.dph_total
        restarting = self.stopped_at is not None and self.started_at is not None
        if restarting and info is not None:
            if info.actual_status == "stopped":
                self.seen_stopped_at = time.time()
            else:  # it has its GPU again, since the last row that said stopped at the latest
                assert self.started_at is not None
                resumed = max(self.started_at, self.seen_stopped_at or self.started_at)
                self.stopped_seconds = self.stopped_for(resumed)
                self.stopped_at = None
                self.resumed_at = resumed

    def silence(self, now: float) -> float:
        """Seconds since this run last gave it a sign of life (0 before the first)."""
        return now - self.heartbeat_at if self.heartbeat_at is not None else 0.0

    def switch_may_have_fired(self, now: float) -> bool:
        """Whether its own dead-man switch may have ended it: this run (asleep, suspended or
        cut off) gave it no sign of life for longer than the switch's period. Such a loss
        says nothing about its machine."""
        return bool(self.deadman) and self.silence(now) > self.deadman

    def loss_blames_host(self, now: float) -> bool:
        """Whether losing it (or a job on it) now says something about its machine: not when
        its own dead-man switch fired, or may have, because this run was silent too long."""
        return self.silence_at_loss is None and not self.switch_may_have_fired(now)

    @property
    def lost_reason(self) -> str | None:
        """Why this instance can never run a job again, if it cannot. (One the run stopped
        is listed as stopped, as it should be.)"""
        restart_pending = self.stopped_at is not None and self.started_at is not None
        if (self.state is State.STOPPED or restart_pending) and not self.vanished:
            return None  # its start timeout bounds the wait for its GPU
        if self.vanished and self.silence_at_loss is not None:
            return (
                f"its dead-man switch destroyed it: this run gave it no sign of life for "
                f"{self.silence_at_loss:.0f} s, longer than --vastai-deadman "
                f"({self.deadman:g} s). Was this computer asleep, or the run suspended?"
            )
        if self.vanished:
            return "it is no longer listed by Vast.ai (destroyed outside this run?)"
        if self.info is not None and self.info.lost:
            bid = self.offer is not None and self.offer.bid_price is not None
            if bid and "stopped" in (self.info.actual_status, self.info.intended_status):
                return "it was outbid: Vast.ai stopped the interruptible instance"
            return f"its host is {self.info.actual_status}"
        return None

    def boot_failure(self) -> str | None:
        """Why the boot will never succeed, from the latest list row; None while hopeful."""
        if self.lost_reason:
            return f"{self.name} failed while booting: {self.lost_reason}"
        if self.info is not None and self.info.fatal_boot_message:
            return f"{self.name} failed to boot: {self.info.fatal_boot_message}"
        return None

    def booted(self) -> bool:
        return (
            self.info is not None
            and self.info.actual_status == "running"
            and bool(self.endpoints())
        )

    def start_timeout_message(self) -> str:
        return (
            f"{self.name} did not run again within --vastai-start-timeout: still "
            f"{self._last_status()}. Its GPU may have gone to another renter while it was "
            "stopped"
        )

    def boot_timeout_message(self) -> str:
        return (
            f"{self.name} did not boot within the boot timeout: still {self._last_status()}. "
            "Raise --vastai-boot-timeout or choose another image/offer"
        )

    def _last_status(self) -> str:
        """Its status and status message, as the last list row said them."""
        info = self.info
        if info is None:
            return "not listed yet"
        message = f" ({info.status_msg})" if info.status_msg else ""
        return f"{info.actual_status}{message}"

    def endpoints(self) -> list[Endpoint]:
        return ssh_endpoints(self.info) if self.info is not None else []

    def connect(self, key: RunKey, deadline: float) -> None:
        host = RemoteHost(self.name, self.endpoints(), load_private_key(key.private_pem))
        try:
            host.connect(deadline)
        except RemoteError as error:
            raise InstanceFailure(f"{self.name} booted but SSH login failed: {error}") from None
        self.host = host

    def bootstrap(self, plan: BootstrapPlan) -> bool:
        """Prepare the instance; True if it had to install the plan's requirements. A
        bootstrap that arms the dead-man switch also touches its heartbeat: the first sign of
        life."""
        assert self.host is not None
        result = self.host.run(SCRIPT_COMMAND, timeout=1800, stdin=plan.script().encode())
        if result.exit_code != 0:
            raise InstanceFailure(
                f"{self.name}: {explain_failure(result.exit_code, result.stderr or result.stdout)}"
            )
        self.deadman = plan.deadman
        self.heartbeat_at = time.time()
        return INSTALLED_MARKER in result.stdout.splitlines()

    def close(self) -> None:
        if self.host is not None:
            self.host.close()


def ssh_endpoints(info: InstanceInfo) -> list[Endpoint]:
    """Direct port first (faster, no proxy hop), Vast's SSH proxy second."""
    found = []
    if info.public_ipaddr and info.direct_ssh_port:
        found.append(Endpoint(info.public_ipaddr, info.direct_ssh_port))
    if info.ssh_host and info.ssh_port:
        found.append(Endpoint(info.ssh_host, info.ssh_port))
    return found
