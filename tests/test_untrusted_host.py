"""A rented host is a third party, and the user's key is theirs alone: real snakemake runs
against the fake marketplace in which an instance sends back what no honest job would (a link
to /dev/zero, a FIFO), and in which the API key and the run's SSH key must not outlive their
use or show up where others can read them."""

from __future__ import annotations

from pathlib import Path

from tests.fakevast.clients import sdk
from tests.fakevast.harness import FakeVast
from tests.workflows import (
    assert_all_destroyed,
    job_errors,
    one_rule_workflow,
    rented,
    run_snakemake,
)


def test_an_output_linked_to_dev_zero_fails_the_job_without_a_download(
    fakevast: FakeVast, tmp_path: Path
) -> None:
    workdir = one_rule_workflow(tmp_path / "wf", "ln -s /dev/zero {output}")

    run = run_snakemake(workdir, fakevast, jobs=1)

    assert not run.ok
    [error] = job_errors(run.output)
    assert "'out.txt' (not a regular file (a character device))" in error, error
    assert not (workdir / "out.txt").exists()
    assert not list(workdir.glob(".out.txt.*")), "a partial download was left behind"
    assert_all_destroyed(fakevast, workdir)


def test_a_fifo_output_fails_the_job_instead_of_hanging(fakevast: FakeVast, tmp_path: Path) -> None:
    workdir = one_rule_workflow(tmp_path / "wf", "mkfifo {output}")

    run = run_snakemake(workdir, fakevast, jobs=1, timeout=300)

    assert not run.ok
    [error] = job_errors(run.output)
    assert "'out.txt' (not a regular file (a FIFO))" in error, error
    assert_all_destroyed(fakevast, workdir)


def test_an_api_key_on_the_command_line_is_printed_and_logged_nowhere(
    fakevast: FakeVast, tmp_path: Path
) -> None:
    workdir = one_rule_workflow(tmp_path / "wf", "echo hi > {output}")

    run = run_snakemake(
        workdir, fakevast, "--vastai-api-key", fakevast.api_key, jobs=1,
        env={"VAST_API_KEY": None},
    )  # fmt: skip

    assert run.ok, run.output
    assert "--vastai-api-key ***" in run.output  # Snakemake's own "Command:" line, masked
    assert fakevast.api_key not in run.output
    logs = list((workdir / ".snakemake" / "log").glob("*.log"))
    assert logs
    for log in logs:
        assert fakevast.api_key not in log.read_text(), log
    assert list((workdir / ".snakemake/vastai/keys").iterdir()) == []
    assert_all_destroyed(fakevast, workdir)


def test_kept_instances_keep_the_ssh_key_and_say_where(fakevast: FakeVast, tmp_path: Path) -> None:
    workdir = one_rule_workflow(tmp_path / "wf", "echo hi > {output}")

    run = run_snakemake(workdir, fakevast, "--vastai-keep-instances", jobs=1)

    try:
        assert run.ok, run.output
        [key] = [p for p in (workdir / ".snakemake/vastai/keys").iterdir() if p.suffix != ".pub"]
        assert "accept SSH logins as root with" in run.output
        assert str(key.relative_to(workdir)) in run.output
    finally:
        for row in rented(fakevast):
            sdk(fakevast).destroy_instance(id=row["id"])


def test_a_dropped_key_attach_costs_nothing(fakevast: FakeVast, tmp_path: Path) -> None:
    """Attaching a key through the API is racy on real instances: the run's key also goes in
    through the onstart script, so an attach that answers success and installs nothing is
    harmless."""
    workdir = one_rule_workflow(tmp_path / "wf", "echo hi > {output}")
    fakevast.set_faults({"next_creates": {"count": None, "drop_attach": True}})

    run = run_snakemake(workdir, fakevast, jobs=1)

    assert run.ok, run.output
    assert (workdir / "out.txt").read_text() == "hi\n"
    assert_all_destroyed(fakevast, workdir)


def test_jobs_get_the_images_own_python(fakevast: FakeVast, tmp_path: Path) -> None:
    """On vastai/pytorch the Python with torch is /venv/main, on the image's PATH but not on a
    non-interactive SSH session's: the job's `python` must be that one (the fake's venv has a
    module no other Python there can import)."""
    workdir = one_rule_workflow(
        tmp_path / "wf",
        "python -c 'import vast_torch_stub, sys; print(sys.prefix)' > {output}",
    )

    run = run_snakemake(workdir, fakevast, jobs=1)

    assert run.ok, run.output
    assert (workdir / "out.txt").read_text().strip() == "/venv/main"
    assert_all_destroyed(fakevast, workdir)
