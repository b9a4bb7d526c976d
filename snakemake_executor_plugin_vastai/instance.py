"""One rented instance: its life as a state machine, and the steps that concern it alone
(waiting for boot, first SSH login, bootstrap).

renting -> booting -> bootstrapping -> idle <-> busy -> destroying -> gone

Why the boot wait reads a shared snapshot instead of asking the API: with many instances
booting at once, one list call per status round serves them all (see ``pool.Pool.refresh``).
"""

from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass, field

from snakemake_interface_common.exceptions import WorkflowError

from snakemake_executor_plugin_vastai.bootstrap import BootstrapPlan, explain_failure
from snakemake_executor_plugin_vastai.ledger import billed_dollars
from snakemake_executor_plugin_vastai.marketplace import InstanceInfo, Offer
from snakemake_executor_plugin_vastai.remote import Endpoint, RemoteError, RemoteHost
from snakemake_executor_plugin_vastai.resources import Signature
from snakemake_executor_plugin_vastai.sshkey import RunKey
from snakemake_executor_plugin_vastai.staging import InstanceFiles


class State(enum.Enum):
    RENTING = "renting"
    BOOTING = "booting"
    BOOTSTRAPPING = "bootstrapping"
    IDLE = "idle"
    BUSY = "busy"
    DESTROYING = "destroying"
    GONE = "gone"


class InstanceFailure(WorkflowError):
    """The instance cannot run jobs (boot failed, host lost, bootstrap failed)."""


@dataclass(eq=False)
class Instance:
    label: str
    signature: Signature
    offer: Offer
    dph_total: float
    state: State = State.RENTING
    instance_id: int | None = None
    info: InstanceInfo | None = None
    host: RemoteHost | None = None
    files: InstanceFiles = field(default_factory=InstanceFiles)
    rented_at: float = field(default_factory=lambda: time.time())  # freezable in tests
    running_at: float | None = None
    gone_at: float | None = None
    last_released_at: float | None = None
    jobs_run: int = 0
    busy_since: float | None = None
    busy_seconds: float = 0.0
    price_warned: bool = False
    vanished: bool = False  # listed once, then no longer: destroyed outside this run
    changed: threading.Condition = field(default_factory=threading.Condition)

    @property
    def name(self) -> str:
        return f"instance {self.instance_id or '?'} ({self.offer.gpu_name}, {self.label})"

    def cost(self, now: float) -> float:
        end = self.gone_at if self.gone_at is not None else now
        return billed_dollars(self.rented_at, end, self.dph_total)

    def set_state(self, state: State) -> None:
        with self.changed:
            self.state = state
            self.changed.notify_all()

    def observe(self, info: InstanceInfo | None) -> None:
        """A fresh row from the instance list (None: the marketplace no longer lists it)."""
        with self.changed:
            if info is None and self.info is not None:
                self.vanished = True
            self.info = info
            if info is not None:
                self.dph_total = info.dph_total or self.dph_total
            self.changed.notify_all()

    @property
    def lost_reason(self) -> str | None:
        """Why this instance can never run a job again, if it cannot."""
        if self.vanished:
            return "it is no longer listed by Vast.ai (destroyed outside this run?)"
        if self.info is not None and self.info.lost:
            return f"its host is {self.info.actual_status}"
        return None

    def wait_until_running(self, deadline: float) -> InstanceInfo:
        """Block until the list shows the instance running with an SSH endpoint; fail fast on a
        Docker error that waiting will not heal, a lost host, or the boot timeout."""
        with self.changed:
            while True:
                info = self.info
                if self.state in (State.DESTROYING, State.GONE):
                    raise InstanceFailure(f"{self.name} was destroyed while booting")
                if self.lost_reason:
                    raise InstanceFailure(f"{self.name} failed while booting: {self.lost_reason}")
                if info is not None:
                    if info.fatal_boot_message:
                        raise InstanceFailure(
                            f"{self.name} failed to boot: {info.fatal_boot_message}"
                        )
                    if info.actual_status == "running" and self.endpoints():
                        return info
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    status = info.actual_status if info else "not listed yet"
                    message = f" ({info.status_msg})" if info and info.status_msg else ""
                    raise InstanceFailure(
                        f"{self.name} did not boot within the boot timeout: still {status}"
                        f"{message}. Raise --vastai-boot-timeout or choose another image/offer"
                    )
                self.changed.wait(timeout=min(remaining, 5.0))

    def endpoints(self) -> list[Endpoint]:
        return ssh_endpoints(self.info) if self.info is not None else []

    def connect(self, key: RunKey, deadline: float) -> None:
        host = RemoteHost(self.name, self.endpoints(), key.pkey)
        try:
            host.connect(deadline)
        except RemoteError as error:
            raise InstanceFailure(f"{self.name} booted but SSH login failed: {error}") from None
        self.host = host

    def bootstrap(self, plan: BootstrapPlan) -> None:
        assert self.host is not None
        self.set_state(State.BOOTSTRAPPING)
        result = self.host.run(plan.script(), timeout=1800)
        if result.exit_code != 0:
            raise InstanceFailure(
                f"{self.name}: {explain_failure(result.exit_code, result.stderr or result.stdout)}"
            )

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
