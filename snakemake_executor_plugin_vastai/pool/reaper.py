"""The background reaper: idle TTL, lifetime, price cap, lost hosts, and orphans of dead runs.

Why a scheduler of its own: the TTL of an idle instance must expire even while Snakemake's
status loop has nothing to report, and orphan reaping at start must not delay the first
job. APScheduler's background thread runs the pool's sweep every second (no API call unless
something goes, or the instance list is due); the decisions live in ``pool`` as pure
functions. The same scheduler says the running total of dollars once a minute.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from snakemake_executor_plugin_vastai.base.logger import get_logger
from snakemake_executor_plugin_vastai.market.marketplace import (
    InstanceInfo,
    Marketplace,
    MarketplaceError,
)
from snakemake_executor_plugin_vastai.pool.deadman import Heartbeat, beat_interval
from snakemake_executor_plugin_vastai.pool.keeping import forget_unused_keys, found_gone_end
from snakemake_executor_plugin_vastai.pool.ledger import (
    InstanceRecord,
    Ledger,
    run_id_of,
    run_is_alive,
)
from snakemake_executor_plugin_vastai.pool.placement import Pool
from snakemake_executor_plugin_vastai.pool.progress import SPEND_TICK_SECONDS, SpendTicker

log = get_logger(__name__)
T = TypeVar("T")

SWEEP_SECONDS = 0.5
# A sweep this long after the last one means this process was suspended (a computer asleep):
# the instance list is read at once, to tell what happened meanwhile. (Its interval is
# counted in monotonic time, which stands still while a computer sleeps.)
WAKE_GAP_SECONDS = 10.0


@dataclass(frozen=True)
class Orphan:
    instance_id: int
    label: str  # its label in the ledger (Vast.ai may still show an earlier one)
    run_id: str


def find_orphans(
    instances: Iterable[InstanceInfo],
    state_dir: Path,
    own_run: str | None,
    records: Iterable[InstanceRecord] = (),
    with_kept: bool = False,
) -> list[Orphan]:
    """Instances carrying our label whose run (recorded in this workdir) is dead.

    A run is dead when its lock file exists and can be taken: the kernel drops the lock when
    the process dies, even by ``kill -9``. A run this workdir never saw may be alive in
    another shell or on another machine, so its instances are left alone. An instance kept
    warm (``records`` say so) is no orphan until its deadline, unless ``with_kept``; one a
    later run adopted belongs to that run, even before its label says so.
    """
    now = time.time()
    records = list(records)
    kept = {r.label for r in records if (r.kept_until() or 0.0) > now}
    handed = {r.label: r.handed_to for r in records if r.handed_to}
    orphans = []
    for info in instances:
        label = current_label(info.label, handed)
        run_id = run_id_of(label)
        if run_id is None or run_id == own_run:
            continue
        if info.label in kept and not with_kept:
            continue
        if not run_is_alive(state_dir, run_id):
            orphans.append(Orphan(info.id, label, run_id))
    return orphans


def current_label(label: str, handed: dict[str, str]) -> str:
    """The label an instance has in the ledger: its own, or, when later runs adopted it
    before relabelling it, the label of the last of them."""
    seen = {label}
    while label in handed and handed[label] not in seen:
        label = handed[label]
        seen.add(label)
    return label


def reap_orphans(
    market: Marketplace,
    ledger: Ledger,
    state_dir: Path,
    own_run: str | None,
    on_sent: Callable[[], None] = lambda: None,
    with_kept: bool = False,
) -> list[Orphan]:
    """Destroy the orphans and close the ledger entries of instances that are gone.

    Every destroy is sent at once, and ``on_sent`` is called as soon as they all are, before
    the (slower) confirmations: a new run's first rent waits for exactly that. One orphan
    that cannot be destroyed does not stop the others; it is reported and left to the next
    reap, its ledger entry open. Instances kept warm are left to their deadline, unless
    ``with_kept``. Run keys no instance or live run needs any more are deleted.
    """
    listed = market.list_instances()
    orphans = find_orphans(listed, state_dir, own_run, ledger.records(), with_kept)
    for orphan in orphans:
        log.warning(
            "Destroying instance %d left running by the dead run %s (%s)",
            orphan.instance_id,
            orphan.run_id,
            orphan.label,
        )
    workers = max(1, min(32, len(orphans)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        sent = list(pool.map(lambda o: _try(market.request_destroy, o), orphans))
        on_sent()
        confirmed = list(pool.map(lambda o: _try(market.destroy, o), orphans))
    destroyed = []
    for orphan, sent_at, confirmed_at in zip(orphans, sent, confirmed, strict=True):
        if confirmed_at is not None:  # its bill ended when the first answered destroy went
            ledger.destroyed(orphan.label, sent_at if sent_at is not None else confirmed_at)
            destroyed.append(orphan)
        elif sent_at is None:
            log.error(
                "Could not destroy instance %d of the dead run %s; run 'snakemake-vastai "
                "reap' or destroy it in the Vast.ai console.",
                orphan.instance_id,
                orphan.run_id,
            )
    live_labels = {info.label for info in listed} - {o.label for o in destroyed}
    for record in ledger.open_records():
        gone = record.run_id != own_run and record.label not in live_labels
        if gone and not run_is_alive(state_dir, record.run_id):
            # destroyed elsewhere, by its own switch, or never created
            ledger.destroyed(record.label, found_gone_end(record, time.time()))
    forget_unused_keys(ledger, state_dir, ending=None)
    return destroyed


def _try(call: Callable[[int], T], orphan: Orphan) -> T | None:
    """The call's answer for this orphan; None when it failed (logged)."""
    try:
        return call(orphan.instance_id)
    except MarketplaceError as error:
        log.warning("Instance %d: %s", orphan.instance_id, error)
        return None


class _SkippedRounds(logging.Filter):
    """APScheduler warns of each round it skips: one due while the last still runs (with the
    API paced, a round may well outlast the half-second interval), or one missed while this
    process was suspended (a computer asleep). The next round comes anyway: no news."""

    NOTICES = ("skipped: maximum number of running instances", "was missed by")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(notice in record.getMessage() for notice in self.NOTICES)


SKIPPED_ROUNDS = _SkippedRounds()
# Where APScheduler says so: the scheduler skips rounds still running, its executor missed ones.
SCHEDULER_LOGGERS = ("apscheduler.scheduler", "apscheduler.executors.default")


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
        for name in SCHEDULER_LOGGERS:
            logging.getLogger(name).addFilter(SKIPPED_ROUNDS)
        self._scheduler = BackgroundScheduler(daemon=True)
        self._ticker = SpendTicker()
        self._last_sweep = time.time()  # wall-clock time, which a computer's sleep moves on

    def start(self, deadman: float = 0.0) -> None:
        """``deadman``: the instances' dead-man time; 0 sends no heartbeat."""
        self._scheduler.add_job(
            self._sweep, "interval", seconds=SWEEP_SECONDS, max_instances=1, coalesce=True
        )
        if deadman:
            heartbeat = Heartbeat()
            self._scheduler.add_job(
                lambda: heartbeat.beat(self.pool.logged_in()),
                "interval",
                seconds=beat_interval(deadman),
                max_instances=1,
                coalesce=True,
            )
        self._scheduler.add_job(
            self._tick, "interval", seconds=SPEND_TICK_SECONDS, max_instances=1, coalesce=True
        )
        self._scheduler.add_job(self._reap_orphans, max_instances=1)  # once, right away
        self._scheduler.start()

    def stop(self) -> None:
        """No more rounds. A round under way is not waited for: the teardown has sent its
        own destroys, and its deadline must not depend on a round's."""
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)

    def _sweep(self) -> None:
        """One round: the instance list when due (one call for all instances), then the
        pool's decisions. Driven from here, not from Snakemake's status loop, so a finished
        boot is noticed within a second whatever --seconds-between-status-checks says."""
        try:
            if self._woke() or self.pool.refresh_due():
                self.pool.refresh()
        except MarketplaceError as error:
            log.warning("Could not list Vast.ai instances this round: %s", error)
        except Exception:  # the reaper must keep running whatever one round met
            log.exception("the instance list round failed")
        try:  # the TTL and lifetime sweep needs no list call: it runs whatever happened above
            self.pool.sweep()
        except Exception:
            log.exception("the pool sweep failed")
        self._last_sweep = time.time()  # after the round: a slow list call is no sleep

    def _woke(self) -> bool:
        """Whether this process was suspended since the last round."""
        return time.time() - self._last_sweep > WAKE_GAP_SECONDS

    def _tick(self) -> None:
        """The running total of dollars; a failure costs a line, never the reaper."""
        try:
            self._ticker.tick(self.pool.instances(), self.pool.spend())
        except Exception:
            log.exception("the running total failed")

    def _reap_orphans(self) -> None:
        """Runs once at start; the pool's first rent waits until its destroys are sent."""
        try:
            reap_orphans(
                self.market,
                self.ledger,
                self.state_dir,
                self.run_id,
                on_sent=self.pool.orphans_reaped.set,
            )
        except MarketplaceError as error:
            log.warning("Could not look for instances left by earlier runs: %s", error)
        finally:
            self.pool.orphans_reaped.set()
