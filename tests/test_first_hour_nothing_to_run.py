"""``snakemake-vastai offers`` on a workflow that has just run: not "0 jobs to run", but why
there is nothing to price, and the ``--all`` that prices it anyway (issue 20, item 8)."""

from __future__ import annotations

from pathlib import Path

from tests.fakevast.harness import FakeVast
from tests.test_preview import offers
from tests.workflows import assert_nothing_rented, one_rule_workflow, run_local

NOTHING_TO_RUN = (
    "No job to run on Vast.ai: the workflow's outputs are up to date (or only local rules are "
    "left), so a run would rent nothing now. Add --all to price every job of the workflow, as "
    "if none had run yet.\n"
)


def test_offers_after_a_run_points_to_all(fakevast: FakeVast, tmp_path: Path) -> None:
    workdir = one_rule_workflow(tmp_path / "wf", "echo done > out.txt")
    run_local(workdir)  # every output is there and up to date

    done = offers(fakevast, workdir)
    assert (done.returncode, done.stdout, done.stderr) == (0, NOTHING_TO_RUN, "")

    every = offers(fakevast, workdir, "--all")
    assert every.returncode == 0, every.stderr
    assert every.stdout.startswith("1 job in the workflow in 1 remote rule; offers at ")
    assert "rule make: 1 job" in every.stdout
    assert_nothing_rented(fakevast)
