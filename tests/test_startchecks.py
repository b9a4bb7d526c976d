"""What is refused or said at start, before anything is rented: outputs outside the workflow
directory, a workflow that is not a git repository, rules that ask for no GPU."""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

import pytest

from snakemake_executor_plugin_vastai.edge.startchecks import (
    LOWEST_SNAKEMAKE,
    OutsideWorkdirError,
    PlannedJob,
    UnsupportedSnakemake,
    cpu_only_notice,
    is_git_work_tree,
    not_git_warning,
    refuse_outside_outputs,
    require_supported_snakemake,
)
from tests.fakevast.harness import FakeVast
from tests.workflows import (
    REPO,
    assert_all_destroyed,
    assert_nothing_rented,
    run_snakemake,
    write_workflow,
)


def job(rule: str, *written: str, asks_gpu: bool = True) -> PlannedJob:
    return PlannedJob(rule=rule, written=written, asks_gpu=asks_gpu)


@pytest.mark.parametrize("path", ["../escape.txt", "a/../../escape.txt", "/etc/escape.txt"])
def test_an_output_outside_the_workdir_is_refused_with_its_rule(tmp_path: Path, path: str) -> None:
    with pytest.raises(OutsideWorkdirError) as refused:
        refuse_outside_outputs([job("fine", "out/a.txt"), job("escape", path)], tmp_path)
    message = str(refused.value)
    assert f"rule escape: {path}" in message
    assert "fine" not in message
    assert "localrules" in message


@pytest.mark.parametrize("path", ["out.txt", "a/b/../c.txt", "./x", "ok/"])
def test_outputs_inside_the_workdir_pass(tmp_path: Path, path: str) -> None:
    refuse_outside_outputs([job("fine", path, str(tmp_path / "abs.txt"))], tmp_path)


def test_the_cpu_notice_names_each_gpu_less_rule_once() -> None:
    jobs = [job("prep", asks_gpu=False), job("prep", asks_gpu=False), job("train")]
    notice = cpu_only_notice(jobs)
    assert notice is not None and "prep" in notice and "train" not in notice
    assert notice.count("prep") == 2  # the list and the localrules line
    assert cpu_only_notice([job("train")]) is None


def test_the_git_warning_lists_what_goes(tmp_path: Path) -> None:
    files = [f"scripts/s{i}.py" for i in range(10)]
    warning = not_git_warning(tmp_path, ["Snakefile", *files])
    assert warning is not None
    assert "11 files: Snakefile, scripts/s0.py" in warning and "and 3 more" in warning
    assert "git add" in warning and "--vastai-deploy-paths" in warning


def test_a_git_work_tree_gets_no_warning(tmp_path: Path) -> None:
    workflow = write_workflow(tmp_path / "wf", "rule all:\n    output: 'a'\n    shell: 'touch a'\n")
    assert is_git_work_tree(workflow)
    assert not_git_warning(workflow, ["Snakefile"]) is None
    assert not is_git_work_tree(tmp_path)


ESCAPE = """
rule all:
    input: "inside.txt", "../escape.txt"

rule inside:
    output: "inside.txt"
    resources: gpu=1
    shell: "echo in > {output}"

rule escape:
    output: "../escape.txt"
    resources: gpu=1
    shell: "echo out > {output}"
"""


def test_a_run_with_an_output_outside_is_refused_before_any_rent(
    tmp_path: Path, fakevast: FakeVast
) -> None:
    workflow = write_workflow(tmp_path / "wf", ESCAPE)
    run = run_snakemake(workflow, fakevast)
    assert not run.ok, run.output
    assert "rule escape: ../escape.txt" in run.output
    assert run.output.count("Outputs outside the workflow directory") == 1, run.output
    assert_nothing_rented(fakevast)
    assert not (tmp_path / "escape.txt").exists()


MIXED = """
localrules: all

rule all:
    input: "prep.txt", "train.txt"

rule prep:
    output: "prep.txt"
    shell: "echo prep > {output}"

rule train:
    input: "prep.txt"
    output: "train.txt"
    resources: gpu=1
    shell: "cat {input} > {output}"
"""


def test_a_run_names_gpu_less_rules_once(tmp_path: Path, fakevast: FakeVast) -> None:
    workflow = write_workflow(tmp_path / "wf", MIXED)
    run = run_snakemake(workflow, fakevast)
    assert run.ok, run.output
    notices = [line for line in run.output.splitlines() if "without a gpu resource" in line]
    assert len(notices) == 1, run.output
    assert "prep" in notices[0] and "train" not in notices[0]
    assert "localrules: prep" in notices[0]
    assert_all_destroyed(fakevast, workflow)


def test_a_workflow_outside_git_is_warned_about_at_start(
    tmp_path: Path, fakevast: FakeVast
) -> None:
    workflow = write_workflow(tmp_path / "wf", MIXED.replace("localrules: all", ""))
    shutil.rmtree(workflow / ".git")
    run = run_snakemake(workflow, fakevast)
    assert run.ok, run.output
    warnings = [line for line in run.output.splitlines() if "is not a git repository, so" in line]
    assert len(warnings) == 1, run.output
    assert "1 file: Snakefile" in warnings[0]
    first_rent = run.output.find("Rented ")
    assert 0 <= run.output.find("is not a git repository") < first_rent, run.output
    assert_all_destroyed(fakevast, workflow)


@pytest.mark.parametrize("installed", ["9.14.0", "9.27.1", "9.14.0rc1"])
def test_a_supported_snakemake_passes(installed: str) -> None:
    require_supported_snakemake(installed)


@pytest.mark.parametrize("installed", ["9.13.7", "9.0.0", "8.30.0", "10.0.0", "unknown"])
def test_any_other_snakemake_is_refused_with_the_fix(installed: str) -> None:
    with pytest.raises(UnsupportedSnakemake) as refused:
        require_supported_snakemake(installed)

    message = str(refused.value)
    assert f"this is Snakemake {installed}" in message
    assert "pip install 'snakemake>=9.14,<10'" in message


def test_the_floor_is_the_one_the_tests_install() -> None:
    """pyproject.toml's test extra (which scripts/test_lowest_snakemake.sh installs at its
    floor) and the check at start name the same lowest Snakemake."""
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    [pin] = [r for r in extra["test"] if r.startswith("snakemake>=")]
    assert pin == f"snakemake>={'.'.join(map(str, LOWEST_SNAKEMAKE))},<{LOWEST_SNAKEMAKE[0] + 1}"
