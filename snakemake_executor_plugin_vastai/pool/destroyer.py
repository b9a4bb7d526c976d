"""Destroying instances, and never forgetting one the marketplace has not confirmed gone.

Why its own part: a destroy can fail (rate limit, server error, an answer lost), and a create
can end without an answer. Either way the instance may be billing. A failed destroy keeps the
instance in ``destroying`` and is retried every reaper round and at teardown; an unknown
create is looked for by its label in every list round, destroyed if it shows up, and only
presumed absent (no longer counted toward the caps) once list rounds have missed it for a
while. The ledger entry stays open until one of these is settled, so a later run's reaper or
``snakemake-vastai reap`` still finds what this run could not.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

from snakemake_executor_plugin_vastai.base.logger import get_logger
from snakemake_executor_plugin_vastai.base.report import say
from snakemake_executor_plugin_vastai.market.marketplace import (
    InstanceInfo,
    Marketplace,
    MarketplaceError,
)
from snakemake_executor_plugin_vastai.pool.instance import Instance
from snakemake_executor_plugin_vastai.pool.ledger import Ledger
from snakemake_executor_plugin_vastai.pool.states import State
from snakemake_executor_plugin_vastai.pool.table import InstanceTable

log = get_logger(__name__)

UNKNOWN_GRACE_SECONDS = 5.0  # an unknown create missing from lists this long stops counting
UNKNOWN_MIN_MISSES = 2  # ... and from at least this many list rounds
ROUND_SECONDS = 90.0  # a reaper round waits this long at most for the destroys it sent
CONFIRM_ROUNDS = 10  # list rounds after a batch destroy before the rest go one by one
CONFIRM_PAUSE_SECONDS = 1.0  # between those rounds (the list limit: one a second)
# Not to be claimed: on its way already, nothing to destroy yet, or kept past the run (its
# own dead-man switch ends it; a keep that failed moves it to destroying explicitly).
UNCLAIMABLE = frozenset({State.DESTROYING, State.GONE, State.RENTING, State.UNKNOWN, State.KEPT})


class Destroyer:
    def __init__(self, market: Marketplace, ledger: Ledger, table: InstanceTable) -> None:
        self.market = market
        self.ledger = ledger
        self.table = table
        self._in_progress: set[int] = set()  # ids of instances some thread is destroying
        self._announced: set[str] = set()  # labels whose destroy was said (with its reason)

    def claim(self, instance: Instance) -> bool:
        """Mark for destruction so nobody leases it; False if it is past that already or
        has no id to destroy (still renting, or an unknown create). Lock held or not."""
        with self.table.locked():
            if instance.state in UNCLAIMABLE:
                return False
            self.table.move(instance, State.DESTROYING)
            return True

    def destroy(self, instance: Instance, reason: str) -> None:
        if self.claim(instance):
            self.finish(instance, reason)

    def finish(self, instance: Instance, reason: str) -> bool:
        """Send the destroy of a claimed instance and confirm it; True once gone. On failure
        it stays ``destroying`` for the next retry. One thread at a time per instance: a
        second caller waits for the first one's result."""
        with self.table.locked():
            if instance.state is State.GONE:
                return True
            if id(instance) in self._in_progress:
                self.table.wait_for(lambda: id(instance) not in self._in_progress, timeout=120.0)
                return instance.state is State.GONE
            self._in_progress.add(id(instance))
        try:
            return self._destroy_now(instance, reason)
        finally:
            with self.table.locked():
                self._in_progress.discard(id(instance))
                self.table.notify()

    def retry_failed(self) -> None:
        """The reaper's round: try again, side by side, every destroy that failed earlier."""
        due = [
            (instance, "retrying a failed destroy")
            for instance in self.table.in_states(frozenset({State.DESTROYING}))
            if instance.destroy_error is not None and id(instance) not in self._in_progress
        ]
        self.finish_all(due, time.monotonic() + ROUND_SECONDS)

    def settle_unknown(self, rows: Iterable[InstanceInfo], now: float | None = None) -> None:
        """One list round's verdict on every create whose answer was lost."""
        now = time.monotonic() if now is None else now
        by_label = {row.label: row for row in rows}
        found = []
        with self.table.locked():
            for instance in self.table.in_states(frozenset({State.UNKNOWN})):
                row = by_label.get(instance.label)
                if row is not None:
                    instance.instance_id = row.id
                    instance.observe(row)
                    self.table.move(instance, State.DESTROYING)
                    found.append(instance)
                    continue
                instance.list_misses += 1
                since = instance.unknown_since if instance.unknown_since is not None else now
                if (
                    not instance.presumed_absent
                    and instance.list_misses >= UNKNOWN_MIN_MISSES
                    and now - since >= UNKNOWN_GRACE_SECONDS
                ):
                    instance.presumed_absent = True
                    self.table.notify()
        for instance in found:
            assert instance.instance_id is not None
            self.ledger.rented(instance.label, instance.instance_id)
            self.finish(instance, "its create's answer was lost, but it was created")

    def close_unknown(self, rows: Iterable[InstanceInfo]) -> None:
        """At teardown, after the last list round: an unknown create still not listed is
        taken as never made, and its ledger entry closed. Only one still unknown under the
        lock: one that a list round found meanwhile is being destroyed, and is gone only
        when the marketplace says so."""
        self.settle_unknown(rows, now=float("inf"))
        for instance in self.table.in_states(frozenset({State.UNKNOWN})):
            with self.table.locked():
                if instance.state is not State.UNKNOWN:
                    continue
                self.table.move(instance, State.GONE)
            log.info("The lost create %s never appeared; counting it as not made", instance.label)
            self.ledger.destroyed(instance.label)

    def finish_all(self, doomed: Iterable[tuple[Instance, str]], deadline: float) -> None:
        """Destroy claimed instances: several in one batch destroy, confirmed by list rounds
        (Vast.ai allows one destroy every 3 s and one show every 2 s, but one list a second
        for all), then whatever that left one by one, side by side, each on a daemon thread
        of its own. Waits until ``deadline`` (monotonic) at most: a hung destroy never holds
        up the others, nor the end of the process (what is left stays ``destroying``)."""
        doomed = list(doomed)
        batch = self._take(doomed)
        if len(batch) > 1:
            self._destroy_batch(batch, deadline)
        elif batch:
            self._release(batch)
        doomed = [(i, reason) for i, reason in doomed if i.state is not State.GONE]
        threads = [
            threading.Thread(target=self.finish, args=pair, name="vastai-destroy", daemon=True)
            for pair in doomed
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _take(self, doomed: list[tuple[Instance, str]]) -> list[tuple[Instance, str]]:
        """The claimed instances no other thread is destroying, now marked as in progress."""
        with self.table.locked():
            taken = [
                (i, reason)
                for i, reason in doomed
                if i.state is State.DESTROYING
                and i.instance_id is not None
                and id(i) not in self._in_progress
            ]
            self._in_progress.update(id(i) for i, _ in taken)
        return taken

    def _release(self, taken: list[tuple[Instance, str]]) -> None:
        with self.table.locked():
            self._in_progress.difference_update(id(i) for i, _ in taken)
            self.table.notify()

    def _destroy_batch(self, batch: list[tuple[Instance, str]], deadline: float) -> None:
        """One batch destroy, then list rounds until every one of them is gone, the rounds
        stop showing progress, or the deadline; those still listed are left to the caller."""
        try:
            for instance, reason in batch:
                self._announce(instance, reason)
            ids = [i.instance_id for i, _ in batch if i.instance_id is not None]
            try:
                ended_at = self.market.request_destroy_many(
                    ids, give_up=lambda: time.monotonic() > deadline
                )
            except MarketplaceError as error:
                log.debug("The batch destroy failed (%s); destroying one by one", error)
                return
            waiting = [i for i, _ in batch]
            for _ in range(CONFIRM_ROUNDS):
                if not waiting or time.monotonic() > deadline:
                    return
                try:
                    listed = {row.id for row in self.market.list_instances()}
                except MarketplaceError as error:
                    log.debug("Could not confirm the batch destroy: %s", error)
                    return
                for instance in [i for i in waiting if i.instance_id not in listed]:
                    self._gone(instance, ended_at)
                    waiting.remove(instance)
                if waiting:
                    time.sleep(CONFIRM_PAUSE_SECONDS)
        finally:
            self._release(batch)

    def _destroy_now(self, instance: Instance, reason: str) -> bool:
        """One instance: its destroy sent and confirmed (by show), then it is gone."""
        self._announce(instance, reason)
        ended_at = None
        if instance.instance_id is not None:
            try:
                ended_at = self.market.destroy(instance.instance_id)
            except MarketplaceError as error:
                if instance.destroy_error is None:
                    log.error(
                        "Could not destroy %s yet: %s. Retrying; if this run ends first, run "
                        "'snakemake-vastai reap' or destroy it in the Vast.ai console.",
                        instance.name,
                        error,
                    )
                instance.destroy_error = str(error)
                return False
        self._gone(instance, ended_at)
        return True

    def _gone(self, instance: Instance, ended_at: float | None = None) -> None:
        """The marketplace confirmed it gone: closing its SSH connection (which may wait on
        a reconnect) and the ledger come after, and neither can keep it from gone.
        ``ended_at``: when the destroy that ended it was sent, where Vast.ai's bill for it
        ends (the confirmation comes later); unknown: now."""
        threading.Thread(target=instance.close, name="vastai-ssh-close", daemon=True).start()
        try:
            self.ledger.data_billed(instance.label, instance.data_cost())
            self.ledger.destroyed(instance.label, ended_at)
        except OSError as error:  # a later reap finds it gone: no harm, only a stale record
            log.warning("Could not record that %s is destroyed: %s", instance.name, error)
        if instance.destroy_error is not None:  # an error was reported: say it is settled
            say("Destroyed %s after a failed attempt", instance.name)
        with self.table.locked():
            instance.gone_at = ended_at if ended_at is not None else time.time()
            instance.destroy_error = None
            self.table.move(instance, State.GONE)

    def _announce(self, instance: Instance, reason: str) -> None:
        """The first attempt says why the instance goes; a retry only under --verbose."""
        if instance.instance_id is None:
            return
        if instance.label in self._announced:
            log.debug("Destroying %s again (%s)", instance.name, reason)
            return
        self._announced.add(instance.label)
        say("Destroying %s: %s", instance.name, reason)
