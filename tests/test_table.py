"""The pool's shared state under many threads in random order.

Threads place jobs (renting through the real SDK against the fake marketplace), finish
boots, release jobs, lose hosts, destroy, settle creates whose answer was lost, refresh, sweep
and shut down, all at once, with random API faults. Whatever the order: no move outside the
transition table, the slots of an instance never overflow, and after teardown every instance
is gone, in the pool's table and at the fake.

Instances never boot here (a boot of an hour), so no container starts: boots are finished by
the test itself, through the same guarded moves the pool's preparing thread makes.
"""

from __future__ import annotations

import dataclasses
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snakemake_executor_plugin_vastai.market.marketplace import (
    Marketplace,
    MarketplaceError,
    RetryPolicy,
)
from snakemake_executor_plugin_vastai.market.request import ResourceRequest
from snakemake_executor_plugin_vastai.pool.caps import Caps
from snakemake_executor_plugin_vastai.pool.instance import Instance, InstanceFailure
from snakemake_executor_plugin_vastai.pool.ledger import Ledger
from snakemake_executor_plugin_vastai.pool.placement import Placement, Pool, PoolConfig, Seeker
from snakemake_executor_plugin_vastai.pool.renter import CapRefusal, NoOfferError
from snakemake_executor_plugin_vastai.pool.states import STARTING, TRANSITIONS, USABLE, State
from snakemake_executor_plugin_vastai.pool.table import Cancelled, IllegalTransition, InstanceTable
from snakemake_executor_plugin_vastai.remote.bootstrap import BootstrapPlan
from snakemake_executor_plugin_vastai.remote.sshkey import RunKey
from tests.fakevast.harness import FakeVast
from tests.test_pool_decisions import REQUEST_4090

EXPECTED = (InstanceFailure, NoOfferError, CapRefusal, MarketplaceError, Cancelled)
"""What a step may legitimately meet; anything else (IllegalTransition above all) fails."""

REQUESTS = [
    dataclasses.replace(
        REQUEST_4090, rule=f"r{gpus}", num_gpus=max(1, gpus), gpus=gpus, cpu_cores=cores
    )
    for gpus, cores in ((0, 2), (1, None), (2, 4))
]


@pytest.fixture(scope="module")
def slow_boot_fake() -> Iterator[FakeVast]:
    fake = FakeVast(boot_seconds=3600, rate_limits=False)
    yield fake
    try:
        assert fake.alive_instances() == []
    finally:
        fake.stop()


class Driver:
    """One pool and the placements its worker threads hold."""

    def __init__(self, fake: FakeVast, state_dir: Path, pack: bool, caps: Caps) -> None:
        market = Marketplace(fake.api_key, fake.url, RetryPolicy(attempts=2, first_delay=0.01))
        config = PoolConfig(
            run_id="stress",
            order="dph_total",
            boot_timeout=5.0,
            keep_instances=False,
            bootstrap=BootstrapPlan("9.0.0", ()),
            ttl=0.0 if pack else 60.0,
            caps=caps,
            pack=pack,
        )
        key = RunKey.create(state_dir / "keys", "stress")
        self.pool = Pool(market, Ledger(state_dir), key, config)
        self.pool.orphans_reaped.set()
        self.held: list[tuple[Placement, ResourceRequest]] = []
        self.lock = threading.Lock()
        self.errors: list[BaseException] = []

    def step(self, rng: random.Random) -> None:
        pool = self.pool
        actions = (self.place, self.finish_boot, self.release, self.lose, self.destroy, self.move)
        action = rng.choice([*actions, self.place, self.release, pool.refresh, pool.sweep])
        try:
            if action in (self.pool.refresh, self.pool.sweep):
                action()
            else:
                action(rng)
        except EXPECTED:
            pass
        except BaseException as error:
            self.errors.append(error)

    def place(self, rng: random.Random) -> None:
        request = rng.choice(REQUESTS)
        tag = f"job{rng.randrange(10**6)}"
        pool = self.pool
        step = pool._next_step(Seeker(request, tag, ()))
        if step is None:
            return
        if isinstance(step, Placement):
            placement = step
        elif step.state is State.DESTROYING:
            pool.destroyer.finish(step, "evicted")
            return
        else:
            with pool._reservation(step):
                placement = Placement(step, pool.renter.rent(step, request))
        with self.lock:
            self.held.append((placement, request))

    def finish_boot(self, rng: random.Random) -> None:
        starting = self.pool.table.in_states(STARTING)
        if not starting:
            return
        instance = rng.choice(starting)
        if instance.state is State.BOOTING:
            self.pool.preparer.advance(instance, State.BOOTING, State.BOOTSTRAPPING)
        with self.pool.table.locked():
            assert instance.slots is not None
            ready = State.IDLE if instance.slots.empty else State.BUSY
            self.pool.preparer.advance(instance, State.BOOTSTRAPPING, ready)

    def release(self, rng: random.Random) -> None:
        with self.lock:
            if not self.held:
                return
            placement, _ = self.held.pop(rng.randrange(len(self.held)))
        self.pool.release(placement, healthy=rng.random() < 0.8)

    def move(self, rng: random.Random) -> None:
        """A job waiting for its instance's boot takes a ready share elsewhere."""
        with self.lock:
            if not self.held:
                return
            placement, request = self.held.pop(rng.randrange(len(self.held)))
        moved = None
        try:
            moved = self.pool.move_to_ready(placement, Seeker(request, "moved", ()))
        finally:
            with self.lock:
                self.held.append((moved or placement, request))

    def lose(self, rng: random.Random) -> None:
        with self.pool.table.locked():
            usable = self.pool.table.in_states(USABLE)
            if usable:
                self.pool.table.move(rng.choice(usable), State.LOST)

    def destroy(self, rng: random.Random) -> None:
        instances = self.pool.instances()
        if instances:
            self.pool.destroyer.destroy(rng.choice(instances), "random destroy")

    def check_slots(self) -> None:
        for instance in self.pool.instances():
            if instance.slots is None:
                continue
            book = instance.slots
            gpus = [g for lease in book.leases for g in lease.gpu_ids or ()]
            assert len(gpus) == len(set(gpus)), f"a GPU handed out twice on {instance.label}"
            assert sum(lease.needs.cores for lease in book.leases) <= book.capacity.cores + 1e-6


@settings(
    max_examples=5,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    seed=st.integers(0, 2**31),
    threads=st.integers(4, 16),
    steps=st.integers(10, 40),
    pack=st.booleans(),
    max_instances=st.integers(1, 6),
)
def test_many_threads_in_random_order_keep_the_table_legal(
    slow_boot_fake: FakeVast,
    tmp_path_factory: pytest.TempPathFactory,
    seed: int,
    threads: int,
    steps: int,
    pack: bool,
    max_instances: int,
) -> None:
    slow_boot_fake.set_faults(
        {
            "seed": seed,
            "http": [
                {"status": 503, "probability": 0.1, "count": None, "after_effect": True},
                {"status": 503, "probability": 0.05, "count": None},
            ],
        }
    )
    driver = Driver(
        slow_boot_fake,
        tmp_path_factory.mktemp("stress"),
        pack,
        Caps(max_instances=max_instances, max_total_price=2.0),
    )
    shutdown_at = random.Random(seed).randrange(threads * steps)
    done = iter(range(threads * steps))
    done_lock = threading.Lock()

    def worker(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        for _ in range(steps):
            driver.step(rng)
            driver.check_slots()
            with done_lock:
                if next(done) == shutdown_at:
                    driver.pool.shutdown()

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(timeout=300)
    assert not any(thread.is_alive() for thread in workers), "a worker hangs"
    slow_boot_fake.clear_faults()
    driver.pool.shutdown()
    assert driver.errors == []
    left = [(i.label, i.state) for i in driver.pool.instances() if i.state is not State.GONE]
    assert left == [], f"left out of teardown: {left}"
    assert slow_boot_fake.alive_instances() == []
    assert sum(i.dph_total for i in driver.pool.table.counted()) == 0.0


def _instance_in(state: State) -> Instance:
    instance = Instance("snakemake-vastai:run:t", REQUESTS[0].signature())
    instance.state = state
    return instance


@pytest.mark.parametrize("source", list(State))
@pytest.mark.parametrize("target", list(State))
def test_only_the_moves_in_the_transition_table_are_allowed(source: State, target: State) -> None:
    table = InstanceTable()
    instance = _instance_in(source)
    if target in TRANSITIONS[source]:
        table.move(instance, target)
        assert instance.state is target
    else:
        with pytest.raises(IllegalTransition):
            table.move(instance, target)
        assert instance.state is source


def test_a_reservation_counts_until_gone_and_a_missing_unknown_create_stops_counting() -> None:
    table = InstanceTable()
    reserved = _instance_in(State.RENTING)
    table.add(reserved)
    assert table.counted() == [reserved]
    table.move(reserved, State.UNKNOWN)
    assert table.counted() == [reserved]
    reserved.presumed_absent = True
    assert table.counted() == []
    with pytest.raises(IllegalTransition):
        table.add(_instance_in(State.BUSY))  # a reservation, or an adopted idle instance
