"""A job waits for capacity, not for one instance (issue 19, item 0), in real runs.

The case a new user met: a train job, then three evaluations. The first evaluation takes the
warm instance; the other two are placed on a new rent that is still booting. They must not sit
out that boot while the warm instance frees up a second later: each takes the warm share as
soon as it is free, and the new rent, once no job is left on it and none is still to come, is
given up before its boot ends.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from snakemake_executor_plugin_vastai.pool.placement import GIVEN_UP, RENT_PATIENCE_SECONDS
from tests.fakevast.harness import FakeVast
from tests.test_first_hour_bill import SECONDS_OFF, billed, priced_catalogue
from tests.workflows import (
    INSTANCE_TOKEN,
    assert_all_destroyed,
    run_snakemake,
    run_summary,
    write_workflow,
)

BOOT_SECONDS = 25  # long next to the evaluations: a wait for it would show
# Longer than a job waits for a busy warm instance of its kind before it rents
# (RENT_PATIENCE_SECONDS): the evaluations that find it busy do rent, as in the case.
EVALUATION_SECONDS = RENT_PATIENCE_SECONDS + 2

TRAIN_THEN_EVALS = f"""\
TOKEN = {INSTANCE_TOKEN!r}


rule all:
    input: expand("eval/{{i}}.txt", i=range(3))


rule train:
    output: "model.txt"
    resources: gpu=1
    shell: TOKEN + " > {{output}}"


rule evaluate:
    input: "model.txt"
    output: "eval/{{i}}.txt"
    resources: gpu=1
    shell: "sleep {EVALUATION_SECONDS:g}; " + TOKEN + " > {{output}}"
"""


@pytest.mark.slow  # one of the main run's slowest (README: Tests)
def test_evaluations_take_the_warm_instance_instead_of_waiting_for_a_boot(
    fakevast_factory, tmp_path: Path
) -> None:
    # One-GPU offers: each waiting evaluation rents an instance of its own, the second one
    # a create interval (4.5 s) after the first, under the rate limits.
    catalogue = priced_catalogue(tmp_path / "offers.json")
    fake: FakeVast = fakevast_factory(boot_seconds=BOOT_SECONDS, rate_limits=True, offers=catalogue)
    workdir = write_workflow(tmp_path / "wf", TRAIN_THEN_EVALS)

    run = run_snakemake(workdir, fake, "--vastai-pool-ttl", "300", jobs=4, timeout=240)

    assert run.ok, run.output
    outputs = ["model.txt", *(f"eval/{i}.txt" for i in range(3))]
    tokens = {(workdir / path).read_text().split()[-1] for path in outputs}
    assert len(tokens) == 1, f"the evaluations ran elsewhere than the warm instance: {tokens}"
    warm, *extra = assert_all_destroyed(fake, workdir)
    assert extra, "no evaluation ever waited for a new rent: the case was not reproduced"
    assert f"to instance {warm['id']}, which is ready, from instance" in run.output
    for instance in extra:
        assert instance["running_at"] is None, f"a rent nobody needed booted: {instance}"
        assert f"Destroying instance {instance['id']} " in run.output
        assert GIVEN_UP in run.output, run.output
    summary = {row["instance_id"]: row for row in run_summary(workdir)["instances"]}
    assert {i: row["jobs_run"] for i, row in summary.items()} == {
        warm["id"]: 4,
        **{i["id"]: 0 for i in extra},
    }
    for instance in extra:  # as the marketplace bills it, though it may never have been listed
        off = (summary[instance["id"]]["dollars"] - billed(instance)) * 3600
        assert abs(off / instance["dph_total"]) < SECONDS_OFF, (instance, summary)
