"""--vastai-keep-warm, piece by piece and offline: idle instances kept up past a run's end
(their deadline handed to their own dead-man switch) and adopted by the next run.

No Snakemake run and no fake marketplace here (tests/test_keep_warm.py runs real workflows):
the ledger's kept and adopted events, and its one-winner claim under the file's lock (threads
and processes); the adoption's verdicts; orphans and run keys next to kept instances; the
host's deadline as keep_command writes it and the watchdog reads it; the patience before a
rent; the settings check; and what the run says at its end.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import multiprocessing
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar
from unittest import mock

import pytest

from snakemake_executor_plugin_vastai.cli.commands import RUNNING, StatusRow
from snakemake_executor_plugin_vastai.edge.resources import SettingsError, validate_settings
from snakemake_executor_plugin_vastai.edge.run import teardown_report
from snakemake_executor_plugin_vastai.edge.settings import ExecutorSettings
from snakemake_executor_plugin_vastai.market.marketplace import InstanceInfo, MarketplaceError
from snakemake_executor_plugin_vastai.market.request import Signature
from snakemake_executor_plugin_vastai.pool import ledger as ledger_module
from snakemake_executor_plugin_vastai.pool.adoption import (
    ADOPT_MARGIN_SECONDS,
    Adoption,
    Sorted,
    sort_kept,
)
from snakemake_executor_plugin_vastai.pool.demand import Demand
from snakemake_executor_plugin_vastai.pool.instance import Instance
from snakemake_executor_plugin_vastai.pool.keeping import (
    Keeping,
    KeptInstance,
    forget_unused_keys,
    keepable,
    kept_note,
    most_kept_cost,
    switch_check_seconds,
)
from snakemake_executor_plugin_vastai.pool.ledger import (
    InstanceRecord,
    Ledger,
    RunLock,
    billed_dollars,
    make_label,
)
from snakemake_executor_plugin_vastai.pool.placement import (
    RENT_PATIENCE_SECONDS,
    Seeker,
    patient,
    retire_reason,
)
from snakemake_executor_plugin_vastai.pool.reaper import find_orphans, reap_orphans
from snakemake_executor_plugin_vastai.pool.states import State
from snakemake_executor_plugin_vastai.pool.table import InstanceTable
from snakemake_executor_plugin_vastai.remote import bootstrap
from snakemake_executor_plugin_vastai.remote.bootstrap import BootstrapPlan, keep_command
from snakemake_executor_plugin_vastai.remote.onhost import watchdog
from snakemake_executor_plugin_vastai.remote.ssh import CommandResult, RemoteError, Traffic
from snakemake_executor_plugin_vastai.remote.sshkey import RunKey
from snakemake_executor_plugin_vastai.remote.staging import REMOTE_BASE
from tests.test_ledger import T0
from tests.test_pool_decisions import (
    REQUEST_4090,
    SIG,
    Runs,
    config,
    make_instance,
    offer,
    row,
)

T = TypeVar("T")

RUN_A = "20300101000000-aaaaaa"  # the run that kept an instance
RUN_B = "20300101000000-bbbbbb"  # a later run that adopts it
BOOTSTRAP_KEY = "9.1.0-0123456789ab"
OTHER_GPU = dataclasses.replace(SIG, gpu_name="RTX 3090")
SMALLER = dataclasses.replace(SIG, cpu_cores=1, mem_gb=2.0)
# A job of SIG's own kind: make_instance's instances (SIG, one RTX 4090, 16 cores) serve it.
REQUEST = dataclasses.replace(
    REQUEST_4090, image=SIG.image, geolocation=SIG.geolocation, cpu_cores=4, mem_gb=16.0
)


def at(offset: float, call: Callable[[], T]) -> T:
    """``call`` with the ledger's clock at T0 + offset: it stamps each event with it (only
    the ledger's: freezegun for every event would cost this file seconds)."""
    frozen = SimpleNamespace(time=lambda: T0 + offset, strftime=time.strftime)
    with mock.patch.object(ledger_module, "time", frozen):
        return call()


def kept_instance(
    instance_id: int = 7,
    deadline: float = T0 + 400,
    signature: Signature = SIG,
    deadman: float = 600.0,
) -> KeptInstance:
    return KeptInstance(
        instance_id=instance_id,
        deadline=deadline,
        signature=signature,
        offer=offer(instance_id, price=3.6),
        deadman=deadman,
        bootstrap=BOOTSTRAP_KEY,
        digests=("sha256:aa", "sha256:bb"),
        born_at=T0,
    )


def rent_and_keep(
    ledger: Ledger,
    run: str = RUN_A,
    instance_id: int = 7,
    details: dict[str, Any] | None = None,
    **kept: Any,
) -> str:
    """A rent of ``run`` (at T0, $3.60/h), created at +2 s, running at +10 s, kept at +100 s
    with ``details`` (by default a KeptInstance of ``kept``'s fields); its label."""
    label = make_label(run, f"job-{instance_id}")
    if details is None:
        details = kept_instance(instance_id, **kept).to_json()
    at(0, lambda: ledger.rent_requested(label, run, instance_id, 3.6))
    at(2, lambda: ledger.rented(label, instance_id))
    at(10, lambda: ledger.running(label))
    at(100, lambda: ledger.kept(label, details))
    return label


def by_label(ledger: Ledger) -> dict[str, InstanceRecord]:
    return {record.label: record for record in ledger.records()}


def events(ledger: Ledger) -> list[dict[str, Any]]:
    return [json.loads(line) for line in ledger.path.read_text().splitlines()]


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    return Ledger(tmp_path / "vastai")


# -- the ledger: kept, adopted, and the bill split between the two runs ----------------------


def test_a_kept_record_knows_its_deadline_until_it_ends(ledger: Ledger) -> None:
    label = rent_and_keep(ledger, deadline=T0 + 400)
    [record] = ledger.records()
    assert record.open and record.kept_until() == T0 + 400
    at(200, lambda: ledger.destroyed(label))
    [record] = ledger.records()
    assert record.kept_until() is None, "a destroyed instance is no longer kept"
    assert not at(210, lambda: ledger.adopt(label, make_label(RUN_B, "kept-7"), RUN_B))


def test_an_adoption_ends_the_keeping_runs_bill_and_starts_the_adopters(ledger: Ledger) -> None:
    label = rent_and_keep(ledger, instance_id=7, deadline=T0 + 400)
    at(100, lambda: ledger.data_billed(label, 0.25))
    new_label = make_label(RUN_B, "kept-7")
    assert at(150, lambda: ledger.adopt(label, new_label, RUN_B))
    at(160, lambda: ledger.job_ran(new_label, "rule b"))
    records = by_label(ledger)
    old, new = records[label], records[new_label]

    assert old.ended_at == T0 + 150 and not old.open
    assert old.handed_to == new_label and old.kept_until() is None
    assert new.open and new.run_id == RUN_B and new.adopted_from == label
    assert new.instance_id == old.instance_id == 7
    assert new.key == old.key == RUN_A, "the instance still accepts only the keeping run's key"
    assert new.created_at == T0 + 150 and new.dph_total == 3.6
    assert new.jobs == ["rule b"] and old.jobs == []
    assert new.kept_until() is None, "adopted is in use, not kept"

    # The whole bill, from the create (+2 s) to the adopter's destroy (+300 s), once.
    at(300, lambda: ledger.destroyed(new_label))
    records = by_label(ledger)
    whole = billed_dollars(T0 + 2, T0 + 300, 3.6) + 0.25
    assert records[label].cost(T0 + 10_000) == pytest.approx(
        billed_dollars(T0 + 2, T0 + 150, 3.6) + 0.25
    )
    assert records[label].cost(T0 + 10_000) + records[new_label].cost(T0 + 10_000) == (
        pytest.approx(whole)
    )


def test_only_the_first_adoption_of_a_kept_instance_is_written(ledger: Ledger) -> None:
    label = rent_and_keep(ledger)
    assert ledger.adopt(label, make_label(RUN_B, "kept-7"), RUN_B)
    written = ledger.path.read_bytes()
    assert not ledger.adopt(label, make_label("20300101000000-cccccc", "kept-7"), "c")
    assert ledger.path.read_bytes() == written, "a refused adoption writes nothing"
    assert [r.run_id for r in ledger.open_records()] == [RUN_B]


def test_only_a_kept_instance_can_be_adopted(ledger: Ledger) -> None:
    new_label = make_label(RUN_B, "kept-1")
    assert not ledger.adopt("snakemake-vastai:nobody:job-1", new_label, RUN_B)
    label = make_label(RUN_A, "job-1")
    ledger.rent_requested(label, RUN_A, 1, 0.5)
    ledger.rented(label, 1)
    assert not ledger.adopt(label, new_label, RUN_B), "open, but never kept"
    assert all(e["event"] != "adopted" for e in events(ledger))
    assert [r.label for r in ledger.open_records()] == [label]


def test_kept_again_and_adopted_again_it_keeps_the_first_runs_key(ledger: Ledger) -> None:
    """Adopting logs in with the key the instance accepts: the renter's, through every
    later keeper."""
    first = rent_and_keep(ledger)
    second = make_label(RUN_B, "kept-7")
    third = make_label("20300101000000-cccccc", "kept-7")
    assert ledger.adopt(first, second, RUN_B)
    ledger.kept(second, kept_instance(deadline=time.time() + 300).to_json())
    assert ledger.adopt(second, third, "20300101000000-cccccc")
    records = by_label(ledger)
    assert records[third].key == RUN_A and records[third].adopted_from == second
    assert records[second].handed_to == third and records[first].handed_to == second
    assert [r.label for r in ledger.open_records()] == [third]


def test_kept_details_survive_the_ledger_file(ledger: Ledger) -> None:
    original = kept_instance(deadline=T0 + 400)
    label = rent_and_keep(ledger, details=original.to_json())
    [line] = [e for e in events(ledger) if e["event"] == "kept"]
    assert line["label"] == label
    assert isinstance(line["kept"]["signature"]["geolocation"], list), "JSON has no tuples"
    [record] = Ledger(ledger.directory).records()  # read fresh from the file
    assert KeptInstance.from_json(record.kept or {}) == original


def test_kept_instance_of_an_instance() -> None:
    instance = make_instance(offer_id=7)
    instance.born_at = T0 - 3600
    instance.deadman = 300.0
    instance.files.remember(["sha256:bb", "sha256:aa"])
    kept = KeptInstance.of(instance, T0 + 400, BOOTSTRAP_KEY)
    assert kept.instance_id == 7 and kept.deadline == T0 + 400 and kept.deadman == 300.0
    assert kept.offer == instance.offer and kept.signature == instance.signature
    assert kept.digests == ("sha256:aa", "sha256:bb")
    assert kept.born_at == T0 - 3600, "the lifetime counts from the first rent"
    assert KeptInstance.from_json(json.loads(json.dumps(kept.to_json()))) == kept


def _broken(change: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    data = json.loads(json.dumps(kept_instance().to_json()))
    change(data)
    return data


@pytest.mark.parametrize(
    "data",
    [
        pytest.param({}, id="empty"),
        pytest.param({"deadline": T0 + 400}, id="only-the-deadline"),
        pytest.param(_broken(lambda d: d.pop("signature")), id="no-signature"),
        pytest.param(_broken(lambda d: d.pop("born_at")), id="no-born-at"),
        pytest.param(_broken(lambda d: d["signature"].update(geolocation=None)), id="geo-null"),
        pytest.param(_broken(lambda d: d["signature"].update(vram=24)), id="newer-signature"),
        pytest.param(_broken(lambda d: d.update(offer=[1, 2])), id="offer-a-list"),
        pytest.param(_broken(lambda d: d["offer"].pop("gpu_name")), id="offer-short"),
        pytest.param(_broken(lambda d: d.update(instance_id="seven")), id="id-not-a-number"),
        pytest.param(_broken(lambda d: d.update(deadline=None)), id="deadline-null"),
        pytest.param(_broken(lambda d: d.update(signature="RTX 4090")), id="signature-text"),
        pytest.param(_broken(lambda d: d.update(digests=3)), id="digests-a-number"),
        pytest.param([1, 2, 3], id="a-list"),
        pytest.param(None, id="null"),
    ],
)
def test_unreadable_kept_details_read_as_none(data: Any) -> None:
    assert KeptInstance.from_json(data) is None


# -- one winner, whoever races --------------------------------------------------------------

RACE_LABELS = 8  # kept instances raced for at once
RACE_PROCESSES = 4
RACE_THREADS = 4  # per process, each with a Ledger (and a file handle) of its own


def _race(
    directory: Path, labels: list[str], runner: str, seed: int, jitter: float
) -> list[tuple[str, str]]:
    """Try to adopt each label, in a random order and after a random pause of up to
    ``jitter`` seconds each, from RACE_THREADS threads released at once; the (label, new
    label) adoptions this process won."""
    won: list[tuple[str, str]] = []
    start = threading.Barrier(RACE_THREADS)

    def claim(thread: int) -> None:
        rng = random.Random(seed * 100 + thread)
        ledger = Ledger(directory)
        order = rng.sample(labels, len(labels))
        run = f"{runner}t{thread}"
        start.wait()
        for label in order:
            time.sleep(rng.random() * jitter)  # 0: just another thread's turn
            new_label = make_label(run, f"kept-{label.rsplit('-', 1)[-1]}")
            if ledger.adopt(label, new_label, run):
                won.append((label, new_label))

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(RACE_THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return won


def _race_process(directory: str, labels: list[str], index: int, go: Any, out: str) -> None:
    go.wait(30)
    won = _race(Path(directory), labels, f"p{index}", seed=index + 1, jitter=0.001)
    Path(out).write_text(json.dumps(won))


def kept_labels(ledger: Ledger) -> list[str]:
    deadline = time.time() + 300
    return [rent_and_keep(ledger, instance_id=i, deadline=deadline) for i in range(RACE_LABELS)]


def assert_one_winner_each(ledger: Ledger, labels: list[str], won: list[tuple[str, str]]) -> None:
    assert sorted(label for label, _ in won) == sorted(labels), f"winners: {won}"
    adopted = [e for e in events(ledger) if e["event"] == "adopted"]
    assert sorted((e["label"], e["new_label"]) for e in adopted) == sorted(won)
    records = by_label(ledger)
    for label, new_label in won:
        assert records[label].handed_to == new_label
        assert records[new_label].open and records[new_label].adopted_from == label
    assert len(ledger.open_records()) == len(labels)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_threads_racing_for_kept_instances_adopt_each_once(ledger: Ledger, seed: int) -> None:
    """Each thread with a file handle of its own: the lock is the file's, not the object's.
    Threads switch as often as the interpreter can, so that they interleave."""
    labels = kept_labels(ledger)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        won = _race(ledger.directory, labels, "solo", seed=seed, jitter=0.0)
    finally:
        sys.setswitchinterval(interval)
    assert_one_winner_each(ledger, labels, won)


def test_processes_racing_for_kept_instances_adopt_each_once(
    ledger: Ledger, tmp_path: Path
) -> None:
    """Runs are processes: only the ledger file's lock stands between them."""
    labels = kept_labels(ledger)
    context = multiprocessing.get_context("fork")
    go = context.Event()
    outs = [tmp_path / f"won-{i}.json" for i in range(RACE_PROCESSES)]
    processes = [
        context.Process(
            target=_race_process, args=(str(ledger.directory), labels, i, go, str(outs[i]))
        )
        for i in range(RACE_PROCESSES)
    ]
    for process in processes:
        process.start()
    go.set()
    for process in processes:
        process.join(30)
    assert [p.exitcode for p in processes] == [0] * RACE_PROCESSES
    won = [(label, new) for out in outs for label, new in json.loads(out.read_text())]
    assert_one_winner_each(ledger, labels, won)


# -- sort_kept: what a run makes of each kept instance --------------------------------------

NOW = T0 + 1000


@dataclasses.dataclass
class Case:
    """One kept record of RUN_A (instance 7, deadline NOW + 300) as a new run sees it."""

    tmp_path: Path
    details: dict[str, Any] | None = None
    deadline: float = NOW + 300
    kept_deadman: float = 600.0
    rows: Callable[[str], dict[int, InstanceInfo]] = lambda label: {7: row(7, label)}
    demand: list[Signature] | None = None
    deadman: float = 600.0
    key: bool = True
    room: int = 8

    def sort(self) -> tuple[Sorted, str, dict[int, InstanceInfo]]:
        ledger = Ledger(self.tmp_path / "vastai")
        label = rent_and_keep(
            ledger, details=self.details, deadline=self.deadline, deadman=self.kept_deadman
        )
        keys = ledger.directory / "keys"
        keys.mkdir()
        if self.key:
            (keys / RUN_A).write_text("private")
            (keys / f"{RUN_A}.pub").write_text("public")
        demand = Demand()
        if self.demand is not None:
            demand.reset(self.demand)
        rows = self.rows(label)
        plan = sort_kept(ledger.records(), rows, demand, self.deadman, keys, self.room, NOW)
        return plan, label, rows


def only_verdict(plan: Sorted) -> tuple[str, str, InstanceInfo | None]:
    """(adopt/forget/leave, reason, row) of the one record sorted."""
    assert len(plan.adopt) + len(plan.forget) + len(plan.leave) == 1, plan
    if plan.adopt:
        return "adopt", "", plan.adopt[0].row
    if plan.forget:
        _, found, reason = plan.forget[0]
        return "forget", reason, found
    return "leave", plan.leave[0][1], None


@pytest.mark.parametrize(
    ("change", "verdict", "said", "with_row"),
    [
        pytest.param({}, "adopt", "", True, id="good"),
        pytest.param({"rows": lambda label: {}}, "forget", "no longer lists", False, id="unlisted"),
        pytest.param(
            {"rows": lambda label: {7: row(7, "someone-elses")}},
            "forget",
            "no longer lists",
            False,
            id="its-id-under-another-label",
        ),
        pytest.param(
            {"rows": lambda label: {7: row(7, label, actual="stopped", intended="stopped")}},
            "forget",
            "stopped",
            True,
            id="stopped",
        ),
        pytest.param(
            {"rows": lambda label: {7: row(7, label, actual="running", intended="stopped")}},
            "forget",
            "",
            True,
            id="outbid-stopping",
        ),
        pytest.param(
            {"rows": lambda label: {7: row(7, label, actual="offline")}},
            "forget",
            "offline",
            True,
            id="host-offline",
        ),
        pytest.param({"key": False}, "forget", "key", True, id="key-file-gone"),
        pytest.param(
            {"deadline": NOW + ADOPT_MARGIN_SECONDS - 1}, "leave", "too close", False, id="close"
        ),
        pytest.param({"deadline": NOW + ADOPT_MARGIN_SECONDS}, "adopt", "", True, id="margin"),
        pytest.param({"deadline": NOW - 5}, "leave", "too close", False, id="deadline-passed"),
        pytest.param({"demand": [OTHER_GPU]}, "leave", "no job", False, id="unwanted"),
        pytest.param({"demand": []}, "leave", "no job", False, id="nothing-to-run"),
        pytest.param({"demand": [OTHER_GPU, SMALLER]}, "adopt", "", True, id="wanted-smaller"),
        pytest.param({"kept_deadman": 300.0}, "leave", "dead-man", False, id="shorter-switch"),
        pytest.param({"kept_deadman": 900.0}, "adopt", "", True, id="longer-switch"),
        pytest.param({"deadman": 0.0}, "leave", "dead-man", False, id="run-without-switch"),
        pytest.param({"room": 0}, "leave", "as many instances", False, id="no-room"),
        pytest.param(
            {"details": {"deadline": NOW + 300}}, "leave", "cannot be read", False, id="unreadable"
        ),
    ],
)
def test_sort_kept_verdicts(
    tmp_path: Path, change: dict[str, Any], verdict: str, said: str, with_row: bool
) -> None:
    plan, label, rows = Case(tmp_path, **change).sort()
    got, reason, found = only_verdict(plan)
    assert (got, found is not None) == (verdict, with_row), reason
    assert said in reason
    if with_row:
        assert found is rows[7]
    if got == "adopt":
        [candidate] = plan.adopt
        assert candidate.record.label == label
        assert candidate.kept == kept_instance(
            deadline=change.get("deadline", NOW + 300),
            deadman=change.get("kept_deadman", 600.0),
        )


def test_the_reason_to_forget_an_outbid_instance_says_it_is_stopped(tmp_path: Path) -> None:
    rows: Callable[[str], dict[int, InstanceInfo]] = lambda label: {  # noqa: E731
        7: row(7, label, actual="running", intended="stopped")
    }
    plan, _, _ = Case(tmp_path, rows=rows).sort()
    assert "stopped" in only_verdict(plan)[1]


def test_sort_kept_skips_records_no_longer_kept(ledger: Ledger, tmp_path: Path) -> None:
    gone = rent_and_keep(ledger, instance_id=1, deadline=NOW + 300)
    ledger.destroyed(gone)
    adopted = rent_and_keep(ledger, instance_id=2, deadline=NOW + 300)
    ledger.adopt(adopted, make_label(RUN_B, "kept-2"), RUN_B)
    rows = {i: row(i, make_label(RUN_A, f"job-{i}")) for i in (1, 2)}
    plan = sort_kept(ledger.records(), rows, Demand(), 600.0, tmp_path, 8, NOW)
    assert plan == Sorted([], [], [])


def test_sort_kept_adopts_up_to_the_room_and_forgotten_ones_take_none(
    ledger: Ledger,
) -> None:
    labels = [rent_and_keep(ledger, instance_id=i, deadline=NOW + 300) for i in (1, 2, 3, 4)]
    keys = ledger.directory / "keys"
    keys.mkdir()
    (keys / RUN_A).write_text("private")
    rows = {i: row(i, label) for i, label in zip((2, 3, 4), labels[1:], strict=True)}
    plan = sort_kept(ledger.records(), rows, Demand(), 600.0, keys, 2, NOW)
    assert [c.record.label for c in plan.adopt] == labels[1:3]
    assert [(r.label, found) for r, found, _ in plan.forget] == [(labels[0], None)]
    assert [(r.label, reason) for r, reason in plan.leave] == [
        (labels[3], "the run has as many instances as it may")
    ]


# -- Adoption: the marketplace calls around the verdicts -----------------------------------

SENT_AT = T0 + 5000.0  # when the stub says each destroy was sent


class StubMarket:
    """The instance list and destroys, answered from memory; every call recorded."""

    def __init__(self, rows: list[InstanceInfo], refuse: frozenset[int] = frozenset()) -> None:
        self.rows = rows
        self.refuse = refuse
        self.calls: list[tuple[str, int | None]] = []

    def list_instances(self) -> list[InstanceInfo]:
        self.calls.append(("list", None))
        return list(self.rows)

    def request_destroy(self, instance_id: int, give_up: Any = None) -> float:
        self.calls.append(("request_destroy", instance_id))
        if instance_id in self.refuse:
            raise MarketplaceError(f"destroy of {instance_id} refused")
        return SENT_AT

    def destroy(self, instance_id: int, budget: float = 0.0) -> float:
        self.calls.append(("destroy", instance_id))
        if instance_id in self.refuse:
            raise MarketplaceError(f"destroy of {instance_id} refused")
        self.rows = [r for r in self.rows if r.id != instance_id]
        return SENT_AT

    def relabel(self, instance_id: int, label: str) -> None:
        self.calls.append(("relabel", instance_id))


def adoption(market: StubMarket, ledger: Ledger) -> Adoption:
    """Run B's adoption, before anything reaches SSH."""
    plan = BootstrapPlan("9.1.0", storage_plugins=(), deadman=600.0)
    stub: Any = market
    return Adoption(stub, ledger, InstanceTable(), Demand(), RUN_B, plan, pack=True)


def test_adoption_asks_the_marketplace_nothing_when_nothing_is_kept(ledger: Ledger) -> None:
    ledger.rent_requested(make_label(RUN_A, "j"), RUN_A, 1, 0.5)  # open, not kept
    market = StubMarket([row(1, make_label(RUN_A, "j"))])
    assert adoption(market, ledger).adopt(room=8) == []
    assert market.calls == []


def test_adoption_forgets_the_gone_and_destroys_the_stopped(ledger: Ledger) -> None:
    deadline = time.time() + 300
    unlisted = rent_and_keep(ledger, instance_id=1, deadline=deadline)
    stopped = rent_and_keep(ledger, instance_id=2, deadline=deadline)
    refused = rent_and_keep(ledger, instance_id=3, deadline=deadline)
    market = StubMarket(
        [
            row(2, stopped, actual="stopped", intended="stopped"),
            row(3, refused, actual="exited"),
        ],
        refuse=frozenset({3}),
    )
    assert adoption(market, ledger).adopt(room=8) == []
    assert ("destroy", 2) in market.calls and ("destroy", 3) in market.calls
    records = by_label(ledger)
    assert not records[unlisted].open
    assert records[stopped].ended_at == SENT_AT, "its bill ended when the destroy was sent"
    assert records[refused].open, "a failed destroy leaves it for a later reap"
    assert all(r.handed_to is None for r in records.values()), "nothing was adopted"


# -- orphans: kept instances are no orphans until their deadline -----------------------------


DEAD_ADOPTER = "20300101000000-dead11"  # a run that adopted a kept instance, then died


@pytest.fixture
def runs(tmp_path: Path) -> Iterator[Runs]:
    """As in test_pool_decisions: dead (lock free), live (lock held), own (this run); and
    DEAD_ADOPTER, dead too."""
    names = Runs()
    RunLock(tmp_path, names.dead).release()
    RunLock(tmp_path, DEAD_ADOPTER).release()
    live = RunLock(tmp_path, names.live)
    own = RunLock(tmp_path, names.own)
    yield names
    live.release()
    own.release()


def test_find_orphans_with_kept_and_adopted_instances(tmp_path: Path, runs: Runs) -> None:
    ledger = Ledger(tmp_path)
    now = time.time()
    ahead = rent_and_keep(ledger, runs.dead, 1, deadline=now + 300)
    passed = rent_and_keep(ledger, runs.dead, 2, deadline=now - 1)
    to_live = rent_and_keep(ledger, runs.dead, 3, deadline=now + 300)
    to_dead = rent_and_keep(ledger, runs.dead, 4, deadline=now + 300)
    to_own = rent_and_keep(ledger, runs.dead, 5, deadline=now + 300)
    plain = make_label(runs.dead, "job-6")
    assert ledger.adopt(to_live, make_label(runs.live, "kept-3"), runs.live)
    assert ledger.adopt(to_dead, make_label(DEAD_ADOPTER, "kept-4"), DEAD_ADOPTER)
    assert ledger.adopt(to_own, make_label(runs.own, "kept-5"), runs.own)
    # Each still listed under the label it had when kept: relabelling comes later, or failed.
    listed = [row(1, ahead), row(2, passed), row(3, to_live), row(4, to_dead), row(5, to_own)]
    listed.append(row(6, plain))
    records = ledger.records()

    found = find_orphans(listed, tmp_path, runs.own, records)
    assert [(o.instance_id, o.run_id, o.label) for o in found] == [
        (2, runs.dead, passed),
        (4, DEAD_ADOPTER, make_label(DEAD_ADOPTER, "kept-4")),  # as the ledger has it
        (6, runs.dead, plain),
    ]
    with_kept = find_orphans(listed, tmp_path, runs.own, records, with_kept=True)
    assert [o.instance_id for o in with_kept] == [1, 2, 4, 6]
    without_records = find_orphans(listed, tmp_path, runs.own)
    assert [o.instance_id for o in without_records] == [1, 2, 3, 4, 5, 6]


def test_reap_leaves_kept_instances_to_their_deadline_unless_asked(
    tmp_path: Path, runs: Runs
) -> None:
    ledger = Ledger(tmp_path)
    kept = rent_and_keep(ledger, runs.dead, 1, deadline=time.time() + 300)
    market: Any = StubMarket([row(1, kept)])
    assert reap_orphans(market, ledger, tmp_path, runs.own) == []
    assert by_label(ledger)[kept].kept_until() is not None
    assert [c for c in market.calls if c[0] != "list"] == []

    reaped = reap_orphans(market, ledger, tmp_path, None, with_kept=True)
    assert [o.instance_id for o in reaped] == [1]
    record = by_label(ledger)[kept]
    assert record.ended_at == SENT_AT and record.kept_until() is None


def test_reaping_an_adopted_instance_of_a_dead_run_bills_its_time_once(
    tmp_path: Path, runs: Runs
) -> None:
    ledger = Ledger(tmp_path)
    kept = rent_and_keep(ledger, runs.dead, 1, deadline=T0 + 10_000)
    adopted = make_label(DEAD_ADOPTER, "kept-1")
    assert at(200, lambda: ledger.adopt(kept, adopted, DEAD_ADOPTER))
    market: Any = StubMarket([row(1, kept)])  # the adopter died before it relabelled it
    reaped = reap_orphans(market, ledger, tmp_path, runs.own)
    assert [(o.instance_id, o.run_id) for o in reaped] == [(1, DEAD_ADOPTER)]
    records = by_label(ledger)
    assert records[kept].ended_at == T0 + 200, "the keeping run's bill ended at the adoption"
    assert records[adopted].ended_at == SENT_AT, "the adopter's ended with the destroy"


# -- run keys: kept exactly as long as an instance that accepts them may live ---------------


def make_keys(keys: Path, *names: str) -> None:
    keys.mkdir(parents=True, exist_ok=True)
    for name in names:
        (keys / name).write_text("private")
        (keys / f"{name}.pub").write_text(f"ssh-ed25519 AAAA {name}\n")


def key_names(keys: Path) -> set[str]:
    return {path.name for path in keys.iterdir()}


def test_forget_unused_keys(tmp_path: Path) -> None:
    dead, live, keeper, ending = "r-dead", "r-live", "r-keeper", "r-ending"
    adopted_by_live, adopted_by_dead, dead_adopter = "r-a-live", "r-a-dead", "r-a-dead-b"
    closed_keeper = "r-closed"
    for run in (dead, keeper, adopted_by_live, adopted_by_dead, dead_adopter, closed_keeper):
        RunLock(tmp_path, run).release()
    held = [RunLock(tmp_path, live), RunLock(tmp_path, ending)]
    try:
        ledger = Ledger(tmp_path)
        deadline = time.time() + 300
        rent_and_keep(ledger, keeper, 1, deadline=deadline)
        label = rent_and_keep(ledger, adopted_by_live, 2, deadline=deadline)
        assert ledger.adopt(label, make_label(live, "kept-2"), live)
        label = rent_and_keep(ledger, adopted_by_dead, 3, deadline=deadline)
        assert ledger.adopt(label, make_label(dead_adopter, "kept-3"), dead_adopter)
        ledger.destroyed(rent_and_keep(ledger, closed_keeper, 4, deadline=deadline))
        ledger.rent_requested(make_label(ending, "j"), ending, 5, 0.5)  # open, not kept
        ledger.rent_requested(make_label(dead, "j"), dead, 6, 0.5)  # open: destroy unconfirmed
        keys = tmp_path / "keys"
        everyone = (dead, live, keeper, ending, adopted_by_live, adopted_by_dead, dead_adopter)
        make_keys(keys, *everyone, closed_keeper)

        removed = forget_unused_keys(ledger, tmp_path, ending=ending)

        gone = [adopted_by_dead, closed_keeper, dead, dead_adopter, ending]
        assert removed == sorted(gone)
        stay = (live, keeper, adopted_by_live)
        assert key_names(keys) == {n for name in stay for n in (name, f"{name}.pub")}
    finally:
        for lock in held:
            lock.release()


def test_an_ending_run_keeps_the_keys_of_what_it_keeps(tmp_path: Path) -> None:
    """It kept one instance of its own and one it had adopted (which accepts the first
    renter's key only): both keys stay, nothing else of it."""
    renter, ending = "r-renter", "r-ending"
    RunLock(tmp_path, renter).release()
    lock = RunLock(tmp_path, ending)
    try:
        ledger = Ledger(tmp_path)
        deadline = time.time() + 300
        label = rent_and_keep(ledger, renter, 1, deadline=deadline)
        again = make_label(ending, "kept-1")
        assert ledger.adopt(label, again, ending)
        ledger.kept(again, kept_instance(1, deadline).to_json())
        make_keys(tmp_path / "keys", renter, ending)
        assert forget_unused_keys(ledger, tmp_path, ending=ending) == [ending]
        assert key_names(tmp_path / "keys") == {renter, f"{renter}.pub"}

        own = rent_and_keep(ledger, ending, 2, deadline=deadline)
        make_keys(tmp_path / "keys", ending)
        assert forget_unused_keys(ledger, tmp_path, ending=ending) == []
        assert by_label(ledger)[own].key == ending
    finally:
        lock.release()


def test_a_kept_runs_key_loads_for_the_adopter(tmp_path: Path) -> None:
    created = RunKey.create(tmp_path / "keys", RUN_A)
    loaded = RunKey.load(tmp_path / "keys", RUN_A)
    assert loaded == created


# -- on the host: keep_command writes the deadline, the watchdog reads it --------------------


def run_sh(command: str, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["/bin/sh", "-c", command], cwd=home, capture_output=True, text=True, timeout=10
    )


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """The login user's home on a host: the bootstrap made REMOTE_BASE in it."""
    (tmp_path / REMOTE_BASE).mkdir()
    return tmp_path


@pytest.mark.parametrize("seconds", [300.0, 299.2, 1.0])
def test_keep_command_writes_an_epoch_that_many_seconds_ahead(home: Path, seconds: float) -> None:
    before = time.time()
    result = run_sh(keep_command(seconds), home)
    after = time.time()
    assert result.returncode == 0, result.stderr
    text = (home / REMOTE_BASE / "keep-until").read_text()
    assert text.strip().isdigit() and text.endswith("\n")
    value = int(text)
    assert math.floor(before) + math.ceil(seconds) <= value <= after + math.ceil(seconds)
    assert value >= before + seconds - 1, "never more than a second short of what was asked"
    assert not (home / REMOTE_BASE / "keep-until.new").exists()


def test_keep_command_replaces_the_file_whole(home: Path) -> None:
    """Written aside and renamed over: the old file (another link to it here) is never
    written into, so the watchdog reads the old number or the new one, never half of one."""
    path = home / REMOTE_BASE / "keep-until"
    path.write_text("1700000000\n")
    os.link(path, home / "old-keep-until")
    assert run_sh(keep_command(60), home).returncode == 0
    assert (home / "old-keep-until").read_text() == "1700000000\n"
    assert abs(int(path.read_text()) - (time.time() + 60)) < 3


@pytest.fixture
def host_files(home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The watchdog's files where the bootstrap puts them, in ``home``; the directory."""
    base = home / REMOTE_BASE
    monkeypatch.setattr(watchdog, "BASE", str(base))
    monkeypatch.setattr(watchdog, "HEARTBEAT", str(base / "heartbeat"))
    monkeypatch.setattr(watchdog, "KEEP_UNTIL", str(base / "keep-until"))
    return base


def beat(base: Path, ago: float) -> None:
    heartbeat = base / "heartbeat"
    heartbeat.touch()
    stamp = time.time() - ago
    os.utime(heartbeat, (stamp, stamp))


DEADMAN = 60.0
LONG_AGO = 1000.0  # the watchdog started, and (when stale) the last heartbeat came


def test_the_watchdog_and_the_bootstrap_name_the_same_files() -> None:
    """The watchdog runs from REMOTE_BASE on the host and finds its files beside itself."""
    for host_path, watchdog_path in (
        (bootstrap.KEEP_UNTIL, watchdog.KEEP_UNTIL),
        (bootstrap.HEARTBEAT, watchdog.HEARTBEAT),
    ):
        assert host_path == f"{REMOTE_BASE}/{os.path.basename(watchdog_path)}"
    assert os.path.dirname(watchdog.KEEP_UNTIL) == watchdog.BASE


def test_a_deadline_keep_command_set_holds_off_a_stale_heartbeat(
    home: Path, host_files: Path
) -> None:
    beat(host_files, ago=LONG_AGO)
    started = time.time() - LONG_AGO
    assert "no heartbeat" in (watchdog.why_end(started, DEADMAN) or "")
    assert run_sh(keep_command(120), home).returncode == 0
    assert watchdog.kept_until() == pytest.approx(time.time() + 120, abs=2)
    assert watchdog.why_end(started, DEADMAN) is None


@pytest.mark.parametrize(
    ("keep_until", "heartbeat_ago", "ends"),
    [
        pytest.param(+300, LONG_AGO, None, id="deadline-ahead-stale-heartbeat"),
        pytest.param(+300, None, None, id="deadline-ahead-no-heartbeat"),
        pytest.param(-1, 0, "kept warm", id="deadline-passed-fresh-heartbeat"),
        pytest.param(-1, LONG_AGO, "kept warm", id="deadline-passed-stale-heartbeat"),
        pytest.param(None, LONG_AGO, "no heartbeat", id="no-file-stale"),
        pytest.param(None, 0, None, id="no-file-fresh"),
    ],
)
def test_why_end_with_a_deadline(
    host_files: Path, keep_until: float | None, heartbeat_ago: float | None, ends: str | None
) -> None:
    if heartbeat_ago is not None:
        beat(host_files, ago=heartbeat_ago)
    if keep_until is not None:
        (host_files / "keep-until").write_text(f"{time.time() + keep_until:.0f}\n")
    reason = watchdog.why_end(time.time() - LONG_AGO, DEADMAN)
    if ends is None:
        assert reason is None
    else:
        assert reason is not None and ends in reason


@pytest.mark.parametrize(
    "content", ["", "\n", "soon", "1.7e9x", "17000 00000", b"\xff\xfe".decode("latin-1")]
)
@pytest.mark.parametrize(("heartbeat_ago", "ends"), [(LONG_AGO, True), (0, False)])
def test_an_unreadable_deadline_leaves_the_heartbeat_in_charge(
    host_files: Path, content: str, heartbeat_ago: float, ends: bool
) -> None:
    (host_files / "keep-until").write_text(content, encoding="latin-1")
    beat(host_files, ago=heartbeat_ago)
    assert watchdog.kept_until() is None
    reason = watchdog.why_end(time.time() - LONG_AGO, DEADMAN)
    assert (reason is not None and "no heartbeat" in reason) if ends else reason is None


def test_a_deadline_path_that_is_a_directory_counts_as_none(host_files: Path) -> None:
    (host_files / "keep-until").mkdir()
    beat(host_files, ago=LONG_AGO)
    assert watchdog.kept_until() is None
    assert "no heartbeat" in (watchdog.why_end(time.time() - LONG_AGO, DEADMAN) or "")


def test_the_bootstrap_touches_the_heartbeat_before_it_removes_the_deadline() -> None:
    """Removed first, the switch of an adopted instance could find neither a deadline nor a
    fresh heartbeat and end it under the run that just took it over."""
    script = BootstrapPlan("9.1.0", storage_plugins=(), deadman=600, api_url="https://x").script()
    touch = script.index(f"touch {bootstrap.HEARTBEAT}\n")
    remove = script.index(f"rm -f {bootstrap.KEEP_UNTIL}\n")
    start = script.index("setsid nohup", touch)
    assert touch < remove < start
    assert script.count(bootstrap.KEEP_UNTIL) == 1


def test_the_bootstrap_lines_run_in_a_shell_leave_a_fresh_heartbeat_and_no_deadline(
    home: Path, host_files: Path
) -> None:
    (host_files / "keep-until").write_text(f"{time.time() + 300:.0f}\n")
    beat(host_files, ago=LONG_AGO)
    script = BootstrapPlan("9.1.0", storage_plugins=(), deadman=600, api_url="https://x").script()
    lines = [
        line
        for line in script.splitlines()
        if line in (f"touch {bootstrap.HEARTBEAT}", f"rm -f {bootstrap.KEEP_UNTIL}")
    ]
    assert len(lines) == 2
    assert run_sh("\n".join(lines), home).returncode == 0
    assert watchdog.kept_until() is None
    assert watchdog.why_end(time.time() - LONG_AGO, DEADMAN) is None


# -- Keeping: the host's deadline first, then the ledger ------------------------------------


class ShellHost:
    """A host whose commands run in /bin/sh in a local directory (its home)."""

    def __init__(self, home: Path, answer: CommandResult | RemoteError | None = None) -> None:
        self.home = home
        self.answer = answer
        self.commands: list[str] = []
        self.traffic = Traffic(sent=3 * 10**9, received=10**9)
        self.closed = False

    def run(self, command: str, timeout: float = 120, stdin: bytes | None = None) -> CommandResult:
        self.commands.append(command)
        if isinstance(self.answer, RemoteError):
            raise self.answer
        if self.answer is not None:
            return self.answer
        done = run_sh(command, self.home)
        return CommandResult(done.returncode, done.stdout, done.stderr)

    def close(self) -> None:
        self.closed = True


def idle_instance(host: ShellHost, instance_id: int = 7) -> Instance:
    instance = make_instance(offer_id=instance_id, label=make_label(RUN_A, f"job-{instance_id}"))
    priced = dataclasses.replace(offer(instance_id), inet_up_cost=0.02, inet_down_cost=0.01)
    instance.priced(priced, SIG, exclusive=False)
    stub: Any = host
    instance.host = stub
    instance.deadman = 600.0
    instance.files.remember(["sha256:aa"])
    return instance


def test_keeping_sets_the_hosts_deadline_and_records_it(ledger: Ledger, home: Path) -> None:
    host = ShellHost(home)
    instance = idle_instance(host)
    ledger.rent_requested(instance.label, RUN_A, 7, 0.5)
    before = time.time()
    for thread in Keeping(ledger, 300.0, BOOTSTRAP_KEY).start([instance]):
        thread.join(10)
    assert instance.failure is None
    assert instance.kept_until == pytest.approx(before + 300, abs=2)
    on_host = int((home / REMOTE_BASE / "keep-until").read_text())
    assert abs(on_host - instance.kept_until) <= 2
    [record] = ledger.records()
    assert record.kept_until() == instance.kept_until
    assert KeptInstance.from_json(record.kept or {}) == KeptInstance.of(
        instance, instance.kept_until, BOOTSTRAP_KEY
    )
    # 3 GB sent to it at its $0.01/GB in, 1 GB received from it at its $0.02/GB out
    assert record.data_dollars == pytest.approx(0.05)
    assert instance.gone_at is not None and host.closed, "off this run's bill and hands"


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(CommandResult(1, "", "sh: cannot create: No space left\n"), id="exit-1"),
        pytest.param(RemoteError("connection reset by peer"), id="ssh-error"),
    ],
)
def test_keeping_records_nothing_when_the_host_refuses_the_deadline(
    ledger: Ledger, home: Path, answer: CommandResult | RemoteError
) -> None:
    """An instance whose switch has no deadline would end at the next deadman time (or, its
    heartbeat going on elsewhere, never): it must not be offered to the next run."""
    instance = idle_instance(ShellHost(home, answer))
    ledger.rent_requested(instance.label, RUN_A, 7, 0.5)
    for thread in Keeping(ledger, 300.0, BOOTSTRAP_KEY).start([instance]):
        thread.join(10)
    assert instance.kept_until is None
    assert instance.failure is not None and "deadline could not be set" in instance.failure
    word = "No space left" if isinstance(answer, CommandResult) else "connection reset"
    assert word in instance.failure
    [record] = ledger.records()
    assert record.kept is None and record.kept_until() is None


@pytest.mark.parametrize(
    ("change", "keep"),
    [
        pytest.param({}, True, id="idle-and-sound"),
        pytest.param({"state": State.BUSY}, False, id="busy"),
        pytest.param({"host": None}, False, id="not-logged-in"),
        pytest.param({"deadman": 0.0}, False, id="unguarded"),
        pytest.param({"retiring": "its TTL passed"}, False, id="retiring"),
        pytest.param({"vanished": True}, False, id="lost"),
        pytest.param({"instance_id": None}, False, id="no-id"),
        pytest.param({"slots": None}, False, id="not-priced"),
    ],
)
def test_keepable(home: Path, change: dict[str, Any], keep: bool) -> None:
    instance = idle_instance(ShellHost(home))
    for name, value in change.items():
        setattr(instance, name, value)
    assert keepable(instance) is keep


# -- patience: a job waits a little for a busy instance of its kind ---------------------------


def busy(**change: Any) -> Instance:
    instance = make_instance(state=State.BUSY)
    for name, value in change.items():
        setattr(instance, name, value)
    return instance


def seeker(age: float, now: float) -> Seeker:
    return Seeker(REQUEST, "train", (REQUEST.signature(),), since=now - age)


def test_the_requests_are_what_the_instances_serve() -> None:
    """The premise of the patience tests: a BUSY make_instance would hold the job."""
    instance = busy()
    assert REQUEST.signature() == SIG
    assert instance.slots is not None and instance.slots.capacity.holds(REQUEST.needs())


@pytest.mark.parametrize(
    ("instances", "waits"),
    [
        pytest.param(lambda: [busy()], True, id="busy-of-its-kind"),
        pytest.param(lambda: [], False, id="nothing"),
        pytest.param(lambda: [busy(retiring="its TTL passed")], False, id="retiring"),
        pytest.param(lambda: [busy(vanished=True)], False, id="lost"),
        pytest.param(lambda: [busy(info=row(1, actual="offline"))], False, id="host-offline"),
        pytest.param(lambda: [busy(slots=None)], False, id="no-slots"),
        pytest.param(
            lambda: [make_instance(signature=OTHER_GPU, state=State.BUSY)], False, id="other-gpu"
        ),
        pytest.param(lambda: [small_machine()], False, id="too-small-to-hold-it"),
        pytest.param(lambda: [small_machine(), busy()], True, id="one-of-several"),
        *(
            pytest.param(lambda s=s: [make_instance(state=s)], False, id=f"{s.value}")
            for s in State
            if s is not State.BUSY
        ),
    ],
)
def test_patient_only_for_a_busy_instance_that_will_hold_the_job(
    instances: Callable[[], list[Instance]], waits: bool
) -> None:
    now = time.monotonic()
    assert patient(seeker(0.0, now), instances(), now) is waits


def small_machine() -> Instance:
    """Of the job's kind by its signature, but its machine has 2 cores for a 4-core job."""
    instance = busy()
    instance.priced(dataclasses.replace(offer(), cpu_cores=2.0), SIG, exclusive=False)
    return instance


@pytest.mark.parametrize(
    ("age", "waits"),
    [
        (0.0, True),
        (RENT_PATIENCE_SECONDS - 0.01, True),
        (RENT_PATIENCE_SECONDS, False),
        (RENT_PATIENCE_SECONDS + 60, False),
    ],
)
def test_patient_only_for_rent_patience_seconds(age: float, waits: bool) -> None:
    now = time.monotonic()
    assert patient(seeker(age, now), [busy()], now) is waits


@pytest.mark.parametrize(
    ("keep_warm", "idle", "reason"),
    [
        pytest.param(0.0, 0.0, "no job still to run can use it", id="no-keep-warm"),
        pytest.param(300.0, 0.0, None, id="kept-for-the-next-run"),
        pytest.param(300.0, 3599.0, None, id="until-the-ttl"),
        pytest.param(300.0, 3600.0, "it was idle for --vastai-pool-ttl (3600 s)", id="ttl"),
    ],
)
def test_keep_warm_holds_an_unwanted_idle_instance_until_its_ttl(
    keep_warm: float, idle: float, reason: str | None
) -> None:
    demand = Demand()
    demand.reset([])
    now = time.time()
    instance = make_instance(released_at=now - idle)
    got = retire_reason(instance, now, config(ttl=3600.0, keep_warm=keep_warm), demand)
    assert got == reason


# -- the settings check --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "said"),
    [
        pytest.param(
            {"keep_warm": 300, "keep_instances": True},
            ["--vastai-keep-warm=300", "--vastai-keep-instances", "Drop --vastai-keep-instances"],
            id="with-keep-instances",
        ),
        pytest.param(
            {"keep_warm": 300, "deadman": 0},
            ["--vastai-keep-warm=300", "--vastai-deadman", "Give --vastai-deadman a number"],
            id="without-a-switch",
        ),
        pytest.param(
            {"keep_warm": 300, "deadman": None},
            ["--vastai-keep-warm=300", "--vastai-deadman"],
            id="deadman-none",
        ),
        pytest.param({"keep_warm": -1}, ["--vastai-keep-warm=-1", "at least 0"], id="negative"),
        pytest.param({"keep_warm": "soon"}, ["--vastai-keep-warm='soon'"], id="not-a-number"),
    ],
)
def test_keep_warm_settings_refused(options: dict[str, Any], said: list[str]) -> None:
    assert_refused(options, said)


def assert_refused(options: dict[str, Any], said: list[str]) -> None:
    """The options stop the run at start with a message holding each of ``said``."""
    with pytest.raises(SettingsError) as caught:
        validate_settings(ExecutorSettings(**options))
    for text in said:
        assert text in str(caught.value)


@pytest.mark.parametrize(
    "options",
    [
        {"keep_warm": 300},
        {"keep_warm": 300, "deadman": 30},
        {"keep_warm": 0, "keep_instances": True},
        {"keep_warm": 0, "deadman": 0},
    ],
)
def test_keep_warm_settings_accepted(options: dict[str, Any]) -> None:
    validate_settings(ExecutorSettings(**options))


# -- the run's last words ------------------------------------------------------------------


def ended(state: State, instance_id: int, kept_until: float | None = None) -> Instance:
    instance = make_instance(offer_id=instance_id, label=make_label(RUN_A, f"job-{instance_id}"))
    instance.state = state
    instance.kept_until = kept_until
    return instance


def test_teardown_report_does_not_count_kept_instances_as_billing() -> None:
    until = time.time() + 300
    level, message = teardown_report([ended(State.KEPT, 1, until), ended(State.GONE, 2)])
    assert level == logging.INFO
    assert "may still be billing" not in message and "reap" not in message
    assert "1 instance(s) of this run kept warm" in message and "1 destroyed" in message


def test_teardown_report_names_only_what_may_still_bill() -> None:
    until = time.time() + 300
    kept, failed = ended(State.KEPT, 1, until), ended(State.DESTROYING, 2)
    no_deadline = ended(State.KEPT, 3)  # its deadline never reached the host
    level, message = teardown_report([kept, failed, no_deadline])
    assert level == logging.ERROR
    assert "2 instance(s) of this run may still be billing" in message
    assert failed.name in message and no_deadline.name in message
    assert kept.name not in message


@pytest.mark.parametrize("deadman", [600.0, 20.0, 2.0])
def test_most_kept_cost_bills_each_until_its_switch_can_end_it(deadman: float) -> None:
    now = T0
    one, two = ended(State.KEPT, 1, now + 300), ended(State.KEPT, 2, now + 60)
    one.dph_total, two.dph_total = 3.6, 0.72
    one.deadman = two.deadman = deadman
    check = max(1.0, min(10.0, deadman / 4))  # the watchdog's look, as in watchdog.main
    assert switch_check_seconds(deadman) == check
    expected = 3.6 * (300 + check) / 3600 + 0.72 * (60 + check) / 3600
    assert most_kept_cost([one, two], now) == pytest.approx(expected)


def test_kept_note_says_until_when_how_much_and_how_to_end_them() -> None:
    now = time.time()
    one, two = ended(State.KEPT, 11, now + 300), ended(State.KEPT, 12, now + 120)
    one.deadman = two.deadman = 600.0
    note = kept_note([one, two], now)
    assert time.strftime("%H:%M:%S", time.localtime(now + 300)) in note
    assert "instance 11" in note and "instance 12" in note
    assert f"${most_kept_cost([one, two], now):.4f}" in note
    assert "snakemake-vastai reap" in note


def status_row(kept_until: float | None, says: str = "running") -> StatusRow:
    return StatusRow(RUN_A, "finished", 7, says, 0.5, 3, make_label(RUN_A, "job-7"), kept_until)


def test_status_shows_a_kept_instance_with_its_deadline_and_not_as_reapable() -> None:
    until = time.time() + 300
    kept = status_row(until)
    assert not kept.reapable
    assert f"running, kept warm until {time.strftime('%H:%M:%S', time.localtime(until))}" in (
        kept.cells()
    )
    assert status_row(None).reapable, "the same instance, not kept, is a dead run's leftover"
    assert "kept warm" not in " ".join(status_row(until, says="").cells())
    assert not StatusRow(RUN_A, RUNNING, 7, "running", 0.5, 3, "x").reapable


# -- a kept record whose deadline cannot be read ---------------------------------------------


@pytest.mark.parametrize("details", [{"until": 1}, {"deadline": "later"}])
def test_a_kept_record_without_a_readable_deadline_breaks_nothing(
    tmp_path: Path, details: dict[str, Any]
) -> None:
    ledger = Ledger(tmp_path)
    RunLock(tmp_path, RUN_A).release()
    label = rent_and_keep(ledger, details=details)
    records = ledger.records()
    find_orphans([row(7, label)], tmp_path, None, records)
    sort_kept(records, {7: row(7, label)}, Demand(), 600.0, tmp_path, 8, time.time())
    forget_unused_keys(ledger, tmp_path, ending=None)
