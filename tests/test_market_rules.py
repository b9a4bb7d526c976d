"""Real runs against the fake with Vast.ai's rate limits on (``vast-api.md`` section 10): the
plugin paces every endpoint, so a run, and two runs of the same key at once, receive no 429
at all; the daily search quota stops new rents with the reset time named, while what already
runs finishes. Every test ends with the fake showing nothing alive (the fixtures check it)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fakevast.harness import FakeVast
from tests.test_pool_faults import FLAT_OFFERS, assert_outputs, fan_out
from tests.test_preview import offers
from tests.workflows import (
    assert_all_destroyed,
    assert_nothing_rented,
    fatal_error,
    job_errors,
    run_snakemake,
    running_snakemake,
    write_workflow,
)

RUN_TIMEOUT = 400


def refused(fake: FakeVast) -> dict[str, int]:
    ledger = fake.ledger()
    return {**ledger["rate_limited"], **ledger["quota_exceeded"]}


@pytest.mark.slow
def test_two_workflows_of_one_key_at_once_receive_no_429(
    fakevast_factory: Callable[..., FakeVast], tmp_path: Path
) -> None:
    """Neither run knows of the other; the book they share in the user's cache keeps their
    calls together within every limit: creates, lists, shows and destroys alike."""
    fake = fakevast_factory(boot_seconds=2, offers=FLAT_OFFERS, rate_limits=True)
    first = write_workflow(tmp_path / "first", fan_out(3, sleep=2))
    second = write_workflow(tmp_path / "second", fan_out(3, sleep=2))

    with running_snakemake(first, fake, "--vastai-no-pack", jobs=3) as process:
        run = run_snakemake(second, fake, "--vastai-no-pack", jobs=3, timeout=RUN_TIMEOUT)
        first_code = process.wait(timeout=RUN_TIMEOUT)

    assert run.ok, run.output
    assert first_code == 0, (first / "snakemake.out").read_text()
    assert_outputs(first, 3)
    assert_outputs(second, 3)
    assert refused(fake) == {}, refused(fake)
    assert_all_destroyed(fake, first)
    assert_all_destroyed(fake, second)


QUOTA_WORKFLOW = """\
localrules: all


rule all:
    input: "first.txt", "later.txt"


rule first:
    output: "first.txt"
    resources: gpu=1
    shell: "sleep 8; echo first > {output}"


rule later:
    input: "first.txt"
    output: "later.txt"
    resources: gpu=1, vastai_query="cpu_cores_effective>=2"
    shell: "echo later > {output}"
"""


@pytest.mark.slow  # one of the main run's slowest (README: Tests)
def test_the_daily_search_quota_stops_new_rents_and_names_the_reset(
    fakevast_factory: Callable[..., FakeVast], tmp_path: Path
) -> None:
    """One search a day: the check before renting spends it on the job submitted first and
    is refused for the other kind (it goes on: what it found stays valid). The first job
    runs on that search and finishes; the later job's rent needs a search, which the run
    knows is refused until the reset: it fails at once, naming the quota and when it
    resets, without asking Vast.ai again."""
    fake = fakevast_factory(boot_seconds=0, offers=FLAT_OFFERS, rate_limits=True, search_quota=1)
    workdir = write_workflow(tmp_path / "wf", QUOTA_WORKFLOW)

    run = run_snakemake(workdir, fake, jobs=1, timeout=RUN_TIMEOUT)

    assert not run.ok
    assert (workdir / "first.txt").read_text() == "first\n"
    [error] = job_errors(run.output)
    assert "daily offer-search quota for this API key is used up (it resets at " in error, error
    assert "UTC)" in error, error
    assert fake.ledger()["quota_exceeded"] == {"POST /api/v0/bundles/": 1}, fake.ledger()
    assert fake.ledger()["rate_limited"] == {}
    assert_all_destroyed(fake, workdir)


MODELS = ("RTX_4090", "RTX_3090", "RTX_3060", "L40S", "A100_SXM4", "H100_SXM", "B200", "MI300X")
UNLISTED = ("B200", "MI300X")  # no offer of the fake's catalogue has them


def eight_models() -> str:
    """Eight rules, each on its own GPU model; the catalogue lists six of them."""
    names = [model.lower() for model in MODELS]
    rules = [f"rule all:\n    input: {', '.join(repr(f'{n}.txt') for n in names)}\n"]
    for model, name in zip(MODELS, names, strict=True):
        rules.append(
            f"rule {name}:\n    output: '{name}.txt'\n"
            f"    resources: gpu=1, gpu_model='{model}'\n    shell: 'echo ok > {{output}}'\n"
        )
    return "\n".join(rules)


@pytest.mark.slow  # one of the main run's slowest (README: Tests)
def test_eight_gpu_models_two_unlisted_stop_the_run_in_at_most_four_searches(
    fakevast_factory: Callable[..., FakeVast], tmp_path: Path
) -> None:
    """The rules differ only in their GPU model, so the check before renting asks for all
    of them in one search (`gpu_name in [...]`); the two diagnoses share the search that
    lists the models and the one without a model. Then `offers` shows every rule, from the
    answers the run left on the shelf."""
    fake = fakevast_factory(boot_seconds=0, rate_limits=True)
    workdir = write_workflow(tmp_path / "wf", eight_models())
    options = ("--vastai-no-datacenter", "--vastai-reliability", "0.9")

    run = run_snakemake(workdir, fake, *options, jobs=8, timeout=RUN_TIMEOUT)

    assert not run.ok
    message = fatal_error(run.output)
    for model in UNLISTED:
        assert f"No offer lists a GPU named {model}" in message, message
    assert message.endswith("Nothing was rented."), message
    assert "Traceback" not in run.output and "429" not in run.output, run.output
    assert "too frequent" not in run.output, run.output
    assert_nothing_rented(fake)
    searched = fake.ledger()["api_calls"]["POST /api/v0/bundles/"]
    assert searched <= 4, fake.ledger()["api_calls"]

    shown = offers(fake, workdir, "--no-datacenter", "--reliability", "0.9")

    assert shown.returncode == 1, shown.stderr  # the two unlisted models rent nothing
    for model in MODELS:
        assert f"rule {model.lower()}: 1 job" in shown.stdout, shown.stdout
    # the offers come from the run's shelved search; only the two diagnoses search again
    assert fake.ledger()["api_calls"]["POST /api/v0/bundles/"] - searched <= 2
    assert refused(fake) == {}, refused(fake)
    assert_nothing_rented(fake)


SIXTEEN_GPU_JOBS = """\
localrules: all


rule all:
    input: expand("out/{i}.txt", i=range(16))


rule work:
    output: "out/{i}.txt"
    resources: gpu=1
    shell: "sleep 5; echo job {wildcards.i} > {output}"
"""


def sixteen_offers(path: Path) -> Path:
    """16 one-GPU offers alike (the flat catalogue's first, under 16 ids and machines)."""
    [base, *_] = json.loads(FLAT_OFFERS.read_text())
    rows = [base | {"id": 9400000 + n, "machine_id": 70000 + n} for n in range(16)]
    path.write_text(json.dumps(rows))
    return path


@pytest.mark.slow
def test_sixteen_gpu_jobs_at_once_rent_within_the_create_limit_and_go_in_one_batch(
    fakevast_factory: Callable[..., FakeVast], tmp_path: Path
) -> None:
    """16 one-GPU jobs at --jobs 16 on 16 one-GPU offers. Vast.ai allows a create every
    4.5 s; its batch create's own limit is not documented, so the fake charges it per
    offer, and spacing the creates is all a client can do. No call is refused, and jobs that
    wait meanwhile take an instance whose job has finished. Instances no job still needs are
    destroyed as the run goes (a destroy every 3 s), and what is left at the end in one batch
    call."""
    fake = fakevast_factory(
        boot_seconds=2, offers=sixteen_offers(tmp_path / "offers.json"), rate_limits=True
    )
    workdir = write_workflow(tmp_path / "wf", SIXTEEN_GPU_JOBS)

    run = run_snakemake(workdir, fake, jobs=16, timeout=RUN_TIMEOUT)

    assert run.ok, run.output
    assert_outputs(workdir, 16)
    assert refused(fake) == {}, refused(fake)
    instances = assert_all_destroyed(fake, workdir)
    assert len(instances) > 1, instances
    calls = fake.ledger()["api_calls"]
    assert calls.get("DELETE /api/v0/instances/", 0) <= 1, calls  # the end's batch
