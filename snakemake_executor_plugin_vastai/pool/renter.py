"""Turning a reservation into a rented instance: a shared offer search, the price caps
checked under the table's lock at the price of the offer about to be rented, the ledger
written before the create, and a create whose answer is lost kept as "unknown".

Why here and not in the pool: renting is the one place where money is committed, and each
of its failures (no offer, offer taken, cap reached, answer lost) must leave the table in a
state that the caps and teardown account for.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from cachetools import TTLCache

from snakemake_executor_plugin_vastai.base.errors import (
    MarketError,
    PluginError,
    UserError,
    VastaiError,
)
from snakemake_executor_plugin_vastai.base.logger import get_logger
from snakemake_executor_plugin_vastai.market.diagnosis import diagnose, market_search
from snakemake_executor_plugin_vastai.market.hiddenoffers import hidden_by_defaults
from snakemake_executor_plugin_vastai.market.hosts import ExcludedHosts
from snakemake_executor_plugin_vastai.market.marketplace import (
    Abandoned,
    CreateOutcomeUnknown,
    Marketplace,
    Offer,
    OfferGone,
)
from snakemake_executor_plugin_vastai.market.offershelf import OfferShelf
from snakemake_executor_plugin_vastai.market.request import ResourceRequest
from snakemake_executor_plugin_vastai.pool.caps import Caps, rent_refusal
from snakemake_executor_plugin_vastai.pool.instance import Instance
from snakemake_executor_plugin_vastai.pool.ledger import Ledger
from snakemake_executor_plugin_vastai.pool.slots import Lease
from snakemake_executor_plugin_vastai.pool.states import State
from snakemake_executor_plugin_vastai.pool.table import Cancelled, InstanceTable

log = get_logger(__name__)

# Rents of one signature share one search for this long. Vast.ai allows ten searches a
# minute and a create every 4.5 s, so a fan-out's rents come seconds apart: a shorter life
# would search again for nearly every rent. Offers taken meanwhile are dropped from the copy
# (by us, or by a create that finds one gone), and an exhausted copy is searched afresh.
SEARCH_TTL_SECONDS = 60.0
EMPTY_SEARCH_SECONDS = 15.0  # an empty copy is searched again at most this often
DIAGNOSIS_TTL_SECONDS = 300.0  # how long a no-offer diagnosis is reused
SEARCH_LIMIT = 20  # offers one search of one request keeps (the marketplace's default page)
FAMILY_LIMIT = 500  # the most offers a search shared by several GPU models asks for


class NoOfferError(MarketError):
    """No offer matches a job's request; the message is the diagnosis: which single
    change to the request would find offers, and at what price. The diagnosis costs a
    dozen searches, so it is made only when the message is read: a job that waits for one
    of the run's instances needs only the ``headline``."""

    def __init__(self, headline: str, explain: Callable[[], str] | None = None) -> None:
        super().__init__(headline)
        self.headline = headline
        self._explain = explain
        self._explained: str | None = None

    def __str__(self) -> str:
        if self._explain is None:
            return self.headline
        if self._explained is None:
            self._explained = self._explain()
        return self._explained


class RentNotNeeded(PluginError):
    """The job's create waited for its turn (the create rate limit) while a share of its
    kind came free: nothing was sent, and the job takes that share instead."""


class CapRefusal(UserError):
    """Every matching offer would take the run past a price cap or the budget."""


SearchKey = tuple[str, int, bool]  # query, disk GB, interruptible
CHEAPEST_FIRST = "dph_total"  # the default --vastai-order: the one that ranks by cost
# A job with no `runtime` resource is priced as this many hours of an offer, when its inputs'
# bandwidth is weighed against the offer's hourly price.
ASSUMED_JOB_HOURS = 1.0


def whole_cost(offer: Offer, request: ResourceRequest) -> float:
    """What the job would cost on this offer: its hours at the offer's price, and its inputs
    at the offer's price per GB received (outputs are not known before the job runs)."""
    hours = request.runtime_hours or ASSUMED_JOB_HOURS
    return offer.dph_total * hours + request.upload_gb * offer.inet_down_cost


class OfferSearch:
    """Offer searches shared for a while, so a fan-out makes one search per signature
    instead of one per job. Offers this run has just taken are dropped from the shared copy;
    an empty copy (exhausted, or a market with none) is searched again, but not more often
    than every EMPTY_SEARCH_SECONDS, however many jobs wait for an offer. Under the rate
    limits the answers are also shelved for the other processes of the same key."""

    def __init__(self, market: Marketplace, order: str, ttl: float = SEARCH_TTL_SECONDS) -> None:
        self.market = market
        self.order = order
        self.ttl = ttl
        # key -> (when searched, the offers not taken since)
        self._cache: TTLCache[SearchKey, tuple[float, list[Offer]]] = TTLCache(maxsize=256, ttl=ttl)
        self._lock = threading.Lock()  # guards the cache (not thread-safe) and the key locks
        self._key_locks: dict[SearchKey, threading.Lock] = {}
        self.shelf = OfferShelf(market.key_file("offers"), ttl) if market.paced else None

    def offers(
        self, query: str, disk_gb: int, fresh: bool = False, interruptible: bool = False
    ) -> list[Offer]:
        key = (query, disk_gb, interruptible)
        with self._lock:
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:  # the second caller waits for the first one's answer
            cached = None if fresh else self._cached(key)
            if cached is not None:
                searched_at, offers = cached
                if offers or time.monotonic() - searched_at < EMPTY_SEARCH_SECONDS:
                    return list(offers)
            found = self.market.search(
                query, self.order, disk_gb, limit=SEARCH_LIMIT, interruptible=interruptible
            )
            self._keep(key, found, time.monotonic())
            return found

    def prefetch(self, requests: Iterable[ResourceRequest], clause: str = "") -> None:
        """Before the first rent: requests that differ only in their GPU model share one
        search (Vast.ai allows ten a minute), which their own searches then find cached.
        ``clause`` is added to every query (the run's excluded hosts)."""
        families: dict[SearchKey, dict[str | None, str]] = {}
        for request in requests:
            base = full_query(replace(request, gpu_name=None), clause)
            query = full_query(request, clause)
            if self._cached((query, request.disk_gb, request.interruptible)) is None:
                family = families.setdefault((base, request.disk_gb, request.interruptible), {})
                family[request.gpu_name] = query
        for (base, disk_gb, interruptible), members in families.items():
            if len(members) > 1:  # one alone is searched as usual, when it is needed
                self._search_family(base, members, disk_gb, interruptible)

    def _search_family(
        self, base_query: str, members: dict[str | None, str], disk_gb: int, interruptible: bool
    ) -> None:
        """One search for all ``members`` (each model, None: any, to its own query). Each
        model's offers in the answer are the first of its own search's (same order); a model
        with none is known to have none only if the answer was complete."""
        models = [model for model in members if model is not None]
        query = base_query
        if len(models) == len(members):
            query += f" gpu_name in [{','.join(model.replace(' ', '_') for model in models)}]"
        limit = min(SEARCH_LIMIT * len(members), FAMILY_LIMIT)
        found = self.market.search(
            query, self.order, disk_gb, limit=limit, interruptible=interruptible
        )
        complete, searched_at = len(found) < limit, time.monotonic()
        for model, member_query in members.items():
            mine = [o for o in found if model is None or _same_model(o.gpu_name, model)]
            if mine or (complete and not _nearly_named(found, model)):
                self._keep((member_query, disk_gb, interruptible), mine[:SEARCH_LIMIT], searched_at)

    def drop(self, offer_id: int) -> None:
        """An offer is taken (by us or someone else): no shared copy offers it again."""
        with self._lock:
            for key, (searched_at, offers) in list(self._cache.items()):
                self._cache[key] = (searched_at, [o for o in offers if o.id != offer_id])
        if self.shelf is not None:
            self.shelf.drop(offer_id)

    def _cached(self, key: SearchKey) -> tuple[float, list[Offer]] | None:
        """This run's copy, else another process's fresh answer from the shelf."""
        with self._lock:
            cached = self._cache.get(key)
        if cached is None and self.shelf is not None:
            shelved = self.shelf.get((key[0], self.order, key[1], key[2]))
            if shelved is not None:
                age, offers = shelved
                cached = (time.monotonic() - age, offers)
                with self._lock:
                    self._cache[key] = cached
        if cached is not None and time.monotonic() - cached[0] >= self.ttl:
            return None  # a shelved answer ages from its search, not from when we read it
        return cached

    def _keep(self, key: SearchKey, offers: list[Offer], searched_at: float) -> None:
        with self._lock:
            self._cache[key] = (searched_at, list(offers))
        if self.shelf is not None:
            self.shelf.put((key[0], self.order, key[1], key[2]), offers)


def _bandwidth_note(request: ResourceRequest, chosen: Offer, cheapest: Offer) -> str:
    return (
        f"For {request.rule}, offer {chosen.id} (${chosen.dph_total:.3f}/h) comes before "
        f"offer {cheapest.id} (${cheapest.dph_total:.3f}/h): the job's {request.upload_gb:.3g} GB "
        f"of inputs would cost ${request.upload_gb * cheapest.inet_down_cost:.2f} there, at "
        f"${cheapest.inet_down_cost:.3f}/GB."
    )


def full_query(request: ResourceRequest, clause: str = "") -> str:
    """The request's offer query with ``clause`` (e.g. the excluded hosts) added."""
    return " ".join(filter(None, (request.offer_query(), clause)))


def _same_model(listed: str, asked: str) -> bool:
    """The marketplace's own comparison as the fake makes it: exact, ``_`` read as a space."""
    return listed == asked.replace("_", " ")


def _nearly_named(offers: list[Offer], model: str | None) -> bool:
    """Whether an offer's model differs from ``model`` only in case: the real marketplace
    may compare without case, so none found here is not proof that it has none."""
    if model is None:
        return False
    wanted = model.replace("_", " ").casefold()
    return any(offer.gpu_name.casefold() == wanted for offer in offers)


@dataclass(frozen=True)
class RentPlan:
    """What the renter needs that does not change during a run."""

    run_id: str
    caps: Caps
    exclusive: bool  # no packing: a job holds its instance alone
    onstart: str  # the script Vast runs at boot (it also installs the run's public key)
    bid_factor: float = 1.0  # interruptible rents bid min_bid x this


class Renter:
    def __init__(
        self,
        market: Marketplace,
        ledger: Ledger,
        table: InstanceTable,
        search: OfferSearch,
        plan: RentPlan,
        spend: Callable[[], float],
        excluded: ExcludedHosts,
    ) -> None:
        self.market = market
        self.ledger = ledger
        self.table = table
        self.search = search
        self.plan = plan
        self.spend = spend
        self.excluded = excluded
        self._offers_in_flight: set[int] = set()  # our own concurrent rents never race
        self._diagnoses: TTLCache[tuple[str, int, bool], str] = TTLCache(
            maxsize=64, ttl=DIAGNOSIS_TTL_SECONDS
        )
        self._diagnosis_lock = threading.Lock()
        self._first_rent = threading.Lock()  # taken by the first rent, never released

    def rent(
        self,
        reserved: Instance,
        request: ResourceRequest,
        needless: Callable[[], bool] = lambda: False,
    ) -> Lease:
        """Rent an offer for ``reserved`` (state renting). On return it is booting, and the
        job's share of it is taken (in the same locked step, so no other job can take the
        new machine first): the lease is returned. Raises
        NoOfferError or CapRefusal (nothing rented; the reservation is still renting, for
        the caller to release or retry), CreateOutcomeUnknown (the reservation is now
        unknown and stays counted until list rounds settle it), or RentNotNeeded when
        ``needless`` said so while the create waited for its turn (nothing was sent)."""
        query = self.offer_query(request)
        log.debug("Offer query for %s: %s (order %s)", request.rule, query, self.search.order)
        refusal = None
        offers: list[Offer] = []
        for fresh in (False, True):  # the shared copy first; once more afresh if exhausted
            offers = self.candidates(request, fresh)
            for offer in offers:
                claimed, why = self._claim(reserved, offer, request)
                refusal = refusal or why
                lease = (
                    self._create_claimed(reserved, request, offer, needless) if claimed else None
                )
                if lease is not None:
                    threading.Thread(  # a search of its own: the job need not wait for it
                        target=self._say_hidden_offers,
                        args=(request, offers),
                        name="vastai-hidden-offers",
                        daemon=True,
                    ).start()
                    return lease
            if not offers or refusal is not None:
                break
        if refusal is not None:
            raise CapRefusal(f"No new instance for {request.rule}: {refusal}")
        if not offers:
            raise NoOfferError(
                f"No offer matches rule {request.rule} now.",
                lambda: self._diagnosis(request, query),
            )
        raise NoOfferError(
            f"All {len(offers)} matching offers for rule {request.rule} were taken before "
            "they could be rented."
        )

    def offer_query(self, request: ResourceRequest) -> str:
        """The request's offer query, less the hosts this run will not rent from again."""
        return full_query(request, self.excluded.query_clause())

    def prefetch(self, requests: Iterable[ResourceRequest]) -> None:
        """Search once for requests that differ only in their GPU model (see OfferSearch)."""
        self.search.prefetch(requests, self.excluded.query_clause())

    def candidates(self, request: ResourceRequest, fresh: bool = False) -> list[Offer]:
        """The offers the request could rent now, first by the run's order: the shared
        search, less the hosts excluded since and the offers whose share of the machine
        cannot hold the job, priced as bids if it is interruptible."""
        offers = self.search.offers(
            self.offer_query(request),
            request.disk_gb,
            fresh=fresh,
            interruptible=request.interruptible,
        )
        needs = request.needs()
        offers = [  # hosts excluded since the search; machines whose share is too small
            o for o in offers if self.excluded.allows(o) and o.holds(needs, request.disk_gb)
        ]
        if request.interruptible:
            bids = (o.with_bid(self.plan.bid_factor, request.max_price) for o in offers)
            offers = [bid for bid in bids if bid is not None]
        if request.upload_gb and self.search.order == CHEAPEST_FIRST and offers:
            cheapest = offers[0]
            offers.sort(key=lambda offer: whole_cost(offer, request))  # stable: ties by $/h
            if offers[0] is not cheapest:
                log.info("%s", _bandwidth_note(request, offers[0], cheapest))
        return offers

    def _say_hidden_offers(self, request: ResourceRequest, offers: list[Offer]) -> None:
        """At the run's first rent only (one extra search, made after the create so the
        instance boots meanwhile): the cheaper offers the defaults leave out, if any."""
        if not self._first_rent.acquire(blocking=False):
            return
        search = market_search(self.market, self.excluded.query_clause())
        hidden = hidden_by_defaults(request, offers, search)
        if hidden is not None:
            log.info("%s", hidden.sentence())

    def _diagnosis(self, request: ResourceRequest, query: str) -> str:
        """Why nothing matches, kept for a while: a job that waits for one of the run's
        instances asks again every second, and a diagnosis costs a dozen searches."""
        key = (query, request.disk_gb, request.interruptible)
        with self._diagnosis_lock:
            known = self._diagnoses.get(key)
            if known is None:
                search = market_search(self.market, self.excluded.query_clause())
                known = diagnose(request, search, query=query).message
                self._diagnoses[key] = known
            return known

    def _claim(
        self, reserved: Instance, offer: Offer, request: ResourceRequest
    ) -> tuple[bool, str | None]:
        """Price the reservation at this offer if the caps allow it and no other job of ours
        is renting the same offer: (claimed, the cap's refusal if any)."""
        with self.table.locked():
            self.table.check_open()  # a teardown has begun: no create may start after it
            if offer.id in self._offers_in_flight:
                return False, None
            others = sum(i.dph_total for i in self.table.counted() if i is not reserved)
            refusal = rent_refusal(others, offer.dph_total, self.spend(), self.plan.caps)
            if refusal is not None:
                return False, refusal
            self._offers_in_flight.add(offer.id)
            capacity = request.signature().with_capacity(
                offer.gpu_name,
                offer.num_gpus,
                offer.cpu_cores,
                offer.cpu_ram_mb / 1000,
                request.disk_gb,
            )
            reserved.priced(offer, capacity, self.plan.exclusive)
            self.table.notify()
            return True, None

    def _create_claimed(
        self,
        reserved: Instance,
        request: ResourceRequest,
        offer: Offer,
        needless: Callable[[], bool],
    ) -> Lease | None:
        try:
            return self._create(reserved, request, offer, needless)
        finally:
            with self.table.locked():
                self._offers_in_flight.discard(offer.id)

    def _create(
        self,
        reserved: Instance,
        request: ResourceRequest,
        offer: Offer,
        needless: Callable[[], bool],
    ) -> Lease | None:
        """The job's lease once created (booting); None when the offer was gone."""
        self.ledger.rent_requested(reserved.label, self.plan.run_id, offer.id, offer.dph_total)
        reserved.creating = True
        try:
            instance_id = self.market.rent(
                offer.id,
                image=request.image,
                disk_gb=request.disk_gb,
                label=reserved.label,
                onstart=self.plan.onstart,
                price=offer.bid_price,
                give_up=lambda: self.table.closing or needless(),
            )
        except Abandoned:  # refused before any effect: the run is closing, or the job needs none
            self._nothing_created(reserved)
            if self.table.closing:
                raise Cancelled("the run is shutting down") from None
            raise RentNotNeeded(f"{reserved.label}: a share came free first") from None
        except OfferGone as gone:
            log.info("%s is gone (%s); trying the next offer", offer.describe(), gone)
            self.search.drop(offer.id)
            self._nothing_created(reserved)
            return None
        except CreateOutcomeUnknown:
            found = self._look_up(reserved.label)
            if found is None:
                self.search.drop(offer.id)
                self._mark_unknown(reserved)
                raise
            instance_id = found
        self.search.drop(offer.id)
        with self.table.locked():
            assert reserved.slots is not None
            reserved.instance_id = instance_id
            reserved.created_at = time.time()  # busy once it is ready (the preparer says)
            self.table.move(reserved, State.BOOTING)  # it exists: destroyed or kept, not dropped
            lease = reserved.slots.take(request.needs())  # in the same step: no job goes first
        self.ledger.rented(reserved.label, instance_id)
        return lease  # the pool says what was rented, for which job

    def _nothing_created(self, reserved: Instance) -> None:
        self.ledger.destroyed(reserved.label)  # nothing was created under this label
        with self.table.locked():
            reserved.dph_total = 0.0
            reserved.creating = False

    def _look_up(self, label: str) -> int | None:
        """One immediate look by label after a lost answer; the reaper keeps looking."""
        try:
            row = self.market.find_by_label(label)
        except VastaiError:
            return None
        return row.id if row is not None else None

    def _mark_unknown(self, reserved: Instance) -> None:
        with self.table.locked():
            reserved.unknown_since = time.monotonic()
            self.table.move(reserved, State.UNKNOWN)
        log.warning(
            "The answer to renting %s was lost; watching for it by label so it is destroyed "
            "if it exists",
            reserved.label,
        )
