"""--vastai-pool-stop-after, piece by piece and offline: an idle instance is stopped (from then
on it bills its disk only), the next job of its kind starts it again instead of renting, and
--vastai-start-timeout bounds that start.

No Snakemake run and no fake marketplace here (tests/test_stop_tier.py runs real workflows):
the transition map; an instance's bill across a stop and a start under a frozen clock; which
rows say it is lost; which stopped instance a job wakes, and when an idle one is due; the
pool's sweep, wake and list rounds against a marketplace answered from memory (and many
threads racing sweeps against jobs); the ledger's stopped and started events; the cost
summary's GPU and disk columns; the settings check; and the boot lines of a restart.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from snakemake_executor_plugin_vastai.edge.resources import validate_settings
from snakemake_executor_plugin_vastai.edge.settings import DEFAULT_START_TIMEOUT, ExecutorSettings
from snakemake_executor_plugin_vastai.edge.summary import InstanceCost, run_cost
from snakemake_executor_plugin_vastai.market.marketplace import InstanceInfo, MarketplaceError
from snakemake_executor_plugin_vastai.market.request import Signature
from snakemake_executor_plugin_vastai.market.shares import Needs
from snakemake_executor_plugin_vastai.pool import ledger as ledger_module
from snakemake_executor_plugin_vastai.pool import progress
from snakemake_executor_plugin_vastai.pool.caps import Caps
from snakemake_executor_plugin_vastai.pool.destroyer import Destroyer
from snakemake_executor_plugin_vastai.pool.instance import BYTES_PER_GB, Instance
from snakemake_executor_plugin_vastai.pool.ledger import Ledger, billed_dollars, make_label
from snakemake_executor_plugin_vastai.pool.placement import (
    Placement,
    Pool,
    Seeker,
    pick_stopped,
    stop_due,
)
from snakemake_executor_plugin_vastai.pool.preparer import Preparer
from snakemake_executor_plugin_vastai.pool.progress import BootProgress, Spend
from snakemake_executor_plugin_vastai.pool.renter import CapRefusal
from snakemake_executor_plugin_vastai.pool.states import (
    BILLING,
    READY,
    TRANSITIONS,
    USABLE,
    State,
)
from snakemake_executor_plugin_vastai.pool.table import IllegalTransition, InstanceTable
from snakemake_executor_plugin_vastai.remote.ssh import Traffic
from snakemake_executor_plugin_vastai.remote.sshkey import RunKey
from tests.test_keeping import OTHER_GPU, REQUEST, assert_refused, at, by_label, events
from tests.test_ledger import T0
from tests.test_pool_decisions import (
    NEEDS,
    SIG,
    TTL,
    config,
    destroy_reasons,
    frozen_clock,
    make_instance,
    row,
)

PRICE = 0.5  # $/h, the disk included (row()'s price too, so a list round changes nothing)
STORAGE = 0.05  # $/h of that for the disk: all a stopped instance bills
DOWN, UP = 0.01, 0.02  # $/GB we send (the host receives), $/GB we receive
STOP_AFTER = 30.0  # under the TTL (60 s): stopped first, destroyed at the TTL
RUN_ID = "run-under-test"  # config()'s run id


def stoppable(
    state: State = State.IDLE,
    *,
    price: float = PRICE,
    storage: float = STORAGE,
    offer_id: int = 1,
    signature: Signature = SIG,
    released_at: float | None = None,
) -> Instance:
    """make_instance's instance, on an offer whose disk and bandwidth cost something."""
    instance = make_instance(
        signature,
        price=price,
        state=state,
        released_at=released_at,
        label=make_label(RUN_ID, f"job-{offer_id}"),
        offer_id=offer_id,
    )
    assert instance.offer is not None
    offer = dataclasses.replace(
        instance.offer, storage_dph=storage, inet_down_cost=DOWN, inet_up_cost=UP
    )
    instance.priced(offer, signature, exclusive=False)
    return instance


def asleep(
    stopped_at: float = 1_900_000_000.0,
    state: State = State.STOPPED,
    **change: Any,
) -> Instance:
    """A stopped instance whose stop went through at ``stopped_at``."""
    instance = stoppable(state, **change)
    instance.stopped_at = stopped_at
    return instance


class StubHost:
    """An SSH connection as an instance's bill and its stop see it: bytes, and a close (which
    may come on a thread of its own: a close can wait on a reconnect)."""

    def __init__(self, sent: float = 0, received: float = 0) -> None:
        self.traffic = Traffic(int(sent), int(received))
        self.closed = 0
        self._closing = threading.Event()

    def close(self) -> None:
        self.closed += 1
        self._closing.set()

    def closed_once(self) -> bool:
        """Closed, exactly once, within a few seconds."""
        return self._closing.wait(5) and self.closed == 1


class StopMarket:
    """What a pool of stoppable instances asks the marketplace, answered from memory and
    recorded: stop (refused for the ids in ``refuse_stop``), start, destroy, the list, a log.
    It has no search and no rent: a pool that rents here fails the test."""

    paced = False

    def __init__(self, rows: list[InstanceInfo] | None = None) -> None:
        self.rows = rows or []
        self.refuse_stop: set[int] = set()
        self.calls: list[tuple[str, Any]] = []
        self.on_stop: Callable[[int], None] | None = None  # checks, as the stop is sent

    def redact(self, text: str) -> str:
        return text

    def stop(self, instance_id: int) -> None:
        self.calls.append(("stop", instance_id))
        if self.on_stop is not None:
            self.on_stop(instance_id)
        if instance_id in self.refuse_stop:
            raise MarketplaceError(f"stop of {instance_id} refused")

    def start(self, instance_id: int) -> None:
        self.calls.append(("start", instance_id))

    def destroy(self, instance_id: int, budget: float = 0.0) -> float:
        self.calls.append(("destroy", instance_id))
        self.rows = [r for r in self.rows if r.id != instance_id]
        return time.time()

    def request_destroy_many(self, ids: list[int], give_up: Any = None) -> float:
        self.calls.append(("destroy_many", tuple(ids)))
        raise MarketplaceError("no batch destroys here: one by one")

    def list_instances(self) -> list[InstanceInfo]:
        self.calls.append(("list", None))
        return list(self.rows)

    def log_tail(self, instance_id: int) -> str:
        return ""

    def sent(self, kind: str) -> list[Any]:
        return [arg for call, arg in self.calls if call == kind]


@dataclass
class StubPreparer:
    """Records each start the pool asks for (``then`` plays the preparing thread, if given)."""

    started: list[tuple[Instance, bool]] = field(default_factory=list)
    then: Callable[[Instance], None] | None = None

    def start(self, instance: Instance, again: bool = False) -> None:
        self.started.append((instance, again))
        if self.then is not None:
            self.then(instance)


def written(ledger: Ledger, kind: str) -> list[dict[str, Any]]:
    """The ledger's events of one kind, oldest first (none before its first event)."""
    return [e for e in events(ledger) if e["event"] == kind] if ledger.path.exists() else []


def stub_pool(tmp_path: Path, market: StopMarket, **overrides: Any) -> Pool:
    """A real Pool (table, destroyer, ledger, sweep, refresh) on the stub marketplace, with
    stop_after 30 s and TTL 60 s unless overridden; its preparer only records starts."""
    cfg = config(**{"stop_after": STOP_AFTER, **overrides})
    stub: Any = market
    pool = Pool(stub, Ledger(tmp_path / "vastai"), RunKey.create(tmp_path / "keys", RUN_ID), cfg)
    pool.orphans_reaped.set()
    preparer: Any = StubPreparer()
    pool.preparer = preparer
    return pool


def preparer_of(pool: Pool) -> StubPreparer:
    recorded: Any = pool.preparer
    return recorded


def add(
    pool: Pool,
    offer_id: int = 1,
    *,
    released_at: float | None = None,
    stopped_at: float | None = None,
    host: StubHost | None = None,
    signature: Signature = SIG,
    price: float = PRICE,
) -> Instance:
    """An idle instance in the pool's table (entered as an adopted one enters); stopped
    at ``stopped_at`` the legal way, if given."""
    instance = stoppable(
        offer_id=offer_id, released_at=released_at, signature=signature, price=price
    )
    stub: Any = host
    instance.host = stub
    pool.table.add(instance)
    if stopped_at is not None:
        with pool.table.locked():
            pool.table.move(instance, State.STOPPED)
            instance.stopped(stopped_at)
    return instance


def seeker(tag: str = "train-1-a1") -> Seeker:
    """A job of SIG's kind (REQUEST's signature is SIG: see test_keeping)."""
    return Seeker(REQUEST, tag, (SIG,))


def boot_at_once(pool: Pool) -> Callable[[Instance], None]:
    """The preparing thread's work for a woken instance, done at once: the list shows it
    running, it logs in and bootstraps, and it is ready."""

    def finish(instance: Instance) -> None:
        with pool.table.locked():
            if instance.state is not State.BOOTING:
                return  # finished (or given up) by another thread meanwhile
            instance.observe(row(instance.instance_id or 0, instance.label))
            pool.table.move(instance, State.BOOTSTRAPPING)
            assert instance.slots is not None
            pool.table.move(instance, State.BUSY if instance.slots.leases else State.IDLE)

    return finish


# -- the transition map --------------------------------------------------------------------


@pytest.mark.parametrize("target", list(State))
def test_a_stopped_instance_is_started_again_put_back_or_destroyed_nothing_else(
    target: State,
) -> None:
    """Started for a job (booting), back to idle when the stop was refused, or destroyed:
    never busy (a job waits for its start) nor kept (kept instances run)."""
    legal = {State.BOOTING, State.IDLE, State.DESTROYING}
    assert (target in TRANSITIONS[State.STOPPED]) is (target in legal)
    table = InstanceTable()
    instance = stoppable(State.STOPPED)
    if target in legal:
        table.move(instance, target)
        assert instance.state is target
    else:
        with pytest.raises(IllegalTransition):
            table.move(instance, target)
        assert instance.state is State.STOPPED


@pytest.mark.parametrize("source", list(State))
def test_only_an_idle_instance_is_stopped(source: State) -> None:
    """A busy one runs a job; a kept one is past the run, guarded by its own switch."""
    assert (State.STOPPED in TRANSITIONS[source]) is (source is State.IDLE)


def test_a_stopped_instance_counts_toward_the_caps_and_takes_no_job() -> None:
    table = InstanceTable()
    instance = stoppable()
    table.add(instance)
    table.move(instance, State.STOPPED)
    assert State.STOPPED in BILLING and table.counted() == [instance], "its disk bills"
    assert State.STOPPED not in USABLE and State.STOPPED not in READY


def test_a_stopped_instance_can_be_claimed_for_its_destroy(tmp_path: Path) -> None:
    """Teardown and the sweep destroy a stopped instance like any other: it still bills."""
    table = InstanceTable()
    instance = stoppable()
    table.add(instance)
    table.move(instance, State.STOPPED)
    stub: Any = StopMarket()
    assert Destroyer(stub, Ledger(tmp_path), table).claim(instance)
    assert instance.state is State.DESTROYING


# -- an instance's bill across a stop and a start --------------------------------------------


@pytest.mark.parametrize(
    ("stopped_row_at", "stopped_seconds"),
    [
        pytest.param(165, 65, id="a-row-still-said-stopped-after-the-start"),
        pytest.param(None, 60, id="the-first-row-after-the-start-says-running"),
    ],
)
def test_the_gpu_is_not_billed_from_the_stop_until_a_row_shows_it_running_again(
    stopped_row_at: float | None, stopped_seconds: float
) -> None:
    """Rented at T, stopped at T+100, started at T+160; the start waits for the GPU, and the
    row says running at T+170. The GPU bills again from the last row since the start that
    still said stopped (T+165), or from the start: it may have had the GPU any time after."""
    with frozen_clock() as clock:
        instance = stoppable()
        t = instance.rented_at
        clock.tick(100)
        instance.stopped(time.time())
        assert instance.stopped_at == t + 100
        instance.observe(row(actual="stopped", intended="stopped"))  # before the start
        clock.tick(60)
        instance.started(time.time())
        assert instance.started_at == t + 160 and instance.boot_began == t + 160
        assert instance.info is None, "the last row (stopped) must be read afresh"
        if stopped_row_at is not None:
            clock.move_to(datetime.fromtimestamp(t + stopped_row_at, tz=UTC))
            instance.observe(row(actual="stopped", intended="running"))  # waiting for its GPU
            assert instance.stopped_at == t + 100 and instance.stopped_seconds == 0
        clock.move_to(datetime.fromtimestamp(t + 170, tz=UTC))
        instance.observe(row(actual="running"))
        assert instance.stopped_at is None
        assert instance.stopped_seconds == pytest.approx(stopped_seconds)
    assert instance.stopped_for(t + 200) == pytest.approx(stopped_seconds)
    saved = (PRICE - STORAGE) * stopped_seconds / 3600
    assert instance.stop_saving(t + 200) == pytest.approx(saved)
    expected = PRICE * (200 - stopped_seconds) / 3600 + STORAGE * stopped_seconds / 3600
    assert instance.cost(t + 200) == pytest.approx(expected)


def test_a_stopped_instance_bills_its_disk_only_until_it_is_destroyed() -> None:
    with frozen_clock() as clock:
        instance = stoppable()
        t = instance.rented_at
        clock.tick(100)
        instance.stopped(time.time())
        instance.observe(row(actual="running", intended="stopped"))  # on its way down
        assert instance.stopped_at == t + 100, "a row of the stop itself does not end it"
        clock.tick(10)
        instance.observe(row(actual="stopped", intended="stopped"))
        assert instance.stopped_at == t + 100
    running = PRICE * 100 / 3600
    assert instance.cost(t + 100) == pytest.approx(running)
    assert instance.cost(t + 400) == pytest.approx(running + STORAGE * 300 / 3600)
    assert instance.stopped_for(t + 400) == pytest.approx(300)
    instance.gone_at = t + 250  # destroyed while stopped: its bill ends there
    assert instance.cost(t + 10_000) == pytest.approx(running + STORAGE * 150 / 3600)


def test_the_bytes_of_the_connection_a_stop_closed_stay_on_the_bill() -> None:
    instance = stoppable()
    first = StubHost(sent=2 * BYTES_PER_GB, received=BYTES_PER_GB)
    stub: Any = first
    instance.host = stub
    before = 2 * DOWN + UP
    assert instance.data_cost() == pytest.approx(before)
    instance.stopped(1_900_000_000.0)
    assert instance.host is None and first.closed_once(), "its sshd is gone with the stop"
    assert instance.earlier_data_dollars == pytest.approx(before)
    assert instance.data_cost() == pytest.approx(before)
    second: Any = StubHost(sent=BYTES_PER_GB)  # the login after its start
    instance.host = second
    assert instance.data_cost() == pytest.approx(before + DOWN)
    assert instance.cost(instance.rented_at) == pytest.approx(before + DOWN)


def test_a_second_stop_is_not_ended_by_a_row_still_on_its_way_down() -> None:
    with frozen_clock() as clock:
        instance = stoppable(State.STOPPED)
        t = instance.rented_at
        clock.tick(100)
        instance.stopped(time.time())
        clock.tick(60)
        instance.started(time.time())
        clock.tick(10)
        instance.observe(row(actual="running"))  # the first stop ends: 70 s
        clock.tick(130)  # it ran a job, went idle, and the sweep stopped it again
        instance.stopped(time.time())
        clock.tick(1)
        instance.observe(row(actual="running", intended="stopped"))
        assert instance.stopped_at == t + 300
        assert pick_stopped([instance], SIG, NEEDS) is instance


# -- lost, or only stopped ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("actual", "intended", "lost"),
    [
        pytest.param("stopped", "running", False, id="started-waiting-for-its-gpu"),
        pytest.param("stopped", "stopped", True, id="stopped"),
        pytest.param("running", "stopped", True, id="on-its-way-down"),
        pytest.param("exited", "running", True, id="exited"),
        pytest.param("offline", "running", True, id="offline"),
        pytest.param("running", "running", False, id="running"),
    ],
)
def test_a_stopped_row_asked_to_run_again_is_not_lost(
    actual: str, intended: str, lost: bool
) -> None:
    assert row(actual=actual, intended=intended).lost is lost


def test_an_instance_the_run_stopped_is_not_lost_for_being_listed_as_stopped() -> None:
    stopped_row = row(actual="stopped", intended="stopped")
    stopped = asleep()
    stopped.observe(stopped_row)
    assert stopped.lost_reason is None
    idle = stoppable()  # the same row for an instance the run did not stop: its host stopped
    idle.observe(stopped_row)
    assert idle.lost_reason == "its host is stopped"


def test_a_stopped_instance_that_vanished_is_lost() -> None:
    instance = asleep()
    instance.observe(row(actual="stopped", intended="stopped"))
    instance.observe(None)  # no longer listed
    assert instance.vanished
    assert instance.lost_reason == "it is no longer listed by Vast.ai (destroyed outside this run?)"


def test_a_woken_instance_waiting_for_its_gpu_is_neither_lost_nor_failed() -> None:
    instance = asleep(state=State.BOOTING)
    instance.started(1_900_000_100.0)
    instance.observe(row(actual="stopped", intended="running"))
    assert instance.lost_reason is None and instance.boot_failure() is None
    assert not instance.booted()
    message = instance.start_timeout_message()
    assert "did not run again within --vastai-start-timeout: still stopped" in message
    assert "another renter" in message


# -- which stopped instance a job wakes, and when an idle one is due -----------------------


@pytest.mark.parametrize(
    ("make", "wakes"),
    [
        pytest.param(lambda: asleep(), True, id="stopped"),
        pytest.param(lambda: asleep(stopped_at=None), False, id="stop-still-in-flight"),
        pytest.param(lambda: asleep(signature=OTHER_GPU), False, id="another-kind"),
        pytest.param(lambda: dataclasses.replace(asleep(), retiring="x"), False, id="retiring"),
        pytest.param(lambda: dataclasses.replace(asleep(), vanished=True), False, id="vanished"),
        pytest.param(lambda: dataclasses.replace(asleep(), slots=None), False, id="no-slots"),
        *(
            pytest.param(lambda s=s: asleep(state=s), False, id=f"{s.value}-with-stopped_at")
            for s in State
            if s is not State.STOPPED
        ),
    ],
)
def test_pick_stopped_only_a_stop_that_went_through_of_the_jobs_kind(
    make: Callable[[], Instance], wakes: bool
) -> None:
    instance = make()
    assert (pick_stopped([instance], SIG, NEEDS) is instance) is wakes


def test_pick_stopped_only_where_the_job_fits_the_machine() -> None:
    one_gpu = asleep()
    assert pick_stopped([one_gpu], SIG, Needs(gpus=2, cores=4, mem_gb=16.0)) is None
    assert pick_stopped([one_gpu], SIG, Needs(gpus=0, cores=1, mem_gb=1.0)) is one_gpu


@pytest.mark.parametrize(
    ("prices", "released_ago", "expected"),
    [
        pytest.param([0.5, 0.4], [0, 30], 1, id="cheapest-even-if-older"),
        pytest.param([0.4, 0.4], [30, 0], 1, id="same-price-most-recently-used"),
    ],
)
def test_pick_stopped_cheapest_then_most_recently_used(
    prices: list[float], released_ago: list[int], expected: int
) -> None:
    now = 1_900_000_000.0
    stopped = [
        asleep(price=price, released_at=now - ago, offer_id=n)
        for n, (price, ago) in enumerate(zip(prices, released_ago, strict=True), start=1)
    ]
    assert pick_stopped(stopped, SIG, NEEDS) is stopped[expected]


@pytest.mark.parametrize(
    ("stop_after", "released_ago", "running_ago", "due"),
    [
        pytest.param(0.0, 10**6, 10**6, False, id="0-never"),
        pytest.param(30.0, 29.999, None, False, id="just-under"),
        pytest.param(30.0, 30.0, None, True, id="at"),
        pytest.param(30.0, 10.0, 600.0, False, id="the-last-release-counts"),
        pytest.param(30.0, None, 30.0, True, id="never-used-idle-since-running"),
        pytest.param(30.0, None, 29.0, False, id="never-used-just-under"),
        pytest.param(30.0, None, None, False, id="neither"),
    ],
)
def test_stop_due(
    stop_after: float, released_ago: float | None, running_ago: float | None, due: bool
) -> None:
    now = 1_900_000_000.0
    instance = stoppable(released_at=None if released_ago is None else now - released_ago)
    instance.running_at = None if running_ago is None else now - running_ago
    assert stop_due(instance, now, config(stop_after=stop_after)) is due


# -- the sweep: stop, destroy, or leave -------------------------------------------------------


def test_the_sweep_stops_an_idle_instance_past_stop_after_within_its_ttl(
    tmp_path: Path,
) -> None:
    market = StopMarket()
    pool = stub_pool(tmp_path, market)
    now = time.time()
    host = StubHost(sent=BYTES_PER_GB)
    instance = add(pool, released_at=now - STOP_AFTER + 1, host=host)
    pool.sweep(now=now)
    assert market.calls == [] and instance.state is State.IDLE, "not due yet: no API call"

    pool.sweep(now=now + 1)
    assert market.calls == [("stop", instance.instance_id)]
    # stopped from the stop's answer (the sweep's own time may be long before it)
    assert instance.state is State.STOPPED and instance.stopped_at >= now
    assert instance.host is None and host.closed_once()
    assert instance.data_cost() == pytest.approx(DOWN), "its bytes stay counted"
    stopped = written(pool.ledger, "stopped")
    assert [(e["label"], e["storage"]) for e in stopped] == [(instance.label, STORAGE)]

    pool.sweep(now=now + 10)
    assert market.calls == [("stop", instance.instance_id)], "stopped once"
    assert instance.state is State.STOPPED


@pytest.mark.parametrize("stop_after", [0.0, TTL, TTL + 1])
def test_the_sweep_destroys_at_the_ttl_what_it_would_not_stop_first(
    tmp_path: Path, stop_after: float, caplog: pytest.LogCaptureFixture
) -> None:
    """Stop after 0 (never), or not before the TTL: the TTL destroys it, as without stops."""
    caplog.set_level(logging.INFO, logger="snakemake.logging.vastai")
    market = StopMarket()
    pool = stub_pool(tmp_path, market, stop_after=stop_after)
    now = time.time()
    instance = add(pool, released_at=now - TTL + 1)
    pool.sweep(now=now)
    assert market.calls == []
    pool.sweep(now=now + 1)
    assert market.calls == [("destroy", instance.instance_id)]
    assert instance.state is State.GONE and instance.stopped_at is None
    assert destroy_reasons(caplog) == {"job-1": f"it was idle for --vastai-pool-ttl ({TTL:g} s)"}


def test_an_idle_instance_past_both_stop_after_and_its_ttl_is_destroyed_not_stopped(
    tmp_path: Path,
) -> None:
    market = StopMarket()
    pool = stub_pool(tmp_path, market)
    now = time.time()
    instance = add(pool, released_at=now - TTL)
    pool.sweep(now=now)
    assert market.calls == [("destroy", instance.instance_id)]
    assert instance.state is State.GONE


def test_a_stop_the_api_refuses_leaves_it_idle_and_is_tried_again(tmp_path: Path) -> None:
    market = StopMarket()
    pool = stub_pool(tmp_path, market)
    now = time.time()
    host = StubHost()
    instance = add(pool, released_at=now - STOP_AFTER, host=host)
    assert instance.instance_id is not None
    market.refuse_stop.add(instance.instance_id)
    pool.sweep(now=now)
    assert market.sent("stop") == [instance.instance_id]
    assert instance.state is State.IDLE and instance.stopped_at is None
    assert host.closed == 0 and instance.host is not None, "still running: still logged in"
    assert written(pool.ledger, "stopped") == []
    step = pool._next_step(seeker())
    assert isinstance(step, Placement) and step.instance is instance, "a job may use it"
    pool.release(step, healthy=True)

    market.refuse_stop.clear()
    pool.sweep(now=time.time() + STOP_AFTER)
    assert market.sent("stop") == [instance.instance_id] * 2
    assert instance.state is State.STOPPED


def test_an_idle_instance_a_waiting_job_could_use_is_not_stopped(tmp_path: Path) -> None:
    market = StopMarket()
    pool = stub_pool(tmp_path, market)
    now = time.time()
    instance = add(pool, released_at=now - STOP_AFTER)
    pool._awaiting_boot.append(seeker("waiting-for-a-boot"))
    pool.sweep(now=now)
    assert market.calls == [] and instance.state is State.IDLE


def test_nothing_is_stopped_with_keep_instances(tmp_path: Path) -> None:
    market = StopMarket()
    pool = stub_pool(tmp_path, market, keep_instances=True)
    now = time.time()
    instance = add(pool, released_at=now - STOP_AFTER)
    pool.sweep(now=now)
    assert market.calls == [] and instance.state is State.IDLE


@pytest.mark.parametrize(
    ("unwanted", "idle_for", "reason"),
    [
        pytest.param(False, TTL - 1, None, id="within-its-ttl"),
        pytest.param(False, TTL, f"it was idle for --vastai-pool-ttl ({TTL:g} s)", id="ttl"),
        pytest.param(True, STOP_AFTER, "no job still to run can use it", id="unwanted"),
    ],
)
def test_a_stopped_instance_goes_at_its_ttl_or_when_no_job_wants_it(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    unwanted: bool,
    idle_for: float,
    reason: str | None,
) -> None:
    """The TTL counts its stopped time as idle time."""
    caplog.set_level(logging.INFO, logger="snakemake.logging.vastai")
    market = StopMarket()
    pool = stub_pool(tmp_path, market)
    now = time.time()
    released = now - idle_for
    instance = add(pool, released_at=released, stopped_at=released + STOP_AFTER)
    if unwanted:
        pool.demand.reset([OTHER_GPU])
    pool.sweep(now=now)
    if reason is None:
        assert market.calls == [] and instance.state is State.STOPPED
        return
    assert market.calls == [("destroy", instance.instance_id)]
    assert instance.state is State.GONE
    assert destroy_reasons(caplog) == {"job-1": reason}
    [record] = written(pool.ledger, "destroyed")
    assert record["label"] == instance.label


def test_a_stopped_instance_no_longer_listed_is_destroyed(tmp_path: Path) -> None:
    now = time.time()
    market = StopMarket()
    pool = stub_pool(tmp_path, market)
    instance = add(pool, released_at=now - STOP_AFTER, stopped_at=now - 1)
    assert instance.instance_id is not None
    market.rows = [row(instance.instance_id, instance.label, "stopped", "stopped")]
    pool.refresh()
    assert instance.state is State.STOPPED and instance.lost_reason is None
    pool.sweep(now=now)
    assert market.sent("destroy") == []
    market.rows = []  # destroyed outside the run
    pool.refresh()
    assert instance.state is State.STOPPED, "not usable: the sweep, not the list, ends it"
    pool.sweep(now=now)
    assert market.sent("destroy") == [instance.instance_id]
    assert instance.state is State.GONE


@pytest.mark.parametrize("keep_warm", [False, True])
def test_teardown_destroys_a_stopped_instance_even_when_keeping_warm(
    tmp_path: Path, keep_warm: bool
) -> None:
    """Instances kept warm past the run are never stopped ones: a stopped one has no
    running switch to end it."""
    now = time.time()
    market = StopMarket()
    pool = stub_pool(tmp_path, market, keep_warm=600.0 if keep_warm else 0.0)
    instance = add(pool, released_at=now - STOP_AFTER, stopped_at=now)
    pool.shutdown(budget=10.0, keep_warm=keep_warm)
    assert market.sent("destroy") == [instance.instance_id]
    assert instance.state is State.GONE


# -- a job wakes a stopped instance of its kind ----------------------------------------------


def test_a_job_that_finds_only_a_stopped_instance_of_its_kind_starts_it_instead_of_renting(
    tmp_path: Path,
) -> None:
    market = StopMarket()
    pool = stub_pool(tmp_path, market)
    now = time.time()
    stopped = add(pool, released_at=now - 100, stopped_at=now - 70)
    pool.demand.reset([SIG])
    job = seeker()
    step = pool._next_step(job)
    assert isinstance(step, Placement) and step.instance is stopped
    assert stopped.state is State.BOOTING
    assert stopped.slots is not None and stopped.slots.leases == [step.lease]
    assert preparer_of(pool).started == [(stopped, True)], "started again, not booted anew"
    assert stopped.started_at is not None and stopped.started_at >= now
    assert stopped.info is None
    assert stopped.stopped_at == now - 70, "the disk only, until a row shows it running"
    assert market.calls == [], "no search, no rent (the preparer sends the start)"
    assert pool.instances() == [stopped], "no reservation"
    assert job.counted == [] and not pool.demand.wants(SIG), "the job is counted off"
    jobs = written(pool.ledger, "job")
    assert [(e["label"], e["job"]) for e in jobs] == [(stopped.label, "train-1-a1")]


def test_acquire_returns_the_woken_instance_once_it_is_ready(tmp_path: Path) -> None:
    market = StopMarket()
    pool = stub_pool(tmp_path, market)
    now = time.time()
    stopped = add(pool, released_at=now - 100, stopped_at=now - 70)
    preparer_of(pool).then = boot_at_once(pool)
    placement = pool.acquire(REQUEST, "train-2-a1", (SIG,))
    assert placement.instance is stopped and stopped.state is State.BUSY
    assert stopped.stopped_at is None and stopped.stopped_seconds >= 70
    assert market.calls == [] and pool.instances() == [stopped]
    pool.release(placement, healthy=True)
    assert stopped.state is State.IDLE and stopped.jobs_run == 1


def test_an_idle_instance_is_reused_before_a_stopped_one_is_started(tmp_path: Path) -> None:
    market = StopMarket()
    pool = stub_pool(tmp_path, market)
    now = time.time()
    stopped = add(pool, 1, released_at=now - 100, stopped_at=now - 70, price=0.1)
    idle = add(pool, 2, released_at=now - 5, price=0.9)
    step = pool._next_step(seeker())
    assert isinstance(step, Placement) and step.instance is idle
    assert stopped.state is State.STOPPED and preparer_of(pool).started == []


@pytest.mark.parametrize(
    "kind",
    [
        pytest.param("in-flight", id="stop-still-in-flight"),
        pytest.param("other", id="another-kind"),
    ],
)
def test_a_job_rents_rather_than_wake_what_it_may_not(tmp_path: Path, kind: str) -> None:
    market = StopMarket()
    pool = stub_pool(tmp_path, market)
    now = time.time()
    if kind == "other":
        other = add(pool, released_at=now - 100, stopped_at=now - 70, signature=OTHER_GPU)
    else:
        other = add(pool, released_at=now - 100)
        with pool.table.locked():
            pool.table.move(other, State.STOPPED)  # as the sweep marks it, before the stop
    step = pool._next_step(seeker())
    assert isinstance(step, Instance) and step is not other
    assert step.state is State.RENTING, "a reservation: the job rents"
    assert other.state is State.STOPPED and preparer_of(pool).started == []
    pool.table.drop_reservation(step)


@pytest.mark.parametrize(
    "stopped",
    [
        pytest.param(False, id="idle"),
        pytest.param(
            True,
            id="stopped",
        ),
    ],
)
def test_a_full_pool_evicts_an_unused_instance_of_another_kind(
    tmp_path: Path, stopped: bool
) -> None:
    market = StopMarket()
    pool = stub_pool(tmp_path, market, caps=Caps(max_instances=1))
    now = time.time()
    other = add(
        pool,
        released_at=now - 100,
        stopped_at=now - 70 if stopped else None,
        signature=OTHER_GPU,
    )
    step = pool._next_step(seeker())
    assert step is other and other.state is State.DESTROYING


@pytest.mark.parametrize(
    "stopped",
    [
        pytest.param(False, id="idle"),
        pytest.param(
            True,
            id="stopped",
        ),
    ],
)
def test_a_price_capped_job_evicts_an_unused_instance_of_another_kind(
    tmp_path: Path, stopped: bool
) -> None:
    market = StopMarket()
    pool = stub_pool(tmp_path, market)
    now = time.time()
    other = add(
        pool,
        released_at=now - 100,
        stopped_at=now - 70 if stopped else None,
        signature=OTHER_GPU,
    )
    pool._wait_out_refusal(CapRefusal("over --vastai-max-total-price"), seeker())
    assert market.sent("destroy") == [other.instance_id]
    assert other.state is State.GONE


# -- the list rounds of a woken instance ------------------------------------------------------


def test_the_list_ends_the_stop_once_it_shows_the_woken_instance_off_stopped(
    tmp_path: Path,
) -> None:
    market = StopMarket()
    pool = stub_pool(tmp_path, market)
    now = time.time()
    stopped = add(pool, released_at=now - 100, stopped_at=now - 70)
    assert stopped.instance_id is not None
    pool._next_step(seeker())
    market.rows = [row(stopped.instance_id, stopped.label, "stopped", "running")]
    pool.refresh()  # the start went through: it waits for its GPU
    assert stopped.state is State.BOOTING and stopped.stopped_at == now - 70
    assert not written(pool.ledger, "started")

    market.rows = [row(stopped.instance_id, stopped.label, "running", "running")]
    pool.refresh()
    pool.refresh()
    assert stopped.state is State.BOOTING and stopped.booted()
    assert stopped.stopped_at is None and stopped.stopped_seconds >= 70
    started = written(pool.ledger, "started")
    assert [e["label"] for e in started] == [stopped.label], "written once"


def test_the_ledger_and_the_summary_end_a_stop_at_the_same_time(tmp_path: Path) -> None:
    """Stopped by the sweep at T, started at T+60; the rounds at T+61 (still stopped) and
    T+71 (running): both should bill 61 s at the disk's price."""
    market = StopMarket()
    with frozen_clock() as clock:
        pool = stub_pool(tmp_path, market)
        now = time.time()
        instance = add(pool, released_at=now - STOP_AFTER)
        assert instance.instance_id is not None
        pool.ledger.rent_requested(instance.label, RUN_ID, 1, PRICE)
        pool.ledger.rented(instance.label, instance.instance_id)
        pool.sweep()
        assert instance.stopped_at == now and written(pool.ledger, "stopped")[0]["t"] == now
        clock.tick(60)
        pool._next_step(seeker())
        clock.tick(1)
        market.rows = [row(instance.instance_id, instance.label, "stopped", "running")]
        pool.refresh()
        clock.tick(10)
        market.rows = [row(instance.instance_id, instance.label, "running", "running")]
        pool.refresh()
    assert instance.stopped_seconds == pytest.approx(61)
    assert by_label(pool.ledger)[instance.label].stopped_seconds == pytest.approx(61)


def test_a_row_read_before_the_start_took_effect_does_not_lose_the_woken_instance(
    tmp_path: Path,
) -> None:
    market = StopMarket()
    pool = stub_pool(tmp_path, market)
    now = time.time()
    stopped = add(pool, released_at=now - 100, stopped_at=now - 70)
    assert stopped.instance_id is not None
    market.rows = [row(stopped.instance_id, stopped.label, "stopped", "stopped")]
    pool.refresh()
    assert stopped.state is State.STOPPED
    placement = pool._next_step(seeker())
    assert isinstance(placement, Placement)
    pool.refresh()  # the preparer's start is not sent yet
    assert stopped.state is State.BOOTING


def test_a_start_that_does_not_run_again_within_the_start_timeout_gives_the_instance_up(
    tmp_path: Path,
) -> None:
    """The preparing thread's work for a woken instance (on this thread): a start, then a
    wait bounded by --vastai-start-timeout, not the boot timeout; past it the instance is
    destroyed and the job told its machine failed (so it rents elsewhere)."""
    market = StopMarket()
    pool = stub_pool(tmp_path, market, boot_timeout=3600.0)
    now = time.time()
    stopped = add(pool, released_at=now - 100, stopped_at=now - 70)
    placement = pool._next_step(seeker())
    assert isinstance(placement, Placement)
    stopped.observe(row(stopped.instance_id or 0, stopped.label, "stopped", "running"))
    stub: Any = market
    preparer = Preparer(
        stub,
        pool.ledger,
        pool.key,
        pool.table,
        pool.destroyer,
        pool.excluded,
        boot_timeout=3600.0,
        bootstrap=pool.config.bootstrap,
        look_soon=pool.look_soon,
        start_timeout=0.05,
    )
    preparing = threading.Thread(target=preparer.prepare, args=(stopped, True), daemon=True)
    preparing.start()
    preparing.join(timeout=5)
    assert not preparing.is_alive(), "bounded by the start timeout, not the boot timeout"
    assert [call for call, _ in market.calls] == ["start", "destroy"]
    assert stopped.state is State.GONE
    assert stopped.failure is not None
    assert "did not run again within --vastai-start-timeout: still stopped" in stopped.failure
    assert stopped.machine_fault, "the job rents on another machine"


# -- many threads: sweeps racing with jobs --------------------------------------------------


class Race:
    """Jobs placing, releasing and finishing boots on four instances while one thread sweeps
    with a stop due at once; the marketplace refuses some stops. Checked as it happens: a stop
    is sent only for an instance marked stopped, with no job on it; a wake only for one whose
    stop went through; no job is ever placed on a stopped instance."""

    def __init__(self, tmp_path: Path, seed: int) -> None:
        self.rng = random.Random(seed)
        self.market = StopMarket()
        self.pool = stub_pool(tmp_path, self.market, stop_after=1e-6, ttl=3600.0)
        now = time.time()
        self.instances = {
            n: add(self.pool, n, released_at=now, host=StubHost()) for n in range(1, 5)
        }
        self.held: list[Placement] = []
        self.lock = threading.Lock()
        self.errors: list[str] = []
        self.stops = 0
        self.wakes = 0
        self.market.on_stop = self.check_stop
        wake, place = self.pool._wake, self.pool._place

        def checked_wake(instance: Instance, job: Seeker) -> Placement:
            if instance.state is not State.STOPPED or instance.stopped_at is None:
                self.errors.append(f"woke {instance.label} as {instance.state}")
            self.wakes += 1
            return wake(instance, job)

        def checked_place(instance: Instance, *args: Any, **kwargs: Any) -> Placement:
            if instance.state is State.STOPPED:
                self.errors.append(f"placed a job on {instance.label}, stopped")
            return place(instance, *args, **kwargs)

        pool: Any = self.pool
        pool._wake, pool._place = checked_wake, checked_place

    def check_stop(self, instance_id: int) -> None:
        instance = self.instances[instance_id]
        with self.pool.table.locked():
            assert instance.slots is not None
            if instance.state is not State.STOPPED or instance.slots.leases:
                self.errors.append(f"stopped {instance.label} as {instance.state}")
            if instance.stopped_at is not None:
                self.errors.append(f"stopped {instance.label} again while stopped")
        self.stops += 1
        if self.rng.random() < 0.2:
            self.market.refuse_stop.add(instance_id)
        else:
            self.market.refuse_stop.discard(instance_id)

    def job(self, seed: int, steps: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(steps):
                rng.choice((self.place, self.place, self.release, self.finish_boot))(rng)
        except BaseException as error:
            self.errors.append(repr(error))

    def place(self, rng: random.Random) -> None:
        job = Seeker(REQUEST, f"job{rng.randrange(10**6)}", ())
        job.since -= 3600  # never patient: it rents, or wakes, at once
        step = self.pool._next_step(job)
        if isinstance(step, Placement):
            with self.pool.table.locked():
                if step.instance.state not in USABLE:
                    self.errors.append(f"placed on {step.instance.label} as {step.instance.state}")
            with self.lock:
                self.held.append(step)
        elif isinstance(step, Instance):
            with self.pool.table.locked():
                if step.state is State.RENTING:
                    self.pool.table.drop_reservation(step)  # no rent here
                else:
                    self.errors.append(f"unexpected step: {step.label} {step.state}")

    def release(self, rng: random.Random) -> None:
        with self.lock:
            if not self.held:
                return
            placement = self.held.pop(rng.randrange(len(self.held)))
        self.pool.release(placement, healthy=True)

    def finish_boot(self, rng: random.Random) -> None:
        booting = self.pool.table.in_states(frozenset({State.BOOTING}))
        if booting:
            boot_at_once(self.pool)(rng.choice(booting))

    def sweep_until(self, done: threading.Event) -> None:
        try:
            while not done.is_set():
                self.pool.sweep()
                time.sleep(0)
        except BaseException as error:
            self.errors.append(repr(error))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sweeps_racing_with_jobs_never_stop_a_busy_instance_nor_place_on_a_stopped_one(
    tmp_path: Path, seed: int
) -> None:
    race = Race(tmp_path, seed)
    done = threading.Event()
    sweeper = threading.Thread(target=race.sweep_until, args=(done,))
    jobs = [threading.Thread(target=race.job, args=(seed * 100 + n, 300)) for n in range(6)]
    sweeper.start()
    for thread in jobs:
        thread.start()
    for thread in jobs:
        thread.join(timeout=60)
    done.set()
    sweeper.join(timeout=60)
    assert not sweeper.is_alive() and not any(t.is_alive() for t in jobs), "a thread hangs"
    assert race.errors == []
    assert race.stops > 0 and race.wakes > 0, "the race should stop and wake instances"
    for instance in race.pool.instances():
        assert instance.state is not State.GONE, "nothing here is due for a destroy"
        if instance.state is State.STOPPED:
            assert instance.slots is not None and not instance.slots.leases


# -- the ledger ------------------------------------------------------------------------------


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    return Ledger(tmp_path / "vastai")


def rent(ledger: Ledger, label: str) -> None:
    """Requested at T0 ($3.60/h), created at +2 s."""
    at(0, lambda: ledger.rent_requested(label, "r1", 1, 3.6))
    at(2, lambda: ledger.rented(label, 11))


def test_stopped_and_started_events_fold_into_the_record(ledger: Ledger) -> None:
    label = make_label("r1", "job-1")
    rent(ledger, label)
    at(102, lambda: ledger.stopped(label, 0.36, ledger_module.time.time()))
    [record] = Ledger(ledger.directory).records()
    assert record.stopped_at == T0 + 102 and record.storage_dph == 0.36
    at(162, lambda: ledger.started(label, ledger_module.time.time()))
    at(202, lambda: ledger.stopped(label, 0.36, ledger_module.time.time()))
    at(232, lambda: ledger.started(label, ledger_module.time.time()))
    record = by_label(Ledger(ledger.directory))[label]
    assert record.stopped_at is None and record.stopped_seconds == pytest.approx(90)
    at(302, lambda: ledger.destroyed(label))
    record = by_label(ledger)[label]
    expected = billed_dollars(T0 + 2, T0 + 302, 3.6) - billed_dollars(0, 90, 3.6 - 0.36)
    assert record.cost(T0 + 10_000) == pytest.approx(expected)
    assert record.cost(T0 + 10_000) == pytest.approx((3.6 * 210 + 0.36 * 90) / 3600)


def test_a_record_still_stopped_bills_its_disk_only_to_now_or_its_destroy(
    ledger: Ledger,
) -> None:
    label = make_label("r1", "job-1")
    rent(ledger, label)
    at(102, lambda: ledger.stopped(label, 0.36, ledger_module.time.time()))
    running = 3.6 * 100 / 3600
    assert by_label(ledger)[label].cost(T0 + 202) == pytest.approx(running + 0.36 * 100 / 3600)
    at(302, lambda: ledger.destroyed(label))
    record = by_label(ledger)[label]
    assert record.stopped_at == T0 + 102, "never started again"
    assert record.cost(T0 + 10_000) == pytest.approx(running + 0.36 * 200 / 3600)


def test_a_start_without_a_stop_changes_nothing(ledger: Ledger) -> None:
    label = make_label("r1", "job-1")
    rent(ledger, label)
    at(50, lambda: ledger.started(label, ledger_module.time.time()))
    record = by_label(ledger)[label]
    assert record.stopped_seconds == 0 and record.stopped_at is None
    assert record.cost(T0 + 102) == pytest.approx(3.6 * 100 / 3600)
    [started] = written(ledger, "started")
    assert started == {"event": "started", "label": label, "at": T0 + 50, "t": T0 + 50}


# -- the cost summary -----------------------------------------------------------------------


def stopped_and_started() -> tuple[Instance, float]:
    """Rented at T, running at T+10, stopped at T+100, started at T+160, still stopped at
    T+165, running again at T+170 (65 s stopped), 1 GB sent, destroyed at T+300; and T."""
    with frozen_clock() as clock:
        instance = stoppable()
        t = instance.rented_at
        instance.running_at = t + 10
        instance.busy_seconds = 50.0
        instance.jobs_run = 2
        first: Any = StubHost(sent=BYTES_PER_GB)
        instance.host = first
        clock.tick(100)
        instance.stopped(time.time())
        clock.tick(60)
        instance.started(time.time())
        clock.tick(5)
        instance.observe(row(actual="stopped", intended="running"))
        clock.tick(5)
        instance.observe(row(actual="running"))
    instance.gone_at = t + 300
    return instance, t


def test_instance_cost_splits_gpu_disk_and_data() -> None:
    instance, t = stopped_and_started()
    cost = InstanceCost.of(instance, t + 1000)
    assert cost.stopped_seconds == pytest.approx(65)
    assert cost.storage_dollars == pytest.approx(STORAGE * 300 / 3600, abs=1e-6)
    assert cost.data_dollars == pytest.approx(DOWN, abs=1e-6)
    gpu = (PRICE - STORAGE) * (300 - 65) / 3600
    assert cost.gpu_dollars == pytest.approx(gpu, abs=2e-6)
    assert cost.dollars == pytest.approx(gpu + STORAGE * 300 / 3600 + DOWN, abs=2e-6)
    assert cost.dollars == pytest.approx(instance.cost(t + 1000), abs=2e-6)
    assert (cost.boot_seconds, cost.busy_seconds) == (10.0, 50.0)


def test_instance_cost_of_an_instance_still_stopped_counts_to_now() -> None:
    now = 1_900_000_000.0
    instance = stoppable()
    instance.rented_at = now - 400
    instance.stopped(now - 100)
    cost = InstanceCost.of(instance, now)
    assert cost.stopped_seconds == pytest.approx(100)
    assert cost.gpu_dollars == pytest.approx((PRICE - STORAGE) * 300 / 3600, abs=2e-6)
    assert cost.storage_dollars == pytest.approx(STORAGE * 400 / 3600, abs=1e-6)


def test_run_cost_totals_and_columns_have_the_gpu_and_the_disk() -> None:
    instance, t = stopped_and_started()
    never_stopped = stoppable(offer_id=2)
    never_stopped.rented_at = t
    never_stopped.gone_at = t + 300
    run = run_cost("r1", [instance, never_stopped], t + 1000)
    one, two = run.instances
    assert two.stopped_seconds == 0 and two.gpu_dollars == pytest.approx(
        (PRICE - STORAGE) * 300 / 3600, abs=2e-6
    )
    totals: Any = run.to_json()["totals"]
    assert totals["stopped_seconds"] == pytest.approx(65)
    assert totals["storage_dollars"] == pytest.approx(one.storage_dollars + two.storage_dollars)
    assert totals["gpu_dollars"] == pytest.approx(one.gpu_dollars + two.gpu_dollars)
    parts = totals["gpu_dollars"] + totals["storage_dollars"] + totals["data_dollars"]
    assert parts == pytest.approx(totals["dollars"], abs=1e-5)
    listed: Any = run.to_json()["instances"]
    assert [i["gpu_dollars"] for i in listed] == [one.gpu_dollars, two.gpu_dollars]
    assert [i["stopped_seconds"] for i in listed] == [65.0, 0.0]

    text = run.render()
    header = text.splitlines()[1]
    assert header.index("gpu $") < header.index("disk $") < header.index("data $")
    for cost in run.instances:
        columns = (
            f"{cost.gpu_dollars:>8.4f} {cost.storage_dollars:>8.4f} "
            f"{cost.data_dollars:>8.4f} {cost.dollars:>8.4f}"
        )
        assert columns in text


# -- the settings check ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "said"),
    [
        pytest.param({"pool_stop_after": -1}, ["--vastai-pool-stop-after=-1", "at least 0"]),
        pytest.param({"pool_stop_after": "soon"}, ["--vastai-pool-stop-after='soon'"]),
        pytest.param({"start_timeout": 0}, ["--vastai-start-timeout=0", "at least 1"]),
        pytest.param({"start_timeout": -5}, ["--vastai-start-timeout=-5", "at least 1"]),
    ],
)
def test_stop_settings_refused(options: dict[str, Any], said: list[str]) -> None:
    assert_refused(options, said)


@pytest.mark.parametrize(
    "options",
    [{}, {"pool_stop_after": 0}, {"pool_stop_after": 60}, {"start_timeout": 1}],
)
def test_stop_settings_accepted(options: dict[str, Any]) -> None:
    validate_settings(ExecutorSettings(**options))


def test_stop_settings_default_to_never_stopping() -> None:
    settings = ExecutorSettings()
    assert settings.pool_stop_after == 0
    assert settings.start_timeout == DEFAULT_START_TIMEOUT == 120


# -- the boot lines of a restart -------------------------------------------------------------


def test_a_restarts_boot_lines_count_from_its_start_not_its_rent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    said: list[tuple[Any, ...]] = []
    monkeypatch.setattr(progress, "say", lambda message, *args: said.append(args))
    lines = BootProgress(str)
    t = 1_900_000_000.0
    instance = stoppable()
    instance.rented_at = t
    lines.observe(instance, t + 16)
    assert [(args[0], round(args[1])) for args in said] == [(1, 16)]
    instance.stopped(t + 500)
    instance.started(t + 1000)
    assert instance.boot_began == t + 1000
    lines.observe(instance, t + 1010)
    assert len(said) == 1, "10 s into the start: too soon for a line"
    lines.observe(instance, t + 1015)
    assert [round(args[1]) for args in said] == [16, 15]
    assert said[-1][2] == "not listed by Vast.ai yet"


def test_the_running_total_counts_a_stopped_instance_at_its_disks_price() -> None:
    """The spend line's $/h is what the instances bill now: a stopped one, its disk only."""
    running, stopped = stoppable(State.BUSY), stoppable(State.IDLE)
    stopped.stopped(time.time())
    stopped.state = State.STOPPED
    assert Spend.of([running, stopped], 0.0).dph == pytest.approx(PRICE + STORAGE)
