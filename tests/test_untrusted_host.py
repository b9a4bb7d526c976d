"""A rented host is a third party, and the user's key is theirs alone: real snakemake runs
against the fake marketplace in which an instance sends back what no honest job would (a link
to /dev/zero, a FIFO, a tampered frame) or more than this machine should take (a 1 TB file,
100,000 files, a 1 GB log), and in which the API key and the run's SSH key must not outlive
their use or show up where others can read them."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from snakemake_executor_plugin_vastai.base.report import human_bytes
from snakemake_executor_plugin_vastai.remote.jobwire import (
    LOG_CUT_MARKER,
    LOG_HEAD_BYTES,
    LOG_TAIL_BYTES,
    MAX_RESULT_ENTRIES,
)
from tests.fakevast.clients import sdk
from tests.fakevast.harness import FakeVast
from tests.workflows import (
    JOB_LOGS,
    assert_all_destroyed,
    job_errors,
    one_rule_workflow,
    rented,
    run_snakemake,
    write_workflow,
)

TERABYTE = 10**12
EXCLUDED = "Not renting from machine"  # the run's line when it gives a machine up

MAKE_RULE = """\
rule make:
    output: {output}
    resources: gpu=1
    shell: {shell!r}


rule all:
    default_target: True
    input: rules.make.output
"""

# Run on the instance by a job: writes one frame into its agent's stdout, as a host that
# tampers with the stream would.
INJECT_FRAME = """\
import os
import sys

kind, payload = sys.argv[1].encode(), sys.argv[2].encode()
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            argv = handle.read().split(b"\\0")
    except OSError:
        continue
    if any(b"/agent-" in arg for arg in argv):
        with open(f"/proc/{pid}/fd/1", "wb") as out:
            out.write(kind + len(payload).to_bytes(4, "big") + payload)
        break
else:
    sys.exit("no job agent found")
"""


def make_workflow(
    target: Path, output: str, shell: str, files: dict[str, str] | None = None
) -> Path:
    """A workflow whose only remote job is rule ``make``; ``output`` as written in a Snakefile
    (a quoted path, or ``directory("...")``)."""
    return write_workflow(target, MAKE_RULE.format(output=output, shell=shell), files)


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


def test_a_host_announcing_a_1_tb_file_fails_the_job_before_any_download(
    fakevast: FakeVast, tmp_path: Path
) -> None:
    """The instance holds a sparse 1 TB output (it costs no disk there): the announcement alone
    is refused, naming the file. A big file is the job's doing, not the host's: not excluded."""
    size = max(TERABYTE, 2 * shutil.disk_usage(tmp_path).free)
    workdir = one_rule_workflow(tmp_path / "wf", f"truncate -s {size} {{output}}")

    run = run_snakemake(workdir, fakevast, jobs=1)

    assert not run.ok
    [error] = job_errors(run.output)
    assert f"'out.txt' is {human_bytes(size)} on the instance: more than this machine" in error
    assert not list(workdir.glob(".out.txt.*")), "a partial download was left behind"
    assert EXCLUDED not in run.output
    assert_all_destroyed(fakevast, workdir)


@pytest.mark.slow  # one of the main run's slowest (README: Tests)
def test_100_000_files_in_a_directory_output_are_refused_by_name(
    fakevast: FakeVast, tmp_path: Path
) -> None:
    shell = "mkdir -p {output} && cd {output} && seq 100000 | xargs touch"
    workdir = make_workflow(tmp_path / "wf", 'directory("tree")', shell)

    run = run_snakemake(workdir, fakevast, jobs=1)

    assert not run.ok
    [error] = job_errors(run.output)
    # 100,000 files, the directory itself and Snakemake's own .snakemake_timestamp
    assert (
        f"'tree' (100002 files, links and directories, of at most {MAX_RESULT_ENTRIES} per job;"
        " pack them into one archive)"
    ) in error, error
    assert EXCLUDED not in run.output
    assert_all_destroyed(fakevast, workdir)


@pytest.mark.slow  # one of the main run's slowest (README: Tests)
def test_a_1_gb_job_log_is_kept_to_its_cap_with_a_marker(
    fakevast: FakeVast, tmp_path: Path
) -> None:
    """The job's log on the instance is a sparse 1 GiB file (no disk there); all of it comes
    down the stream, and here the log keeps its head, a marker and its last lines."""
    shell = "echo FIRST-LINE; truncate -s 1G /proc/self/fd/1; echo LAST-LINE; echo hi > {output}"
    workdir = one_rule_workflow(tmp_path / "wf", shell)

    run = run_snakemake(workdir, fakevast, jobs=1)

    assert run.ok, run.output
    [log] = (workdir / JOB_LOGS).iterdir()
    assert log.stat().st_size <= LOG_HEAD_BYTES + len(LOG_CUT_MARKER) + LOG_TAIL_BYTES
    content = log.read_bytes()
    assert b"FIRST-LINE" in content[:LOG_HEAD_BYTES]
    assert content[LOG_HEAD_BYTES:].startswith(LOG_CUT_MARKER)
    assert b"LAST-LINE" in content[-LOG_TAIL_BYTES:]
    assert (workdir / "out.txt").read_text() == "hi\n"
    assert_all_destroyed(fakevast, workdir)


def test_a_malformed_frame_fails_the_job_and_excludes_the_host(
    fakevast: FakeVast, tmp_path: Path
) -> None:
    """A process on the host writes an exit frame whose code is no number into the agent's
    stream: the job fails naming it (no "internal error"), and the machine is given up."""
    shell = 'python inject.py X \'{{"code": "zero"}}\' && echo hi > {output}'
    workdir = make_workflow(tmp_path / "wf", '"out.txt"', shell, {"inject.py": INJECT_FRAME})

    run = run_snakemake(workdir, fakevast, jobs=1)

    assert not run.ok
    [error] = job_errors(run.output)
    assert "the agent sent a malformed b'X' frame (code: 'zero')" in error, error
    assert "internal error" not in run.output
    assert EXCLUDED in run.output
    assert_all_destroyed(fakevast, workdir)


def test_a_hugging_face_cache_comes_back_with_its_links(fakevast: FakeVast, tmp_path: Path) -> None:
    """Links inside a directory output (a snapshot's files point into blobs/, a link to a
    directory) come back as links; only a link that leaves it would be refused."""
    shell = (
        "mkdir -p {output}/blobs {output}/snapshots/rev1 && echo config > {output}/blobs/aaa && "
        "ln -s ../../blobs/aaa {output}/snapshots/rev1/config.json && "
        "ln -s snapshots/rev1 {output}/latest"
    )
    workdir = make_workflow(tmp_path / "wf", 'directory("hf")', shell)

    run = run_snakemake(workdir, fakevast, jobs=1)

    assert run.ok, run.output
    assert os.readlink(workdir / "hf/snapshots/rev1/config.json") == "../../blobs/aaa"
    assert os.readlink(workdir / "hf/latest") == "snapshots/rev1"
    assert (workdir / "hf/latest/config.json").read_text() == "config\n"
    assert_all_destroyed(fakevast, workdir)


DOTDOT_SNAKEFILE = """\
rule all:
    input: "y.txt"


rule make:
    output: "sub/../x.txt"
    resources: gpu=1
    shell: "echo hi > {output}"


rule use:
    input: "sub/../x.txt"
    output: "y.txt"
    resources: gpu=1
    shell: "cat {input} > {output}"
"""


def test_a_path_declared_through_dotdot_works_as_output_and_input(
    fakevast: FakeVast, tmp_path: Path
) -> None:
    """Snakemake looks for 'sub/../x.txt' as written, which needs 'sub' both here (after the
    output came back) and in the next job's directory on the instance."""
    workdir = write_workflow(tmp_path / "wf", DOTDOT_SNAKEFILE)

    run = run_snakemake(workdir, fakevast, jobs=1)

    assert run.ok, run.output
    assert (workdir / "y.txt").read_text() == "hi\n"
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
