"""A file git does not track is named at start, before anything is rented, and again in the
error of a job that fails because it is missing on the host (issue 20, item 1).

Why: an untracked ``eval_params.json`` read by a shell rule failed all three eval jobs with
FileNotFoundError after they were paid for, with no hint that the file exists here and was
simply not shipped (Snakemake ships git-tracked sources; job inputs travel on their own).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from snakemake_executor_plugin_vastai.edge.startchecks import unshipped_warning
from tests.fakevast.harness import FakeVast
from tests.workflows import (
    assert_all_destroyed,
    job_errors,
    run_snakemake,
    write_workflow,
)

EVAL_SNAKEFILE = """\
rule all:
    input: "scores.txt"


rule evaluate:
    input: "data.csv"
    output: "scores.txt"
    resources: gpu=1
    shell: {shell!r}
"""
FIX = "`git add` it or name it in `--vastai-deploy-paths`"


def eval_workflow(target: Path, shell: str) -> Path:
    """A workflow committed to git, then files it does not track: eval_params.json (read by
    nothing declared), data.csv (the job's declared input), a file git ignores."""
    workdir = write_workflow(
        target, EVAL_SNAKEFILE.format(shell=shell), {".gitignore": "ignored.txt\n"}
    )
    (workdir / "eval_params.json").write_text('{"k": 5}\n')
    (workdir / "data.csv").write_text("x\n1\n")
    (workdir / "ignored.txt").write_text("scratch\n")
    return workdir


def test_untracked_files_are_named_once_at_start(fakevast: FakeVast, tmp_path: Path) -> None:
    workdir = eval_workflow(tmp_path / "wf", "cat {input} > {output}")

    run = run_snakemake(workdir, fakevast, jobs=1)

    assert run.ok, run.output
    warning = (
        "Not tracked by git, so not shipped to the instances (1 file): eval_params.json. A "
        f"remote job that reads one without declaring it as an input will not find it: {FIX}."
    )
    assert run.output.count(warning) == 1, run.output
    assert run.output.index(warning) < run.output.index("Rented instance"), run.output
    assert_all_destroyed(fakevast, workdir)


@pytest.mark.parametrize(
    "shell",
    [
        "cat eval_params.json {input} > {output}",
        "python3 -c \"open('eval_params.json')\" && cp {input} {output}",
    ],
    ids=["shell", "python"],
)
def test_a_job_failing_on_an_untracked_file_says_it_was_not_shipped(
    fakevast: FakeVast, tmp_path: Path, shell: str
) -> None:
    workdir = eval_workflow(tmp_path / "wf", shell)

    run = run_snakemake(workdir, fakevast, jobs=1)

    assert run.returncode != 0, run.output
    [message] = job_errors(run.output)
    assert f"eval_params.json exists here but was not shipped: {FIX}." in message, message
    assert "data.csv" not in message.split("Last lines")[0], message  # shipped as an input
    assert_all_destroyed(fakevast, workdir)


def test_the_start_warning_lists_ten_and_counts_the_rest(tmp_path: Path) -> None:
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    for name in [f"notes/n{i:02d}.txt" for i in range(12)] + ["input.csv", "sent.py"]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("x\n")
    (tmp_path / ".snakemake" / "vastai").mkdir(parents=True)
    (tmp_path / ".snakemake" / "vastai" / "ledger.jsonl").write_text("{}\n")

    warning = unshipped_warning(tmp_path, shipped=["sent.py"], declared=["input.csv"])

    shown = ", ".join(f"notes/n{i:02d}.txt" for i in range(10))
    assert warning is not None
    assert f"(12 files): {shown} and 2 more. " in warning, warning
    assert unshipped_warning(tmp_path, ["sent.py"], ["input.csv", "notes"]) is None
