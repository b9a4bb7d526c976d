"""ledger.py: events fold into records, a crash mid-write costs only the torn event, and run
locks tell live runs from dead ones the way the kernel sees them (flock, even after kill -9)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path

import pytest
from freezegun import freeze_time

from snakemake_executor_plugin_vastai.pool.ledger import (
    LABEL_PREFIX,
    Ledger,
    RunLock,
    make_label,
    new_run_id,
    run_id_of,
    run_is_alive,
)

T0 = 1_700_000_000.0


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    return Ledger(tmp_path / "vastai")


def write_life(ledger: Ledger, label: str, run: str, *, destroyed: bool) -> None:
    """rent at T0 ($3.60/h), rented, running at +10 s, two jobs, price $7.20/h, destroyed at
    +100 s (if ``destroyed``); each event at the frozen time it happened."""
    steps = [
        (0, lambda: ledger.rent_requested(label, run, 9210022, 3.6)),
        (2, lambda: ledger.rented(label, 22000001)),
        (10, lambda: ledger.running(label)),
        (20, lambda: ledger.job_ran(label, "rule a, wildcards: x=1")),
        (30, lambda: ledger.job_ran(label, "rule b")),
        (40, lambda: ledger.price_changed(label, 7.2)),
    ]
    if destroyed:
        steps.append((100, lambda: ledger.destroyed(label)))
    for offset, step in steps:
        with freeze_time(datetime.fromtimestamp(T0 + offset, tz=UTC)):
            step()


def test_events_fold_into_a_record(ledger: Ledger) -> None:
    write_life(ledger, "snakemake-vastai:r1:a", "r1", destroyed=True)
    [record] = ledger.records()
    assert record.label == "snakemake-vastai:r1:a"
    assert record.run_id == "r1"
    assert record.offer_id == 9210022
    assert record.instance_id == 22000001
    assert record.requested_at == T0
    assert record.running_at == T0 + 10
    assert record.jobs == ["rule a, wildcards: x=1", "rule b"]
    assert record.dph_total == 7.2
    assert record.ended_at == T0 + 100
    assert not record.open


def test_events_of_unknown_labels_are_ignored(ledger: Ledger) -> None:
    ledger.rented("never-requested", 1)
    ledger.destroyed("never-requested")
    assert ledger.records() == []


def test_open_records_and_cost(ledger: Ledger) -> None:
    write_life(ledger, "snakemake-vastai:r1:closed", "r1", destroyed=True)
    write_life(ledger, "snakemake-vastai:r1:open", "r1", destroyed=False)
    [still_open] = ledger.open_records()
    assert still_open.label == "snakemake-vastai:r1:open"
    closed = next(r for r in ledger.records() if not r.open)
    # Billed as Vast.ai bills: from the create's answer (+2 s) to the destroy (or now), at
    # the last known price.
    assert closed.cost(now=T0 + 5000) == pytest.approx(98 * 7.2 / 3600)
    assert still_open.cost(now=T0 + 200) == pytest.approx(198 * 7.2 / 3600)


def test_the_bill_ends_when_the_destroy_was_sent_not_when_it_was_confirmed(
    ledger: Ledger,
) -> None:
    ledger.rent_requested("snakemake-vastai:r1:a", "r1", 1, 3.6)
    ledger.rented("snakemake-vastai:r1:a", 11)
    [created] = ledger.records()
    assert created.created_at is not None
    ledger.destroyed("snakemake-vastai:r1:a", ended_at=created.created_at + 100)  # confirmed now
    [record] = ledger.records()
    assert record.ended_at == created.created_at + 100
    assert record.cost(now=created.created_at + 5000) == pytest.approx(0.1)


def test_a_torn_last_line_costs_only_that_event(ledger: Ledger) -> None:
    """A crash mid-write leaves half a line without newline: it is skipped, everything before
    it is read, and so is everything the next run appends after it."""
    ledger.rent_requested("snakemake-vastai:r1:a", "r1", 1, 0.5)
    ledger.rented("snakemake-vastai:r1:a", 11)
    with open(ledger.path, "a", encoding="utf-8") as handle:
        handle.write('{"event":"destroyed","label":"snakemake-vastai:r1:a","t":17')
    [record] = ledger.records()
    assert record.instance_id == 11 and record.open

    later = Ledger(ledger.directory)  # the next run, same workdir
    later.rent_requested("snakemake-vastai:r2:b", "r2", 2, 0.25)
    later.destroyed("snakemake-vastai:r1:a")
    records = {r.label: r for r in later.records()}
    assert set(records) == {"snakemake-vastai:r1:a", "snakemake-vastai:r2:b"}
    assert not records["snakemake-vastai:r1:a"].open


def test_new_ledger_directory_is_empty(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "nested" / "vastai")
    assert ledger.directory.is_dir()
    assert ledger.records() == [] and ledger.open_records() == []


# -- run locks ------------------------------------------------------------------------------------


def test_run_holding_its_lock_in_this_process_is_alive(tmp_path: Path) -> None:
    lock = RunLock(tmp_path, "r1")
    try:
        assert run_is_alive(tmp_path, "r1")
        assert run_is_alive(tmp_path, "r1"), "asking must not take the lock away"
    finally:
        lock.release()
    assert not run_is_alive(tmp_path, "r1")


def test_run_killed_by_sigkill_is_dead(tmp_path: Path) -> None:
    holder = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from snakemake_executor_plugin_vastai.pool.ledger import RunLock
        lock = RunLock(Path({str(tmp_path)!r}), "r-child")
        print("locked", flush=True)
        time.sleep(120)
        """
    )
    child = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "locked"
        assert run_is_alive(tmp_path, "r-child")
        with pytest.raises(BlockingIOError):
            RunLock(tmp_path, "r-child")  # a second holder for a live run is refused
    finally:
        child.kill()  # SIGKILL: no cleanup code runs in the child
        child.wait()
        if child.stdout is not None:
            child.stdout.close()
    assert child.returncode == -9
    assert not run_is_alive(tmp_path, "r-child")


def test_run_unknown_to_this_workdir_counts_as_alive(tmp_path: Path) -> None:
    """It may be another user's or machine's run: its instances are not ours to touch."""
    assert run_is_alive(tmp_path, "never-seen-here")


# -- labels ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("tag", ["job-7", "pool:sig:3", "x" * 400])
def test_label_round_trip(tag: str) -> None:
    run_id = new_run_id()
    label = make_label(run_id, tag)
    assert label.startswith(f"{LABEL_PREFIX}:{run_id}:")
    assert len(label) <= 256  # the API's limit
    assert run_id_of(label) == run_id


@pytest.mark.parametrize(
    "label", ["", "my-notebook", LABEL_PREFIX, f"{LABEL_PREFIX}:only-run", "other:run:tag"]
)
def test_foreign_labels_have_no_run(label: str) -> None:
    assert run_id_of(label) is None


def test_run_ids_are_unique() -> None:
    assert len({new_run_id() for _ in range(200)}) == 200
