"""Every instance of the run: renting, booting, leasing, taking back, and destroying.

Why one owner for all instances: a finished instance waits in the pool for the next job it
can serve (same image, GPU model and count, location and host filters; at least as many
cores, as much RAM and disk), which skips rent, image pull, boot and bootstrap. Teardown
(Ctrl-C, SIGTERM, SIGHUP, a crash in the status thread, interpreter exit) must find every
instance ever rented, including one whose create request is still in flight, and the status
loop watches them all with a single list call per round instead of one call per instance.

Lock order: the pool's lock, then an instance's own condition; never the other way round.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from snakemake_interface_common.exceptions import WorkflowError

from snakemake_executor_plugin_vastai.bootstrap import ONSTART_SCRIPT, BootstrapPlan
from snakemake_executor_plugin_vastai.demand import Demand
from snakemake_executor_plugin_vastai.instance import Instance, InstanceFailure, State
from snakemake_executor_plugin_vastai.ledger import Ledger, make_label
from snakemake_executor_plugin_vastai.logger import get_logger
from snakemake_executor_plugin_vastai.marketplace import (
    Marketplace,
    MarketplaceError,
    Offer,
    OfferGone,
)
from snakemake_executor_plugin_vastai.resources import ResourceRequest, Signature
from snakemake_executor_plugin_vastai.sshkey import RunKey

log = get_logger(__name__)

BOOT_REFRESH_SECONDS = 1.0  # list call interval while anything boots
WATCH_REFRESH_SECONDS = 30.0  # otherwise: notice lost hosts and price changes
BUDGET_HORIZON_SECONDS = 900.0  # a new rent must leave room for this long at the full rate
SHUTDOWN_WAIT_SECONDS = 30.0  # for a destroy another thread has under way
ALIVE = (State.BOOTING, State.BOOTSTRAPPING, State.IDLE, State.BUSY)


class NoOfferError(WorkflowError):
    """No offer matches a job's request; the message says which filters to relax."""


class BudgetExceeded(WorkflowError):
    """A new rent would take the run past --vastai-budget."""


@dataclass(frozen=True)
class PoolConfig:
    run_id: str
    order: str
    boot_timeout: float
    keep_instances: bool
    bootstrap: BootstrapPlan
    ttl: float = 0.0
    max_instances: int = 1
    max_lifetime: float = 0.0
    max_price: float | None = None
    max_total_price: float | None = None
    budget: float | None = None


# -- decisions (pure, so they can be tested with a frozen clock) ---------------------------


def pick_idle(instances: Iterable[Instance], wanted: Signature) -> Instance | None:
    """The idle instance to lease: one that can serve the job, cheapest first, then the
    most recently used (its caches are warmest)."""
    fitting = [
        i
        for i in instances
        if i.state == State.IDLE and not i.lost_reason and i.signature.can_serve(wanted)
    ]
    return min(fitting, key=lambda i: (i.dph_total, -(i.last_released_at or 0.0)), default=None)


def least_recently_used(instances: Iterable[Instance]) -> Instance | None:
    idle = [i for i in instances if i.state == State.IDLE]
    return min(idle, key=lambda i: i.last_released_at or 0.0, default=None)


def retire_reason(instance: Instance, now: float, config: PoolConfig, demand: Demand) -> str | None:
    """Why an idle (or just released) instance should be destroyed now; None keeps it."""
    if instance.lost_reason:
        return instance.lost_reason
    if config.max_price is not None and instance.dph_total > config.max_price:
        return (
            f"its price rose to ${instance.dph_total:.3f}/h, above --vastai-max-price "
            f"${config.max_price:.3f}/h"
        )
    if config.max_lifetime and now - instance.rented_at >= config.max_lifetime:
        return f"it is older than --vastai-pool-max-lifetime ({config.max_lifetime:g} s)"
    if not demand.wants(instance.signature):
        return "no job still to run can use it"
    if now - (instance.last_released_at or now) >= config.ttl:
        return f"it was idle for --vastai-pool-ttl ({config.ttl:g} s)"
    return None


def rent_refusal(rate: float, price: float, spend: float, config: PoolConfig) -> str | None:
    """Why renting one more instance at ``price`` $/h is not allowed now; None allows it.

    ``rate`` is what the run's live instances cost per hour, ``spend`` what it has cost.
    """
    if config.max_total_price is not None and rate + price > config.max_total_price + 1e-9:
        return (
            f"renting at ${price:.3f}/h would take the run to ${rate + price:.3f}/h, above "
            f"--vastai-max-total-price ${config.max_total_price:.3f}/h"
        )
    projected = spend + (rate + price) * BUDGET_HORIZON_SECONDS / 3600.0
    if config.budget is not None and projected > config.budget:
        return (
            f"the run has spent ${spend:.4f}; renting at ${price:.3f}/h could take it past "
            f"--vastai-budget ${config.budget:.2f} within {BUDGET_HORIZON_SECONDS / 60:.0f} min"
        )
    return None


class Pool:
    def __init__(
        self, market: Marketplace, ledger: Ledger, key: RunKey, config: PoolConfig
    ) -> None:
        self.market = market
        self.ledger = ledger
        self.key = key
        self.config = config
        self.demand = Demand()
        self._instances: list[Instance] = []
        self._changed = threading.Condition()
        self._reserved = 0  # rents under way that do not have an instance object yet
        self._offers_in_flight: set[int] = set()  # our own concurrent rents never race
        self._closing = False
        self._last_refresh = 0.0
        self._serial = itertools.count(1)

    # -- handing out and taking back -----------------------------------------------------

    def acquire(
        self, request: ResourceRequest, tag: str, counted: Iterable[Signature] = ()
    ) -> Instance:
        """A ready instance for this request, marked busy: an idle one when one fits (no API
        call at all), a new one otherwise. ``counted`` are the job's signatures in the
        workflow's demand, counted off as soon as the job holds (or rents) an instance.
        When no offer is left but one of the run's own busy instances could serve the job,
        wait for it instead of failing."""
        wanted = request.signature()
        counted = list(counted)
        while True:
            instance = self._lease_or_reserve(request, tag, counted)
            if instance is not None:
                return instance
            try:
                instance = self._rent(request, tag)
            except NoOfferError:
                with self._changed:
                    self._reserved -= 1
                    if not self._will_free_up(wanted):
                        raise
                    log.info(
                        "No offer left for %s: waiting for one of the run's instances", request.rule
                    )
                    self._changed.wait(timeout=5.0)
                continue
            with self._changed:
                self._reserved -= 1
            break
        try:
            self._prepare(instance)
        except BaseException:
            self.destroy(instance, "it could not be prepared")
            raise
        with self._changed:
            self._lease(instance, tag)
        return instance

    def _lease_or_reserve(
        self, request: ResourceRequest, tag: str, counted: list[Signature]
    ) -> Instance | None:
        """Lease a fitting idle instance (returned), or reserve a slot to rent one (None),
        evicting the least recently used idle instance or waiting while the pool is full."""
        wanted = request.signature()
        while True:
            victim = None
            with self._changed:
                self._check_open()
                instance = pick_idle(self._instances, wanted)
                if instance is not None:
                    self._lease(instance, tag)
                    self.demand.submitted(counted)
                    counted.clear()  # counted off once, however often this job waits
                    log.info("Reusing %s for %s (no rent, no boot)", instance.name, request.rule)
                    return instance
                if self._alive() + self._reserved < self.config.max_instances:
                    self._reserved += 1
                    self.demand.submitted(counted)
                    counted.clear()
                    return None
                victim = least_recently_used(self._instances)
                if victim is None:
                    self._changed.wait(timeout=5.0)  # all busy or booting: wait for one
                    continue
                self._claim(victim)
            self._destroy_claimed(victim, "the pool is full and a job needs another signature")

    def _will_free_up(self, wanted: Signature) -> bool:
        """Whether a busy or booting instance of this run could take the job later."""
        return any(
            i.state in ALIVE and i.state != State.IDLE and i.signature.can_serve(wanted)
            for i in self._instances
        )

    def release(self, instance: Instance, healthy: bool) -> None:
        """The job on ``instance`` is over: keep it idle for the next job, or destroy it."""
        now = time.time()
        with self._changed:
            instance.jobs_run += 1
            instance.busy_seconds += now - (instance.busy_since or now)
            instance.busy_since = None
            instance.last_released_at = now
            if instance.state != State.BUSY:
                return  # destroyed under the job (teardown, lost host)
            if self.config.keep_instances:
                instance.set_state(State.IDLE)
                return
            reason = "its job failed" if not healthy else None
            reason = reason or retire_reason(instance, now, self.config, self.demand)
            if reason is None:
                instance.set_state(State.IDLE)
                self._changed.notify_all()
                return
            self._claim(instance)
        self._destroy_claimed(instance, reason)

    def sweep(self, now: float | None = None) -> None:
        """The reaper's round: destroy idle instances past TTL or lifetime, over the price
        cap, on a lost host or wanted by no remaining job. No API call unless one goes."""
        now = time.time() if now is None else now
        doomed = []
        with self._changed:
            if self.config.keep_instances:
                return
            for instance in self._instances:
                if instance.state == State.IDLE:
                    reason = retire_reason(instance, now, self.config, self.demand)
                    if reason is not None:
                        self._claim(instance)
                        doomed.append((instance, reason))
                elif instance.state == State.BUSY:
                    self._warn_price(instance)
        for instance, reason in doomed:
            self._destroy_claimed(instance, reason)

    # -- watching ------------------------------------------------------------------------

    def refresh_due(self) -> bool:
        with self._changed:
            alive = [i for i in self._instances if i.instance_id and i.state in ALIVE]
        if not alive:
            return False
        booting = any(i.state == State.BOOTING for i in alive)
        interval = BOOT_REFRESH_SECONDS if booting else WATCH_REFRESH_SECONDS
        return time.monotonic() - self._last_refresh >= interval

    def refresh(self) -> None:
        """One list call; every instance sees its own row (or its absence)."""
        self._last_refresh = time.monotonic()
        rows = {row.id: row for row in self.market.list_instances()}
        with self._changed:
            watched = [i for i in self._instances if i.instance_id and i.state != State.GONE]
        for instance in watched:
            row = rows.get(instance.instance_id)
            if row is not None and row.dph_total and row.dph_total != instance.dph_total:
                self.ledger.price_changed(instance.label, row.dph_total)
            instance.observe(row)

    def instances(self) -> list[Instance]:
        with self._changed:
            return list(self._instances)

    def spend(self, now: float | None = None) -> float:
        """Dollars this run's instances have cost so far (rent to destroy, at their price)."""
        now = time.time() if now is None else now
        with self._changed:
            return sum(i.cost(now) for i in self._instances if i.instance_id is not None)

    # -- destroying ----------------------------------------------------------------------

    def destroy(self, instance: Instance, reason: str) -> None:
        with self._changed:
            if instance.state in (State.DESTROYING, State.GONE):
                return
            self._claim(instance)
        self._destroy_claimed(instance, reason)

    def shutdown(self) -> None:
        """Destroy everything (in parallel), now and for any rent still in flight. Idempotent."""
        with self._changed:
            self._closing = True
            self._changed.notify_all()
            doomed = [i for i in self._instances if i.state != State.GONE]
        if self.config.keep_instances:
            kept = [i for i in doomed if i.instance_id]
            if kept:
                log.warning(
                    "--vastai-keep-instances: leaving %d instance(s) running and BILLING: %s. "
                    "Destroy them with 'snakemake-vastai reap --all' when done.",
                    len(kept),
                    ", ".join(str(i.instance_id) for i in kept),
                )
            return
        if doomed:
            with ThreadPoolExecutor(max_workers=min(8, len(doomed))) as workers:
                list(workers.map(self._make_sure_gone, doomed))

    def _make_sure_gone(self, instance: Instance) -> None:
        """Destroy it, or, when another thread is destroying it already (a cancelled job),
        wait for that; if it has not finished in time, finish it here. Job threads are
        daemons: the process may exit right after shutdown, so shutdown must not leave a
        destroy half done."""
        with self._changed:
            claimed_elsewhere = instance.state == State.DESTROYING
            if not claimed_elsewhere:
                self._claim(instance)
        if claimed_elsewhere:
            with instance.changed:
                instance.changed.wait_for(
                    lambda: instance.state == State.GONE, timeout=SHUTDOWN_WAIT_SECONDS
                )
            if instance.state == State.GONE:
                return
        self._destroy_claimed(instance, "the run is over")

    def _claim(self, instance: Instance) -> None:
        """Mark for destruction under the pool lock, so nobody leases it meanwhile."""
        instance.set_state(State.DESTROYING)
        self._changed.notify_all()

    def _destroy_claimed(self, instance: Instance, reason: str) -> None:
        """Destroy and confirm; on failure the ledger keeps it open for the next reap."""
        if instance.instance_id is not None:
            log.info("Destroying %s: %s", instance.name, reason)
        instance.close()
        if instance.instance_id is not None:
            try:
                self.market.destroy(instance.instance_id)
            except MarketplaceError as error:
                log.error(
                    "Could not destroy %s: %s. It may still be billing: run "
                    "'snakemake-vastai reap' or destroy it in the Vast.ai console.",
                    instance.name,
                    error,
                )
                return
        self.ledger.destroyed(instance.label)
        with self._changed:
            instance.gone_at = time.time()
            instance.set_state(State.GONE)
            self._changed.notify_all()

    # -- renting -------------------------------------------------------------------------

    def _rent(self, request: ResourceRequest, tag: str) -> Instance:
        query = request.offer_query()
        log.debug("Offer query for %s: %s (order %s)", request.rule, query, self.config.order)
        offers = self.market.search(query, self.config.order, request.disk_gb)
        if not offers:
            raise NoOfferError(no_offer_message(request, query))
        for offer in offers:
            with self._changed:
                if offer.id in self._offers_in_flight:
                    continue  # another job of this run is renting it right now
                self._offers_in_flight.add(offer.id)
            try:
                instance = self._rent_offer(request, tag, offer)
            finally:
                with self._changed:
                    self._offers_in_flight.discard(offer.id)
            if instance is not None:
                return instance
        raise NoOfferError(
            f"all {len(offers)} matching offers for {request.rule} were taken before they "
            "could be rented; the job will be retried if --retries allows"
        )

    def _rent_offer(self, request: ResourceRequest, tag: str, offer: Offer) -> Instance | None:
        """Rent this offer; None when it was taken meanwhile (offers are single-use)."""
        self._admit(offer.dph_total)
        label = make_label(self.config.run_id, f"{tag}-{next(self._serial)}")
        capacity = request.signature().with_capacity(
            offer.cpu_cores, offer.cpu_ram_mb / 1000, request.disk_gb
        )
        instance = Instance(label, capacity, offer, offer.dph_total)
        self._register(instance)
        self.ledger.rent_requested(label, self.config.run_id, offer.id, offer.dph_total)
        try:
            instance.instance_id = self.market.rent(
                offer.id,
                image=request.image,
                disk_gb=request.disk_gb,
                label=label,
                onstart=ONSTART_SCRIPT,
            )
        except OfferGone as gone:
            log.info("%s is gone (%s); trying the next offer", offer.describe(), gone)
            self._forget(instance)
            return None
        except BaseException:
            self._forget(instance)  # nothing was created under this label
            raise
        self.ledger.rented(label, instance.instance_id)
        instance.set_state(State.BOOTING)
        log.info("Rented %s: %s", instance.name, offer.describe())
        if self._is_closing():
            self.destroy(instance, "the run is shutting down")
            raise InstanceFailure("the run is shutting down")
        return instance

    def _admit(self, price: float) -> None:
        """Wait until a rent at ``price`` fits the total-price cap and the budget, evicting
        idle instances first; fail when waiting cannot help."""
        while True:
            victim = None
            with self._changed:
                self._check_open()
                live = [i for i in self._instances if i.state in ALIVE]
                refusal = rent_refusal(
                    sum(i.dph_total for i in live), price, self.spend(), self.config
                )
                if refusal is None:
                    return
                victim = least_recently_used(self._instances)
                if victim is None:
                    if self.config.budget is not None and "budget" in refusal:
                        raise BudgetExceeded(f"No new instance: {refusal}")
                    if not live:
                        raise NoOfferError(f"No new instance: {refusal}")
                    self._changed.wait(timeout=5.0)  # busy instances will free their share
                    continue
                self._claim(victim)
            self._destroy_claimed(victim, f"making room under the price caps ({refusal})")

    def _prepare(self, instance: Instance) -> None:
        deadline = time.monotonic() + self.config.boot_timeout
        assert instance.instance_id is not None
        self.market.attach_key(instance.instance_id, self.key.public_line)
        self._last_refresh = 0.0  # a new instance is booting: look soon
        instance.wait_until_running(deadline)
        instance.running_at = time.time()
        self.ledger.running(instance.label)
        instance.connect(self.key, deadline)
        instance.bootstrap(self.config.bootstrap)

    def _lease(self, instance: Instance, tag: str) -> None:
        instance.busy_since = time.time()
        instance.set_state(State.BUSY)
        self.ledger.job_ran(instance.label, tag)

    def _register(self, instance: Instance) -> None:
        with self._changed:
            self._check_open()
            self._instances.append(instance)

    def _forget(self, instance: Instance) -> None:
        """A create that did not happen: close its ledger entry and drop it."""
        self.ledger.destroyed(instance.label)
        with self._changed:
            instance.set_state(State.GONE)
            self._instances.remove(instance)

    def _alive(self) -> int:
        return sum(1 for i in self._instances if i.state in ALIVE)

    def _warn_price(self, instance: Instance) -> None:
        cap = self.config.max_price
        if cap is not None and instance.dph_total > cap and not instance.price_warned:
            instance.price_warned = True
            log.warning(
                "%s now costs $%.3f/h, above --vastai-max-price $%.3f/h: it is destroyed as "
                "soon as its current job ends.",
                instance.name,
                instance.dph_total,
                cap,
            )

    def _check_open(self) -> None:
        if self._closing:
            raise InstanceFailure("the run is shutting down")

    def _is_closing(self) -> bool:
        with self._changed:
            return self._closing


def no_offer_message(request: ResourceRequest, query: str) -> str:
    relax = [
        hint
        for present, hint in (
            (request.gpu_name, "another gpu_model (or none)"),
            (request.num_gpus > 1, "fewer GPUs"),
            (request.max_price, "a higher --vastai-max-price"),
            (request.geolocation, "a wider --vastai-geolocation"),
            (request.reliability, "a lower --vastai-reliability"),
            (request.datacenter_only, "--vastai-no-datacenter"),
            (request.mem_gb, "less mem_mb"),
            (request.cpu_cores, "fewer threads"),
            (request.extra_query, "fewer extra filters (--vastai-search-query / vastai_query)"),
        )
        if present
    ]
    return (
        f"No Vast.ai offer matches {request.rule} (query: {query}). "
        f"Try relaxing: {', '.join(relax) or 'the request'}."
    )
