"""The background reaper: idle TTL, lifetime, price cap, lost hosts, and orphans of dead runs.

Why a scheduler of its own: the TTL of an idle instance must expire even while Snakemake's
status loop has nothing to report, and orphan reaping at start must not delay the first
job. APScheduler's background thread runs the pool's sweep every second (no API call unless
something goes, or the instance list is due); the decisions live in ``pool`` as pure
functions.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from snakemake_executor_plugin_vastai.ledger import Ledger, run_id_of, run_is_alive
from snakemake_executor_plugin_vastai.logger import get_logger
from snakemake_executor_plugin_vastai.marketplace import InstanceInfo, Marketplace, MarketplaceError
from snakemake_executor_plugin_vastai.pool import Pool

log = get_logger(__name__)

SWEEP_SECONDS = 1.0


@dataclass(frozen=True)
class Orphan:
    instance_id: int
    label: str
    run_id: str


def find_orphans(
    instances: Iterable[InstanceInfo], state_dir: Path, own_run: str | None
) -> list[Orphan]:
    """Instances carrying our label whose run (recorded in this workdir) is dead.

    A run is dead when its lock file exists and can be taken: the kernel drops the lock when
    the process dies, even by ``kill -9``. A run this workdir never saw may be alive in
    another shell or on another machine, so its instances are left alone.
    """
    orphans = []
    for info in instances:
        run_id = run_id_of(info.label)
        if run_id is None or run_id == own_run:
            continue
        if not run_is_alive(state_dir, run_id):
            orphans.append(Orphan(info.id, info.label, run_id))
    return orphans


def reap_orphans(
    market: Marketplace, ledger: Ledger, state_dir: Path, own_run: str | None
) -> list[Orphan]:
    """Destroy the orphans and close the ledger entries of instances that are gone."""
    listed = market.list_instances()
    orphans = find_orphans(listed, state_dir, own_run)
    for orphan in orphans:
        log.warning(
            "Destroying instance %d left running by the dead run %s (%s)",
            orphan.instance_id,
            orphan.run_id,
            orphan.label,
        )
        market.destroy(orphan.instance_id)
        ledger.destroyed(orphan.label)
    live_labels = {info.label for info in listed} - {o.label for o in orphans}
    for record in ledger.open_records():
        gone = record.run_id != own_run and record.label not in live_labels
        if gone and not run_is_alive(state_dir, record.run_id):
            ledger.destroyed(record.label)  # destroyed elsewhere, or never created
    return orphans


class Reaper:
    def __init__(
        self, pool: Pool, market: Marketplace, ledger: Ledger, state_dir: Path, run_id: str
    ) -> None:
        from apscheduler.schedulers.background import BackgroundScheduler

        self.pool = pool
        self.market = market
        self.ledger = ledger
        self.state_dir = state_dir
        self.run_id = run_id
        self._scheduler = BackgroundScheduler(daemon=True)

    def start(self) -> None:
        self._scheduler.add_job(
            self._sweep, "interval", seconds=SWEEP_SECONDS, max_instances=1, coalesce=True
        )
        self._scheduler.add_job(self._reap_orphans, max_instances=1)  # once, right away
        self._scheduler.start()

    def stop(self) -> None:
        if self._scheduler.running:
            self._scheduler.shutdown(wait=True)

    def _sweep(self) -> None:
        """One round: the instance list when due (one call for all instances), then the
        pool's decisions. Driven from here, not from Snakemake's status loop, so a finished
        boot is noticed within a second whatever --seconds-between-status-checks says."""
        try:
            if self.pool.refresh_due():
                self.pool.refresh()
            self.pool.sweep()
        except MarketplaceError as error:
            log.warning("Could not list Vast.ai instances this round: %s", error)
        except Exception:  # the reaper must keep running whatever one round met
            log.exception("the pool sweep failed")

    def _reap_orphans(self) -> None:
        try:
            reap_orphans(self.market, self.ledger, self.state_dir, self.run_id)
        except MarketplaceError as error:
            log.warning("Could not look for instances left by earlier runs: %s", error)
