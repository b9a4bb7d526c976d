"""What the pool does with an instance when something fails around it: a real Pool, the real
SDK and the fake marketplace, in-process, because a disk that fails at exactly one ledger
write, or a list round at exactly one moment of a teardown, cannot be arranged from outside a
snakemake run. What must hold: an instance that exists is destroyed or kept, never dropped;
it is gone when the marketplace says so; a teardown never waits past its budget."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest

from snakemake_executor_plugin_vastai.edge.run import teardown_report
from snakemake_executor_plugin_vastai.market.marketplace import Marketplace, MarketplaceError
from snakemake_executor_plugin_vastai.pool.instance import Instance
from snakemake_executor_plugin_vastai.pool.ledger import Ledger, make_label
from snakemake_executor_plugin_vastai.pool.states import State
from snakemake_executor_plugin_vastai.pool.table import InstanceTable
from tests.fakevast.harness import FakeVast
from tests.test_pool_decisions import REQUEST_4090, SIG, Rig, make_instance, make_rig

DESTROY = "DELETE /api/v0/instances/{id}/"


class DiskFullAt(Ledger):
    """A ledger whose disk fills up at one kind of write (``event``)."""

    def __init__(self, directory: Path, event: str) -> None:
        super().__init__(directory)
        self.failing = event

    def rented(self, label: str, instance_id: int) -> None:
        self._maybe_fail("rented")
        super().rented(label, instance_id)

    def job_ran(self, label: str, job: str) -> None:
        self._maybe_fail("job_ran")
        super().job_ran(label, job)

    def _maybe_fail(self, event: str) -> None:
        if event == self.failing:
            raise OSError(28, "No space left on device")


@pytest.mark.parametrize("event", ["rented", "job_ran"])
def test_a_ledger_write_failing_after_the_create_destroys_the_instance(
    fakevast: FakeVast, tmp_path: Path, event: str
) -> None:
    """The create succeeded, then the disk filled up: before the job is placed ("rented")
    or between the rent and the boot ("job_ran"). The job fails with the disk's error, and
    the instance it rented is destroyed, not dropped from the pool's table."""
    rig = make_rig(fakevast, tmp_path / "state")
    rig.pool.ledger = rig.pool.renter.ledger = DiskFullAt(tmp_path / "state", event)

    with pytest.raises(OSError, match="No space left on device"):
        rig.pool.acquire(REQUEST_4090, "train-1-a1")

    [instance] = rig.pool.instances()
    assert instance.state is State.GONE, instance.state
    assert fakevast.alive_instances() == []
    assert len(fakevast.ledger()["instances"]) == 1


class ReaperBetweenSnapshotAndMove(InstanceTable):
    """Plays the reaper's list round at the worst moment of a teardown's settling of lost
    creates: just after the teardown took its list of unknown creates, the reaper finds one
    of them (moving it to destroying, as ``settle_unknown`` does, its destroy still to come)."""

    def __init__(self) -> None:
        super().__init__()
        self.found: Instance | None = None
        self.snapshots = 0

    def in_states(self, states: frozenset[State]) -> list[Instance]:
        found = super().in_states(states)
        if states == frozenset({State.UNKNOWN}) and self.found is not None:
            self.snapshots += 1
            if self.snapshots == 2:  # close_unknown's own list, after its settle round
                with self.locked():
                    self.move(self.found, State.DESTROYING)
        return found


def test_teardown_never_marks_gone_what_the_reaper_found_alive(
    fakevast: FakeVast, tmp_path: Path
) -> None:
    rig = make_rig(fakevast, tmp_path / "state")
    table = ReaperBetweenSnapshotAndMove()
    rig.pool.table = rig.pool.destroyer.table = table
    label = make_label(rig.pool.config.run_id, "lost-1")
    lost = make_instance(SIG, label=label, state=State.RENTING)
    table.add(lost)
    table.move(lost, State.UNKNOWN)
    # The create did happen; the teardown's list round just did not show it yet.
    lost.instance_id = rig.market.rent(
        9210022, image=SIG.image, disk_gb=40, label=label, onstart=""
    )
    table.found = lost

    rig.pool.destroyer.close_unknown([])
    rig.pool.destroyer.finish(lost, "its create's answer was lost, but it was created")

    assert lost.state is State.GONE
    assert fakevast.alive_instances() == [], "counted as gone while it was alive"


@pytest.mark.slow
def test_a_teardown_ends_within_its_budget_and_names_what_may_bill(
    fakevast: FakeVast, tmp_path: Path
) -> None:
    """Destroys that hang (the marketplace answers after 20 s): the teardown returns when
    its budget is spent, with the instance still destroying, and the run's last line names
    it and the command that ends it; the destroy already sent still lands."""
    rig: Rig = make_rig(fakevast, tmp_path / "state")
    instance = rig.rent(SIG, "hung")
    fakevast.set_faults({"http": [{"latency": 20, "count": None, "endpoint": DESTROY}]})

    rig.pool.shutdown(budget=2)

    assert instance.state is State.DESTROYING
    assert not rig.destroyed(instance), "the teardown waited for the hung destroy"
    level, line = teardown_report(rig.pool.instances())
    assert level == logging.ERROR
    assert line == (
        f"1 instance(s) of this run may still be billing ({instance.name}). Run "
        "'snakemake-vastai reap' to destroy them."
    )
    fakevast.wait_for(lambda: rig.destroyed(instance), timeout=60, interval=0.5)
    fakevast.clear_faults()


def test_the_teardown_report_counts_a_create_still_in_flight() -> None:
    in_flight = make_instance(SIG, label="snakemake-vastai:r:in-flight", state=State.RENTING)
    in_flight.creating = True
    never_sent = make_instance(SIG, label="snakemake-vastai:r:searching", state=State.RENTING)

    level, line = teardown_report([in_flight, never_sent])

    assert level == logging.ERROR
    assert line.startswith("1 instance(s) of this run may still be billing (instance ?")
    assert teardown_report([never_sent]) == (logging.INFO, "")


def test_a_destroy_gives_up_retrying_at_its_budget(fakevast: FakeVast) -> None:
    """Every destroy answered 429: the retries stop at the budget, with an error naming the
    call and the refusal (the destroyer then keeps the instance as destroying, to retry)."""
    market = Marketplace(fakevast.api_key, fakevast.url)
    label = "snakemake-vastai:run1:limited"
    instance_id = market.rent(9210022, image=SIG.image, disk_gb=40, label=label, onstart="")
    fakevast.set_faults({"http": [{"status": 429, "count": None, "endpoint": DESTROY}]})
    done = threading.Event()
    errors: list[BaseException] = []

    def destroy() -> None:
        try:
            market.destroy(instance_id, budget=3)
        except Exception as error:
            errors.append(error)
        done.set()

    threading.Thread(target=destroy, daemon=True).start()
    assert done.wait(timeout=120), "the destroy kept retrying past its budget"
    fakevast.clear_faults()
    market.destroy(instance_id)
    [error] = errors
    assert isinstance(error, MarketplaceError), error
    assert f"destroy instance {instance_id} (HTTP 429)" in str(error), error


def test_a_teardown_destroys_many_instances_in_one_batch(
    fakevast: FakeVast, tmp_path: Path
) -> None:
    """Vast.ai allows one destroy every 3 s: three instances go in one batch destroy and are
    confirmed by the instance list, not by a destroy and a show each."""
    rig = make_rig(fakevast, tmp_path / "state")
    instances = [rig.rent(SIG, f"idle-{n}") for n in range(3)]

    rig.pool.shutdown()

    assert all(i.state is State.GONE for i in instances)
    calls = fakevast.ledger()["api_calls"]
    assert calls.get("DELETE /api/v0/instances/") == 1, calls
    assert DESTROY not in calls and "GET /api/v0/instances/{id}/" not in calls, calls
    assert fakevast.alive_instances() == []
