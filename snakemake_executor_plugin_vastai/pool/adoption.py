"""Adopting the instances an earlier run of this workflow directory kept warm.

Why before the first rent: a rerun whose jobs fit a kept instance needs no rent, no image
pull, no boot. The ledger says what was kept and until when; the instance list says whether
it still runs under its label; an SSH login with the keeping run's key (kept on disk exactly
as long as such an instance may live) says it is reachable. An adopted instance is claimed in
the ledger first (so no other run takes it), bootstrapped again (a no-op when the plugin and
Snakemake are the same; a new install otherwise), and relabelled to this run. One that turns
out gone, stopped or unreachable is forgotten, destroyed if it exists; one this run cannot
use keeps its own deadline.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from snakemake_executor_plugin_vastai.base.logger import get_logger
from snakemake_executor_plugin_vastai.base.report import say
from snakemake_executor_plugin_vastai.market.marketplace import (
    InstanceInfo,
    Marketplace,
    MarketplaceError,
)
from snakemake_executor_plugin_vastai.pool.demand import Demand
from snakemake_executor_plugin_vastai.pool.instance import Instance, InstanceFailure
from snakemake_executor_plugin_vastai.pool.keeping import KeptInstance, found_gone_end
from snakemake_executor_plugin_vastai.pool.ledger import InstanceRecord, Ledger, make_label
from snakemake_executor_plugin_vastai.pool.slots import SlotBook
from snakemake_executor_plugin_vastai.pool.states import State
from snakemake_executor_plugin_vastai.pool.table import InstanceTable
from snakemake_executor_plugin_vastai.remote.bootstrap import BootstrapPlan
from snakemake_executor_plugin_vastai.remote.ssh import RemoteError
from snakemake_executor_plugin_vastai.remote.sshkey import RunKey

log = get_logger(__name__)

# A kept instance this close to its deadline is left to it: the login and the bootstrap
# must be done before its switch ends it.
ADOPT_MARGIN_SECONDS = 30.0
LOGIN_SECONDS = 20.0


@dataclass(frozen=True)
class Candidate:
    record: InstanceRecord
    kept: KeptInstance
    row: InstanceInfo


@dataclass(frozen=True)
class Sorted:
    """What this run makes of the kept instances: adopt, forget (gone or broken: destroyed
    if they exist), or leave to their deadline."""

    adopt: list[Candidate]
    forget: list[tuple[InstanceRecord, InstanceInfo | None, str]]
    leave: list[tuple[InstanceRecord, str]]


def sort_kept(
    records: Iterable[InstanceRecord],
    rows: dict[int, InstanceInfo],
    demand: Demand,
    deadman: float,
    keys: Path,
    room: int,
    now: float,
) -> Sorted:
    """Decide for each kept record (pure but for looking at key files)."""
    adopt: list[Candidate] = []
    forget: list[tuple[InstanceRecord, InstanceInfo | None, str]] = []
    leave: list[tuple[InstanceRecord, str]] = []
    for record in records:
        until = record.kept_until()
        kept = KeptInstance.from_json(record.kept) if record.kept else None
        if until is None:
            continue
        if kept is None or record.instance_id is None:
            leave.append((record, "its record cannot be read; it ends at its deadline"))
            continue
        row = rows.get(record.instance_id)
        if row is None or row.label != record.label:
            forget.append((record, None, "Vast.ai no longer lists it"))
        elif row.lost or row.actual_status != "running":
            said = "stopped" if row.intended_status == "stopped" else row.actual_status
            forget.append((record, row, f"Vast.ai says it is {said}"))
        elif not (keys / record.key).is_file():
            forget.append((record, row, "the key that logs in to it is gone"))
        elif until - now < ADOPT_MARGIN_SECONDS:
            leave.append((record, "its deadline is too close"))
        elif not demand.wants(kept.signature):
            leave.append((record, "no job of this run can use it"))
        elif not deadman or kept.deadman < deadman:
            leave.append((record, "its dead-man switch is shorter than this run's"))
        elif len(adopt) >= room:
            leave.append((record, "the run has as many instances as it may"))
        else:
            adopt.append(Candidate(record, kept, row))
    return Sorted(adopt, forget, leave)


@dataclass
class Adoption:
    """Takes over the kept instances this run can use, before it rents anything."""

    market: Marketplace
    ledger: Ledger
    table: InstanceTable
    demand: Demand
    run_id: str
    bootstrap: BootstrapPlan
    pack: bool

    @property
    def keys(self) -> Path:
        return self.ledger.directory / "keys"

    def adopt(self, room: int) -> list[Instance]:
        """The instances adopted (ready, idle, in the table). No API call when the ledger
        keeps nothing; one list call otherwise, then one login per instance."""
        now = time.time()
        kept = [r for r in self.ledger.records() if r.kept_until() is not None]
        if not kept:
            return []
        try:
            rows = {row.id: row for row in self.market.list_instances()}
        except MarketplaceError as error:
            log.warning("Could not look for the instances an earlier run kept: %s", error)
            return []
        plan = sort_kept(kept, rows, self.demand, self.bootstrap.deadman, self.keys, room, now)
        for record, row, reason in plan.forget:
            self._forget(record, row, reason)
        for record, reason in plan.leave:
            log.info("Not using instance %s kept by an earlier run: %s", record.instance_id, reason)
        adopted: list[Instance] = []

        def take(candidate: Candidate) -> None:
            try:
                adopted.extend(self._take(candidate))
            except Exception:  # a kept instance must never stop the run: it rents instead
                log.exception("Adopting instance %s failed", candidate.kept.instance_id)

        threads = [threading.Thread(target=take, args=(c,), daemon=True) for c in plan.adopt]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return adopted

    def _take(self, candidate: Candidate) -> list[Instance]:
        """[the instance], ready in this run's table; [] when another run took it first or
        it turned out unusable (then destroyed)."""
        record, kept = candidate.record, candidate.kept
        label = make_label(self.run_id, f"kept-{kept.instance_id}")
        if not self.ledger.adopt(record.label, label, self.run_id):
            return []
        instance = self._instance(label, candidate)
        try:
            instance.connect(RunKey.load(self.keys, record.key), time.monotonic() + LOGIN_SECONDS)
            instance.bootstrap(self.bootstrap)
        except (InstanceFailure, RemoteError, OSError, ValueError) as error:
            instance.close()
            self._destroy(label, kept.instance_id, f"it cannot be used: {error}")
            return []
        instance.deadman = kept.deadman  # the switch it booted with keeps guarding it
        self.table.add(instance)
        threading.Thread(target=self._relabel, args=(instance,), daemon=True).start()
        left = kept.deadline - time.time()
        say(
            "Adopted instance %s (%s), kept warm by run %s with %.0f s left: no rent, no boot",
            kept.instance_id,
            kept.offer.gpu_name,
            record.run_id,
            left,
        )
        return [instance]

    def _instance(self, label: str, candidate: Candidate) -> Instance:
        kept, row = candidate.kept, candidate.row
        now = time.time()
        instance = Instance(
            label,
            kept.signature,
            state=State.IDLE,
            offer=kept.offer,
            dph_total=row.dph_total or kept.offer.dph_total,
            slots=SlotBook(kept.offer.capacity(kept.signature.disk_gb), exclusive=not self.pack),
            instance_id=kept.instance_id,
            info=row,
            rented_at=now,
            born_at=kept.born_at,
            created_at=now,
            running_at=now,
            last_released_at=now,
        )
        instance.files.remember(kept.digests)
        return instance

    def _relabel(self, instance: Instance) -> None:
        """Its label names this run from now on (a later run then knows whose it is); off
        the first job's path, since the ledger already says so."""
        assert instance.instance_id is not None
        try:
            self.market.relabel(instance.instance_id, instance.label)
        except MarketplaceError as error:
            log.debug("%s: could not relabel it: %s", instance.name, error)

    def _forget(self, record: InstanceRecord, row: InstanceInfo | None, reason: str) -> None:
        """A kept instance no run can use: destroyed if it exists, closed in the ledger (left
        open when the destroy failed: a later reap tries again)."""
        if row is None:
            self.ledger.destroyed(record.label, found_gone_end(record, time.time()))
        else:
            self._destroy(record.label, row.id, reason)

    def _destroy(self, label: str, instance_id: int, reason: str) -> None:
        say("Destroying instance %s kept by an earlier run: %s", instance_id, reason)
        try:
            ended_at = self.market.destroy(instance_id)
        except MarketplaceError as error:
            log.warning("Could not destroy instance %s: %s", instance_id, error)
            return
        self.ledger.destroyed(label, ended_at)
