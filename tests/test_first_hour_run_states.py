"""``snakemake-vastai status`` says how each run of a workdir ended, not "dead" for all of them
(issue 20, item 8): running while it holds its lock, then what its cost summary records
(finished, failed or killed), and killed when it wrote no summary (it never reached its
teardown: kill -9, a crash, a lost machine). Run as the user runs it, against the fake."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from snakemake_executor_plugin_vastai.edge.summary import FAILED, FINISHED, KILLED, RunCost
from snakemake_executor_plugin_vastai.pool.ledger import Ledger, RunLock, make_label
from tests.fakevast.harness import FakeVast
from tests.instances import is_running, market_for, rent, wait_for
from tests.test_cli import helper, plugin_env, table_rows

# run id -> what its summary records (absent: it wrote none); a run's state in `status`
RECORDED = {
    "run-finished": FINISHED,
    "run-failed": FAILED,
    "run-stopped": KILLED,  # Ctrl-C, SIGTERM or SIGHUP: its teardown ran and said so
    "run-older": None,  # a summary from before outcomes were recorded
}
CRASHED = "run-crashed"  # no summary: kill -9 before its teardown; its instance still bills
RUNNING = "run-running"
SHOWN = {
    "run-finished": "finished",
    "run-failed": "failed",
    "run-stopped": "killed",
    "run-older": "ended",
    CRASHED: "killed",
    RUNNING: "running",
}


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    return path


def record_destroyed_rent(ledger: Ledger, run_id: str, instance_id: int) -> str:
    """A rent of ``run_id``, destroyed long ago: the ledger's view of a past instance."""
    label = make_label(run_id, "job")
    ledger.rent_requested(label, run_id, 0, 0.25)
    ledger.rented(label, instance_id)
    ledger.destroyed(label)
    return label


@pytest.fixture
def workdir(fakevast: FakeVast, tmp_path: Path) -> Iterator[Path]:
    """A workdir with a run of each kind; the crashed one left an instance on the fake."""
    workdir = tmp_path / "wf"
    state_dir = workdir / ".snakemake" / "vastai"
    ledger = Ledger(state_dir)
    for number, (run_id, outcome) in enumerate(RECORDED.items()):
        RunLock(state_dir, run_id).release()
        record_destroyed_rent(ledger, run_id, 21000000 + number)
        RunCost(run_id, [], outcome=outcome).write(state_dir)
    RunLock(state_dir, CRASHED).release()
    label = make_label(CRASHED, "job")
    ledger.rent_requested(label, CRASHED, 0, 0.25)
    market = market_for(fakevast)
    instance_id = rent(market, label)
    ledger.rented(label, instance_id)
    wait_for(market, instance_id, is_running)
    running = RunLock(state_dir, RUNNING)  # held by this process: the run is still going
    record_destroyed_rent(ledger, RUNNING, 21000099)
    try:
        yield workdir
    finally:
        running.release()
        market.destroy(instance_id)  # already gone (the test reaps it) is fine


def test_status_says_how_each_run_ended(fakevast: FakeVast, workdir: Path, home: Path) -> None:
    status = helper(home, "--workdir", str(workdir), "status", env=plugin_env(fakevast))

    assert (status.code, status.err) == (0, ""), status
    assert {row[0]: row[1] for row in table_rows(status.out).values()} == SHOWN
    assert status.out.splitlines()[-1] == (
        "1 instance of a dead run is still on Vast.ai and billing: run "
        f"'snakemake-vastai --workdir {workdir} reap' to destroy it."
    )

    reaped = helper(home, "--workdir", str(workdir), "reap", env=plugin_env(fakevast))
    assert (reaped.code, reaped.err) == (0, "")
    assert fakevast.alive_instances() == []


def test_the_status_command_names_the_states_in_its_help(home: Path) -> None:
    shown = helper(home, "status", "--help")
    assert (shown.code, shown.err) == (0, "")
    assert (
        "This workdir's runs (running, finished, failed or killed) and what Vast.ai says of "
        "their instances."
    ) in " ".join(shown.out.split())
