"""The warm pool: where each job runs. It hands a job a share (slots) of a live instance of
its signature, or reserves and rents a new one, takes shares back, retires instances, and
tears everything down.

The parts it leans on each have one job: the :class:`InstanceTable` owns the lock and the
legal moves, the :class:`Renter` turns a reservation into an instance under the caps, the
:class:`Preparer` boots and bootstraps it, the :class:`Destroyer` never forgets an instance
the marketplace has not confirmed gone. What is left here is the order of things: a job
first takes a free share of a live (or booting) instance, then waits for a rent of its kind
already under way, then reserves a rent of its own (evicting an idle instance of another
kind when the pool is full), and waits, rather than fails, whenever one of the run's own
instances will free what it needs. A job waits for capacity, not for one instance: a share
that comes free first takes it, from a boot or from a create still waiting for its turn.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from snakemake_executor_plugin_vastai.base.logger import get_logger
from snakemake_executor_plugin_vastai.base.report import count, say
from snakemake_executor_plugin_vastai.market.hosts import ExcludedHosts
from snakemake_executor_plugin_vastai.market.marketplace import (
    CreateOutcomeUnknown,
    Marketplace,
    MarketplaceError,
)
from snakemake_executor_plugin_vastai.market.pacer import LIMITS
from snakemake_executor_plugin_vastai.market.request import ResourceRequest, Signature
from snakemake_executor_plugin_vastai.market.shares import Needs
from snakemake_executor_plugin_vastai.pool.adoption import Adoption
from snakemake_executor_plugin_vastai.pool.caps import Caps
from snakemake_executor_plugin_vastai.pool.demand import Demand
from snakemake_executor_plugin_vastai.pool.destroyer import (
    ROUND_SECONDS,
    UNKNOWN_GRACE_SECONDS,
    Destroyer,
)
from snakemake_executor_plugin_vastai.pool.instance import Instance, InstanceFailure
from snakemake_executor_plugin_vastai.pool.keeping import Keeping, keepable
from snakemake_executor_plugin_vastai.pool.ledger import Ledger, make_label
from snakemake_executor_plugin_vastai.pool.preparer import Preparer, unprepared_reason
from snakemake_executor_plugin_vastai.pool.progress import BootProgress, short_name
from snakemake_executor_plugin_vastai.pool.renter import (
    CapRefusal,
    NoOfferError,
    OfferSearch,
    Renter,
    RentNotNeeded,
    RentPlan,
)
from snakemake_executor_plugin_vastai.pool.slots import Lease
from snakemake_executor_plugin_vastai.pool.states import READY, STARTING, USABLE, State
from snakemake_executor_plugin_vastai.pool.table import InstanceTable
from snakemake_executor_plugin_vastai.remote.bootstrap import BootstrapPlan, onstart_script
from snakemake_executor_plugin_vastai.remote.sshkey import RunKey

log = get_logger(__name__)

BOOT_REFRESH_SECONDS = 1.0  # list call interval while anything boots or is unknown
WATCH_REFRESH_SECONDS = 30.0  # otherwise: notice lost hosts and price changes
REFRESH_SLACK_SECONDS = 0.2  # the reaper's 0.5 s rounds must not skip a due refresh
WAIT_SECONDS = 1.0  # a waiting job re-checks at least this often
RENT_ATTEMPTS = 3  # creates whose answer was lost, per job, before it fails
RENT_BACKOFF_SECONDS = 1.0
# Instances a job may see fail to boot before it fails. A failed boot is nearly always its
# machine's fault (a pull that broke, a full disk, a host gone offline), so the job moves on
# to another machine; a bad image fails at once instead (marketplace.image_fault).
BOOT_ATTEMPTS = 3
# A job waits this long for a busy ready instance of its kind before it rents (see patient).
RENT_PATIENCE_SECONDS = 5.0
ORPHAN_WAIT_SECONDS = 60.0  # the first rent waits this long at most for the orphan reap
SHUTDOWN_WAIT_SECONDS = 30.0  # for creates still in flight at teardown
TEARDOWN_SECONDS = 120.0  # the teardown, plus each instance's destroy turn (teardown_budget)
PREPARE_GRACE_SECONDS = 1800.0  # bootstrap (pip installs) on top of the boot timeout


LOGGED_IN = (State.BOOTSTRAPPING, State.IDLE, State.BUSY)
# Instances that will be idle (and so evictable) later: a job under a price cap waits for them.
BUSY_OR_COMING = frozenset({State.RENTING, State.BOOTING, State.BOOTSTRAPPING, State.BUSY})


@dataclass(frozen=True)
class PoolConfig:
    run_id: str
    order: str
    boot_timeout: float
    keep_instances: bool
    bootstrap: BootstrapPlan
    ttl: float = 0.0
    max_lifetime: float = 0.0
    max_price: float | None = None
    caps: Caps = field(default_factory=Caps)
    pack: bool = True
    bid_factor: float = 1.0
    keep_warm: float = 0.0  # seconds idle instances stay up past the run's end; 0: none
    stop_after: float = 0.0  # seconds idle before an instance is stopped; 0: never
    start_timeout: float = 120.0  # for a stopped instance to run again


@dataclass(frozen=True, eq=False)
class Placement:
    """Where one job runs: an instance and the job's share of it."""

    instance: Instance
    lease: Lease


@dataclass
class Seeker:
    """One job looking for its place, and what its search met so far."""

    request: ResourceRequest
    tag: str
    signatures: tuple[Signature, ...]  # the job's in the workflow's demand
    wanted: Signature = field(init=False)
    needs: Needs = field(init=False)
    counted: list[Signature] = field(init=False)  # still counted in the demand; [] once placed
    lost_creates: int = 0
    failed_boots: int = 0
    said_refusal: str = ""
    since: float = field(default_factory=time.monotonic)  # when it began to look

    def __post_init__(self) -> None:
        self.wanted = self.request.signature()
        self.needs = self.request.needs()
        self.counted = list(self.signatures)


GIVEN_UP = "its jobs went to ready instances and no job still to run needs it"


# -- decisions (pure, so they can be tested with a frozen clock) ---------------------------


def teardown_budget(billing: int) -> float:
    """How long a teardown may take: TEARDOWN_SECONDS, plus a destroy turn per instance that
    may bill (Vast.ai allows one destroy every 3 s: forty instances take two minutes alone,
    and a teardown that gave up sooner would leave some billing)."""
    return TEARDOWN_SECONDS + billing * LIMITS["destroy"].seconds


def could_hold(instance: Instance, wanted: Signature, needs: Needs) -> bool:
    """Of the job's kind, sound, not on its way out, and big enough for the job alone."""
    return (
        instance.retiring is None
        and not instance.lost_reason
        and instance.slots is not None
        and instance.signature.can_serve(wanted)
        and instance.slots.capacity.holds(needs)
    )


def pick_instance(
    instances: Iterable[Instance], wanted: Signature, needs: Needs
) -> Instance | None:
    """The instance to place a job on: one of its kind with room for it now. Ready ones
    before booting ones, then the cheapest, then the most recently used (warmest caches)."""
    fitting = [
        i
        for i in instances
        if i.state in USABLE
        and could_hold(i, wanted, needs)
        and i.slots is not None
        and i.slots.fits(needs)
    ]
    return min(
        fitting,
        key=lambda i: (i.state in STARTING, i.dph_total, -(i.last_released_at or 0.0)),
        default=None,
    )


def pick_ready(instances: Iterable[Instance], wanted: Signature, needs: Needs) -> Instance | None:
    """A ready instance with room for the job now: where a job waiting for a boot goes."""
    return pick_instance((i for i in instances if i.state in READY), wanted, needs)


def least_recently_used(instances: Iterable[Instance]) -> Instance | None:
    """The idle instance to evict first: idle or stopped (its stop through), used longest
    ago."""
    idle = [
        i
        for i in instances
        if i.state is State.IDLE or (i.state is State.STOPPED and i.stopped_at is not None)
    ]
    return min(idle, key=lambda i: i.last_released_at or 0.0, default=None)


def retire_reason(
    instance: Instance, now: float, config: PoolConfig, demand: Demand, awaited: bool = False
) -> str | None:
    """Why an idle (or just emptied) instance should be destroyed now; None keeps it.
    ``awaited``: a job waiting for another instance's boot could start on it now."""
    if instance.retiring:
        return instance.retiring
    if instance.lost_reason:
        return instance.lost_reason
    if config.max_price is not None and instance.dph_total > config.max_price:
        return (
            f"its price rose to ${instance.dph_total:.3f}/h, above --vastai-max-price "
            f"${config.max_price:.3f}/h"
        )
    if config.max_lifetime and now - instance.rented_at >= config.max_lifetime:
        return f"it is older than --vastai-pool-max-lifetime ({config.max_lifetime:g} s)"
    if awaited:
        return None
    if not demand.wants(instance.signature) and not config.keep_warm:
        return "no job still to run can use it"  # kept warm, it may serve the next run
    if now - (instance.last_released_at or now) >= config.ttl:
        return f"it was idle for --vastai-pool-ttl ({config.ttl:g} s)"
    return None


def patient(seeker: Seeker, instances: Iterable[Instance], now: float) -> bool:
    """Should the job wait a little for a ready instance of its kind to finish its job,
    rather than rent? A rent is a create, a boot of minutes and a destroy; the jobs of a
    fan-out or a rerun are often shorter than RENT_PATIENCE_SECONDS. A job that waited that
    long rents: a long job costs it those seconds, next to a boot of minutes."""
    if now - seeker.since >= RENT_PATIENCE_SECONDS:
        return False
    return any(
        i.state is State.BUSY and could_hold(i, seeker.wanted, seeker.needs) for i in instances
    )


def pick_stopped(instances: Iterable[Instance], wanted: Signature, needs: Needs) -> Instance | None:
    """A stopped instance of the job's kind that can hold it: started again, it costs no
    rent and no image pull. The cheapest, then the most recently used."""
    fitting = [
        i
        for i in instances
        if i.state is State.STOPPED
        and i.stopped_at is not None  # its stop went through
        and could_hold(i, wanted, needs)
    ]
    return min(fitting, key=lambda i: (i.dph_total, -(i.last_released_at or 0.0)), default=None)


def stop_due(instance: Instance, now: float, config: PoolConfig) -> bool:
    """Has an idle instance run idle long enough to be stopped instead?"""
    idle_since = instance.last_released_at or instance.running_at or now
    return bool(config.stop_after) and now - idle_since >= config.stop_after


def pending_rent_for(instances: Iterable[Instance], wanted: Signature) -> bool:
    """Is a rent of this job's kind under way? Its machine may have room for the job too."""
    return any(i.state is State.RENTING and i.signature.same_kind(wanted) for i in instances)


def will_free_up(instances: Iterable[Instance], wanted: Signature, needs: Needs) -> bool:
    """Could one of the run's own instances (or a rent under way) take the job later?"""
    return any(
        (
            i.state in USABLE
            and i.slots is not None
            and i.slots.capacity.holds(needs)
            and i.signature.can_serve(wanted)
            and not i.lost_reason
        )
        or i.state is State.RENTING
        for i in instances
    )


class Pool:
    def __init__(
        self, market: Marketplace, ledger: Ledger, key: RunKey, config: PoolConfig
    ) -> None:
        self.market = market
        self.ledger = ledger
        self.key = key
        self.config = config
        self.demand = Demand()
        self.table = InstanceTable()
        self.destroyer = Destroyer(market, ledger, self.table)
        self.excluded = ExcludedHosts()
        self.renter = Renter(
            market,
            ledger,
            self.table,
            OfferSearch(market, config.order),
            RentPlan(
                config.run_id,
                config.caps,
                exclusive=not config.pack,
                onstart=onstart_script(key.public_line, config.bootstrap),
                bid_factor=config.bid_factor,
            ),
            self.spend,
            self.excluded,
        )
        self.preparer = Preparer(
            market,
            ledger,
            key,
            self.table,
            self.destroyer,
            self.excluded,
            config.boot_timeout,
            config.bootstrap,
            self.look_soon,
            config.start_timeout,
        )
        self.orphans_reaped = threading.Event()  # set by the reaper once orphans are sent off
        self.boot_progress = BootProgress(market.redact)
        self._serial = itertools.count(1)
        self._last_refresh = 0.0
        self._awaiting_boot: list[Seeker] = []  # under the table's lock
        self._teardown_deadline: float | None = None  # monotonic, once the teardown began

    # -- instances an earlier run kept ------------------------------------------------------

    def adopt_kept(self) -> list[Instance]:
        """Take over the instances an earlier run of this workdir kept warm that this run's
        jobs can use (call once the demand is counted, before the first rent)."""
        adoption = Adoption(
            self.market,
            self.ledger,
            self.table,
            self.demand,
            self.config.run_id,
            self.config.bootstrap,
            self.config.pack,
        )
        return adoption.adopt(room=self.config.caps.max_instances - len(self.table.counted()))

    # -- placing a job ---------------------------------------------------------------------

    def acquire(
        self, request: ResourceRequest, tag: str, counted: Iterable[Signature] = ()
    ) -> Placement:
        """A share of a ready instance for this job: of a live one when one has room (no API
        call at all), of a new one otherwise. ``counted`` are the job's signatures in the
        workflow's demand, counted off once the job is placed: while it waits, it still
        wants instances of its kind, so none is retired under it. A job waits for capacity,
        not for one instance: placed on one that is still booting, it takes a share that is
        ready first elsewhere, and when its instance fails to boot it looks again."""
        seeker = Seeker(request, tag, tuple(counted))
        while True:
            placement = self._placement(seeker)
            if placement is None:
                continue
            ready = self._wait_ready(placement, seeker)
            if ready is not None:
                return ready

    def _placement(self, seeker: Seeker) -> Placement | None:
        """A share for the job (maybe of an instance still booting), or None after a wait
        when there is none yet."""
        step = self._next_step(seeker)
        if isinstance(step, Placement):
            return step
        if step is None:
            self.table.wait(WAIT_SECONDS)
            return None
        if step.state is State.DESTROYING:  # an idle instance evicted to make room
            self.destroyer.finish(step, "the pool is full and a job needs another kind")
            return None
        try:
            with self._reservation(step):
                return self._rent(step, seeker)
        except RentNotNeeded:
            return None  # a share came free while the create waited: the next step takes it
        except (NoOfferError, CapRefusal) as refusal:
            self._wait_out_refusal(refusal, seeker)
        except CreateOutcomeUnknown as error:
            seeker.lost_creates += 1
            if seeker.lost_creates >= RENT_ATTEMPTS:
                raise InstanceFailure(
                    f"could not rent an instance for {seeker.request.rule}: {error}"
                ) from None
            self.table.wait(RENT_BACKOFF_SECONDS * seeker.lost_creates)
        return None

    def _wait_out_refusal(self, refusal: NoOfferError | CapRefusal, seeker: Seeker) -> None:
        """No offer, or none under the caps: wait when one of the run's own instances will
        free what the job needs (or an eviction makes room), else raise the refusal."""
        price_bound = isinstance(refusal, CapRefusal)
        if price_bound and self._evict_idle("the run's price cap needs room for a job"):
            return
        with self.table.locked():
            instances = self.table.all()
            if not will_free_up(instances, seeker.wanted, seeker.needs) and not (
                price_bound and any(i.state in BUSY_OR_COMING for i in instances)
            ):
                raise refusal
        # the headline only: a job that waits needs no diagnosis of the market
        reason = refusal.headline if isinstance(refusal, NoOfferError) else str(refusal)
        if reason != seeker.said_refusal:  # once, not every round of the wait
            seeker.said_refusal = reason
            say("%s Waiting for one of the run's instances.", reason)
        self.table.wait(WAIT_SECONDS)

    def _evict_idle(self, reason: str) -> bool:
        """Destroy the least recently used idle instance (of another kind: one of the job's
        own kind with room would have taken it) to make room under a cap; False if none."""
        with self.table.locked():
            victim = least_recently_used(self.table.all())
            if victim is None or not self.destroyer.claim(victim):
                return False
        self.destroyer.finish(victim, reason)
        return True

    def _next_step(self, seeker: Seeker) -> Placement | Instance | None:
        """Under the lock: a placement, a reservation (renting), an eviction (destroying),
        or None to wait for the table to change."""
        with self.table.locked():
            self.table.check_open()
            instances = self.table.all()
            chosen = pick_instance(instances, seeker.wanted, seeker.needs)
            if chosen is not None:
                self._count_off(seeker)
                return self._place(chosen, seeker.needs, seeker.tag)
            if self.config.pack and pending_rent_for(instances, seeker.wanted):
                return None
            if patient(seeker, instances, time.monotonic()):
                return None
            asleep = pick_stopped(instances, seeker.wanted, seeker.needs)
            if asleep is not None:
                self._count_off(seeker)
                return self._wake(asleep, seeker)
            if len(self.table.counted()) < self.config.caps.max_instances:
                label = make_label(self.config.run_id, f"{seeker.tag}-{next(self._serial)}")
                reserved = Instance(label, seeker.wanted)
                self.table.add(reserved)
                return reserved
            victim = least_recently_used(instances)
            if victim is not None and self.destroyer.claim(victim):
                return victim
            return None

    def _wake(self, asleep: Instance, seeker: Seeker) -> Placement:
        """Under the lock: start a stopped instance again for the job (no rent, no image
        pull), the job placed on it as on any instance still starting."""
        stopped_for = asleep.stopped_for(time.time())
        asleep.started(time.time())
        self.table.move(asleep, State.BOOTING)
        say(
            "Starting %s again for %s (stopped %.0f s ago: no rent, no image pull)",
            short_name(asleep),
            seeker.tag,
            stopped_for,
        )
        placement = self._place(asleep, seeker.needs, seeker.tag, quiet=True)
        self.preparer.start(asleep, again=True)
        return placement

    def _count_off(self, seeker: Seeker) -> None:
        """The job is placed: it no longer counts as a job still to come (once, however
        often it waits)."""
        self.demand.submitted(seeker.counted)
        seeker.counted.clear()

    def _place(
        self,
        instance: Instance,
        needs: Needs,
        tag: str,
        moved_from: Instance | None = None,
        quiet: bool = False,
    ) -> Placement:
        assert instance.slots is not None
        if instance.slots.empty and instance.state in READY:  # a boot's wait is no work
            instance.busy_since = time.time()
        beside = len(instance.slots.leases)
        lease = instance.slots.take(needs)
        was_idle = instance.state is State.IDLE
        if was_idle:
            self.table.move(instance, State.BUSY)
        if moved_from is not None:
            say(
                "Moving %s to %s, which is ready, from %s (still starting)",
                tag,
                short_name(instance),
                short_name(moved_from),
            )
        elif was_idle:
            say("Reusing %s for %s (no rent, no boot)", short_name(instance), tag)
        elif not quiet:
            still = " (still booting)" if instance.state in STARTING else ""
            jobs = count(beside, "job")
            say("Packing %s onto %s%s beside %s", tag, short_name(instance), still, jobs)
        self.ledger.job_ran(instance.label, tag)
        return Placement(instance, lease)

    @contextmanager
    def _reservation(self, reserved: Instance) -> Iterator[Instance]:
        """A rent's reservation counts toward every cap from the start; released on every
        path that rents nothing. A create with a lost answer stays (as unknown). One that
        was created but escapes with an error before its preparation starts (a ledger write
        that failed, say) is destroyed, never dropped: nobody else would prepare it."""
        try:
            yield reserved
        except BaseException as error:
            with self.table.locked():
                if reserved.state is State.RENTING:
                    self.table.drop_reservation(reserved)
                unprepared = reserved.state in STARTING
                if unprepared:
                    reserved.failure = reserved.failure or str(error)
            if unprepared:
                self.destroyer.destroy(reserved, unprepared_reason(reserved, error))
            raise

    def _rent(self, reserved: Instance, seeker: Seeker) -> Placement:
        """Rent the reservation with the job's share in it, and start preparing it (on a
        thread of its own): the job waits for it like any other job placed there."""
        if not self.orphans_reaped.wait(ORPHAN_WAIT_SECONDS):
            log.warning("The search for instances of dead earlier runs is slow; renting anyway")
        with self.table.locked():
            self.table.check_open()
        lease = self.renter.rent(reserved, seeker.request, lambda: self._free_share(seeker))
        placement = Placement(reserved, lease)
        assert reserved.offer is not None
        say("Rented %s for %s, %s", short_name(reserved), seeker.tag, reserved.offer.describe())
        self._count_off(seeker)
        self.ledger.job_ran(reserved.label, seeker.tag)
        self.preparer.start(reserved)
        return placement

    def _wait_ready(self, placement: Placement, seeker: Seeker) -> Placement | None:
        """For a job placed on an instance still starting: wait until it is ready, or until
        a share of its kind is ready elsewhere first (the job moves there). None: the
        instance failed to boot in a way another machine need not share, so the job looks
        for a place again; any other failure is the job's, with the reason."""
        instance = placement.instance
        # The preparing thread always ends a boot (ready, or destroyed); the bound is a guard.
        limit = self.config.boot_timeout + PREPARE_GRACE_SECONDS
        deadline = time.monotonic() + limit
        while True:
            if not self._wait_settled(instance, seeker, deadline):
                instance.failure = f"{instance.name} was not ready after {limit:.0f} s"
                self.destroyer.destroy(instance, f"it was not ready after {limit:.0f} s")
            moved = self.move_to_ready(placement, seeker)
            if moved is not None:
                return moved
            with self.table.locked():
                if instance.state in READY:
                    return placement
                if instance.state in STARTING and instance.failure is None:
                    continue  # the ready share went to another job first
                if instance.slots is not None and placement.lease in instance.slots.leases:
                    instance.slots.give_back(placement.lease)
                reason = instance.failure or f"{instance.name} was destroyed before it was ready"
                break
        self.table.check_open()
        if not instance.machine_fault:
            raise InstanceFailure(reason)
        seeker.failed_boots += 1
        if seeker.failed_boots >= BOOT_ATTEMPTS:
            raise InstanceFailure(
                f"{count(seeker.failed_boots, 'instance')} failed to boot, each on another "
                f"machine; the last: {reason}"
            )
        say("%s did not boot; renting another for %s", short_name(instance), seeker.tag)
        self.demand.returned(seeker.signatures)
        seeker.counted = list(seeker.signatures)
        return None

    def _wait_settled(self, instance: Instance, seeker: Seeker, deadline: float) -> bool:
        """Wait, counted among the jobs awaiting a boot, until the job's instance is settled
        (see `_settled`); False at the deadline."""
        with self.table.locked():
            self._awaiting_boot.append(seeker)
        try:
            return self.table.wait_for(
                lambda: self._settled(instance, seeker), max(0.0, deadline - time.monotonic())
            )
        finally:
            with self.table.locked():
                self._awaiting_boot.remove(seeker)

    def _free_share(self, seeker: Seeker) -> bool:
        """Is a share for this job free right now (ready or booting)? Asked while its create
        waits for its turn: under Vast.ai's create rate limit that wait is seconds, and a
        job of a few seconds frees a share sooner."""
        with self.table.locked():
            return pick_instance(self.table.all(), seeker.wanted, seeker.needs) is not None

    def _awaited(self, instance: Instance) -> bool:
        """Under the lock: could a job waiting for a boot start on this instance now?"""
        return instance.slots is not None and any(
            instance.signature.can_serve(s.wanted) and instance.slots.fits(s.needs)
            for s in self._awaiting_boot
        )

    def _settled(self, instance: Instance, seeker: Seeker) -> bool:
        """Under the lock: the job's instance is ready, or its preparation has said why it
        never will be, or a share of the job's kind is ready elsewhere."""
        return (
            instance.state in READY
            or instance.failure is not None
            or instance.state is State.GONE
            or pick_ready(self.table.all(), seeker.wanted, seeker.needs) is not None
        )

    def move_to_ready(self, placement: Placement, seeker: Seeker) -> Placement | None:
        """The job's share moves from its instance, still starting, to a ready one with
        room; None when there is none (or its own is ready). The starting instance is given
        up (destroyed) when no job is left on it and no job still to come could use it."""
        starting = placement.instance
        with self.table.locked():
            warm = pick_ready(self.table.all(), seeker.wanted, seeker.needs)
            if starting.state not in STARTING or warm is None:
                return None
            assert starting.slots is not None
            starting.slots.give_back(placement.lease)
            moved = self._place(warm, seeker.needs, seeker.tag, moved_from=starting)
            given_up = self._deserted(starting) and self.destroyer.claim(starting)
        if given_up:
            self.destroyer.finish(starting, GIVEN_UP)
        return moved

    def _deserted(self, starting: Instance) -> bool:
        """Under the lock: a starting instance whose jobs all went elsewhere, which no job
        still to come can use: its boot would only add to the bill."""
        return (
            starting.slots is not None
            and starting.slots.empty
            and not self.demand.wants(starting.signature)
            and not self._awaited(starting)
        )

    # -- taking back -----------------------------------------------------------------------

    def release(self, placement: Placement, healthy: bool, host_fault: str = "") -> None:
        """The job is over: give its share back; keep the instance for the next job, or
        retire it (after its other jobs, when it runs any). ``host_fault``: the job failed
        through its host (not its own exit code), so that machine is not rented again."""
        instance = placement.instance
        if host_fault:
            self.excluded.exclude(instance.offer, host_fault)
        now = time.time()
        with self.table.locked():
            assert instance.slots is not None
            if placement.lease in instance.slots.leases:
                instance.slots.give_back(placement.lease)
            instance.jobs_run += 1
            if not healthy and instance.retiring is None:
                instance.retiring = "a job on it failed"
            if instance.slots.empty:
                instance.busy_seconds += now - (instance.busy_since or now)
                instance.busy_since = None
                instance.last_released_at = now
            self.table.notify()
            if instance.state is not State.BUSY or not instance.slots.empty:
                return  # destroyed or lost under the job, or other jobs still run on it
            if self.config.keep_instances:
                self.table.move(instance, State.IDLE)
                return
            awaited = self._awaited(instance)
            reason = retire_reason(instance, now, self.config, self.demand, awaited)
            if reason is None:
                self.table.move(instance, State.IDLE)
                return
            self.destroyer.claim(instance)
        self.destroyer.finish(instance, reason)

    # -- the reaper's rounds ---------------------------------------------------------------

    def sweep(self, now: float | None = None) -> None:
        """Destroy idle instances past TTL or lifetime, over the price cap or wanted by no
        remaining job, starting ones whose jobs all left and that no remaining job wants, and
        lost ones; retry failed destroys. No API call unless one goes."""
        now = time.time() if now is None else now
        doomed, sleepy = [], []
        with self.table.locked():
            if self.config.keep_instances:
                return
            for instance in self.table.all():
                if instance.state in (State.IDLE, State.STOPPED):
                    awaited = self._awaited(instance)
                    reason = retire_reason(instance, now, self.config, self.demand, awaited)
                    if reason is None and instance.state is State.IDLE and not awaited:
                        if stop_due(instance, now, self.config):
                            self.table.move(instance, State.STOPPED)
                            sleepy.append(instance)
                        continue
                elif instance.state is State.LOST:
                    reason = instance.lost_reason or "its host was lost"
                elif instance.state in STARTING:
                    reason = GIVEN_UP if self._deserted(instance) else None
                else:
                    if instance.state is State.BUSY:
                        self._warn_price(instance)
                    continue
                if reason is not None and self.destroyer.claim(instance):
                    doomed.append((instance, reason))
        self.destroyer.finish_all(doomed, time.monotonic() + ROUND_SECONDS)
        self.destroyer.retry_failed()
        for instance in sleepy:
            self._stop(instance)

    def _stop(self, instance: Instance) -> None:
        """Stop an idle instance (already marked stopped, so no job takes it meanwhile); a
        stop the API refuses leaves it idle, to be tried again."""
        assert instance.instance_id is not None
        try:
            self.market.stop(instance.instance_id)
        except MarketplaceError as error:
            log.warning("Could not stop %s: %s", instance.name, error)
            with self.table.locked():
                if instance.state is State.STOPPED:
                    self.table.move(instance, State.IDLE)
            return
        storage = instance.offer.storage_dph if instance.offer else 0.0
        now = time.time()  # the stop's answer: the GPU bills no more
        with self.table.locked():
            instance.stopped(now)
        self.ledger.stopped(instance.label, storage, now)
        idle = now - (instance.last_released_at or now)
        say(
            "Stopped %s after %.0f s idle: it bills its disk only ($%.3f/h) until a job of "
            "its kind starts it again",
            short_name(instance),
            idle,
            storage,
        )

    def look_soon(self) -> None:
        """The next reaper round asks for the instance list (a new instance is booting)."""
        self._last_refresh = 0.0

    def refresh_due(self) -> bool:
        with self.table.locked():
            watched = [i for i in self.table.all() if i.state not in (State.GONE, State.RENTING)]
            urgent = any(i.state in (State.BOOTING, State.UNKNOWN) for i in watched)
        if not watched:
            return False
        interval = BOOT_REFRESH_SECONDS if urgent else WATCH_REFRESH_SECONDS
        return time.monotonic() - self._last_refresh >= interval - REFRESH_SLACK_SECONDS

    def refresh(self) -> None:
        """One list call: every instance sees its own row (or its absence); lost hosts are
        marked lost, and creates whose answer was lost are settled by label."""
        self._last_refresh = time.monotonic()
        rows = self.market.list_instances()
        by_id = {row.id: row for row in rows}
        now = time.time()
        with self.table.locked():
            for instance in self.table.all():
                if instance.instance_id is None or instance.state in (State.GONE, State.UNKNOWN):
                    continue
                row = by_id.get(instance.instance_id)
                if row is not None and row.dph_total and row.dph_total != instance.dph_total:
                    self.ledger.price_changed(instance.label, row.dph_total)
                stopped = instance.stopped_at is not None
                instance.observe(row)
                if stopped and instance.stopped_at is None and instance.resumed_at is not None:
                    self.ledger.started(instance.label, instance.resumed_at)
                if instance.lost_reason and instance.state in USABLE:
                    self.table.move(instance, State.LOST)
                    if instance.loss_blames_host(now):
                        self.excluded.exclude(instance.offer, instance.lost_reason)
                elif instance.state is State.BOOTING:
                    self.boot_progress.observe(instance, now)
            self.table.notify()
        self.destroyer.settle_unknown(rows)

    def instances(self) -> list[Instance]:
        return self.table.all()

    def logged_in(self) -> list[Instance]:
        """The instances the run holds an SSH connection to (for the heartbeat)."""
        with self.table.locked():
            return [i for i in self.table.all() if i.state in LOGGED_IN and i.host is not None]

    def spend(self, now: float | None = None) -> float:
        """Dollars this run's instances have cost so far (rent to destroy, at their price)."""
        now = time.time() if now is None else now
        return sum(i.cost(now) for i in self.table.all())

    # -- teardown --------------------------------------------------------------------------

    def shutdown(self, budget: float | None = None, keep_warm: bool = False) -> None:
        """Destroy everything, all destroys sent at once, then settle creates still in
        flight and creates whose answer was lost; all within ``budget`` seconds (by default
        `teardown_budget`), after which whatever is not confirmed gone is left for the run's
        report to name. ``keep_warm``: idle instances stay up for the keep-warm time
        instead (each one's deadline handed to its own dead-man switch). Idempotent."""
        self.table.close()  # from here on no rent starts and every waiting job wakes
        if budget is None:
            budget = teardown_budget(len(self.table.counted()))
        deadline = self._teardown_deadline = time.monotonic() + budget
        if self.config.keep_instances:
            self._warn_kept()
            return
        keeping = self._start_keeping() if keep_warm and self.config.keep_warm else []
        self._destroy_all(deadline)
        self.table.wait_for(
            lambda: not self.table.in_states(frozenset({State.RENTING})),
            timeout=max(0.0, min(SHUTDOWN_WAIT_SECONDS, deadline - time.monotonic())),
        )
        self._destroy_all(deadline)  # whatever a create still in flight made meanwhile
        self._settle_creates_at_teardown(deadline)
        self._finish_keeping(keeping, deadline)
        # Until every destroy is confirmed: destroys under way on other threads (a job's
        # instance retired as it ended) may still fail, and are then taken again here.
        while self.table.in_states(frozenset({State.DESTROYING})):
            if time.monotonic() >= deadline:
                break
            self._destroy_all(deadline)
            self.table.wait(WAIT_SECONDS)

    def _start_keeping(self) -> list[threading.Thread]:
        """Idle, sound instances move to kept (nothing else touches them from here on) and
        get their deadline, each on a thread of its own."""
        with self.table.locked():
            chosen = [i for i in self.table.all() if keepable(i)]
            for instance in chosen:
                self.table.move(instance, State.KEPT)
        keeping = Keeping(self.ledger, self.config.keep_warm, self.config.bootstrap.key)
        return keeping.start(chosen)

    def _finish_keeping(self, threads: list[threading.Thread], deadline: float) -> None:
        """Wait for the deadlines to be set; an instance whose deadline was not set within
        the teardown's time is destroyed, never left up unguarded."""
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self.table.locked():
            failed = [
                i for i in self.table.in_states(frozenset({State.KEPT})) if i.kept_until is None
            ]
            for instance in failed:
                self.table.move(instance, State.DESTROYING)
        self.destroyer.finish_all(
            ((i, i.failure or "its keep-warm deadline was not set in time") for i in failed),
            deadline,
        )

    def kept(self) -> list[Instance]:
        """The instances left up past the run, with their deadline set."""
        return [i for i in self.table.in_states(frozenset({State.KEPT})) if i.kept_until]

    def teardown_left(self) -> float:
        """Seconds the teardown may still take (its whole budget before it starts)."""
        if self._teardown_deadline is None:
            return teardown_budget(len(self.table.counted()))
        return max(0.0, self._teardown_deadline - time.monotonic())

    def _destroy_all(self, deadline: float) -> None:
        with self.table.locked():
            for instance in self.table.all():
                self.destroyer.claim(instance)
            doomed = self.table.in_states(frozenset({State.DESTROYING}))
        self.destroyer.finish_all(((i, "the run is over") for i in doomed), deadline)

    def _settle_creates_at_teardown(self, deadline: float) -> None:
        """Creates whose answer was lost, and creates still without an answer: the instance
        list says, by label, whether they made an instance; any it shows is destroyed."""
        unknown = self.table.in_states(frozenset({State.UNKNOWN}))
        in_flight = [i for i in self.table.in_states(frozenset({State.RENTING})) if i.creating]
        if not unknown and not in_flight:
            return
        newest = max((i.unknown_since or 0.0 for i in unknown), default=0.0)
        grace = min(newest + UNKNOWN_GRACE_SECONDS, deadline) - time.monotonic()
        time.sleep(max(0.0, grace))
        try:
            rows = self.market.list_instances()
        except MarketplaceError as error:
            log.error(
                "Could not check whether %d create(s) without an answer happened: %s. Run "
                "'snakemake-vastai reap' to be sure.",
                len(unknown) + len(in_flight),
                error,
            )
            return
        self.destroyer.close_unknown(rows)
        made = {row.label: row.id for row in rows}
        for reservation in in_flight:
            if reservation.label in made:  # its answer has not come back yet: destroy by id
                say("Destroying %s: created while the run was closing", reservation.label)
                try:
                    self.market.request_destroy(made[reservation.label])
                except MarketplaceError as error:
                    log.error("Could not destroy %s: %s", reservation.label, error)

    def _warn_kept(self) -> None:
        kept = [i for i in self.table.all() if i.instance_id and i.state is not State.GONE]
        if kept:
            log.warning(
                "--vastai-keep-instances: leaving %d instance(s) running and BILLING: %s. "
                "Destroy them with 'snakemake-vastai reap --all' when done.",
                len(kept),
                ", ".join(str(i.instance_id) for i in kept),
            )

    def _warn_price(self, instance: Instance) -> None:
        cap = self.config.max_price
        if cap is not None and instance.dph_total > cap and not instance.price_warned:
            instance.price_warned = True
            log.warning(
                "%s now costs $%.3f/h, above --vastai-max-price $%.3f/h: it is destroyed as "
                "soon as its current jobs end.",
                instance.name,
                instance.dph_total,
                cap,
            )
