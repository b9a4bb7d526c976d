"""Whole workflows through real ``snakemake --executor vastai`` and the fake marketplace: the
results must be exactly what a local run makes, and the run must clean up after itself."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
import snakemake

from tests.fakevast.harness import FakeVast
from tests.workflows import (
    EXAMPLES,
    JOB_LOGS,
    assert_all_destroyed,
    git_workflow,
    one_rule_workflow,
    result_files,
    run_local,
    run_snakemake,
)

# What examples/demo runs remotely: one job per rule, except the group "model" (train +
# evaluate of one sample), which is one job per sample. Rule all runs locally.
DEMO_JOBS = 6
DEMO_RULES = Counter(preprocess=2, train=2, evaluate=2, plots=1, summary=1)
BENCHMARK_HEADER = "s\th:m:s\tmax_rss"


@pytest.mark.slow  # one of the main run's slowest (README: Tests)
def test_demo_matches_a_local_run(fakevast: FakeVast, tmp_path: Path) -> None:
    """Scripts, wildcards, a group, logs, benchmarks, a directory output and names with spaces
    all come home byte-identical to a local run, with a log per job; the run's SSH key goes
    with the run."""
    remote = git_workflow(EXAMPLES / "demo", tmp_path / "remote")
    local = git_workflow(EXAMPLES / "demo", tmp_path / "local")
    run_local(local, cores=2)

    run = run_snakemake(remote, fakevast, jobs=2)

    assert run.ok, run.output
    assert "9 of 9 steps (100%) done" in run.output
    expected = result_files(local, "results", "logs")
    assert expected, "the local reference run made nothing"
    assert result_files(remote, "results", "logs") == expected
    benchmarks = result_files(remote, "benchmarks")
    assert benchmarks.keys() == result_files(local, "benchmarks").keys()
    for path, content in benchmarks.items():
        assert content.decode().startswith(BENCHMARK_HEADER), path

    assert_all_destroyed(fakevast, remote)

    # Each job's own output (the remote Snakemake's log) was streamed home, one file per job.
    job_logs = sorted((remote / JOB_LOGS).iterdir())
    assert len(job_logs) == DEMO_JOBS, job_logs
    rules: Counter[str] = Counter()
    for path in job_logs:
        rules.update(re.findall(r"^localrule (\w+):$", path.read_text(), re.MULTILINE))
    assert rules == DEMO_RULES

    assert list((remote / ".snakemake/vastai/keys").iterdir()) == [], "the run key outlived it"


@pytest.mark.slow
def test_bare_image_gets_this_snakemake(fakevast: FakeVast, tmp_path: Path) -> None:
    """An image with Python but no Snakemake: the bootstrap pip-installs the local version
    (and whatever else the job's command line needs) from PyPI before the first job."""
    workdir = one_rule_workflow(
        tmp_path / "wf", "python -c 'import snakemake; print(snakemake.__version__)' > {output}"
    )

    run = run_snakemake(workdir, fakevast, "--vastai-image", "bare/python:3.11", jobs=1)

    assert run.ok, run.output
    assert (workdir / "out.txt").read_text() == f"{snakemake.__version__}\n"
    instances = assert_all_destroyed(fakevast, workdir)
    assert {i["image"] for i in instances} == {"bare/python:3.11"}
