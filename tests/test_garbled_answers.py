"""One garbled answer to each API call a run makes: the request took effect, and its answer
arrived cut short (the status stands, the JSON ends halfway), as a dropped proxy connection
or an overloaded server sends it. Each run completes with the right outputs, or fails with a
clear message, and the fake has nothing left alive either way.

Real runs against the fake (`"garbled": true` http rules, tests/fakevast/README.md).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fakevast.harness import FakeVast
from tests.test_pool_faults import CREATE, RUN_TIMEOUT, SEARCH, assert_outputs, fan_out
from tests.workflows import assert_all_destroyed, run_snakemake, write_workflow

# The calls of a run, in the order it makes them (the credential check comes first).
CALLS = {
    "check": "GET /api/v0/users/current/",
    "search": SEARCH,
    "create": CREATE,  # the instance exists, its id is lost with the answer
    "list": "GET /api/v1/instances/",
    "destroy": "DELETE /api/v0/instances/{id}/",  # the instance is gone; the answer is lost
}


def garbled_calls(fake: FakeVast, endpoint: str) -> list[dict[str, object]]:
    return [call for call in fake.requests() if call["endpoint"] == endpoint and call["garbled"]]


# The main run keeps the calls whose garbled answer leaves something to settle (an instance
# created or destroyed); the rest run with the slowest tests (README: Tests).
MAIN_RUN_CALLS = {"create", "destroy", "search"}


@pytest.mark.parametrize(
    "endpoint",
    [
        pytest.param(endpoint, marks=() if name in MAIN_RUN_CALLS else pytest.mark.slow)
        for name, endpoint in CALLS.items()
    ],
    ids=CALLS.keys(),
)
def test_one_garbled_answer_costs_a_retry_not_the_run(
    fakevast: FakeVast, tmp_path: Path, endpoint: str
) -> None:
    workdir = write_workflow(tmp_path / "wf", fan_out(2))
    fakevast.set_faults({"http": [{"garbled": True, "count": 1, "endpoint": endpoint}]})

    run = run_snakemake(workdir, fakevast, jobs=1, timeout=RUN_TIMEOUT)

    assert run.ok, run.output
    assert_outputs(workdir, 2)
    assert len(garbled_calls(fakevast, endpoint)) == 1, "the fault never fired"
    assert "Traceback" not in run.output
    assert_all_destroyed(fakevast, workdir)


@pytest.mark.slow  # its retries take about 30 s
def test_a_search_garbled_every_time_fails_the_run_saying_so(
    fakevast: FakeVast, tmp_path: Path
) -> None:
    """Not a passing fault: the retries run out and the job fails with the reason a person
    can act on (the answer cannot be read), nothing rented."""
    workdir = write_workflow(tmp_path / "wf", fan_out(1))
    fakevast.set_faults({"http": [{"garbled": True, "count": None, "endpoint": SEARCH}]})

    run = run_snakemake(workdir, fakevast, jobs=1, timeout=RUN_TIMEOUT)

    assert not run.ok
    assert "sent an answer that cannot be read" in run.output, run.output
    assert len(garbled_calls(fakevast, SEARCH)) > 1  # retried before giving up
    assert fakevast.ledger()["instances"] == []
