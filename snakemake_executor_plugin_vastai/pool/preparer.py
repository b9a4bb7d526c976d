"""Preparing a created instance: boot, log in (one reboot), bootstrap, on a thread of its own.

Why apart from the pool: the pool decides where each job runs; this part turns a created
instance into a ready one, or destroys it and says why it never will be. The jobs placed on
it meanwhile read only the outcome: its state, and ``failure`` and ``machine_fault`` when it
failed (the pool then sends them to another machine, or fails them).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from snakemake_executor_plugin_vastai.base.errors import VastaiError
from snakemake_executor_plugin_vastai.base.logger import get_logger
from snakemake_executor_plugin_vastai.base.report import say
from snakemake_executor_plugin_vastai.market.hosts import ExcludedHosts
from snakemake_executor_plugin_vastai.market.marketplace import Marketplace, image_fault
from snakemake_executor_plugin_vastai.pool.destroyer import Destroyer
from snakemake_executor_plugin_vastai.pool.instance import Instance, InstanceFailure
from snakemake_executor_plugin_vastai.pool.ledger import Ledger
from snakemake_executor_plugin_vastai.pool.states import State
from snakemake_executor_plugin_vastai.pool.table import Cancelled, InstanceTable
from snakemake_executor_plugin_vastai.remote.bootstrap import (
    NO_SSHD_FIX,
    NO_SSHD_MARKER,
    BootstrapPlan,
)
from snakemake_executor_plugin_vastai.remote.ssh import RemoteError
from snakemake_executor_plugin_vastai.remote.sshkey import RunKey

log = get_logger(__name__)

# A login that has not worked this long after "running" gets the instance one reboot.
LOGIN_BEFORE_REBOOT_SECONDS = 60.0


def unprepared_reason(instance: Instance, error: BaseException) -> str:
    """Why an instance that never became ready is destroyed, in a few words (the job's
    error says the rest)."""
    if isinstance(error, Cancelled):
        return "the run is shutting down"
    if instance.state is State.BOOTSTRAPPING:
        return "its bootstrap failed"
    return "it did not boot"


def fails_everywhere(boot_error: str) -> bool:
    """A boot error no other machine would heal: the image is wrong or has no sshd."""
    return NO_SSHD_FIX in boot_error or image_fault(boot_error)


@dataclass
class Preparer:
    """Boots, logs in to and bootstraps the instances the pool rents, each on its thread."""

    market: Marketplace
    ledger: Ledger
    key: RunKey
    table: InstanceTable
    destroyer: Destroyer
    excluded: ExcludedHosts
    boot_timeout: float
    bootstrap: BootstrapPlan
    look_soon: Callable[[], None]  # the instance list should be asked again soon
    start_timeout: float = 120.0  # for a stopped instance to run again

    def start(self, instance: Instance, again: bool = False) -> None:
        """``again``: a stopped instance of the run, started for a job (no new boot: it
        waits for its GPU, then its container starts from its disk)."""
        threading.Thread(
            target=self.prepare,
            args=(instance, again),
            name=f"prepare-{instance.instance_id}",
            daemon=True,
        ).start()

    def prepare(self, instance: Instance, again: bool = False) -> None:
        """Boot, log in, bootstrap; on any failure (a teardown meanwhile included) the
        instance is destroyed and the jobs placed on it while it booted hear why."""
        try:
            self.table.check_open()
            self._boot_and_bootstrap(instance, again)
        except BaseException as error:
            reason = unprepared_reason(instance, error)
            cancelled = isinstance(error, Cancelled)
            booting = instance.state is State.BOOTING and not cancelled
            host_gone = instance.state is State.LOST and not cancelled
            claimed = self.destroyer.claim(instance)  # nobody places a job on it any more
            if booting and claimed and isinstance(error, InstanceFailure | RemoteError):
                error = self._with_boot_log(instance, error)  # a teardown destroys meanwhile
            if booting:  # before the jobs waiting on it hear of it and rent again
                self.excluded.exclude(instance.offer, f"its instance did not boot: {error}")
            with self.table.locked():  # both at once: the jobs waiting on it read both
                machine = booting or host_gone
                instance.machine_fault = machine and not fails_everywhere(str(error))
                instance.failure = str(error)
                self.table.notify()
            if claimed:
                self.destroyer.finish(instance, reason)
            log.debug("%s was not prepared: %s", instance.name, error)

    def _with_boot_log(self, instance: Instance, error: Exception) -> InstanceFailure:
        """The boot error, with the last lines of the instance's own log (fetched before the
        destroy; secrets redacted) and the fix when the image turned out to lack sshd."""
        tail = self._boot_log(instance)
        message = str(error).rstrip(".")
        if NO_SSHD_MARKER in tail:
            message += f". {NO_SSHD_FIX}"
        if tail:
            lines = "\n".join(f"    {line}" for line in tail.splitlines())
            message += f"\n  Last lines of the instance's log:\n{lines}"
        return InstanceFailure(message)

    def _boot_and_bootstrap(self, instance: Instance, again: bool) -> None:
        assert instance.instance_id is not None
        began = time.time() if again else instance.rented_at
        if again:
            deadline = time.monotonic() + self.start_timeout
            self.market.start(instance.instance_id)
            self._wait_booted(instance, deadline, instance.start_timeout_message)
        else:
            deadline = time.monotonic() + self.boot_timeout
            self.market.attach_key(instance.instance_id, self.key.public_line)
            self._wait_booted(instance, deadline, instance.boot_timeout_message)
            instance.running_at = time.time()
            self.ledger.running(instance.label)
        self._log_in(instance, deadline)
        self.advance(instance, State.BOOTING, State.BOOTSTRAPPING)
        took = time.time() - began
        if again:
            say("Instance %s runs again after %.1f s; bootstrapping", instance.instance_id, took)
        else:
            say("Instance %s booted in %.1f s; bootstrapping", instance.instance_id, took)
        self._bootstrap(instance)
        with self.table.locked():
            assert instance.slots is not None
            ready = State.IDLE if instance.slots.empty else State.BUSY
            self.advance(instance, State.BOOTSTRAPPING, ready)
            if ready is State.BUSY:  # its jobs start now: busy from here, not from the rent
                instance.busy_since = time.time()

    def _bootstrap(self, instance: Instance) -> None:
        """Said at its end (and, by the caller, at its start): a first install of Snakemake
        can take minutes."""
        started = time.monotonic()
        installed = instance.bootstrap(self.bootstrap)
        took = time.monotonic() - started
        what = f" (installed {', '.join(self.bootstrap.requirements)})" if installed else ""
        say("Instance %s bootstrapped in %.1f s%s", instance.instance_id, took, what)

    def _log_in(self, instance: Instance, deadline: float) -> None:
        """SSH login; a login that never works (Vast's proxy tunnel did not come up) is worth
        one reboot before the host is given up, unless the image's log already says it has
        no SSH server."""
        first = min(deadline, time.monotonic() + LOGIN_BEFORE_REBOOT_SECONDS)
        try:
            instance.connect(self.key, first)
            return
        except InstanceFailure as error:
            if NO_SSHD_MARKER in self._boot_log(instance):
                raise
            log.info("%s; rebooting it once", str(error).rstrip("."))  # the error names it
        assert instance.instance_id is not None
        self.market.reboot(instance.instance_id)
        deadline = time.monotonic() + self.boot_timeout
        self._wait_booted(instance, deadline, instance.boot_timeout_message)
        instance.connect(self.key, deadline)

    def _boot_log(self, instance: Instance) -> str:
        """The last lines of the instance's log, fetched once per instance ("" if none)."""
        if instance.boot_log is None:
            instance.boot_log = ""
            if instance.instance_id is not None:
                try:
                    instance.boot_log = self.market.log_tail(instance.instance_id)
                except VastaiError as failed:
                    log.debug("%s: no log: %s", instance.name, failed)
        return instance.boot_log

    def _wait_booted(
        self, instance: Instance, deadline: float, timed_out: Callable[[], str]
    ) -> None:
        """Until the reaper's list rounds show it running with an SSH endpoint; fail fast on
        a Docker error that waiting cannot heal, a lost host, or the boot timeout."""
        self.look_soon()  # a new instance is booting
        self.table.wait_for(
            lambda: (
                self.table.closing
                or instance.state is not State.BOOTING
                or instance.booted()
                or instance.boot_failure() is not None
            ),
            timeout=max(0.0, deadline - time.monotonic()),
        )
        with self.table.locked():
            self.table.check_open()
            if instance.state is not State.BOOTING:
                raise InstanceFailure(f"{instance.name} was destroyed while booting")
            failure = instance.boot_failure()
            if failure:
                raise InstanceFailure(failure)
            if not instance.booted():
                raise InstanceFailure(timed_out())

    def advance(self, instance: Instance, expected: State, to: State) -> None:
        """A preparing thread's move: only from the state it expects. Teardown or the reaper may
        have claimed the instance meanwhile, and their move wins."""
        with self.table.locked():
            if instance.state is not expected:
                raise InstanceFailure(f"{instance.name} was destroyed while being prepared")
            self.table.move(instance, to)
