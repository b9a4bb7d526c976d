"""Real runs record how they ended, and ``snakemake-vastai status`` says it (issue 20, item 8):
a run that succeeded is finished, one whose job failed is failed, and one stopped with Ctrl-C
is killed. Each run rents from the fake and ends with nothing left running."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.fakevast.harness import FakeVast
from tests.test_cli import helper, plugin_env, table_rows
from tests.workflows import (
    ANNOUNCE_START,
    assert_all_destroyed,
    one_rule_workflow,
    run_snakemake,
    running_snakemake,
    wait_until_running,
)


def states(fake: FakeVast, workdir: Path, home: Path) -> list[str]:
    """The state `status` gives each instance row of the workdir's runs."""
    status = helper(home, "--workdir", str(workdir), "status", env=plugin_env(fake))
    assert (status.code, status.err) == (0, ""), status
    return [row[1] for row in table_rows(status.out).values()]


@pytest.mark.slow  # one of the main run's slowest (README: Tests)
def test_status_tells_finished_failed_and_killed_runs_apart(
    fakevast: FakeVast, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    finished = one_rule_workflow(tmp_path / "finished", "echo done > out.txt")
    assert run_snakemake(finished, fakevast).ok
    failed = one_rule_workflow(tmp_path / "failed", "exit 3")
    assert not run_snakemake(failed, fakevast).ok
    killed = one_rule_workflow(tmp_path / "killed", f"{ANNOUNCE_START}; sleep 300")
    with running_snakemake(killed, fakevast) as process:
        wait_until_running(fakevast, killed, process)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=120) != 0

    for workdir, state in ((finished, "finished"), (failed, "failed"), (killed, "killed")):
        assert_all_destroyed(fakevast, workdir)
        assert states(fakevast, workdir, home) == [state], workdir
