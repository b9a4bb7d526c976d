"""A new user's own workflow against the bundled fake, exactly as the README's "Try it here"
section says, and the demo's ``Running:`` line pasted into a shell as it is (issue 20, item 4).

Both start the fake as a user would, a process of their own, and end by checking that it has
nothing left running and refused no call under its rate limits."""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest

from tests.workflows import REPO, assert_all_destroyed, one_rule_workflow

README = REPO / "README.md"
OWN_WORKFLOW = "### Your own workflow against the bundled fake"
REPOSITORY_PLACEHOLDER = "/path/to/this/repository"
LOCAL_URL = re.compile(r"http://127\.0\.0\.1:\d+")


@dataclass
class StartedFake:
    """A fake marketplace process started the user's way, and the two lines it printed."""

    process: subprocess.Popen
    url_line: str
    export_line: str

    @property
    def url(self) -> str:
        return self.url_line.split()[1]

    def ledger(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/_fake/ledger", timeout=30) as answer:
            return json.loads(answer.read())


@contextmanager
def fake_started_by(command: str) -> Iterator[StartedFake]:
    """``command`` run by bash in the repository, as in a terminal of its own; at the end it
    gets Ctrl-C (SIGINT to its process group) and must exit 0."""
    process = subprocess.Popen(
        ["bash", "-c", command],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert process.stdout is not None
    try:
        fake = StartedFake(process, *first_lines(process.stdout, 2))
        assert fake.url_line.startswith("URL http://127.0.0.1:"), fake
        yield fake
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
    assert process.returncode == 0, "the fake did not stop cleanly on Ctrl-C"


def first_lines(stream: IO[str], count: int, timeout: float = 30) -> list[str]:
    """The first lines a process prints; queue.Empty if they do not come within ``timeout``
    (read on a thread of their own: a line that never comes must fail the test, not hang it)."""
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        for _ in range(count):
            lines.put(stream.readline())

    threading.Thread(target=read, name="fake-stdout", daemon=True).start()
    return [lines.get(timeout=timeout) for _ in range(count)]


def own_workflow_blocks() -> tuple[str, str]:
    """The two shell blocks of the README's own-workflow part: the fake's terminal, then the
    workflow's."""
    section = README.read_text().split("## Try it here", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section.split(OWN_WORKFLOW, 1)[1], re.DOTALL)
    assert len(blocks) == 2, blocks
    return blocks[0], blocks[1]


def commands(block: str) -> str:
    return "\n".join(line for line in block.splitlines() if line and not line.startswith("#"))


def user_environment() -> dict[str, str]:
    """This machine's environment without the tests' Vast.ai settings (the unpaced switch
    among them): what a new user's shell has."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("VAST_", "SNAKEMAKE_"))}


def shell(script: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-e", "-c", script],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )


def assert_clean_bill(fake: StartedFake, workdir: Path) -> None:
    """Nothing left running, and no call refused under the fake's rate limits."""
    assert_all_destroyed(fake, workdir)  # it asks the fake for its ledger() only
    assert sum(fake.ledger()["rate_limited"].values()) == 0


def test_the_readmes_own_workflow_block_runs_as_written(tmp_path: Path) -> None:
    fake_terminal, workflow_terminal = own_workflow_blocks()
    workdir = one_rule_workflow(tmp_path / "mine", "echo hello > out.txt")
    with fake_started_by(commands(fake_terminal)) as fake:
        shown = [line.removeprefix("# ") for line in fake_terminal.splitlines()[1:]]
        printed = [fake.url_line.strip(), fake.export_line.strip()]
        assert [LOCAL_URL.sub(fake.url, line) for line in shown] == printed

        pasted = workflow_terminal.splitlines()
        assert LOCAL_URL.sub(fake.url, pasted[0]) == fake.export_line.strip()
        script = "\n".join([fake.export_line.strip(), *pasted[1:]])
        done = shell(script.replace(REPOSITORY_PLACEHOLDER, str(REPO)), workdir, user_environment())

        assert done.returncode == 0, done.stdout
        assert (workdir / "out.txt").read_text() == "hello\n"
        assert "All 1 instance(s) of this run are destroyed" in done.stdout
        assert_clean_bill(fake, workdir)


@pytest.mark.slow  # one of the main run's slowest (README: Tests)
def test_the_demos_running_line_runs_when_pasted_into_a_shell(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    demo = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "demo.py"), "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert demo.returncode == 0, demo.stdout + demo.stderr
    (line,) = [s.removeprefix("Running: ") for s in demo.stdout.splitlines() if "Running:" in s]
    url = LOCAL_URL.search(line)
    assert url, line
    shutil.rmtree(workdir / "results")  # so that the pasted line has every job to run again

    # The demo's fake is gone: one on the same port, started the user's way, stands in.
    port = url.group().rsplit(":", 1)[1]
    with fake_started_by(f"{sys.executable} -m tests.fakevast --port {port}") as fake:
        done = shell(line, tmp_path, dict(os.environ))

        assert done.returncode == 0, done.stdout
        assert (workdir / "results" / "summary report.txt").is_file()
        assert_clean_bill(fake, workdir)
