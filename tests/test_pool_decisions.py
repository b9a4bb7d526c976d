"""The warm pool's decisions under a frozen clock: which idle instance a job gets, which one
goes when the pool is full, when an idle instance retires (TTL, lifetime, price cap, lost
host, look-ahead), when a rent is refused (total price, budget), what a sweep really destroys
on the fake marketplace, and whose instances count as orphans.

Why freezegun instead of sleeps: every rule here is "older than N seconds", and a frozen clock
makes "just under" and "exactly at" the limit exact and instant.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import AbstractContextManager
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
from freezegun import freeze_time
from freezegun.api import FrozenDateTimeFactory

from snakemake_executor_plugin_vastai.market.marketplace import InstanceInfo, Marketplace, Offer
from snakemake_executor_plugin_vastai.market.pacer import LIMITS
from snakemake_executor_plugin_vastai.market.request import ResourceRequest, Signature
from snakemake_executor_plugin_vastai.market.shares import Needs
from snakemake_executor_plugin_vastai.pool.caps import BUDGET_HORIZON_SECONDS, Caps, rent_refusal
from snakemake_executor_plugin_vastai.pool.demand import Demand
from snakemake_executor_plugin_vastai.pool.instance import Instance
from snakemake_executor_plugin_vastai.pool.ledger import Ledger, RunLock, make_label
from snakemake_executor_plugin_vastai.pool.placement import (
    TEARDOWN_SECONDS,
    Placement,
    Pool,
    PoolConfig,
    Seeker,
    least_recently_used,
    pick_instance,
    retire_reason,
    teardown_budget,
)
from snakemake_executor_plugin_vastai.pool.preparer import fails_everywhere
from snakemake_executor_plugin_vastai.pool.reaper import find_orphans, reap_orphans
from snakemake_executor_plugin_vastai.pool.slots import Lease
from snakemake_executor_plugin_vastai.pool.states import USABLE, State
from snakemake_executor_plugin_vastai.remote.bootstrap import NO_SSHD_FIX, BootstrapPlan
from snakemake_executor_plugin_vastai.remote.sshkey import RunKey
from tests.fakevast.harness import FakeVast

T0 = "2030-01-01 00:00:00"
TTL = 60.0

SIG = Signature(
    image="img:1",
    gpu_name="RTX 4090",
    num_gpus=1,
    geolocation=("DE",),
    datacenter_only=False,
    reliability=0.0,
    extra_query="",
    interruptible=False,
    max_price=None,
    cpu_cores=4,
    mem_gb=16.0,
    disk_gb=40,
)
NEEDS = Needs(gpus=1, cores=4, mem_gb=16.0)


def config(**overrides: Any) -> PoolConfig:
    base = PoolConfig(
        run_id="run-under-test",
        order="dph_total",
        boot_timeout=60.0,
        keep_instances=False,
        bootstrap=BootstrapPlan(version("snakemake")),  # installed here: no pip on boot
        ttl=TTL,
        caps=Caps(max_instances=8),
    )
    return dataclasses.replace(base, **overrides)


def offer(offer_id: int = 1, price: float = 0.5, gpu: str = "RTX 4090") -> Offer:
    return Offer(offer_id, gpu, 1, price, 16.0, 32_000, 250.0, "Hesse, DE", 0.99, offer_id)


def make_instance(
    signature: Signature = SIG,
    price: float = 0.5,
    state: State = State.IDLE,
    released_at: float | None = None,
    label: str = "snakemake-vastai:run-under-test:job",
    offer_id: int = 1,
) -> Instance:
    """An instance rented now. ``rented_at`` is passed explicitly: the dataclass default
    holds the real ``time.time`` and would escape freezegun."""
    instance = Instance(label, signature, rented_at=time.time(), last_released_at=released_at)
    instance.priced(offer(offer_id, price, signature.gpu_name or ""), signature, exclusive=False)
    instance.state = state
    if state is not State.RENTING:
        instance.instance_id = offer_id
    return instance


def row(
    instance_id: int = 1,
    label: str = "snakemake-vastai:run-under-test:job",
    actual: str | None = "running",
    intended: str | None = "running",
    price: float = 0.5,
) -> InstanceInfo:
    """One row of the instance list, as Marketplace.list_instances returns it."""
    return InstanceInfo(
        instance_id, label, actual, intended, "", "127.0.0.1", 22, None, None, price, 0.0
    )


def frozen_clock() -> AbstractContextManager[FrozenDateTimeFactory]:
    """The clock stopped at T0 (inside the test body, so pytest's own timing stays real); the
    fake's harness keeps real time for its polling deadlines."""
    return freeze_time(T0, ignore=["tests.fakevast"])


# -- pick_instance: which instance a job is placed on ---------------------------------------


@pytest.mark.parametrize(
    ("prices", "released_ago", "expected"),
    [
        pytest.param([0.5, 0.4], [0, 30], 1, id="cheapest-even-if-older"),
        pytest.param([0.4, 0.4], [30, 0], 1, id="same-price-most-recently-used"),
        pytest.param([0.4, 0.3, 0.3], [0, 20, 10], 2, id="cheapest-then-most-recent"),
    ],
)
def test_pick_cheapest_then_most_recently_used(
    prices: list[float], released_ago: list[int], expected: int
) -> None:
    """Cheapest saves money; among equals the warmest cache saves transfers."""
    now = 1_900_000_000.0
    pool = [
        make_instance(price=price, released_at=now - ago)
        for price, ago in zip(prices, released_ago, strict=True)
    ]
    assert pick_instance(pool, SIG, NEEDS) is pool[expected]


@pytest.mark.parametrize("state", [s for s in State if s not in USABLE])
def test_pick_never_places_on_an_instance_that_cannot_run_jobs(state: State) -> None:
    """A reserved, unknown, lost or doomed instance is never handed out, however cheap."""
    other = make_instance(price=0.1, state=state)
    idle = make_instance(price=0.9)
    assert pick_instance([other, idle], SIG, NEEDS) is idle
    assert pick_instance([other], SIG, NEEDS) is None


@pytest.mark.parametrize("state", [State.BOOTING, State.BOOTSTRAPPING])
def test_pick_prefers_a_ready_instance_to_a_booting_one(state: State) -> None:
    booting = make_instance(price=0.1, state=state)
    busy = make_instance(price=0.9, state=State.BUSY)
    assert pick_instance([booting, busy], SIG, NEEDS) is busy
    assert pick_instance([booting], SIG, NEEDS) is booting


def test_pick_only_where_the_job_fits_now() -> None:
    """The only GPU is held: a GPU job waits, a CPU job still fits beside it."""
    shared = make_instance(state=State.BUSY)
    assert shared.slots is not None
    shared.slots.take(NEEDS)
    assert pick_instance([shared], SIG, NEEDS) is None
    assert pick_instance([shared], SIG, Needs(gpus=0, cores=4, mem_gb=8.0)) is shared


@pytest.mark.parametrize(
    ("field", "bigger"), [("cpu_cores", 16), ("mem_gb", 64.0), ("disk_gb", 100)]
)
def test_pick_bigger_machine_serves_smaller_job(field: str, bigger: float) -> None:
    """cores, RAM and disk are at-least fields: a bigger instance serves, a smaller one not."""
    big = make_instance(dataclasses.replace(SIG, **{field: bigger}))
    assert pick_instance([big], SIG, NEEDS) is big
    wanted = dataclasses.replace(SIG, **{field: bigger})
    assert pick_instance([make_instance()], wanted, NEEDS) is None


@pytest.mark.parametrize(
    ("field", "other"),
    [
        ("gpu_name", "RTX 3090"),
        ("image", "img:2"),
        ("geolocation", ("PL",)),
        ("geolocation", ()),
        ("extra_query", "cuda_vers>=12.1"),
        ("max_price", 0.5),
        ("interruptible", True),
    ],
)
def test_pick_never_crosses_exact_fields(field: str, other: object) -> None:
    """Even a much bigger machine never serves a job of another exact key, either way."""
    roomy = dataclasses.replace(SIG, cpu_cores=64, mem_gb=512.0, disk_gb=1000)
    wanted = dataclasses.replace(SIG, **{field: other})
    assert pick_instance([make_instance(roomy)], wanted, NEEDS) is None
    changed = dataclasses.replace(roomy, **{field: other})
    assert pick_instance([make_instance(changed)], SIG, NEEDS) is None


def test_any_gpu_model_and_fewer_gpus_are_served() -> None:
    """A job that names no GPU model runs on any; the GPU count is at least, not equal."""
    four = make_instance(dataclasses.replace(SIG, num_gpus=4))
    assert pick_instance([four], dataclasses.replace(SIG, gpu_name=None), NEEDS) is four
    two_gpus = dataclasses.replace(SIG, num_gpus=2)
    assert pick_instance([four], two_gpus, NEEDS) is four
    assert pick_instance([make_instance()], two_gpus, NEEDS) is None


# -- least_recently_used: which idle instance makes room ----------------------------------


def test_least_recently_used_evicts_the_longest_idle() -> None:
    """The instance idle longest is the least likely to be wanted soon; busy ones never go."""
    now = 1_900_000_000.0
    busy = make_instance(state=State.BUSY, released_at=now - 100)
    oldest = make_instance(released_at=now - 50)
    pool = [busy, make_instance(released_at=now - 10), oldest, make_instance(released_at=now)]
    assert least_recently_used(pool) is oldest
    assert least_recently_used([busy, make_instance(state=State.BOOTING)]) is None


# -- with_capacity: what the rented machine can serve -------------------------------------


@pytest.mark.parametrize(
    ("machine", "expected"),
    [
        pytest.param(("RTX 4090", 1, 16.7, 48.411, 250), (16, 48.411, 250), id="raised"),
        pytest.param(("RTX 4090", 1, 2.0, 8.0, 10), (4, 16.0, 40), id="never-below-the-request"),
    ],
)
def test_with_capacity(machine: tuple[Any, ...], expected: tuple[int, float, int]) -> None:
    """The signature of a rented machine: at-least fields raised to the machine, the rest kept."""
    rented = SIG.with_capacity(*machine)
    assert (rented.cpu_cores, rented.mem_gb, rented.disk_gb) == expected
    assert rented.exact_key() == SIG.exact_key()
    assert rented.can_serve(SIG)


def test_one_core_job_machine_serves_a_later_four_core_job() -> None:
    small = dataclasses.replace(SIG, cpu_cores=1, mem_gb=0.0)
    assert not small.can_serve(SIG)
    assert small.with_capacity("RTX 4090", 1, 16.0, 32.0, 40).can_serve(SIG)


# -- retire_reason: when an idle (or just released) instance goes -------------------------


@pytest.mark.parametrize(
    ("ttl", "idle", "retired"),
    [
        pytest.param(TTL, TTL - 1, False, id="just-under"),
        pytest.param(TTL, TTL - 0.001, False, id="a-millisecond-under"),
        pytest.param(TTL, TTL, True, id="at-the-ttl"),
        pytest.param(TTL, TTL + 1, True, id="past"),
        pytest.param(0.0, 0.0, True, id="ttl-0-retires-at-once"),
    ],
)
def test_ttl(ttl: float, idle: float, retired: bool) -> None:
    with frozen_clock() as clock:
        instance = make_instance(released_at=time.time())
        clock.tick(idle)
        reason = retire_reason(instance, time.time(), config(ttl=ttl), Demand())
    assert (reason is not None) == retired
    if retired:
        assert reason == f"it was idle for --vastai-pool-ttl ({ttl:g} s)"


@pytest.mark.parametrize(
    ("lifetime", "age", "retired"),
    [
        pytest.param(600.0, 599.0, False, id="just-under"),
        pytest.param(600.0, 600.0, True, id="at-the-limit"),
        pytest.param(0.0, 10**6, False, id="0-means-no-limit"),
    ],
)
def test_max_lifetime(lifetime: float, age: float, retired: bool) -> None:
    """Age counts from the rent, not from the last release: a busy old instance retires
    the moment its job ends, though it was never idle."""
    with frozen_clock() as clock:
        instance = make_instance()
        clock.tick(age)
        instance.last_released_at = time.time()
        reason = retire_reason(instance, time.time(), config(max_lifetime=lifetime), Demand())
    assert (reason is not None) == retired
    if retired:
        assert "--vastai-pool-max-lifetime" in reason


OTHER_GPU = dataclasses.replace(SIG, gpu_name="RTX 3090")
SMALLER = dataclasses.replace(SIG, cpu_cores=1, mem_gb=2.0)
BIGGER = dataclasses.replace(SIG, cpu_cores=64)


@pytest.mark.parametrize(
    ("remaining", "kept"),
    [
        pytest.param(None, True, id="unknown-demand-keeps"),
        pytest.param([], False, id="nothing-left"),
        pytest.param([OTHER_GPU, OTHER_GPU], False, id="only-another-gpu"),
        pytest.param([BIGGER], False, id="only-a-bigger-job"),
        pytest.param([OTHER_GPU, SMALLER], True, id="a-smaller-job-it-can-serve"),
        pytest.param([SIG], True, id="a-job-of-its-own-signature"),
    ],
)
def test_look_ahead(remaining: list[Signature] | None, kept: bool) -> None:
    """An instance no remaining job can use goes at once, however long the TTL."""
    demand = Demand()
    if remaining is not None:
        demand.reset(remaining)
    with frozen_clock():
        instance = make_instance(released_at=time.time())
        reason = retire_reason(instance, time.time(), config(ttl=3600.0), demand)
    assert reason == (None if kept else "no job still to run can use it")


def test_an_instance_a_waiting_job_could_use_is_kept_past_demand_and_ttl() -> None:
    """Every job of its kind is placed (demand is empty) and its TTL is over, but a job that
    waits for another instance's boot could start on it now: it stays, for that job."""
    demand = Demand()
    demand.reset([])
    with frozen_clock():
        instance = make_instance(released_at=time.time() - 7200)
        now = time.time()
        assert retire_reason(instance, now, config(ttl=60.0), demand) is not None
        assert retire_reason(instance, now, config(ttl=60.0), demand, awaited=True) is None


@pytest.mark.parametrize(
    ("error", "everywhere"),
    [
        pytest.param("failed to boot: manifest for acme/x:1 not found: manifest unknown", True),
        pytest.param("failed to boot: pull access denied for acme/private", True),
        pytest.param(f"did not boot. {NO_SSHD_FIX}", True, id="no-sshd"),
        pytest.param("failed to boot: OCI runtime create failed: runc create failed", False),
        pytest.param("failed to boot: write /var/lib/docker: no space left on device", False),
        pytest.param("failed to boot: toomanyrequests: You have reached your pull rate", False),
        pytest.param("did not boot within the boot timeout: still loading", False),
    ],
)
def test_a_bad_image_fails_everywhere_a_machine_fault_does_not(
    error: str, everywhere: bool
) -> None:
    """Which boot errors send the job to another machine (BOOT_ATTEMPTS in all): those of
    the machine; a wrong image would fail on every machine and only cost boots."""
    assert fails_everywhere(error) is everywhere


def test_look_ahead_counts_submissions_and_retries() -> None:
    """A submitted job no longer holds an instance back; a failed one (retried) does again."""
    demand = Demand()
    demand.reset([SIG, SIG])
    instance = make_instance(released_at=1_900_000_000.0)

    def kept() -> bool:
        return retire_reason(instance, 1_900_000_000.0, config(ttl=3600.0), demand) is None

    demand.submitted([SIG])
    assert kept()
    demand.submitted([SIG])
    assert not kept()
    demand.submitted([SIG])  # never below zero: one return makes it wanted again
    demand.returned([SIG])
    assert kept()


@pytest.mark.parametrize(
    ("listed_price", "cap", "retired"),
    [
        pytest.param(0.61, 0.6, True, id="above"),
        pytest.param(0.6, 0.6, False, id="at-the-cap"),
        pytest.param(5.0, None, False, id="no-cap"),
    ],
)
def test_price_cap(listed_price: float, cap: float | None, retired: bool) -> None:
    """The price the list call reports (a rise after the rent) is what counts."""
    instance = make_instance(price=0.4, released_at=time.time())
    instance.observe(row(price=listed_price))
    reason = retire_reason(instance, time.time(), config(max_price=cap, ttl=3600.0), Demand())
    assert (reason is not None) == retired
    if retired:
        assert reason.startswith(f"its price rose to ${listed_price:.3f}/h")


@pytest.mark.parametrize(
    ("actual", "intended", "retired"),
    [
        ("offline", "running", True),
        ("stopped", "stopped", True),
        ("running", "stopped", True),  # outbid: about to stop
        ("exited", "running", True),
        ("unknown", "running", True),
        ("running", "running", False),
    ],
)
def test_lost_host(actual: str, intended: str, retired: bool) -> None:
    instance = make_instance(released_at=time.time())
    instance.observe(row(actual=actual, intended=intended))
    reason = retire_reason(instance, time.time(), config(ttl=3600.0), Demand())
    assert (reason is not None) == retired
    if retired:
        assert reason == f"its host is {actual}"


# -- rent_refusal: total price and budget -------------------------------------------------

HORIZON_HOURS = BUDGET_HORIZON_SECONDS / 3600.0


@pytest.mark.parametrize(
    ("rate", "price", "spend", "caps", "refused_by"),
    [
        pytest.param(0.0, 9.0, 0.0, {}, None, id="no-caps"),
        pytest.param(0.6, 0.4, 0.0, {"max_total_price": 1.0}, None, id="total-at-cap"),
        pytest.param(
            0.6, 0.41, 0.0, {"max_total_price": 1.0}, "--vastai-max-total-price", id="total-over"
        ),
        pytest.param(0.0, 0.7, 0.0, {"max_total_price": 0.6}, "--vastai-max-total-price"),
        # budget: spend + (rate + price) x the horizon must stay within it
        pytest.param(1.0, 1.0, 1.0 - 2.0 * HORIZON_HOURS, {"budget": 1.0}, None, id="budget-at"),
        pytest.param(
            1.0, 1.0, 1.01 - 2.0 * HORIZON_HOURS, {"budget": 1.0}, "--vastai-budget", id="over"
        ),
        pytest.param(0.0, 1.0 / HORIZON_HOURS, 0.0, {"budget": 1.0}, None, id="fresh-run-fits"),
        pytest.param(0.0, 0.1, 1.0, {"budget": 1.0}, "--vastai-budget", id="budget-spent"),
    ],
)
def test_rent_refusal(
    rate: float, price: float, spend: float, caps: dict[str, float], refused_by: str | None
) -> None:
    refusal = rent_refusal(rate, price, spend, Caps(**caps))
    if refused_by is None:
        assert refusal is None
    else:
        assert refusal is not None and refused_by in refusal


def test_budget_horizon_with_the_spend_so_far() -> None:
    """After an hour at $0.5/h a $1 budget has $0.5 left: a $0.5/h rent fits the 15-minute
    horizon ($0.5 + 2 x $0.5 x 0.25 = $0.75), a $2/h one does not ($1.125)."""
    with frozen_clock() as clock:
        running = make_instance(price=0.5)
        clock.tick(3600)
        spend = running.cost(time.time())
    assert spend == pytest.approx(0.5)
    budget = Caps(budget=1.0)
    assert rent_refusal(0.5, 0.5, spend, budget) is None
    assert "--vastai-budget" in (rent_refusal(0.5, 2.0, spend, budget) or "")


# -- a real Pool on the fake marketplace --------------------------------------------------

# Rentable offers of the catalogue, one per hand-made instance (a rented offer is taken).
CHEAP_OFFERS = (9210022, 9210023, 9210019, 9210020, 9210018, 9210015, 9210003)


@dataclass
class Rig:
    """A real Pool, Marketplace and Ledger against a running fake; hand-made instances are
    really rented on the fake, so the pool's destroy calls hit something real."""

    fake: FakeVast
    market: Marketplace
    pool: Pool
    state_dir: Path
    leases: dict[str, Lease] = dataclasses.field(default_factory=dict)

    def rent(self, signature: Signature, tag: str, state: State = State.IDLE) -> Instance:
        """Really rented on the fake, then moved to ``state`` the legal way."""
        offer_id = CHEAP_OFFERS[len(self.pool.instances())]
        label = make_label(self.pool.config.run_id, tag)
        instance = make_instance(signature, label=label, state=State.RENTING, offer_id=offer_id)
        instance.instance_id = self.market.rent(
            offer_id, image=signature.image, disk_gb=40, label=label, onstart=""
        )
        table = self.pool.table
        table.add(instance)
        table.move(instance, State.BOOTING)
        table.move(instance, State.BOOTSTRAPPING)
        if state is State.BUSY:
            assert instance.slots is not None
            self.leases[tag] = instance.slots.take(NEEDS)
        table.move(instance, state)
        return instance

    def release(self, instance: Instance, tag: str) -> None:
        self.pool.release(Placement(instance, self.leases.pop(tag)), healthy=True)

    def fake_status(self, instance: Instance) -> str | None:
        """The instance's actual_status on the fake (None while just created)."""
        rows = {r["id"]: r for r in self.fake.ledger()["instances"]}
        return rows[instance.instance_id]["status"]

    def destroyed(self, instance: Instance) -> bool:
        return self.fake_status(instance) == "destroyed"

    def api_calls(self) -> int:
        return sum(self.fake.ledger()["api_calls"].values())


def make_rig(fake: FakeVast, state_dir: Path, **overrides: Any) -> Rig:
    market = Marketplace(fake.api_key, fake.url)
    cfg = config(**overrides)
    key = RunKey.create(state_dir / "keys", cfg.run_id)
    pool = Pool(market, Ledger(state_dir), key, cfg)
    pool.orphans_reaped.set()  # no earlier runs here
    return Rig(fake, market, pool, state_dir)


LIFETIME = 120.0


@pytest.fixture
def rig(fakevast: FakeVast, tmp_path: Path) -> Iterator[Rig]:
    """Pool settings: TTL 60 s, max lifetime 120 s, max price $0.6/h."""
    made = make_rig(fakevast, tmp_path / "state", max_lifetime=LIFETIME, max_price=0.6)
    yield made
    made.pool.shutdown()  # whatever a failing test left; the fixture then checks the fake


def destroy_reasons(caplog: pytest.LogCaptureFixture) -> dict[str, str]:
    """tag -> why the pool destroyed that instance, from its "Destroying ..." log line."""
    found = {}
    for record in caplog.records:
        said = re.fullmatch(r"Destroying instance \d+ \([^,]*, ([^)]*)\): (.*)", record.message)
        if said:
            found[said[1].rsplit(":", 1)[1]] = said[2]
    return found


def test_sweep_destroys_exactly_the_idle_instances_that_are_due(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """Six instances, each kept or destroyed for its own reason, sweep after sweep; the
    fake's ledger is the judge. A sweep with nothing due makes no API call."""
    caplog.set_level(logging.INFO, logger="snakemake.logging.vastai")
    fake, pool = rig.fake, rig.pool
    with frozen_clock() as clock:
        expired = rig.rent(SIG, "expired")
        fresh = rig.rent(SIG, "fresh")
        busy = rig.rent(SIG, "busy", state=State.BUSY)
        pricey = rig.rent(SIG, "pricey")
        lost = rig.rent(SIG, "lost")
        unwanted = rig.rent(OTHER_GPU, "unwanted")
        pool.demand.reset([SIG, SIG])  # jobs still to come want SIG, none OTHER_GPU
        fake.set_faults(
            {
                "instances": {
                    str(pricey.instance_id): {"price_rise": {"dph_total": 0.9}},
                    str(lost.instance_id): {"offline": True},
                }
            }
        )
        fake.wait_for(lambda: rig.fake_status(lost) == "offline", timeout=20)
        pool.refresh()  # the status loop's list call: the new price, the lost host

        def alive() -> set[str]:
            running = {i.label for i in pool.instances() if not rig.destroyed(i)}
            assert running == {i.label for i in pool.instances() if i.state != State.GONE}
            return {label.rsplit(":", 1)[1] for label in running}

        expired.last_released_at = time.time()  # T0
        clock.tick(TTL - 20)
        for instance in (fresh, pricey, lost, unwanted):
            instance.last_released_at = time.time()  # T0 + 40
        clock.tick(20)
        pool.sweep()  # T0 + 60: expired is idle for exactly the TTL, the others for 20 s
        assert alive() == {"fresh", "busy"}

        clock.tick(TTL - 21)
        calls = rig.api_calls()
        pool.sweep()  # T0 + 99: fresh is one second short of its TTL
        assert rig.api_calls() == calls
        assert alive() == {"fresh", "busy"}

        clock.tick(1)
        pool.sweep()  # T0 + 100: fresh at its TTL
        assert alive() == {"busy"}

        clock.tick(LIFETIME - 100)
        pool.sweep()  # T0 + 120: busy is at the lifetime, but lifetime waits for the job
        assert alive() == {"busy"} and busy.state == State.BUSY
        rig.release(busy, "busy")
        assert alive() == set()
    assert fake.alive_instances() == []
    assert destroy_reasons(caplog) == {
        "expired": "it was idle for --vastai-pool-ttl (60 s)",
        "pricey": "its price rose to $0.900/h, above --vastai-max-price $0.600/h",
        "lost": "its host is offline",
        "unwanted": "no job still to run can use it",
        "fresh": "it was idle for --vastai-pool-ttl (60 s)",
        "busy": "it is older than --vastai-pool-max-lifetime (120 s)",
    }


def test_an_idle_instance_the_marketplace_no_longer_lists_is_not_handed_out(rig: Rig) -> None:
    """Destroyed behind the pool's back (console, `vastai destroy`, a host gone for good):
    the list call no longer shows it, so no job may lease it."""
    with frozen_clock():
        vanished = rig.rent(SIG, "vanished")
        vanished.last_released_at = time.time()
        rig.pool.refresh()
        rig.market.destroy(vanished.instance_id)
        rig.pool.refresh()  # the row is gone
        rig.pool.sweep()
        assert pick_instance(rig.pool.instances(), SIG, NEEDS) is None


def test_sweep_keeps_everything_with_keep_instances(fakevast: FakeVast, tmp_path: Path) -> None:
    """--vastai-keep-instances is for debugging: no TTL, no look-ahead, nothing destroyed."""
    kept_rig = make_rig(fakevast, tmp_path / "state", keep_instances=True)
    idle = kept_rig.rent(SIG, "kept")
    try:
        with frozen_clock() as clock:
            idle.last_released_at = time.time()
            kept_rig.pool.demand.reset([])
            clock.tick(10 * TTL)
            kept_rig.pool.sweep()
            assert not kept_rig.destroyed(idle) and idle.state == State.IDLE
    finally:
        kept_rig.market.destroy(idle.instance_id)


REQUEST_4090 = ResourceRequest(
    rule="train",
    num_gpus=1,
    gpu_name="RTX 4090",
    cpu_cores=None,
    mem_gb=None,
    disk_gb=40,
    image="vastai/pytorch:@vastai-automatic-tag",
    geolocation=(),
    reliability=0.0,
    datacenter_only=False,
    max_price=None,
    extra_query="",
)


def acquire_like_the_executor(pool: Pool, request: ResourceRequest) -> Instance:
    """Pool.acquire waits for boots through the status loop's list calls: play that loop."""
    with ThreadPoolExecutor(max_workers=1) as worker:
        future = worker.submit(pool.acquire, request, "train-1-a1")
        for _ in range(600):
            pool.refresh()
            try:
                return future.result(timeout=0.1).instance
            except FutureTimeout:
                continue
        raise AssertionError("acquire did not return within 60 s")


@pytest.mark.parametrize(("max_instances", "evicted"), [(1, True), (2, False)])
def test_acquire_evicts_another_signature_only_at_capacity(
    fakevast: FakeVast, tmp_path: Path, max_instances: int, evicted: bool
) -> None:
    """At --vastai-pool-max-instances, an idle instance no job here can use makes room for
    the new rent (destroyed before the create, never both alive); below it, it stays."""
    small_rig = make_rig(fakevast, tmp_path / "state", caps=Caps(max_instances=max_instances))
    try:
        other = small_rig.rent(
            dataclasses.replace(REQUEST_4090.signature(), gpu_name="RTX 3060"), "x"
        )
        other.last_released_at = time.time()
        new = acquire_like_the_executor(small_rig.pool, REQUEST_4090)

        assert new is not other and new.state == State.BUSY
        rows = {r["id"]: r for r in fakevast.ledger()["instances"]}
        assert rows[new.instance_id]["gpu_name"] == "RTX 4090"
        assert rows[new.instance_id]["status"] == "running"
        assert (rows[other.instance_id]["status"] == "destroyed") == evicted
        assert (other.state == State.GONE) == evicted
        if evicted:
            assert rows[other.instance_id]["ended_at"] <= rows[new.instance_id]["created_at"]
    finally:
        small_rig.pool.shutdown()


def test_acquire_reuses_a_fitting_idle_instance_without_an_api_call(rig: Rig) -> None:
    idle = rig.rent(REQUEST_4090.signature().with_capacity("RTX 4090", 1, 16, 64, 40), "warm")
    idle.last_released_at = time.time()
    calls = rig.api_calls()
    assert rig.pool.acquire(REQUEST_4090, "train-2-a1").instance is idle
    assert idle.state == State.BUSY
    assert rig.api_calls() == calls


# -- orphans: instances of dead runs ------------------------------------------------------


@dataclass
class Runs:
    """Three earlier runs as a later run sees them in its state directory."""

    dead: str = "20300101000000-dead00"
    live: str = "20300101000000-live00"
    unknown: str = "20300101000000-unkn00"
    own: str = "20300101000000-own000"


@pytest.fixture
def runs(tmp_path: Path) -> Iterator[Runs]:
    """dead: its lock file exists and is free (the process died, even by kill -9); live: its
    lock is held; unknown: no lock file here (another machine's run, perhaps)."""
    names = Runs()
    RunLock(tmp_path, names.dead).release()
    live = RunLock(tmp_path, names.live)
    own = RunLock(tmp_path, names.own)
    yield names
    live.release()
    own.release()


def test_find_orphans_only_the_dead_runs_instances(tmp_path: Path, runs: Runs) -> None:
    listed = [
        row(1, make_label(runs.dead, "a-1")),
        row(2, make_label(runs.dead, "b-2"), actual="offline"),
        row(3, make_label(runs.live, "a-1")),
        row(4, make_label(runs.unknown, "a-1")),
        row(5, make_label(runs.own, "a-1")),
        row(6, "my-notebook"),
        row(7, "snakemake-vastai:not-a-run"),
    ]
    orphans = find_orphans(listed, tmp_path, own_run=runs.own)
    assert [(o.instance_id, o.run_id) for o in orphans] == [(1, runs.dead), (2, runs.dead)]


def test_reap_orphans_destroys_only_the_dead_runs_instances(
    fakevast: FakeVast, tmp_path: Path, runs: Runs
) -> None:
    """On the fake: the reaper's destroy calls hit only the dead run's instance, and the
    plugin's ledger closes its record."""
    market = Marketplace(fakevast.api_key, fakevast.url)
    ledger = Ledger(tmp_path)
    ids = {}
    for offer_id, run in zip(CHEAP_OFFERS, (runs.dead, runs.live, runs.unknown), strict=False):
        label = make_label(run, "job-1")
        ledger.rent_requested(label, run, offer_id, 0.1)
        ids[run] = market.rent(offer_id, image="img", disk_gb=40, label=label, onstart="")
        ledger.rented(label, ids[run])
    try:
        reaped = reap_orphans(market, ledger, tmp_path, own_run=runs.own)
        assert [o.instance_id for o in reaped] == [ids[runs.dead]]
        status = {r["id"]: r["status"] for r in fakevast.ledger()["instances"]}
        assert status[ids[runs.dead]] == "destroyed"
        assert status[ids[runs.live]] != "destroyed" and status[ids[runs.unknown]] != "destroyed"
        assert {r.run_id for r in ledger.open_records()} == {runs.live, runs.unknown}
    finally:
        for run in (runs.live, runs.unknown):
            market.destroy(ids[run])


def test_the_teardown_waits_for_every_destroy_turn_it_needs() -> None:
    """Vast.ai allows one destroy every 3 s: a teardown of forty instances needs two minutes
    for the destroys alone, so its budget grows by a turn per instance instead of ending
    at two minutes with some of them still billing (the no-pack load case left ten)."""
    assert teardown_budget(0) == TEARDOWN_SECONDS
    assert teardown_budget(40) == TEARDOWN_SECONDS + 40 * LIMITS["destroy"].seconds


def test_a_create_waiting_for_its_turn_is_withdrawn_when_a_share_comes_free(
    fakevast_factory, tmp_path: Path
) -> None:
    """Under Vast.ai's create limit (one per 4.5 s) a second create waits its turn. When the
    first instance's share comes free meanwhile (its job ended), the waiting job takes that
    share and its create is never sent: one create at the fake, no second instance."""
    fake = fakevast_factory(boot_seconds=3600, rate_limits=True)
    market = Marketplace(fake.api_key, fake.url, paced=True)
    cfg = config(pack=False)
    pool = Pool(market, Ledger(tmp_path), RunKey.create(tmp_path / "keys", cfg.run_id), cfg)
    pool.orphans_reaped.set()
    try:
        first = Seeker(REQUEST_4090, "first-1-a1", ())
        step = pool._next_step(first)
        assert isinstance(step, Instance)
        with pool._reservation(step):
            placed = pool._rent(step, first)  # the create's turn is now 4.5 s away
        second = Seeker(REQUEST_4090, "second-2-a1", ())
        with ThreadPoolExecutor(max_workers=1) as worker:
            waiting = worker.submit(pool._placement, second)
            time.sleep(1.0)  # the second create waits for its turn
            pool.release(placed, healthy=True)  # the first job ended: its share is free
            assert waiting.result(timeout=30) is None  # withdrawn: look again
        again = pool._next_step(second)
        assert isinstance(again, Placement) and again.instance is placed.instance
        creates = fake.ledger()["api_calls"].get("PUT /api/v0/asks/{id}/", 0)
        assert creates == 1, fake.ledger()["api_calls"]
        assert [i.instance_id for i in pool.instances()] == [placed.instance.instance_id]
    finally:
        pool.shutdown()
