"""Every instance of the run: renting, booting, handing out, taking back, and destroying.

Why one owner for all instances: teardown (Ctrl-C, SIGTERM, SIGHUP, a crash in the status
thread, interpreter exit) must find every instance that was ever rented, including one whose
create request is still in flight, and the status loop must watch them all with a single
list call per round instead of one call per instance.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from snakemake_interface_common.exceptions import WorkflowError

from snakemake_executor_plugin_vastai.bootstrap import ONSTART_SCRIPT, BootstrapPlan
from snakemake_executor_plugin_vastai.instance import Instance, InstanceFailure, State
from snakemake_executor_plugin_vastai.ledger import Ledger, make_label
from snakemake_executor_plugin_vastai.marketplace import Marketplace, MarketplaceError, OfferGone
from snakemake_executor_plugin_vastai.resources import ResourceRequest
from snakemake_executor_plugin_vastai.sshkey import RunKey

log = logging.getLogger(__name__)

BOOT_REFRESH_SECONDS = 2.0  # list call interval while anything boots
WATCH_REFRESH_SECONDS = 30.0  # otherwise: notice lost hosts and price changes


class NoOfferError(WorkflowError):
    """No offer matches a job's request; the message says which filters to relax."""


@dataclass(frozen=True)
class PoolConfig:
    run_id: str
    order: str
    boot_timeout: float
    keep_instances: bool
    bootstrap: BootstrapPlan


class Pool:
    def __init__(
        self, market: Marketplace, ledger: Ledger, key: RunKey, config: PoolConfig
    ) -> None:
        self.market = market
        self.ledger = ledger
        self.key = key
        self.config = config
        self._instances: list[Instance] = []
        self._lock = threading.Lock()
        self._closing = False
        self._last_refresh = 0.0
        self._serial = itertools.count(1)

    # -- handing out and taking back -----------------------------------------------------

    def acquire(self, request: ResourceRequest, tag: str) -> Instance:
        """A booted, bootstrapped instance for this request, marked busy."""
        instance = self._rent(request, tag)
        try:
            self._prepare(instance)
        except BaseException:
            self.destroy(instance)
            raise
        instance.set_state(State.BUSY)
        return instance

    def release(self, instance: Instance, healthy: bool) -> None:
        """The job on ``instance`` is over. Without a warm pool, the instance goes now."""
        instance.jobs_run += 1
        instance.last_released_at = time.time()
        if self.config.keep_instances:
            instance.set_state(State.IDLE)
            return
        self.destroy(instance)

    # -- watching ------------------------------------------------------------------------

    def refresh_due(self) -> bool:
        with self._lock:
            alive = [i for i in self._instances if i.instance_id and i.state != State.GONE]
        if not alive:
            return False
        booting = any(i.state == State.BOOTING for i in alive)
        interval = BOOT_REFRESH_SECONDS if booting else WATCH_REFRESH_SECONDS
        return time.monotonic() - self._last_refresh >= interval

    def refresh(self) -> None:
        """One list call; every instance sees its own row (or its absence)."""
        self._last_refresh = time.monotonic()
        rows = {row.id: row for row in self.market.list_instances()}
        with self._lock:
            watched = [i for i in self._instances if i.instance_id and i.state != State.GONE]
        for instance in watched:
            row = rows.get(instance.instance_id)
            if row is not None and row.dph_total and row.dph_total != instance.dph_total:
                self.ledger.price_changed(instance.label, row.dph_total)
            instance.observe(row)

    def instances(self) -> list[Instance]:
        with self._lock:
            return list(self._instances)

    # -- destroying ----------------------------------------------------------------------

    def destroy(self, instance: Instance) -> None:
        """Destroy and confirm; on failure the ledger keeps it open for the next reap."""
        with instance.changed:
            if instance.state in (State.DESTROYING, State.GONE):
                return
            instance.state = State.DESTROYING
            instance.changed.notify_all()
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
                instance.set_state(State.IDLE)
                return
        self.ledger.destroyed(instance.label)
        instance.gone_at = time.time()
        instance.set_state(State.GONE)

    def shutdown(self) -> None:
        """Destroy everything (in parallel), now and for any rent still in flight. Idempotent."""
        with self._lock:
            self._closing = True
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
        if not doomed:
            return
        with ThreadPoolExecutor(max_workers=min(8, len(doomed))) as workers:
            list(workers.map(self.destroy, doomed))

    # -- renting -------------------------------------------------------------------------

    def _rent(self, request: ResourceRequest, tag: str) -> Instance:
        query = request.offer_query()
        log.debug(
            "Vast.ai offer query for %s: %s (order %s)", request.rule, query, self.config.order
        )
        offers = self.market.search(query, self.config.order, request.disk_gb)
        if not offers:
            raise NoOfferError(no_offer_message(request, query))
        for offer in offers:
            label = make_label(self.config.run_id, f"{tag}-{next(self._serial)}")
            instance = Instance(label, request.signature(), offer, offer.dph_total)
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
                self.ledger.destroyed(label)
                instance.set_state(State.GONE)
                continue
            except BaseException:
                self.ledger.destroyed(label)  # nothing was created under this label
                instance.set_state(State.GONE)
                raise
            self.ledger.rented(label, instance.instance_id)
            instance.set_state(State.BOOTING)
            log.info("Rented %s: %s", instance.name, offer.describe())
            if self._is_closing():
                self.destroy(instance)
                raise InstanceFailure("the run is shutting down")
            return instance
        raise NoOfferError(
            f"all {len(offers)} matching offers for {request.rule} were taken before they "
            "could be rented; the job will be retried if --retries allows"
        )

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

    def _register(self, instance: Instance) -> None:
        with self._lock:
            if self._closing:
                raise InstanceFailure("the run is shutting down")
            self._instances.append(instance)

    def _is_closing(self) -> bool:
        with self._lock:
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


def run_quietly(action: Callable[[], None], what: str) -> None:
    """Teardown helpers must never raise: log and go on destroying the rest."""
    try:
        action()
    except Exception as error:
        log.error("%s failed: %s", what, error)
